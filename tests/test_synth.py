"""The synthetic cohort: determinism, the annotated copies and their ellipses, DICOM read-back, privacy."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image

from workspace.app.cli import main
from workspace.base.catalog import open_catalog
from workspace.base.config import Workspace
from workspace.data import synth
from workspace.data.dicom_io import read_dicom
from workspace.data.ingest import resolve_path

SHAPE = (832, 640)


def _with_variants(plan: synth.PatientPlan, key: str, variants: tuple[str, ...], vflip: bool = False):
    return dataclasses.replace(plan, variants={**plan.variants, key: variants},
                               vertical_flip={**plan.vertical_flip, key: vflip})


def test_patient_depends_only_on_seed_and_index(tmp_path):
    a, b = synth.plan_patient(3, 7), synth.plan_patient(3, 7)
    assert a == b
    assert synth.plan_patient(4, 7) != a and synth.plan_patient(3, 8) != a
    first = synth.make_image(a, "LMLO", SHAPE)
    again = synth.make_image(b, "LMLO", SHAPE)
    assert np.array_equal(first.stored, again.stored)
    sizes = [synth.write_dicom(tmp_path / f"{n}.dcm", a, im) for n, im in enumerate((first, again))]
    assert sizes[0] == sizes[1]
    assert (tmp_path / "0.dcm").read_bytes() == (tmp_path / "1.dcm").read_bytes()
    other = synth.make_image(synth.plan_patient(3, 8), "LMLO", SHAPE)
    assert not np.array_equal(first.stored, other.stored)


def test_rebuilding_one_patient_gives_the_same_files(small_cohort, tmp_path):
    ws2 = Workspace.open(tmp_path / "ws2")
    k = 2
    synth.synthesize(ws2, 1, seed=small_cohort.seed, first_patient=k, image_shape=small_cohort.image_shape)
    for key in synth.IMAGE_KEYS:
        mine = synth.dicom_path(ws2, small_cohort.seed, k, key).read_bytes()
        theirs = synth.dicom_path(small_cohort.ws, small_cohort.seed, k, key).read_bytes()
        assert mine == theirs, key


def test_cohort_has_both_classes_findings_and_benign_lookalikes(small_cohort):
    db = open_catalog(small_cohort.ws)
    images = list(db.query("SELECT * FROM images WHERE dataset = 'synthetic'"))
    assert len(images) == 4 * small_cohort.n_patients
    assert {r["label"] for r in images} == {0, 1}
    for r in images:
        lesions = list(db.query("SELECT * FROM lesions WHERE image_id = ? AND source = 'ground_truth'",
                                [r["image_id"]]))
        malignant = [le for le in lesions if le["pathology"] == "malignant"]
        assert (r["birads"] == "0") == bool(malignant)
        assert r["label"] == (1 if r["birads"] == "0" else 0)
        assert r["bits_stored"] in (12, 13, 14)
        assert r["density"] in "ABCD"
    benign = db.execute("SELECT COUNT(*) FROM lesions l JOIN images i USING (image_id) "
                        "WHERE l.pathology = 'benign' AND i.label = 0").fetchone()[0]
    assert benign > 0, "benign findings on BI-RADS 1/2 images keep 'any blob' from being a perfect cue"


def test_ground_truth_masks_are_full_size_and_match_their_box(small_cohort):
    ws = small_cohort.ws
    db = open_catalog(ws)
    rows = list(db.query("SELECT l.*, i.rows, i.cols FROM lesions l JOIN images i USING (image_id) "
                         "WHERE l.source = 'ground_truth'"))
    assert rows
    for le in rows:
        mask = np.asarray(Image.open(resolve_path(ws, le["mask_path"])))
        assert mask.shape == (le["rows"], le["cols"])
        ys, xs = np.nonzero(mask)
        g = json.loads(le["geometry"])
        assert g["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert g["area"] == len(xs)


def _ellipse_pixels(shape, e):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    a = math.radians(e["angle"])
    u = (xx - e["cx"]) * math.cos(a) + (yy - e["cy"]) * math.sin(a)
    v = -(xx - e["cx"]) * math.sin(a) + (yy - e["cy"]) * math.cos(a)
    return (u / e["rx"]) ** 2 + (v / e["ry"]) ** 2 <= 1


def _angle_diff(a, b):
    d = abs(a - b) % 180
    return min(d, 180 - d)


def test_ellipse_detection_recovers_drawn_ellipses_on_busy_background():
    rng = np.random.default_rng(1)
    grey = (rng.random((300, 400)) * 200).astype(np.uint8)
    grey[40:60, 300:330] = 255          # saturated tissue: white, but no ring
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    drawn = [{"cx": 80.3, "cy": 70.6, "rx": 30.0, "ry": 14.0, "angle": 25.0},
             {"cx": 220.0, "cy": 150.2, "rx": 9.0, "ry": 7.0, "angle": 100.0},
             {"cx": 120.7, "cy": 230.1, "rx": 45.5, "ry": 44.0, "angle": 0.0},
             {"cx": 330.0, "cy": 240.0, "rx": 5.0, "ry": 5.0, "angle": 0.0}]
    for e in drawn:
        synth.draw_ellipse_ring(rgb, e)
    found = synth.detect_ellipses(rgb)
    assert len(found) == len(drawn)
    for e in drawn:
        f = min(found, key=lambda f: math.hypot(f["cx"] - e["cx"], f["cy"] - e["cy"]))
        assert math.hypot(f["cx"] - e["cx"], f["cy"] - e["cy"]) < 0.75
        assert abs(f["rx"] - e["rx"]) < 1.0 and abs(f["ry"] - e["ry"]) < 1.0
        if e["rx"] / e["ry"] > 1.3:
            assert _angle_diff(f["angle"], e["angle"]) < 3


def test_annotated_copies_give_one_ellipse_per_finding_around_its_mask(small_cohort):
    ws = small_cohort.ws
    db = open_catalog(ws)
    assert small_cohort.synth_summary.ellipses_missed == 0
    positives = list(db.query("SELECT * FROM images WHERE label = 1"))
    assert positives
    for img in positives:
        copy = np.asarray(Image.open(resolve_path(ws, img["annotated_path"])))
        factor = synth.annotated_factor(img["rows"])
        assert copy.shape[:2] == (-(-img["rows"] // factor), -(-img["cols"] // factor))
        truth = [le for le in db.query("SELECT * FROM lesions WHERE image_id = ? AND source = 'ground_truth'"
                                       " AND pathology = 'malignant'", [img["image_id"]])]
        ellipses = [le for le in db.query("SELECT * FROM lesions WHERE image_id = ? AND source = 'annotated_copy'",
                                          [img["image_id"]])]
        assert len(ellipses) == len(truth)
        for le in truth:
            mask = np.asarray(Image.open(resolve_path(ws, le["mask_path"]))) > 0
            # the ellipse found on the low-resolution copy, back in full-resolution (continuous) coordinates
            holders = []
            for e in ellipses:
                g = json.loads(e["geometry"])  # continuous coordinates: pixel centres sit at +0.5
                inside = _ellipse_pixels(mask.shape, dict(g, cx=g["cx"] - 0.5, cy=g["cy"] - 0.5))
                if mask[inside].sum() >= 0.99 * mask.sum():
                    holders.append(e)
            assert len(holders) == 1, "one found ellipse holds (almost) all of the finding's mask"
        # and, on the copy itself, the found ellipses are the drawn ones within a pixel
        plan = synth.plan_patient(small_cohort.seed, _patient_index(ws, img))
        image = synth.make_image(plan, img["laterality"] + img["view"], small_cohort.image_shape)
        for e in ellipses:
            got = json.loads(e["attributes"])["copy_ellipse"]
            want = min((synth.full_to_copy(d, factor) for d in image.ellipses),
                       key=lambda d: math.hypot(d["cx"] - got["cx"], d["cy"] - got["cy"]))
            assert math.hypot(want["cx"] - got["cx"], want["cy"] - got["cy"]) < 1.0
            assert abs(max(want["rx"], want["ry"]) - max(got["rx"], got["ry"])) < 1.0
            assert abs(min(want["rx"], want["ry"]) - min(got["rx"], got["ry"])) < 1.0


def _patient_index(ws, image_row) -> int:
    path = resolve_path(ws, image_row["source_path"])
    return int(path.parent.name.removeprefix("patient"))


@pytest.mark.parametrize("variants, vflip, view", [
    ((), False, "CC"), (("monochrome1",), False, "MLO"), (("jpeg2000",), False, "CC"),
    (("flipped",), False, "MLO"), (("flipped",), True, "MLO"), (("sigmoid",), False, "CC"),
    (("monochrome1", "jpeg2000", "flipped"), False, "CC"),
])
@pytest.mark.parametrize("laterality", ["L", "R"])
def test_every_variant_reads_back_through_dicom_io(tmp_path, variants, vflip, view, laterality):
    key = laterality + view
    plan = _with_variants(synth.plan_patient(5, 1), key, variants, vflip)
    image = synth.make_image(plan, key, SHAPE)
    path = tmp_path / f"{key}.dcm"
    synth.write_dicom(path, plan, image)
    got = read_dicom(path)
    assert got.laterality == laterality and got.view == view
    assert got.photometric == ("MONOCHROME1" if "monochrome1" in variants else "MONOCHROME2")
    assert got.voi_function == ("SIGMOID" if "sigmoid" in variants else "LINEAR")
    assert got.transfer_syntax == ("1.2.840.10008.1.2.4.90" if "jpeg2000" in variants else "1.2.840.10008.1.2.1")
    assert (bool(got.flip_horizontal), bool(got.flip_vertical)) == (image.flip_h, image.flip_v)
    assert not got.warnings, got.warnings
    # the model sees the drawn signal, normalised orientation, whatever the file's form
    drawn = synth.render_view(plan, laterality, view, SHAPE).signal
    maxval = 2 ** plan.bits_stored - 1
    assert np.abs(got.model_pixels() - np.rint(drawn * maxval) / maxval).max() < 1e-6
    assert np.array_equal(got.stored_pixels, image.stored)


def test_full_size_image_has_the_acquisition_look():
    plan = synth.plan_patient(0, 0)
    image = synth.make_image(plan, "RMLO")
    assert image.stored.shape == synth.FULL_SHAPE
    assert 0.07 <= image.spacing_mm <= 0.1
    maxval = 2 ** image.bits_stored - 1
    assert image.stored.max() <= maxval
    values = image.stored if image.photometric == "MONOCHROME2" else maxval - image.stored
    # black background, grey breast: the chest-wall side (right as stored for R, unless mirrored) holds tissue
    chest, far = (values[:, -200:], values[:, :200]) if image.flip_h else (values[:, :200], values[:, -200:])
    assert np.median(far) < 0.05 * maxval < np.median(chest)
    # noise: neighbouring background pixels differ
    assert values[-100:, :100].std() > 0


def test_identifiers_never_leave_the_patients_table(small_cohort):
    ws = small_cohort.ws
    db = open_catalog(ws)
    patients = list(db.query("SELECT * FROM patients"))
    secrets = set()
    for p in patients:
        secrets |= {p["source_patient_id"], p["patient_name"], p["birth_date"]}
        secrets |= set(p["patient_name"].split("^"))
    secrets.discard(None)
    assert secrets
    for table in ("images", "lesions", "patches", "patch_sets"):
        dump = json.dumps(list(db.query(f"SELECT * FROM {table}")))
        for s in secrets:
            assert s not in dump, (table, s)
    for path in ws.root.rglob("*"):
        if path.is_file() and path.suffix != ".dcm" and path.name != "catalog.sqlite" and "-wal" not in path.name:
            assert not any(s in path.name for s in secrets)
            if path.suffix == ".png":
                data = path.read_bytes()
                assert not any(s.encode() in data for s in secrets), path


def test_cli_synth_small_and_bad_input(tmp_path, capsys):
    root = tmp_path / "w"
    assert main(["synth", "--patients", "1", "--small", "--first-patient", "4", "-w", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1 patients, 4 images written" in out
    db = open_catalog(Workspace.open(root))
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 4
    assert main(["synth", "--patients", "1", "--small", "--first-patient", "4", "-w", str(root)]) == 0
    assert "(4 already there)" in capsys.readouterr().out
    assert main(["synth", "--patients", "0", "-w", str(root)]) == 1
    assert "error: --patients must be at least 1" in capsys.readouterr().err


def test_cohort_picture_shows_each_view_with_its_findings(tmp_path):
    path = synth.cohort_picture(tmp_path / "cohort.png", [3], image_shape=(416, 320), reduce=4)
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (104, 4 * 80 + 12, 3)  # one row, four 104 x 80 views with 4-pixel gaps
    tiles = [sheet[:, i * 84:i * 84 + 80] for i in range(4)]   # RCC LCC RMLO LMLO: RCC is BI-RADS 0
    red = [int(((t == (255, 40, 40)).all(axis=2)).sum()) for t in tiles]
    yellow = [int(((t == (255, 220, 0)).all(axis=2)).sum()) for t in tiles]
    assert red[0] > 0 and yellow[0] > 0       # the malignant outline and the annotated-copy ellipse
    assert red[1] == 0 and yellow[1] == 0     # LCC of patient 3 holds no malignant finding

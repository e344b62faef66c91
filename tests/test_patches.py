"""The paper's patch set: lesion patches inside their regions, normal patches clear of lesions, balanced."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from workspace.app.cli import main
from workspace.base.catalog import open_catalog
from workspace.data import patches as P
from workspace.data.dicom_io import flip_array
from workspace.data.ingest import load_foreground, load_model_pixels, resolve_path


def _image_rows(db):
    return {r["image_id"]: r for r in db.query("SELECT * FROM images")}


def _normalised_mask(ws, image_row, lesion):
    full = np.asarray(Image.open(resolve_path(ws, lesion["mask_path"]))) > 0
    return flip_array(full, bool(image_row["flip_horizontal"]), bool(image_row["flip_vertical"]))


def test_every_lesion_patch_overlaps_its_lesion_and_the_true_finding(small_cohort):
    ws, size = small_cohort.ws, small_cohort.patch_size
    db = open_catalog(ws)
    images = _image_rows(db)
    ps = P.open_patch_set(ws, small_cohort.patch_set)
    lesion_rows = [r for r in ps.rows if r["label"] == 1]
    assert lesion_rows
    for r in lesion_rows:
        image = images[r["image_id"]]
        assert image["label"] == 1
        lesion = next(db.query("SELECT * FROM lesions WHERE lesion_id = ?", [r["lesion_id"]]))
        assert lesion["source"] == "annotated_copy"  # the paper's path when copies exist
        region = P.lesion_region(ws, image, lesion)
        assert region.contains(r["x"] + size / 2, r["y"] + size / 2)  # the default rule: centre inside
        truth = [le for le in db.query("SELECT * FROM lesions WHERE image_id = ? AND source = 'ground_truth' "
                                       "AND pathology = 'malignant'", [r["image_id"]])]
        hits = [_normalised_mask(ws, image, le)[r["y"]:r["y"] + size, r["x"]:r["x"] + size].any() for le in truth]
        assert any(hits), f"patch {r['patch_id']} misses every true finding"
        assert 0 <= r["x"] <= image["cols"] - size and 0 <= r["y"] <= image["rows"] - size


def test_no_normal_patch_touches_a_finding_and_all_are_centred_in_tissue(small_cohort):
    ws, size = small_cohort.ws, small_cohort.patch_size
    db = open_catalog(ws)
    images = _image_rows(db)
    ps = P.open_patch_set(ws, small_cohort.patch_set)
    assert ps.params["normal"] == P.DEFAULT_NORMAL_RULE == "centre:0.25"
    normal = [r for r in ps.rows if r["label"] == 0]
    assert normal
    for r in normal:
        image = images[r["image_id"]]
        assert image["label"] == 0
        fg = load_foreground(ws, image)
        assert fg[r["y"] + size // 2, r["x"] + size // 2]  # the centre is in the breast
        assert P.tissue_fraction(fg, r["x"], r["y"], size) >= 0.25
        for le in db.query("SELECT * FROM lesions WHERE image_id = ? AND source = 'ground_truth'", [r["image_id"]]):
            if le["pathology"] == "benign":
                continue  # benign findings belong to the normal class on purpose
            assert not _normalised_mask(ws, image, le)[r["y"]:r["y"] + size, r["x"]:r["x"] + size].any()
    # and no normal patch comes from an image holding a malignant finding
    positive_images = {le["image_id"] for le in db.query("SELECT image_id FROM lesions WHERE pathology = 'malignant'")}
    assert not positive_images & {r["image_id"] for r in normal}


def _tissue_fractions(ws, rows, images):
    foregrounds: dict[str, np.ndarray] = {}
    out = []
    for r in rows:
        if r["image_id"] not in foregrounds:
            foregrounds[r["image_id"]] = load_foreground(ws, images[r["image_id"]])
        out.append(P.tissue_fraction(foregrounds[r["image_id"]], r["x"], r["y"], r["size"]))
    return np.array(out)


def test_normal_and_lesion_patches_hold_comparable_amounts_of_background(small_cohort):
    """The shortcut of the all-tissue recipe: background in a patch meant "lesion". Not any more."""
    ws = small_cohort.ws
    images = _image_rows(open_catalog(ws))
    ps = P.open_patch_set(ws, small_cohort.patch_set)
    lesion = _tissue_fractions(ws, [r for r in ps.rows if r["label"] == 1], images)
    normal = _tissue_fractions(ws, [r for r in ps.rows if r["label"] == 0], images)
    touching_lesion, touching_normal = float((lesion < 1).mean()), float((normal < 1).mean())
    assert touching_lesion > 0.2, "this cohort has lesions near the skin line"
    assert touching_normal > 0.5 * touching_lesion, (touching_normal, touching_lesion)
    assert abs(float(np.median(normal)) - float(np.median(lesion))) < 0.25
    # the original rule stays available and draws only all-tissue normal patches
    old = P.build_patch_set(ws, "all_tissue", size=small_cohort.patch_size, step=small_cohort.patch_step,
                            normal="all")
    assert old["params"]["normal"] == "all"
    old_rows = P.open_patch_set(ws, "all_tissue").rows
    assert (_tissue_fractions(ws, [r for r in old_rows if r["label"] == 0], images) == 1).all()
    assert old["digest"] != small_cohort.patch_summary["digest"]


def test_normal_rules_on_a_drawn_foreground():
    fg = np.zeros((400, 400), bool)
    fg[:, :270] = True                      # breast on the left, skin line at x = 270
    avoid = [_ellipse_region(60.0, 330.0, 20.0, 20.0)]

    def rule(text, mask=fg):
        return set(P.normal_patch_positions(mask, 100, 25, avoid, P.NormalRule.parse(text)))

    centre, whole, strict = rule("centre:0.25"), rule("all"), rule("centre:0.9")
    assert whole < strict < centre
    assert max(x for x, _ in whole) == 150 and max(x for x, _ in strict) == 175
    assert max(x for x, _ in centre) == 200   # past the skin line: 70 % breast
    for x, y in centre:
        assert fg[y + 50, x + 50] and P.tissue_fraction(fg, x, y, 100) >= 0.25
        assert avoid[0].area_in(x, y, 100) == 0
    assert (0, 300) not in centre and (0, 200) in centre
    assert set(P.normal_patch_positions(fg, 100, 25, avoid)) == centre  # the default rule
    assert str(P.NormalRule.parse(None)) == P.DEFAULT_NORMAL_RULE
    speck = np.zeros((400, 400), bool)
    speck[140:160, 140:160] = True          # a centre in the breast, but 4 % of the patch
    assert rule("centre", speck) == {(100, 100)} and rule("centre:0.25", speck) == set()


@pytest.mark.parametrize("rule", ["tissue", "centre:x", "centre:1.5", "all:0.5"])
def test_bad_normal_rule_is_one_clear_error(rule):
    with pytest.raises(P.PatchError, match="normal rule"):
        P.NormalRule.parse(rule)


def test_classes_are_balanced_and_normal_patches_spread_over_images(small_cohort):
    s = small_cohort.patch_summary
    assert s["lesion_patches"] == s["normal_patches"] > 0
    assert s["problems"] == []
    ps = P.open_patch_set(small_cohort.ws, small_cohort.patch_set)
    per_image = {}
    for r in ps.rows:
        if r["label"] == 0:
            per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= s["params"]["normal_per_image"]


def test_splits_follow_patients_and_are_disjoint(small_cohort):
    db = open_catalog(small_cohort.ws)
    rows = list(db.query("SELECT p.split AS ps, i.split AS isplit, t.split AS tsplit, i.patient_id "
                         "FROM patches p JOIN images i USING (image_id) JOIN patients t USING (patient_id)"))
    assert rows
    by_patient: dict[str, set[str]] = {}
    for r in rows:
        assert r["ps"] == r["isplit"] == r["tsplit"]
        by_patient.setdefault(r["patient_id"], set()).add(r["ps"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert len({next(iter(s)) for s in by_patient.values()}) >= 2, "this small cohort spans two splits"


def test_pixels_thumbnails_and_batches(small_cohort):
    ws, size = small_cohort.ws, small_cohort.patch_size
    db = open_catalog(ws)
    images = _image_rows(db)
    ps = P.open_patch_set(ws, small_cohort.patch_set)
    assert ps.pixels.shape == (len(ps.rows), size, size) and ps.pixels.dtype == np.uint16
    assert [r["array_index"] for r in ps.rows] == list(range(len(ps.rows)))
    for r in ps.rows[:: max(1, len(ps.rows) // 5)]:
        model = load_model_pixels(ws, images[r["image_id"]])
        want = np.rint(model[r["y"]:r["y"] + size, r["x"]:r["x"] + size] * 65535).astype(np.uint16)
        assert np.array_equal(ps.pixels[r["array_index"]], want)
        thumb = Image.open(resolve_path(ws, r["thumb_path"]))
        assert thumb.size == (size, size) and thumb.mode == "L"
        assert r["thumb_path"].endswith(f"/{r['patch_id']}.png")
    batch = ps.batch([2, 0])
    assert batch.shape == (2, 1, size, size) and batch.dtype == torch.float32
    assert torch.equal(batch[1, 0], torch.from_numpy(ps.pixels[0].astype(np.float32) / 65535))
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    train = ps.indices("train")
    assert len(train) and all(ps.rows[i]["split"] == "train" for i in train)


def test_rebuild_is_deterministic_and_replaces_the_set(small_cohort):
    ws = small_cohort.ws
    again = P.build_patch_set(ws, "again", size=small_cohort.patch_size, step=small_cohort.patch_step)
    assert again["digest"] == small_cohort.patch_summary["digest"]  # same patches, same pixels
    a, b = P.open_patch_set(ws, "again"), P.open_patch_set(ws, small_cohort.patch_set)
    assert [(r["image_id"], r["x"], r["y"], r["label"]) for r in a.rows] == \
        [(r["image_id"], r["x"], r["y"], r["label"]) for r in b.rows]
    assert np.array_equal(np.asarray(a.pixels), np.asarray(b.pixels))
    twice = P.build_patch_set(ws, "again", size=small_cohort.patch_size, step=small_cohort.patch_step)
    assert twice["digest"] == again["digest"]
    db = open_catalog(ws)
    assert db.execute("SELECT COUNT(*) FROM patches WHERE patch_set = 'again'").fetchone()[0] == again["n_patches"]
    assert sorted(p.name for p in (ws.patches_dir / "again" / "thumbs").iterdir()) == \
        sorted(f"{r['patch_id']}.png" for r in P.open_patch_set(ws, "again").rows)


def _ellipse_region(cx, cy, rx, ry, angle=0.0):
    row = {"rows": 4000, "cols": 3000, "flip_horizontal": 0, "flip_vertical": 0}
    lesion = {"lesion_id": 1, "geometry_type": "ellipse", "geometry": {"cx": cx, "cy": cy, "rx": rx, "ry": ry,
                                                                       "angle": angle}}
    return P.lesion_region(None, row, lesion)


def test_inside_rules_on_a_large_and_a_small_ellipse():
    big = _ellipse_region(1500.0, 2000.0, 900.0, 600.0, 30.0)
    centre = P.lesion_patch_positions(big, 4000, 3000, 512, 256, P.InsideRule.parse("centre"))
    whole = P.lesion_patch_positions(big, 4000, 3000, 512, 256, P.InsideRule.parse("all"))
    half = P.lesion_patch_positions(big, 4000, 3000, 512, 256, P.InsideRule.parse("fraction:0.5"))
    assert len(centre) > len(half) > len(whole) >= 1
    assert set(whole) <= set(half)
    for x, y in centre:
        assert big.contains(x + 256, y + 256)
        assert (x - round(1500 - 256)) % 256 == 0 and (y - round(2000 - 256)) % 256 == 0  # the step-256 grid
    for x, y in whole:
        assert big.area_in(x, y, 512) == 512 * 512
    for x, y in half:
        assert big.area_in(x, y, 512) >= 0.5 * 512 * 512
    small = _ellipse_region(100.5, 3950.5, 40.0, 25.0)  # smaller than a patch, near a corner
    for rule in ("centre", "all", "fraction:0.9"):
        only = P.lesion_patch_positions(small, 4000, 3000, 512, 256, P.InsideRule.parse(rule))
        assert only == [(0, 4000 - 512)], "one patch, centred then kept on the image"


def test_mirrored_image_maps_lesions_to_normalised_coordinates(tmp_path):
    mask = np.zeros((600, 800), bool)
    mask[100:150, 40:90] = True
    path = tmp_path / "m.png"
    Image.fromarray(mask).save(path)
    row = {"rows": 600, "cols": 800, "flip_horizontal": 1, "flip_vertical": 0}
    region = P.lesion_region(None, row, {"lesion_id": 3, "geometry_type": "mask", "geometry": {},
                                         "mask_path": str(path)})
    assert region.box == (800 - 90, 100, 800 - 40, 150)
    box = P.lesion_region(None, row, {"lesion_id": 4, "geometry_type": "box", "geometry": [40, 100, 50, 50]})
    assert box.box == region.box and box.mask.all()


@pytest.mark.parametrize("rule", ["inside", "fraction:0", "fraction:1.5", "fraction:x"])
def test_bad_inside_rule_is_one_clear_error(rule):
    with pytest.raises(P.PatchError, match="inside rule"):
        P.InsideRule.parse(rule)


def test_cli_patches_and_errors(small_cohort, capsys, ws):
    root = str(small_cohort.ws.root)
    assert main(["patches", "--name", "cli", "--size", "128", "--step", "64", "--inside", "fraction:0.3",
                 "--json", "-w", root]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lesion_patches"] == summary["normal_patches"] > 0
    assert summary["params"]["inside"] == "fraction:0.3"
    assert main(["patches", "--inside", "somewhere", "-w", root]) == 1
    assert "error: unknown inside rule" in capsys.readouterr().err
    assert main(["patches", "--normal", "edge", "-w", root]) == 1
    assert "error: unknown normal rule" in capsys.readouterr().err
    assert main(["patches", "-w", str(ws.root)]) == 1  # an empty workspace
    assert "error: no lesion patches" in capsys.readouterr().err
    with pytest.raises(P.PatchError, match="no patch set 'nope'"):
        P.open_patch_set(small_cohort.ws, "nope")


def test_an_unreadable_image_is_left_out_and_the_rows_move_up(small_cohort, tmp_path):
    import shutil

    ws = type(small_cohort.ws).open(tmp_path / "copy")
    shutil.copytree(small_cohort.ws.root, ws.root, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("patches", "fiftyone", "labelstudio", "runs", "cache"))
    db = open_catalog(ws)
    first = P.open_patch_set(small_cohort.ws, small_cohort.patch_set).rows
    image_ids = list(dict.fromkeys(r["image_id"] for r in first))
    gone = image_ids[len(image_ids) // 2]  # an image in the middle of the array
    resolve_path(ws, db.execute("SELECT source_path FROM images WHERE image_id = ?", [gone]).fetchone()[0]).unlink()
    summary = P.build_patch_set(ws, "partial", size=small_cohort.patch_size, step=small_cohort.patch_step)
    assert any(p.startswith(f"{gone}:") for p in summary["problems"])
    ps = P.open_patch_set(ws, "partial")
    kept = [(r["image_id"], r["x"], r["y"]) for r in first if r["image_id"] != gone]
    assert [(r["image_id"], r["x"], r["y"]) for r in ps.rows] == kept
    assert [r["array_index"] for r in ps.rows] == list(range(len(kept))) and ps.pixels.shape[0] == len(kept)
    old = P.open_patch_set(small_cohort.ws, small_cohort.patch_set)
    old_index = {(r["image_id"], r["x"], r["y"]): r["array_index"] for r in old.rows}
    for r in ps.rows:
        assert np.array_equal(ps.pixels[r["array_index"]], old.pixels[old_index[(r["image_id"], r["x"], r["y"])]])
    assert sorted(p.name for p in (ws.patches_dir / "partial" / "thumbs").iterdir()) == \
        sorted(f"{r['patch_id']}.png" for r in ps.rows)
    assert summary["digest"] != small_cohort.patch_summary["digest"]

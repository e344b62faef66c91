"""Ingest: register_dicom, add_lesion, import_folder and the `mammo import` / `mammo images` commands."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.dicom import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, breast_phantom, write_dicom
from workspace.app.cli import main
from workspace.base.catalog import get_image, lesions_of, open_catalog, split_for
from workspace.base.errors import CatalogError, DicomReadError
from workspace.data.dicom_io import chest_wall_side, read_dicom, to_normalised
from workspace.data.ingest import (
    add_lesion,
    import_folder,
    load_foreground,
    load_model_pixels,
    register_dicom,
)

IDENTIFIERS = (PATIENT_ID, PATIENT_NAME, PATIENT_NAME.replace("^", " "), BIRTH_DATE, "Zwetschke", "Henrietta")


@pytest.fixture
def db(ws):
    return open_catalog(ws)


def test_register_dicom_adds_pseudonymous_rows_and_derived_files(ws, db, dicom_writer):
    path = dicom_writer("r.dcm", breast_phantom((96, 64), chest_wall="right"), laterality="R", view="MLO")
    image_id = register_dicom(ws, db, path, dataset="local")
    assert image_id.startswith("I-")
    row = get_image(db, image_id)
    assert row["patient_id"].startswith("P-") and row["dataset"] == "local"
    assert (row["rows"], row["cols"], row["laterality"], row["view"]) == (96, 64, "R", "MLO")
    assert row["flip_horizontal"] == 1 and row["split"] == split_for(row["patient_id"])
    assert row["study_id"].startswith("S-")
    patient = next(db.query("SELECT * FROM patients WHERE patient_id = ?", [row["patient_id"]]))
    assert (patient["source_patient_id"], patient["patient_name"], patient["birth_date"]) == \
        (PATIENT_ID, PATIENT_NAME, BIRTH_DATE)
    # paths are workspace-relative; the PNGs are in normalised orientation (chest wall left)
    assert row["display_path"] == f"derived/display/{image_id}.png"
    assert row["foreground_path"] == f"derived/foreground/{image_id}.png"
    display = np.asarray(Image.open(ws.root / row["display_path"]))
    assert display.shape == (96, 64) and display.dtype == np.uint8
    assert np.array_equal(display, read_dicom(path).display_pixels())
    foreground = np.asarray(Image.open(ws.root / row["foreground_path"])) > 0
    assert foreground.shape == (12, 8) and chest_wall_side(foreground) == "left"


def test_register_dicom_is_idempotent(ws, db, dicom_writer):
    path = dicom_writer("a.dcm")
    first = register_dicom(ws, db, path, dataset="local")
    copy = path.with_name("copy.dcm")
    shutil.copy(path, copy)
    assert register_dicom(ws, db, path, dataset="local") == first
    assert register_dicom(ws, db, copy, dataset="local") == first  # same content, same image
    assert db["images"].count == 1 and db["patients"].count == 1
    other = register_dicom(ws, db, path, dataset="other")  # another dataset is another image
    assert other != first and db["images"].count == 2


def test_pseudonyms_are_keyed_per_workspace_unless_a_site_key_is_set(tmp_path, dicom_writer, monkeypatch):
    from workspace.base.catalog import PSEUDONYM_KEY_ENV
    from workspace.base.config import Workspace

    path = dicom_writer("k.dcm")

    def image_id(name: str) -> str:
        ws = Workspace.open(tmp_path / name)
        return register_dicom(ws, open_catalog(ws), path, dataset="local")

    monkeypatch.delenv(PSEUDONYM_KEY_ENV, raising=False)
    assert image_id("random-a") != image_id("random-b")  # a random key each: ids cannot be matched up
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "site-key-of-the-breast-unit")
    first = image_id("site-a")
    assert image_id("site-b") == first  # one site key: the same ids in both workspaces
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "another-site-key-entirely")
    assert image_id("site-a") == first  # a workspace keeps the key its ids were made with
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, "short")
    with pytest.raises(CatalogError, match="at least 16 characters"):   # one clear error, not a traceback
        image_id("too-short")
    assert not (tmp_path / "too-short" / ".pseudonym-key").exists()


def test_register_dicom_labels_split_and_extra(ws, db, dicom_writer):
    path = dicom_writer("b.dcm", laterality=None, view=None)
    image_id = register_dicom(ws, db, path, dataset="synthetic", patient_source_id="synth-7", split="test",
                              birads=0, density="C", extra={"laterality": "L", "view": "CC",
                                                            "annotated_path": str(ws.annotated_dir / "x.png")})
    row = get_image(db, image_id)
    assert (row["split"], row["birads"], row["label"], row["density"]) == ("test", "0", 1, "C")
    assert (row["laterality"], row["view"], row["annotated_path"]) == ("L", "CC", "derived/annotated/x.png")
    patient = next(db.query("SELECT * FROM patients WHERE patient_id = ?", [row["patient_id"]]))
    assert patient["source_patient_id"] == "synth-7" and patient["split"] == "test"
    benign = register_dicom(ws, db, dicom_writer("c.dcm", breast_phantom(seed=5)), dataset="synthetic",
                            birads="2")
    assert get_image(db, benign)["label"] == 0
    # one BI-RADS rule everywhere (the importers' too): 3 to 6 carry a finding, so label 1
    suspicious = register_dicom(ws, db, dicom_writer("s.dcm", breast_phantom(seed=7)), dataset="synthetic",
                                birads="4A")
    assert (get_image(db, suspicious)["birads"], get_image(db, suspicious)["label"]) == ("4A", 1)
    with pytest.raises(CatalogError, match="not settable"):
        register_dicom(ws, db, dicom_writer("d.dcm", breast_phantom(seed=6)), dataset="synthetic",
                       extra={"colour": "red"})
    with pytest.raises(DicomReadError):
        register_dicom(ws, db, ws.root / "catalog.sqlite", dataset="synthetic")
    # a path that is not a readable file is the same one-line error, not an OSError
    for missing in (ws.root / "gone.dcm", ws.root):
        with pytest.raises(DicomReadError, match="cannot read file"):
            register_dicom(ws, db, missing, dataset="synthetic")


def test_a_patient_keeps_one_split(ws, db, dicom_writer):
    """No patient in two splits: a later image asked into another split keeps the patient's, with a warning."""
    first = register_dicom(ws, db, dicom_writer("1.dcm", breast_phantom(seed=1)), dataset="d",
                           patient_source_id="pat-9", split="train")
    second = register_dicom(ws, db, dicom_writer("2.dcm", breast_phantom(seed=2)), dataset="d",
                            patient_source_id="pat-9", split="test")
    assert get_image(db, first)["split"] == get_image(db, second)["split"] == "train"
    assert "asked for 'test'" in json.loads(get_image(db, second)["warnings"])[0]
    assert get_image(db, first)["warnings"] is None


def test_model_pixels_and_foreground_load_back(ws, db, dicom_writer):
    breast = breast_phantom((96, 64), chest_wall="right")
    path = dicom_writer("m.dcm", 4095 - breast, laterality="R", photometric="MONOCHROME1")
    row = get_image(db, register_dicom(ws, db, path, dataset="local"))
    pixels = load_model_pixels(ws, row)
    assert pixels.dtype == np.float32 and pixels.shape == (96, 64)
    assert np.allclose(pixels, breast[:, ::-1] / 4095, atol=1e-6)  # mirrored, MONOCHROME1 inverted
    full = load_foreground(ws, row)
    assert full.shape == (96, 64) and full.dtype == bool
    assert full[48, 2] and not full[2, 62]


def test_add_lesion_is_idempotent_and_validated(ws, db, dicom_writer):
    image_id = register_dicom(ws, db, dicom_writer("l.dcm"), dataset="local")
    box = dict(kind="mass", geometry_type="box", geometry=[10, 12, 20, 18], pathology="malignant",
               source="ground_truth")
    first = add_lesion(db, image_id, **box)
    assert add_lesion(db, image_id, **box) == first
    assert add_lesion(db, image_id, **dict(box, source="annotated_copy")) != first
    ellipse = {"cx": 30.0, "cy": 40.0, "rx": 9.0, "ry": 5.0, "angle": 20.0}
    add_lesion(db, image_id, kind="calcification", geometry_type="ellipse", geometry=ellipse,
               pathology=None, source="annotated_copy", attributes={"count": 7})
    mask_file = ws.masks_dir / f"{image_id}_0.png"
    mask_id = add_lesion(db, image_id, kind="mass", geometry_type="mask", geometry={"bbox": [1, 2, 3, 4]},
                         pathology="benign", source="ground_truth", mask_path=mask_file)
    lesions = lesions_of(db, image_id)
    assert len(lesions) == 4 and lesions[0]["geometry"] == [10, 12, 20, 18]
    assert next(r for r in lesions if r["lesion_id"] == mask_id)["mask_path"] == f"derived/masks/{mask_file.name}"
    assert json.loads(lesions[2]["attributes"]) == {"count": 7}
    for bad, message in [(dict(box, geometry=[1, 2, 0, 5]), "w, h > 0"),
                         (dict(box, kind="tumour"), "unknown lesion kind"),
                         (dict(box, geometry_type="blob"), "unknown geometry type"),
                         (dict(box, geometry_type="polygon", geometry=[[0, 0], [1, 1]]), "at least 3"),
                         (dict(box, geometry_type="mask", geometry={}), "mask_path"),
                         (dict(box, pathology="bad"), "unknown pathology")]:
        with pytest.raises(CatalogError, match=message):
            add_lesion(db, image_id, **bad)
    with pytest.raises(CatalogError, match="no image"):
        add_lesion(db, "I-nope", **box)


def test_import_folder_imports_skips_with_reasons_and_is_idempotent(ws, mixed_dicom_folder):
    summary = import_folder(ws, mixed_dicom_folder)
    assert len(summary.imported) == 6 and not summary.already_present
    reasons = dict(summary.skipped)
    assert set(reasons) == {"small/tiny.dcm", "bad/truncated.dcm", "bad/report.pdf", "bad/sr.dcm",
                            "bad/mpeg.dcm"}
    assert "too small (100 x 80)" in reasons["small/tiny.dcm"]
    assert "truncated" in reasons["bad/truncated.dcm"]
    assert "not a DICOM file" in reasons["bad/report.pdf"]
    assert "no pixel data" in reasons["bad/sr.dcm"]
    assert "MPEG2" in reasons["bad/mpeg.dcm"] and "decoder" in reasons["bad/mpeg.dcm"]
    assert ("other/ct_slice.dcm", "modality is CT, not MG") in summary.warnings
    text = summary.to_text()
    assert "6 imported, 0 already present, 5 skipped" in text and "1 too small" in text
    db = open_catalog(ws)
    rows = {r["source_path"].split("/")[-1]: r for r in db.query("SELECT * FROM images")}
    assert rows["j2k_R_MLO.dcm"]["flip_horizontal"] == 1 and rows["plain_L_CC.dcm"]["flip_horizontal"] == 0
    assert rows["jpegll_L_MLO.dcm"]["transfer_syntax"] == "1.2.840.10008.1.2.4.70"
    assert rows["mono1_L_CC.dcm"]["photometric"] == "MONOCHROME1"
    assert "not MG" in rows["ct_slice.dcm"]["warnings"]
    for row in rows.values():  # every display PNG has the chest wall on the left
        assert chest_wall_side(np.asarray(Image.open(ws.root / row["foreground_path"])) > 0) == "left"
    again = import_folder(ws, mixed_dicom_folder)
    assert (len(again.imported), len(again.already_present), len(again.skipped)) == (0, 6, 5)
    assert db["images"].count == 6
    refused = import_folder(ws, mixed_dicom_folder, dataset="strict", non_mg="refuse")
    assert len(refused.imported) == 5
    assert "not MG" in dict(refused.skipped)["other/ct_slice.dcm"]


def test_patient_identifiers_stay_in_the_patients_table(ws, mixed_dicom_folder):
    import_folder(ws, mixed_dicom_folder)
    db = open_catalog(ws)
    image_id = next(db.query("SELECT image_id FROM images"))["image_id"]
    add_lesion(db, image_id, kind="mass", geometry_type="box", geometry=[1, 2, 3, 4], pathology="benign",
               source="ground_truth")
    assert db["patients"].count == 1
    assert {PATIENT_ID, PATIENT_NAME} <= set(next(db.query("SELECT * FROM patients")).values())
    for table in db.table_names():
        if table == "patients":
            continue
        dump = json.dumps(list(db.query(f"SELECT * FROM [{table}]")), default=str)
        assert not [s for s in IDENTIFIERS if s in dump], table
    for folder, _dirs, names in os.walk(ws.root):
        for name in names:
            assert not [s for s in IDENTIFIERS if s in name]
            if name.endswith(".png"):
                path = os.path.join(folder, name)
                data = open(path, "rb").read()
                assert not [s for s in IDENTIFIERS if s.encode() in data]
                assert not Image.open(path).info  # no text chunks at all


def test_regions_map_back_to_original_coordinates(ws, db, dicom_writer):
    right = breast_phantom((96, 64), chest_wall="right")
    row = get_image(db, register_dicom(ws, db, dicom_writer("x.dcm", right, laterality="R"), dataset="local"))
    box = [40, 30, 10, 8]  # original coordinates: inside the breast near the right edge
    nx, ny, nw, nh = to_normalised("box", box, row)
    assert (nx, ny, nw, nh) == (64 - 40 - 10, 30, 10, 8)
    pixels = load_model_pixels(ws, row)
    assert np.allclose(pixels[ny:ny + nh, nx:nx + nw], right[30:38, 40:50][:, ::-1] / 4095, atol=1e-6)


def test_real_third_party_file_is_imported(ws, tmp_path):
    """pydicom-data's RG3_J2KR.dcm (a real CR file: JPEG 2000 lossless, MONOCHROME1, 1760 x 1760) through
    the whole import: registered with a "not MG" warning, display PNG equal to the reader's view."""
    import data_store  # the pydicom-data package (dev dependency): files on disk, nothing downloaded

    source = Path(data_store.__file__).parent / "data" / "RG3_J2KR.dcm"
    summary = import_folder(ws, source)
    assert len(summary.imported) == 1 and not summary.skipped
    assert summary.warnings == [("RG3_J2KR.dcm", "modality is CR, not MG")]
    row = get_image(open_catalog(ws), summary.imported[0])
    assert (row["rows"], row["cols"], row["photometric"], row["bits_stored"]) == (1760, 1760, "MONOCHROME1", 10)
    assert row["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    display = np.asarray(Image.open(ws.root / row["display_path"]))
    assert np.array_equal(display, read_dicom(source).display_pixels())


def test_cli_import_and_images(tmp_path, mixed_dicom_folder, capsys):
    workspace = tmp_path / "cli-ws"
    assert main(["import", str(mixed_dicom_folder), "--workspace", str(workspace), "--dataset", "site-a"]) == 0
    out = capsys.readouterr().out
    assert "6 imported" in out and "bad/report.pdf: not a DICOM file" in out
    assert main(["images", "--workspace", str(workspace)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["image_id", "dataset", "laterality", "view", "size", "split", "label"]
    assert len([line for line in listing if line.startswith("I-")]) == 6
    assert all("site-a" in line and "512x520" in line for line in listing if line.startswith("I-"))
    assert listing[-1] == "6 image(s)"
    assert main(["import", str(tmp_path / "nowhere"), "--workspace", str(workspace)]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    bad_only = tmp_path / "bad-only"
    write_dicom(bad_only / "tiny.dcm", breast_phantom((64, 48)))
    assert main(["import", str(bad_only), "--workspace", str(workspace)]) == 1  # nothing usable


def test_json_default_writes_numpy_values_and_refuses_or_stringifies_the_rest():
    from workspace.base.catalog import json_default

    value = {"n": np.int64(3), "x": np.float32(0.5), "ok": np.bool_(True), "a": np.arange(3, dtype=np.uint8)}
    assert json.loads(json.dumps(value, default=json_default)) == {"n": 3, "x": 0.5, "ok": True, "a": [0, 1, 2]}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        json.dumps({"o": object()}, default=json_default)
    assert json.loads(json.dumps({"p": Path("a/b")}, default=lambda v: json_default(v, lenient=True))) == {"p": "a/b"}

"""mini-MIAS: PGM films land in the catalog (as DICOM made inside the workspace, 0.2 mm pixels,
laterality from the reference number), abnormality circles round-trip from the bottom-left origin;
rows without coordinates and circles leaving the image are reported."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.importers import (
    assert_all_imported,
    catalog_lesions,
    catalog_patient,
    counts,
    write_pgm,
)
from workspace.base.catalog import open_catalog
from workspace.data.dicom_io import read_dicom
from workspace.data.importers import mias
from workspace.data.importers.common import ImporterError
from workspace.data.ingest import load_model_pixels, resolve_path


def _row_of(db, ws, ref):
    # the converted DICOM is named mdbNNN_<digest of the PGM>.dcm
    rows = [dict(r) for r in db.query("SELECT * FROM images")
            if resolve_path(ws, r["source_path"]).stem.split("_")[0] == ref]
    assert len(rows) == 1
    return rows[0]


def test_round_trip(ws, mias_folder):
    root, truth = mias_folder
    report = mias.import_dataset(ws, root)
    db = open_catalog(ws)
    assert_all_imported(db, report, truth)
    assert counts(db)[2] == len(truth["images"]) // 2  # one patient per film pair
    for expected in truth["images"]:
        row = _row_of(db, ws, expected["ref"])
        patient = catalog_patient(db, row["patient_id"])
        assert row["dataset"] == "mini-mias" and patient["source_patient_id"] == expected["patient"]
        assert (row["laterality"], row["view"], row["label"], row["rows"], row["cols"]) == \
            (expected["laterality"], "MLO", expected["label"], 1024, 1024)
        assert (row["pixel_spacing_row"], row["pixel_spacing_col"], row["bits_stored"]) == (0.2, 0.2, 8)
        assert row["birads"] is None and row["density"] is None
        assert row["split"] in ("train", "val", "test") and row["split"] == patient["split"]  # by film pair
        # the converted file holds the PGM's pixels exactly, and the model reads it like any image
        source = resolve_path(ws, row["source_path"])
        assert source.is_relative_to(ws.dicom_dir)
        assert np.array_equal(read_dicom(source, orientation=(False, False)).stored_pixels, expected["pixels"])
        model = load_model_pixels(ws, row)
        assert model.shape == (1024, 1024) and 0.0 <= model.min() and model.max() <= 1.0
        got = sorted(((le["kind"], le["pathology"], le["geometry_type"], le["geometry"])
                      for le in catalog_lesions(db, row["image_id"])), key=str)
        want = sorted(((le["kind"], le["pathology"], le["geometry_type"], le["geometry"])
                       for le in expected["lesions"]), key=str)
        assert got == want
    assert report.skip_counts() == {"lesion without coordinates": 2, "lesion outside its image": 1}
    assert report.bounds_counts() == {"partly_outside": 1, "outside": 1}
    assert f"{truth['outside']}: abnormality" in report.to_text()


def test_circle_centre_comes_from_the_bottom_left_origin(ws, tmp_path):
    root = tmp_path / "mias"
    pixels = np.zeros((1024, 1024), np.uint8)
    pixels[:, :600] = 120
    write_pgm(root / "mdb010.pgm", pixels)
    (root / "Info.txt").write_text("mdb010 F SPIC M 100 900 30\n")
    mias.import_dataset(ws, root)
    db = open_catalog(ws)
    (lesion,) = catalog_lesions(db, _row_of(db, ws, "mdb010")["image_id"])
    # published y = 900 from the bottom is row 124 from the top
    assert lesion["geometry"] == {"cx": 100, "cy": 124, "r": 30} and lesion["kind"] == "mass"
    assert lesion["attributes"]["description"] == "spiculated mass"
    # a row the catalog cannot store (radius 0) is skipped with its reason; the other rows still land
    (root / "Info.txt").write_text("mdb010 F SPIC M 100 900 30\nmdb010 F CIRC B 300 500 0\n"
                                   "mdb010 F CIRC B 300 500 12\n")
    report = mias.import_dataset(ws, root)
    assert report.skip_counts() == {"invalid lesion": 1} and "r > 0" in report.to_text()
    assert (report.lesions_new, report.lesions_existing) == (1, 1)


def test_changed_film_is_added_and_the_stored_one_kept(ws, mias_folder):
    """Re-importing after a PGM changed (a corrected copy) must not overwrite the DICOM an image already
    in the catalog is read from: the old image still reads its own pixels, the new one is added."""
    root, truth = mias_folder
    mias.import_dataset(ws, root)
    db = open_catalog(ws)
    first = truth["images"][0]
    old_row = _row_of(db, ws, first["ref"])
    changed = first["pixels"].copy()
    changed[:100] = 0
    write_pgm(root / f"{first['ref']}.pgm", changed)
    again = mias.import_dataset(ws, root)
    assert (again.images_new, again.images_existing) == (1, len(truth["images"]) - 1)
    rows = [dict(r) for r in db.query("SELECT * FROM images")
            if resolve_path(ws, r["source_path"]).stem.split("_")[0] == first["ref"]]
    assert len(rows) == 2 and old_row in rows
    new_row = next(r for r in rows if r["image_id"] != old_row["image_id"])
    assert np.array_equal(read_dicom(resolve_path(ws, old_row["source_path"]), orientation=(False, False))
                          .stored_pixels, first["pixels"])
    assert np.array_equal(read_dicom(resolve_path(ws, new_row["source_path"]), orientation=(False, False))
                          .stored_pixels, changed)
    assert load_model_pixels(ws, old_row).shape == (1024, 1024)  # still readable: its file is untouched


def test_missing_info_bad_pgm_and_unlisted_files(ws, mias_folder):
    root, truth = mias_folder
    info = (root / "Info.txt").read_text()
    (root / "Info.txt").unlink()
    with pytest.raises(ImporterError, match="no Info.txt in"):
        mias.import_dataset(ws, root)
    (root / "Info.txt").write_text("this is not the MIAS table\n")
    with pytest.raises(ImporterError, match="holds no rows like 'mdb001"):
        mias.import_dataset(ws, root)
    (root / "Info.txt").write_text(info + "mdb777 G CIRC B 1 2 3\n")
    first = truth["images"][0]["ref"]
    data = (root / f"{first}.pgm").read_bytes()
    (root / f"{first}.pgm").write_bytes(data[: len(data) // 2])
    write_pgm(root / "mdb900.pgm", np.zeros((8, 8), np.uint8))
    report = mias.import_dataset(ws, root)
    reasons = report.skip_counts()
    assert reasons["unreadable image"] == 1 and reasons["image file missing"] == 1
    assert reasons["image not in Info.txt"] == 1
    assert report.images_new == len(truth["images"]) - 1
    assert "truncated PGM" in report.to_text()

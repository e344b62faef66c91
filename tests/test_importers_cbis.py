"""CBIS-DDSM: every image, field and ROI mask round-trips from each of the three download layouts;
mismatched masks are rescaled or skipped by option; broken downloads give clear messages."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.fixtures.importers import (
    CBIS_LAYOUTS,
    assert_all_imported,
    build_cbis,
    catalog_image,
    catalog_lesions,
    catalog_patient,
    lesion_total,
)
from workspace.base.catalog import open_catalog
from workspace.data.importers import cbis_ddsm
from workspace.data.importers.common import ImporterError
from workspace.data.ingest import resolve_path


def _check_round_trip(ws, truth, report):
    db = open_catalog(ws)
    assert_all_imported(db, report, truth)
    for expected in truth["images"]:
        row = catalog_image(ws, db, expected["file"])
        patient = catalog_patient(db, row["patient_id"])
        assert row["dataset"] == "cbis-ddsm"
        assert patient["source_patient_id"] == expected["patient"]
        assert row["patient_id"].startswith("P-") and expected["patient"] not in row["patient_id"]
        assert (row["laterality"], row["view"], row["density"]) == \
            (expected["laterality"], expected["view"], expected["density"])
        assert (row["birads"], row["label"]) == (expected["birads"], expected["label"])
        assert row["split"] == "test" if expected["test"] else row["split"] in ("train", "val")
        assert patient["split"] == row["split"]
        lesions = catalog_lesions(db, row["image_id"])
        assert len(lesions) == len(expected["lesions"])
        by_id = {le["attributes"]["abnormality_id"]: le for le in lesions}
        for want in expected["lesions"]:
            got = by_id[want["abnormality_id"]]
            assert (got["kind"], got["pathology"], got["geometry_type"], got["source"]) == \
                (want["kind"], want["pathology"], "mask", "cbis-ddsm")
            stored = np.asarray(Image.open(resolve_path(ws, got["mask_path"]))) > 127
            assert stored.shape == (row["rows"], row["cols"])
            if want["mismatch"]:
                inter = (stored & want["mask"]).sum()
                assert inter / (stored | want["mask"]).sum() > 0.8
                assert got["attributes"]["mask_rescaled_from"] == [row["rows"] + 3, row["cols"] - 2]
            else:
                assert np.array_equal(stored, want["mask"])
                assert got["geometry"]["bbox"] == want["bbox"] and got["geometry"]["area"] == want["area"]
            assert got["mask_path"].startswith("derived/masks/") and row["image_id"] in got["mask_path"]
    # derived files are named by pseudonyms only (the CBIS patient ids are in the case folder names)
    derived = [p.name for p in (ws.root / "derived").rglob("*") if p.is_file()]
    assert derived and not [n for n in derived if any(im["patient"] in n for im in truth["images"])]


@pytest.mark.parametrize("layout", CBIS_LAYOUTS)
def test_every_layout_round_trips(ws, tmp_path, layout):
    root = tmp_path / "cbis"
    truth = build_cbis(root, layout=layout)
    assert len(truth["images"]) >= 4 and any(im["test"] for im in truth["images"])
    report = cbis_ddsm.import_dataset(ws, root)
    assert not report.skipped and not report.adjusted, report.to_text()
    _check_round_trip(ws, truth, report)
    # the same patient in two images keeps one pseudonym and one split
    db = open_catalog(ws)
    splits = db.execute("SELECT patient_id, count(DISTINCT split) FROM images GROUP BY patient_id").fetchall()
    assert all(n == 1 for _, n in splits)


def test_mask_of_wrong_size_rescaled_or_skipped(ws, tmp_path):
    root = tmp_path / "cbis"
    truth = build_cbis(root, layout="nbia-descriptive", mismatch=True)
    report = cbis_ddsm.import_dataset(ws, root, mask_mismatch="rescale")
    assert [how for _, how, _ in report.adjusted] == ["mask size mismatch, rescaled to the image"]
    assert "mask 643 x 510, image 640 x 512" in report.to_text()
    _check_round_trip(ws, truth, report)

    from workspace.base.config import Workspace

    other = Workspace.open(tmp_path / "ws-skip")
    skipped = cbis_ddsm.import_dataset(other, root, mask_mismatch="skip")
    assert skipped.skip_counts() == {"mask size mismatch": 1}
    assert truth["mismatch"] in skipped.skipped[0][0]
    n_lesions = lesion_total(truth)
    assert skipped.lesions_new == n_lesions - 1
    with pytest.raises(ImporterError, match="mask_mismatch must be one of rescale, skip"):
        cbis_ddsm.import_dataset(other, root, mask_mismatch="stretch")


def test_missing_csv_is_a_clear_error(ws, cbis_folder):
    root, truth = cbis_folder
    for name in truth["csvs"]:
        (root / name).unlink()
    with pytest.raises(ImporterError, match="no case description CSV in .*mass_case_description_train_set.csv"):
        cbis_ddsm.import_dataset(ws, root)


def test_csv_with_wrong_columns_is_named(ws, cbis_folder):
    root, truth = cbis_folder
    path = root / truth["csvs"][0]
    rows = list(csv.reader(open(path, newline="")))
    drop = rows[0].index("ROI mask file path")
    with open(path, "w", newline="") as stream:
        csv.writer(stream).writerows([r[:drop] + r[drop + 1:] for r in rows])
    with pytest.raises(ImporterError, match=rf"{path.name} lacks the column\(s\) 'roi mask file path'"):
        cbis_ddsm.import_dataset(ws, root)


def test_missing_files_are_skipped_and_the_rest_imported(ws, cbis_folder):
    root, truth = cbis_folder
    first, second = truth["images"][0], truth["images"][1]
    shutil.rmtree(root / "CBIS-DDSM" / first["case"])               # a full mammogram gone
    shutil.rmtree(root / "CBIS-DDSM" / f"{second['case']}_1")       # one abnormality's ROI folder gone
    stray = root / "CBIS-DDSM" / "notes" / "x.dcm"                   # a file outside any case folder
    stray.parent.mkdir()
    ds = pydicom.dcmread(second["file"])
    ds.PatientID = "someone else"
    ds.save_as(stray)
    report = cbis_ddsm.import_dataset(ws, root)
    reasons = report.skip_counts()
    assert reasons["image file missing"] == len(first["lesions"])
    assert reasons["ROI mask missing"] == 1
    assert reasons["not in a CBIS-DDSM case folder"] == 1
    assert report.images_new == len(truth["images"]) - 1
    assert report.lesions_new == sum(len(im["lesions"]) for im in truth["images"][1:]) - 1
    text = report.to_text()
    assert f"{first['case']} abnormality 1" in text and "no full mammogram DICOM" in text


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_unreadable_mask_or_crop_and_a_bad_csv_row_do_not_stop_the_import(ws, tmp_path):
    root = tmp_path / "cbis"
    truth = build_cbis(root, layout="nbia-descriptive")
    first, second = truth["images"][0], truth["images"][1]
    case_dir = root / "CBIS-DDSM"
    _truncate(next((case_dir / f"{first['case']}_1").rglob("*ROI mask images*/1-1.dcm")))   # its mask: cut
    _truncate(next((case_dir / f"{second['case']}_1").rglob("*cropped images*/1-1.dcm")))   # only its crop: cut
    csv_path = root / truth["csvs"][0]
    rows = list(csv.reader(open(csv_path, newline="")))
    rows.append(list(rows[1]))
    rows[-1][rows[0].index("pathology")] = "MAYBE"                                         # one bad row
    with open(csv_path, "w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    report = cbis_ddsm.import_dataset(ws, root)
    assert report.skip_counts() == {"unreadable ROI mask": 1, "unreadable CSV row": 1}, report.to_text()
    assert (f"{first['case']} abnormality 1", "unreadable ROI mask") in [(w, r) for w, r, _ in report.skipped]
    assert "pixels cannot be read" in report.to_text() and "pathology 'MAYBE'" in report.to_text()
    n_lesions = lesion_total(truth)
    assert (report.images_new, report.lesions_new) == (len(truth["images"]), n_lesions - 1)


def test_reimport_with_a_changed_mask_keeps_the_stored_lesion(ws, cbis_folder):
    """A corrected mask on re-import adds a lesion; the mask file of the lesion already stored is kept."""
    root, truth = cbis_folder
    cbis_ddsm.import_dataset(ws, root)
    db = open_catalog(ws)
    image = truth["images"][0]
    row = catalog_image(ws, db, image["file"])
    (old,) = [le for le in catalog_lesions(db, row["image_id"]) if le["attributes"]["abnormality_id"] == 1]
    old_mask = np.asarray(Image.open(resolve_path(ws, old["mask_path"]))) > 127
    mask_file = next(f for f in (root / "CBIS-DDSM" / f"{image['case']}_1").rglob("*.dcm")
                     if cbis_ddsm.is_binary(pydicom.dcmread(f).pixel_array))
    ds = pydicom.dcmread(mask_file)
    pixels = ds.pixel_array.copy()
    ys, xs = np.nonzero(pixels)
    pixels[ys[: len(ys) // 2], xs[: len(xs) // 2]] = 0                                    # a smaller lesion
    ds.PixelData = pixels.tobytes()
    ds.save_as(mask_file)
    again = cbis_ddsm.import_dataset(ws, root)
    assert (again.images_new, again.lesions_new) == (0, 1)
    lesions = [le for le in catalog_lesions(db, row["image_id"]) if le["attributes"]["abnormality_id"] == 1]
    assert len(lesions) == 2 and lesions[0]["mask_path"] != lesions[1]["mask_path"]
    assert np.array_equal(np.asarray(Image.open(resolve_path(ws, old["mask_path"]))) > 127, old_mask)
    assert np.array_equal(old_mask, image["lesions"][0]["mask"])

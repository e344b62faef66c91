"""INbreast: images (fields from the file name and the semicolon CSV) and ROI contours round-trip;
single calcifications become points; broken releases give clear messages."""

from __future__ import annotations

import pytest

from tests.fixtures.importers import (
    assert_all_imported,
    catalog_image,
    catalog_lesions,
    catalog_patient,
    counts,
    lesion_total,
)
from workspace.base.catalog import open_catalog
from workspace.data.importers import inbreast
from workspace.data.importers.common import ImporterError


def test_round_trip(ws, inbreast_folder):
    root, truth = inbreast_folder
    report = inbreast.import_dataset(ws, root)
    assert not report.skipped, report.to_text()
    db = open_catalog(ws)
    assert_all_imported(db, report, truth)
    assert counts(db)[2] == len({im["patient"] for im in truth["images"]})  # one patient per hash
    points = 0
    for expected in truth["images"]:
        row = catalog_image(ws, db, expected["file"])
        patient = catalog_patient(db, row["patient_id"])
        assert row["dataset"] == "inbreast" and patient["source_patient_id"] == expected["patient"]
        assert (row["laterality"], row["view"], row["birads"], row["label"], row["density"]) == \
            (expected["laterality"], expected["view"], expected["birads"], expected["label"], expected["density"])
        assert row["split"] in ("train", "val", "test") and row["split"] == patient["split"]
        got = sorted(((le["kind"], le["pathology"], le["geometry_type"], le["geometry"], le["attributes"]["roi_name"])
                      for le in catalog_lesions(db, row["image_id"])), key=str)
        want = sorted(((le["kind"], le["pathology"], le["geometry_type"], le["geometry"], le["roi_name"])
                       for le in expected["lesions"]), key=str)
        assert got == want
        points += sum(le["geometry_type"] == "point" for le in expected["lesions"])
    assert points >= 2  # one- and two-point ROIs were stored as single calcifications


def test_missing_csv_and_comma_separated_csv(ws, inbreast_folder):
    root, _truth = inbreast_folder
    text = (root / "INbreast.csv").read_text()
    (root / "INbreast.csv").unlink()
    with pytest.raises(ImporterError, match="no INbreast.csv in .*semicolon-separated"):
        inbreast.import_dataset(ws, root)
    (root / "INbreast.csv").write_text(text.replace(";", ","))
    with pytest.raises(ImporterError, match=r"INbreast CSV .* lacks the column\(s\) 'laterality'.*semicolon-separated"):
        inbreast.import_dataset(ws, root)
    (root / "AllDICOMs").rename(root / "images")
    with pytest.raises(ImporterError, match="no AllDICOMs folder"):
        inbreast.import_dataset(ws, root)


def test_broken_roi_file_and_strays_are_reported(ws, inbreast_folder):
    root, truth = inbreast_folder
    with_rois = [im for im in truth["images"] if im["lesions"]]
    broken = with_rois[0]
    (root / "AllXML" / f"{broken['file_id']}.xml").write_text("<?xml version='1.0'?><plist><dict><key>Images")
    (root / "AllXML" / "99999999.xml").write_bytes((root / "AllXML" / f"{with_rois[1]['file_id']}.xml").read_bytes())
    (root / "AllDICOMs" / "notes.dcm").write_bytes(b"not an INbreast file name")
    report = inbreast.import_dataset(ws, root)
    assert report.skip_counts() == {"unreadable ROI file": 1, "ROI file without image": 1,
                                    "unexpected file name": 1}
    assert report.images_new == len(truth["images"])
    n_lesions = lesion_total(truth)
    assert report.lesions_new == n_lesions - len(broken["lesions"])
    assert f"{broken['file_id']}.xml: not an OsiriX ROI plist" in report.to_text()

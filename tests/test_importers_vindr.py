"""VinDr-Mammo: images, labels, splits and finding boxes round-trip; boxes leaving the image are clipped
or dropped and reported; broken releases give clear messages."""

from __future__ import annotations

import pytest

from tests.fixtures.importers import (
    assert_all_imported,
    catalog_image,
    catalog_lesions,
    catalog_patient,
)
from workspace.base.catalog import open_catalog
from workspace.data.importers import vindr
from workspace.data.importers.common import ImporterError


def test_round_trip(ws, vindr_folder):
    root, truth = vindr_folder
    report = vindr.import_dataset(ws, root.parent.parent)  # found one level down, as unpacked
    db = open_catalog(ws)
    assert_all_imported(db, report, truth)
    for expected in truth["images"]:
        row = catalog_image(ws, db, expected["file"])
        patient = catalog_patient(db, row["patient_id"])
        assert row["dataset"] == "vindr-mammo" and patient["source_patient_id"] == expected["patient"]
        assert expected["patient"] not in row["patient_id"]
        assert (row["laterality"], row["view"], row["birads"], row["label"], row["density"]) == \
            (expected["laterality"], expected["view"], expected["birads"], expected["label"], expected["density"])
        assert row["split"] == "test" if expected["test"] else row["split"] in ("train", "val")
        got = sorted(((le["kind"], le["pathology"], le["geometry_type"], le["geometry"], le["attributes"]["categories"],
                       le["attributes"]["finding_birads"]) for le in catalog_lesions(db, row["image_id"])), key=str)
        want = sorted(((le["kind"], le["pathology"], le["geometry_type"], pytest.approx(le["geometry"], abs=1e-3),
                        le["categories"], le["finding_birads"]) for le in expected["lesions"]), key=str)
        assert got == want
    # two categories on one box: one lesion, the first kind by priority, both categories kept
    both = [le for im in truth["images"] for le in im["lesions"] if len(le["categories"]) == 2]
    assert both and all(le["kind"] == "mass" for le in both)


def test_out_of_bounds_boxes_are_clipped_or_dropped_and_reported(ws, vindr_folder):
    root, truth = vindr_folder
    report = vindr.import_dataset(ws, root)
    assert report.bounds_counts() == {"clipped": 1, "outside": 1}
    assert report.skip_counts() == {"lesion outside its image": 1}
    (clipped_image,) = [im for im in truth["images"] if im["clipped"]]
    text = report.to_text()
    assert "(Focal Asymmetry) (clipped)" in text and "(Skin Thickening) (outside)" in text
    db = open_catalog(ws)
    row = catalog_image(ws, db, clipped_image["file"])
    (clipped,) = [le for le in catalog_lesions(db, row["image_id"]) if le["kind"] == "asymmetry"]
    x, y, w, h = clipped["geometry"]
    assert x + w == row["cols"] and clipped["attributes"]["clipped_from"][2] == 70


def test_missing_or_wrong_csvs(ws, vindr_folder):
    root, truth = vindr_folder
    (root / "finding_annotations.csv").rename(root / "findings.bak")
    report = vindr.import_dataset(ws, root)
    assert report.images_new == len(truth["images"]) and report.lesions_new == 0
    assert any("no finding_annotations.csv" in w for w in report.warnings)
    (root / "breast-level_annotations.csv").unlink()
    (root / "findings.bak").rename(root / "finding_annotations.csv")
    with pytest.raises(ImporterError, match="no breast-level_annotations.csv"):
        vindr.import_dataset(ws, root)
    (root / "breast-level_annotations.csv").write_text("study_id,image_id,laterality\nabc,def,L\n")
    with pytest.raises(ImporterError, match=r"breast-level CSV .* lacks the column\(s\) 'view_position', 'height'"):
        vindr.import_dataset(ws, root)


def test_missing_image_is_skipped_and_the_rest_imported(ws, vindr_folder):
    root, truth = vindr_folder
    gone = truth["images"][0]["file"]
    gone.unlink()
    (root / "images" / "junk.dicom").parent.mkdir(exist_ok=True)
    report = vindr.import_dataset(ws, root)
    assert report.skip_counts()["image file missing"] == 1
    assert report.images_new == len(truth["images"]) - 1
    assert gone.stem in report.to_text()

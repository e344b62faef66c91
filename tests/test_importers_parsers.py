"""The format parsers and shared rules of the data-set importers, on small hand-written inputs."""

from __future__ import annotations

import numpy as np
import pytest

from workspace.data.importers import cbis_ddsm, inbreast, mias, vindr
from workspace.data.importers.common import (
    CLIPPED,
    INSIDE,
    OUTSIDE,
    PARTLY_OUTSIDE,
    ImporterError,
    ImportReport,
    density_letter,
    fit_to_image,
    label_from_birads,
    label_from_pathology,
    mask_geometry,
    normalise_birads,
    read_table,
)

# -- labels, densities ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("BI-RADS 4", "4"), ("bi-rads 1", "1"), ("4a", "4A"), ("4C", "4C"), (5, "5"), ("3.0", "3"), ("", None),
    (None, None), ("removed", None), ("7", None),
])
def test_normalise_birads(text, expected):
    assert normalise_birads(text) == expected


def test_label_rules():
    assert [label_from_birads(b) for b in ("0", "1", "2", "3", "4A", "5", "6", None)] == [1, 0, 0, 1, 1, 1, 1, None]
    assert label_from_pathology(["benign", "benign_without_callback"]) == 0
    assert label_from_pathology(["benign", "malignant"]) == 1
    assert label_from_pathology([]) == 0


@pytest.mark.parametrize("text, expected", [
    ("DENSITY C", "C"), ("density a", "A"), (3, "C"), ("1", "A"), ("4.0", "D"), ("     ", None), ("", None),
    ("E", None),
])
def test_density_letter(text, expected):
    assert density_letter(text) == expected


# -- geometry bounds -----------------------------------------------------------------------------

def test_box_inside_clipped_outside():
    assert fit_to_image("box", [10, 10, 20, 20], 100, 50) == (INSIDE, [10, 10, 20, 20])
    status, box = fit_to_image("box", [40, -5, 20, 20], 100, 50)
    assert status == CLIPPED and box == [40, 0, 10, 15]
    assert fit_to_image("box", [60, 10, 5, 5], 100, 50) == (OUTSIDE, None)
    # touching the edge from outside is outside: nothing of the box is in the image
    assert fit_to_image("box", [50, 10, 5, 5], 100, 50) == (OUTSIDE, None)


def test_polygon_point_circle_mask_bounds():
    square = [[1, 1], [9, 1], [9, 9], [1, 9]]
    assert fit_to_image("polygon", square, 10, 10) == (INSIDE, square)
    status, clipped = fit_to_image("polygon", [[5, 5], [15, 5], [15, 8]], 10, 10)
    assert status == CLIPPED and clipped == [[5, 5], [10, 5], [10, 8]]
    assert fit_to_image("polygon", [[11, 1], [12, 2], [13, 1]], 10, 10)[0] == OUTSIDE
    assert fit_to_image("point", [10, 10], 10, 10)[0] == INSIDE
    assert fit_to_image("point", [10.5, 3], 10, 10) == (OUTSIDE, None)
    assert fit_to_image("circle", {"cx": 5, "cy": 5, "r": 2}, 10, 10)[0] == INSIDE
    assert fit_to_image("circle", {"cx": 1, "cy": 5, "r": 2}, 10, 10)[0] == PARTLY_OUTSIDE
    assert fit_to_image("circle", {"cx": 12, "cy": 5, "r": 4}, 10, 10)[0] == OUTSIDE
    mask = np.zeros((6, 8), bool)
    mask[2:4, 3:7] = True
    geometry = mask_geometry(mask)
    assert geometry == {"bbox": [3, 2, 4, 2], "area": 8, "rows": 6, "cols": 8}
    assert fit_to_image("mask", geometry, 6, 8)[0] == INSIDE
    assert fit_to_image("mask", geometry, 6, 9)[0] == OUTSIDE


# -- CSV reading, report -------------------------------------------------------------------------

def test_read_table_names_missing_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,B_c\n1,2\n")
    assert read_table(path, {"a": (), "b c": ()}) == [{"a": "1", "b c": "2"}]
    with pytest.raises(ImporterError, match=r"lacks the column\(s\) 'd'.*found 'a', 'B_c'"):
        read_table(path, {"a": (), "d": ()})
    with pytest.raises(ImporterError, match="not found"):
        read_table(tmp_path / "nope.csv", {"a": ()})
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ImporterError, match="is empty"):
        read_table(tmp_path / "empty.csv", {"a": ()})


def test_report_counts_and_text():
    report = ImportReport("demo")
    report.images_new, report.images_existing, report.lesions_new = 3, 1, 5
    report.skip("a.dcm", "unreadable image", "truncated")
    report.skip("b.dcm", "unreadable image", "not DICOM")
    report.skip("c", "lesion without coordinates")
    report.outside("img1", "finding 2", CLIPPED)
    text = report.to_text()
    assert "4 images (3 new, 1 already in the catalog), 5 lesions" in text
    assert "2 x unreadable image, e.g. a.dcm: truncated" in text
    assert "1 clipped" in text and "img1: finding 2 (clipped)" in text
    data = report.to_dict()
    assert data["skipped"] == {"unreadable image": 2, "lesion without coordinates": 1}
    assert data["out_of_bounds"] == {"clipped": 1}
    assert report.ok
    assert not ImportReport("x", skipped=[("a", "b", "")]).ok


# -- CBIS-DDSM -----------------------------------------------------------------------------------

def test_cbis_reads_both_density_spellings_and_strips_paths(tmp_path):
    mass = tmp_path / "mass_case_description_train_set.csv"
    mass.write_text(
        "patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,mass shape,"
        "mass margins,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path\n"
        "P_00001,3,LEFT,CC,1,mass,IRREGULAR,SPICULATED,4,MALIGNANT,4,"
        "Mass-Training_P_00001_LEFT_CC/1.2/1.3/000000.dcm,\"Mass-Training_P_00001_LEFT_CC_1/1.4/1.5/000000.dcm\n\","
        "\"Mass-Training_P_00001_LEFT_CC_1/1.4/1.5/000001.dcm\n\"\n")
    calc = tmp_path / "calc_case_description_test_set.csv"
    calc.write_text(
        "patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,calc type,"
        "calc distribution,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path\n"
        "P_00002,1,RIGHT,MLO,2,calcification,PLEOMORPHIC,CLUSTERED,3,BENIGN_WITHOUT_CALLBACK,2,"
        "Calc-Test_P_00002_RIGHT_MLO/1.2/1.3/000000.dcm,Calc-Test_P_00002_RIGHT_MLO_2/a/b/000000.dcm,"
        "Calc-Test_P_00002_RIGHT_MLO_2/a/b/000001.dcm\n")
    (m,) = cbis_ddsm.read_case_csv(mass)
    (c,) = cbis_ddsm.read_case_csv(calc)
    assert (m.patient_id, m.density, m.laterality, m.view, m.kind, m.pathology, m.assessment) == \
        ("P_00001", "C", "L", "CC", "mass", "malignant", "4")
    assert m.roi_folder == "Mass-Training_P_00001_LEFT_CC_1" and m.mask_path.endswith("000001.dcm")
    assert m.descriptors == {"mass shape": "IRREGULAR", "mass margins": "SPICULATED"} and not m.is_test
    assert (c.density, c.laterality, c.kind, c.pathology, c.abnormality_id, c.subtlety) == \
        ("A", "R", "calcification", "benign_without_callback", 2, 2)
    assert c.is_test and c.full_folder == "Calc-Test_P_00002_RIGHT_MLO"


def test_cbis_bad_values_are_named(tmp_path):
    path = tmp_path / "mass_case_description_train_set.csv"
    header = ("patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,"
              "assessment,pathology,image file path,ROI mask file path\n")
    path.write_text(header + "P_1,2,LEFT,CC,1,mass,4,MAYBE,a/b.dcm,c/d.dcm\n")
    with pytest.raises(ImporterError, match=r"line 2: pathology 'MAYBE'"):
        cbis_ddsm.read_case_csv(path)
    # with a report (as an import reads it) the bad row is skipped with its reason, the others read
    path.write_text(header + "P_1,2,LEFT,CC,1,mass,4,MAYBE,a/b.dcm,c/d.dcm\n"
                    "P_2,2,LEFT,CC,1,tumour,4,BENIGN,e/f.dcm,g/h.dcm\n"
                    "P_3,2,RIGHT,MLO,1,mass,4,BENIGN,i/j.dcm,k/l.dcm\n")
    report = ImportReport("t")
    assert [c.patient_id for c in cbis_ddsm.read_case_csv(path, report)] == ["P_3"]
    assert [(w, r) for w, r, _ in report.skipped] == [(f"{path.name} line 2", "unreadable CSV row"),
                                                     (f"{path.name} line 3", "unreadable CSV row")]
    assert "abnormality type 'tumour'" in report.skipped[1][2]
    path.write_text(header.replace(",pathology", "") + "P_1,2,LEFT,CC,1,mass,4,a/b.dcm,c/d.dcm\n")
    with pytest.raises(ImporterError, match=r"lacks the column\(s\) 'pathology'"):
        cbis_ddsm.read_case_csv(path)


def test_cbis_roles_and_binary_masks():
    assert cbis_ddsm.role_from_text("full mammogram images") == "full"
    assert cbis_ddsm.role_from_text(None, "1.000000-ROI mask images-94682") == "mask"
    assert cbis_ddsm.role_from_text("cropped images") == "crop"
    assert cbis_ddsm.role_from_text("", "1.3.6.1.4") is None
    assert cbis_ddsm.is_binary(np.array([[0, 255], [0, 0]], np.uint8))
    assert cbis_ddsm.is_binary(np.zeros((4, 4), np.uint8))
    assert not cbis_ddsm.is_binary(np.array([[0, 1, 2]], np.uint16))
    assert not cbis_ddsm.is_binary(np.array([[3, 5]], np.uint16))
    mask = np.zeros((10, 8), bool)
    mask[2:5, 1:3] = True
    resized = cbis_ddsm.resize_mask(mask, (20, 16))
    assert resized.shape == (20, 16) and resized.sum() == 4 * mask.sum()


# -- VinDr-Mammo ---------------------------------------------------------------------------------

def test_vindr_categories():
    assert vindr.parse_categories("['Mass', 'Suspicious Calcification']") == ["Mass", "Suspicious Calcification"]
    assert vindr.parse_categories("['No Finding']") == ["No Finding"]
    assert vindr.parse_categories("Mass") == ["Mass"]
    assert vindr.parse_categories("[Mass, Asymmetry]") == ["Mass", "Asymmetry"]  # not a Python literal
    assert vindr.parse_categories("__import__('os')") == ["__import__('os')"]  # never evaluated
    assert vindr.kind_of(["Suspicious Calcification", "Mass"]) == "mass"
    assert vindr.kind_of(["Global Asymmetry"]) == "asymmetry"
    assert vindr.kind_of(["Nipple Retraction"]) == "other"
    assert vindr.kind_of(["No Finding"]) is None


# -- INbreast ------------------------------------------------------------------------------------

def test_inbreast_names_points_and_single_calcifications():
    info = inbreast.parse_file_name("20586908_6c613a14b80a8591_MG_R_CC_ANON.dcm")
    assert (info.file_id, info.patient_hash, info.laterality, info.view) == \
        ("20586908", "6c613a14b80a8591", "R", "CC")
    assert inbreast.parse_file_name("readme.dcm") is None
    assert inbreast.parse_point("(2165.000000, 1302.500000)") == (2165.0, 1302.5)
    assert inbreast.parse_point("(1.5, 2.5, 0.0)") == (1.5, 2.5)
    with pytest.raises(ValueError):
        inbreast.parse_point("1, 2")
    rois = [inbreast.Roi("Mass", [(0, 0), (4, 0), (4, 4)]), inbreast.Roi("Calcification", [(2, 2)]),
            inbreast.Roi("Cluster", [(1, 1), (3, 5)]), inbreast.Roi("Assymetry", [(0, 0), (1, 0), (1, 1)]),
            inbreast.Roi("Nipple", [])]
    findings, empty = inbreast.findings_of(rois, "4A")
    assert [(f.kind, f.geometry_type, f.geometry) for f in findings] == [
        ("mass", "polygon", [[0, 0], [4, 0], [4, 4]]), ("calcification", "point", [2, 2]),
        ("calcification", "point", [2, 3]), ("asymmetry", "polygon", [[0, 0], [1, 0], [1, 1]])]
    assert empty == ["ROI 5 (Nipple)"]


def test_inbreast_bad_xml(tmp_path):
    bad = tmp_path / "1.xml"
    bad.write_text("<plist><dict><key>Images</key>")
    with pytest.raises(ImporterError, match="not an OsiriX ROI plist"):
        inbreast.read_rois(bad)
    import plistlib

    for document, message in [({"Images": ["not a dict"]}, "without a list of ROI dictionaries"),
                              ({"Images": [{"ROIs": [{"Name": "Mass", "Point_px": "(1, 2)"}]}]},
                               "Point_px is not a list"),
                              ({"Images": [{"ROIs": [{"Name": "Mass", "Point_px": ["1; 2"]}]}]},
                               "ROI 'Mass': not an '\\(x, y\\)' point")]:
        bad.write_bytes(plistlib.dumps(document))
        with pytest.raises(ImporterError, match=message):
            inbreast.read_rois(bad)


# -- mini-MIAS -----------------------------------------------------------------------------------

def test_mias_info_rows(tmp_path):
    path = tmp_path / "Info.txt"
    path.write_text("REFNUM BG CLASS SEVERITY X Y RADIUS \n\nmdb001 G CIRC B 535 425 197\nmdb003 D NORM \n"
                    "mdb059 F CIRC B *NOTE 3*\nmdb216 D CALC M\nmdb099 X NORM\nnonsense line\n")
    rows, bad = mias.parse_info(path)
    assert [(r.refnum, r.cls, r.severity, r.x, r.y, r.radius) for r in rows] == [
        ("mdb001", "CIRC", "B", 535, 425, 197), ("mdb003", "NORM", None, None, None, None),
        ("mdb059", "CIRC", "B", None, None, None), ("mdb216", "CALC", "M", None, None, None)]
    assert [n for n, _ in bad] == [7, 8]
    report = ImportReport("t")
    findings = mias.findings_of(rows[:1] + rows[2:], 1024, report)
    assert [(f.kind, f.geometry, f.pathology) for f in findings] == [
        ("mass", {"cx": 535, "cy": 1024 - 425, "r": 197}, "benign")]
    assert report.skip_counts() == {"lesion without coordinates": 2}


def test_mias_laterality_and_pairs():
    # README: pairs of films, left = even reference numbers, right = odd.
    assert [mias.laterality_of(r) for r in ("mdb001", "mdb002", "mdb321", "mdb322")] == ["R", "L", "R", "L"]
    assert mias.patient_of("mdb001") == mias.patient_of("mdb002") == "pair001"
    assert mias.patient_of("mdb003") == "pair002"


def test_read_pgm_variants(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "a.pgm").write_bytes(b"P5\n# made by a test\n4 3\n255\n" + pixels.tobytes())
    assert np.array_equal(mias.read_pgm(tmp_path / "a.pgm"), pixels)
    (tmp_path / "b.pgm").write_bytes(b"P2 4 3 255\n" + " ".join(map(str, pixels.ravel())).encode())
    assert np.array_equal(mias.read_pgm(tmp_path / "b.pgm"), pixels)
    wide = (np.arange(6, dtype=np.uint16) * 1000).reshape(2, 3)
    (tmp_path / "c.pgm").write_bytes(b"P5 3 2 65535\n" + wide.astype(">u2").tobytes())
    assert np.array_equal(mias.read_pgm(tmp_path / "c.pgm"), wide)
    (tmp_path / "d.pgm").write_bytes(b"P5\n4 3\n255\n" + pixels.tobytes()[:7])
    with pytest.raises(ImporterError, match="truncated PGM"):
        mias.read_pgm(tmp_path / "d.pgm")
    (tmp_path / "e.pgm").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ImporterError, match="not a PGM file"):
        mias.read_pgm(tmp_path / "e.pgm")

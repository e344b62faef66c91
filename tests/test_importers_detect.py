"""Format detection (only when unambiguous) and the ``mammo import --format`` command for every data set."""

from __future__ import annotations

import shutil

import pytest

from tests.fixtures.dicom import breast_phantom, write_dicom
from tests.fixtures.importers import build_cbis, build_inbreast, build_mias, build_vindr, counts, lesion_total
from workspace.app.cli import main
from workspace.base.catalog import open_catalog
from workspace.data.importers import FORMATS, detect_format, import_auto
from workspace.data.importers.common import ImporterError
from workspace.data.ingest import ImportSummary

BUILDERS = {"cbis-ddsm": build_cbis, "vindr": build_vindr, "inbreast": build_inbreast, "mias": build_mias}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("datasets")
    return {name: (base / name, build(base / name)) for name, build in BUILDERS.items()}


def test_each_layout_is_detected_and_nothing_else(folders, tmp_path):
    assert set(FORMATS) == set(BUILDERS)
    for name, (root, _truth) in folders.items():
        assert detect_format(root) == name
        assert [n for n, fmt in FORMATS.items() if fmt.looks_like(root)] == [name]
    plain = tmp_path / "plain"
    write_dicom(plain / "a.dcm", breast_phantom((520, 512)))
    assert detect_format(plain) is None
    assert detect_format(tmp_path / "does-not-exist") is None


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_reimport_is_idempotent(ws, folders, name):
    root, _truth = folders[name]
    first = FORMATS[name].run(ws, root)
    db = open_catalog(ws)
    before = counts(db)
    assert (first.images_new, first.lesions_new) == before[:2] and min(before) > 0
    again = FORMATS[name].run(ws, root)
    assert counts(db) == before
    assert (again.images_new, again.lesions_new) == (0, 0)
    assert (again.images_existing, again.lesions_existing) == before[:2]
    assert "0 new" in again.to_text()


def test_ambiguous_folder_is_refused(folders, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(folders["inbreast"][0], mixed)
    shutil.copy(folders["mias"][0] / "Info.txt", mixed / "Info.txt")
    with pytest.raises(ImporterError, match="looks like several data sets \\(inbreast, mias\\).*--format"):
        detect_format(mixed)


def test_auto_falls_back_to_a_plain_dicom_folder(ws, tmp_path):
    plain = tmp_path / "plain"
    write_dicom(plain / "a.dcm", breast_phantom((520, 512)))
    summary = import_auto(ws, plain, non_mg="warn")
    assert isinstance(summary, ImportSummary) and len(summary.imported) == 1
    with pytest.raises(ImporterError, match="--mask-mismatch applies to CBIS-DDSM"):
        import_auto(ws, plain, mask_mismatch="skip")


@pytest.mark.parametrize("fmt", ["auto", "named"])
def test_cli_imports_every_data_set(folders, tmp_path, capsys, fmt):
    for name, (root, truth) in folders.items():
        ws_dir = tmp_path / f"ws-{name}"
        argv = ["import", str(root), "--format", name if fmt == "named" else "auto", "--workspace", str(ws_dir)]
        assert main(argv) == 0
        out = capsys.readouterr().out
        n_images = len(truth["images"])
        assert f"{n_images} images ({n_images} new" in out
        from workspace.base.config import Workspace

        db = open_catalog(Workspace.open(ws_dir))
        assert counts(db)[0] == n_images
        assert main(argv) == 0  # idempotent from the command line too
        assert f"{n_images} images (0 new, {n_images} already in the catalog)" in capsys.readouterr().out
        assert counts(db)[0] == n_images
        # the data set's patient keys stay in the catalog's patients table: no file the workspace wrote
        # (display and mask PNGs, converted DICOMs) carries one in its name or its bytes
        patients = {im["patient"] for im in truth["images"]}
        written = [p for p in ws_dir.rglob("*") if p.is_file() and not p.name.startswith("catalog.sqlite")]
        assert written and not [p for p in written if any(k in p.name or k.encode() in p.read_bytes()
                                                           for k in patients)], name


def test_cli_reports_a_broken_data_set_in_one_line(tmp_path, capsys):
    empty = tmp_path / "not-cbis"
    empty.mkdir()
    code = main(["import", str(empty), "--format", "cbis-ddsm", "--workspace", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("mammo import: error: CBIS-DDSM: no case description CSV") and "Traceback" not in err


def test_cli_mask_mismatch_option(tmp_path, capsys):
    root = tmp_path / "cbis"
    truth = build_cbis(root, layout="nbia-classic", mismatch=True)
    n_lesions = lesion_total(truth)
    assert main(["import", str(root), "--format", "cbis-ddsm", "--mask-mismatch", "skip",
                 "--workspace", str(tmp_path / "ws")]) == 0
    out = capsys.readouterr().out
    assert f"{n_lesions - 1} lesions" in out and "1 x mask size mismatch" in out
    # the option on a format that has no masks is said, not silently ignored
    assert main(["import", str(root), "--format", "vindr", "--mask-mismatch", "skip",
                 "--workspace", str(tmp_path / "ws2")]) == 1
    assert "--mask-mismatch applies to CBIS-DDSM" in capsys.readouterr().err

"""Real films through everything a reader does, and honesty about the model's domain.

The 8 CBIS-DDSM films (``tests.fixtures.films``) are read with the shipped demo model, which was trained
on synthetic mammograms only: every surface that shows a score shows the model card and warns that these
films lie outside the model's training domain; images drawn by the generator for the recorded test split
(never seen in training) raise no warning.
"""

from __future__ import annotations

import html

import numpy as np
import pytest

from workspace.app.cli import main

WARNING = "Outside the model's training domain"


def _reasons_beyond_the_data_set(verdict) -> list[str]:
    return [r for r in verdict.reasons if not r.startswith("it comes from data set")]


def test_the_shipped_model_says_what_it_was_trained_on(films):
    card = films.loaded.card
    assert card.synthetic_only and card.datasets == ["synthetic"]
    summary = card.summary()
    assert "synthetic mammograms only" in summary and "generator v2" in summary and "no real images" in summary
    test = films.loaded.meta["metrics"]["test"]
    assert f"test AUC {test['auc']:.3f} (95 % CI {test['auc_ci']['low']:.3f}-{test['auc_ci']['high']:.3f}" in summary
    assert card.trained and summary.endswith(f"trained {card.trained}")
    assert films.loaded.meta["training_domain"]["datasets"] == ["synthetic"]


def test_every_film_is_outside_the_training_domain_by_its_pixels(films):
    from models.inference import read_mammogram

    for image_id in films.film_ids:
        read = read_mammogram(films.ws, image_id, films.loaded, keep_maps=False)
        assert read.shape[0] >= 4400 and read.domain.checked and read.domain.outside, image_id
        # not only "another data set": what the pixels and the header show speaks too
        assert _reasons_beyond_the_data_set(read.domain), (image_id, read.domain.reasons)
        assert read.domain.warning().startswith(WARNING)


@pytest.mark.slow
def test_recorded_test_images_of_the_generator_stay_quiet(tmp_path):
    """Full-size images of two recorded test patients (never trained on), imported and read as a user would."""
    from models.checkpoint import SHIPPED_DEMO, load_checkpoint
    from models.inference import read_mammogram
    from workspace.base.catalog import open_catalog
    from workspace.base.config import Workspace
    from workspace.data.domain import domain_of
    from workspace.data.synth import synthesize

    loaded = load_checkpoint(SHIPPED_DEMO, "cpu")
    recorded = loaded.meta["data"]["recorded_test"]
    patients = sorted({int(p[0]) for p in recorded["patches"]})[:2]
    ws = Workspace.open(tmp_path / "ws")
    for patient in patients:
        synthesize(ws, 1, seed=int(recorded["seed"]), first_patient=patient)
    db = open_catalog(ws)
    rows = [dict(r) for r in db.query("SELECT * FROM images ORDER BY image_id")]
    assert len(rows) == 4 * len(patients)
    for row in rows:
        verdict = domain_of(ws, row, loaded.meta["training_domain"], db=db)
        assert verdict.checked and not verdict.outside, (row["image_id"], verdict.reasons)
    read = read_mammogram(ws, rows[0]["image_id"], loaded, keep_maps=False)
    assert read.domain.checked and read.domain.warning() is None


def test_an_unlabelled_folder_goes_import_read_patches_dissect_report(tmp_path, capsys):
    """The README's "bring your own data" path on two real films, as a user types it: no labels anywhere."""
    import shutil

    from tests.fixtures.films import films_folder
    from workspace.base.config import Workspace
    from workspace.data.patches import PatchError, build_patch_set
    from workspace.dissect.session import Session

    folder = tmp_path / "films"
    folder.mkdir()
    for source in sorted(films_folder().glob("sfm-malign-0/*.dcm"))[:2]:
        shutil.copy(source, folder / source.name)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main(["import", str(folder), *ws]) == 0
    assert main(["read", "--all", *ws]) == 0
    with pytest.raises(PatchError, match="no lesion patches"):  # the labelled recipe cannot run here...
        build_patch_set(Workspace.open(tmp_path / "ws"))
    capsys.readouterr()
    assert main(["patches", "--tissue", *ws]) == 0  # ...the tissue grid can
    out = capsys.readouterr().out
    assert "unlabelled tissue patches of 2 image(s)" in out
    assert main(["dissect", "--patch-set", "tissue", "--split", "all", *ws]) == 0
    with Session.open(tmp_path / "ws") as session:
        assert session.run.manifest["patch_set"] == "tissue"
        assert session.run.manifest["source"]["patch_source"] == "tissue grid of every read (unlabelled)"
    capsys.readouterr()
    first = main(["images", *ws])
    ids = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("I-")]
    assert first == 0 and len(ids) == 2
    assert main(["report", ids[0], "--format", "text", *ws]) == 0
    assert "WARNING: " + WARNING in capsys.readouterr().out


def test_mammo_read_shows_the_card_and_warns_per_film(films, capsys):
    assert main(["read", *films.film_ids, "--workspace", str(films.ws.root)]) == 0
    out = capsys.readouterr().out
    assert films.loaded.card.summary() in out
    for image_id in films.film_ids:
        block = out.split(image_id, 1)[1].splitlines()
        assert block[1].strip().startswith("WARNING: " + WARNING), block[:2]
    assert f"{len(films.film_ids)} of {len(films.film_ids)} image(s) lie outside the model's training domain" in out


def test_a_report_on_a_film_carries_its_score_the_card_and_the_warning(films, tmp_path, capsys):
    from models.inference import read_mammogram
    from workspace.dissect.reports import report_for_image

    image_id = films.film_ids[0]
    read = read_mammogram(films.ws, image_id, films.loaded)
    x, y, w, h = (int(v) for v in read.boxes[int(np.argmax(read.scores))])
    roi = [x + w // 4, y + h // 4, w // 2, h // 2]
    report = report_for_image(films.ws, image_id, roi, run=films.run, loaded=films.loaded)
    text = report.to_text()
    assert f"P(possibly malignant) {read.image_score:.2f}" in text
    assert "WARNING: " + WARNING in text and films.loaded.card.summary() in text
    page = report.to_html()
    assert 'class="warn"' in page and html.escape(WARNING) in page and "synthetic mammograms only" in page
    assert report.to_dict()["domain"]["outside"] is True

    out_file = tmp_path / "film.html"
    assert main(["report", image_id, "--roi", ",".join(map(str, roi)), "--out", str(out_file),
                 "--workspace", str(films.ws.root)]) == 0
    assert html.escape(WARNING) in out_file.read_text()
    assert main(["report", image_id, "--format", "text", "--workspace", str(films.ws.root)]) == 0
    assert "WARNING: " + WARNING in capsys.readouterr().out


@pytest.mark.fiftyone
def test_fiftyone_shows_the_reads_with_their_warnings(films, fo_db):
    import fiftyone as fo

    from fiftyone_plugins.sync import sync_with_summary

    _patches, _neurons, summary = sync_with_summary(films.ws, films.run, prefix="films", loaded=films.loaded)
    assert summary.reads_dataset == "films-reads" and summary.reads_written >= len(films.film_ids)
    reads = fo.load_dataset("films-reads")
    assert reads.description == films.loaded.card.summary()
    by_id = {s["image_id"]: s for s in reads}
    for image_id in films.film_ids:
        sample = by_id[image_id]
        assert sample["outside_domain"] is True and sample["domain_warning"].startswith(WARNING)
        assert sample["n_suspicious"] == len(sample["suspicious"].detections)
        assert sample["view"] in ("CC", "MLO") and sample["laterality"] in ("L", "R")
    patches = fo.load_dataset("films-patches")
    assert patches.info["mammo"]["model_card"]["summary"] == films.loaded.card.summary()
    # the run's patches are the films' own tissue grid: unlabelled, and flagged like their films
    assert set(patches.values("ground_truth.label")) == {"unlabelled"}
    assert all(patches.values("outside_domain")) and len(patches) == films.run.manifest["n_patches"]
    # a second sync writes nothing
    assert sync_with_summary(films.ws, films.run, prefix="films", loaded=films.loaded)[2].reads_written == 0

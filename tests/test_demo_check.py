"""``mammo demo --check`` (workspace.app.demo_check): its choices, and one whole check on a small workspace.

The whole check runs in a child process (as ``mammo demo --check`` does: its FiftyOne connects to the
check's own mongod, which must not change this test process's FiftyOne), against the test run's
shared Label Studio (remembered with ``mammo ls connect``, so no second Label Studio is started).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workspace.app.demo_check import CHECK_CONCEPT, CheckFailed, Checks, roi_on_patch, units_to_label


def test_roi_is_the_lesion_part_inside_the_patch_else_the_patch_centre():
    roi, what = roi_on_patch((100, 80), [10, 20, 40, 40], [(0, 0, 5, 5), (40, 50, 30, 30)])
    assert what.startswith("lesion box") and roi.sum() == 10 * 10 and roi[50:60, 40:50].all()
    roi, what = roi_on_patch((100, 80), [10, 20, 40, 40], [(0, 0, 5, 5)])
    assert what.startswith("centre") and roi.sum() == 20 * 20 and roi[30:50, 20:40].all()


def test_units_to_label_prefer_aligned_unlabelled_units():
    labelled = {3: "x", 5: "y"}
    assert units_to_label([3, 7, 5, 9], [7, 3, 9, 5, 1], labelled) == [7, 9]
    assert units_to_label([3, 7], [7, 3, 1], labelled) == [7, 3]
    assert units_to_label([], [4, 2, 8], labelled) == [4, 2]


def test_a_failing_step_becomes_one_fail_line_and_the_rest_goes_on():
    printed = []
    checks = Checks(echo=printed.append)
    assert checks.step("a", lambda: "fine")

    def broken():
        raise CheckFailed("3 rectangles for 4 suspicious patches")

    assert not checks.step("b", broken)
    assert not checks.step("c", lambda: 1 / 0)
    assert not checks.ok
    assert printed[0].startswith("[check] OK   a") and "fine" in printed[0]
    assert "FAIL b" in printed[1] and "3 rectangles for 4 suspicious patches" in printed[1]
    assert "ZeroDivisionError" in printed[2]


DRIVER = textwrap.dedent("""
    import sys
    from models.checkpoint import load_checkpoint
    from workspace.base.config import Workspace
    from workspace.app.demo import DemoState
    from workspace.app.demo_check import run_checks
    from workspace.dissect.dissect_run import load_run

    ws = Workspace.open(sys.argv[1], create=False)
    run = load_run(ws, sys.argv[2])
    image_ids = sys.argv[4].split(",") if sys.argv[4] else []
    state = DemoState(ws=ws, loaded=load_checkpoint(sys.argv[3], "cpu"), run=run, image_ids=image_ids)
    sys.exit(run_checks(state, fiftyone_app=False))
""")


@pytest.mark.labelstudio
@pytest.mark.slow
def test_the_whole_check_passes_stops_everything_and_leaves_the_labels_as_they_were(
        tmp_path_factory, _quiet_and_contained, labelstudio_server):
    from ml_backend.labelstudio import save_external
    from tests.fixtures.labelstudio import _standin
    from workspace.base.services import recorded_services
    from workspace.dissect.concepts import ConceptStore

    built = _standin(tmp_path_factory.mktemp("demo-check"))
    ws, run = built.ws, built.run
    save_external(ws, labelstudio_server.url, labelstudio_server.token,
                  document_root=str(labelstudio_server.document_root))
    with ConceptStore(ws) as store:   # a label people made before the check, on a unit the check may pick
        store.label_units(run.model_digest, run.layer, [0], "fibroglandular tissue", by="reader", source="cli")
        before = {u: c.name for u, c in store.labels(run.model_digest, run.layer).items()}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(ws.root), run.run_id, str(built.loaded.path),
                           ",".join(built.image_ids)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    out = done.stdout + done.stderr
    print(done.stdout)  # the check's lines, shown by pytest on failure or with -s
    assert done.returncode == 0, out[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[check] ")]
    names = [line[13:].split()[0] for line in lines[:-1]]
    assert names == ["stack", "fiftyone", "prediction", "roi", "group", "report", "cleanup"], lines
    assert all(line.startswith("[check] OK") for line in lines[:-1]) and "all 7 checks passed" in lines[-1]
    # everything it started is stopped
    services = recorded_services(ws)
    assert {"ml_backend", "mongod"} <= set(services) and not any(s.alive() for s in services.values())
    # the labels are as before; the history keeps the check's labels and their removal
    with ConceptStore(ws) as store:
        assert {u: c.name for u, c in store.labels(run.model_digest, run.layer).items()} == before
        events = store.history(run.model_digest, run.layer, concept=CHECK_CONCEPT)
        assert store.units_of(CHECK_CONCEPT, run.model_digest, run.layer) == []
    assert sorted(e.action for e in events if e.name_after == CHECK_CONCEPT) in (["add", "add"], ["add", "relabel"],
                                                                                 ["relabel", "relabel"])
    assert [e.action for e in events if e.name_before == CHECK_CONCEPT] == ["remove", "remove"]
    assert {e.source for e in events} >= {"fiftyone", "cli"} and {e.actor for e in events} == {"demo-check"}
    report = next(ws.reports_dir.glob("demo-check-*.html"))
    assert CHECK_CONCEPT in report.read_text()

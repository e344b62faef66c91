"""Two processes labelling at once lose nothing and never show "database is locked"."""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback

from workspace.dissect.concepts import ConceptStore

MODEL, LAYER = "c0ffee0000000001", "features.29"
WRITES = 1000
CONCEPTS = ("mass", "Calcification", "architectural distortion")


def _labeller(path: str, worker: int, start, middle, results) -> None:
    """One process: WRITES single-unit label transactions on its own units (worker*WRITES + i).

    Half way, each waits for the other at a barrier, so the two are writing at the same time whatever
    the scheduler does on a loaded machine (without it one could finish before the other starts)."""
    errors: list[str] = []
    try:
        store = ConceptStore(path)
        start.wait(30)
        began = time.time()
        for i in range(WRITES):
            if i == WRITES // 2:
                middle.wait(120)
            try:
                # every concept is created by whichever process gets there first: the other one merges
                store.label_units(MODEL, LAYER, [worker * WRITES + i], CONCEPTS[i % 3].upper() if worker else
                                  CONCEPTS[i % 3], by=f"proc-{worker}", source="api", n_units=2 * WRITES)
            except Exception as error:  # collected: the test asserts there are none
                errors.append(f"{type(error).__name__}: {error}")
        store.close()
        results.put((worker, errors, began, time.time()))
    except Exception:
        results.put((worker, [traceback.format_exc()], 0.0, 0.0))


def _race(ws, target) -> list[tuple]:
    """Run ``target(path, worker, start, middle, results)`` in two spawned processes released at once;
    the (worker, errors, ...) tuple each put on ``results``."""
    ConceptStore(ws).close()                      # schema in place before the race
    ctx = mp.get_context("spawn")
    start, middle, results = ctx.Event(), ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(str(ws.catalog_path), w, start, middle, results)) for w in (0, 1)]
    for p in procs:
        p.start()
    time.sleep(1.0)                               # both are importing/connected: start together
    start.set()
    outcome = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return outcome


def test_two_processes_label_at_once_lose_nothing(ws):
    outcome = _race(ws, _labeller)
    assert max(o[2] for o in outcome) < min(o[3] for o in outcome), "the two writers did not overlap"
    errors = [e for o in outcome for e in o[1]]
    assert errors == [], errors[:3]              # no "database is locked", no lost write

    store = ConceptStore(ws)
    labels = store.labels(MODEL, LAYER)
    assert len(labels) == 2 * WRITES
    for worker in (0, 1):
        for i in range(WRITES):
            assert labels[worker * WRITES + i].key == CONCEPTS[i % 3].casefold()
    assert sorted(c.name.casefold() for c in store.list_concepts()) == sorted(c.casefold() for c in CONCEPTS)
    expected = {c.casefold(): 2 * sum(1 for i in range(WRITES) if CONCEPTS[i % 3] == c) for c in CONCEPTS}
    assert {c.key: c.n_units for c in store.list_concepts()} == expected
    events = store.history(MODEL, LAYER)
    assert len(events) == 2 * WRITES and {e.action for e in events} == {"add"}
    assert sorted((e.actor, e.unit) for e in events) == sorted(
        [(f"proc-{w}", w * WRITES + i) for w in (0, 1) for i in range(WRITES)])
    rows = store.label_rows(MODEL, LAYER)
    assert all(r.labelled_by == f"proc-{r.unit // WRITES}" for r in rows)


SHARED_UNITS = 40


def _relabeller(path: str, worker: int, start, middle, results) -> None:
    """One process: 500 single-unit writes on units the other process writes too (meeting half way)."""
    errors: list[str] = []
    try:
        store = ConceptStore(path)
        start.wait(30)
        for i in range(500):
            if i == 250:
                middle.wait(120)
            try:
                store.label_units(MODEL, LAYER, [(i * 7 + worker) % SHARED_UNITS], CONCEPTS[(i + worker) % 3],
                                  by=f"proc-{worker}", source="api", n_units=SHARED_UNITS)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")
        store.close()
        results.put((worker, errors))
    except Exception:
        results.put((worker, [traceback.format_exc()]))


def test_racing_relabels_keep_a_consistent_history(ws):
    """Both processes relabel the same units: every event's 'before' is the previous event's 'after'
    (no lost update), same-concept writes change nothing (a confirm records the other process agreeing),
    and replaying the history gives the labels."""
    outcome = _race(ws, _relabeller)
    assert [e for o in outcome for e in o[1]] == []

    store = ConceptStore(ws)
    events = store.history(MODEL, LAYER)
    last: dict[int, int | None] = {}
    for e in events:
        assert e.concept_before == last.get(e.unit)
        if e.action == "confirm":
            assert e.concept_after == e.concept_before
            continue
        assert e.concept_after != e.concept_before
        assert e.action == ("add" if e.concept_before is None else "relabel")
        last[e.unit] = e.concept_after
    assert {u: c.concept_id for u, c in store.labels(MODEL, LAYER).items()} == last
    assert store.labels_at(MODEL, LAYER, events[-1].at) == store.labels(MODEL, LAYER)
    assert {e.actor for e in events} == {"proc-0", "proc-1"} and len(last) == SHARED_UNITS

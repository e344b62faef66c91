"""``mammo concepts``: the concept store from the command line (list, create, label, remove, history, agreement,
rule, propose, proposals, accept, reject).

Units are those of one dissected (model, layer): ``--run RUN_ID``, or ``--model DIGEST --layer NAME``,
or by default the newest complete dissection run of the workspace. One concept per unit: labelling a
labelled unit with another concept relabels it (the history keeps both). ``agreement`` shows how readers
agree (per unit, per concept, Cohen's and Fleiss' kappa); ``rule`` shows or sets the team's label rule (the
label reports use when readers disagree: latest or majority). ``propose`` computes concept proposals from the
lesions units align with (:mod:`workspace.dissect.proposals`), ``accept`` / ``reject`` decide them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

ORDER = 50


def _scope(args: argparse.Namespace, db, *, required: bool = True) -> tuple[str | None, str | None, str | None]:
    """(model_digest, layer, run_id) from the options, else the newest complete run."""
    from workspace.base.errors import ConceptError

    if args.run:
        row = db.execute("SELECT model_digest, layer FROM dissection_runs WHERE run_id = ?", [args.run]).fetchone()
        if row is None:
            raise ConceptError(f"no dissection run {args.run!r} in this workspace")
        return row[0], row[1], args.run
    if args.model or args.layer:
        if not (args.model and args.layer):
            raise ConceptError("give both --model and --layer (or --run)")
        return args.model, args.layer, None
    from workspace.base.catalog import complete_runs

    runs = complete_runs(db)
    if not runs:
        if required:
            raise ConceptError("no dissection run in this workspace yet: run `mammo dissect`, or name the "
                               "units with --model DIGEST --layer NAME --n-units N")
        return None, None, None
    return runs[0]["model_digest"], runs[0]["layer"], runs[0]["run_id"]


def _listing(args: argparse.Namespace, items: list, empty: str, header: list[str],
             cells: Callable[[Any], list[str]]) -> int:
    """``items`` (each with ``to_dict()``) as JSON with ``--json``, else ``empty`` or a table of ``cells(item)``."""
    if args.json:
        print(json.dumps([item.to_dict() for item in items], indent=2))
        return 0
    if not items:
        print(empty)
        return 0
    rows = [cells(item) for item in items]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _run(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace
    from workspace.base.errors import ConceptError
    from workspace.dissect.concepts import ConceptStore, default_actor, parse_units

    ws = Workspace.open(args.workspace)
    store = ConceptStore(ws)
    by = getattr(args, "by", None) or default_actor()
    try:
        if args.action == "create":
            concept = store.create_concept(args.name, by, description=args.description, colour=args.colour)
            print(f"concept #{concept.concept_id} {concept.name!r} ({concept.colour})")
            return 0

        if args.action == "list":
            model, layer, run_id = _scope(args, store.db, required=False)
            if args.concept:
                if not model:
                    raise ConceptError("no dissection run: say which units with --run or --model/--layer")
                units = store.units_of(args.concept, model, layer)
                if args.json:
                    print(json.dumps({"concept": store.get_concept(args.concept).name, "units": units}))
                else:
                    print(f"{store.get_concept(args.concept).name}: {len(units)} unit(s) of {layer} "
                          f"(model {model[:12]}): {', '.join(map(str, units)) or '-'}")
                return 0
            where = f"units of {layer}, model {model[:12]}" if model else "units"
            return _listing(args, store.list_concepts(model, layer),
                            "no concepts yet (add one with `mammo concepts create NAME` or `mammo concepts label`)",
                            ["id", "concept", where, "colour", "created by", "description"],
                            lambda c: [str(c.concept_id), c.name, str(c.n_units), c.colour, c.created_by,
                                       (c.description or "")[:60]])

        if args.action == "label":
            model, layer, run_id = _scope(args, store.db, required=args.n_units is None)
            units = parse_units(args.unit)
            changed = store.label_units(model, layer, units, args.concept, by=by, source="cli", run_id=run_id,
                                        n_units=args.n_units, description=args.description,
                                        query_id=args.query)
            name = store.get_concept(args.concept).name
            print(f"{changed} of {len(units)} unit(s) now labelled {name!r} "
                  f"({len(units) - changed} already were); {layer}, model {model[:12]}")
            return 0

        if args.action == "remove":
            model, layer, run_id = _scope(args, store.db)
            removed = store.remove_labels(model, layer, parse_units(args.unit) if args.unit else None, by=by,
                                          source="cli", concept=args.concept)
            print(f"{removed} label(s) removed; {layer}, model {model[:12]}")
            return 0

        if args.action == "history":
            model, layer, run_id = _scope(args, store.db, required=bool(args.at))
            if args.at:
                labels = store.labels_at(model, layer, args.at)
                if args.json:
                    print(json.dumps({str(u): c.name for u, c in labels.items()}, indent=2))
                    return 0
                print(f"labels of {layer} (model {model[:12]}) at {args.at}: {len(labels)} unit(s)")
                groups: dict[str, list[int]] = {}
                for unit, concept in labels.items():
                    groups.setdefault(concept.name, []).append(unit)
                for name, units in sorted(groups.items()):
                    print(f"  {name}: {', '.join(map(str, units))}")
                return 0
            return _listing(args, store.history(model, layer, unit=args.unit_filter, concept=args.concept,
                                                limit=args.limit),
                            "no label changes yet",
                            ["#", "at", "action", "unit", "before", "after", "by", "source", "query"],
                            lambda e: [str(e.event_id), e.at, e.action, str(e.unit), e.name_before or "-",
                                       e.name_after or "-", e.actor, e.source, str(e.query_id or "")])
        if args.action == "agreement":
            model, layer, run_id = _scope(args, store.db)
            found = store.agreement(model, layer)
            if args.json:
                print(json.dumps(found.to_dict(), indent=2))
                return 0
            print(f"agreement on {layer}, model {model[:12]}")
            print(found.to_text(max_disputed=args.limit))
            return 0

        if args.action == "propose":
            from workspace.dissect.dissect_run import load_run
            from workspace.dissect.proposals import iou_table, propose
            from workspace.dissect.session import load_run_model

            model, layer, run_id = _scope(args, store.db)
            if run_id is None:
                raise ConceptError("proposals are computed over a dissection run's patches: give --run")
            run = load_run(ws, run_id)
            table = iou_table(ws, run, load_run_model(ws, run))
            found = propose(table, per_value=args.per_value, min_iou=args.min_iou)
            pending = store.save_proposals(run_id, model, layer, found,
                                           evidence={"per_value": args.per_value, "min_iou": args.min_iou})
            rows = store.proposals(model, layer)
            if args.json:
                print(json.dumps([r.to_dict() for r in rows], indent=2))
                return 0
            print(f"{len(found)} unit(s) of {layer} are among the {args.per_value} best matches of a lesion attribute "
                  f"value over {sum(table.n_patches.values())} patches; {pending} proposal(s) pending (decided ones "
                  "are kept)")
            for row in rows[:args.top]:
                print(f"  #{row.proposal_id}  {row.to_text()}")
            if len(rows) > args.top:
                print(f"  +{len(rows) - args.top} more (`mammo concepts proposals`)")
            print("accept or reject: mammo concepts accept|reject ID ...")
            return 0

        if args.action == "proposals":
            model, layer, run_id = _scope(args, store.db)
            rows = store.proposals(model, layer, status=None if args.status == "all" else args.status)
            return _listing(args, rows, f"no {args.status} proposals (compute them with `mammo concepts propose`)",
                            ["#", "unit", "concept", "IoU", "lesions", "status", "decided by"],
                            lambda r: [str(r.proposal_id), str(r.unit), r.concept, f"{r.iou:#.2g}", str(r.n_lesions),
                                       r.status, r.decided_by or ""])

        if args.action in ("accept", "reject"):
            decided = store.decide_proposals(args.ids, accept=args.action == "accept", by=by, source="cli")
            for row in decided:
                print(f"#{row.proposal_id} {row.status}: {row.to_text()}")
            left = len(args.ids) - len(decided)
            if left:
                print(f"{left} proposal(s) were decided before: left as they were")
            return 0

        if args.action == "rule":
            if args.rule:
                store.set_rule(args.rule, by=by)
            print(f"label rule: {store.rule()}")
            return 0
    finally:
        store.close()
    return 2


def add_parser(subparsers, parents) -> None:
    parser = subparsers.add_parser(
        "concepts", parents=parents,
        help="concepts and neuron labels: list, create, label, remove, history, agreement, rule, propose, "
             "proposals, accept, reject",
        description="The concept store. One concept per unit; names are unique ignoring case and spaces; "
                    "every change is kept in an append-only history.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def scoped(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--run", metavar="RUN_ID", help="units of this dissection run (default: the newest)")
        sub.add_argument("--model", metavar="DIGEST", help="units of this model (with --layer)")
        sub.add_argument("--layer", metavar="NAME", help="units of this layer (with --model)")

    listing = actions.add_parser("list", parents=parents, help="concepts with their unit counts, or one concept's units")
    scoped(listing)
    listing.add_argument("--concept", metavar="NAME", help="list the units of this concept")
    listing.add_argument("--json", action="store_true", help="print JSON")

    create = actions.add_parser("create", parents=parents, help="add a concept (an existing name is returned as is)")
    create.add_argument("name")
    create.add_argument("--description", metavar="TEXT")
    create.add_argument("--colour", "--color", metavar="#RRGGBB", help="default: the next palette colour")
    create.add_argument("--by", metavar="WHO", help="default: $MAMMO_USER or $USER")

    label = actions.add_parser("label", parents=parents, help="label units with a concept (one transaction)")
    scoped(label)
    label.add_argument("--unit", "--units", required=True, metavar="LIST", help="units, e.g. 3,5,10-12")
    label.add_argument("--concept", required=True, metavar="NAME", help="created when new")
    label.add_argument("--n-units", type=int, metavar="N", help="units in the layer (when there is no run)")
    label.add_argument("--description", metavar="TEXT", help="for a new concept")
    label.add_argument("--query", type=int, metavar="QUERY_ID", help="the ROI query the label came from")
    label.add_argument("--by", metavar="WHO", help="default: $MAMMO_USER or $USER")

    remove = actions.add_parser("remove", parents=parents, help="remove labels (of units and/or of a concept)")
    scoped(remove)
    remove.add_argument("--unit", "--units", metavar="LIST", help="units, e.g. 3,5,10-12")
    remove.add_argument("--concept", metavar="NAME", help="every unit labelled with this concept")
    remove.add_argument("--by", metavar="WHO", help="default: $MAMMO_USER or $USER")

    history = actions.add_parser("history", parents=parents, help="label changes, or the labels at a past time")
    scoped(history)
    history.add_argument("--unit", dest="unit_filter", type=int, metavar="N", help="only this unit")
    history.add_argument("--concept", metavar="NAME", help="only changes to or from this concept")
    history.add_argument("--at", metavar="TIME", help="show the labels as they were at this ISO 8601 time")
    history.add_argument("--limit", type=int, metavar="N", help="the last N changes")
    history.add_argument("--json", action="store_true", help="print JSON")

    agreement = actions.add_parser("agreement", parents=parents,
                                   help="how readers agree: per unit and concept, Cohen's and Fleiss' kappa")
    scoped(agreement)
    agreement.add_argument("--limit", type=int, default=20, metavar="N", help="disputed units shown (default 20)")
    agreement.add_argument("--json", action="store_true", help="print JSON")

    proposer = actions.add_parser("propose", parents=parents,
                                  help="propose concepts for units from the lesions they align with (a pass over "
                                       "the run's patches)")
    scoped(proposer)
    proposer.add_argument("--per-value", type=int, default=3, metavar="N",
                          help="units proposed per lesion attribute value (default 3)")
    proposer.add_argument("--min-iou", type=float, default=0.0, metavar="X",
                          help="dataset-level IoU a proposal needs above (default 0: any overlap)")
    proposer.add_argument("--top", type=int, default=20, metavar="N", help="proposals printed (default 20)")
    proposer.add_argument("--json", action="store_true", help="print JSON")

    listed = actions.add_parser("proposals", parents=parents, help="the stored proposals")
    scoped(listed)
    listed.add_argument("--status", default="proposed", choices=("proposed", "accepted", "rejected", "all"))
    listed.add_argument("--json", action="store_true", help="print JSON")

    for verb, what in (("accept", "accept proposals: label each unit with its proposed concept"),
                       ("reject", "reject proposals (kept, not proposed again)")):
        decide = actions.add_parser(verb, parents=parents, help=what)
        decide.add_argument("ids", nargs="+", type=int, metavar="ID", help="proposal numbers")
        decide.add_argument("--by", metavar="WHO", help="default: $MAMMO_USER or $USER")

    rule = actions.add_parser("rule", parents=parents, help="show or set the label reports use when readers "
                                                            "disagree (latest, the default, or majority)")
    rule.add_argument("rule", nargs="?", choices=("latest", "majority"))
    rule.add_argument("--by", metavar="WHO", help="default: $MAMMO_USER or $USER")
    parser.set_defaults(func=_run)

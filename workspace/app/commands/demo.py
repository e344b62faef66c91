"""``mammo demo``: the whole product on embedded defaults.

Synthesises a small cohort (first run only), uses the shipped model, reads every mammogram, dissects
the model, seeds a few example concepts, then starts Label Studio, the ML backend and the FiftyOne
App on 127.0.0.1 and prints what to open and how to log in. Ctrl-C stops every process it started.
A second run reuses everything. ``--check`` exercises each step once and exits non-zero on failure.
"""

from __future__ import annotations

import argparse

ORDER = 1


def _run(args: argparse.Namespace) -> int:
    from workspace.app.demo import prepare
    from workspace.base.config import Workspace

    ws = Workspace.open(args.workspace)
    state = prepare(ws, patients=args.patients, seed=args.seed, model=args.model)
    print(state.summary(), flush=True)
    if args.prepare_only:
        return 0
    if args.check:
        from workspace.app.demo_check import run_checks

        return run_checks(state, args)
    from workspace.app.commands.up import bring_everything_up

    return bring_everything_up(ws, args)


def add_parser(subparsers, parents) -> None:
    from workspace.app.demo import DEMO_PATIENTS, DEMO_SEED

    p = subparsers.add_parser("demo", parents=parents, help="build the demo workspace and start everything",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=DEMO_PATIENTS, help=f"synthetic patients (default {DEMO_PATIENTS})")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help=f"cohort seed (default {DEMO_SEED})")
    p.add_argument("--model", help="checkpoint to use (default: the shipped demo model)")
    p.add_argument("--check", action="store_true",
                   help="exercise each step once (prediction, ROI query, group label, report) and exit")
    p.add_argument("--prepare-only", action="store_true", help="build the workspace, start nothing")
    from workspace.app.commands.up import add_service_options

    add_service_options(p)
    p.set_defaults(func=_run)

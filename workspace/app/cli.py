"""The ``mammo`` command line.

Each subcommand lives in its own module under ``workspace/app/commands/``: the module defines
``ORDER`` (its place in ``mammo --help``) and ``add_parser(subparsers, parents)``, which adds the
subparser and sets ``func(args) -> int``. Modules import heavy libraries (torch, FiftyOne, Label
Studio) inside ``func`` only, so ``mammo --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from workspace import __version__
from workspace.app import commands
from workspace.base.errors import MammoError


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", "-w", metavar="DIR", default=argparse.SUPPRESS,
                        help="workspace folder (default: $MAMMO_WORKSPACE or ./mammo-workspace)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mammo",
        description="mammo-dissect: ask a mammography CNN why (Network Dissection in Label Studio and FiftyOne).",
        parents=[_common()],
    )
    parser.add_argument("--version", action="version", version=f"mammo-dissect {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    found = []
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            found.append(module)
    for module in sorted(found, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        module.add_parser(subparsers, [_common()])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not hasattr(args, "workspace"):
        args.workspace = None
    try:
        return int(args.func(args) or 0)
    except MammoError as error:
        print(f"mammo {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mammo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

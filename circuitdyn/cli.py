"""The `circuitdyn` command line: one subcommand per job, each a thin layer over the Python API.

Each subcommand is a pair: `_add_<name>(subparsers)` builds its parser, `_run_<name>(args)` runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from circuitdyn.errors import CircuitdynError

Runner = Callable[[argparse.Namespace], int]
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(add: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:
    """Register a function that adds one subcommand parser (and sets `func=` on it)."""
    _COMMANDS.append(add)
    return add


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitdyn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CircuitdynError as err:
        print(f"circuitdyn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"circuitdyn {args.command}: interrupted; finished work is kept, re-run to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

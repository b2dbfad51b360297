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


@command
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="epochs, architecture, tokenizer and weight hashes of a run or checkpoint")
    p.add_argument("path", nargs="?", help="run folder, HF model folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle-only checkpoints (weights_only load)")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from circuitdyn.checkpoints import default_model_dir, describe, open_run

    info = describe(open_run(args.path or default_model_dir(), allow_pickle=args.allow_pickle))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kv = info["n_key_value_heads"]
    print(f"run          {info['path']}")
    print(f"architecture {info['architecture']}: {info['n_layers']} layers, {info['n_heads']} heads "
          f"({kv} KV heads), d_model {info['d_model']}, d_head {info['d_head']}, d_mlp {info['d_mlp']}, "
          f"vocab {info['d_vocab']}, {info['normalization']} norm, {info['positional_embedding']} positions")
    tok = info["tokenizer"]
    print(f"tokenizer    {tok['class']} ({tok['vocab_size']} tokens, chat template: {'yes' if tok['chat_template'] else 'no'})")
    print(f"epochs       {info['epochs']}")
    for ck in info["checkpoints"]:
        loss = "-" if ck["train_loss"] is None else f"{ck['train_loss']:.4f}"
        print(f"  epoch {ck['epoch']:>3}  step {ck['step'] if ck['step'] is not None else '-':>6}  loss {loss:>8}  "
              f"{ck['bytes'] / 2**20:8.1f} MiB  {ck['content_hash'][:19]}  {', '.join(ck['weight_files'])}")
    return 0


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

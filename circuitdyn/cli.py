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


@command
def _add_cpt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cpt",
        help="continual pre-training with the paper's strategies, probing before and after every epoch",
        description="Train on entity documents, save a merged checkpoint per epoch (checkpoints_spec layout) and "
        "score the probes (ROUGE-1 recall, answer log-prob, math/SocialIQA exact match) after every epoch. "
        "Re-running with the same settings resumes from the last finished epoch.",
    )
    p.add_argument("--out", required=True, help="run folder to write (or resume)")
    p.add_argument("--base", help="base checkpoint folder, run folder or RUN:EPOCH (default: embedded SmolLM2)")
    p.add_argument("--corpus", help="text file (blank-line separated documents) or JSONL {text, entity} "
                   "(default: the seed chunk sentences of the chosen entities)")
    p.add_argument("--probes", help="probe file: seed JSON or circuitdyn JSONL (default: seed validation probes)")
    p.add_argument("--entities", help="comma-separated entity names (default: --n-entities balanced seed entities)")
    p.add_argument("--n-entities", type=int, default=8)
    p.add_argument("--rephrased", action="store_true", help="also score the seed's rephrased questions")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="plain",
                   help="plain | stepwise-kl | pretrain-kl | annotated | curriculum (default: plain)")
    p.add_argument("--method", default="lora", help="lora (r=32, alpha=64, q/v + embeddings) | full")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of the KL term of the -kl strategies")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"], help="probe prompt form")
    p.add_argument("--threshold", type=float, default=0.6, help="mean ROUGE-1 recall at which an entity is learned")
    p.add_argument("--n-math", type=int, default=32, help="math control probes per evaluation (0 = none)")
    p.add_argument("--n-reasoning", type=int, default=16, help="SocialIQA control probes per evaluation (0 = none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_cpt)


def _run_cpt(args: argparse.Namespace) -> int:
    import time

    from circuitdyn.cpt import CPTConfig, run_cpt

    t0 = time.perf_counter()
    cfg = CPTConfig(
        base_model=args.base, corpus=args.corpus, probes=args.probes,
        entities=[e.strip() for e in args.entities.split(",") if e.strip()] if args.entities else None,
        n_entities=args.n_entities, rephrased=args.rephrased, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, strategy=args.strategy, method=args.method,
        kl_weight=args.kl_weight, template=args.template, threshold=args.threshold,
        n_math=args.n_math or None, n_reasoning=args.n_reasoning or None,
    )
    result = run_cpt(cfg, args.out, progress=not args.no_progress)
    print(f"wall time {time.perf_counter() - t0:.1f}s; best epoch {result.dynamics.best_epoch()}; run folder {result.run_dir}")
    return 0


@command
def _add_dynamics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dynamics",
        help="learned / acquired / retained / forgotten entities per epoch of a run",
        description="Read a run's per-epoch probe results (a `circuitdyn cpt` folder, or a strategy folder of the "
        "paper's release such as paper-results/llama3-i-1b/VFT) and print the learning dynamics.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("--threshold", type=float, default=0.6, help="mean ROUGE-1 recall at which an entity is learned")
    p.add_argument("--by", choices=["ne_frequency", "ne_label", "question_type"],
                   help="also print the dynamics grouped by this field")
    p.add_argument("--entities", action="store_true", help="also print the per-entity trajectories")
    p.add_argument("--json", action="store_true", help="print one JSON object (table, best epoch, entities)")
    p.set_defaults(func=_run_dynamics)


def _run_dynamics(args: argparse.Namespace) -> int:
    import json

    from circuitdyn.dynamics import format_table, load_dynamics

    dyn = load_dynamics(args.run, threshold=args.threshold)
    if args.json:
        ents = dyn.entities()
        ents["windows"] = ents["windows"].map(lambda w: [list(x) for x in w])
        out = {
            "run": str(dyn.source),
            "threshold": dyn.threshold,
            "best_epoch": dyn.best_epoch(),
            "table": json.loads(dyn.table().to_json(orient="records")),
            "entities": json.loads(ents.to_json(orient="records")),
        }
        if args.by:
            out["grouped"] = json.loads(dyn.grouped(args.by, "probe" if args.by == "question_type" else "entity")
                                        .to_json(orient="records"))
        print(json.dumps(out, indent=2))
        return 0
    groups = dyn.grouped(args.by, "probe" if args.by == "question_type" else "entity") if args.by else None
    print(format_table(dyn))
    print(f"best epoch: {dyn.best_epoch()} ({len(dyn.learned[dyn.best_epoch()])} learned)")
    if groups is not None:
        print(groups.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-"))
    if args.entities:
        cols = ["entity", "known_before", "first_acquired", "flips", "windows", "consolidated_from", "never_learned",
                "best_recall", "best_epoch"]
        print(dyn.entities()[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-"))
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

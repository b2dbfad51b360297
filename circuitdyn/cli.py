"""The `circuitdyn` command line: one subcommand per job, each a thin layer over the Python API.

Each subcommand is a pair: `_add_<name>(subparsers)` builds its parser, `_run_<name>(args)` turns the parsed
options into values (a `FactSpec`, settings, a `Comparison`; selection rules are parsed by their option's type),
calls one function of the API and prints its result's own `text()` or `to_dict()`. Nothing here analyses,
chooses defaults or loops over runs.

The API's modules are imported here, at the top: building the parser needs most of them anyway (their option
choices and defaults), so `circuitdyn --help` costs the same either way. Modules are imported as modules
(`cpt.run_cpt`, not `run_cpt`), so that what a test patches on a module is what the command calls.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from circuitdyn import api, demo, messages, viz
from circuitdyn.analysis import calibration, dynamics
from circuitdyn.engine import export
from circuitdyn.engine.export import DEFAULT_SELECTION as EXPORT_SELECTION
from circuitdyn.engine.export import FORMATS
from circuitdyn.engine.forward import METRICS
from circuitdyn.engine.memory import default_threads, parse_memory
from circuitdyn.engine.selection import DEFAULT_SELECTION, Selection
from circuitdyn.engine.settings import (
    BUFFER_DTYPES,
    DEFAULT_FAMILY,
    DEFAULT_IG_GRID,
    DEFAULT_IG_STEPS,
    DEFAULT_REPLICATES,
    FAMILIES,
    IG_GRIDS,
    METHODS,
    PAPER_SETTINGS,
    AttributionSettings,
    Comparison,
    Compute,
    Storage,
)
from circuitdyn.errors import CircuitdynError, CircuitdynWarning
from circuitdyn.io import check_writable
from circuitdyn.pipeline import calibrate, extraction, plan, tasks
from circuitdyn.pipeline.compare import Side
from circuitdyn.probes.facts import FactSpec, run_facts
from circuitdyn.probes.probes import corruption_summary
from circuitdyn.runs import checkpoints, gguf
from circuitdyn.training import cpt, sweep

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(add: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:
    """Register a function that adds one subcommand parser (and sets `func=` on it)."""
    _COMMANDS.append(add)
    return add


# --------------------------------------------------------------------------- option values
# Each numeric option is checked here, at parse time, by its `type=`: argparse then names the option as typed
# ("argument --batch-size: must be a whole number >= 1, got '0'") and exits 2 before any work.


def _whole(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, sizes, steps, epochs)."""
    return _whole(text, 1)


def nonnegative_int(text: str) -> int:
    """A whole number >= 0 (seeds; counts where 0 means none)."""
    return _whole(text, 0)


def memory_size(text: str) -> int:
    """Bytes of a memory budget such as 8GiB or 500MB (`memory.parse_memory`)."""
    try:
        return parse_memory(text)
    except CircuitdynError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (weights)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A share in (0, 1] (recall thresholds)."""
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def selection_spec(text: str):
    """A selection rule (`top:N`, `paths:N`, `abs:T`, `faith:F`, `pruned:F`), parsed once, here
    (`Selection.parse`)."""
    try:
        return Selection.parse(text)
    except CircuitdynError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _output(path: str | Path, kind: str, flag: str, overwrite: bool = False) -> None:
    """Check before any work that an output can be written where asked (`circuitdyn.io.check_writable`), and
    that an existing file there is a circuitdyn viewer (regenerated) unless `--overwrite`."""
    check_writable(path, kind, flag=flag)
    if kind == "file" and not overwrite:
        viz.check_viewer_target(path, flag=flag)


@command
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="epochs, architecture, tokenizer and weight hashes of a run or checkpoint")
    p.add_argument("path", nargs="?", help="run folder, HF model folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle-only checkpoints (weights_only load)")
    _add_base_arg(p)
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    info = checkpoints.describe(
        checkpoints.open_run(args.path or gguf.default_model_dir(), allow_pickle=args.allow_pickle, base=args.base)
    )
    print(json.dumps(info, indent=2) if args.json else checkpoints.info_text(info))
    return 0


@command
def _add_cpt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cpt",
        help="continual pre-training with the paper's strategies, probing before and after every epoch",
        description="Train on entity documents, save a checkpoint per epoch (checkpoints_spec layout; LoRA: the "
        "adapter and trained embeddings, --save merged: the merged model) and "
        "score the probes (ROUGE-1 recall, answer log-prob, math/SocialIQA exact match) after every epoch. "
        "Re-running with the same settings resumes from the last finished epoch.",
    )
    p.add_argument("--out", required=True, help="run folder to write (or resume)")
    p.add_argument("--base", help="base checkpoint folder, run folder or RUN:EPOCH (default: embedded SmolLM2)")
    p.add_argument(
        "--corpus",
        help="text file (blank-line separated documents) or JSONL {text, entity} "
        "(default: the seed chunk sentences of the chosen entities)",
    )
    p.add_argument("--probes", help="probe file: seed JSON or circuitdyn JSONL (default: seed validation probes)")
    p.add_argument("--entities", help="comma-separated entity names (default: --n-entities balanced seed entities)")
    p.add_argument("--n-entities", type=positive_int, default=8)
    p.add_argument("--rephrased", action="store_true", help="also score the seed's rephrased questions")
    p.add_argument("--epochs", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument(
        "--strategy",
        default="plain",
        help="plain | stepwise-kl | pretrain-kl | annotated | curriculum (default: plain); several, "
        "comma-separated, run a sweep",
    )
    p.add_argument("--method", default="lora", help="lora (r=32, alpha=64, q/v + embeddings) | full")
    p.add_argument(
        "--kl-weight", type=nonnegative_float, default=1.0, help="weight of the KL term of the -kl strategies"
    )
    p.add_argument(
        "--save",
        default="adapter",
        choices=["adapter", "merged"],
        help="how LoRA epochs are stored: adapter (default: PEFT adapter + trained embeddings, epoch 0 "
        "refers to the base) or merged (a full merged model per epoch)",
    )
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"], help="probe prompt form")
    p.add_argument(
        "--threshold", type=probability, default=0.6, help="mean ROUGE-1 recall at which an entity is learned"
    )
    p.add_argument("--n-math", type=nonnegative_int, default=32, help="math control probes per evaluation (0 = none)")
    p.add_argument(
        "--n-reasoning", type=nonnegative_int, default=16, help="SocialIQA control probes per evaluation (0 = none)"
    )
    _add_device_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--seeds",
        help="comma-separated seeds: a sweep of one run per seed (and strategy) in OUT/<strategy>/seed_<seed>",
    )
    _add_ray_args(p, "one task per run of the sweep")
    p.add_argument(
        "--preset",
        choices=["paper"],
        help="paper: the settings of arXiv 2601.03858 (LoRA r=32, alpha=64, "
        "Gaussian init, q/v + embeddings, lr 1e-4, 10 epochs, seed 42, system-message probes with the "
        "rephrasings, all 264 math / 100 SocialIQA items); options set to other than their default "
        "override it",
    )
    p.add_argument(
        "--mmlu",
        help="MMLU test items to score like the paper (JSON list or JSONL of question, choices, answer; not shipped)",
    )
    p.set_defaults(func=_run_cpt, cpt_defaults={a.dest: a.default for a in p._actions})


def _run_cpt(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg = cpt.CPTConfig(
        base_model=args.base,
        corpus=args.corpus,
        probes=args.probes,
        entities=_names(args.entities),
        n_entities=args.n_entities,
        rephrased=args.rephrased,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        strategy=args.strategy,
        method=args.method,
        kl_weight=args.kl_weight,
        template=args.template,
        threshold=args.threshold,
        n_math=args.n_math or None,
        n_reasoning=args.n_reasoning or None,
        device=args.device,
        dtype=args.dtype,
        save=args.save,
        mmlu=args.mmlu,
    )
    if args.preset == "paper":  # the preset, but every option given on the command line wins
        fields = {"base": "base_model"}
        given = {
            fields.get(k, k) for k, v in vars(args).items() if k in args.cpt_defaults and v != args.cpt_defaults[k]
        }
        cfg = cpt.CPTConfig.paper(**{k: v for k, v in vars(cfg).items() if k in given})
    strategies = _names(args.strategy) or ["plain"]
    if args.seeds or args.ray or len(strategies) > 1:
        seeds = _integers(args.seeds, "--seeds") if args.seeds else [args.seed]
        runs = sweep.run_sweep(
            cfg, args.out, seeds, strategies, ray=args.ray, max_retries=args.max_retries, progress=not args.no_progress
        )
        print(f"wall time {time.perf_counter() - t0:.1f}s; {len(runs)} runs:")
        print("\n".join(f"  {path}" for path in runs))
        print(f"per-epoch means across seeds: circuitdyn dynamics {' '.join(str(p) for p in runs)}")
        return 0
    result = cpt.run_cpt(cfg, args.out, progress=not args.no_progress)
    print(
        f"wall time {time.perf_counter() - t0:.1f}s; best epoch {result.dynamics.best_epoch()}; "
        f"run folder {result.run_dir}"
    )
    return 0


@command
def _add_dynamics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dynamics",
        help="learned / acquired / retained / forgotten entities per epoch of a run",
        description="Read a run's per-epoch probe results (a `circuitdyn cpt` folder, or a strategy folder of the "
        "paper's release such as paper-results/llama3-i-1b/VFT) and print the learning dynamics.",
    )
    p.add_argument(
        "run",
        nargs="+",
        help="run folder; several (e.g. the seeds of a sweep): per-epoch means with 95 %% intervals across them",
    )
    p.add_argument(
        "--threshold", type=probability, default=0.6, help="mean ROUGE-1 recall at which an entity is learned"
    )
    p.add_argument(
        "--by",
        choices=["ne_frequency", "ne_label", "question_type"],
        help="also print the dynamics grouped by this field",
    )
    p.add_argument("--entities", action="store_true", help="also print the per-entity trajectories")
    p.add_argument("--json", action="store_true", help="print one JSON object (table, best epoch, entities)")
    p.add_argument(
        "--baseline",
        help="folder of the base model's results, read as epoch 0 (default: a baseline/ folder inside or beside RUN)",
    )
    p.add_argument(
        "--stop",
        nargs="?",
        const="combined",
        metavar="RULE",
        help="apply a stopping rule to the probe history: patience[:P], ood-bound[:D], combined[:W] "
        "(default) or loss-plateau[:R] (circuitdyn.analysis.stopping); prints stop_epoch, kept_epoch, "
        "best_epoch and regret",
    )
    p.set_defaults(func=_run_dynamics)


def _run_dynamics(args: argparse.Namespace) -> int:
    if len(args.run) > 1:
        if args.stop:
            raise CircuitdynError("--stop applies to one run; give one run folder (a stopping rule's epoch is per run)")
        report: Any = dynamics.dynamics_across(args.run, threshold=args.threshold, baseline=args.baseline)
    else:
        report = dynamics.dynamics_report(
            args.run[0],
            threshold=args.threshold,
            baseline=args.baseline,
            by=args.by,
            stop=args.stop,
            entities=args.entities,
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0


def _selection_arg(args: argparse.Namespace):
    """--select, else --top-n N as top:N, else the default (circuits sized to faithfulness 0.8)."""
    if args.select:
        return args.select
    return Selection("top", args.top_n) if args.top_n else DEFAULT_SELECTION


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--select",
        type=selection_spec,
        help="how circuits are chosen from scores: faith:F (default faith:0.8: each fact's smallest"
        " top-|score| circuit carrying F of its metric gap on its own model; needs checkpoints and "
        "--probes), pruned:F (the same, then greedily pruned with patched evaluation: far smaller, slower), "
        "top:N, paths:N or abs:T",
    )
    p.add_argument("--top-n", type=positive_int, help="shorthand for --select top:N")


def _add_facts_args(p: argparse.ArgumentParser, required: bool = False, what: str = "") -> None:
    """The options of `circuitdyn.probes.facts.load_facts`: which probe file, and which of its facts."""
    p.add_argument("--probes", required=required, help=f"probe file: seed JSON or circuitdyn JSONL{what}")
    p.add_argument("--limit", type=positive_int, help="only the first N probes of the file")
    p.add_argument(
        "--sample", type=positive_int, metavar="N", help="a fixed seeded sample of N probes (chosen before any outcome)"
    )
    p.add_argument("--entities", help="comma-separated entity names: only their probes (the swap pool stays the file)")
    p.add_argument(
        "--per-entity", type=positive_int, metavar="N", help="a fixed seeded sample of N probes of every entity"
    )
    p.add_argument(
        "--sample-seed", type=nonnegative_int, default=0, help="seed of --sample and --per-entity (default 0)"
    )
    p.add_argument("--rephrased", action="store_true", help="also use the seed's rephrased questions")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"], help="probe prompt form")


def _add_attribution_args(
    p: argparse.ArgumentParser, method_default: str | None = "eap-ig", steps_default: int | None = -1
) -> None:
    p.add_argument("--method", default=method_default, choices=METHODS, help="attribution method (default eap-ig)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULT_IG_STEPS if steps_default == -1 else steps_default,
        help=f"EAP-IG interpolation steps (default {DEFAULT_IG_STEPS}; the paper used 30)",
    )
    p.add_argument(
        "--metric",
        default="answer-logprob",
        choices=list(METRICS),
        help="what a circuit must carry (default answer-logprob; logit-diff contrasts the corrupted prompt's answer)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the noise corruption")
    p.add_argument(
        "--ig-grid",
        choices=IG_GRIDS,
        help=f"quadrature of the IG path integral (default {DEFAULT_IG_GRID}; the cached circuits' own for "
        "diff/timeline; left for --task, as the paper; right = circuitdyn's grid before, left = "
        "hannamw/EAP-IG's)",
    )


def replicate_count(text: str) -> int:
    """Replicates per checkpoint of the change test (a whole number >= 2)."""
    return _whole(text, 2)


def _add_noise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--replicates",
        type=replicate_count,
        default=DEFAULT_REPLICATES,
        metavar="R",
        help=f"method-noise replicates drawn per checkpoint for the change test (default "
        f"{DEFAULT_REPLICATES}: smallest per-fact p 2/252)",
    )
    p.add_argument(
        "--family",
        default=DEFAULT_FAMILY,
        choices=FAMILIES,
        help="what a replicate varies: estimation (IG quadrature offset; default) or question (also the "
        "corruption's swap partner)",
    )


def _add_base_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        help="base model folder of adapter-only (PEFT) checkpoints, and epoch 0 of a Trainer "
        "run (default: the adapter's base_model_name_or_path when it is a local folder)",
    )


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="precision of the model (attribution scores are accumulated in float32)",
    )


def _names(text: str | None) -> list[str] | None:
    """Comma-separated names as a list (None when not given)."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _integers(text: str, flag: str) -> list[int]:
    """Comma-separated whole numbers."""
    try:
        return [int(x) for x in _names(text) or []]
    except ValueError:
        raise CircuitdynError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _spec(args: argparse.Namespace, packaged: bool = False) -> FactSpec | None:
    """The facts --probes (and the options choosing among its probes) name, as a `FactSpec`; None without
    --probes (with `packaged`: the packaged validation probes)."""
    if not args.probes and not packaged:
        return None
    entities = _names(args.entities)
    return FactSpec(
        args.probes or None,
        args.limit,
        args.sample,
        args.per_entity,
        None if entities is None else tuple(entities),
        None,
        args.sample_seed,
        args.rephrased,
        args.template,
    )


def _chosen(args: argparse.Namespace) -> dict[str, Any]:
    """The attribution settings given on the command line (`AttributionSettings` fields; the others are left to
    the cached circuits or the defaults)."""
    fields = {
        "method": args.method,
        "steps": args.steps,
        "ig_grid": args.ig_grid,
        "metric": args.metric,
        "seed": args.seed,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _comparison(args: argparse.Namespace, **extra: Any) -> Comparison:
    """The comparison --select/--top-n, --family, --replicates (and `extra`) ask for."""
    return Comparison(
        **{"selection": _selection_arg(args), "family": args.family, "replicates": args.replicates, **extra}
    )


def _say(args: argparse.Namespace, text: str) -> None:
    """A progress line: on stdout, or on stderr under --json (stdout is the JSON then)."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


@command
def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="per-fact knowledge circuits (EAP / EAP-IG edge scores) for every epoch of a run",
        description="Attribute every probe fact on each epoch's model and write one circuit file per epoch "
        "(safetensors scores [fact, edge] + provenance). Re-running skips epochs whose file already holds the "
        "same checkpoint hash and settings. Prints each fact's faithfulness at the top-N selection.",
    )
    p.add_argument("ckpt", metavar="CKPT_OR_RUN", help="run folder (all epochs), RUN:EPOCH or a checkpoint folder")
    _add_facts_args(p, what=" (or --task)")
    p.add_argument(
        "--task",
        help="a task circuit instead of per-fact circuits: a packaged task (head-of-state) or a "
        "task file; the paper's protocol: metric logit-diff, EAP-IG 30 steps, top 50,000 edges, "
        "baseline and circuit logit diff / hit@10 in OUT/epoch_N/results.json",
    )
    p.add_argument(
        "--runs", type=positive_int, default=5, help="--task: seeded runs of attribution and evaluation (default 5)"
    )
    _add_attribution_args(p, steps_default=None)
    _add_device_args(p)
    p.add_argument("--epochs", help="comma-separated epochs (default: all epochs of a run, or the one given)")
    _add_base_arg(p)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--top-n",
        type=positive_int,
        help="selection whose faithfulness is printed (default 1000); with "
        "--task the task circuit's size (default 50,000)",
    )
    p.add_argument(
        "--float16", action="store_true", help="store scores as float16, scaled per fact (2 bytes/edge; the default)"
    )
    p.add_argument("--float32", action="store_true", help="store scores as float32 (4 bytes/edge, exact)")
    p.add_argument(
        "--sparse",
        type=positive_int,
        metavar="K",
        help="store only each fact's top-K edges + node totals (the file records the share of score mass they keep)",
    )
    p.add_argument("--out", help="folder for the circuit files (default: the run's circuits folder)")
    p.add_argument("--overwrite", action="store_true", help="replace circuit files of another checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_scale_args(p)
    _add_ray_args(p, "tasks of one checkpoint x one shard of facts, assembled into the same files")
    p.add_argument(
        "--shard-size",
        type=positive_int,
        metavar="N",
        help="facts per Ray task (rounded up to a multiple of --batch-size; default: an even split over the cluster)",
    )
    p.set_defaults(func=_run_extract)


def _add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="auto|ADDRESS",
        help=f"run on Ray ({what}): auto starts a local cluster, ADDRESS joins one (needs circuitdyn[ray])",
    )
    p.add_argument(
        "--max-retries", type=nonnegative_int, default=3, help="with --ray: retries of a task whose worker died"
    )


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=positive_int,
        default=default_threads(),
        help="CPU threads (default: physical cores; on a shared machine fewer can be much faster)",
    )
    p.add_argument(
        "--max-memory",
        type=memory_size,
        metavar="SIZE",
        help="memory budget, e.g. 8GiB: the fact batch is chosen from it (and halved on an out-of-memory error)",
    )
    p.add_argument(
        "--buffer-dtype",
        default="float32",
        choices=BUFFER_DTYPES,
        help="precision of the stored activation differences (sums stay float32)",
    )


def _run_extract(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.float16 and args.float32:
        raise CircuitdynError("--float16 and --float32 exclude each other")
    if args.task and args.probes:
        raise CircuitdynError("extract takes --probes FILE (per-fact circuits) or --task NAME|FILE, not both")
    run, epochs = checkpoints.resolve_epochs(
        args.ckpt, args.epochs, device=args.device, dtype=args.dtype, base=args.base
    )
    out = args.out or checkpoints.circuits_dir(run)
    if args.task:
        if args.metric not in ("answer-logprob", "logit-diff"):
            raise CircuitdynError(f"--task uses the paper's metric logit-diff, not {args.metric!r}")
        if args.method == "eap":
            raise CircuitdynError("--task uses the paper's method eap-ig (EAP-IG on inputs)")
        settings = PAPER_SETTINGS.replace(
            **{k: v for k, v in (("steps", args.steps), ("ig_grid", args.ig_grid)) if v is not None}
        )
        top_n = tasks.PAPER_TOP_N if args.top_n is None else args.top_n
        task = tasks.load_task(args.task)
        print(tasks.describe_task(tasks.task_facts(task, run.tokenizer()), epochs, settings, top_n, args.runs))
        done: list[Any] = tasks.extract_task_run(
            run,
            task,
            out,
            epochs,
            settings,
            top_n=top_n,
            runs=args.runs,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    else:
        settings = AttributionSettings(**_chosen(args))
        spec = _spec(args)
        chooses = [
            f"--{k.replace('_', '-')}" for k in ("limit", "sample", "per_entity", "entities") if getattr(args, k)
        ]
        if spec is None and chooses:
            raise CircuitdynError(
                f"extract: {', '.join(chooses)} choose among --probes FILE's probes; without --probes the run's "
                "recorded facts are used as they are"
            )
        facts = spec.load(run.tokenizer()) if spec is not None else run_facts(run, folder=out)
        source = args.probes or facts.options.get("probes") or "the packaged validation probes"
        recorded = "" if args.probes else ", the run's recorded facts"
        print(f"{len(facts)} facts ({corruption_summary(facts)}{recorded}); epochs {epochs}; {settings.describe()}")
        print(plan.extract_plan(run, facts, out, epochs, settings).line())
        compute = Compute(
            args.batch_size,
            args.buffer_dtype,
            args.max_memory,
            args.threads,
            args.ray,
            args.shard_size,
            args.max_retries,
        )
        storage = Storage(
            "float32" if args.float32 else "float16", args.sparse, 1000 if args.top_n is None else args.top_n
        )
        done = extraction.extract_run(
            run,
            facts,
            out,
            epochs,
            settings,
            compute,
            storage,
            extra_meta={"probe_file": str(source)},
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    for d in done:
        print(f"\n{d.text()}")
    print(f"\nwall time {time.perf_counter() - t0:.1f}s")
    return 0


@command
def _add_diff(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="how the per-fact circuits changed between two checkpoints")
    p.add_argument("a", metavar="CKPT_A", help="RUN:EPOCH, a checkpoint folder, or a circuit .safetensors file")
    p.add_argument("b", metavar="CKPT_B", help="RUN:EPOCH, a checkpoint folder, or a circuit .safetensors file")
    _add_facts_args(p, what=": circuits are computed for its facts (or reused when cached)")
    _add_attribution_args(p, method_default=None, steps_default=None)
    _add_device_args(p)
    p.add_argument("--circuits", help="folder of cached circuit files (default: RUN/circuits)")
    _add_base_arg(p)
    _add_selection_args(p)
    _add_noise_args(p)
    p.add_argument(
        "--no-noise",
        action="store_true",
        help="do not draw method-noise replicates of both checkpoints; "
        "changes are then not tested against method noise",
    )
    p.add_argument("--fact", action="append", help="compare only this fact id (repeatable)")
    p.add_argument("--out", default="diff.html", help="HTML viewer to write (default diff.html)")
    p.add_argument("--overwrite", action="store_true", help="replace a file at --out that is not a circuitdyn viewer")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_run_diff)


def _run_diff(args: argparse.Namespace) -> int:
    _output(args.out, "file", "--out", args.overwrite)
    a, b = (Side.open(s, device=args.device, dtype=args.dtype, base=args.base) for s in (args.a, args.b))
    d = api.diff(
        a,
        b,
        _spec(args),
        _chosen(args),
        _comparison(args, replicates=None if args.no_noise else args.replicates),
        circuits=args.circuits,
        fact_ids=args.fact,
        progress=not args.json,
        log=lambda text: _say(args, text),
    )
    out = viz.write_diff_html(d, args.out, labels=d.labels, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({**d.to_dict(), "html": str(out)}, indent=1, default=str))
        return 0
    print(f"circuit diff {args.a} -> {args.b}: {len(d.a.fact_ids)} facts, selection {d.selection}")
    print(d.text())
    print(f"\nviewer: {out}")
    return 0


@command
def _add_timeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("timeline", help="circuits across all epochs of a run, with recall and loss")
    p.add_argument(
        "run",
        metavar="RUN",
        nargs="+",
        help="run folder; several (e.g. the seeds of a sweep, each with "
        "its own circuits folder): per-epoch means with 95 %% intervals across them",
    )
    _add_facts_args(p, what=": extract circuits for its facts at every epoch where missing (reused when cached)")
    _add_attribution_args(p, method_default=None, steps_default=None)
    _add_device_args(p)
    p.add_argument("--circuits", help="folder holding the circuit files (default: RUN/circuits)")
    _add_base_arg(p)
    _add_selection_args(p)
    _add_noise_args(p)
    p.add_argument(
        "--noise-epochs",
        default="all",
        help="epochs whose method-noise replicates are drawn: all "
        "(default: every transition is tested), ends (first and last), none, or comma-separated epochs "
        "(needs --probes)",
    )
    p.add_argument(
        "--transfer",
        action="store_true",
        help="also evaluate every epoch's circuit on every epoch's "
        "model (faithfulness matrix; needs --probes; cached in the circuits folder)",
    )
    p.add_argument("--out", help="HTML viewer to write (default RUN/timeline.html)")
    p.add_argument("--overwrite", action="store_true", help="replace a file at --out that is not a circuitdyn viewer")
    p.add_argument("--json", action="store_true", help="print the summary and per-epoch table as JSON")
    p.set_defaults(func=_run_timeline)


def _run_timeline(args: argparse.Namespace) -> int:
    if args.transfer and not args.probes:
        raise CircuitdynError("--transfer needs --probes (the facts to evaluate the circuits on)")
    if len(args.run) > 1:
        if args.circuits or args.out or args.transfer:
            raise CircuitdynError(
                "--circuits, --out and --transfer take one run; with several runs each uses its own circuits folder"
            )
        runs = [checkpoints.open_run(path, device=args.device, dtype=args.dtype, base=args.base) for path in args.run]
        across = api.timelines(
            runs, _spec(args), _chosen(args), _comparison(args, noise_epochs=args.noise_epochs), progress=not args.json
        )
        print(json.dumps({**across.to_dict(), "runs": args.run}, indent=1) if args.json else across.text())
        return 0
    path = args.run[0]
    html = args.out or Path(path) / "timeline.html"
    if Path(path).is_dir():
        _output(html, "file", "--out" if args.out else "", args.overwrite)
    run = checkpoints.open_run(path, device=args.device, dtype=args.dtype, base=args.base)
    tl = api.timeline(
        run,
        _spec(args),
        _chosen(args),
        _comparison(args, noise_epochs=args.noise_epochs, transfer=args.transfer),
        circuits=args.circuits,
        progress=not args.json,
        log=lambda text: _say(args, text),
    )
    out = viz.write_timeline_html(tl, html, labels=tl.labels, transfer=tl.transfer, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({**tl.to_dict(), "html": str(out)}, indent=1, default=str))
        return 0
    print(f"circuit timeline of {path}: {len(tl.fact_ids)} facts, epochs {tl.epochs}, selection {tl.selection}")
    print(tl.text())
    print(f"\nviewer: {out}")
    return 0


@command
def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    d = calibration.CalibrationSettings()
    p = sub.add_parser(
        "calibrate",
        help="measure the change test's false-positive rate, power and interval "
        "coverage at one checkpoint (nulls and planted changes)",
    )
    p.add_argument("checkpoint", metavar="RUN[:EPOCH]", help="run folder (its last epoch), RUN:EPOCH or a model folder")
    _add_facts_args(p, what=" (default: the packaged validation probes)")
    _add_noise_args(p)
    _add_device_args(p)
    _add_base_arg(p)
    p.add_argument(
        "--steps", type=positive_int, default=d.attribution.steps, help=f"EAP-IG steps (default {d.attribution.steps})"
    )
    p.add_argument(
        "--null-tests",
        type=positive_int,
        default=d.null_tests,
        metavar="K",
        help=f"disjoint null tests per fact (2 R K replicates of the checkpoint; default {d.null_tests})",
    )
    p.add_argument(
        "--plant",
        choices=["mlp", "head"],
        default=d.plant,
        help="component whose output is scaled in the planted changes (the one carrying most of the "
        "facts' circuits; default mlp)",
    )
    p.add_argument(
        "--strengths",
        type=strength_list,
        default=d.strengths,
        help="planted strengths s, output x (1 - s), comma-separated in (0, 1] (default 0.1,0.3,1)",
    )
    p.add_argument(
        "--select",
        type=selection_spec,
        default=d.selection,
        help=f"circuits whose size the edge-set distance uses (default {d.selection})",
    )
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="facts per attribution batch")
    p.add_argument("--circuits", help="folder caching the replicates (default: RUN/circuits)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_run_calibrate)


def strength_list(text: str) -> tuple[float, ...]:
    """Comma-separated planted strengths in (0, 1]."""
    values = tuple(probability(x) for x in text.split(",") if x.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"needs at least one strength in (0, 1], got {text!r}")
    return values


def _run_calibrate(args: argparse.Namespace) -> int:
    settings = calibration.CalibrationSettings(
        AttributionSettings(steps=args.steps),
        family=args.family,
        replicates=args.replicates,
        null_tests=args.null_tests,
        plant=args.plant,
        strengths=args.strengths,
        selection=args.select,
        batch_size=args.batch_size,
        seed=args.sample_seed,
    )
    if args.out:
        _output(args.out, "file", "--out", overwrite=True)
    run, epoch = checkpoints.resolve(args.checkpoint, device=args.device, dtype=args.dtype, base=args.base)
    spec = _spec(args, packaged=True)
    assert spec is not None
    cal = calibrate.calibrate(
        run,
        epoch,
        spec.load(run.tokenizer()),
        settings,
        folder=args.circuits,
        progress=not args.json,
        log=None if args.json else print,
    )
    if args.out:
        calibration.write_calibration(cal, args.out)
    print(json.dumps(cal.to_dict(), indent=1, default=str) if args.json else "\n".join(cal.summary()))
    return 0


@command
def _add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="the circuit viewer for a circuit file")
    p.add_argument("file", metavar="CIRCUIT_FILE", help="a circuit .safetensors file")
    p.add_argument("--probes", help="probe file (labels the facts with their questions)")
    p.add_argument("--fact", action="append", help="show only this fact id (repeatable)")
    p.add_argument("--out", help="HTML file to write (default: CIRCUIT_FILE with .html)")
    p.add_argument("--overwrite", action="store_true", help="replace a file at --out that is not a circuitdyn viewer")
    p.set_defaults(func=_run_view)


def _run_view(args: argparse.Namespace) -> int:
    cs, out = api.view_circuits(args.file, args.out, probes=args.probes, fact_ids=args.fact, overwrite=args.overwrite)
    print(f"{cs}\nviewer: {out}")
    return 0


def export_selection(text: str) -> str:
    """`all` (every edge) or a selection rule that needs no model (`top:N`, `paths:N`, `abs:T`)."""
    if text.strip() == "all":
        return "all"
    try:
        export.parse_selection(text)
    except CircuitdynError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


@command
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="a circuit file as graph JSON, GraphML or CSV edge rows (for networkx and other tools)",
        description="Write one fact's circuit as graph JSON (networkx node-link form, schema "
        "circuitdyn/schemas/graph.schema.json) or GraphML, or the edge scores of one or all facts as CSV "
        "(fact_id,source,target,port,score[,in_circuit]).",
    )
    p.add_argument("file", metavar="CIRCUIT_FILE", help="a circuit .safetensors file")
    p.add_argument("--format", choices=FORMATS, help="json | graphml | csv (default: from the --out suffix)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--fact", help="the fact id to export (json/graphml: needed unless the file holds one fact)")
    which.add_argument("--all", action="store_true", help="every fact of the file (csv only; csv's default)")
    p.add_argument(
        "--select",
        type=export_selection,
        help=f"which edges: top:N, paths:N, abs:T or all (default {EXPORT_SELECTION} for json and "
        "graphml, all for csv; faith:/pruned: need a model: use the Python API with masks)",
    )
    p.add_argument(
        "--all-edges",
        action="store_true",
        help="with --select, write every edge flagged by in_circuit instead of only the circuit's",
    )
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    done = export.export_file(
        args.file,
        args.out,
        args.format,
        fact_id=args.fact,
        all_facts=args.all,
        selection=args.select,
        circuit_only=not args.all_edges,
        overwrite=args.overwrite,
    )
    print(done.text())
    return 0


@command
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded SmolLM2-135M-Instruct: CPT, probes and circuits every epoch, viewers",
        description="Continually pre-train the embedded default model on a few seed entities with probes every "
        "epoch, extract a seeded sample of their probe facts' circuits at every epoch (sized to faithfulness "
        "0.8), measure method noise at every epoch (5 replicates) and test every transition against it, then "
        "print what the numbers support and write (HTML) the timeline, the transfer matrix and the diff of the "
        "first and last epochs. A second run reuses all finished work.",
    )
    p.add_argument("--out", default="circuitdyn-demo", help="output folder (default ./circuitdyn-demo)")
    p.add_argument("--entities", type=positive_int, default=4, help="seed entities to train on (default 4)")
    p.add_argument("--epochs", type=positive_int, default=5, help="CPT epochs (default 5)")
    p.add_argument(
        "--lr",
        type=positive_float,
        default=1e-3,
        help="LoRA learning rate (default 1e-3: the 135M default model needs it to learn and forget facts)",
    )
    p.add_argument(
        "--facts-per-entity",
        type=positive_int,
        default=3,
        help="probe facts per entity to attribute: a seeded sample, chosen before training (default 3)",
    )
    p.add_argument(
        "--pick",
        default="sample",
        choices=["sample", "post-hoc"],
        help="sample (default): facts chosen before outcomes; post-hoc: those whose recall flipped most "
        "(exploratory, labelled so)",
    )
    p.add_argument("--method", default="eap-ig", choices=["eap", "eap-ig"])
    p.add_argument("--steps", type=positive_int, default=3, help="EAP-IG steps (default 3; the paper used 30)")
    p.add_argument(
        "--ig-grid",
        default=DEFAULT_IG_GRID,
        choices=IG_GRIDS,
        help=f"quadrature of the IG path integral (default {DEFAULT_IG_GRID}; right = circuitdyn's grid before)",
    )
    p.add_argument(
        "--select", type=selection_spec, default=DEFAULT_SELECTION, help="how circuits are chosen (default faith:0.8)"
    )
    p.add_argument(
        "--no-transfer",
        action="store_true",
        help="skip evaluating every epoch's circuit on every epoch's model (saves about 3 minutes)",
    )
    p.add_argument("--base-model", help="start from this checkpoint instead of the embedded SmolLM2")
    _add_device_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    cfg = demo.demo_config(
        args.entities, args.epochs, args.lr, base_model=args.base_model, device=args.device, dtype=args.dtype
    )
    comparison = demo.DEMO_COMPARISON.replace(selection=args.select, transfer=not args.no_transfer)
    r = demo.run_demo(
        args.out,
        AttributionSettings(args.method, args.steps, args.ig_grid),
        cpt=cfg,
        facts_per_entity=args.facts_per_entity,
        pick=args.pick,
        comparison=comparison,
        progress=not args.no_progress,
    )
    print(r.text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitdyn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the option at fault (or --help)
        return int(exc.code or 0)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CircuitdynWarning):  # from code not yet on messages.warn: shown the same way
            messages.warn(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        with messages.command(args.command):  # notices print `circuitdyn CMD: warning: ...`, once each
            return int(args.func(args) or 0)
    except CircuitdynError as err:
        print(f"circuitdyn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an OS failure not met where the file is named (full disk, lost folder ...)
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"circuitdyn {args.command}: error: {where}{err.strerror or err}; finished results are kept "
            "(every file is written atomically), re-run to resume",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"circuitdyn {args.command}: interrupted; finished work is kept, re-run to resume.", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())

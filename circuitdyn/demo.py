"""The whole pipeline on the embedded default: CPT with probes every epoch, per-fact circuits every epoch,
then the timeline and the diff of the first and last epochs, as data and as HTML viewers.

Every stage resumes: a second run reuses the finished epochs, circuit files and probe results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pandas as pd

from circuitdyn.errors import CircuitdynError


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and the objects behind them (for notebooks)."""

    out_dir: Path
    run_dir: Path
    probes_file: Path
    timeline_html: Path
    diff_html: Path
    circuit_html: Path
    dynamics: Any
    timeline: Any
    diff: Any
    noise_floor: pd.Series | None
    """Per-fact score noise (EAP-IG only) below which a change does not count."""
    transfer: pd.DataFrame | None
    """`diff.transfer_matrix` table (None when not asked for)."""
    wall_s: float
    stage_s: dict[str, float] = field(default_factory=dict)


def pick_facts(probes: list[Any], per_entity: int, outcomes: pd.DataFrame | None = None) -> list[Any]:
    """`per_entity` probes of each entity, deterministic.

    With `outcomes` (fact_id, epoch, correct per epoch, e.g. `outcomes_from_dynamics`), an entity's probes
    are taken in order of how often their recall flipped across epochs, then of how many epochs they were
    recalled, then probe-file order: the facts that were acquired or forgotten, whose circuits the
    stay-put question is about, come first. Without it, probe-file order.
    """
    rank: dict[str, tuple[int, int]] = {}
    if outcomes is not None:
        for fact_id, df in outcomes.sort_values("epoch").groupby("fact_id"):
            correct = df["correct"].astype(bool).to_numpy()
            rank[str(fact_id)] = (-int((correct[1:] != correct[:-1]).sum()), -int(correct.sum()))
    order = sorted(range(len(probes)), key=lambda i: (rank.get(probes[i].id, (0, 0)), i))
    taken: dict[str, int] = {}
    chosen = []
    for i in order:
        entity = probes[i].entity
        if taken.get(entity, 0) < per_entity:
            taken[entity] = taken.get(entity, 0) + 1
            chosen.append(i)
    return [probes[i] for i in sorted(chosen)]


def run_demo(
    out_dir: str | Path = "circuitdyn-demo",
    *,
    n_entities: int = 4,
    epochs: int = 5,
    lr: float = 1e-3,
    facts_per_entity: int = 2,
    method: str = "eap-ig",
    steps: int = 3,
    top_n: int = 200,
    transfer: bool = True,
    base_model: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """CPT `n_entities` seed entities for `epochs` epochs (LoRA at `lr`), extract circuits of
    `facts_per_entity` probes per entity at every epoch, and write the timeline, diff and circuit viewers
    under `out_dir`. With `transfer`, every epoch's circuit is also evaluated on every epoch's model
    (`diff.transfer_matrix`: does an old pathway still carry the fact?), cached in `transfer.json`.

    The default lr (1e-3, ten times `circuitdyn cpt`'s) is what makes the 135M default model acquire and
    forget single facts within 5 epochs of 4 short documents; at 1e-4 no probe's recall changes, and the
    stay-put question has nothing to compare. The attributed facts are those whose recall changed most
    (`pick_facts`), chosen after CPT from the probe results.
    """
    from circuitdyn.attribution import check_method, steps_taken
    from circuitdyn.checkpoints import open_run
    from circuitdyn.circuits import CircuitSet
    from circuitdyn.cpt import CPTConfig, resolve_inputs, run_cpt
    from circuitdyn.diff import diff_circuits, noise_floor
    from circuitdyn.extraction import extract_run, run_evaluator
    from circuitdyn.facts import FactSet
    from circuitdyn.probes import build_fact_prompts, corruption_counts, load_probes, write_probes_jsonl
    from circuitdyn.timeline import load_run_timeline, outcomes_from_dynamics
    from circuitdyn.transfer import transfer_matrix
    from circuitdyn.viz import write_circuit_html, write_diff_html, write_timeline_html

    if facts_per_entity < 1:
        raise CircuitdynError(f"facts_per_entity must be >= 1, got {facts_per_entity}")
    check_method(method)
    steps = steps_taken(method, steps)
    say = log or (lambda _m: None)
    out = Path(out_dir)
    t0 = time.perf_counter()
    stage: dict[str, float] = {}

    cfg = CPTConfig(base_model=base_model, n_entities=n_entities, epochs=epochs, lr=lr)
    say(f"[1/3] continual pre-training: {n_entities} seed entities, {epochs} epochs at lr {lr:g}, probes every epoch")
    cpt = run_cpt(cfg, out / "run", progress=progress, log=log)
    stage["cpt"] = time.perf_counter() - t0

    t = time.perf_counter()
    _, probes = resolve_inputs(cfg)
    chosen = pick_facts(probes, facts_per_entity, outcomes_from_dynamics(cpt.dynamics))
    probes_file = write_probes_jsonl(chosen, out / "probes.jsonl")
    run = open_run(cpt.run_dir)
    # Corrupt by swapping in another seed entity of the same token length: the whole probe set is the pool.
    facts = FactSet(tuple(build_fact_prompts(chosen, run.tokenizer(), pool=load_probes(cfg.probes))), tuple(chosen),
                    str(probes_file))
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(corruption_counts(facts).items()))
    say(f"[2/3] per-fact circuits: {len(facts)} facts ({kinds}), {method} with {steps} steps, epochs {run.epochs}")
    extracted = extract_run(
        run, facts, run.path / "circuits", run.epochs, method=method, steps=steps, top_n=top_n, progress=progress
    )
    noise = None
    if method == "eap-ig":
        # How much scores move with no training at all: epoch 0 re-attributed with other IG step counts.
        repeat = extract_run(run, facts, out / "noise-floor", run.epochs[:1], method=method, steps=steps + 2,
                             top_n=top_n, progress=progress)[0]
        noise = noise_floor([CircuitSet.load(extracted[0].path), CircuitSet.load(repeat.path)])
        say(f"      noise floor (epoch {run.epochs[0]}, {steps} vs {steps + 2} IG steps): per-fact median "
            f"{noise.median():.3g}; an edge counts as changed only above its fact's floor")
    stage["circuits"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[3/3] timeline, diff and viewers")
    labels = {p.id: f"{p.entity}: {p.question}" for p in chosen}
    timeline = load_run_timeline(run, facts, selection=f"top:{top_n}", method=method, steps=steps, noise=noise)
    table = None
    if transfer:
        say(f"      circuit transfer: each epoch's top-{top_n} circuit on each epoch's model")
        tt = time.perf_counter()
        table = transfer_matrix(timeline.circuits, run_evaluator(run, facts), timeline.selection,
                                selected=timeline.fact_masks, cache=out / "transfer.json", progress=progress)
        stage["transfer"] = time.perf_counter() - tt
    timeline_html = write_timeline_html(timeline, out / "timeline.html", labels=labels, transfer=table)
    first, last = timeline.epochs[0], timeline.epochs[-1]
    a, b = timeline.circuits[first], timeline.circuits[last]
    diff = diff_circuits(a, b, timeline.selection, noise=noise, labels=(f"epoch {first}", f"epoch {last}"))
    diff_html = write_diff_html(diff, out / "diff.html", labels=labels)
    circuit_html = write_circuit_html(b, out / f"circuit_epoch_{last}.html", labels=labels)
    stage["analysis"] = time.perf_counter() - t - stage.get("transfer", 0.0)
    return DemoResult(
        out, run.path, probes_file, timeline_html, diff_html, circuit_html, cpt.dynamics, timeline, diff, noise,
        table, time.perf_counter() - t0, stage,
    )

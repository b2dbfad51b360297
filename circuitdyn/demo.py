"""The whole pipeline on the embedded default: CPT with probes every epoch, per-fact circuits every epoch,
then the timeline and the diff of the first and last epochs, as data and as HTML viewers.

Every stage resumes: a second run reuses the finished epochs, circuit files and probe results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    wall_s: float
    stage_s: dict[str, float] = field(default_factory=dict)


def pick_facts(probes: list[Any], per_entity: int) -> list[Any]:
    """The first `per_entity` probes of each entity, in probe-file order (deterministic)."""
    taken: dict[str, int] = {}
    chosen = []
    for p in probes:
        if taken.get(p.entity, 0) < per_entity:
            taken[p.entity] = taken.get(p.entity, 0) + 1
            chosen.append(p)
    return chosen


def run_demo(
    out_dir: str | Path = "circuitdyn-demo",
    *,
    n_entities: int = 4,
    epochs: int = 3,
    facts_per_entity: int = 2,
    method: str = "eap-ig",
    steps: int = 3,
    top_n: int = 200,
    base_model: str | None = None,
    progress: bool = True,
    log: Any = print,
) -> DemoResult:
    """CPT `n_entities` seed entities for `epochs` epochs, extract circuits of `facts_per_entity` probes
    per entity at every epoch, and write the timeline, diff and circuit viewers under `out_dir`."""
    from circuitdyn.attribution import extract_run
    from circuitdyn.checkpoints import open_run
    from circuitdyn.circuits import CircuitSet
    from circuitdyn.cpt import CPTConfig, resolve_inputs, run_cpt
    from circuitdyn.diff import diff_circuits
    from circuitdyn.probes import build_fact_prompts, corruption_counts, load_probes, write_probes_jsonl
    from circuitdyn.timeline import load_run_timeline
    from circuitdyn.viz import write_circuit_html, write_diff_html, write_timeline_html

    if facts_per_entity < 1:
        raise CircuitdynError(f"facts_per_entity must be >= 1, got {facts_per_entity}")
    out = Path(out_dir)
    t0 = time.perf_counter()
    stage: dict[str, float] = {}

    cfg = CPTConfig(base_model=base_model, n_entities=n_entities, epochs=epochs)
    log(f"[1/3] continual pre-training: {n_entities} seed entities, {epochs} epochs, probes every epoch")
    cpt = run_cpt(cfg, out / "run", progress=progress, log=log)
    stage["cpt"] = time.perf_counter() - t0

    t = time.perf_counter()
    _, probes = resolve_inputs(cfg)
    chosen = pick_facts(probes, facts_per_entity)
    probes_file = write_probes_jsonl(chosen, out / "probes.jsonl")
    run = open_run(cpt.run_dir)
    # Corrupt by swapping in another seed entity of the same token length: the whole probe set is the pool.
    facts = build_fact_prompts(chosen, run.tokenizer(), pool=load_probes(cfg.probes))
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(corruption_counts(facts).items()))
    log(f"[2/3] per-fact circuits: {len(facts)} facts ({kinds}), {method} with {steps} steps, epochs {run.epochs}")
    extracted = extract_run(
        run, facts, run.path / "circuits", run.epochs, method=method, steps=steps, top_n=top_n, progress=progress
    )
    stage["circuits"] = time.perf_counter() - t

    t = time.perf_counter()
    log("[3/3] timeline, diff and viewers")
    labels = {p.id: f"{p.entity}: {p.question}" for p in chosen}
    timeline = load_run_timeline(run.path, selection=f"top:{top_n}", method=method, ig_steps=steps)
    timeline_html = write_timeline_html(timeline, out / "timeline.html", labels=labels)
    first, last = extracted[0], extracted[-1]
    a, b = CircuitSet.load(first.path), CircuitSet.load(last.path)
    diff = diff_circuits(a, b, f"top:{top_n}", labels=(f"epoch {first.epoch}", f"epoch {last.epoch}"))
    diff_html = write_diff_html(diff, out / "diff.html", labels=labels)
    circuit_html = write_circuit_html(b, out / f"circuit_epoch_{last.epoch}.html", labels=labels)
    stage["analysis"] = time.perf_counter() - t
    return DemoResult(
        out, run.path, probes_file, timeline_html, diff_html, circuit_html, cpt.dynamics, timeline, diff,
        time.perf_counter() - t0, stage,
    )

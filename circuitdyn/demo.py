"""The whole pipeline on the embedded default: CPT with probes every epoch, per-fact circuits every epoch,
method noise, then the timeline, the transfer matrix and the diff of the first and last epochs, as data,
findings (`circuitdyn.analysis.report`) and HTML viewers.

Facts are chosen **before** training outcomes are seen: a fixed seeded sample of `facts_per_entity` probes
of every trained entity (`facts.load_facts(per_entity=...)`). Choosing the facts whose recall flipped
(`pick="post-hoc"`) is an explicit opt-in, and every output then labels the facts as chosen post hoc.

Every stage resumes: a second run reuses the finished epochs, circuit files, selections and probe results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from circuitdyn.engine.settings import DEFAULT_SETTINGS, AttributionSettings, Comparison
from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from circuitdyn.probes.facts import FactSet
    from circuitdyn.training.cpt import CPTConfig

Pick = Literal["sample", "post-hoc"]


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
    facts: FactSet
    """The `facts.FactSet` the circuits were extracted for."""
    timeline: Any
    diff: Any
    transfer: pd.DataFrame | None
    """`transfer.transfer_matrix` table (None when not asked for)."""
    wall_s: float
    stage_s: dict[str, float] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """The timeline's tidy table (per fact and epoch)."""
        return self.timeline.to_frame()

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(self.text())}</pre>"

    def text(self) -> str:
        """What the demo found, as `circuitdyn demo` prints it: the learning dynamics, the timeline (with the
        transfer matrix), the diff of the first and last epochs, the wall time and where everything is."""
        from circuitdyn.analysis.dynamics import format_table

        stages = ", ".join(f"{k} {v:.0f}s" for k, v in self.stage_s.items())
        entities = sorted({str(e) for e in self.facts.entity_of.values()})
        first, last = self.timeline.epochs[0], self.timeline.epochs[-1]
        run = self.run_dir
        return "\n".join(
            [
                "",
                "== what CPT taught: entities learned (mean ROUGE-1 recall >= threshold), loss and OOD skill per epoch",
                format_table(self.dynamics),
                "",
                f"== how the facts' circuits moved across epochs ({self.timeline.selection})",
                self.timeline.text(),
                "",
                f"== circuit diff {self.diff.label_a} -> {self.diff.label_b}",
                self.diff.text(),
                "",
                f"wall time {self.wall_s:.0f}s ({stages})",
                f"run (checkpoints, probe results, circuits): {self.run_dir}",
                f"probes: {self.probes_file}",
                f"viewers: {self.timeline_html}\n         {self.diff_html}\n         {self.circuit_html}",
                f"facts: {len(self.facts.ids)} ({len(entities)} trained entities: {', '.join(entities)}), "
                f"recorded in the run: commands and notebooks reuse its circuits",
                "",
                "== explore (each reuses the circuits above: seconds, not minutes)",
                f"  circuitdyn diff {run}:{first} {run}:{last} --out diff.html",
                f"  circuitdyn timeline {run} --out timeline.html",
                f"  circuitdyn dynamics {run} --stop",
                f"  python -c \"import circuitdyn as cd; print(cd.diff('{run}:{first}', '{run}:{last}').text())\"",
            ]
        )


def pick_facts(probes: list[Any], per_entity: int, outcomes: pd.DataFrame) -> list[Any]:
    """Post hoc choice (opt-in): `per_entity` probes of each entity in order of how often their recall flipped
    across epochs, then of how many epochs they were recalled, then probe-file order. Results about facts
    chosen this way are exploratory: the choice looked at the outcome."""
    rank: dict[str, tuple[int, int]] = {}
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


DEMO_COMPARISON = Comparison(noise_epochs="all", transfer=True)
"""The demo's comparison: `faith:0.8` circuits, 5 replicates at every epoch, and the transfer matrix."""


def demo_config(n_entities: int = 4, epochs: int = 5, lr: float = 1e-3, **fields: Any) -> CPTConfig:
    """The demo's CPT: LoRA on `n_entities` seed entities for `epochs` epochs at `lr` (other `cpt.CPTConfig`
    fields as given, e.g. `base_model`, `device`, `dtype`).

    The default lr (1e-3, ten times `circuitdyn cpt`'s) is what makes the 135M default model acquire and
    forget single facts within 5 epochs of 4 short documents; at 1e-4 no probe's recall changes."""
    from circuitdyn.training.cpt import CPTConfig

    return CPTConfig(n_entities=n_entities, epochs=epochs, lr=lr, **fields)


def run_demo(
    out_dir: str | Path = "circuitdyn-demo",
    settings: AttributionSettings | None = None,
    *,
    cpt: CPTConfig | None = None,
    facts_per_entity: int = 3,
    pick: Pick = "sample",
    comparison: Comparison | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """CPT (`cpt`, default `demo_config()`: 4 seed entities, 5 epochs, LoRA at lr 1e-3), extract circuits of
    `facts_per_entity` probes per entity at every epoch with `settings` (default `DEFAULT_SETTINGS`), measure
    method noise and compare as `comparison` says (default `DEMO_COMPARISON`), and write the timeline, diff and
    circuit viewers under `out_dir`. With `comparison.transfer`, every epoch's circuit is also evaluated on every
    epoch's model (`transfer.transfer_matrix`: does an old pathway still carry the fact?), cached in
    `transfer.json`.

    `pick="sample"` (default) takes a seeded sample of each entity's probes before looking at outcomes;
    `pick="post-hoc"` takes those whose recall flipped most (exploratory, labelled so).
    """
    from circuitdyn.analysis.diff import diff_circuits
    from circuitdyn.analysis.timeline import outcomes_from_dynamics
    from circuitdyn.analysis.transfer import transfer_matrix
    from circuitdyn.io import check_writable
    from circuitdyn.pipeline.compare import load_run_timeline
    from circuitdyn.pipeline.extraction import run_evaluator
    from circuitdyn.pipeline.plan import timeline_plan
    from circuitdyn.probes.facts import load_facts
    from circuitdyn.probes.probes import corruption_summary, load_probes, write_probes_jsonl
    from circuitdyn.runs.checkpoints import circuits_dir, open_run
    from circuitdyn.training.cpt import resolve_inputs, run_cpt
    from circuitdyn.viz import write_circuit_html, write_diff_html, write_timeline_html

    s = settings or DEFAULT_SETTINGS
    cmp = comparison or DEMO_COMPARISON
    cfg = cpt or demo_config()
    if facts_per_entity < 1:
        raise CircuitdynError(f"facts_per_entity must be >= 1, got {facts_per_entity}")
    if pick not in ("sample", "post-hoc"):
        raise CircuitdynError(f"pick must be 'sample' or 'post-hoc', got {pick!r}")
    say = log or (lambda _m: None)
    out = check_writable(out_dir, "folder")
    t0 = time.perf_counter()
    stage: dict[str, float] = {}

    say(
        f"[1/3] continual pre-training: {cfg.n_entities} seed entities, {cfg.epochs} epochs at lr {cfg.lr:g}, "
        "probes every epoch"
    )
    trained_run = run_cpt(cfg, out / "run", progress=progress, log=log)
    stage["cpt"] = time.perf_counter() - t0

    t = time.perf_counter()
    _, probes = resolve_inputs(cfg)
    trained = list(dict.fromkeys(p.entity for p in probes))
    # The swap pool is the whole probe set (more partners of the same token length); facts are the trained
    # entities'. `circuitdyn timeline RUN --probes probes.jsonl --entities ... --per-entity N` rebuilds them.
    probes_file = write_probes_jsonl(load_probes(cfg.probes, rephrased=False), out / "probes.jsonl")
    run = open_run(trained_run.run_dir, device=cfg.device, dtype=cfg.dtype)
    if pick == "sample":
        facts = load_facts(probes_file, run.tokenizer(), entities=trained, per_entity=facts_per_entity)
        choice = f"seeded sample of {facts_per_entity} probes per entity, chosen before outcomes"
    else:
        chosen = [p.id for p in pick_facts(probes, facts_per_entity, outcomes_from_dynamics(trained_run.dynamics))]
        facts = load_facts(probes_file, run.tokenizer(), ids=chosen)
        choice = "post hoc: the probes whose recall flipped most"
    kinds = corruption_summary(facts)
    say(
        f"[2/3] per-fact circuits: {len(facts)} facts ({kinds}; {choice}), {s.method} with {s.steps} steps "
        f"({s.ig_grid} rule), "
        f"epochs {run.epochs}; {cmp.replicates} method-noise replicates at every epoch; circuits {cmp.selection}"
    )
    say("      " + timeline_plan(run, facts, circuits_dir(run), s, cmp).line())
    timeline = load_run_timeline(run, facts, s, cmp.replace(transfer=False), fact_choice=choice, progress=progress)
    stage["circuits"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[3/3] timeline, transfer, diff and viewers")
    table = None
    if cmp.transfer:
        say("      circuit transfer: each epoch's circuits on each epoch's model")
        tt = time.perf_counter()
        table = transfer_matrix(
            timeline.circuits,
            run_evaluator(run, facts),
            timeline.selection,
            selected=timeline.fact_masks,
            cache=out / "transfer.json",
            progress=progress,
        )
        timeline.transfer = table
        stage["transfer"] = time.perf_counter() - tt
    timeline_html = write_timeline_html(timeline, out / "timeline.html", labels=facts.labels, transfer=table)
    first, last = timeline.epochs[0], timeline.epochs[-1]
    a, b = timeline.circuits[first], timeline.circuits[last]
    diff = diff_circuits(
        a,
        b,
        timeline.selection,
        noise=timeline.noise,
        labels=(f"epoch {first}", f"epoch {last}"),
        selected=(
            (timeline.fact_masks[first], timeline.reached.get(first)),
            (timeline.fact_masks[last], timeline.reached.get(last)),
        ),
        entity_of=facts.entity_of,
        noise_keys=(first, last),
    )
    diff.labels = facts.labels
    diff_html = write_diff_html(diff, out / "diff.html", labels=facts.labels)
    circuit_html = write_circuit_html(
        b,
        out / f"circuit_epoch_{last}.html",
        labels=facts.labels,
        masks=timeline.fact_masks[last],
        selection=str(timeline.selection),
    )
    stage["analysis"] = time.perf_counter() - t - stage.get("transfer", 0.0)
    return DemoResult(
        out,
        run.path,
        probes_file,
        timeline_html,
        diff_html,
        circuit_html,
        trained_run.dynamics,
        facts,
        timeline,
        diff,
        table,
        time.perf_counter() - t0,
        stage,
    )

"""Comparisons that open runs: a diff of two checkpoints, and a run's timeline over its epochs.

Both take the facts and settings as values, extract (or reuse) each checkpoint's circuits
(`extraction.extract_run`), choose circuits that are evaluated on their model (`extraction.select_circuits`),
draw method-noise replicates (`replicates.measure_replicates`), and hand everything to the pure comparisons:
`diff.diff_circuits` and `timeline.build_timeline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from circuitdyn.analysis.diff import CircuitDiff, Picked, check_facts_match, diff_circuits
from circuitdyn.analysis.timeline import (
    Timeline,
    build_timeline,
    epochs_from_dynamics,
    noise_epochs,
    outcomes_from_dynamics,
)
from circuitdyn.engine.circuits import CircuitSet, find_circuits
from circuitdyn.engine.settings import DEFAULT_SETTINGS, AttributionSettings, Comparison
from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from circuitdyn.probes.facts import FactSet, FactSpec
    from circuitdyn.runs.checkpoints import Run


@dataclass(frozen=True)
class Side:
    """One side of a diff of checkpoints: a checkpoint of a run (`run`, `epoch`), or a circuit file (`file`);
    `spec` is how it was named (`RUN:EPOCH`, a model folder, a `.safetensors` file), its label."""

    spec: str
    run: Run | None = None
    epoch: int | None = None

    @property
    def file(self) -> Path | None:
        return Path(self.spec) if self.run is None else None

    @property
    def label(self) -> str:
        return short_label(self.spec)

    @classmethod
    def open(
        cls, spec: str | Path, *, device: str = "cpu", dtype: str = "float32", base: str | Path | None = None
    ) -> Side:
        """A circuit file (`.safetensors`) as it is, else the run and epoch `checkpoints.resolve` finds (`RUN:EPOCH`,
        `RUN:step=STEP`, a run or model folder: its last epoch), opened with `device`, `dtype` and `base`."""
        from circuitdyn.runs.checkpoints import resolve

        if str(spec).endswith(".safetensors"):
            return cls(str(spec))
        run, epoch = resolve(str(spec), device=device, dtype=dtype, base=base)
        return cls(str(spec), run, epoch)


def diff_checkpoints(
    a: Side,
    b: Side,
    facts: FactSpec | None = None,
    settings: AttributionSettings | None = None,
    comparison: Comparison | None = None,
    *,
    circuits_dir: str | Path | None = None,
    fact_ids: list[str] | None = None,
    where: dict[str, Any] | None = None,
    progress: bool = False,
) -> CircuitDiff:
    """`diff_circuits` of two checkpoints or circuit files (`Side.open`), circuits chosen and changes tested as
    `comparison` says (default `Comparison()`: `faith:0.8` circuits, 5 replicates per checkpoint).

    With `facts` (a `facts.FactSpec`, tokenized by each side's run), the circuits are computed on each checkpoint
    with `settings` (default `DEFAULT_SETTINGS`), or reused from `circuits_dir` (default
    `checkpoints.circuits_dir`) when cached with the same settings; without, the cached circuits matching `where`
    (`settings.settings_filter`) are read. Rules that evaluate circuits (`faith:`, the default) need checkpoints
    and facts. With checkpoints, facts and method noise (`comparison.replicates`), that many draws of the
    replicate family are extracted at each checkpoint (`replicates.measure_replicates`) and every change is tested
    against them (`CircuitDiff.test`).
    """
    from circuitdyn.analysis.noise import merge_noise, run_draws
    from circuitdyn.pipeline.extraction import checkpoint_circuits, heldout_faithfulness, select_circuits
    from circuitdyn.pipeline.replicates import measure_replicates
    from circuitdyn.probes.probes import load_probes
    from circuitdyn.runs.checkpoints import architecture_difference
    from circuitdyn.runs.checkpoints import circuits_dir as default_dir

    cmp = comparison or Comparison()
    sel = cmp.selection
    s = settings or DEFAULT_SETTINGS
    if a.run is not None and b.run is not None and a.epoch is not None and b.epoch is not None:
        why = architecture_difference(a.run.checkpoint(a.epoch), b.run.checkpoint(b.epoch))
        if why:
            raise CircuitdynError(f"{a.spec} and {b.spec} cannot be compared: {why}")
    sides: list[tuple[CircuitSet, Run | None, int | None, FactSet | None]] = []
    labels: dict[str, str] = {}
    entity_of: dict[str, str] = {}
    for side in (a, b):
        if side.run is None or side.epoch is None:
            if sel.needs_model:
                raise CircuitdynError(
                    f"selection {sel} evaluates circuits on their model: give checkpoints, not "
                    f"the circuit file {side.spec} (or choose --select top:N)"
                )
            cs = CircuitSet.load(side.spec)
            if facts is not None:
                file_probes = load_probes(facts.probes, rephrased=facts.rephrased)
                labels = {p.id: f"{p.entity}: {p.question}" for p in file_probes}
                entity_of = {p.id: p.entity for p in file_probes}
                check_facts_match(cs, labels, facts.probes, side.spec)
            sides.append((cs, None, None, None))
            continue
        run, epoch = side.run, side.epoch
        fs = None
        if facts is not None:
            fs = facts.load(run.tokenizer())
            labels, entity_of = fs.labels, fs.entity_of
        elif sel.needs_model:
            raise CircuitdynError(f"selection {sel} evaluates circuits on their model: it needs the facts (--probes)")
        cs = checkpoint_circuits(run, epoch, fs, settings, folder=circuits_dir, where=where, progress=progress)
        if fs is not None:
            check_facts_match(cs, fs.labels, facts.probes if facts is not None else None, side.spec)
        sides.append((cs, run, epoch, fs))
    (ca, _, epoch_a, facts_a), (cb, _, epoch_b, facts_b) = sides
    ids = list(fact_ids or ca.fact_ids)
    selected: tuple[Picked, Picked] | None = None
    heldout: tuple[Tensor, Tensor] | None = None
    if sel.needs_model:  # both sides are checkpoints with facts: anything else was refused above
        on_model = [(cs, r, e, fs) for cs, r, e, fs in sides if r is not None and e is not None and fs is not None]
        picks: list[Picked] = []
        for cs, r, e, fs in on_model:  # B's search starts from A's sizes
            guess = dict(zip(ids, picks[0][0].sum(1).tolist())) if picks else None
            folder = circuits_dir or default_dir(r)
            picks.append(
                select_circuits(r, e, cs.subset(ids), sel, fs, cache_dir=folder, guess=guess, progress=progress)
            )
        selected = (picks[0], picks[1])
        if sel.rule == "pruned":
            held_a, held_b = (
                heldout_faithfulness(r, e, cs.subset(ids), pick[0], fs)
                for (cs, r, e, fs), pick in zip(on_model, selected)
            )
            heldout = (held_a, held_b)
    noise = None
    if cmp.replicates is not None and facts_a is not None and facts_b is not None:
        masks = (
            [p[0] for p in selected]
            if selected
            else [sel.select(cs.subset(ids).scores, cs.graph)[0] for cs, *_ in sides]
        )
        parts = []
        checkpoints = [(r, e, fs) for _, r, e, fs in sides if r is not None and e is not None and fs is not None]
        for k, ((side_run, side_epoch, side_facts), m) in enumerate(zip(checkpoints, masks)):
            # side B draws from side A's stream only when it is another checkpoint of the same run: then the two
            # sides' draws are disjoint slices of one stream; otherwise from another stream, never A's draws
            shared = k == 0 or (checkpoints[1][0].path == checkpoints[0][0].path and epoch_b != epoch_a)
            draws = run_draws(side_run, [side_epoch], cmp.family, cmp.replicates, s.seed if shared else s.seed + 1)
            size = dict(zip(ids, m.sum(1).tolist()))
            sizes = torch.tensor([size.get(f, int(np.median(list(size.values())))) for f in side_facts.ids])
            parts.append(
                measure_replicates(
                    side_run,
                    side_facts,
                    draws,
                    {side_epoch: sizes},
                    sel,
                    s,
                    folder=circuits_dir or default_dir(side_run),
                    progress=progress,
                )
            )
        noise = merge_noise(parts)
    d = diff_circuits(
        ca, cb, sel, noise=noise, fact_ids=ids, labels=(a.label, b.label), selected=selected, entity_of=entity_of
    )
    d.labels = dict(labels)
    d.heldout = heldout
    return d


def short_label(spec: str) -> str:
    """A short label for a checkpoint spec: `run:3` for `path/to/run:3`, the folder or file name otherwise."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and tail.isdigit() and not Path(spec).exists():
        return f"{Path(head).name}:{tail}"
    return Path(spec).name or str(spec)


def load_run_timeline(
    run: Run | str | Path,
    facts: FactSet | None = None,
    settings: AttributionSettings | None = None,
    comparison: Comparison | None = None,
    *,
    circuits_dir: str | Path | None = None,
    where: dict[str, Any] | None = None,
    fact_choice: str = "given",
    progress: bool = False,
) -> Timeline:
    """The timeline of a run (a `checkpoints.Run` or its folder) over every epoch, circuits chosen and changes
    tested as `comparison` says (default `Comparison()`).

    With `facts` (a `circuitdyn.probes.facts.FactSet`, e.g. from `load_facts`), the circuits of exactly these
    facts are used, extracted with `settings` (default `DEFAULT_SETTINGS`) where missing and reused where
    `circuits_dir` (default `checkpoints.circuits_dir(run)`) holds them; rules that evaluate circuits
    (`faith:`) do so on each epoch's model (cached). At `comparison.noise_epochs` ("all", the default: every
    transition is tested; "ends" = the first and last epoch; a list; or None) `comparison.replicates` draws of
    the replicate family are extracted (`replicates.measure_replicates`); a transition between two such epochs is
    tested against them. With `comparison.transfer`, every epoch's circuit is also evaluated on every epoch's
    model (`Timeline.transfer`, cached in the circuits folder). Without facts, the cached circuits of one
    extraction are read (`where` filters their metadata: `settings.settings_filter`; default the fields of
    `settings` when given, else seed 0) and no method noise is measured. Probe outcomes and loss come from
    `circuitdyn.analysis.dynamics` when the run has probe results. `fact_choice`: how the facts were chosen (shown).
    """
    from circuitdyn.analysis.noise import run_draws
    from circuitdyn.pipeline.extraction import extract_run, run_evaluator, select_circuits
    from circuitdyn.pipeline.replicates import measure_replicates
    from circuitdyn.probes.facts import facts_hash
    from circuitdyn.runs.checkpoints import circuits_dir as default_dir
    from circuitdyn.runs.checkpoints import open_run

    run = open_run(run) if isinstance(run, (str, Path)) else run
    cmp = comparison or Comparison()
    s = settings or DEFAULT_SETTINGS
    folder = Path(circuits_dir) if circuits_dir is not None else default_dir(run)
    sel = cmp.selection
    if sel.needs_model and facts is None:
        raise CircuitdynError(
            f"selection {sel} evaluates circuits on each epoch's model: it needs the facts (--probes)"
        )
    if cmp.transfer and facts is None:
        raise CircuitdynError("--transfer needs --probes (the facts to evaluate the circuits on)")
    chosen = noise_epochs(cmp.noise_epochs if cmp.replicates is not None else None, run.epochs)
    if facts is not None:
        extract_run(run, facts, folder, run.epochs, s, progress=progress)
        where = {**s.to_meta(), "probe_set_hash": facts_hash(facts)}
    elif where is None:
        where = settings.to_meta() if settings is not None else {"seed": 0}
    hashes = {e: run.checkpoint(e).content_hash for e in run.epochs}
    files = find_circuits(folder, run.epochs, hashes, where)
    circuits = {e: CircuitSet.load(p) for e, p in files.items()}
    outcomes = epochs_table = None
    try:
        from circuitdyn.analysis.dynamics import load_dynamics

        dyn = load_dynamics(run.path)
    except CircuitdynError:
        dyn = None
    if dyn is not None:
        epochs_table = epochs_from_dynamics(dyn)
        if dyn.probe_scores is not None:
            outcomes = outcomes_from_dynamics(dyn)
    if epochs_table is None:
        epochs_table = pd.DataFrame(
            [
                {"epoch": e, "step": run.checkpoint(e).step, "train_loss": run.checkpoint(e).train_loss}
                for e in run.epochs
            ]
        )
    selected = None
    if sel.needs_model:
        selected, guess = {}, None
        for e, cs in circuits.items():  # each epoch's search starts from the previous epoch's sizes
            selected[e] = select_circuits(run, e, cs, sel, facts, cache_dir=folder, guess=guess, progress=progress)
            guess = dict(zip(cs.fact_ids, selected[e][0].sum(1).tolist()))
    noise = None
    if facts is not None and chosen and cmp.replicates is not None:
        sizes = {}
        for e in chosen:
            masks = selected[e][0] if selected is not None else sel.select(circuits[e].scores, circuits[e].graph)[0]
            size = dict(zip(circuits[e].fact_ids, masks.sum(1).tolist()))
            sizes[e] = torch.tensor([size[f] for f in facts.ids])
        noise = measure_replicates(
            run,
            facts,
            run_draws(run, chosen, cmp.family, cmp.replicates, s.seed),
            sizes,
            sel,
            s,
            folder=folder,
            progress=progress,
        )
    entity_of = getattr(facts, "entity_of", None)
    tl = build_timeline(
        circuits,
        sel,
        outcomes=outcomes,
        epochs=epochs_table,
        noise=noise,
        selected=selected,
        entity_of=entity_of,
        fact_choice=fact_choice,
    )
    tl.labels = dict(facts.labels) if facts is not None else {}
    if cmp.transfer and facts is not None:
        from circuitdyn.analysis.transfer import transfer_matrix

        tl.transfer = transfer_matrix(
            tl.circuits,
            run_evaluator(run, facts),
            tl.selection,
            selected=tl.fact_masks,
            cache=folder / "transfer.json",
            progress=progress,
        )
    return tl

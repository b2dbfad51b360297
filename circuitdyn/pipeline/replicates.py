"""Method-noise replicates extracted on a run: each draw of `noise.draw_settings` (or `noise.run_draws`) is an
extraction with the draw's seed on the `shifted` IG grid (and, in the `question` family, its corruption
variant), cached as circuit files like any other, so a re-run resumes; `measure_replicates` describes them as
`noise.MethodNoise`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from circuitdyn.analysis.noise import REPLICATE_GRID, Draw, MethodNoise, noise_from_scores
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.selection import Selection
from circuitdyn.engine.settings import DEFAULT_SETTINGS, ONE_STEP_METHODS, AttributionSettings, Compute, Storage
from circuitdyn.errors import CircuitdynError
from circuitdyn.messages import warn
from circuitdyn.progress import progress_bar

if TYPE_CHECKING:
    from circuitdyn.probes.facts import FactSet
    from circuitdyn.runs.checkpoints import Run


def replicate_scores(
    run: Run,
    epoch: int,
    facts: FactSet,
    draws: Sequence[Draw],
    folder: str | Path,
    settings: AttributionSettings | None = None,
    *,
    compute: Compute | None = None,
    progress: bool = False,
) -> Float[Tensor, "rep fact edge"]:
    """The replicate circuits of one checkpoint, one per draw, in `facts` order: extracted with `settings`
    (default `DEFAULT_SETTINGS`) on the `shifted` grid with each draw's seed and corruption variant, or reused
    from `folder` where cached."""
    from circuitdyn.pipeline.extraction import extract_run

    s = settings or DEFAULT_SETTINGS
    out = []
    label = f"method-noise replicates, epoch {epoch}"
    for d in progress_bar(draws, desc=label, unit="replicate", disable=not progress, leave=False):
        done = extract_run(
            run,
            d.facts(facts),
            folder,
            [epoch],
            s.replace(ig_grid=REPLICATE_GRID, seed=d.seed),
            compute,
            Storage(top_n=None),
            progress=progress,
        )[0]
        cs = CircuitSet.load(done.path)
        out.append(cs.scores[[cs.index(f) for f in facts.ids]].float())
    return torch.stack(out)


def measure_replicates(
    run: Run,
    facts: FactSet,
    draws: dict[int, list[Draw]],
    sizes: dict[int, Tensor],
    selection: Selection,
    settings: AttributionSettings | None = None,
    *,
    folder: str | Path | None = None,
    compute: Compute | None = None,
    progress: bool = False,
) -> MethodNoise:
    """Extract the replicates `draws` (epoch -> draws, e.g. `run_draws`) of `run` with `settings` (cached in
    `folder`) and describe them. `sizes`: per epoch, the size of each fact's selected circuit (`facts` order)."""
    from circuitdyn.runs.checkpoints import circuits_dir

    if not draws or not any(draws.values()):
        raise CircuitdynError("method noise needs at least one checkpoint (noise epochs)")
    s = settings or DEFAULT_SETTINGS
    family = next(d for ds in draws.values() for d in ds).family
    if s.method in ONE_STEP_METHODS and family == "estimation":
        warn(
            f"{s.method} has no IG integral to re-estimate: its 'estimation' replicates differ only for "
            "noise-corrupted facts, so changes of the others cannot be told from noise (use --family question)"
        )
    folder = Path(folder) if folder is not None else circuits_dir(run)
    scores = {
        e: replicate_scores(run, e, facts, ds, folder, s, compute=compute, progress=progress) for e, ds in draws.items()
    }
    return noise_from_scores(scores, facts.ids, sizes, selection, draws, family)

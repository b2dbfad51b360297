"""What a `diff` or `timeline` will compute before it starts: the circuit files it needs and which are cached.

`timeline_plan` and `diff_plan` name every circuit file the command reads (each epoch's circuits, and the
method-noise replicates of the noise epochs), with the same settings, draws and file names the command uses
(`extraction.extraction_settings`, `noise.run_draws`, `circuits.circuit_filename`), and check with
`extraction.is_done` which of them already hold the right checkpoint's circuits. `Plan.line()` is the one line
the CLI prints, e.g. `plan: 12 facts x 6 epochs, 5 replicates per epoch: 6 of 36 circuit files cached, 30 to
compute (about 7 min at SmolLM2-135M CPU speed)`. Selections cached by `faith:` rules and the transfer matrix
are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from circuitdyn.engine.settings import AttributionSettings, Comparison
    from circuitdyn.probes.facts import FactSet
    from circuitdyn.runs.checkpoints import Run


SECONDS_PER_FACT_FILE = 1.1
"""Seconds to attribute one fact for one circuit file: SmolLM2-135M, EAP-IG midpoint 3, one CPU thread
(`benchmarks/pipeline.py`, 2026-12-03). The plan's time estimate uses it: a GPU is far faster, a larger model
slower (about in proportion to its parameters), a `faith:` search adds about two of it per fact and checkpoint."""


@dataclass
class Plan:
    """The circuit files a command needs: `files` (path -> cached?), over `n_facts` facts and `n_points`
    checkpoints (`unit`), with `replicates` method-noise replicates at `n_noise` of them."""

    n_facts: int
    n_points: int
    unit: str
    replicates: int
    n_noise: int
    files: dict[Path, bool] = field(default_factory=dict)

    @property
    def n_cached(self) -> int:
        return sum(self.files.values())

    @property
    def n_to_compute(self) -> int:
        return len(self.files) - self.n_cached

    def line(self) -> str:
        one = self.unit.rstrip("s")
        if not self.n_noise:
            noise = ", no method-noise replicates"
        elif self.n_noise == self.n_points:
            noise = f", {self.replicates} replicates per {one}"
        else:
            noise = f", {self.replicates} replicates at {self.n_noise} of the {self.unit}"
        line = (
            f"plan: {self.n_facts} facts x {self.n_points} {self.unit}{noise}: {self.n_cached} of "
            f"{len(self.files)} circuit files cached, {self.n_to_compute} to compute"
        )
        if self.n_to_compute:
            line += f" (about {self.estimate_s / 60:.0f} min at SmolLM2-135M CPU speed)"
        return line

    @property
    def estimate_s(self) -> float:
        """Seconds of attribution the files to compute take at `SECONDS_PER_FACT_FILE`."""
        return self.n_to_compute * self.n_facts * SECONDS_PER_FACT_FILE


def _cached(run: Run, epoch: int, want: dict[str, Any], folder: Path) -> tuple[Path, bool]:
    from circuitdyn.engine.circuits import circuit_filename
    from circuitdyn.pipeline.extraction import is_done

    path = folder / circuit_filename(epoch, want)
    try:
        return path, is_done(path, want, run.checkpoint(epoch).content_hash)
    except CircuitdynError:  # a file of something else is there: the command will say so; it is not cached
        return path, False


def _checkpoint_files(
    run: Run, epoch: int, facts: FactSet, folder: Path, draws: Sequence[Any], settings: AttributionSettings
) -> dict[Path, bool]:
    """The circuit file of `facts` at one checkpoint and those of its replicates `draws`."""
    from circuitdyn.analysis.noise import REPLICATE_GRID
    from circuitdyn.pipeline.extraction import extraction_settings

    arch = run.architecture
    files = dict([_cached(run, epoch, extraction_settings(arch, facts, settings), folder)])
    for d in draws:
        want = extraction_settings(arch, d.facts(facts), settings.replace(ig_grid=REPLICATE_GRID, seed=d.seed))
        path, done = _cached(run, epoch, want, folder)
        files[path] = done
    return files


def timeline_plan(
    run: Run,
    facts: FactSet,
    folder: str | Path,
    settings: AttributionSettings | None = None,
    comparison: Comparison | None = None,
) -> Plan:
    """The circuit files `compare.load_run_timeline(run, facts, settings, comparison)` reads or computes."""
    from circuitdyn.analysis.noise import run_draws
    from circuitdyn.analysis.timeline import noise_epochs
    from circuitdyn.engine.settings import DEFAULT_SETTINGS, Comparison

    s, cmp = settings or DEFAULT_SETTINGS, comparison or Comparison()
    chosen = noise_epochs(cmp.noise_epochs if cmp.replicates is not None else None, run.epochs)
    replicates = cmp.replicates or 0
    draws = run_draws(run, chosen, cmp.family, replicates, s.seed) if chosen else {}
    files: dict[Path, bool] = {}
    for e in run.epochs:
        files.update(_checkpoint_files(run, e, facts, Path(folder), draws.get(e, []), s))
    return Plan(len(facts), len(run.epochs), "epochs", replicates, len(chosen), files)


def diff_plan(
    sides: Sequence[tuple[Run, int]],
    facts: FactSet,
    folders: Sequence[str | Path],
    settings: AttributionSettings | None = None,
    comparison: Comparison | None = None,
) -> Plan:
    """The circuit files `compare.diff_checkpoints` of the checkpoints `sides` ((run, epoch) twice) reads or
    computes for `facts`, each side in its folder of `folders`."""
    from circuitdyn.analysis.noise import run_draws
    from circuitdyn.engine.settings import DEFAULT_SETTINGS, Comparison

    s, cmp = settings or DEFAULT_SETTINGS, comparison or Comparison()
    (run_a, epoch_a), (run_b, epoch_b) = sides
    files: dict[Path, bool] = {}
    for k, ((run, epoch), folder) in enumerate(zip(sides, folders)):
        draws: list[Any] = []
        if cmp.replicates is not None:  # as diff_checkpoints: side B shares side A's stream only for another epoch
            shared = k == 0 or (run_b.path == run_a.path and epoch_b != epoch_a)
            draws = run_draws(run, [epoch], cmp.family, cmp.replicates, s.seed if shared else s.seed + 1)[epoch]
        files.update(_checkpoint_files(run, epoch, facts, Path(folder), draws, s))
    return Plan(len(facts), 2, "checkpoints", cmp.replicates or 0, 2 if cmp.replicates is not None else 0, files)


def extract_plan(
    run: Run, facts: FactSet, folder: str | Path, epochs: Sequence[int], settings: AttributionSettings | None = None
) -> Plan:
    """The circuit files `extraction.extract_run(run, facts, folder, epochs, settings)` reads or computes."""
    from circuitdyn.engine.settings import DEFAULT_SETTINGS

    s = settings or DEFAULT_SETTINGS
    files: dict[Path, bool] = {}
    for e in epochs:
        files.update(_checkpoint_files(run, e, facts, Path(folder), [], s))
    return Plan(len(facts), len(epochs), "epochs", 0, 0, files)

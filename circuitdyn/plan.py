"""What a `diff` or `timeline` will compute before it starts: the circuit files it needs and which are cached.

`timeline_plan` and `diff_plan` name every circuit file the command reads (each epoch's circuits, and the
method-noise replicates of the noise epochs), with the same settings, draws and file names the command uses
(`extraction.extraction_settings`, `noise.run_draws`, `circuits.circuit_filename`), and check with
`extraction.is_done` which of them already hold the right checkpoint's circuits. `Plan.line()` is the one line
the CLI prints, e.g. `plan: 12 facts x 6 epochs, 5 replicates per epoch: 36 of 42 circuit files cached, 6 to
compute`. Selections cached by `faith:` rules and the transfer matrix are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from circuitdyn.attribution import IGGrid, Method
    from circuitdyn.checkpoints import Run
    from circuitdyn.facts import FactSet


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
        return (f"plan: {self.n_facts} facts x {self.n_points} {self.unit}{noise}: {self.n_cached} of "
                f"{len(self.files)} circuit files cached, {self.n_to_compute} to compute")


def _cached(run: Run, epoch: int, want: dict[str, Any], folder: Path) -> tuple[Path, bool]:
    from circuitdyn.circuits import circuit_filename
    from circuitdyn.extraction import is_done

    path = folder / circuit_filename(epoch, want)
    try:
        return path, is_done(path, want, run.checkpoint(epoch).content_hash)
    except CircuitdynError:  # a file of something else is there: the command will say so; it is not cached
        return path, False


def _checkpoint_files(run: Run, epoch: int, facts: FactSet, folder: Path, draws: Sequence[Any], *, method: Method,
                      steps: int, metric: str, seed: int, ig_grid: IGGrid) -> dict[Path, bool]:
    """The circuit file of `facts` at one checkpoint and those of its replicates `draws`."""
    from circuitdyn.attribution import steps_taken
    from circuitdyn.extraction import extraction_settings
    from circuitdyn.noise import REPLICATE_GRID

    arch = run.architecture
    files = dict([_cached(run, epoch, extraction_settings(arch, facts, method, steps, metric, seed, ig_grid=ig_grid),
                          folder)])
    for d in draws:
        want = extraction_settings(arch, d.facts(facts), method, steps_taken(method, steps), metric, d.seed,
                                   ig_grid=REPLICATE_GRID)
        path, done = _cached(run, epoch, want, folder)
        files[path] = done
    return files


def timeline_plan(run: Run, facts: FactSet, folder: str | Path, *, method: Method | None = None,
                  steps: int | None = None, metric: str = "answer-logprob", seed: int = 0,
                  ig_grid: IGGrid | None = None, noise_epochs: Sequence[int] | str | None = "all",
                  family: str | None = None, replicates: int | None = None) -> Plan:
    """The circuit files `timeline.load_run_timeline(run, facts, ...)` with these arguments reads or computes."""
    from circuitdyn.attribution import DEFAULT_IG_GRID, DEFAULT_IG_STEPS
    from circuitdyn.noise import DEFAULT_FAMILY, DEFAULT_REPLICATES, run_draws
    from circuitdyn.timeline import _noise_epochs

    family = family or DEFAULT_FAMILY
    replicates = replicates or DEFAULT_REPLICATES
    chosen = _noise_epochs(noise_epochs, run.epochs)
    draws = run_draws(run, chosen, family, replicates, seed) if chosen else {}
    files: dict[Path, bool] = {}
    for e in run.epochs:
        files.update(_checkpoint_files(run, e, facts, Path(folder), draws.get(e, []), method=method or "eap-ig",
                                       steps=steps or DEFAULT_IG_STEPS, metric=metric, seed=seed,
                                       ig_grid=ig_grid or DEFAULT_IG_GRID))
    return Plan(len(facts), len(run.epochs), "epochs", replicates, len(chosen), files)


def diff_plan(sides: Sequence[tuple[Run, int]], facts: FactSet, folders: Sequence[str | Path], *,
              method: Method | None = None, steps: int | None = None, metric: str = "answer-logprob", seed: int = 0,
              ig_grid: IGGrid | None = None, method_noise: bool = True, family: str | None = None,
              replicates: int | None = None) -> Plan:
    """The circuit files `diff.diff_checkpoints` of the checkpoints `sides` ((run, epoch) twice) reads or
    computes for `facts`, each side in its folder of `folders`."""
    from circuitdyn.attribution import DEFAULT_IG_GRID, DEFAULT_IG_STEPS
    from circuitdyn.noise import DEFAULT_FAMILY, DEFAULT_REPLICATES, run_draws

    family = family or DEFAULT_FAMILY
    replicates = replicates or DEFAULT_REPLICATES
    (run_a, epoch_a), (run_b, epoch_b) = sides
    files: dict[Path, bool] = {}
    for k, ((run, epoch), folder) in enumerate(zip(sides, folders)):
        draws: list[Any] = []
        if method_noise:  # as diff_checkpoints: side B shares side A's stream only for another epoch of its run
            shared = k == 0 or (run_b.path == run_a.path and epoch_b != epoch_a)
            draws = run_draws(run, [epoch], family, replicates, seed if shared else seed + 1)[epoch]
        files.update(_checkpoint_files(run, epoch, facts, Path(folder), draws, method=method or "eap-ig",
                                       steps=steps or DEFAULT_IG_STEPS, metric=metric, seed=seed,
                                       ig_grid=ig_grid or DEFAULT_IG_GRID))
    return Plan(len(facts), 2, "checkpoints", replicates, 2 if method_noise else 0, files)


def cached_settings(folder: str | Path, identity: str, seed: int = 0) -> list[dict[str, Any]]:
    """The distinct extraction settings (method, ig_steps, ig_grid) of the circuit files in `folder` of the fact
    set `identity` and extraction `seed`, method-noise replicates (`noise.REPLICATE_GRID`) left out: what a
    command reusing a run's recorded facts can take when it is not told the settings."""
    from circuitdyn.circuits import circuit_files, setting
    from circuitdyn.noise import REPLICATE_GRID

    found: list[dict[str, Any]] = []
    for _, meta in circuit_files(folder) if Path(folder).is_dir() else []:
        if meta.get("probe_set_hash") != identity or meta.get("seed") != seed:
            continue
        s = {"method": meta.get("method"), "ig_steps": meta.get("ig_steps"), "ig_grid": setting(meta, "ig_grid")}
        if s["ig_grid"] != REPLICATE_GRID and s not in found:
            found.append(s)
    return found

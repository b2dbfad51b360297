"""Sweeps: one CPT run per seed (and per strategy).

A single CPT run says nothing about how much its dynamics depend on the seed. `run_sweep` runs the same
configuration once per seed and strategy, each into its own sub-folder `OUT/<strategy>/seed_<seed>` (locally
one after another, or as Ray tasks with `ray=`); every run resumes on its own, so a re-run finishes what is
missing. `across_runs.across_runs` then gives per-epoch means with intervals across those runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from circuitdyn.errors import CircuitdynError
from circuitdyn.pipeline import ray as ray_tasks
from circuitdyn.training.cpt import STRATEGIES, CPTConfig, run_cpt


def sweep_runs(
    cfg: CPTConfig, out_dir: str | Path, seeds: Sequence[int], strategies: Sequence[str] | None = None
) -> dict[Path, CPTConfig]:
    """Run folder -> configuration of every run of the sweep: `out_dir/<strategy>/seed_<seed>`."""
    strategies = list(strategies or [cfg.strategy])
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise CircuitdynError(f"unknown strategy {bad[0]!r}; choose among {', '.join(STRATEGIES)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise CircuitdynError(f"seeds must be distinct and at least one, got {list(seeds)}")
    out = Path(out_dir)
    return {
        out / strategy / f"seed_{seed}": replace(cfg, seed=int(seed), strategy=strategy)
        for strategy in strategies
        for seed in seeds
    }


def cpt_task(cfg: CPTConfig, out_dir: str) -> str:
    """One run of a sweep (on a Ray worker, or here): `run_cpt` into `out_dir`, resuming what is there."""
    return str(run_cpt(cfg, out_dir, progress=False, log=None).run_dir)


def run_sweep(
    cfg: CPTConfig,
    out_dir: str | Path,
    seeds: Sequence[int],
    strategies: Sequence[str] | None = None,
    *,
    ray: str | None = None,
    max_retries: int = 3,
    progress: bool = True,
) -> list[Path]:
    """Run (or resume) every CPT run of the sweep and return their folders.

    With `ray` ("auto" or a cluster address) each run is a Ray task (1 CPU, or 1 GPU on a cluster with
    GPUs, where it trains on `cuda`); a failure names the run. Without it the runs go one after another.
    """
    runs = sweep_runs(cfg, out_dir, seeds, strategies)
    for c in runs.values():
        c.validate()
    if ray is None:
        return [Path(cpt_task(c, str(path))) for path, c in runs.items()]
    with ray_tasks.connected(ray) as rt:
        gpus = 1.0 if ray_tasks.cluster_gpus(rt) else 0.0
        tasks = [
            ray_tasks.Task(
                f"CPT run {path} (strategy {c.strategy}, seed {c.seed})",
                cpt_task,
                (replace(c, device="cuda" if gpus else c.device), str(path)),
            )
            for path, c in runs.items()
        ]
        done = ray_tasks.run_tasks(
            rt, tasks, num_gpus=gpus, max_retries=max_retries, progress=progress, desc="CPT runs"
        )
    return [Path(p) for p in done]

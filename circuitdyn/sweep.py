"""Sweeps: one CPT run per seed (and per strategy), and per-epoch means with intervals across those runs.

A single CPT run says nothing about how much its dynamics depend on the seed. `run_sweep` runs the same
configuration once per seed and strategy, each into its own sub-folder `OUT/<strategy>/seed_<seed>` (locally
one after another, or as Ray tasks with `ray=`); every run resumes on its own, so a re-run finishes what is
missing. `across_runs` turns one per-epoch table per run (`Dynamics.table()`, `Timeline.per_epoch`, ...) into
per-epoch means with a 95 % interval over runs (`circuitdyn.stats.mean_ci`, each run its own cluster) and
the number of runs they rest on. With fewer than `stats.MIN_ENTITIES` runs there is no interval (a range of
3 seeds is not a 95 % interval) and the table says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from circuitdyn import cluster
from circuitdyn.cpt import STRATEGIES, CPTConfig, run_cpt
from circuitdyn.errors import CircuitdynError
from circuitdyn.stats import MIN_ENTITIES, mean_ci


def sweep_runs(cfg: CPTConfig, out_dir: str | Path, seeds: Sequence[int],
               strategies: Sequence[str] | None = None) -> dict[Path, CPTConfig]:
    """Run folder -> configuration of every run of the sweep: `out_dir/<strategy>/seed_<seed>`."""
    strategies = list(strategies or [cfg.strategy])
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise CircuitdynError(f"unknown strategy {bad[0]!r}; choose among {', '.join(STRATEGIES)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise CircuitdynError(f"seeds must be distinct and at least one, got {list(seeds)}")
    out = Path(out_dir)
    return {out / strategy / f"seed_{seed}": replace(cfg, seed=int(seed), strategy=strategy)
            for strategy in strategies for seed in seeds}


def cpt_task(cfg: CPTConfig, out_dir: str) -> str:
    """One run of a sweep (on a Ray worker, or here): `run_cpt` into `out_dir`, resuming what is there."""
    return str(run_cpt(cfg, out_dir, progress=False, log=None).run_dir)


def run_sweep(cfg: CPTConfig, out_dir: str | Path, seeds: Sequence[int], strategies: Sequence[str] | None = None,
              *, ray: str | None = None, max_retries: int = 3, progress: bool = True) -> list[Path]:
    """Run (or resume) every CPT run of the sweep and return their folders.

    With `ray` ("auto" or a cluster address) each run is a Ray task (1 CPU, or 1 GPU on a cluster with
    GPUs, where it trains on `cuda`); a failure names the run. Without it the runs go one after another.
    """
    runs = sweep_runs(cfg, out_dir, seeds, strategies)
    for c in runs.values():
        c.validate()
    if ray is None:
        return [Path(cpt_task(c, str(path))) for path, c in runs.items()]
    with cluster.connected(ray) as rt:
        gpus = 1.0 if cluster.cluster_gpus(rt) else 0.0
        tasks = [cluster.Task(f"CPT run {path} (strategy {c.strategy}, seed {c.seed})", cpt_task,
                              (replace(c, device="cuda" if gpus else c.device), str(path)))
                 for path, c in runs.items()]
        done = cluster.run_tasks(rt, tasks, num_gpus=gpus, max_retries=max_retries, progress=progress,
                                 desc="CPT runs")
    return [Path(p) for p in done]


def across_runs(tables: Mapping[str, pd.DataFrame], columns: Sequence[str] | None = None,
                key: str = "epoch") -> pd.DataFrame:
    """Per `key` (epoch) and column: the mean over runs, its 95 % interval over runs, and n runs.

    `tables`: run name -> its per-epoch table. `columns`: the numeric columns to summarise (default: every
    numeric column all tables share, but `key`). A run without a value at an epoch is left out of that
    epoch's n. Rows: key, quantity, mean, lo, hi, n, interval (why lo/hi are NaN: fewer than
    `MIN_ENTITIES` runs; None when there is an interval).
    """
    if not tables:
        raise CircuitdynError("no runs to summarise")
    frames = [t.assign(_run=name) for name, t in tables.items()]
    for name, t in tables.items():
        if key not in t:
            raise CircuitdynError(f"run {name}: its table has no {key!r} column")
    if columns is None:
        shared = set.intersection(*(set(t.columns) for t in tables.values())) - {key}
        columns = [c for c in frames[0].columns if c in shared and pd.api.types.is_numeric_dtype(frames[0][c])]
    data = pd.concat(frames, ignore_index=True)
    rows = []
    for value, df in data.groupby(key, sort=True):
        for col in columns:
            vals = pd.to_numeric(df[col], errors="coerce").astype(float).to_numpy()
            est = mean_ci(vals, df["_run"].to_numpy())
            why = (f"too few runs for an interval, n={est.n_groups} < {MIN_ENTITIES}"
                   if est.n and not est.has_interval else None)
            rows.append({key: value, "quantity": col, "mean": est.value, "lo": est.lo, "hi": est.hi, "n": est.n,
                         "interval": why})
    return pd.DataFrame(rows)


def format_across_runs(table: pd.DataFrame, key: str = "epoch") -> str:
    """`across_runs` as text: one row per epoch, one `mean [lo, hi]` cell per quantity, and n runs; a cell
    without an interval is marked `*`, and a last line says why."""
    def cell(r: pd.Series) -> str:
        if np.isnan(r["mean"]):
            return "-"
        ci = "*" if np.isnan(r["lo"]) else f" [{r['lo']:.3f}, {r['hi']:.3f}]"
        return f"{r['mean']:.3f}{ci}"

    wide = table.assign(cell=table.apply(cell, axis=1)).pivot(index=key, columns="quantity", values="cell")
    wide = wide[list(dict.fromkeys(table["quantity"]))]
    wide["n runs"] = table.groupby(key)["n"].max()
    text = wide.reset_index().to_string(index=False)
    if "interval" in table and table["interval"].notna().any():
        text += (f"\n* no interval: fewer than {MIN_ENTITIES} runs (a mean over so few runs has no trustworthy "
                 "95 % interval)")
    return text

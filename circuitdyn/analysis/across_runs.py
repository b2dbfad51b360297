"""Per-epoch means with intervals across runs (the seeds of a sweep), and how they are shown.

`across_runs` turns one per-epoch table per run (`Dynamics.table()`, `Timeline.per_epoch`, ...) into per-epoch
means with a 95 % interval over runs (`circuitdyn.analysis.stats.mean_ci`, each run its own cluster) and the number of
runs they rest on. With fewer than `stats.MIN_ENTITIES` runs there is no interval (a range of 3 seeds is not a
95 % interval) and the table says why. `AcrossRuns` is such a summary as `--json` writes it and as text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from circuitdyn.analysis.stats import MIN_ENTITIES, mean_ci
from circuitdyn.errors import CircuitdynError


def across_runs(
    tables: Mapping[str, pd.DataFrame], columns: Sequence[str] | None = None, key: str = "epoch"
) -> pd.DataFrame:
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
            why = (
                f"too few runs for an interval, n={est.n_groups} < {MIN_ENTITIES}"
                if est.n and not est.has_interval
                else None
            )
            rows.append(
                {
                    key: value,
                    "quantity": col,
                    "mean": est.value,
                    "lo": est.lo,
                    "hi": est.hi,
                    "n": est.n,
                    "interval": why,
                }
            )
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
        text += (
            f"\n* no interval: fewer than {MIN_ENTITIES} runs (a mean over so few runs has no trustworthy "
            "95 % interval)"
        )
    return text


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as JSON records (NaN as null), as `--json` writes tables."""
    return json.loads(table.to_json(orient="records"))


@dataclass
class AcrossRuns:
    """Summaries across runs: `sections` of (heading, `across_runs` table), printed in order under `title`
    (`text`), and `data`, the JSON of `--json` (`to_dict`)."""

    title: str
    sections: list[tuple[str, pd.DataFrame]]
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def text(self) -> str:
        lines = [self.title]
        for heading, table in self.sections:
            if heading:
                lines += ["", heading]
            lines.append(format_across_runs(table))
        return "\n".join(lines)

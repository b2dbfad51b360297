"""Calibration: the measured error rates of circuitdyn's change verdicts on a real checkpoint, as settings, numbers
and text (`CalibrationSettings`, `Calibration`); `calibrate.calibrate` measures them.

A verdict is only evidence when its error rates are known. They are measured where the truth is known by
construction:

- **null** (nothing changed): a pool of `2 r K` replicates of the same checkpoint, drawn from the replicate
  family, split into K disjoint tests of r against r. `fact_fpr` is the share of per-fact tests with
  p <= alpha; `verdict_fwer` the share of null rounds in which the Benjamini-Hochberg verdicts flag any fact;
  `aggregate_fpr` the share of null rounds in which the aggregate test (stratified by fact) claims change,
  over `AGGREGATE_ROUNDS` rounds that each draw every fact's 2r replicates at random from its pool (rounds share
  replicates, so that interval is narrower than independent rounds would give).
- **planted changes** of known size: copies of the checkpoint with one component's output scaled by
  1 - strength (`plant`: the MLP, or the attention head, that carries most of the facts' circuits at this
  checkpoint, chosen from the unmodified model before any test), r replicates each, tested against r null
  replicates: `power` per strength (share of facts with p <= alpha, share flagged after BH, and whether the
  aggregate test fires).
- **interval coverage** by number of entities: how often the interval circuitdyn prints (`stats.bootstrap_ci`)
  of a mean effect over n entities, resampled with replacement from the facts' own, covers the truth: for null
  effects (each fact's effect in one of its K null tests, drawn at random) the truth is 0, since replicates of
  one checkpoint are exchangeable; for planted-change effects it is their mean over all facts.

Every rate carries its n and a Clopper-Pearson 95 % interval. Only facts whose clean - corrupted gap reaches
`faithfulness.MIN_GAP` are tested, as in every comparison.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import stats as sps

from circuitdyn.analysis.change_test import (
    ALPHA,
)
from circuitdyn.analysis.stats import bootstrap_ci
from circuitdyn.engine.faithfulness import MIN_GAP
from circuitdyn.engine.selection import DEFAULT_SELECTION, Selection
from circuitdyn.engine.settings import (
    DEFAULT_FAMILY,
    DEFAULT_REPLICATES,
    DEFAULT_SETTINGS,
    AttributionSettings,
    Compute,
    Family,
    check_family,
)
from circuitdyn.errors import CircuitdynError
from circuitdyn.io import atomic_path

if TYPE_CHECKING:
    pass

Plant = Literal["mlp", "head"]
AGGREGATE_ROUNDS = 200
COVERAGE_SIMS = 4000


@dataclass(frozen=True)
class CalibrationSettings:
    """What `calibrate` runs: the attribution settings of the circuits and replicates (`attribution`; replicates
    on the `shifted` grid), the replicate family and count of the change test it calibrates, the null tests per
    fact, the planted change and its strengths, the entity counts whose interval coverage is measured, the
    `selection` that sizes the circuits, the attribution batch and the `seed` of the draws."""

    attribution: AttributionSettings = DEFAULT_SETTINGS
    family: Family = DEFAULT_FAMILY
    replicates: int = DEFAULT_REPLICATES
    null_tests: int = 5
    plant: Plant = "mlp"
    strengths: tuple[float, ...] = (0.1, 0.3, 1.0)
    entity_counts: tuple[int, ...] = (4, 7, 8, 12)
    selection: Selection = DEFAULT_SELECTION
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_family(self.family)
        for name in ("replicates", "null_tests", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "replicates" else 1):
                raise CircuitdynError(
                    f"calibration setting {name} must be a whole number >= "
                    f"{2 if name == 'replicates' else 1}, got {v!r}"
                )
        if self.plant not in ("mlp", "head"):
            raise CircuitdynError(f"plant must be mlp or head, got {self.plant!r}")
        if not self.strengths or any(not 0 < s <= 1 for s in self.strengths):
            raise CircuitdynError(f"planted strengths must be in (0, 1], got {list(self.strengths)}")
        if any(n < 2 for n in self.entity_counts):
            raise CircuitdynError(f"entity counts must be >= 2, got {list(self.entity_counts)}")
        if not isinstance(self.selection, Selection):
            raise CircuitdynError(f"calibration selection is a Selection (Selection.parse({self.selection!r}))")

    @property
    def compute(self) -> Compute:
        return Compute(batch_size=self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The settings as `calibrate --json` records them."""
        a = self.attribution
        return {
            "family": self.family,
            "replicates": self.replicates,
            "null_tests": self.null_tests,
            "plant": self.plant,
            "strengths": list(self.strengths),
            "entity_counts": list(self.entity_counts),
            "selection": str(self.selection),
            "method": a.method,
            "steps": a.steps,
            "metric": a.metric_name,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


def rate(k: int, n: int) -> dict[str, Any]:
    """A measured rate k/n with its Clopper-Pearson 95 % interval."""
    if n == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0, "k": 0}
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return {
        "value": round(k / n, 6),
        "lo": round(float(ci.low), 6),
        "hi": round(float(ci.high), 6),
        "n": int(n),
        "k": int(k),
    }


@dataclass
class Calibration:
    """The measured error rates (`to_dict()` is the `calibrate --json` output)."""

    checkpoint: str
    settings: CalibrationSettings
    n_facts: int
    n_tested: int
    n_entities: int
    statistic: str
    fact_fpr: dict[str, Any]
    verdict_fwer: dict[str, Any]
    aggregate_fpr: dict[str, Any]
    power: list[dict[str, Any]]
    coverage: list[dict[str, Any]]
    planted_component: str
    per_statistic: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: self.settings.to_dict() if f.name == "settings" else copy.deepcopy(getattr(self, f.name))
            for f in fields(self)
        }

    def summary(self) -> list[str]:
        """What the numbers say, one line each."""

        def r(x: dict[str, Any]) -> str:
            if x["value"] is None:
                return "- (n=0)"
            return f"{x['value']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}] (n={x['n']})"

        s = self.settings
        lines = [
            f"calibration of the change test at {self.checkpoint}: {self.n_tested} of {self.n_facts} facts tested "
            f"(gap >= {MIN_GAP:g}) in {self.n_entities} entities; {s.replicates} replicates per checkpoint, "
            f"'{s.family}' family; statistic {self.statistic}; alpha {ALPHA}",
            f"null (same checkpoint on both sides): per-fact false-positive rate {r(self.fact_fpr)}; "
            f"rounds with any fact flagged after BH {r(self.verdict_fwer)}; aggregate test "
            f"{r(self.aggregate_fpr)}",
        ]
        for p in self.power:
            lines.append(
                f"planted: {self.planted_component} output x {1 - p['strength']:g}: per-fact power "
                f"{r(p)}, flagged after BH {p['flagged']}/{p['n']}, aggregate p = {p['aggregate_p']:.4f}"
            )
        for c in self.coverage:
            lines.append(
                f"interval coverage with {c['n_entities']} entities ({c['data']}): "
                + (r(c) if c["value"] is not None else c.get("note", "no interval printed"))
            )
        return lines

    # ----------------------------------------------------------------------- notebooks

    def to_frame(self) -> Any:
        """A tidy pandas table, one row per measured rate: `measure` (fact_fpr, verdict_fwer, aggregate_fpr,
        power, coverage), the `statistic` it is of, the planted `strength` (power) or `n_entities` and `data`
        (coverage), and value, lo, hi (Clopper-Pearson 95 %), k and n."""
        import pandas as pd

        cols = ("value", "lo", "hi", "k", "n")
        rows: list[dict[str, Any]] = []

        def add(measure: str, statistic: str, x: dict[str, Any], **extra: Any) -> None:
            rows.append(
                {
                    "measure": measure,
                    "statistic": statistic,
                    "strength": None,
                    "n_entities": None,
                    "data": None,
                    **extra,
                    **{c: x.get(c) for c in cols},
                }
            )

        per_stat = self.per_statistic or {
            self.statistic: {"fact_fpr": self.fact_fpr, "aggregate_fpr": self.aggregate_fpr, "power": self.power}
        }
        for stat, d in per_stat.items():
            add("fact_fpr", stat, d["fact_fpr"])
            if stat == self.statistic:
                add("verdict_fwer", stat, self.verdict_fwer)
            add("aggregate_fpr", stat, d["aggregate_fpr"])
            for p in d["power"]:
                add("power", stat, p, strength=p["strength"])
        for c in self.coverage:
            add("coverage", self.statistic, c, n_entities=c["n_entities"], data=c["data"])
        return pd.DataFrame(rows)

    def describe(self) -> list[str]:
        """What the numbers say, one line each (`summary`)."""
        return self.summary()

    def figure(self) -> Any:
        """The measured rates with their 95 % intervals (false-positive rates, power per planted strength,
        interval coverage) as a plotly Figure, the nominal levels drawn as dotted lines."""
        import plotly.graph_objects as go

        df = self.to_frame()
        df = df[(df["statistic"] == self.statistic) & df["value"].notna()]
        names = [
            m
            if m not in ("power", "coverage")
            else (f"power x{1 - s:g}" if m == "power" else f"coverage {int(e)} entities")
            for m, s, e in zip(df["measure"], df["strength"], df["n_entities"])
        ]
        fig = go.Figure(
            go.Scatter(
                x=names,
                y=df["value"],
                mode="markers",
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": (df["hi"] - df["value"]).tolist(),
                    "arrayminus": (df["value"] - df["lo"]).tolist(),
                },
                hovertext=[f"{k}/{n}" for k, n in zip(df["k"], df["n"])],
            )
        )
        fig.add_hline(y=ALPHA, line_dash="dot", annotation_text=f"alpha {ALPHA}")
        fig.add_hline(y=0.95, line_dash="dot", annotation_text="95 % coverage")
        fig.update_layout(
            title=f"calibration at {self.checkpoint} ({self.statistic})", yaxis_range=[0, 1.05], plot_bgcolor="white"
        )
        return fig

    def _repr_html_(self) -> str:
        import html

        from circuitdyn.analysis.report import html_block

        return html_block(
            f"<b>Calibration</b> at {html.escape(self.checkpoint)}", self.describe(), self.to_frame(), rows=None
        )


def coverage(
    samples: np.ndarray, entities: list[str], counts: Sequence[int], data: str, seed: int, truth: float | None = None
) -> list[dict[str, Any]]:
    """Per entity count n: how often the interval circuitdyn prints (`stats.bootstrap_ci`) of the mean over n
    entities covers `truth`. `samples` [fact, draw]: each simulated data set draws n entities with replacement
    from these facts' entities and, for each of their facts, one of its draws at random. `truth` defaults to the
    mean over all facts of their mean draw (the population the entities are resampled from)."""
    samples = np.asarray(samples, dtype=float).reshape(len(entities), -1)
    names = sorted(set(entities))
    rows = {e: np.array([i for i, x in enumerate(entities) if x == e]) for e in names}
    target = float(samples.mean(1).mean()) if truth is None else truth
    rng = np.random.default_rng(seed)
    out = []
    for n in counts:
        hits = printed = 0
        for _ in range(COVERAGE_SIMS):
            picks = rng.choice(len(names), n, replace=True)
            idx = np.concatenate([rows[names[k]] for k in picks])
            vals = samples[idx, rng.integers(0, samples.shape[1], len(idx))]
            groups = np.concatenate([[j] * len(rows[names[k]]) for j, k in enumerate(picks)])
            est = bootstrap_ci(vals, groups, n_boot=400, seed=int(rng.integers(1 << 31)))
            if not est.has_interval:
                continue
            printed += 1
            hits += est.lo <= target <= est.hi
        entry = {"n_entities": n, "data": data, **rate(hits, printed)}
        if not printed:
            entry["note"] = f"too few entities for an interval (n={n}): none printed"
        out.append(entry)
    return out


STATISTIC_NAMES = {
    "edge_jaccard": "edge-set distance",
    "weighted_jaccard": "weighted-Jaccard distance",
    "spearman": "rank distance",
}


def markdown_table(cal: dict[str, Any]) -> str:
    """A calibration's JSON (`Calibration.to_dict()`, as `calibrate --out` writes it) as the Markdown the README
    quotes: one table of false-positive rates and power per statistic, then the BH and coverage lines."""

    def r(x: dict[str, Any], digits: int = 3) -> str:
        if x["value"] is None:
            return x.get("note", "no interval printed")
        return f"{x['value']:.{digits}f} [{x['lo']:.{digits}f}, {x['hi']:.{digits}f}] (k={x['k']} of n={x['n']})"

    stats = list(cal["per_statistic"])
    names = [STATISTIC_NAMES.get(x, x) + (" (primary)" if x == cal["statistic"] else "") for x in stats]
    node = cal["planted_component"]
    lines = [
        f"{cal['n_tested']} of {cal['n_facts']} facts tested (gap >= {MIN_GAP:g} nat) in {cal['n_entities']} "
        f"entities; planted component `{node}`",
        "| what is measured | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(stats),
    ]
    rows = [
        ("per-fact test fires under the null (`fact_fpr`, p <= 0.05)", "fact_fpr"),
        ("aggregate test fires under the null (`aggregate_fpr`)", "aggregate_fpr"),
    ]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(r(cal["per_statistic"][x][key]) for x in stats) + " |")
    for i, p in enumerate(cal["power"]):
        cells = [cal["per_statistic"][x]["power"][i] for x in stats]
        lines.append(
            f"| power: `{node}` output x {1 - p['strength']:g} | "
            + " | ".join(f"{r(c, 2)}; BH {c['flagged']}/{c['n']}; aggregate p {c['aggregate_p']:.4f}" for c in cells)
            + " |"
        )
    lines += ["", f"null rounds with any fact flagged after BH: {r(cal['verdict_fwer'])}"]
    lines += [f"coverage {c['n_entities']} entities ({c['data']}): {r(c)}" for c in cal["coverage"]]
    return "\n".join(lines)


def write_calibration(cal: Calibration, path: str | Path) -> Path:
    """The calibration as JSON, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(cal.to_dict(), indent=1, default=str))
    return path

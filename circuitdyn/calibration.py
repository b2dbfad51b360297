"""Calibration: the measured error rates of circuitdyn's change verdicts on a real checkpoint.

A verdict is only evidence when its error rates are known. `calibrate(run, epoch, facts)` measures them
where the truth is known by construction:

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

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from circuitdyn.attribution import DEFAULT_IG_STEPS, Method, attribute
from circuitdyn.change_test import (
    ALPHA,
    aggregate_p,
    compare_replicates,
    distance_test,
    replicate_distances,
    split_effects,
    splits,
)
from circuitdyn.circuits import CircuitSet
from circuitdyn.diff import DEFAULT_SELECTION, PRIMARY, entity_groups, node_importance, node_kind
from circuitdyn.errors import CircuitdynError
from circuitdyn.faithfulness import MIN_GAP, gap_ok
from circuitdyn.io import atomic_path
from circuitdyn.noise import (
    DEFAULT_FAMILY,
    DEFAULT_REPLICATES,
    REPLICATE_GRID,
    Draw,
    Family,
    check_family,
    draw_settings,
    replicate_scores,
)
from circuitdyn.selection import Selection
from circuitdyn.similarity import DISTANCES
from circuitdyn.stats import bootstrap_ci

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from circuitdyn.checkpoints import Run
    from circuitdyn.facts import FactSet

Plant = Literal["mlp", "head"]
AGGREGATE_ROUNDS = 200
COVERAGE_SIMS = 4000


@dataclass(frozen=True)
class CalibrationSettings:
    """What `calibrate` runs: the replicate family and count of the change test it calibrates, the null tests
    per fact, the planted change and its strengths, the entity counts whose interval coverage is measured."""

    family: Family = DEFAULT_FAMILY
    replicates: int = DEFAULT_REPLICATES
    null_tests: int = 5
    plant: Plant = "mlp"
    strengths: tuple[float, ...] = (0.1, 0.3, 1.0)
    entity_counts: tuple[int, ...] = (4, 7, 8, 12)
    selection: str = DEFAULT_SELECTION
    method: Method = "eap-ig"
    steps: int = DEFAULT_IG_STEPS
    metric: str = "answer-logprob"
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_family(self.family)
        for name in ("replicates", "null_tests", "batch_size", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "replicates" else 1):
                raise CircuitdynError(f"calibration setting {name} must be a whole number >= "
                                      f"{2 if name == 'replicates' else 1}, got {v!r}")
        if self.plant not in ("mlp", "head"):
            raise CircuitdynError(f"plant must be mlp or head, got {self.plant!r}")
        if not self.strengths or any(not 0 < s <= 1 for s in self.strengths):
            raise CircuitdynError(f"planted strengths must be in (0, 1], got {list(self.strengths)}")
        if any(n < 2 for n in self.entity_counts):
            raise CircuitdynError(f"entity counts must be >= 2, got {list(self.entity_counts)}")
        Selection.parse(self.selection)


def rate(k: int, n: int) -> dict[str, Any]:
    """A measured rate k/n with its Clopper-Pearson 95 % interval."""
    if n == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0, "k": 0}
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return {"value": round(k / n, 6), "lo": round(float(ci.low), 6), "hi": round(float(ci.high), 6), "n": int(n),
            "k": int(k)}


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
        out = asdict(self)
        out["settings"]["strengths"] = list(self.settings.strengths)
        out["settings"]["entity_counts"] = list(self.settings.entity_counts)
        return out

    def summary(self) -> list[str]:
        """What the numbers say, one line each."""
        def r(x: dict[str, Any]) -> str:
            if x["value"] is None:
                return "- (n=0)"
            return f"{x['value']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}] (n={x['n']})"

        s = self.settings
        lines = [f"calibration of the change test at {self.checkpoint}: {self.n_tested} of {self.n_facts} facts tested "
                 f"(gap >= {MIN_GAP:g}) in {self.n_entities} entities; {s.replicates} replicates per checkpoint, "
                 f"'{s.family}' family; statistic {self.statistic}; alpha {ALPHA}",
                 f"null (same checkpoint on both sides): per-fact false-positive rate {r(self.fact_fpr)}; "
                 f"rounds with any fact flagged after BH {r(self.verdict_fwer)}; aggregate test "
                 f"{r(self.aggregate_fpr)}"]
        for p in self.power:
            lines.append(f"planted: {self.planted_component} output x {1 - p['strength']:g}: per-fact power "
                         f"{r(p)}, flagged after BH {p['flagged']}/{p['n']}, aggregate p = {p['aggregate_p']:.4f}")
        for c in self.coverage:
            lines.append(f"interval coverage with {c['n_entities']} entities ({c['data']}): " +
                         (r(c) if c["value"] is not None else c.get("note", "no interval printed")))
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
            rows.append({"measure": measure, "statistic": statistic, "strength": None, "n_entities": None,
                         "data": None, **extra, **{c: x.get(c) for c in cols}})

        per_stat = self.per_statistic or {self.statistic: {"fact_fpr": self.fact_fpr,
                                                           "aggregate_fpr": self.aggregate_fpr, "power": self.power}}
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
        names = [m if m not in ("power", "coverage") else
                 (f"power x{1 - s:g}" if m == "power" else f"coverage {int(e)} entities")
                 for m, s, e in zip(df["measure"], df["strength"], df["n_entities"])]
        fig = go.Figure(go.Scatter(
            x=names, y=df["value"], mode="markers",
            error_y={"type": "data", "symmetric": False, "array": (df["hi"] - df["value"]).tolist(),
                     "arrayminus": (df["value"] - df["lo"]).tolist()},
            hovertext=[f"{k}/{n}" for k, n in zip(df["k"], df["n"])]))
        fig.add_hline(y=ALPHA, line_dash="dot", annotation_text=f"alpha {ALPHA}")
        fig.add_hline(y=0.95, line_dash="dot", annotation_text="95 % coverage")
        fig.update_layout(title=f"calibration at {self.checkpoint} ({self.statistic})", yaxis_range=[0, 1.05],
                          plot_bgcolor="white")
        return fig

    def _repr_html_(self) -> str:
        import html

        from circuitdyn.report import html_block

        return html_block(f"<b>Calibration</b> at {html.escape(self.checkpoint)}", self.describe(), self.to_frame(),
                          rows=None)


STATISTIC_NAMES = {"edge_jaccard": "edge-set distance", "weighted_jaccard": "weighted-Jaccard distance",
                   "spearman": "rank distance"}


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
    lines = [f"{cal['n_tested']} of {cal['n_facts']} facts tested (gap >= {MIN_GAP:g} nat) in {cal['n_entities']} "
             f"entities; planted component `{node}`",
             "| what is measured | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(stats)]
    rows = [("per-fact test fires under the null (`fact_fpr`, p <= 0.05)", "fact_fpr"),
            ("aggregate test fires under the null (`aggregate_fpr`)", "aggregate_fpr")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(r(cal["per_statistic"][x][key]) for x in stats) + " |")
    for i, p in enumerate(cal["power"]):
        cells = [cal["per_statistic"][x]["power"][i] for x in stats]
        lines.append(f"| power: `{node}` output x {1 - p['strength']:g} | " + " | ".join(
            f"{r(c, 2)}; BH {c['flagged']}/{c['n']}; aggregate p {c['aggregate_p']:.4f}" for c in cells) + " |")
    lines += ["", f"null rounds with any fact flagged after BH: {r(cal['verdict_fwer'])}"]
    lines += [f"coverage {c['n_entities']} entities ({c['data']}): {r(c)}" for c in cal["coverage"]]
    return "\n".join(lines)


def _planted_component(graph: Any, scores: Tensor, plant: Plant) -> tuple[str, int, int | None]:
    """The MLP (or attention head) with the largest mean importance over the facts' circuits: (node, layer, head)."""
    imp = node_importance(graph, scores.float()).mean(0)
    kind = "mlp" if plant == "mlp" else "attn"
    candidates = [i for i, n in enumerate(graph.nodes) if node_kind(n) == kind]
    best = max(candidates, key=lambda i: float(imp[i]))
    node = graph.nodes[best]
    head = int(node.split(".h")[1]) if kind == "attn" else None
    return node, graph.layer_of(node), head


def _scaled(model: HookedTransformer, plant: Plant, layer: int, head: int | None, factor: float
            ) -> Callable[[], None]:
    """Scale one component's output weights in place; returns the function that restores them."""
    block: Any = model.blocks[layer]  # nn.ModuleList items are typed as plain Module
    if plant == "mlp":
        params = [block.mlp.W_out, block.mlp.b_out]
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.data.mul_(factor)
    else:
        params = [block.attn.W_O]
        saved = [params[0].detach().clone()]
        params[0].data[head].mul_(factor)

    def restore() -> None:
        for p, s in zip(params, saved):
            p.data.copy_(s)

    return restore


def _planted_scores(model: HookedTransformer, facts: FactSet, draws: Sequence[Draw], s: CalibrationSettings,
                    cache: Path, key: dict[str, Any]) -> Tensor:
    """Replicates of the planted model, cached per draw under `cache` (keyed by checkpoint, plant and draw)."""
    out = []
    for d in draws:
        path = cache / f"planted.{key['component']}.x{key['factor']:g}.{d.name.replace(' ', '')}.safetensors"
        want = json.dumps({**key, "draw": asdict(d)}, sort_keys=True)
        if path.is_file():
            cs = CircuitSet.load(path)
            if cs.meta.get("calibration_key") == want and cs.fact_ids == facts.ids:
                out.append(cs.scores.float())
                continue
        rep = d.facts(facts)
        scores = attribute(model, list(rep), s.method, s.steps, s.metric, d.seed, s.batch_size,
                           ig_grid=REPLICATE_GRID)
        cs = CircuitSet(scores, key["edges"], facts.ids, {"calibration_key": want, "method": s.method})
        path.parent.mkdir(parents=True, exist_ok=True)
        cs.save(path, dtype="float32")
        out.append(scores.float())
    return torch.stack(out)


def _coverage(samples: np.ndarray, entities: list[str], counts: Sequence[int], data: str, seed: int,
              truth: float | None = None) -> list[dict[str, Any]]:
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


def calibrate(run: Run, epoch: int, facts: FactSet, settings: CalibrationSettings | None = None, *,
              folder: str | Path | None = None, progress: bool = False,
              log: Callable[[str], None] | None = None) -> Calibration:
    """Measure the change test's false-positive rates, power and interval coverage at one checkpoint of `run`
    (see the module docstring). Replicates are cached in `folder` (default the run's circuits folder), so a
    re-run resumes."""
    from circuitdyn.extraction import checkpoint_circuits, circuits_dir, select_circuits

    s = settings or CalibrationSettings()
    say = log or (lambda text: None)
    folder = Path(folder) if folder is not None else circuits_dir(run)
    main = checkpoint_circuits(run, epoch, facts, folder=folder, method=s.method, steps=s.steps, metric=s.metric,
                               batch_size=s.batch_size, progress=progress)
    main = main.subset(facts.ids)
    masks, _ = select_circuits(run, epoch, main, s.selection, facts, cache_dir=folder)
    sizes = masks.sum(1).long().clamp_min(1)
    included = gap_ok(main.gaps)
    entities = entity_groups(facts.ids, facts.entity_of)
    n_tested = int(included.sum())
    if n_tested < 2:
        raise CircuitdynError(f"{run.path} epoch {epoch}: only {n_tested} of {len(facts)} facts have a clean - "
                              f"corrupted gap >= {MIN_GAP:g}; calibration needs more (choose more facts)")
    r, k = s.replicates, s.null_tests
    say(f"calibrate: {len(facts)} facts, {n_tested} with gap >= {MIN_GAP:g} (only these are tested and drawn): "
        f"{2 * r * k} null replicates and {len(s.strengths)} x {r} planted replicates per fact")
    n_all = len(facts)
    facts = facts.subset([f for f, ok in zip(facts.ids, included) if ok])
    sizes, entities = sizes[torch.from_numpy(included)], [e for e, ok in zip(entities, included) if ok]
    main = main.subset(facts.ids)
    included = np.ones(len(facts), dtype=bool)
    pool = replicate_scores(run, epoch, facts, draw_settings(s.family, 2 * r * k, s.seed), folder, method=s.method,
                            steps=s.steps, metric=s.metric, batch_size=s.batch_size, progress=progress)
    inc_entities = entities

    # the null: K disjoint tests of r against r replicates of the same checkpoint (distances computed once)
    say(f"calibrate: distances between the {2 * r * k} null replicates of every fact")
    pool_dist = replicate_distances(pool, sizes)

    def sub(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {stat: d[:, idx][:, :, idx] for stat, d in pool_dist.items()}

    null_p: dict[str, list[float]] = {stat: [] for stat in DISTANCES}
    any_flag, null_effects = 0, []
    for j in range(k):
        test, _ = distance_test(sub(np.arange(2 * r * j, 2 * r * (j + 1))), r, r, facts.ids, included=included,
                                family=s.family)
        for stat in DISTANCES:
            null_p[stat] += test.statistic(stat)["p_value"].dropna().tolist()
        primary = test.statistic(PRIMARY)
        any_flag += bool(primary["changed_beyond_noise"].fillna(False).any())
        null_effects.append(primary["effect"].to_numpy(float))
    rng = np.random.default_rng(s.seed)
    agg_fire = {stat: 0 for stat in DISTANCES}
    n_facts = len(facts.ids)
    for _ in range(AGGREGATE_ROUNDS):
        # each fact's 2r replicates drawn at random from its own pool (facts' draws are independent)
        picks = np.stack([rng.permutation(2 * r * k)[:2 * r] for _ in range(n_facts)])
        for stat in DISTANCES:
            d = pool_dist[stat][np.arange(n_facts)[:, None, None], picks[:, :, None], picks[:, None, :]]
            split = split_effects(d, splits(r, r))
            tested = np.flatnonzero(included & ~np.isnan(d).any(axis=(1, 2)))
            p = aggregate_p([split[i] for i in tested], n_perm=1000, seed=int(rng.integers(1 << 31)))
            agg_fire[stat] += p <= ALPHA and float(split[tested, 0].mean()) > 0

    # planted changes of known size, each against the first r null replicates
    model = run.load_model(epoch)
    node, layer, head = _planted_component(main.graph, main.scores[included], s.plant)
    power = []
    per_stat_power: dict[str, list[dict[str, Any]]] = {stat: [] for stat in DISTANCES}
    base_key = {"checkpoint_hash": run.checkpoint(epoch).content_hash, "component": node, "plant": s.plant,
                "steps": s.steps, "metric": s.metric, "method": s.method, "probe_set_hash": facts.identity}
    for i, strength in enumerate(s.strengths):
        restore = _scaled(model, s.plant, layer, head, 1 - strength)
        try:
            draws = draw_settings(s.family, r, s.seed + 1 + i)
            say(f"calibrate: planted {node} output x {1 - strength:g}")
            planted = _planted_scores(model, facts, draws, s, folder / "calibration",
                                      {**base_key, "factor": 1 - strength, "edges": main.edges})
        finally:
            restore()
        run.load_model(epoch)
        test, effects = compare_replicates(pool[:r], planted, facts.ids, sizes, included=included, family=s.family)
        for stat in DISTANCES:
            t = test.statistic(stat)
            p = t["p_value"].dropna()
            agg = aggregate_p(effects[stat], seed=s.seed)
            entry = {"strength": strength, **rate(int((p <= ALPHA).sum()), len(p)),
                     "flagged": int(t["changed_beyond_noise"].fillna(False).sum()), "aggregate_p": round(agg, 6),
                     "mean_effect": round(float(t["effect"][included].mean()), 6)}
            per_stat_power[stat].append(entry)
        power.append(per_stat_power[PRIMARY][-1])

    # null effects have a known truth: replicates of one checkpoint are exchangeable, so E[effect] = 0 per fact
    coverage = _coverage(np.stack(null_effects, 1)[included], inc_entities, s.entity_counts, "null effects",
                         s.seed, truth=0.0)
    planted_effect = test.statistic(PRIMARY)["effect"].to_numpy(float)[included]
    coverage += _coverage(planted_effect, inc_entities, s.entity_counts, f"planted x{1 - s.strengths[-1]:g} effects",
                          s.seed + 1)
    per_statistic: dict[str, dict[str, Any]] = {
        stat: {"fact_fpr": rate(int((np.asarray(null_p[stat]) <= ALPHA).sum()), len(null_p[stat])),
               "aggregate_fpr": rate(agg_fire[stat], AGGREGATE_ROUNDS), "power": per_stat_power[stat]}
        for stat in DISTANCES}
    return Calibration(
        f"{run.path}:{epoch}", s, n_all, n_tested, len(set(inc_entities)), PRIMARY,
        per_statistic[PRIMARY]["fact_fpr"], rate(any_flag, k), per_statistic[PRIMARY]["aggregate_fpr"], power,
        coverage, node, per_statistic,
    )


def write_calibration(cal: Calibration, path: str | Path) -> Path:
    """The calibration as JSON, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(cal.to_dict(), indent=1, default=str))
    return path

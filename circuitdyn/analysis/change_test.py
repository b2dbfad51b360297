"""The calibrated change test: did a fact's circuit change between two checkpoints beyond what the method
itself moves it?

A circuit is an estimate. circuitdyn treats each checkpoint's circuit as a draw from a declared family of
equally valid attribution settings (`circuitdyn.analysis.noise.FAMILIES`: other quadrature offsets of the IG integral,
and for the `question` family also other swap partners of the corruption) and draws `r` replicates per
checkpoint. For one fact the 2r replicate circuits give a distance matrix (`replicate_distances`, one per
statistic of `similarity.DISTANCES`); the test statistic is

    T = mean distance between replicates of different checkpoints - mean distance within a checkpoint

(a PERMANOVA-like contrast; `effect`), and its p-value is exact: T is recomputed for every one of the
C(2r, r) ways to split the 2r replicates into two labelled groups (`splits`), and p is the share of splits
whose T is at least the observed one. If the checkpoint does not matter (the null: the same function on both
sides), the 2r replicates are independent draws of one distribution, so they are exchangeable and
P(p <= alpha) <= alpha whatever the fact, the model or the statistic. With r = 5 the smallest p is
2/252 (a split and its complement give the same T).

Over facts, `benjamini_hochberg` controls the false discovery rate of the per-fact verdicts
(`changed_beyond_noise`). The aggregate claim "circuits changed" is one test stratified by fact: the sum of
the facts' T against sums in which every fact's split is drawn independently (`aggregate_p`), with the mean
effect's interval over entities (`circuitdyn.analysis.stats.bootstrap_ci`). Only a positive T is evidence of change.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitdyn.analysis.similarity import DISTANCES, rank_rows, weighted_jaccard
from circuitdyn.analysis.stats import bootstrap_ci
from circuitdyn.errors import CircuitdynError
from circuitdyn.messages import warn

ALPHA = 0.05
"""Level of the per-fact tests, the false discovery rate over facts and the level of the aggregate test."""

N_AGGREGATE_PERM = 4000
"""Random stratified splits behind an aggregate p-value (resolution 1/4001)."""


def splits(n_a: int, n_b: int) -> np.ndarray:
    """Every assignment of `n_a` of the n_a + n_b replicates to side A, as a bool matrix [split, replicate];
    row 0 is the observed one (the first `n_a` replicates on side A)."""
    n = n_a + n_b
    rows = [np.isin(np.arange(n), c) for c in itertools.combinations(range(n), n_a)]
    return np.asarray(rows, dtype=bool)


def split_effects(dist: Float[np.ndarray, "fact rep rep"], groups: np.ndarray) -> np.ndarray:
    """T = mean cross-group distance - mean within-group distance, per fact and split ([fact, split])."""
    g = groups.astype(np.float64)
    h = 1.0 - g
    n_a, n = g.sum(1), groups.shape[1]
    n_b = n - n_a
    d = np.nan_to_num(dist, nan=0.0)
    cross = np.einsum("fij,si,sj->fs", d, g, h) / (n_a * n_b)
    within_pairs = n_a * (n_a - 1) / 2 + n_b * (n_b - 1) / 2
    within = (np.einsum("fij,si,sj->fs", d, g, g) + np.einsum("fij,si,sj->fs", d, h, h)) / 2 / within_pairs
    return cross - within


def smallest_p(r_a: int, r_b: int) -> float:
    """The smallest p the exact test can give: 1 / C(r_a + r_b, r_a), doubled when the sides are of equal size
    (a split and its mirror give the same T)."""
    return (2 if r_a == r_b else 1) / math.comb(r_a + r_b, r_a)


def permutation_p(effects: np.ndarray) -> np.ndarray:
    """Exact one-sided p per fact: the share of splits with T >= the observed T (column 0)."""
    return (effects >= effects[:, :1] - 1e-12).mean(1)


def benjamini_hochberg(p: Sequence[float] | np.ndarray, q: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg at false discovery rate `q`: (rejected, adjusted p). NaN p-values (untested) are
    neither counted nor rejected."""
    p = np.asarray(p, dtype=float)
    rejected = np.zeros(p.shape, dtype=bool)
    adjusted = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if not m:
        return rejected, adjusted
    idx = np.flatnonzero(ok)
    order = idx[np.argsort(p[idx], kind="stable")]
    ranked = p[order] * m / np.arange(1, m + 1)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    passing = np.flatnonzero(p[order] <= q * np.arange(1, m + 1) / m)
    if len(passing):
        rejected[order[: passing[-1] + 1]] = True
    return rejected, adjusted


def aggregate_p(effects: Sequence[np.ndarray], n_perm: int = N_AGGREGATE_PERM, seed: int = 0) -> float:
    """One-sided p of the summed T over strata (facts, or fact-transitions), each stratum's split drawn
    independently; `effects[k]` holds stratum k's T for each of its splits, the observed one first.
    p = (1 + #{sum >= observed}) / (1 + n_perm)."""
    if not effects:
        return float("nan")
    rng = np.random.default_rng(seed)
    observed = sum(float(e[0]) for e in effects)
    total = np.zeros(n_perm)
    for e in effects:
        total += e[rng.integers(0, len(e), n_perm)]
    return float((1 + (total >= observed - 1e-9).sum()) / (1 + n_perm))


def joint_permutation_p(
    dist: Float[np.ndarray, "fact rep rep"],
    groups: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    tested: np.ndarray,
    n_perm: int = N_AGGREGATE_PERM,
    seed: int = 0,
) -> tuple[float, float]:
    """The aggregate test of a sequence of checkpoints (a timeline): per fact, S = the sum over its tested
    `pairs` (i, j) of groups of T_ij = mean distance between replicates of groups i and j - the mean of the
    two groups' within distances; the null permutes all of a fact's replicates among the groups (every
    checkpoint the same function), independently across facts (their draws are independent). `groups`: the
    group of each replicate; `tested` [fact, pair]: which pairs count for each fact.

    Returns (the observed sum of S over facts divided by the number of tested pairs, one-sided p)."""
    n_groups = int(groups.max()) + 1
    sizes = np.bincount(groups, minlength=n_groups)
    within_pairs = sizes * (sizes - 1) / 2
    rng = np.random.default_rng(seed)
    d = np.nan_to_num(dist)
    gi = np.asarray([i for i, _ in pairs])
    gj = np.asarray([j for _, j in pairs])

    def sums(labels: np.ndarray, f: int) -> np.ndarray:
        member = (labels[:, None, :] == np.arange(n_groups)[None, :, None]).astype(float)  # [perm, group, rep]
        m = np.einsum("pen,nm,pgm->peg", member, d[f], member)
        cross = m[:, gi, gj] / (sizes[gi] * sizes[gj])
        within = (m[:, gi, gi] / 2 / within_pairs[gi] + m[:, gj, gj] / 2 / within_pairs[gj]) / 2
        return ((cross - within) * tested[f]).sum(1)

    observed, null = 0.0, np.zeros(n_perm)
    for f in range(d.shape[0]):
        if not tested[f].any():
            continue
        observed += float(sums(groups[None], f)[0])
        null += sums(np.stack([rng.permutation(groups) for _ in range(n_perm)]), f)
    n_tested = int(tested.sum())
    if not n_tested:
        return float("nan"), float("nan")
    return observed / n_tested, float((1 + (null >= observed - 1e-9).sum()) / (1 + n_perm))


def replicate_distances(
    scores: Float[Tensor, "rep fact edge"], sizes: Int[Tensor, " fact"]
) -> dict[str, Float[np.ndarray, "fact rep rep"]]:
    """Distances between every pair of replicate circuits of each fact, per statistic of
    `similarity.DISTANCES`: the edge-set distance of the top-`sizes[f]` edges (the fact's circuit size, the
    same for every replicate so that size cannot pass for change), and the weighted-Jaccard and rank
    distances of all scores."""
    n_rep, n_fact, _ = scores.shape
    s = scores.float()
    n = sizes.long().clamp(1, s.shape[-1])
    order = s.abs().argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1]).expand_as(order))
    masks = rank < n[None, :, None]
    ranks = [rank_rows(s[i]) for i in range(n_rep)]
    out = {stat: np.zeros((n_fact, n_rep, n_rep)) for stat in DISTANCES}
    for i, j in itertools.combinations(range(n_rep), 2):
        inter = (masks[i] & masks[j]).sum(1).double()
        union = (masks[i] | masks[j]).sum(1).double()
        values = {
            "edge_jaccard": (1 - inter / union.clamp_min(1)).numpy(),
            "weighted_jaccard": (1 - weighted_jaccard(s[i], s[j]).double()).numpy(),
            "spearman": 1 - (ranks[i] * ranks[j]).sum(1),
        }
        for stat in DISTANCES:
            out[stat][:, i, j] = out[stat][:, j, i] = values[stat]
    return out


@dataclass
class ChangeTest:
    """Per-fact and aggregate results of the calibrated change test between two sets of replicates.

    `table`: one row per (fact_id, statistic) with `cross` (mean distance between replicates of the two
    checkpoints), `within` (mean distance within a checkpoint: method noise), `effect` = cross - within,
    `p_value` (exact permutation), `q_value` (Benjamini-Hochberg over the tested facts), `included`,
    `changed_beyond_noise` (q_value <= alpha; NA for facts not tested).
    """

    table: pd.DataFrame
    n_replicates: tuple[int, int]
    family: str
    alpha: float = ALPHA

    def statistic(self, name: str) -> pd.DataFrame:
        """The rows of one statistic, indexed by fact id."""
        if name not in DISTANCES:
            raise CircuitdynError(f"unknown statistic {name!r}; choose one of {', '.join(DISTANCES)}")
        return self.table[self.table["statistic"] == name].set_index("fact_id")


def compare_replicates(
    reps_a: Float[Tensor, "rep fact edge"],
    reps_b: Float[Tensor, "rep fact edge"],
    fact_ids: Sequence[str],
    sizes: Int[Tensor, " fact"],
    *,
    included: np.ndarray | None = None,
    family: str = "estimation",
    alpha: float = ALPHA,
) -> tuple[ChangeTest, dict[str, list[np.ndarray]]]:
    """The calibrated change test of every fact between replicates `reps_a` and `reps_b` (same facts, same
    edges), and per statistic the split effects of each tested fact (for `aggregate_p`).

    `sizes`: each fact's circuit size for the edge-set distance; `included`: facts to test (others, e.g.
    those below the gap filter, get NA). BH runs over the tested facts of each statistic.
    """
    if reps_a.shape[1:] != reps_b.shape[1:]:
        raise CircuitdynError(f"replicates of different shapes: {tuple(reps_a.shape)} vs {tuple(reps_b.shape)}")
    if len(fact_ids) != reps_a.shape[1]:
        raise CircuitdynError(f"{len(fact_ids)} fact ids for {reps_a.shape[1]} facts of replicates")
    dist = replicate_distances(torch.cat([reps_a, reps_b]), sizes)
    return distance_test(
        dist, reps_a.shape[0], reps_b.shape[0], fact_ids, included=included, family=family, alpha=alpha
    )


def distance_test(
    dist: dict[str, Float[np.ndarray, "fact rep rep"]],
    r_a: int,
    r_b: int,
    fact_ids: Sequence[str],
    *,
    included: np.ndarray | None = None,
    family: str = "estimation",
    alpha: float = ALPHA,
) -> tuple[ChangeTest, dict[str, list[np.ndarray]]]:
    """`compare_replicates` from the replicates' distance matrices (`replicate_distances`; the first `r_a`
    replicates are side A), so that many tests can share one computation of the distances."""
    if min(r_a, r_b) < 2:
        raise CircuitdynError(f"the change test needs at least 2 replicates per checkpoint, got {r_a} and {r_b}")
    inc = np.ones(len(fact_ids), dtype=bool) if included is None else np.asarray(included, dtype=bool)
    groups = splits(r_a, r_b)
    if smallest_p(r_a, r_b) > alpha:
        warn(
            f"with {r_a} + {r_b} replicates the change test's smallest p is {smallest_p(r_a, r_b):.3f} > {alpha}: "
            "no fact can be flagged (draw 4 or more replicates per checkpoint)"
        )
    frames, per_stat = [], {}
    for stat in DISTANCES:
        effects = split_effects(dist[stat], groups)
        undefined = np.isnan(dist[stat]).any(axis=(1, 2))
        tested = inc & ~undefined
        obs = groups[0].astype(float)
        cross = np.einsum("fij,i,j->f", np.nan_to_num(dist[stat]), obs, 1 - obs) / (r_a * r_b)
        frames.append(
            pd.DataFrame(
                {
                    "fact_id": list(fact_ids),
                    "statistic": stat,
                    "cross": cross,
                    "within": cross - effects[:, 0],
                    "effect": np.where(undefined, np.nan, effects[:, 0]),
                    "p_value": np.where(tested, permutation_p(effects), np.nan),
                    "included": inc,
                }
            )
        )
        per_stat[stat] = [effects[i] for i in np.flatnonzero(tested)]
    table = with_fdr(pd.concat(frames, ignore_index=True), alpha)
    return ChangeTest(table, (r_a, r_b), family, alpha), per_stat


def with_fdr(table: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """`table` (rows with `statistic` and `p_value`) with `q_value` and `changed_beyond_noise` from
    Benjamini-Hochberg over all its tested rows of each statistic (NA where untested)."""
    out = table.copy()
    out["q_value"] = np.nan
    out["changed_beyond_noise"] = pd.array([pd.NA] * len(out), dtype="boolean")
    for stat in out["statistic"].unique():
        rows = np.flatnonzero((out["statistic"] == stat).to_numpy())
        p = out["p_value"].to_numpy(float)[rows]
        rejected, adjusted = benjamini_hochberg(p, alpha)
        out.iloc[rows, out.columns.get_loc("q_value")] = adjusted
        out.iloc[rows, out.columns.get_loc("changed_beyond_noise")] = pd.array(
            [bool(x) if not np.isnan(v) else pd.NA for x, v in zip(rejected, p)], dtype="boolean"
        )
    return out


def change_table(observed: dict[str, np.ndarray], fact_ids: Sequence[str], test: ChangeTest | None) -> pd.DataFrame:
    """Per fact and statistic: the observed distance between the two checkpoints' circuits beside the change
    test (`noise_distance` = mean distance between replicates of one checkpoint, `cross`, `effect`, `p_value`,
    `q_value`, `changed_beyond_noise`); without a test these are NA."""
    frames = []
    for stat in DISTANCES:
        df = pd.DataFrame(
            {"fact_id": list(fact_ids), "statistic": stat, "distance": np.asarray(observed[stat], dtype=float)}
        )
        if test is None:
            for col in ("noise_distance", "cross", "effect", "p_value", "q_value"):
                df[col] = np.nan
            df["changed_beyond_noise"] = pd.array([pd.NA] * len(df), dtype="boolean")
            df["n_replicates"] = 0
        else:
            t = test.statistic(stat).reindex(list(fact_ids))
            df["noise_distance"] = t["within"].to_numpy(float)
            for col in ("cross", "effect", "p_value", "q_value"):
                df[col] = t[col].to_numpy(float)
            df["changed_beyond_noise"] = pd.array(t["changed_beyond_noise"], dtype="boolean")
            df["n_replicates"] = sum(test.n_replicates)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def aggregate_verdict(
    table: pd.DataFrame, effects: list[np.ndarray], entities: Sequence[str], alpha: float = ALPHA, seed: int = 0
) -> dict[str, Any]:
    """The aggregate claim for one statistic: mean effect over the tested rows of `table` with its interval
    over entities, the stratified permutation p of the summed effect, and whether it clears `alpha` in the
    direction of change (a positive effect)."""
    rows = table[table["p_value"].notna()]
    groups = [entities[int(i)] for i in np.flatnonzero(table["p_value"].notna().to_numpy())]
    est = bootstrap_ci(rows["effect"].to_numpy(float), groups)
    p = aggregate_p(effects, seed=seed)
    return {
        "effect": est.to_dict(),
        "p_value": None if np.isnan(p) else round(p, 6),
        "n_tested": int(len(rows)),
        "n_changed_beyond_noise": int(rows["changed_beyond_noise"].fillna(False).sum()),
        "changed": bool(p <= alpha and est.value > 0) if not np.isnan(p) else None,
    }

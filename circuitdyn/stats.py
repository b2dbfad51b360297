"""Intervals and tests for statements about circuits: how sure, and resting on how many cases.

Facts of one entity are not independent (they share the entity's documents and representations), so
intervals come from a **cluster bootstrap over entities**: resample entities with replacement and take
all facts of each (`bootstrap_ci`). Comparisons between groups of transitions use a **permutation test
stratified by fact** (labels are shuffled among one fact's own transitions, so differences between facts
cannot pass for an effect; `permutation_test`). Every result carries the n it rests on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
N_PERM = 5000


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap interval and what it rests on (`n` cases in `n_groups` entities)."""

    value: float
    lo: float
    hi: float
    n: int
    n_groups: int
    level: float = LEVEL

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        if np.isnan(self.value):
            return f"- (n={self.n})"
        return (f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}] (n={self.n} in {self.n_groups} "
                f"{'entity' if self.n_groups == 1 else 'entities'})")


def cluster_bootstrap(
    groups: Sequence[Any],
    statistic: Callable[[np.ndarray], float],
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> Estimate:
    """`statistic(indices)` over all cases, with a percentile interval from resampling whole groups
    (entities) with replacement; `statistic` receives the indices of the resampled cases.

    With fewer than 2 groups the interval is NaN: one entity says nothing about the spread between entities.
    """
    g = np.asarray([str(x) for x in groups])
    if len(g) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0, level)
    names, inverse = np.unique(g, return_inverse=True)
    value = float(statistic(np.arange(len(g))))
    if len(names) < 2:
        return Estimate(value, float("nan"), float("nan"), len(g), len(names), level)
    members = [np.flatnonzero(inverse == k) for k in range(len(names))]
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        picks = rng.integers(0, len(names), len(names))
        stats[b] = statistic(np.concatenate([members[k] for k in picks]))
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(stats, [alpha, 1 - alpha]) if not np.isnan(stats).all() else (np.nan, np.nan)
    return Estimate(value, float(lo), float(hi), len(g), len(names), level)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Any],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> Estimate:
    """`statistic(values)` with a percentile interval from a cluster bootstrap over `groups` (entities).
    NaN values are dropped first (and not counted in n)."""
    v = np.asarray(values, dtype=float)
    g = np.asarray([str(x) for x in groups])
    if v.shape != g.shape:
        raise ValueError(f"values ({v.shape}) and groups ({g.shape}) differ in length")
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    return cluster_bootstrap(g, lambda idx: statistic(v[idx]), n_boot=n_boot, level=level, seed=seed)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive > a random negative), ties counted half (the Mann-Whitney AUC); NaN if a side is empty."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None, :]).mean() + (pos[:, None] == neg[None, :]).mean() / 2)


@dataclass(frozen=True)
class PermutationTest:
    """Observed difference of means (group 1 - group 0), its stratified-permutation p-value (two-sided),
    and the cases it rests on (strata with both labels are the only informative ones)."""

    difference: float
    p_value: float
    n_1: int
    n_0: int
    n_strata: int
    n_permutations: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(self).items()}


def permutation_test(
    values: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    strata: Sequence[Any],
    *,
    n_perm: int = N_PERM,
    seed: int = 0,
) -> PermutationTest:
    """Is the mean of `values` different where `labels` is True? Labels are permuted within each stratum
    (e.g. within a fact), so only strata holding both labels carry information; others are left out.
    p = (1 + #{|permuted difference| >= |observed|}) / (1 + n_perm)."""
    v = np.asarray(values, dtype=float)
    lab = np.asarray(labels, dtype=bool)
    st = np.asarray([str(x) for x in strata])
    keep = ~np.isnan(v)
    v, lab, st = v[keep], lab[keep], st[keep]
    informative = [s for s in np.unique(st) if lab[st == s].any() and (~lab[st == s]).any()]
    mask = np.isin(st, informative)
    v, lab, st = v[mask], lab[mask], st[mask]
    n1, n0 = int(lab.sum()), int((~lab).sum())
    if not n1 or not n0:
        return PermutationTest(float("nan"), float("nan"), n1, n0, len(informative), 0)
    observed = v[lab].mean() - v[~lab].mean()
    rng = np.random.default_rng(seed)
    idx = [np.flatnonzero(st == s) for s in informative]
    perm = lab.copy()
    extreme = 0
    for _ in range(n_perm):
        for ix in idx:
            perm[ix] = rng.permutation(lab[ix])
        if abs(v[perm].mean() - v[~perm].mean()) >= abs(observed) - 1e-12:
            extreme += 1
    return PermutationTest(float(observed), (1 + extreme) / (1 + n_perm), n1, n0, len(informative), n_perm)

"""Intervals and tests for statements about circuits: how sure, and resting on how many cases.

Facts of one entity are not independent (they share the entity's documents and representations), so the
interval of a mean over facts is a **cluster-robust t interval** with entities as clusters (`mean_ci`: the
CR2 sandwich variance of the mean, Bell and McCaffrey's small-sample correction for clusters of unequal size,
and a t quantile with G - 1 degrees of freedom, G = number of entities; with equal clusters it is CR1).
A ratio of sums over facts, such as the within-fact AUC (wins / pairs), has the same
interval for a ratio (`ratio_ci`), on the logit scale for a proportion. A percentile cluster bootstrap covers
far less than its nominal 95 % with few entities (see `interval_coverage`); it is kept only for statistics
without a variance formula (`cluster_bootstrap`), where resamples on which the statistic is undefined are
counted, never silently dropped. Below `MIN_ENTITIES` entities no interval is given and the text says so.
Comparisons between groups of transitions use a **permutation test stratified by fact** (labels are
shuffled among one fact's own transitions, so differences between facts cannot pass for an effect;
`permutation_test`). Every result carries the n it rests on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
N_PERM = 5000

MIN_ENTITIES = 8
"""Fewest entities (clusters) for which an interval is given. Simulated (`interval_coverage`, 3 facts per
entity, seed 1, 100,000 simulations; Wilson 95 % interval in brackets) the t interval covers: normal 0.95 at
every size from 2; beta 0.927 [0.925, 0.928] at 4, 0.928 at 5, 0.930 [0.928, 0.931] at 6, 0.932
[0.930, 0.933] at 7, 0.932 at 8. On real data (the change test's per-fact effects on SmolLM2-135M-Instruct,
24 facts of 9 entities, entities resampled; `circuitdyn calibrate`, 4,000 data sets per size) it covers
0.925 at 7 entities, 0.935 at 8 and 0.936 at 12 on null effects (truth 0) and 0.936-0.943 on planted-change
effects: hence 8, chosen after seeing that calibration, so the README's coverage at 8 is not an independent
check of this choice. The old percentile cluster bootstrap covers 0.81 (normal) / 0.77 (beta) at 4 entities
and 0.86 / 0.83 at 6 (4,000 simulations). Not covered by the rule: with entity means as skewed as
Beta(0.5, 4.5) ("skewed") the t interval covers 0.85 at 6 entities, 0.91 at 20 and 0.93 only from about 40
(20,000 simulations): intervals of means near 0 from few, very unequal entities run narrow."""

MAX_DROPPED = 0.05
"""Largest share of bootstrap resamples on which the statistic may be undefined (e.g. an AUC whose resample
lacks one side) before `cluster_bootstrap` refuses an interval: the defined ones are no longer a fair sample."""

DISTRIBUTIONS: tuple[str, ...] = ("normal", "beta")
"""The simulated distributions `MIN_ENTITIES` is measured on (`simulate_clustered` also has "skewed")."""


@dataclass(frozen=True)
class Estimate:
    """A statistic with its interval and what it rests on (`n` cases in `n_groups` entities).

    `lo`/`hi` are NaN when there is no interval: fewer than `min_groups` entities, or (bootstrap) too many
    resamples on which the statistic was undefined (`n_dropped` of `n_boot`); `interval_note` says which.
    """

    value: float
    lo: float
    hi: float
    n: int
    n_groups: int
    level: float = LEVEL
    n_dropped: int = 0
    n_boot: int = 0
    min_groups: int = MIN_ENTITIES

    @property
    def has_interval(self) -> bool:
        return not (np.isnan(self.lo) or np.isnan(self.hi))

    @property
    def interval_note(self) -> str | None:
        """Why there is no interval (None when there is one, or nothing to estimate)."""
        if np.isnan(self.value) or self.has_interval:
            return None
        if self.n_groups < self.min_groups:
            return f"too few entities for an interval, n={self.n_groups} < {self.min_groups}"
        if self.n_dropped:
            return f"no interval: the statistic is undefined on {self.n_dropped} of {self.n_boot} resamples"
        return "no interval"

    def to_dict(self) -> dict[str, Any]:
        d = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(self).items()}
        d["interval"] = self.interval_note
        return d

    def __str__(self) -> str:
        if np.isnan(self.value):
            return f"- (n={self.n})"
        where = f"n={self.n} in {self.n_groups} {'entity' if self.n_groups == 1 else 'entities'}"
        dropped = f"; undefined on {self.n_dropped} of {self.n_boot} resamples" if self.n_dropped else ""
        if not self.has_interval:
            shown = dropped if self.n_groups >= self.min_groups else ""
            return f"{self.value:.3f} ({where}; {self.interval_note}{shown})"
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}] ({where}{dropped})"


def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with `df` degrees of freedom (scipy.stats)."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


def _valid(values: Sequence[float] | np.ndarray, groups: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and their groups (as text) with NaN values dropped; the two must have one length."""
    v = np.asarray(values, dtype=float)
    g = np.asarray([str(x) for x in groups])
    if v.shape != g.shape:
        raise ValueError(f"values ({v.shape}) and groups ({g.shape}) differ in length")
    keep = ~np.isnan(v)
    return v[keep], g[keep]


def mean_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    *,
    level: float = LEVEL,
    min_groups: int = MIN_ENTITIES,
) -> Estimate:
    """Mean of `values` with a cluster-robust (CR2) t interval over `groups` (entities), none below
    `min_groups` groups: `ratio_ci` with unit denominators, so each entity's squared residual sum is divided by
    one minus its share of the facts (Bell and McCaffrey 2002; with equal entities this is CR1). NaN values are
    dropped first (and not counted in n)."""
    v, g = _valid(values, groups)
    return ratio_ci(v, np.ones_like(v), g, level=level, min_groups=min_groups)


def cluster_bootstrap(
    groups: Sequence[Any],
    statistic: Callable[[np.ndarray], float],
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    min_groups: int = MIN_ENTITIES,
    max_dropped: float = MAX_DROPPED,
) -> Estimate:
    """`statistic(indices)` over all cases, with a percentile interval from resampling whole groups
    (entities) with replacement; `statistic` receives the indices of the resampled cases.

    For statistics without a variance formula (e.g. the AUC; a mean has `mean_ci`). No interval below
    `min_groups` groups. Resamples on which the statistic is NaN or infinite are counted (`n_dropped`);
    when they exceed `max_dropped` of `n_boot` the interval is refused, since the defined ones are then a
    biased sample of the resampling distribution.
    """
    g = np.asarray([str(x) for x in groups])
    if len(g) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0, level, min_groups=min_groups)
    names, inverse = np.unique(g, return_inverse=True)
    value = float(statistic(np.arange(len(g))))
    if len(names) < max(2, min_groups):
        return Estimate(value, float("nan"), float("nan"), len(g), len(names), level, min_groups=min_groups)
    members = [np.flatnonzero(inverse == k) for k in range(len(names))]
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        picks = rng.integers(0, len(names), len(names))
        stats[b] = statistic(np.concatenate([members[k] for k in picks]))
    bad = ~np.isfinite(stats)
    n_dropped = int(bad.sum())
    lo = hi = float("nan")
    if n_dropped <= max_dropped * n_boot:
        alpha = (1 - level) / 2
        lo, hi = (float(x) for x in np.quantile(stats[~bad], [alpha, 1 - alpha]))
    return Estimate(value, lo, hi, len(g), len(names), level, n_dropped, n_boot, min_groups)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    min_groups: int = MIN_ENTITIES,
) -> Estimate:
    """`statistic(values)` with its interval over `groups` (entities): for the mean (the default) the
    CR2 t interval of `mean_ci`, for any other statistic a percentile cluster bootstrap
    (`cluster_bootstrap`). NaN values are dropped first (and not counted in n)."""
    if statistic is np.mean:
        return mean_ci(values, groups, level=level, min_groups=min_groups)
    v, g = _valid(values, groups)
    return cluster_bootstrap(
        list(g), lambda idx: statistic(v[idx]), n_boot=n_boot, level=level, seed=seed, min_groups=min_groups
    )


def simulate_clustered(
    rng: np.random.Generator, n_sims: int, n_entities: int, facts_per_entity: int, distribution: str
) -> tuple[np.ndarray, float]:
    """`n_sims` data sets [sim, entity, fact] of facts nested in entities, and their true mean.

    normal: 0.3 + entity effect N(0, 0.15) + fact noise N(0, 0.1). beta: distances in [0, 1]; the entity's
    mean ~ Beta(2, 8) (mean 0.2, right-skewed), its facts ~ Beta with that mean and concentration 10.
    skewed: as beta with entity means ~ Beta(0.5, 4.5) (mean 0.1, most entities near 0, a few far out) and
    concentration 5: the hard case for any interval built from a handful of entities.
    """
    shape = (n_sims, n_entities, 1)
    full = (n_sims, n_entities, facts_per_entity)
    if distribution == "normal":
        return 0.3 + rng.normal(0, 0.15, shape) + rng.normal(0, 0.1, full), 0.3
    params = {"beta": (2.0, 8.0, 10.0), "skewed": (0.5, 4.5, 5.0)}
    if distribution not in params:
        raise ValueError(f"unknown distribution {distribution!r}; choose among normal, beta, skewed")
    a, b, conc = params[distribution]
    m = np.clip(rng.beta(a, b, shape), 1e-6, 1 - 1e-6)
    return rng.beta(m * conc, (1 - m) * conc, full), a / (a + b)


def wilson(hits: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion hits / n."""
    from scipy import stats

    z = float(stats.norm.ppf(0.5 + level / 2))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def interval_coverage(
    n_entities: int,
    facts_per_entity: int = 3,
    n_sims: int = 2000,
    seed: int = 0,
    distribution: str = "normal",
    method: Literal["cr2", "percentile"] = "cr2",
    *,
    level: float = LEVEL,
    n_boot: int = 400,
) -> Estimate:
    """How often the 95 % interval of a mean over entity-clustered facts covers the true mean, in
    `n_sims` simulated data sets (`simulate_clustered`). `method`: "cr2" (`mean_ci`, applied here without
    the `MIN_ENTITIES` floor) or "percentile" (the percentile cluster bootstrap of the mean with `n_boot`
    resamples, vectorised). Returns the coverage with its Wilson interval (n = n_sims)."""
    rng = np.random.default_rng(seed)
    data, truth = simulate_clustered(rng, n_sims, n_entities, facts_per_entity, distribution)
    means = data.mean(-1)  # [sim, entity]; equal cluster sizes: the mean over facts = the mean of these
    centre = means.mean(1)
    if method == "cr2":
        half = t_quantile(1 - (1 - level) / 2, n_entities - 1) * means.std(1, ddof=1) / math.sqrt(n_entities)
        lo, hi = centre - half, centre + half
    elif method == "percentile":
        picks = rng.integers(0, n_entities, (n_sims, n_boot, n_entities))
        boot = np.take_along_axis(means[:, None, :], picks, 2).mean(-1)
        lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2], axis=1)
    else:
        raise ValueError(f"unknown method {method!r}")
    hits = int(((lo <= truth) & (truth <= hi)).sum())
    clo, chi = wilson(hits, n_sims, level)
    return Estimate(hits / n_sims, clo, chi, n_sims, n_entities, level, min_groups=0)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive > a random negative), ties counted half (the Mann-Whitney AUC); NaN if a side is empty."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None, :]).mean() + (pos[:, None] == neg[None, :]).mean() / 2)


def ratio_ci(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    *,
    level: float = LEVEL,
    min_groups: int = MIN_ENTITIES,
    logit: bool = False,
) -> Estimate:
    """sum(numerators) / sum(denominators) with a cluster-robust (CR2) t interval over `groups` (entities): the
    ratio's linearised residuals W_g - R N_g per group, each divided by one minus the group's share of the
    denominator, t quantile with G - 1 degrees of freedom (`mean_ci` is the case of unit denominators).
    `logit`: for a proportion in (0, 1), the interval is built on the logit scale (delta method) and mapped
    back, so it stays inside (0, 1) and is asymmetric near the edges; at 0 or 1 it falls back to the plain
    interval clipped to [0, 1]. n = number of cases (rows), n_groups = groups."""
    w = np.asarray(numerators, dtype=float)
    d = np.asarray(denominators, dtype=float)
    g = np.asarray([str(x) for x in groups])
    if not (w.shape == d.shape == g.shape):
        raise ValueError(f"numerators {w.shape}, denominators {d.shape} and groups {g.shape} differ in length")
    if len(w) == 0 or d.sum() <= 0:
        return Estimate(float("nan"), float("nan"), float("nan"), len(w), 0, level, min_groups=min_groups)
    names, inverse = np.unique(g, return_inverse=True)
    value = float(w.sum() / d.sum())
    if len(names) < max(2, min_groups):
        return Estimate(value, float("nan"), float("nan"), len(w), len(names), level, min_groups=min_groups)
    wg = np.bincount(inverse, weights=w, minlength=len(names))
    dg = np.bincount(inverse, weights=d, minlength=len(names))
    share = dg / dg.sum()
    var = float(((wg - value * dg) ** 2 / (1 - share)).sum()) / dg.sum() ** 2
    half = t_quantile(1 - (1 - level) / 2, len(names) - 1) * math.sqrt(var)
    if logit and 0 < value < 1:
        centre, spread = math.log(value / (1 - value)), half / (value * (1 - value))
        lo, hi = (1 / (1 + math.exp(-(centre + s * spread))) for s in (-1, 1))
    else:
        lo, hi = value - half, value + half
        if logit:
            lo, hi = max(lo, 0.0), min(hi, 1.0)
    return Estimate(value, lo, hi, len(w), len(names), level, min_groups=min_groups)


def within_stratum_auc(
    values: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    strata: Sequence[Any],
    groups: Sequence[Any],
    *,
    min_groups: int = MIN_ENTITIES,
) -> Estimate:
    """The AUC within strata (facts): per stratum holding both labels, P(a True case's value > a False
    case's), ties half; averaged over strata weighted by their number of (True, False) pairs. So differences
    between facts (one fact similar everywhere, another not) cannot pass for an effect, as in
    `permutation_test`. Interval: `ratio_ci` of the pooled wins / pairs over `groups` (each stratum's entity),
    on the logit scale. It replaced a percentile cluster bootstrap that covered the true AUC 0.87 (AUC 0.5) and
    0.89 (0.75) at 8 entities in 400 simulated stay-put studies, where this one covers 0.95 and 0.95
    (`tests/test_stats.py`); in the study's power curve it covers 0.925-0.980 at 8-60 entities
    (`examples/study/power.py`).
    n counts the informative strata; NaN values are dropped first."""
    v = np.asarray(values, dtype=float)
    lab = np.asarray(labels, dtype=bool)
    st = np.asarray([str(x) for x in strata])
    gr = np.asarray([str(x) for x in groups])
    keep = ~np.isnan(v)
    v, lab, st, gr = v[keep], lab[keep], st[keep], gr[keep]
    wins, pairs, entity = [], [], []
    for s in np.unique(st):
        here = st == s
        pos, neg = v[here & lab], v[here & ~lab]
        if len(pos) and len(neg):
            wins.append(float((pos[:, None] > neg[None, :]).sum() + (pos[:, None] == neg[None, :]).sum() / 2))
            pairs.append(len(pos) * len(neg))
            entity.append(gr[here][0])
    return ratio_ci(wins, pairs, entity, min_groups=min_groups, logit=True)


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

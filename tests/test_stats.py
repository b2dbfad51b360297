"""Intervals and tests: a cluster-robust interval that covers the truth, a stratified permutation test, the AUC."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm as sps_norm

from circuitdyn.analysis.stats import (
    DISTRIBUTIONS,
    MIN_ENTITIES,
    auc,
    bootstrap_ci,
    cluster_bootstrap,
    interval_coverage,
    mean_ci,
    permutation_test,
    t_quantile,
    wilson,
    within_stratum_auc,
)


def simulate(rng: np.random.Generator, n_entities: int = 12, per_entity: int = 3, mean: float = 0.3):
    """Facts nested in entities: an entity effect (sd 0.15) shared by its facts, plus fact noise (sd 0.1)."""
    entity_effect = rng.normal(0, 0.15, n_entities)
    values = np.concatenate([mean + e + rng.normal(0, 0.1, per_entity) for e in entity_effect])
    groups = np.repeat([f"e{i}" for i in range(n_entities)], per_entity)
    return values, groups


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("n_entities", [MIN_ENTITIES, MIN_ENTITIES + 3, 20])
def test_mean_interval_covers_the_truth_from_min_entities_on(distribution, n_entities):
    """At MIN_ENTITIES entities and above, the cluster t interval covers >= 0.93 minus sampling slack
    (3 standard errors of a coverage estimated from 3,000 simulations)."""
    cov = interval_coverage(n_entities, n_sims=3000, seed=11, distribution=distribution)
    assert cov.value >= 0.93 - 3 * np.sqrt(0.93 * 0.07 / 3000)
    assert cov.lo <= cov.value <= cov.hi and cov.n == 3000


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_old_percentile_bootstrap_fails_the_same_test_at_4_entities(distribution):
    """The percentile cluster bootstrap that `bootstrap_ci` used to give covers ~0.8 at 4 entities: the same
    bar as above rejects it (this is why the mean's interval is the cluster t interval)."""
    cov = interval_coverage(4, n_sims=1000, seed=11, distribution=distribution, method="percentile", n_boot=300)
    assert cov.value < 0.93 - 3 * np.sqrt(0.93 * 0.07 / 1000)
    assert cov.hi < 0.9


def test_t_quantile_and_wilson_hand_values():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 1000) == pytest.approx(1.9623, abs=1e-3)
    lo, hi = wilson(95, 100)
    assert (lo, hi) == pytest.approx((0.8882, 0.9785), abs=1e-3)


def test_mean_ci_with_equal_clusters_is_the_t_interval_on_entity_means():
    """Equal-sized clusters: the CR2 (= CR1) interval is the t interval on the entity means (G - 1 df)."""
    rng = np.random.default_rng(3)
    values, groups = simulate(rng, n_entities=8)
    est = mean_ci(values, groups)
    means = values.reshape(8, 3).mean(1)
    half = t_quantile(0.975, 7) * means.std(ddof=1) / np.sqrt(8)
    assert est.value == pytest.approx(values.mean())
    assert (est.lo, est.hi) == pytest.approx((values.mean() - half, values.mean() + half))
    assert bootstrap_ci(values, groups) == est  # the default statistic (mean) takes the same interval


def test_mean_ci_with_unequal_clusters_is_cr2_not_cr1():
    """Unequal clusters: each entity's squared residual sum is divided by one minus its leverage N_g / N (CR2,
    Bell-McCaffrey), not multiplied by G / (G - 1) (CR1); values worked by hand."""
    values = np.array([0.0, 1.0, 2.0, 4.0, 4.0, 6.0, 1.0, 3.0])
    groups = ["a", "b", "b", "c", "c", "c", "d", "e"]
    est = mean_ci(values, groups, min_groups=2)
    sums = np.array([-2.625, -2.25, 6.125, -1.625, 0.375])  # residual sums per entity, mean 2.625
    share = np.array([1, 2, 3, 1, 1]) / 8
    assert sums.sum() == pytest.approx(0)
    cr2 = np.sqrt((sums**2 / (1 - share)).sum()) / 8
    cr1 = np.sqrt(5 / 4 * (sums**2).sum()) / 8
    assert est.value == pytest.approx(2.625)
    assert est.hi - est.value == pytest.approx(t_quantile(0.975, 4) * cr2)
    assert abs(cr2 - cr1) > 0.01  # the two differ here, so the test tells them apart


def test_resampling_facts_instead_of_entities_would_be_too_narrow():
    """Why entities: treating the 36 correlated facts as independent gives intervals that miss far more often."""
    rng = np.random.default_rng(1)
    by_entity, by_fact = [], []
    for _ in range(300):
        values, groups = simulate(rng)
        a = mean_ci(values, groups)
        b = mean_ci(values, np.arange(len(values)))
        by_entity.append(a.lo <= 0.3 <= a.hi)
        by_fact.append(b.lo <= 0.3 <= b.hi)
    assert np.mean(by_fact) < np.mean(by_entity) - 0.1


def test_below_min_entities_no_interval_and_the_text_says_so():
    values = [0.4, 0.5, 0.45, 0.3, 0.35, 0.32, 0.5, 0.55, 0.52]
    groups = np.repeat(["a", "b", "c"], 3)
    est = bootstrap_ci(values, groups)
    assert np.isnan(est.lo) and np.isnan(est.hi) and not est.has_interval
    text = str(est)
    assert "[" not in text
    assert f"(n=9 in 3 entities; too few entities for an interval, n=3 < {MIN_ENTITIES})" in text
    assert est.to_dict()["interval"] == f"too few entities for an interval, n=3 < {MIN_ENTITIES}"
    assert est.to_dict()["lo"] is None
    boot = cluster_bootstrap(groups, lambda idx: float(np.asarray(values)[idx].mean()))
    assert not boot.has_interval and "too few entities" in str(boot)
    enough = mean_ci(np.arange(MIN_ENTITIES, dtype=float), np.arange(MIN_ENTITIES))
    assert enough.has_interval and enough.to_dict()["interval"] is None


def test_dropped_resamples_are_counted_and_too_many_refuse_the_interval():
    """An AUC is undefined on resamples holding one side only: they are counted, never silently dropped."""
    groups = np.arange(12)
    positive = np.zeros(12, bool)
    positive[0] = True  # one entity holds the only positive: ~1/e of resamples miss it
    values = np.linspace(0, 1, 12)
    est = cluster_bootstrap(
        groups, lambda idx: auc(values[idx][positive[idx]], values[idx][~positive[idx]]), n_boot=500
    )
    assert 100 < est.n_dropped < 250 and est.n_boot == 500
    assert not est.has_interval and "undefined on" in str(est) and est.to_dict()["n_dropped"] == est.n_dropped
    ok = cluster_bootstrap(groups, lambda idx: float(values[idx].mean()), n_boot=200)
    assert ok.n_dropped == 0 and ok.has_interval
    few = cluster_bootstrap(
        groups, lambda idx: float(values[idx].mean()) if 0 in idx else float("nan"), n_boot=200, max_dropped=1.0
    )
    assert few.has_interval and few.n_dropped > 0 and f"undefined on {few.n_dropped} of 200" in str(few)


def test_bootstrap_reports_what_it_rests_on():
    est = bootstrap_ci([1.0, 2.0, float("nan"), 4.0], ["a", "a", "b", "c"])
    assert (est.n, est.n_groups, est.value) == (3, 2, pytest.approx(7 / 3))
    one = bootstrap_ci([1.0, 2.0], ["a", "a"], min_groups=1)
    assert one.n_groups == 1 and np.isnan(one.lo) and np.isnan(one.hi)  # one entity: no spread to estimate
    empty = bootstrap_ci([], [])
    assert empty.n == 0 and np.isnan(empty.value)
    assert "n=3 in 2 entities" in str(est)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], ["a", "b"])
    idx_mean = cluster_bootstrap(
        ["a", "b", "b"], lambda idx: float(np.array([1.0, 2.0, 3.0])[idx].mean()), min_groups=2
    )
    assert idx_mean.value == pytest.approx(2.0) and idx_mean.lo <= 2.0 <= idx_mean.hi
    median = bootstrap_ci(np.arange(10.0), np.arange(10), np.median, n_boot=200)
    assert median.value == pytest.approx(4.5) and median.has_interval


def test_auc_hand_values():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    assert np.isnan(auc(np.array([]), np.array([1.0])))


def test_permutation_test_within_strata():
    rng = np.random.default_rng(2)
    strata = np.repeat(np.arange(20), 4)
    labels = np.tile([True, True, False, False], 20)
    fact_level = np.repeat(rng.normal(0, 5, 20), 4)  # large differences between facts, none within
    null = fact_level + rng.normal(0, 1, 80)
    effect = null + np.where(labels, 1.5, 0.0)
    p_null = permutation_test(null, labels, strata, n_perm=999, seed=0)
    p_effect = permutation_test(effect, labels, strata, n_perm=999, seed=0)
    assert p_null.p_value > 0.05 and p_effect.p_value < 0.01
    assert p_effect.difference == pytest.approx(1.5, abs=0.5)
    assert (p_effect.n_1, p_effect.n_0, p_effect.n_strata) == (40, 40, 20)
    # strata holding one label only carry no information and are left out
    lone = permutation_test([1.0, 2.0, 3.0, 4.0], [True, True, True, False], ["a", "a", "b", "b"], n_perm=99)
    assert lone.n_strata == 1 and (lone.n_1, lone.n_0) == (1, 1)
    nothing = permutation_test([1.0, 2.0], [True, True], ["a", "b"], n_perm=99)
    assert nothing.n_strata == 0 and np.isnan(nothing.p_value)


def test_within_fact_auc_agrees_with_the_stratified_test_where_the_pooled_auc_does_not():
    """Each of 8 informative facts (8 entities) is more similar on its retained transitions (+0.1), but
    facts recalled throughout sit low and facts that only flip sit high, so the AUC pooled across facts says
    the opposite (< 0.5). The within-fact AUC, like the permutation test's difference, says retained > flipped."""
    values, labels, facts = [], [], []
    for i in range(8):
        base = 0.3 + 0.05 * i
        values += [base + 0.1, base + 0.1, base]
        labels += [True, True, False]
        facts += [f"f{i}"] * 3
    for i in range(6):  # retained only, low similarity
        values += [0.05, 0.06]
        labels += [True, True]
        facts += [f"r{i}"] * 2
    for i in range(6):  # flipped only, high similarity
        values += [0.95]
        labels += [False]
        facts += [f"x{i}"]
    v, lab, f = np.array(values), np.array(labels), np.array(facts)
    pooled = auc(v[lab], v[~lab])
    within = within_stratum_auc(v, lab, f, f)
    test = permutation_test(v, lab, f, n_perm=199)
    assert pooled < 0.5 and test.difference > 0
    assert within.value == 1.0 and within.n == 8 and within.lo > 0.5
    assert np.sign(within.value - 0.5) == np.sign(test.difference)
    ties = within_stratum_auc(
        [1.0, 1.0, 2.0, 0.0], [True, False, True, False], ["a", "a", "b", "b"], ["a", "a", "b", "b"]
    )
    assert ties.value == pytest.approx((0.5 + 1.0) / 2) and not ties.has_interval  # 2 entities: no interval


def _stay_put_study(rng: np.random.Generator, n_entities: int, auc_true: float) -> tuple[np.ndarray, ...]:
    """Facts nested in entities, each with 8 transitions labelled retained (True) or flipped at random; within a
    fact a retained similarity beats a flipped one with probability `auc_true` (normal noise)."""
    delta = np.sqrt(2) * 0.1 * float(sps_norm.ppf(auc_true))
    v, lab, fact, ent = [], [], [], []
    for e in range(n_entities):
        u = rng.normal(0, 0.05)
        for f in range(3):
            kept = rng.random(8) < 0.6
            mu = rng.normal(0.4, 0.1)
            v += list(mu + u + rng.normal(0, 0.1, 8) - np.where(kept, 0, delta))
            lab += list(kept)
            fact += [f"e{e}f{f}"] * 8
            ent += [f"e{e}"] * 8
    return np.array(v), np.array(lab), np.array(fact), np.array(ent)


def _pooled_auc_parts(v: np.ndarray, lab: np.ndarray, fact: np.ndarray, ent: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per informative fact: wins, pairs and its entity (what `within_stratum_auc` pools)."""
    rows = []
    for f in np.unique(fact):
        pos, neg = v[(fact == f) & lab], v[(fact == f) & ~lab]
        if len(pos) and len(neg):
            rows.append(((pos[:, None] > neg[None, :]).sum(), len(pos) * len(neg), ent[fact == f][0]))
    w, p, e = zip(*rows)
    return np.array(w, float), np.array(p, float), np.array(e)


@pytest.mark.parametrize("auc_true", [0.5, 0.75])
def test_within_fact_auc_interval_covers_the_true_auc(auc_true):
    """The stay-put AUC's interval (logit CR2 over entities) covers the true within-fact AUC >= 0.93 minus
    sampling slack at MIN_ENTITIES entities; the percentile cluster bootstrap it replaced falls below that."""
    rng = np.random.default_rng(5)
    n = 400
    hits = boot_hits = 0
    for s in range(n):
        v, lab, fact, ent = _stay_put_study(rng, MIN_ENTITIES, auc_true)
        est = within_stratum_auc(v, lab, fact, ent)
        hits += est.lo <= auc_true <= est.hi
        w, p, e = _pooled_auc_parts(v, lab, fact, ent)
        old = cluster_bootstrap(e, lambda idx, w=w, p=p: float(w[idx].sum() / p[idx].sum()), n_boot=200, seed=s)
        boot_hits += old.lo <= auc_true <= old.hi
    slack = 3 * np.sqrt(0.93 * 0.07 / n)
    assert hits / n >= 0.93 - slack
    assert boot_hits / n < hits / n

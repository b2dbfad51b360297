"""Verdict sentences check direction: each is fed synthetic results in each direction."""

from __future__ import annotations

from typing import Any

from circuitdyn.analysis.report import _change_verdict, describe_stability, describe_transfer, estimate
from circuitdyn.analysis.stats import MIN_ENTITIES, mean_ci

STAY = "evidence that circuits stay more similar while a fact stays recalled"
LESS = "evidence that circuits are *less* similar while a fact stays recalled than when recall flips"
NAN = float("nan")


def stability(
    difference: float, p: float, auc: float, ci: tuple[float, float], note: str | None = None
) -> dict[str, Any]:
    """A `Timeline.stability()` result with the given test and AUC."""
    st: dict[str, Any] = {
        "fact_choice": "seeded sample, before outcomes",
        "n_entities": 9,
        "auc": auc,
        "auc_ci": list(ci),
        "auc_n_facts": 12,
        "auc_interval": note,
        "permutation": {
            "difference": difference,
            "p_value": p,
            "n_1": 30,
            "n_0": 10,
            "n_strata": 12,
            "n_permutations": 5000,
        },
    }
    for name in ("retained", "forgotten", "acquired", "unknown"):
        st |= {f"mean_{name}": 0.5, f"ci_{name}": [0.4, 0.6], f"n_{name}": 10}
    return st


def verdict(st: dict[str, Any]) -> str:
    return describe_stability(st)[-1]


def test_stay_put_evidence_needs_a_positive_difference_and_an_auc_above_half():
    """Catches: the stay-put sentence printed without checking the sign of the difference or which side of
    0.5 the AUC interval lies (the issue's AUC 0.10 [0.05, 0.20], p = 0.001 printed it)."""
    assert STAY in verdict(stability(+0.2, 0.001, 0.85, (0.75, 0.93)))
    reversed_ = verdict(stability(-0.2, 0.001, 0.10, (0.05, 0.20)))
    assert STAY not in reversed_


def test_less_similar_evidence_needs_a_negative_difference_and_an_auc_below_half():
    """Catches: the opposite verdict printed for a result pointing the stay-put way (or never printed)."""
    assert LESS in verdict(stability(-0.2, 0.001, 0.10, (0.05, 0.20)))
    assert LESS not in verdict(stability(+0.2, 0.001, 0.85, (0.75, 0.93)))


def test_test_and_auc_pointing_opposite_ways_is_no_evidence():
    """Catches: a verdict taken from the test's sign alone, or from the AUC interval alone."""
    for st in (stability(+0.2, 0.001, 0.10, (0.05, 0.20)), stability(-0.2, 0.001, 0.85, (0.75, 0.93))):
        v = verdict(st)
        assert "point in opposite directions" in v and STAY not in v and LESS not in v


def test_interval_including_half_or_large_p_is_no_evidence():
    """Catches: dropping the p-value check or the 0.5-inside-the-interval check."""
    assert "no evidence either way at this size" in verdict(stability(+0.2, 0.2, 0.85, (0.75, 0.93)))
    assert "no evidence either way at this size" in verdict(stability(-0.2, 0.2, 0.10, (0.05, 0.20)))
    assert "no evidence either way at this size" in verdict(stability(+0.2, 0.001, 0.6, (0.45, 0.75)))
    assert "no evidence either way at this size" in verdict(stability(-0.2, 0.001, 0.4, (0.25, 0.55)))


def test_no_auc_interval_is_no_evidence_and_says_why():
    """Catches: a verdict drawn from an AUC without an interval (too few entities)."""
    note = f"too few entities for an interval, n=3 < {MIN_ENTITIES}"
    for d, a in ((+0.2, 0.9), (-0.2, 0.1)):
        lines = describe_stability(stability(d, 0.001, a, (NAN, NAN), note))
        assert note in lines[-1] and "no evidence either way" in lines[-1]
        assert note in lines[-2] and "[" not in lines[-2].split("AUC within facts")[1].split("(P(")[0]


def aggregate(value: float, p: float, n_changed: int = 3) -> dict[str, Any]:
    """An aggregate change-test result (`change_test.aggregate_verdict`) with the given mean effect and p."""
    return {
        "effect": {"value": value, "lo": value - 0.05, "hi": value + 0.05, "n": 30, "n_groups": 9},
        "p_value": p,
        "n_tested": 20,
        "n_changed_beyond_noise": n_changed,
        "changed": None,
    }


def test_change_claimed_only_for_a_positive_effect_below_alpha():
    """Catches: 'moved more than method noise' from a small p alone (sign of the effect ignored)."""
    assert _change_verdict(aggregate(0.1, 0.001)).startswith("circuits moved more than method noise")
    for v in (_change_verdict(aggregate(-0.1, 0.001)), _change_verdict(aggregate(0.1, 0.2))):
        assert not v.startswith("circuits moved more than method noise")


def test_negative_effect_says_less_than_between_replicates():
    """Catches: a negative effect (checkpoints closer than replicates) read as change or as mere 'no evidence'."""
    v = _change_verdict(aggregate(-0.1, 0.9))
    assert "circuits moved less between the checkpoints than between replicates of one checkpoint" in v
    assert "less between" not in _change_verdict(aggregate(0.1, 0.9))


def test_positive_effect_above_alpha_is_no_evidence():
    """Catches: a positive but non-significant effect claimed as change."""
    assert _change_verdict(aggregate(0.02, 0.3)).startswith("no evidence that circuits moved more than method noise")
    assert _change_verdict(None) == "nothing to test"


def test_transfer_says_too_few_entities_for_an_interval():
    """Catches: a transfer estimate printed as if it had an interval when there are too few entities."""
    few = mean_ci([0.8, 0.9, 0.7], ["a", "b", "c"]).to_dict()
    many = mean_ci([0.8, 0.9, 0.7, 0.6, 0.85, 0.75, 0.8, 0.65], list("abcdefgh")).to_dict()
    line = describe_transfer(
        {
            "first": 0,
            "last": 5,
            "first_circuit_on_last_model": few,
            "last_circuit_on_last_model": many,
            "n_pairs_excluded_gap": 1,
            "n_pairs": 10,
            "min_gap": 1.0,
        }
    )[0]
    assert f"0.800 (n=3 in 3 entities; too few entities for an interval, n=3 < {MIN_ENTITIES})" in line
    assert estimate(many) in line and "[" in estimate(many)

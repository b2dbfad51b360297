"""`circuitdyn calibrate` on a real (tiny) checkpoint, and the change test's error rates in simulation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitdyn.analysis.calibration import coverage, markdown_table
from circuitdyn.analysis.change_test import ALPHA, aggregate_p, benjamini_hochberg, compare_replicates
from circuitdyn.analysis.stats import MIN_ENTITIES
from circuitdyn.cli import main


def test_calibrate_on_a_trained_checkpoint(trained_pair_run, tmp_path, capsys):
    run, probes = trained_pair_run
    args = [
        "calibrate",
        f"{run}:1",
        "--probes",
        str(probes),
        "--steps",
        "2",
        "--replicates",
        "4",
        "--null-tests",
        "2",
        "--strengths",
        "0.5,1",
        "--circuits",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "cal.json"),
    ]
    assert main([*args, "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert cal == json.loads((tmp_path / "cal.json").read_text())
    assert cal["n_tested"] == 6 and cal["n_entities"] == 3
    for key in ("fact_fpr", "aggregate_fpr"):
        assert set(cal[key]) >= {"value", "lo", "hi", "n"} and 0 <= cal[key]["lo"] <= cal[key]["hi"] <= 1
    assert cal["fact_fpr"]["n"] == 6 * 2 and cal["aggregate_fpr"]["n"] == 200
    assert [p["strength"] for p in cal["power"]] == [0.5, 1.0] and all(p["n"] == 6 for p in cal["power"])
    assert cal["planted_component"].startswith("m")
    # zeroing the MLP that carries most of the circuits moves every fact's circuit beyond its replicates
    assert cal["power"][-1]["value"] == 1.0 and cal["power"][-1]["aggregate_p"] <= ALPHA
    assert {c["n_entities"] for c in cal["coverage"]} == {4, 7, 8, 12}
    assert all("note" in c for c in cal["coverage"] if c["n_entities"] < MIN_ENTITIES)
    # a re-run reuses every replicate (nothing is attributed again) and gives the same numbers
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "c").rglob("*.safetensors")}
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "per-fact false-positive rate" in text and "planted:" in text
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "c").rglob("*.safetensors")} == stamps


def test_coverage_counts_printed_intervals_against_the_given_truth():
    """Null effects are checked against their known truth (0), others against the mean they are drawn from;
    entity counts below MIN_ENTITIES print no interval and are reported as such."""
    rng = np.random.default_rng(0)
    entities = [f"e{i // 3}" for i in range(30)]
    samples = 1.0 + 0.1 * rng.standard_normal((30, 5))
    own = coverage(samples, entities, [MIN_ENTITIES - 1, MIN_ENTITIES], "planted", seed=1)
    assert own[0]["n"] == 0 and "too few entities" in own[0]["note"]
    assert own[1]["n"] > 0 and own[1]["value"] >= 0.9
    zero = coverage(samples, entities, [MIN_ENTITIES], "null", seed=1, truth=0.0)
    assert zero[0]["value"] == 0.0  # an interval around 1 never covers a truth of 0


def test_calibrate_bad_inputs(trained_pair_run, capsys):
    run, probes = trained_pair_run
    assert main(["calibrate", f"{run}:1", "--probes", str(probes), "--replicates", "1"]) == 2
    assert "--replicates" in capsys.readouterr().err
    assert main(["calibrate", f"{run}:1", "--probes", str(probes), "--strengths", "0,1"]) == 2
    assert "--strengths" in capsys.readouterr().err
    assert main(["calibrate", f"{run}:7", "--probes", str(probes)]) == 2
    assert "epoch" in capsys.readouterr().err


def _null_and_moved(rng: np.random.Generator, n_facts: int, r: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicates of two checkpoints whose circuits differ by `shift` (0: exchangeable, the null)."""
    base = torch.from_numpy(rng.standard_normal((n_facts, 200)) * rng.random((n_facts, 200)) ** 2).float()
    moved = base + shift * torch.from_numpy(rng.standard_normal((n_facts, 200))).float()
    noise = 0.3
    a = base[None] + noise * torch.from_numpy(rng.standard_normal((r, n_facts, 200))).float()
    b = moved[None] + noise * torch.from_numpy(rng.standard_normal((r, n_facts, 200))).float()
    return a, b


def old_quantile_rule(dist: np.ndarray, r: int) -> np.ndarray:
    """The rule before calibration: the distance between the two checkpoints' circuits counts as change when it
    exceeds the linear 95th percentile of the 6 distances among 3 replicates at each checkpoint (kept here to
    show that the simulation catches an anti-conservative rule)."""
    a, b = [0, 1, 2], [r, r + 1, r + 2]
    within = [dist[:, i, j] for side in (a, b) for k, i in enumerate(side) for j in side[k + 1 :]]
    return dist[:, 3, r + 3] > np.quantile(np.stack(within, 1), 0.95, axis=1)


def test_false_positive_rate_under_an_exchangeable_null():
    """Per-fact tests on replicates that differ only by draw (600 tests): the rate of p <= 0.05 stays within
    0.05 + 2 binomial standard errors. The pre-calibration quantile rule fails the same check (~18-28 %)."""
    from circuitdyn.analysis.change_test import replicate_distances

    rng = np.random.default_rng(0)
    r, n_facts, rounds = 5, 30, 20
    hits = old = n = 0
    for _ in range(rounds):
        a, b = _null_and_moved(rng, n_facts, r, 0.0)
        test, _ = compare_replicates(a, b, [f"e{i // 3}/q/{i}" for i in range(n_facts)], torch.full((n_facts,), 20))
        p = test.statistic("edge_jaccard")["p_value"].to_numpy()
        hits += int((p <= ALPHA).sum())
        n += len(p)
        old += int(
            old_quantile_rule(
                replicate_distances(torch.cat([a, b]), torch.full((n_facts,), 20))["edge_jaccard"], r
            ).sum()
        )
    bound = ALPHA + 2 * np.sqrt(ALPHA * (1 - ALPHA) / n)
    assert hits / n <= bound, f"per-fact false-positive rate {hits / n:.3f} over {n} null tests"
    assert old / n > bound, "the simulation must be able to catch an anti-conservative rule"


def test_power_against_a_planted_shift_and_fdr_over_facts():
    """A shift larger than the replicates' spread is found in every fact; after Benjamini-Hochberg over a mix of
    changed and unchanged facts, few unchanged ones are flagged."""
    rng = np.random.default_rng(1)
    a, b = _null_and_moved(rng, 20, 5, 1.0)
    test, effects = compare_replicates(a, b, [f"f{i}" for i in range(20)], torch.full((20,), 20))
    t = test.statistic("weighted_jaccard")
    assert (t["p_value"] <= ALPHA).all() and t["changed_beyond_noise"].all() and (t["effect"] > 0).all()
    assert aggregate_p(effects["weighted_jaccard"]) <= 1 / 1000
    null_a, null_b = _null_and_moved(rng, 20, 5, 0.0)
    mixed = compare_replicates(
        torch.cat([a, null_a], 1), torch.cat([b, null_b], 1), [f"f{i}" for i in range(40)], torch.full((40,), 20)
    )[0].statistic("weighted_jaccard")
    assert mixed["changed_beyond_noise"].iloc[:20].all() and mixed["changed_beyond_noise"].iloc[20:].sum() <= 1


def test_benjamini_hochberg_against_hand_values():
    rejected, q = benjamini_hochberg([0.01, 0.04, 0.03, 0.2, float("nan")], 0.05)
    # ranks: 0.01 (1), 0.03 (2), 0.04 (3), 0.2 (4); thresholds 0.0125, 0.025, 0.0375, 0.05: only 0.01 passes
    assert rejected.tolist() == [True, False, False, False, False]
    assert np.allclose(q[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.2]) and np.isnan(q[4])  # step-up minimum


def test_aggregate_test_is_calibrated_and_direction_aware():
    """Stratified aggregate p under the null: P(p <= 0.05) within sampling error; a negative shift (checkpoints
    closer than replicates) never fires."""
    rng = np.random.default_rng(2)
    fired = 0
    for _ in range(100):
        effects = [rng.standard_normal(20) for _ in range(8)]  # strata of exchangeable effects
        fired += aggregate_p(effects, n_perm=400, seed=int(rng.integers(1 << 30))) <= ALPHA
    assert fired <= 100 * ALPHA + 2 * np.sqrt(100 * ALPHA * (1 - ALPHA)) + 1
    low = [np.concatenate([[-3.0], rng.standard_normal(19)]) for _ in range(8)]
    assert aggregate_p(low, seed=0) > 0.5


@pytest.mark.parametrize("r", [2, 3])
def test_too_few_replicates_are_said_to_be_powerless(r, capsys):
    a, b = _null_and_moved(np.random.default_rng(3), 4, r, 1.0)
    test, _ = compare_replicates(a, b, ["a", "b", "c", "d"], torch.full((4,), 20))
    assert not test.table["changed_beyond_noise"].any()
    assert "no fact can be flagged" in capsys.readouterr().err


def test_joint_permutation_over_a_timeline_is_calibrated_and_finds_change():
    """A timeline's aggregate test permutes each fact's replicates across all epochs: under the null (every
    epoch the same function) it fires at most at its level; a change at one epoch is found."""
    from circuitdyn.analysis.change_test import joint_permutation_p, replicate_distances

    rng = np.random.default_rng(4)
    r, epochs, n_facts = 4, 3, 6
    groups = np.repeat(np.arange(epochs), r)
    pairs = [(0, 1), (1, 2)]
    tested = np.ones((n_facts, 2), dtype=bool)
    fired = 0
    for _ in range(60):
        base = torch.from_numpy(rng.standard_normal((n_facts, 100))).float()
        reps = base[None] + 0.5 * torch.from_numpy(rng.standard_normal((r * epochs, n_facts, 100))).float()
        dist = replicate_distances(reps, torch.full((n_facts,), 10))["weighted_jaccard"]
        p = joint_permutation_p(dist, groups, pairs, tested, n_perm=200, seed=int(rng.integers(1 << 30)))[1]
        fired += p <= ALPHA
    assert fired <= 60 * ALPHA + 2 * np.sqrt(60 * ALPHA * (1 - ALPHA)) + 1
    reps[r * 2 :] += 1.0 * torch.from_numpy(rng.standard_normal((n_facts, 100))).float()
    dist = replicate_distances(reps, torch.full((n_facts,), 10))["weighted_jaccard"]
    effect, p = joint_permutation_p(dist, groups, pairs, tested, n_perm=500)
    assert effect > 0 and p <= 1 / 100


def test_readme_quotes_the_stored_calibration():
    """The README's error-rate table is the stored calibration JSON, rendered: re-running the documented
    command and storing its JSON without updating the README (or the reverse) fails here."""
    repo = Path(__file__).resolve().parents[1]
    cal = json.loads((repo / "examples" / "results" / "calibration_smollm2.json").read_text())
    table = markdown_table(cal)
    assert table in (repo / "README.md").read_text()
    assert "| per-fact test fires under the null" in table and "coverage 8 entities (null effects): 0.934" in table
    question = json.loads((repo / "examples" / "results" / "calibration_smollm2_question.json").read_text())
    assert question["settings"]["family"] == "question"
    assert markdown_table(question) in (repo / "docs" / "measuring-change.md").read_text()

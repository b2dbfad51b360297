"""Change against method noise, end to end on real (tiny) models: a checkpoint against itself is a real null
(the two sides' replicates are independent draws, so the test could fire, and at this seed does not); two
models that recall the same facts but were trained from different random inits have different circuits."""

from __future__ import annotations

import json

from circuitdyn.cli import main


def test_self_diff_is_within_noise_and_different_inits_are_not(trained_pair_run, capsys):
    run, probes = trained_pair_run
    common = ["--probes", str(probes), "--steps", "2", "--json", "--out", str(run / "d.html")]
    assert main(["diff", f"{run}:1", f"{run}:1", *common]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["selection"]["spec"] == "faith:0.8"  # the default: circuits sized by faithfulness
    assert same["summary"]["n_included"] == 6, "the trained facts must have a clear clean-corrupted gap"
    assert same["n_changed_beyond_noise"] == 0 and same["summary"]["n_tested"] == 6
    assert all(v["edge_jaccard"]["distance"] == 0.0 for v in same["changes"].values())
    # the two sides' replicates are other draws (identical draws would give p = 1 for every fact)
    assert any(v[s]["p_value"] < 1 for v in same["changes"].values() for s in v)
    assert same["summary"]["edge_jaccard"]["changed"] is False
    assert same["baseline"]["epochs"] == [1] and same["baseline"]["edge_jaccard"]["n_per_fact"] >= 1

    assert main(["diff", f"{run}:0", f"{run}:1", *common]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["summary"]["n_included"] == 6
    assert other["n_changed_beyond_noise"] > 0 and other["summary"]["edge_jaccard"]["changed"] is True
    assert other["baseline"]["epochs"] == [0, 1]
    effect = other["ci"]["edge_jaccard"]["effect"]
    assert effect["value"] > 0 and effect["n"] == 6 and effect["n_groups"] == 3
    assert other["summary"]["circuit_size"]["a"]["median"] > 0
    assert other["summary"]["faithfulness_reached"]["a"]["min"] >= 0.8

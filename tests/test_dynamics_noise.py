"""Change against method noise, end to end on real (tiny) models: a checkpoint against itself is a real null
(the two sides' replicates are independent draws, so the test could fire, and at this seed does not); two
models that recall the same facts but were trained from different random inits have different circuits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from circuitdyn.cli import main


def diff_json(
    a: str, b: str, probes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *options: str
) -> dict[str, Any]:
    """`circuitdyn diff A B` on the probe file with 2 IG steps and `options`, circuits and viewer under tmp_path:
    the JSON it prints (the command must succeed)."""
    argv = ["diff", a, b, "--probes", str(probes), "--steps", "2", *options, "--json"]
    assert main([*argv, "--circuits", str(tmp_path / "c"), "--out", str(tmp_path / "d.html")]) == 0
    return json.loads(capsys.readouterr().out)


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


def test_a_copy_with_tiny_weight_noise_is_not_flagged(trained_pair_run, tmp_path, capsys):
    """The same function (weights x (1 + 1e-4 noise)) diffed against the checkpoint: its circuits differ only as
    much as replicates do, so no fact is flagged after false-discovery control and the aggregate test does not
    fire; the replicates of the two model folders are independent draws (not one copy of the other)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    run, probes = trained_pair_run
    copy = tmp_path / "copy"
    shutil.copytree(run / "epoch_1", copy)
    weights = copy / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    state = {k: v * (1 + 1e-4 * torch.randn(v.shape, generator=g)) for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    d = diff_json(f"{run}:1", str(copy), probes, tmp_path, capsys)
    assert d["summary"]["n_tested"] == 6 and d["n_changed_beyond_noise"] == 0
    assert d["summary"]["edge_jaccard"]["changed"] is False
    assert any(v["edge_jaccard"]["p_value"] < 1 for v in d["changes"].values())


def test_pruned_circuits_are_checked_on_a_corruption_they_were_not_pruned_on(trained_pair_run, tmp_path, capsys):
    """`pruned:` circuits are pruned and scored on one corruption: the diff also reports their faithfulness on
    the next swap partner (both numbers, per fact and summarised)."""
    run, probes = trained_pair_run
    d = diff_json(f"{run}:0", f"{run}:1", probes, tmp_path, capsys, "--select", "pruned:0.8", "--no-noise")
    facts = [v for k, v in d["facts"].items() if not k.startswith("(")]
    assert all(v["faith_a"] is not None and v["faith_a"] >= 0.8 for v in facts)
    held = [v["faith_heldout_a"] for v in facts if v["faith_heldout_a"] is not None]
    assert held and all(h != a["faith_a"] for h, a in zip(held, facts))  # another corruption: another number
    assert d["summary"]["faithfulness_heldout"]["a"]["n"] == len(held)
    assert any("not selected on" in line for line in d["findings"])


def test_question_family_draws_each_fact_its_own_swap_partner(trained_pair_run, tmp_path, capsys):
    """`--family question` replicates vary the corruption fact by fact: their circuit files hold other fact
    sets (another probe-set hash per draw), and the test still runs over all facts."""
    from circuitdyn.engine.circuits import circuit_files

    run, probes = trained_pair_run
    d = diff_json(f"{run}:0", f"{run}:1", probes, tmp_path, capsys, "--family", "question", "--replicates", "4")
    assert d["baseline"]["family"] == "question" and d["summary"]["change_test"]["family"] == "question"
    assert all(name.endswith(" q") for name in d["baseline"]["replicates"])
    hashes = {meta["probe_set_hash"] for path, meta in circuit_files(tmp_path / "c") if "shifted" in path.name}
    assert len(hashes) > 1  # swap partners drawn per fact and draw
    assert d["summary"]["n_tested"] == 6

"""Sweeps without Ray: the runs of a sweep, and per-epoch means with intervals across runs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from circuitdyn.analysis.across_runs import across_runs, format_across_runs
from circuitdyn.analysis.stats import MIN_ENTITIES
from circuitdyn.errors import CircuitdynError
from circuitdyn.training.cpt import CPTConfig
from circuitdyn.training.sweep import sweep_runs


def test_sweep_runs_are_one_folder_per_strategy_and_seed(tmp_path):
    runs = sweep_runs(CPTConfig(strategy="plain"), tmp_path, [0, 2], ["plain", "stepwise-kl"])
    assert [p.relative_to(tmp_path).as_posix() for p in runs] == [
        "plain/seed_0",
        "plain/seed_2",
        "stepwise-kl/seed_0",
        "stepwise-kl/seed_2",
    ]
    assert [(c.strategy, c.seed) for c in runs.values()] == [
        ("plain", 0),
        ("plain", 2),
        ("stepwise-kl", 0),
        ("stepwise-kl", 2),
    ]
    assert list(sweep_runs(CPTConfig(strategy="curriculum"), tmp_path, [5])) == [tmp_path / "curriculum" / "seed_5"]
    with pytest.raises(CircuitdynError, match="unknown strategy 'fancy'"):
        sweep_runs(CPTConfig(), tmp_path, [0], ["fancy"])
    with pytest.raises(CircuitdynError, match="seeds must be distinct"):
        sweep_runs(CPTConfig(), tmp_path, [1, 1])


def test_across_runs_means_intervals_and_n():
    a = pd.DataFrame({"epoch": [0, 1, 2], "recall": [0.1, 0.5, 0.9], "label": ["x", "y", "z"]})
    b = pd.DataFrame({"epoch": [0, 1], "recall": [0.3, 0.7]})
    t = across_runs({"a": a, "b": b}).set_index("epoch")
    assert list(t["quantity"].unique()) == ["recall"]  # non-numeric and unshared columns are left out
    assert t.loc[0, "mean"] == pytest.approx(0.2) and t.loc[1, "mean"] == pytest.approx(0.6)
    assert math.isnan(t.loc[0, "lo"]) and math.isnan(t.loc[0, "hi"])  # 2 runs: no interval, not [min, max]
    assert t.loc[0, "interval"] == f"too few runs for an interval, n=2 < {MIN_ENTITIES}"
    assert t.loc[1, "n"] == 2 and t.loc[2, "n"] == 1 and math.isnan(t.loc[2, "lo"])  # one run: no interval
    text = format_across_runs(across_runs({"a": a, "b": b}))
    assert "0.200*" in text and "n runs" in text and f"fewer than {MIN_ENTITIES} runs" in text
    runs = {f"r{i}": pd.DataFrame({"epoch": [0], "recall": [0.1 * i]}) for i in range(MIN_ENTITIES)}
    many = across_runs(runs).set_index("epoch")
    assert many.loc[0, "lo"] < many.loc[0, "mean"] < many.loc[0, "hi"] and many.loc[0, "interval"] is None
    assert "*" not in format_across_runs(across_runs(runs))
    with pytest.raises(CircuitdynError, match="no 'epoch' column"):
        across_runs({"a": a, "c": pd.DataFrame({"step": [0]})})


def test_cli_timeline_across_runs(make_run, capsys):
    from test_timeline import N, write_run_results

    from circuitdyn.cli import main
    from circuitdyn.engine.graph import Graph

    runs = [make_run("llama", 2, name=f"timeline-seed-{k}") for k in range(2)]
    for run in runs:
        write_run_results(run, Graph(2, 4), [0, 1, 2])
    assert main(["timeline", *map(str, runs), "--top-n", str(N), "--noise-epochs", "none", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["epoch"], r["quantity"]): r for r in data["per_epoch"]}
    assert rows[(2, "n_edges")]["n"] == 2 and rows[(2, "n_edges")]["mean"] == N
    assert {r["quantity"] for r in data["reconfiguration"]} == {"replaced", "noise"}
    assert main(["timeline", *map(str, runs), "--top-n", str(N), "--noise-epochs", "none"]) == 0
    assert "circuit timelines of 2 runs" in capsys.readouterr().out
    assert main(["timeline", *map(str, runs), "--top-n", str(N), "--out", "x.html"]) == 2
    assert "take one run" in capsys.readouterr().err

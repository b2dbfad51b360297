"""`circuitdyn calibrate` on a real (tiny) checkpoint, and the change test's error rates in simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from circuitdyn.change_test import ALPHA, aggregate_p, benjamini_hochberg, compare_replicates
from circuitdyn.cli import main


def test_calibrate_on_a_trained_checkpoint(trained_pair_run, tmp_path, capsys):
    run, probes = trained_pair_run
    args = ["calibrate", f"{run}:1", "--probes", str(probes), "--steps", "2", "--replicates", "4", "--null-tests", "2",
            "--strengths", "0.5,1", "--circuits", str(tmp_path / "c"), "--out", str(tmp_path / "cal.json")]
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
    assert all("note" in c for c in cal["coverage"] if c["n_entities"] < 7)
    # a re-run reuses every replicate (nothing is attributed again) and gives the same numbers
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "c").rglob("*.safetensors")}
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "per-fact false-positive rate" in text and "planted:" in text
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "c").rglob("*.safetensors")} == stamps


def test_calibrate_bad_inputs(trained_pair_run, capsys):
    run, probes = trained_pair_run
    assert main(["calibrate", f"{run}:1", "--probes", str(probes), "--replicates", "1"]) == 2
    assert "--replicates" in capsys.readouterr().err
    assert main(["calibrate", f"{run}:1", "--probes", str(probes), "--strengths", "0,1"]) == 2
    assert "--strengths" in capsys.readouterr().err
    assert main(["calibrate", f"{run}:7", "--probes", str(probes)]) == 2
    assert "epoch" in capsys.readouterr().err

"""The notebook front door: `import circuitdyn as cd`, result objects that display themselves, a run that
remembers its facts, and the plan line of `diff` / `timeline`."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import plotly.graph_objects as go
import pytest
from test_diff import make_set, random_scores, replicate_sets
from test_timeline import FACTS, N, circuits_over_epochs, outcomes

import circuitdyn as cd
from circuitdyn.analysis.calibration import Calibration, CalibrationSettings, rate
from circuitdyn.analysis.diff import MEAN, diff_circuits
from circuitdyn.analysis.timeline import build_timeline
from circuitdyn.engine.selection import Selection
from circuitdyn.errors import CircuitdynError

# --------------------------------------------------------------------------- the front door


def test_every_exported_name_resolves():
    assert 12 <= len(cd.__all__) <= 18 and len(set(cd.__all__)) == len(cd.__all__)
    for name in cd.__all__:
        assert getattr(cd, name) is not None, name
        assert name in dir(cd)
    assert cd.load_circuits.__module__ == "circuitdyn.api"
    with pytest.raises(AttributeError):
        cd.no_such_name  # noqa: B018


def test_diff_timeline_export_are_the_front_doors_functions_whatever_is_imported():
    """`cd.diff`, `cd.timeline` and `cd.export` are plain functions; the modules of those names live in the wings
    (`circuitdyn.analysis.diff`, ...), so importing them binds nothing on the package."""
    import circuitdyn.analysis.diff
    import circuitdyn.analysis.timeline
    import circuitdyn.api
    import circuitdyn.engine.export

    assert cd.diff is circuitdyn.api.diff and cd.timeline is circuitdyn.api.timeline
    assert cd.export is circuitdyn.engine.export.export and cd.diff_circuits is circuitdyn.api.diff_circuits
    assert circuitdyn.analysis.diff.diff_circuits is diff_circuits and circuitdyn.analysis.diff.MEAN == MEAN
    s = random_scores()
    via_module = cd.diff_circuits(make_set(s), make_set(s), "top:20")
    assert via_module.summary["n_facts"] == 3
    with pytest.raises(CircuitdynError, match="export format"):
        cd.export(make_set(s), "x.bin", "bin")


def test_import_is_fast_and_lists_the_names():
    code = "import sys, circuitdyn; print(circuitdyn.__all__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "open_run" in out[0] and "timeline" in out[0]
    assert out[1] == "False"  # nothing heavy is imported until a name is used


# --------------------------------------------------------------------------- result objects


def moved_diff():
    facts = [f"e{i // 3}/q/{i}" for i in range(9)]
    s = random_scores(9, seed=1)
    moved = s + 0.5 * random_scores(9, seed=9)
    from circuitdyn.analysis.noise import noise_from_replicates
    from circuitdyn.engine.selection import Selection

    sel = Selection.parse("top:20")
    reps = {
        k: [(f"r{i}", r, sel.select(r.scores, r.graph)[0], None) for i, r in enumerate(x)]
        for k, x in enumerate((replicate_sets(s, 5, 0.05, 100, facts), replicate_sets(moved, 5, 0.05, 300, facts)))
    }
    d = diff_circuits(
        make_set(s, facts),
        make_set(moved, facts),
        sel,
        noise=noise_from_replicates(reps, sel),
        labels=("run:0", "run:5"),
    )
    d.labels = {f: f"entity {f[1]}: question <{f}>" for f in facts}
    return d


def test_diff_to_frame_describe_figure_and_html():
    d = moved_diff()
    df = d.to_frame()
    assert len(df) == 9 * 3 and set(df["statistic"]) == {"edge_jaccard", "weighted_jaccard", "spearman"}
    assert {
        "fact_id",
        "entity",
        "label",
        "distance",
        "p_value",
        "changed_beyond_noise",
        "n_a",
        "added",
        "gap_a",
    } <= set(df.columns)
    assert MEAN not in set(df["fact_id"]) and df["entity"].iloc[0] == "e0"
    row = df[(df["fact_id"] == "e0/q/0") & (df["statistic"] == "edge_jaccard")].iloc[0]
    assert row["n_a"] == d.facts.loc["e0/q/0", "n_a"] and bool(row["changed_beyond_noise"])
    lines = d.describe()
    assert lines[-1].startswith("verdict: circuits moved more than method noise")
    fig = d.figure()
    assert isinstance(fig, go.Figure) and len(fig.data) > 1
    assert isinstance(d.figure("e0/q/0"), go.Figure)
    html = d._repr_html_()
    assert "CircuitDiff" in html and "verdict: circuits moved" in html and "&lt;e0/q/0&gt;" in html
    assert "<e0/q/0>" not in html  # labels are escaped


def test_timeline_to_frame_describe_figure_and_html():
    epochs = pd.DataFrame({"epoch": range(4), "train_loss": [None, 3.0, 2.0, 1.5]})
    tl = build_timeline(circuits_over_epochs(), Selection.parse(f"top:{N}"), outcomes=outcomes(), epochs=epochs)
    df = tl.to_frame()
    assert len(df) == len(FACTS) * 4 and MEAN not in set(df["fact_id"])
    assert {
        "fact_id",
        "entity",
        "epoch",
        "n_edges",
        "jaccard_prev",
        "correct",
        "transition",
        "train_loss",
        "change_distance",
    } <= set(df.columns)
    flaky = df[df["fact_id"] == "flaky"].set_index("epoch")
    assert flaky.loc[2, "change_distance"] == pytest.approx(1.0) and flaky.loc[2, "transition"] == "forgotten"
    assert pd.isna(flaky.loc[0, "change_distance"])
    lines = tl.describe()
    assert any(line.startswith("reconfiguration:") for line in lines)
    assert isinstance(tl.figure(), go.Figure) and isinstance(tl.figure("flaky"), go.Figure)
    html = tl._repr_html_()
    assert html.startswith("<div><b>Timeline</b>") and "reconfiguration:" in html and "<table" in html


def make_calibration() -> Calibration:
    power = [
        {"strength": s, **rate(k, 10), "flagged": k, "aggregate_p": 0.01, "mean_effect": 0.1}
        for s, k in ((0.1, 2), (1.0, 9))
    ]
    per_stat = {
        stat: {"fact_fpr": rate(1, 40), "aggregate_fpr": rate(8, 200), "power": power}
        for stat in ("edge_jaccard", "weighted_jaccard", "spearman")
    }
    coverage = [
        {"n_entities": 4, "data": "null effects", **rate(0, 0), "note": "no interval below 7 entities"},
        {"n_entities": 8, "data": "null effects", **rate(930, 1000)},
    ]
    return Calibration(
        "run:3",
        CalibrationSettings(strengths=(0.1, 1.0)),
        12,
        10,
        8,
        "edge_jaccard",
        per_stat["edge_jaccard"]["fact_fpr"],
        rate(1, 5),
        per_stat["edge_jaccard"]["aggregate_fpr"],
        power,
        coverage,
        "m1",
        per_stat,
    )


def test_calibration_to_frame_figure_and_html():
    cal = make_calibration()
    df = cal.to_frame()
    # per statistic: fact_fpr, aggregate_fpr, 2 powers; verdict_fwer once; 2 coverages
    assert len(df) == 3 * 4 + 1 + 2
    fpr = df[(df["measure"] == "fact_fpr") & (df["statistic"] == "edge_jaccard")].iloc[0]
    assert (fpr["k"], fpr["n"], fpr["value"]) == (1, 40, 0.025) and fpr["lo"] < 0.025 < fpr["hi"]
    assert df[df["measure"] == "power"]["strength"].tolist() == [0.1, 1.0] * 3
    assert df[df["measure"] == "coverage"]["n_entities"].tolist() == [4, 8]
    assert cal.describe() == cal.summary()
    fig = cal.figure()
    assert isinstance(fig, go.Figure) and len(fig.data[0].x) == 1 + 1 + 1 + 2 + 1  # the n=0 coverage left out
    assert "Calibration" in cal._repr_html_() and "per-fact false-positive rate" in cal._repr_html_()


# --------------------------------------------------------------------------- a run remembers its facts; the plan


def circuit_files(run) -> dict:
    return {f.name: f.stat().st_mtime_ns for f in (run / "circuits").glob("*.safetensors")}


def test_run_remembers_its_facts_and_commands_plan(make_run, tmp_path, capsys):
    from circuitdyn.cli import main
    from circuitdyn.probes.probes import load_probes, write_probes_jsonl

    run = make_run("llama", 1, name="remembers-run")
    probes = write_probes_jsonl(load_probes()[:3], tmp_path / "p.jsonl")
    assert main(["extract", str(run), "--probes", str(probes), "--limit", "2", "--steps", "1", "--no-progress"]) == 0
    record = json.loads((run / "circuits" / "facts.json").read_text())
    entry = record["fact_sets"][record["default"]]
    assert entry["probes"] == str(probes.resolve()) and entry["n_facts"] == 2
    assert entry["options"] == {
        "limit": 2,
        "sample_n": None,
        "per_entity": None,
        "entities": None,
        "ids": None,
        "seed": 0,
        "rephrased": False,
        "template": "auto",
    }
    facts = cd.load_facts(cd.open_run(run))
    assert facts.identity == record["default"] and len(facts) == 2 and facts.options["limit"] == 2
    written = circuit_files(run)
    assert len(written) == 2
    capsys.readouterr()

    # timeline without --probes: the recorded facts, every circuit reused (nothing written)
    args = ["timeline", str(run), "--steps", "1", "--top-n", "20", "--out", str(tmp_path / "t.html")]
    assert main([*args, "--noise-epochs", "none"]) == 0
    out = capsys.readouterr().out
    assert f"facts: the run's recorded facts (2 facts from {probes.resolve()})" in out
    assert "plan: 2 facts x 2 epochs, no method-noise replicates: 2 of 2 circuit files cached, 0 to compute" in out
    assert circuit_files(run) == written
    # the plan counts the replicates, and what they left cached
    assert main([*args, "--replicates", "2", "--json"]) == 0
    err = capsys.readouterr().err
    assert "plan: 2 facts x 2 epochs, 2 replicates per epoch: 2 of 6 circuit files cached, 4 to compute" in err
    assert len(circuit_files(run)) == 6
    assert (
        main(
            [
                "diff",
                f"{run}:0",
                f"{run}:1",
                "--steps",
                "1",
                "--top-n",
                "20",
                "--replicates",
                "2",
                "--out",
                str(tmp_path / "d.html"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "facts: the run's recorded facts (2 facts" in out
    assert (
        "plan: 2 facts x 2 checkpoints, 2 replicates per checkpoint: 6 of 6 circuit files cached, 0 to compute"
    ) in out
    assert len(circuit_files(run)) == 6

    # another fact set beside it becomes the default; the first stays recorded
    assert main(["extract", str(run), "--probes", str(probes), "--limit", "1", "--steps", "1", "--no-progress"]) == 0
    record = json.loads((run / "circuits" / "facts.json").read_text())
    assert len(record["fact_sets"]) == 2 and len(cd.load_facts(cd.open_run(run))) == 1
    assert len(cd.extract(run, settings={"steps": 1})) == 2  # the recorded facts' circuits at both epochs, all cached

    # the probe file moved: a clear error, not other facts
    probes.rename(tmp_path / "moved.jsonl")
    with pytest.raises(CircuitdynError, match="no longer there"):
        cd.load_facts(cd.open_run(run))
    assert main([*args, "--noise-epochs", "none"]) == 2
    assert "no longer there" in capsys.readouterr().err


def test_no_recorded_facts_is_a_clear_error(make_run):
    run = cd.open_run(make_run("llama", 1, name="no-facts-run"))
    with pytest.raises(CircuitdynError, match="no recorded facts"):
        cd.load_facts(run)
    with pytest.raises(CircuitdynError, match="needs a run"):
        cd.load_facts("probes.jsonl")

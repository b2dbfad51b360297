"""Timelines on synthetic circuits: similarities, lifetimes, reconfiguration, the recall join, run loading."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from circuitdyn.analysis.diff import MEAN
from circuitdyn.analysis.timeline import build_timeline
from circuitdyn.engine.circuits import CircuitSet, find_circuits
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import DEFAULT_SELECTION, Selection
from circuitdyn.engine.settings import Comparison
from circuitdyn.errors import CircuitdynError
from circuitdyn.pipeline.compare import load_run_timeline

GRAPH = Graph(3, 2)
META = {"architecture": "LlamaForCausalLM", "method": "eap-ig", "ig_steps": 5, "metric": "logprob", "seed": 0}
FACTS = ["stable", "flaky"]
N = 10  # circuit size


def circuits_over_epochs(graph: Graph = GRAPH, facts: list[str] = FACTS, n_epochs: int = 4) -> dict[int, CircuitSet]:
    """'stable' keeps the same top edges every epoch; 'flaky' swaps its circuit at epochs 2 and 3."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(len(facts), graph.n_edges, generator=g) * 0.01
    out = {}
    for e in range(n_epochs):
        s = base.clone()
        s[0, :N] = torch.linspace(2, 1, N)
        block = 0 if e < 2 else (1 if e == 2 else 2)
        s[1, N * block : N * (block + 1)] = torch.linspace(2, 1, N)
        out[e] = CircuitSet(s, graph.edges, list(facts), {**META, "epoch": e})
    return out


def outcomes() -> pd.DataFrame:
    rows = []
    for e in range(4):
        rows.append({"fact_id": "stable", "epoch": e, "correct": True})
        rows.append({"fact_id": "flaky", "epoch": e, "correct": e in (0, 1, 3)})  # forgotten at 2, back at 3
    return pd.DataFrame(rows)


def test_similarity_and_reconfiguration():
    tl = build_timeline(circuits_over_epochs(), Selection.parse(f"top:{N}"))
    sim = tl.similarity.set_index(["fact_id", "epoch"])
    assert (sim.loc["stable", "jaccard_prev"].dropna() == 1.0).all()
    assert sim.loc[("flaky", 1), "jaccard_prev"] == 1.0
    assert sim.loc[("flaky", 2), "jaccard_prev"] == 0.0 and sim.loc[("flaky", 3), "jaccard_first"] == 0.0
    assert pd.isna(sim.loc[("stable", 0), "jaccard_prev"]) and sim.loc[("stable", 0), "jaccard_first"] == 1.0
    assert MEAN in set(tl.similarity["fact_id"])
    rec = tl.reconfiguration.set_index("epoch")
    assert rec.loc[1, "replaced"] == 0.0 and rec.loc[2, "replaced"] == pytest.approx(0.5)
    assert (rec["n"] == 2).all() and (rec["n_excluded"] == 0).all()
    assert tl.reconfiguration_rate == pytest.approx((0 + 0.5 + 0.5) / 3)
    est = tl.reconfiguration_estimate
    assert est.n == 6 and est.n_groups == 2 and not est.has_interval  # 2 entities: too few for an interval
    assert "too few entities for an interval" in str(est)
    assert tl.summary()["n_changed_beyond_noise"] is None  # no method noise given: nothing is tested


def test_lifetimes():
    tl = build_timeline(circuits_over_epochs(), Selection.parse(f"top:{N}"))
    life = tl.lifetimes
    stable = life[life["fact_id"] == "stable"]
    assert len(stable) == N and (stable["birth"] == 0).all() and stable["death"].isna().all()
    assert (stable["persistence"] == 1.0).all() and (stable["segments"] == 1).all()
    flaky = life[life["fact_id"] == "flaky"].set_index("edge")
    first = GRAPH.edges[0]
    assert flaky.loc[first, "birth"] == 0 and flaky.loc[first, "death"] == 2
    late = GRAPH.edges[2 * N]
    assert flaky.loc[late, "birth"] == 3 and pd.isna(flaky.loc[late, "death"])
    assert flaky.loc[first, "persistence"] == pytest.approx(0.5)


def test_join_with_outcomes_and_stability_summary():
    epochs = pd.DataFrame({"epoch": range(4), "train_loss": [None, 3.0, 2.0, 1.5]})
    tl = build_timeline(circuits_over_epochs(), Selection.parse(f"top:{N}"), outcomes=outcomes(), epochs=epochs)
    flaky = tl.fact("flaky").set_index("epoch")
    assert list(flaky["transition"]) == ["", "retained", "forgotten", "acquired"]
    assert flaky.loc[2, "train_loss"] == 2.0
    st = tl.stability()
    assert st["n_retained"] == 4 and st["n_forgotten"] == 1 and st["n_acquired"] == 1
    assert st["mean_retained"] == 1.0 and st["mean_forgotten"] == 0.0
    assert st["gap"] == 1.0 and st["auc"] == 1.0 and st["gap_forgotten"] == 1.0
    # only 'flaky' has both kinds of transition, so the within-fact test rests on it alone
    perm = st["permutation"]
    assert (perm["n_strata"], perm["n_1"], perm["n_0"]) == (1, 1, 2) and perm["difference"] == pytest.approx(1.0)
    assert perm["p_value"] == pytest.approx(1 / 3, abs=0.05)  # 1 of 3 label arrangements is as extreme
    per_epoch = tl.per_epoch.set_index("epoch")
    assert per_epoch.loc[2, "fact_accuracy"] == 0.5 and per_epoch.loc[3, "train_loss"] == 1.5
    assert tl.layer_epoch.shape == (GRAPH.n_layers, 4)
    assert tl.layer_epoch.sum(axis=0).le(1 + 1e-5).all()
    summary = tl.summary()
    assert summary["stability"]["gap"] == 1.0 and summary["facts"] == 2
    with pytest.raises(CircuitdynError, match="unknown fact id"):
        tl.fact("nope")


def test_bad_inputs():
    cs = circuits_over_epochs()
    top = Selection.parse(f"top:{N}")
    with pytest.raises(CircuitdynError, match="do not match the circuits"):
        build_timeline(cs, top, outcomes=pd.DataFrame({"fact_id": ["x"], "epoch": [0], "correct": [True]}))
    with pytest.raises(CircuitdynError, match="lack column"):
        build_timeline(cs, top, outcomes=pd.DataFrame({"fact_id": ["stable"], "epoch": [0]}))
    other = Graph(2, 2)
    mixed = {0: cs[0], 1: CircuitSet(torch.rand(2, other.n_edges), other.edges, FACTS, META)}
    with pytest.raises(CircuitdynError, match="epoch 0 vs epoch 1: .*different architectures"):
        build_timeline(mixed, top)
    disjoint = {0: cs[0], 1: CircuitSet(cs[1].scores, cs[1].edges, ["a", "b"], META)}
    with pytest.raises(CircuitdynError, match="share no fact ids"):
        build_timeline(disjoint, top)
    with pytest.raises(CircuitdynError, match="no probe outcomes"):
        build_timeline(cs, top).stability()
    with pytest.raises(CircuitdynError, match="has no circuits"):
        build_timeline(cs, top).scores(9)
    with pytest.raises(CircuitdynError, match="faith:0.8 needs a faithfulness evaluator for epoch 0"):
        build_timeline(cs, DEFAULT_SELECTION)  # the default sizes circuits by faithfulness on each epoch's model


def test_small_gap_fact_epochs_are_excluded():
    cs = circuits_over_epochs()
    for e, c in cs.items():  # 'flaky' has no clean-corrupted gap at epoch 2
        c.meta.update(m_clean=[0.0, 0.0], m_corrupted=[-3.0, -0.1 if e == 2 else -3.0])
    tl = build_timeline(cs, Selection.parse(f"top:{N}"))
    rec = tl.reconfiguration.set_index("epoch")
    assert rec.loc[1, "n"] == 2 and rec.loc[2, "n"] == 1 and rec.loc[3, "n"] == 1
    assert rec.loc[2, "n_excluded"] == 1 and rec.loc[2, "replaced"] == 0.0
    assert tl.summary()["n_fact_epochs_excluded"] == 1


def test_negative_gap_fact_epochs_are_excluded():
    """'flaky' gets a gap of -1.1 nat at epoch 2 (the corruption raises its answer): excluded and counted."""
    cs = circuits_over_epochs()
    for e, c in cs.items():
        c.meta.update(m_clean=[0.0, 0.0], m_corrupted=[-3.0, 1.1 if e == 2 else -3.0])
    tl = build_timeline(cs, Selection.parse(f"top:{N}"))
    sim = tl.similarity.set_index(["fact_id", "epoch"])
    assert not sim.loc[("flaky", 2), "included"] and sim.loc[("flaky", 1), "included"]
    rec = tl.reconfiguration.set_index("epoch")
    assert rec.loc[2, "n"] == 1 and rec.loc[2, "n_excluded"] == 1 and rec.loc[3, "n"] == 1
    assert tl.summary()["n_fact_epochs_excluded"] == 1


def write_run_results(run: Path, graph: Graph, with_epochs: list[int]) -> None:
    """Circuits for `with_epochs` under run/circuits and per-probe results for every epoch."""
    cs = circuits_over_epochs(graph, n_epochs=3)
    for e in with_epochs:
        cs[e].save(run / "circuits" / f"epoch_{e}.safetensors")
    for e in range(3):
        rows = [
            {"probe_id": "stable", "entity": "A", "recall": 1.0, "f1": 1.0},
            {"probe_id": "flaky", "entity": "B", "recall": 1.0 if e != 2 else 0.0, "f1": 1.0},
        ]
        (run / f"epoch_{e}" / "probe_results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_load_run_timeline(make_run):
    run = make_run("llama", 2, name="timeline-run")
    graph = Graph(2, 4)
    write_run_results(run, graph, [0, 1])
    with pytest.raises(CircuitdynError, match=r"no circuits for epoch\(s\) \[2\]"):
        load_run_timeline(run, comparison=Comparison(Selection.parse(f"top:{N}")))
    write_run_results(run, graph, [0, 1, 2])
    tl = load_run_timeline(run, comparison=Comparison(Selection.parse(f"top:{N}")))
    assert tl.epochs == [0, 1, 2]
    assert list(tl.fact("flaky")["transition"]) == ["", "retained", "forgotten"]
    assert tl.per_epoch.set_index("epoch").loc[2, "train_loss"] == pytest.approx(1.5)
    assert "knowledge_accuracy" in tl.per_epoch
    assert find_circuits(run / "circuits", where={"method": "eap-ig"})[1].name == "epoch_1.safetensors"
    with pytest.raises(CircuitdynError, match="no circuit files with method eap"):
        find_circuits(run / "circuits", [0], where={"method": "eap"})
    with pytest.raises(CircuitdynError, match=r"no circuits for epoch\(s\) \[7\]"):
        find_circuits(run / "circuits", [0, 7])


def test_cli_timeline(make_run, capsys):
    from circuitdyn.cli import main

    run = make_run("llama", 2, name="timeline-cli-run")
    write_run_results(run, Graph(2, 4), [0, 1, 2])
    assert main(["timeline", str(run), "--top-n", str(N)]) == 0
    text = capsys.readouterr().out
    assert "stay put while recalled?" in text and "forgotten 0.000 (n=1)" in text
    assert "no method noise measured" in text
    assert (run / "timeline.html").is_file()
    assert main(["timeline", str(run), "--top-n", str(N), "--json", "--out", str(run / "t.html")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["facts"] == 2 and data["selection"]["spec"] == f"top:{N}"
    assert data["ci"]["reconfiguration_rate"]["n"] == 4 and data["baseline"] is None
    assert main(["timeline", str(run)]) == 2  # the default faith:0.8 needs the facts
    assert "needs the facts (--probes)" in capsys.readouterr().err
    (run / "circuits" / "epoch_1.safetensors").unlink()
    assert main(["timeline", str(run), "--top-n", str(N)]) == 2
    assert "no circuits for epoch(s) [1]" in capsys.readouterr().err


def test_cli_timeline_extracts_with_probes(make_run, tmp_path, capsys):
    from circuitdyn.cli import main
    from circuitdyn.probes.probes import load_probes, write_probes_jsonl

    run = make_run("llama", 2, name="timeline-extract-run")
    probes = load_probes()[:2]
    write_probes_jsonl(probes, tmp_path / "p.jsonl")
    for e in range(3):
        rows = [
            {"probe_id": p.id, "entity": p.entity, "recall": float(e != 1 or i), "f1": 1.0}
            for i, p in enumerate(probes)
        ]
        (run / f"epoch_{e}" / "probe_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["timeline", str(run), "--probes", str(tmp_path / "p.jsonl"), "--steps", "1", "--top-n", "30"]
    assert main([*args, "--transfer"]) == 0
    text = capsys.readouterr().out
    assert "stay put while recalled?" in text and "forgotten" in text
    assert "share of each fact's gap recovered by epoch i's circuit (rows)" in text
    assert "method noise at epochs [0, 1, 2] (5 replicates each, 'estimation' family)" in text
    assert main(["timeline", str(run), "--transfer"]) == 2
    assert "--transfer needs --probes" in capsys.readouterr().err
    assert main([*args, "--select", "faith:0.5", "--out", str(tmp_path / "faith.html")]) == 0
    assert "selection faith:0.5" in capsys.readouterr().out
    # without --probes, the run's recorded facts (those of the last extraction) are used: nothing new computed
    assert main(["timeline", str(run), "--select", "faith:0.5", "--steps", "1", "--out", str(tmp_path / "r.html")]) == 0
    text = capsys.readouterr().out
    assert "facts: the run's recorded facts (2 facts from" in text and "18 of 18 circuit files cached" in text
    assert len(list((run / "circuits").glob("*.safetensors"))) == 3 + 3 * 5  # + 5 replicates at every epoch
    (run / "circuits" / "facts.json").unlink()  # a run with no recorded facts has only its cached circuits
    assert main(["timeline", str(run), "--select", "faith:0.5", "--steps", "1"]) == 2
    assert "selection faith:0.5 evaluates circuits on each epoch's model: it needs the facts (--probes)" in (
        capsys.readouterr().err
    )
    html = (run / "timeline.html").read_text()
    assert probes[0].question.split()[0] in html
    # EAP circuits record 1 step, whatever --steps (default 5) asked for: they are still found.
    assert main(["timeline", str(run), "--probes", str(tmp_path / "p.jsonl"), "--method", "eap", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["epochs"] == [0, 1, 2]


def test_extract_then_timeline_computes_no_circuit_twice(make_run, tmp_path, capsys):
    """The one road: `extract --probes F` and `timeline --probes F` build the same facts, so the timeline
    reuses every circuit file extract wrote (unchanged on disk), and `--transfer` works with `faith:`."""
    from circuitdyn.cli import main
    from circuitdyn.probes.probes import load_probes, write_probes_jsonl

    run = make_run("llama", 1, name="one-road-run")
    probes = write_probes_jsonl(load_probes()[:4], tmp_path / "p.jsonl")
    assert main(["extract", str(run), "--probes", str(probes), "--steps", "2", "--no-progress"]) == 0
    capsys.readouterr()
    written = {f: f.stat().st_mtime_ns for f in (run / "circuits").glob("*.safetensors")}
    assert len(written) == 2
    assert (
        main(
            [
                "timeline",
                str(run),
                "--probes",
                str(probes),
                "--steps",
                "2",
                "--noise-epochs",
                "none",
                "--select",
                "faith:0.5",
                "--transfer",
                "--json",
                "--out",
                str(tmp_path / "t.html"),
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["selection"]["spec"] == "faith:0.5" and data["baseline"] is None
    assert len(data["transfer"]) == 4 * 2 * 2 and "transfer_summary" in data
    assert {f: f.stat().st_mtime_ns for f in (run / "circuits").glob("*.safetensors")} == written


def test_timeline_and_diff_reuse_circuits_of_the_grid_asked_for(make_run, tmp_path, capsys):
    """Circuits extracted with `--ig-grid right` are found by `timeline`/`diff --ig-grid right` (nothing computed
    again); without probes, asking for another grid finds none rather than mixing grids."""
    from circuitdyn.cli import main
    from circuitdyn.probes.probes import load_probes, write_probes_jsonl

    run = make_run("llama", 1, name="grid-reuse-run")
    probes = write_probes_jsonl(load_probes()[:2], tmp_path / "p.jsonl")
    assert (
        main(["extract", str(run), "--probes", str(probes), "--steps", "2", "--ig-grid", "right", "--no-progress"]) == 0
    )
    written = {f: f.stat().st_mtime_ns for f in (run / "circuits").glob("*.safetensors")}
    assert len(written) == 2 and all(".eap-ig2." in f.name for f in written)
    capsys.readouterr()
    # without --probes: the run's recorded facts, at the settings of their cached circuits (steps 2)
    assert (
        main(
            [
                "timeline",
                str(run),
                "--top-n",
                "20",
                "--ig-grid",
                "right",
                "--json",
                "--noise-epochs",
                "none",
                "--out",
                str(tmp_path / "t.html"),
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert json.loads(out.out)["summary"]["epochs"] == [0, 1]
    assert "2 of 2 circuit files cached, 0 to compute" in out.err
    assert (
        main(
            [
                "diff",
                f"{run}:0",
                f"{run}:1",
                "--probes",
                str(probes),
                "--steps",
                "2",
                "--ig-grid",
                "right",
                "--top-n",
                "20",
                "--no-noise",
                "--json",
                "--out",
                str(tmp_path / "d.html"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert {f: f.stat().st_mtime_ns for f in written} == written
    assert len(list((run / "circuits").glob("*.safetensors"))) == 2
    (run / "circuits" / "facts.json").unlink()  # only the cached circuits, no facts to compute others for
    assert (
        main(
            [
                "timeline",
                str(run),
                "--top-n",
                "20",
                "--ig-grid",
                "midpoint",
                "--json",
                "--out",
                str(tmp_path / "t2.html"),
                "--steps",
                "2",
            ]
        )
        == 2
    )

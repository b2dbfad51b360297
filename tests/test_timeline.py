"""Timelines on synthetic circuits: similarities, lifetimes, reconfiguration, the recall join, run loading."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from circuitdyn.circuits import CircuitSet
from circuitdyn.diff import MEAN
from circuitdyn.errors import CircuitdynError
from circuitdyn.graph import Graph
from circuitdyn.timeline import build_timeline, find_circuits, load_run_timeline

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
        s[1, N * block:N * (block + 1)] = torch.linspace(2, 1, N)
        out[e] = CircuitSet(s, graph.edges, list(facts), {**META, "epoch": e})
    return out


def outcomes() -> pd.DataFrame:
    rows = []
    for e in range(4):
        rows.append({"fact_id": "stable", "epoch": e, "correct": True})
        rows.append({"fact_id": "flaky", "epoch": e, "correct": e in (0, 1, 3)})  # forgotten at 2, back at 3
    return pd.DataFrame(rows)


def test_similarity_and_reconfiguration():
    tl = build_timeline(circuits_over_epochs(), f"top:{N}")
    sim = tl.similarity.set_index(["fact_id", "epoch"])
    assert (sim.loc["stable", "jaccard_prev"].dropna() == 1.0).all()
    assert sim.loc[("flaky", 1), "jaccard_prev"] == 1.0
    assert sim.loc[("flaky", 2), "jaccard_prev"] == 0.0 and sim.loc[("flaky", 3), "jaccard_first"] == 0.0
    assert pd.isna(sim.loc[("stable", 0), "jaccard_prev"]) and sim.loc[("stable", 0), "jaccard_first"] == 1.0
    assert MEAN in set(tl.similarity["fact_id"])
    rec = tl.reconfiguration.set_index("epoch")
    assert rec.loc[1, "replaced"] == 0.0 and rec.loc[2, "replaced"] == pytest.approx(0.5)
    assert tl.reconfiguration_rate == pytest.approx((0 + 0.5 + 0.5) / 3)


def test_lifetimes():
    tl = build_timeline(circuits_over_epochs(), f"top:{N}")
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
    tl = build_timeline(circuits_over_epochs(), f"top:{N}", outcomes=outcomes(), epochs=epochs)
    flaky = tl.fact("flaky").set_index("epoch")
    assert list(flaky["transition"]) == ["", "retained", "forgotten", "acquired"]
    assert flaky.loc[2, "train_loss"] == 2.0
    st = tl.stability()
    assert st["n_retained"] == 4 and st["n_forgotten"] == 1 and st["n_acquired"] == 1
    assert st["mean_retained"] == 1.0 and st["mean_forgotten"] == 0.0
    assert st["gap"] == 1.0 and st["auc"] == 1.0 and st["gap_forgotten"] == 1.0
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
    with pytest.raises(CircuitdynError, match="do not match the circuits"):
        build_timeline(cs, outcomes=pd.DataFrame({"fact_id": ["x"], "epoch": [0], "correct": [True]}))
    with pytest.raises(CircuitdynError, match="lack column"):
        build_timeline(cs, outcomes=pd.DataFrame({"fact_id": ["stable"], "epoch": [0]}))
    other = Graph(2, 2)
    mixed = {0: cs[0], 1: CircuitSet(torch.rand(2, other.n_edges), other.edges, FACTS, META)}
    with pytest.raises(CircuitdynError, match="epoch 0 vs epoch 1: .*different architectures"):
        build_timeline(mixed)
    disjoint = {0: cs[0], 1: CircuitSet(cs[1].scores, cs[1].edges, ["a", "b"], META)}
    with pytest.raises(CircuitdynError, match="share no fact ids"):
        build_timeline(disjoint)
    with pytest.raises(CircuitdynError, match="no probe outcomes"):
        build_timeline(cs).stability()
    with pytest.raises(CircuitdynError, match="has no circuits"):
        build_timeline(cs).scores(9)


def write_run_results(run: Path, graph: Graph, with_epochs: list[int]) -> None:
    """Circuits for `with_epochs` under run/circuits and per-probe results for every epoch."""
    cs = circuits_over_epochs(graph, n_epochs=3)
    for e in with_epochs:
        cs[e].save(run / "circuits" / f"epoch_{e}.safetensors")
    for e in range(3):
        rows = [{"probe_id": "stable", "entity": "A", "recall": 1.0, "f1": 1.0},
                {"probe_id": "flaky", "entity": "B", "recall": 1.0 if e != 2 else 0.0, "f1": 1.0}]
        (run / f"epoch_{e}" / "probe_results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_load_run_timeline(make_run):
    run = make_run("llama", 2, name="timeline-run")
    graph = Graph(2, 4)
    write_run_results(run, graph, [0, 1])
    with pytest.raises(CircuitdynError, match=r"no circuits for epoch\(s\) \[2\]"):
        load_run_timeline(run, selection=f"top:{N}")
    write_run_results(run, graph, [0, 1, 2])
    tl = load_run_timeline(run, selection=f"top:{N}")
    assert tl.epochs == [0, 1, 2]
    assert list(tl.fact("flaky")["transition"]) == ["", "retained", "forgotten"]
    assert tl.per_epoch.set_index("epoch").loc[2, "train_loss"] == pytest.approx(1.5)
    assert "knowledge_accuracy" in tl.per_epoch
    assert find_circuits(run / "circuits", method="eap-ig")[1].name == "epoch_1.safetensors"
    with pytest.raises(CircuitdynError, match="no circuit files with method eap"):
        find_circuits(run / "circuits", [0], method="eap")
    with pytest.raises(CircuitdynError, match=r"no circuits for epoch\(s\) \[7\]"):
        find_circuits(run / "circuits", [0, 7])


def test_cli_timeline(make_run, capsys):
    from circuitdyn.cli import main

    run = make_run("llama", 2, name="timeline-cli-run")
    write_run_results(run, Graph(2, 4), [0, 1, 2])
    assert main(["timeline", str(run), "--top-n", str(N)]) == 0
    text = capsys.readouterr().out
    assert "stay put while recalled?" in text and "forgotten 0.000 (n=1)" in text
    assert (run / "timeline.html").is_file()
    assert main(["timeline", str(run), "--json", "--out", str(run / "t.html")]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["facts"] == 2
    (run / "circuits" / "epoch_1.safetensors").unlink()
    assert main(["timeline", str(run)]) == 2
    assert "no circuits for epoch(s) [1]" in capsys.readouterr().err


def test_cli_timeline_extracts_with_probes(make_run, tmp_path, capsys):
    from circuitdyn.cli import main
    from circuitdyn.probes import load_probes, write_probes_jsonl

    run = make_run("llama", 2, name="timeline-extract-run")
    probes = load_probes()[:2]
    write_probes_jsonl(probes, tmp_path / "p.jsonl")
    for e in range(3):
        rows = [{"probe_id": p.id, "entity": p.entity, "recall": float(e != 1 or i), "f1": 1.0} for i, p in enumerate(probes)]
        (run / f"epoch_{e}" / "probe_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["timeline", str(run), "--probes", str(tmp_path / "p.jsonl"), "--steps", "1", "--top-n", "30"]
    assert main([*args, "--transfer"]) == 0
    text = capsys.readouterr().out
    assert "stay put while recalled?" in text and "forgotten" in text
    assert "faithfulness of epoch i's circuit (rows)" in text
    assert main(["timeline", str(run), "--transfer"]) == 2
    assert "--transfer needs --probes" in capsys.readouterr().err
    assert main([*args, "--select", "faith:0.5", "--out", str(tmp_path / "faith.html")]) == 0
    assert "selection faith:0.5" in capsys.readouterr().out
    assert main(["timeline", str(run), "--select", "faith:0.5", "--steps", "1"]) == 2
    assert "selection faith:0.5 evaluates circuits on each epoch's model: it needs the facts (--probes)" in (
        capsys.readouterr().err)
    assert len(list((run / "circuits").glob("*.safetensors"))) == 3
    html = (run / "timeline.html").read_text()
    assert probes[0].question.split()[0] in html
    # EAP circuits record 1 step, whatever --steps (default 5) asked for: they are still found.
    assert main(["timeline", str(run), "--probes", str(tmp_path / "p.jsonl"), "--method", "eap", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["epochs"] == [0, 1, 2]

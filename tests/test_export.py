"""Export: one fact's circuit as networkx, graph JSON (with its schema), GraphML and CSV; `circuitdyn export`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jsonschema
import networkx as nx
import pytest
import torch

from circuitdyn.cli import main
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.export import (
    SCHEMA_PATH,
    from_graph_json,
    to_csv,
    to_graph_json,
    to_graphml,
    validate_graph_json,
    write_graph_json,
)
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import Selection
from circuitdyn.errors import CircuitdynError

META = {
    "method": "eap-ig",
    "ig_steps": 5,
    "ig_grid": "left",
    "metric": "answer-logprob",
    "seed": 0,
    "architecture": "LlamaForCausalLM",
    "probe_set_hash": "sha256:abc",
    "epoch": 2,
    "step": 40,
    "checkpoint_hash": "sha256:" + "0" * 64,
    "corruption": ["entity", "noise", "entity"],
    "faithfulness": [0.9, float("nan"), 0.7],
}


def _set() -> CircuitSet:
    g = Graph(2, 2)
    scores = torch.randn(3, g.n_edges, generator=torch.Generator().manual_seed(0))
    return CircuitSet(scores, g.edges, ["f1", "f2", "f3"], dict(META))


@pytest.fixture
def cs() -> CircuitSet:
    return _set()


@pytest.fixture
def circuit_file(tmp_path: Path) -> Path:
    return _set().save(tmp_path / "epoch_2.safetensors", dtype="float32")


def _port_scores(cs: CircuitSet, fact: str) -> dict[str, float]:
    return dict(zip(cs.edges, cs.fact(fact).tolist()))


def _same(a: nx.DiGraph, b: nx.DiGraph) -> None:
    assert list(a.nodes(data=True)) == list(b.nodes(data=True))
    assert sorted(a.edges(data=True)) == sorted(b.edges(data=True))
    assert a.graph == b.graph


# --------------------------------------------------------------------------- networkx
def test_to_networkx_nodes_edges_scores_and_metadata(cs):
    g = cs.to_networkx("f2")
    graph = cs.graph
    assert list(g.nodes) == graph.nodes
    assert g.nodes["input"] == {"layer": -1, "kind": "input"}
    assert g.nodes["a1.h0"] == {"layer": 1, "kind": "attn", "head": 0}
    assert g.nodes["m0"] == {"layer": 0, "kind": "mlp"} and g.nodes["logits"] == {"layer": 2, "kind": "logits"}
    port = _port_scores(cs, "f2")
    head_edge = g.edges["a0.h1", "a1.h0"]
    assert head_edge["score_q"] == port["a0.h1->a1.h0<q>"] and head_edge["score_v"] == port["a0.h1->a1.h0<v>"]
    assert head_edge["score"] == pytest.approx(sum(port[f"a0.h1->a1.h0<{p}>"] for p in "qkv"))
    assert g.edges["m1", "logits"] == {"score": port["m1->logits"]}
    assert sum(3 if g.nodes[v]["kind"] == "attn" else 1 for _, v in g.edges) == graph.n_edges
    assert g.graph["fact_id"] == "f2" and g.graph["selection"] is None and g.graph["corruption"] == "noise"
    assert g.graph["faithfulness"] is None  # NaN is no JSON value
    assert {k: g.graph[k] for k in ("epoch", "step", "method", "ig_steps", "ig_grid", "metric")} == {
        "epoch": 2,
        "step": 40,
        "method": "eap-ig",
        "ig_steps": 5,
        "ig_grid": "left",
        "metric": "answer-logprob",
    }
    assert g.graph["circuitdyn_version"] and g.graph["source_file"] is None


def test_to_networkx_with_selection_flags_the_circuit(cs):
    mask = Selection.parse("top:7").select(cs.scores, cs.graph)[0][cs.index("f1")]
    g = cs.to_networkx("f1", "top:7")
    chosen = {name for name, m in zip(cs.edges, mask.tolist()) if m}
    for u, v, data in g.edges(data=True):
        ports = [f"{u}->{v}<{p}>" for p in "qkv"] if g.nodes[v]["kind"] == "attn" else [f"{u}->{v}"]
        assert data["in_circuit"] == any(p in chosen for p in ports)
        if g.nodes[v]["kind"] == "attn":
            assert data["circuit_ports"] == "".join(p for p in "qkv" if f"{u}->{v}<{p}>" in chosen)
    assert g.graph["selection"] == "top:7" and g.graph["n_circuit_edges"] == 7
    only = cs.to_networkx("f1", mask, circuit_only=True)
    assert only.graph["selection"] == "mask"
    assert all(d["in_circuit"] for *_, d in only.edges(data=True))
    assert set(only.edges) == {(u, v) for u, v, d in g.edges(data=True) if d["in_circuit"]}
    assert all(only.degree(n) > 0 for n in only.nodes)
    assert only.edges[next(iter(only.edges))]["score"] == g.edges[next(iter(only.edges))]["score"]


@pytest.mark.parametrize("spec", ["faith:0.8", "pruned:0.8", Selection("faith", 0.8)])
def test_selections_needing_a_model_are_refused(cs, spec):
    with pytest.raises(CircuitdynError, match=r"needs a model.*top:N.*abs:T.*mask"):
        cs.to_networkx("f1", spec)
    with pytest.raises(CircuitdynError, match="needs a model"):
        to_graph_json(cs, "f1", spec)


def test_bad_fact_and_mask_shapes_are_refused(cs):
    with pytest.raises(CircuitdynError, match="unknown fact id 'nope'"):
        cs.to_networkx("nope")
    with pytest.raises(CircuitdynError, match="mask has shape"):
        cs.to_networkx("f1", torch.ones(5, dtype=torch.bool))


# --------------------------------------------------------------------------- graph JSON
@pytest.mark.parametrize("selection", [None, "top:10", "abs:0.5", "paths:4"])
def test_json_round_trip_equals_to_networkx(cs, selection):
    d = json.loads(json.dumps(to_graph_json(cs, "f3", selection)))
    assert d["format"] == "circuitdyn-graph" and d["version"] == 1
    _same(from_graph_json(d), cs.to_networkx("f3", selection, circuit_only=True))
    # networkx reads the nodes and links of the file directly
    plain = nx.node_link_graph(d, edges="links")
    assert isinstance(plain, nx.DiGraph)
    assert sorted(plain.edges(data=True)) == sorted(from_graph_json(d).edges(data=True))


def test_json_all_edges_with_flags_round_trip(cs):
    d = to_graph_json(cs, "f1", "top:5", circuit_only=False)
    assert len(d["links"]) == cs.to_networkx("f1").number_of_edges()
    assert sum(link["in_circuit"] for link in d["links"]) <= 5
    _same(from_graph_json(d), cs.to_networkx("f1", "top:5"))


def test_json_validates_against_the_shipped_schema(cs):
    schema = json.loads(SCHEMA_PATH.read_text())
    assert SCHEMA_PATH.parent.name == "schemas"  # shipped as package data (schemas/*.json)
    for selection in (None, "top:3"):
        jsonschema.Draft202012Validator(schema).validate(to_graph_json(cs, "f2", selection))
    bad = to_graph_json(cs, "f2")
    bad["links"][0]["score"] = "high"
    with pytest.raises(CircuitdynError, match=r"field links/0/score"):
        validate_graph_json(bad)
    with pytest.raises(CircuitdynError, match="format"):
        from_graph_json({**to_graph_json(cs, "f2"), "format": "other"})


def test_json_file_records_the_source_file(circuit_file, tmp_path):
    cs = CircuitSet.load(circuit_file)
    done = write_graph_json(cs, "f1", tmp_path / "g.json", "top:4")
    d = json.loads(done.path.read_text())
    assert d["metadata"]["source_file"] == str(circuit_file) and done.n_links == len(d["links"])
    with pytest.raises(CircuitdynError, match="exists"):
        write_graph_json(cs, "f1", tmp_path / "g.json")
    write_graph_json(cs, "f1", tmp_path / "g.json", overwrite=True)
    assert json.loads((tmp_path / "g.json").read_text())["metadata"]["selection"] is None


# --------------------------------------------------------------------------- GraphML and CSV
def test_graphml_round_trip_keeps_scores(cs, tmp_path):
    done = to_graphml(cs, "f2", tmp_path / "g.graphml", "top:12", circuit_only=False)
    back = nx.read_graphml(done.path)
    want = cs.to_networkx("f2", "top:12")
    assert set(back.nodes) == set(want.nodes) and set(back.edges) == set(want.edges)
    for u, v, data in want.edges(data=True):
        got = back.edges[u, v]
        assert got["score"] == data["score"] and got["in_circuit"] == data["in_circuit"]
        assert all(got[k] == data[k] for k in ("score_q", "score_k", "score_v") if k in data)
    assert back.nodes["a1.h1"]["head"] == 1 and back.nodes["m0"]["kind"] == "mlp"
    assert back.graph["fact_id"] == "f2" and back.graph["selection"] == "top:12"
    assert "faithfulness" not in back.graph  # None is dropped: GraphML has no null


def test_csv_one_row_per_edge_with_the_file_scores(cs, tmp_path):
    done = to_csv(cs, tmp_path / "e.csv")
    rows = list(csv.DictReader(done.path.open()))
    assert len(rows) == done.n_links == len(cs.fact_ids) * len(cs.edges)
    assert list(rows[0]) == ["fact_id", "source", "target", "port", "score"]
    for fact in cs.fact_ids:
        port = _port_scores(cs, fact)
        mine = [r for r in rows if r["fact_id"] == fact]
        names = [f"{r['source']}->{r['target']}" + (f"<{r['port']}>" if r["port"] else "") for r in mine]
        assert names == cs.edges
        assert [float(r["score"]) for r in mine] == [port[n] for n in names]

    sel = to_csv(cs, tmp_path / "top.csv", ["f2"], "top:6")
    rows = list(csv.DictReader(sel.path.open()))
    assert len(rows) == 6 and all(r["in_circuit"] == "true" and r["fact_id"] == "f2" for r in rows)
    flagged = list(csv.DictReader(to_csv(cs, tmp_path / "all.csv", None, "top:6", circuit_only=False).path.open()))
    assert len(flagged) == 3 * len(cs.edges) and sum(r["in_circuit"] == "true" for r in flagged) == 18


# --------------------------------------------------------------------------- CLI
def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_writes_json_graphml_and_csv(circuit_file, tmp_path, capsys):
    code, out, _ = _cli(
        [
            "export",
            str(circuit_file),
            "--format",
            "json",
            "--fact",
            "f1",
            "--select",
            "top:5",
            "--out",
            str(tmp_path / "g.json"),
        ],
        capsys,
    )
    d = json.loads((tmp_path / "g.json").read_text())
    assert code == 0
    assert out == f"wrote {len(d['nodes'])} nodes, {len(d['links'])} links (top:5) to {tmp_path / 'g.json'}\n"
    validate_graph_json(d)
    assert d["metadata"]["source_file"] == str(circuit_file)

    code, out, _ = _cli(["export", str(circuit_file), "--fact", "f2", "--out", str(tmp_path / "g.graphml")], capsys)
    assert code == 0 and "(top:1000)" in out and nx.read_graphml(tmp_path / "g.graphml").graph["fact_id"] == "f2"

    code, out, _ = _cli(
        ["export", str(circuit_file), "--format", "csv", "--all", "--out", str(tmp_path / "e.csv")], capsys
    )
    n = 3 * len(CircuitSet.load(circuit_file).edges)
    assert code == 0 and out.startswith(f"wrote {n} edge rows of 3 facts (all edges)")
    assert len((tmp_path / "e.csv").read_text().splitlines()) == n + 1

    code, _, _ = _cli(
        ["export", str(circuit_file), "--fact", "f1", "--out", str(tmp_path / "g.json"), "--overwrite"], capsys
    )
    assert code == 0 and json.loads((tmp_path / "g.json").read_text())["metadata"]["selection"] == "top:1000"


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--fact", "nope", "--out", "{out}/x.json"], "--fact 'nope' is not one of its 3 fact ids"),
        (["--fact", "f1", "--select", "faith:0.8", "--out", "{out}/x.json"], "needs a model"),
        (["--fact", "f1", "--select", "pruned:0.9", "--out", "{out}/x.json"], "use top:N, paths:N or abs:T"),
        (["--fact", "f1", "--out", "{out}/exists.json"], "exists; choose another output file, or pass --overwrite"),
        (["--fact", "f1", "--format", "xml", "--out", "{out}/x.json"], "invalid choice: 'xml'"),
        (["--fact", "f1", "--out", "{out}/x.txt"], "cannot tell the format from its suffix"),
        (["--out", "{out}/x.json"], "holds 3 facts"),
        (["--all", "--out", "{out}/x.json"], "--all: a json file holds one fact"),
        (["--fact", "f1", "--select", "top:0", "--out", "{out}/x.json"], "whole number of edges >= 1"),
    ],
    ids=[
        "unknown-fact",
        "faith",
        "pruned",
        "existing-output",
        "unknown-format",
        "unknown-suffix",
        "which-fact",
        "all-json",
        "top-0",
    ],
)
def test_cli_export_refuses_bad_input(circuit_file, tmp_path, capsys, extra, expect):
    (tmp_path / "exists.json").write_text("{}")
    code, out, err = _cli(["export", str(circuit_file), *[a.format(out=tmp_path) for a in extra]], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("circuitdyn export: error: ") and expect in last
    assert (tmp_path / "exists.json").read_text() == "{}" and not (tmp_path / "x.json").exists()


def test_cli_export_missing_circuit_file(tmp_path, capsys):
    code, _, err = _cli(["export", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.csv")], capsys)
    missing = tmp_path / "none.safetensors"
    assert code == 2 and err.strip() == f"circuitdyn export: error: circuit file {missing} does not exist"


def test_circuit_set_frame_and_notebook_display() -> None:
    """A notebook shows a CircuitSet as its settings and strongest edges; to_frame is tidy, strongest first."""
    scores = torch.tensor([[0.1, -0.9, 0.3], [0.5, 0.0, -0.2]])
    cs = CircuitSet(scores, ["input->a0.h0<q>", "input->m0", "a0.h0->logits"], ["f0", "f1"], {"method": "eap-ig"})
    df = cs.to_frame(top=2)
    assert list(df.columns) == ["fact_id", "rank", "edge", "source", "destination", "score"]
    first = df.iloc[0]
    assert (first.fact_id, first["rank"], first.edge, first.source, first.destination) == (
        "f0",
        1,
        "input->m0",
        "input",
        "m0",
    )
    assert abs(first.score + 0.9) < 1e-6
    assert df.groupby("fact_id").size().tolist() == [2, 2] and df.iloc[2]["edge"] == "input->a0.h0<q>"
    html = cs._repr_html_()
    assert "eap-ig" in html and "input-&gt;m0" in html

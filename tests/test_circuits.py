"""CircuitSet storage (dense, float16, sparse), compatibility checks and the selection rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from circuitdyn.engine.circuits import CircuitSet, select_threshold, select_top_n, select_top_n_paths
from circuitdyn.engine.graph import Graph
from circuitdyn.errors import CircuitdynError

META = {
    "method": "eap-ig",
    "ig_steps": 5,
    "metric": "logprob",
    "seed": 0,
    "architecture": "LlamaForCausalLM",
    "probe_set_hash": "sha256:abc",
    "epoch": 1,
    "corruption": ["entity", "noise", "entity"],
}


def _set(graph: Graph | None = None, seed: int = 0, meta: dict | None = None) -> CircuitSet:
    g = graph or Graph(2, 2)
    scores = torch.randn(3, g.n_edges, generator=torch.Generator().manual_seed(seed))
    return CircuitSet(scores, g.edges, ["f1", "f2", "f3"], dict(meta or META))


def test_dense_round_trip_exact(tmp_path):
    cs = _set()
    path = cs.save(tmp_path / "c.safetensors", dtype="float32")
    assert not (tmp_path / "c.safetensors.tmp").exists()
    back = CircuitSet.load(path)
    assert torch.equal(back.scores, cs.scores)
    assert back.edges == cs.edges and back.fact_ids == cs.fact_ids and back.meta == cs.meta
    assert torch.equal(back.fact("f2"), cs.scores[1])
    assert torch.allclose(back.mean(), cs.scores.mean(0))
    assert torch.allclose(back.mean(["f3", "f1"]), cs.scores[[0, 2]].mean(0))


def test_float16_default_scaled_per_fact_and_compact(tmp_path):
    """Default storage: float16 scaled per fact (2 bytes per score), no edge names in the file; tiny scores
    keep their relative precision where plain float16 would flush them to zero."""
    g = Graph(4, 4)
    scores = torch.randn(3, g.n_edges, generator=torch.Generator().manual_seed(1))
    scores[1] *= 1e-8  # a fact with a tiny gap: plain float16 loses it to the subnormal range
    scores[2] = 0.0
    cs = CircuitSet(scores, g.edges, ["f1", "f2", "f3"], dict(META))
    path = cs.save(tmp_path / "h.safetensors")
    back = CircuitSet.load(path)
    assert back.scores.dtype == torch.float32 and back.edges == g.edges and back.meta == cs.meta
    rel = ((back.scores - scores).abs() / scores.abs().amax(1, keepdim=True).clamp_min(1e-30))[:2]
    assert float(rel.max()) < 1e-3
    assert torch.equal(back.scores[2], scores[2])
    assert (scores[1].half() == 0).float().mean() > 0.5 and (back.scores[1] == 0).float().mean() < 0.01
    header = path.read_bytes()[:20000]
    assert b"a0.h1->" not in header and b"edges_sha256" in header
    assert path.stat().st_size < 3 * g.n_edges * 2 + 2000
    again = CircuitSet.load(back.save(tmp_path / "h2.safetensors"))
    assert torch.allclose(again.scores, back.scores, rtol=1e-3, atol=0)


def test_format_1_files_still_load():
    """Files written by circuitdyn before the compact format (edge names as JSON, format 1) load as before,
    and their settings read as the `right` IG grid they were computed with."""
    from circuitdyn.engine.circuits import circuit_files, settings

    folder = Path(__file__).parent / "data" / "circuits_v1"
    g = Graph(2, 2)
    want = torch.randn(3, g.n_edges, generator=torch.Generator().manual_seed(7))
    dense = CircuitSet.load(folder / "epoch_1.eap-ig3.answer-logprob.s0.abc.safetensors")
    assert torch.equal(dense.scores, want) and dense.edges == g.edges and dense.fact_ids == ["f1", "f2", "f3"]
    assert settings(dense.meta)["ig_grid"] == "right"
    sparse = CircuitSet.load(folder / "sparse_top5.safetensors")
    assert sparse.sparse and torch.equal(sparse.top_n(5), dense.top_n(5))
    assert [p.name for p, _ in circuit_files(folder)] == sorted(p.name for p in folder.glob("*.safetensors"))


def test_sparse_keeps_top_k_and_node_totals(tmp_path):
    cs = _set()
    sp = CircuitSet.load(cs.save(tmp_path / "s.safetensors", dtype="float32", top_k=10))
    assert sp.sparse and sp.meta["sparse_top_k"] == 10
    kept = cs.scores.gather(1, cs.scores.abs().topk(10, dim=1).indices).abs().sum(1) / cs.scores.abs().sum(1)
    assert sp.meta["sparse_mass_kept"] == pytest.approx(kept.tolist(), abs=1e-5)
    assert torch.equal(sp.top_n(10), cs.top_n(10))
    assert ((sp.scores != 0).sum(1) == 10).all()
    assert torch.allclose(sp.scores[sp.top_n(10)], cs.scores[cs.top_n(10)])
    assert torch.allclose(sp.node_totals("out"), cs.node_totals("out"), atol=1e-5)
    assert torch.allclose(sp.node_totals("in"), cs.node_totals("in"), atol=1e-5)
    assert torch.allclose(cs.node_totals("in").sum(1), cs.scores.sum(1), atol=1e-4)
    # by edge name: `out` sums the edges leaving a node, `in` those entering it (all q/k/v ports of a head)
    g, nodes = cs.graph, cs.graph.nodes
    for node in ("input", "a0.h1", "m0"):
        leaving = [i for i, e in enumerate(g.edges) if e.split("->")[0] == node]
        entering = [i for i, e in enumerate(g.edges) if g.component(e.split("->")[1]) == node]
        assert torch.allclose(cs.node_totals("out")[:, nodes.index(node)], cs.scores[:, leaving].sum(1), atol=1e-5)
        assert torch.allclose(cs.node_totals("in")[:, nodes.index(node)], cs.scores[:, entering].sum(1), atol=1e-5)
    # a subset keeps each fact's stored totals
    assert torch.equal(sp.subset(["f3", "f1"]).node_totals("in"), sp.node_totals("in")[[2, 0]])


def test_check_compatible():
    a, b = _set(seed=0), _set(seed=1)
    a.check_compatible(b, same_facts=True)
    with pytest.raises(CircuitdynError, match="different graphs"):
        a.check_compatible(_set(Graph(3, 2)))
    with pytest.raises(CircuitdynError, match="'metric'"):
        a.check_compatible(_set(meta={**META, "metric": "logit-diff"}))
    a.check_compatible(_set(meta={**META, "ig_grid": "right"}))  # a file without the field is the right grid
    with pytest.raises(CircuitdynError, match="'ig_grid': 'right' vs 'gauss'"):
        a.check_compatible(_set(meta={**META, "ig_grid": "gauss"}))
    c = a.subset(["f3", "f1"])
    assert c.meta["corruption"] == ["entity", "entity"] and torch.equal(c.scores[0], a.scores[2])
    with pytest.raises(CircuitdynError, match="different facts"):
        a.check_compatible(c, same_facts=True)
    renamed = CircuitSet(b.scores, b.edges, ["f1", "f2", "f9"], dict(META))
    with pytest.raises(CircuitdynError, match=r"different facts \(e.g. \['f3', 'f9'\]"):
        a.check_compatible(renamed, same_facts=True)
    a.check_compatible(b.subset(["f3", "f1", "f2"]), same_facts=True)  # same facts in another order


def test_bad_inputs(tmp_path):
    g = Graph(2, 2)
    with pytest.raises(CircuitdynError, match="does not match"):
        CircuitSet(torch.zeros(2, g.n_edges), g.edges, ["a"], {})
    with pytest.raises(CircuitdynError, match="unique"):
        CircuitSet(torch.zeros(2, g.n_edges), g.edges, ["a", "a"], {})
    with pytest.raises(CircuitdynError, match="unknown fact id 'zz'"):
        _set().fact("zz")
    with pytest.raises(CircuitdynError, match="does not exist"):
        CircuitSet.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CircuitdynError, match="not a readable safetensors"):
        CircuitSet.load(bad)
    path = _set().save(tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CircuitdynError, match=str(path.name)):
        CircuitSet.load(path)


def test_selection_rules():
    g = Graph(2, 2)
    scores = torch.zeros(g.n_edges)
    scores[g.edge_index["a0.h0->m0"]] = -5.0  # dangling: m0 has no way on to logits in this circuit
    for name, v in [("input->a0.h1<q>", 3.0), ("a0.h1->logits", -2.0), ("input->m1", 0.5), ("m1->logits", 0.4)]:
        scores[g.edge_index[name]] = v
    top2 = select_top_n(scores, 2)
    assert {g.edges[i] for i in top2.nonzero().flatten()} == {"a0.h0->m0", "input->a0.h1<q>"}
    assert select_threshold(scores, 2.0).sum() == 3
    on = select_top_n_paths(scores, g, 2)
    assert {g.edges[i] for i in on.nonzero().flatten()} == {"input->a0.h1<q>", "a0.h1->logits"}
    on4 = select_top_n_paths(scores, g, 4)
    assert int(on4.sum()) == 4 and not on4[g.edge_index["a0.h0->m0"]]
    batch = torch.stack([scores, -scores])
    assert torch.equal(select_top_n_paths(batch, g, 2)[1], on)
    assert select_top_n(batch, 0).sum() == 0

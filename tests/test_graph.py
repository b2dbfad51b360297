"""The attribution graph: node/edge naming, edge order, rebuilding from names, path pruning."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from circuitdyn.engine.graph import Graph
from circuitdyn.errors import CircuitdynError


def test_small_graph_edges_are_upstream_only():
    g = Graph(2, 2)
    assert g.nodes == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"]
    assert g.edges[0] == "input->a0.h0<q>"
    assert "a0.h0->m0" in g.edge_index and "a0.h0->a0.h1<q>" not in g.edge_index
    assert "m0->a1.h1<v>" in g.edge_index and "m1->a1.h0<k>" not in g.edge_index
    # input: 6 head ports x 2 layers + 2 mlps + logits; layer-0 heads: 6 + 2 + 1 (m0, m1, logits) ...
    assert g.n_edges == int(g.valid.sum()) == 46
    assert len(set(g.edges)) == g.n_edges


def test_from_config_and_edge_names_round_trip():
    cfg = HookedTransformerConfig(n_layers=3, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=10, act_fn="gelu")
    g = Graph.from_config(cfg)
    assert (g.n_layers, g.n_heads, g.has_mlp) == (3, 4, True)
    assert Graph.from_edge_names(g.edges) == g
    attn_only = Graph(2, 3, has_mlp=False)
    assert Graph.from_edge_names(attn_only.edges) == attn_only


@pytest.mark.parametrize(
    "edges, needle",
    [
        (["input-a0.h0<q>"], "SRC->DST"),
        (["input->x7"], "unknown node"),
        (["input->logits"], "no attention heads"),
        (Graph(2, 2).edges[:-1], "canonical"),
    ],
)
def test_bad_edge_names(edges, needle):
    with pytest.raises(CircuitdynError, match=needle):
        Graph.from_edge_names(edges)


def test_parallel_attn_mlp_rejected():
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=10, act_fn="gelu", parallel_attn_mlp=True
    )
    with pytest.raises(CircuitdynError, match="parallel_attn_mlp"):
        Graph.from_config(cfg)


def test_on_path_prunes_dangling_edges_and_networkx():
    g = Graph(2, 2)
    mask = torch.zeros(g.n_edges, dtype=torch.bool)
    # dangling: a0.h0->m0 (m0 reaches no logits), input->a1.h0<q> (a1.h0 neither), a1.h1->logits (nothing feeds a1.h1)
    for name in ["input->a0.h1<k>", "a0.h1->m1", "m1->logits", "a0.h0->m0", "input->a1.h0<q>", "a1.h1->logits"]:
        mask[g.edge_index[name]] = True
    kept = {g.edges[i] for i in g.on_path(mask).nonzero().flatten()}
    assert kept == {"input->a0.h1<k>", "a0.h1->m1", "m1->logits"}
    scores = torch.arange(g.n_edges, dtype=torch.float)
    nxg = g.to_networkx(scores, mask)
    assert set(nxg.nodes) == set(g.nodes)
    assert dict(nxg.nodes["a1.h0"]) == {"layer": 1, "kind": "attn", "head": 0}
    assert dict(nxg.nodes["m0"]) == {"layer": 0, "kind": "mlp", "head": None}
    assert nxg.nodes["logits"]["layer"] == 2 and nxg.nodes["input"]["kind"] == "input"
    assert nxg.edges["input", "a0.h1"]["ports"] == ["input->a0.h1<k>"]
    assert nxg.edges["m1", "logits"]["score"] == float(g.edge_index["m1->logits"])
    full = g.to_networkx()
    assert sum(len(d["ports"]) for *_, d in full.edges(data=True)) == g.n_edges

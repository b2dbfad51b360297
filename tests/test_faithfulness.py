"""Faithfulness by exact patching: full graph 1.0, empty 0.0, curves, smallest faithful circuit, storage."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_facts

from circuitdyn import attribution as A
from circuitdyn import forward as Fw
from circuitdyn import patching as Pt
from circuitdyn.extraction import extract_circuits
from circuitdyn.facts import facts_hash
from circuitdyn.circuits import CircuitSet
from circuitdyn.errors import CircuitdynError
from circuitdyn.faithfulness import CircuitEvaluator, circuit_metric, faithfulness, faithfulness_curve
from circuitdyn.graph import Graph
from circuitdyn.selection import select_top_n, smallest_faithful


def test_full_graph_is_one_and_empty_is_zero(tiny_tl):
    facts = tiny_facts(5)
    E = Graph.from_model(tiny_tl).n_edges
    full = faithfulness(tiny_tl, facts, torch.ones(5, E, dtype=torch.bool), batch_size=3)
    empty = faithfulness(tiny_tl, facts, torch.zeros(5, E, dtype=torch.bool), batch_size=3)
    assert torch.allclose(full, torch.ones(5), atol=1e-4)
    assert torch.allclose(empty, torch.zeros(5), atol=1e-4)


def test_patching_one_edge_moves_the_metric_as_exact_effects_say(tiny_tl):
    facts = tiny_facts(2, noise_every=0)
    batch = Fw.make_batch(tiny_tl, facts)
    effects = Pt.exact_edge_effects(tiny_tl, batch, edges=[0, 5])
    m_clean, _ = Pt.clean_and_corrupted_metric(tiny_tl, batch)
    E = Graph.from_model(tiny_tl).n_edges
    keep = torch.ones(2, E, dtype=torch.bool)
    keep[:, 5] = False
    assert torch.allclose(circuit_metric(tiny_tl, facts, keep) - m_clean, effects[:, 1], atol=1e-5)


def test_curve_and_smallest_circuit(tiny_tl):
    facts = tiny_facts(3, noise_every=0)
    scores = A.attribute(tiny_tl, facts, "eap-ig", steps=5)
    E = scores.shape[1]
    curve = faithfulness_curve(tiny_tl, facts, scores, sizes=[0, 10, E])
    assert list(curve.columns) == ["fact_id", "n", "n_edges", "faithfulness"]
    assert len(curve) == 9
    assert curve[curve.n == E].faithfulness.sub(1).abs().max() < 1e-4
    assert curve[curve.n == 0].faithfulness.abs().max() < 1e-4
    paths = faithfulness_curve(tiny_tl, facts, scores, sizes=[8], paths=True)
    assert (paths.n_edges >= 8).all()

    n, masks, faith = smallest_faithful(scores, CircuitEvaluator(tiny_tl, facts).faithfulness, target=0.8)
    assert masks.shape == (3, E) and (masks.sum(1) == n).all()
    assert (faith >= 0.8).all()
    check = faithfulness(tiny_tl, facts, masks)
    assert torch.allclose(check, faith, atol=1e-5)
    assert torch.equal(masks, select_top_n(scores, 0) | torch.stack([select_top_n(s, int(k)) for s, k in zip(scores, n)]))


def test_undefined_faithfulness_is_nan(tiny_tl):
    f = tiny_facts(1, noise_every=0)[0]
    same = type(f)(f.fact_id, f.clean_tokens, f.clean_tokens, f.answer_tokens, "none")
    E = Graph.from_model(tiny_tl).n_edges
    assert math.isnan(float(faithfulness(tiny_tl, [same], torch.ones(1, E, dtype=torch.bool))[0]))
    n, _, faith = smallest_faithful(torch.randn(1, E), CircuitEvaluator(tiny_tl, [same]).faithfulness, 0.8)
    assert int(n[0]) == E and math.isnan(float(faith[0]))


def test_bad_mask_shape(tiny_tl):
    with pytest.raises(CircuitdynError, match="masks have shape"):
        faithfulness(tiny_tl, tiny_facts(2), torch.ones(2, 3, dtype=torch.bool))


def test_extract_circuits_round_trip(tiny_tl, tmp_path):
    facts = tiny_facts(3)
    cs = extract_circuits(tiny_tl, facts, "eap-ig", steps=2, meta={"epoch": 1, "checkpoint_hash": "sha256:x"})
    assert isinstance(cs, CircuitSet) and cs.edges == Graph.from_model(tiny_tl).edges
    assert cs.meta["ig_steps"] == 2 and cs.meta["corruption"] == ["entity", "noise", "entity"]
    back = CircuitSet.load(cs.save(tmp_path / "c.safetensors"))
    assert torch.equal(back.scores, cs.scores) and back.meta == cs.meta
    back.check_compatible(cs, same_facts=True)
    assert cs.meta["probe_set_hash"] == facts_hash(facts) != facts_hash(facts[:2])

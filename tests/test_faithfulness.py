"""Faithfulness by exact patching: full graph 1.0, empty 0.0, curves, smallest faithful circuit, storage."""

from __future__ import annotations

import math

import pytest
import torch

from circuitdyn.engine import attribution as A
from circuitdyn.engine import forward as Fw
from circuitdyn.engine import patching as Pt
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.faithfulness import CircuitEvaluator, circuit_metric, faithfulness, faithfulness_curve
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import select_top_n, select_top_n_paths, smallest_faithful
from circuitdyn.engine.settings import AttributionSettings as S
from circuitdyn.errors import CircuitdynError
from circuitdyn.pipeline.extraction import extract_circuits
from circuitdyn.probes.facts import facts_hash
from circuitdyn.testing import tiny_facts


def test_full_graph_is_one_and_empty_is_zero(tiny_tl):
    facts = tiny_facts(5)
    E = Graph.from_model(tiny_tl).n_edges
    full = faithfulness(tiny_tl, facts, torch.ones(5, E, dtype=torch.bool), batch_size=3)
    empty = faithfulness(tiny_tl, facts, torch.zeros(5, E, dtype=torch.bool), batch_size=3)
    assert torch.allclose(full, torch.ones(5), atol=1e-4)
    assert torch.allclose(empty, torch.zeros(5), atol=1e-4)


def _patched_metric_with_hooks(model, fact, dropped: list[str]) -> float:
    """m(clean run with the `dropped` edges patched to their corrupted values), the textbook way: with
    TransformerLens split-input hooks each destination reads its own copy of the residual, from which
    a_src(this run) - a_src(corrupted run) of each dropped edge into it is subtracted."""
    flags = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in", "ungroup_grouped_query_attention")
    saved = {f: getattr(model.cfg, f) for f in flags}
    try:
        model.set_use_split_qkv_input(True)
        model.set_use_attn_result(True)
        model.set_use_hook_mlp_in(True)
        model.set_ungroup_grouped_query_attention(True)
        L = model.cfg.n_layers
        src_hook = {"input": ("blocks.0.hook_resid_pre", None)}
        for layer in range(L):
            src_hook[f"m{layer}"] = (f"blocks.{layer}.hook_mlp_out", None)
            for h in range(model.cfg.n_heads):
                src_hook[f"a{layer}.h{h}"] = (f"blocks.{layer}.attn.hook_result", h)

        def dst_hook(dst: str) -> tuple[str, int | None]:
            if dst == "logits":
                return f"blocks.{L - 1}.hook_resid_post", None
            if dst.startswith("m"):
                return f"blocks.{dst[1:]}.hook_mlp_in", None
            layer, head = (int(x) for x in dst[1 : dst.index("<")].split(".h"))
            return f"blocks.{layer}.hook_{dst[-2]}_input", head

        into: dict[str, list[tuple[int | None, str]]] = {}
        for edge in dropped:
            src, dst = edge.split("->")
            name, head = dst_hook(dst)
            into.setdefault(name, []).append((head, src))

        def out(acts, src: str) -> torch.Tensor:
            name, head = src_hook[src]
            return acts[name] if head is None else acts[name][:, :, head]

        answer = list(fact.answer_tokens)
        clean = torch.tensor([[*fact.clean_tokens, *answer[:-1]]])
        corrupted = torch.tensor([[*fact.corrupted_tokens, *answer[:-1]]])
        with torch.no_grad():
            _, corr = model.run_with_cache(corrupted)
            now: dict[str, torch.Tensor] = {}

            def record(t, hook):
                now[hook.name] = t
                return t

            def patch(t, hook):
                t = t.clone()
                for head, src in into[hook.name]:
                    delta = out(now, src) - out(corr, src)
                    if head is None:
                        t -= delta
                    else:
                        t[:, :, head] -= delta
                return t

            hooks = [(name, record) for name in {n for n, _ in src_hook.values()}]
            hooks += [(name, patch) for name in into]
            logits = model.run_with_hooks(clean, fwd_hooks=hooks)
        lp = logits.log_softmax(-1)[0]
        n = len(fact.clean_tokens)
        return float(sum(lp[n - 1 + t, a] for t, a in enumerate(answer)))
    finally:
        for f, v in saved.items():
            setattr(model.cfg, f, v)


def test_patching_one_edge_moves_the_metric_as_exact_effects_say(tiny_tl):
    """Patching one edge (every kind: into q/k/v ports of a GQA head, an MLP, the logits) moves the metric
    as TransformerLens hooks say, both through `circuit_metric` and `exact_edge_effects`."""
    facts = tiny_facts(2, noise_every=0)
    batch = Fw.make_batch(tiny_tl, facts)
    graph = Graph.from_model(tiny_tl)
    names = ["a0.h1->a1.h2<k>", "input->a1.h3<v>", "m0->a1.h0<q>", "a0.h3->m1", "a1.h2->logits", "m1->logits"]
    edges = [graph.edge_index[name] for name in names]
    effects = Pt.exact_edge_effects(tiny_tl, batch, edges=edges)
    m_clean, _ = Pt.clean_and_corrupted_metric(tiny_tl, batch)
    for j, (name, e) in enumerate(zip(names, edges)):
        want = torch.tensor([_patched_metric_with_hooks(tiny_tl, f, [name]) for f in facts])
        assert (want - m_clean).abs().max() > 1e-4, name  # the edge matters, so a wrong patch shows
        keep = torch.ones(2, graph.n_edges, dtype=torch.bool)
        keep[:, e] = False
        assert torch.allclose(circuit_metric(tiny_tl, facts, keep), want, atol=1e-4), name
        assert torch.allclose(effects[:, j], want - m_clean, atol=1e-4), name


@pytest.mark.parametrize("circuit", ["few", "half", "most"])
def test_circuit_metric_equals_patching_every_other_edge_with_hooks(tiny_tl, circuit):
    """m_circuit equals patching every edge outside the circuit, for a small circuit on input->logits paths
    (the sparse sum over kept edges), half the edges (one dense contraction) and most edges (sparse sum over
    patched edges)."""
    facts = tiny_facts(2, noise_every=0)
    graph = Graph.from_model(tiny_tl)
    if circuit == "few":
        keep = select_top_n_paths(A.attribute(tiny_tl, facts, S("eap")), graph, 6)
    else:
        density = 0.5 if circuit == "half" else 0.95
        keep = torch.rand(2, graph.n_edges, generator=torch.Generator().manual_seed(3)) < density
    ours = circuit_metric(tiny_tl, facts, keep)
    m_clean, m_corr = Pt.clean_and_corrupted_metric(tiny_tl, Fw.make_batch(tiny_tl, facts))
    assert ((ours - m_clean).abs() > 1e-3).all() and ((ours - m_corr).abs() > 1e-3).all()  # neither extreme
    for b, f in enumerate(facts):
        dropped = [graph.edges[i] for i in (~keep[b]).nonzero().flatten().tolist()]
        assert abs(float(ours[b]) - _patched_metric_with_hooks(tiny_tl, f, dropped)) < 1e-4, (circuit, b)


def test_curve_and_smallest_circuit(tiny_tl):
    facts = tiny_facts(3, noise_every=0)
    scores = A.attribute(tiny_tl, facts, S("eap-ig", 5))
    E = scores.shape[1]
    curve = faithfulness_curve(tiny_tl, facts, scores, sizes=[0, 10, E])
    assert list(curve.columns) == ["fact_id", "n", "n_edges", "faithfulness"]
    assert len(curve) == 9
    assert curve[curve.n == E].faithfulness.sub(1).abs().max() < 1e-4
    assert curve[curve.n == 0].faithfulness.abs().max() < 1e-4
    mid = curve[curve.n == 10].set_index("fact_id")
    assert (mid.n_edges == 10).all()
    want = faithfulness(tiny_tl, facts, select_top_n(scores, 10))
    assert mid.loc[[f.fact_id for f in facts], "faithfulness"].to_numpy() == pytest.approx(want.numpy(), abs=1e-5)
    paths = faithfulness_curve(tiny_tl, facts, scores, sizes=[8], paths=True)
    on_path = select_top_n_paths(scores, Graph.from_model(tiny_tl), 8)
    assert paths.n_edges.tolist() == on_path.sum(1).tolist() and (paths.n_edges >= 8).all()
    assert paths.faithfulness.to_numpy() == pytest.approx(faithfulness(tiny_tl, facts, on_path).numpy(), abs=1e-5)

    n, masks, faith = smallest_faithful(scores, CircuitEvaluator(tiny_tl, facts).faithfulness, target=0.8)
    assert masks.shape == (3, E) and (masks.sum(1) == n).all() and (n < E).all()
    assert (faith >= 0.8).all()
    check = faithfulness(tiny_tl, facts, masks)
    assert torch.allclose(check, faith, atol=1e-5)
    expected = select_top_n(scores, 0) | torch.stack([select_top_n(s, int(k)) for s, k in zip(scores, n)])
    assert torch.equal(masks, expected)


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
    cs = extract_circuits(tiny_tl, facts, S("eap-ig", 2), meta={"epoch": 1, "checkpoint_hash": "sha256:x"})
    assert isinstance(cs, CircuitSet) and cs.edges == Graph.from_model(tiny_tl).edges
    assert torch.equal(cs.scores, A.attribute(tiny_tl, facts, S("eap-ig", 2)))
    assert cs.fact_ids == [f.fact_id for f in facts] and cs.meta["epoch"] == 1
    assert cs.meta["ig_steps"] == 2 and cs.meta["corruption"] == ["entity", "noise", "entity"]
    back = CircuitSet.load(cs.save(tmp_path / "c.safetensors", dtype="float32"))
    assert torch.equal(back.scores, cs.scores) and back.meta == cs.meta
    back.check_compatible(cs, same_facts=True)
    assert cs.meta["probe_set_hash"] == facts_hash(facts) != facts_hash(facts[:2])


def test_known_circuits_cost_no_forward(tiny_tl, monkeypatch):
    """The full graph is the clean run (faithfulness exactly 1), the empty circuit the corrupted one (0), a
    circuit evaluated before keeps its value; only the other facts of a batch run, as a sub-batch, and
    agree with the whole batch's forward."""
    import circuitdyn.engine.faithfulness as F

    facts = tiny_facts(5)
    E = Graph.from_model(tiny_tl).n_edges
    ev = CircuitEvaluator(tiny_tl, facts, batch_size=3)
    rows: list[int] = []
    real = F.run_patched

    def counting(model, batch, keep, *args, **kwargs):
        rows.append(int(keep.shape[0]))
        return real(model, batch, keep, *args, **kwargs)

    monkeypatch.setattr(F, "run_patched", counting)
    assert torch.equal(ev.faithfulness(torch.ones(5, E, dtype=torch.bool)), torch.ones(5))
    assert torch.equal(ev.faithfulness(torch.zeros(5, E, dtype=torch.bool)), torch.zeros(5))
    assert rows == []
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(5, E, generator=gen) < 0.4
    first = ev.faithfulness(masks)
    assert rows == [3, 2]
    assert torch.equal(ev.faithfulness(masks.clone()), first) and rows == [3, 2]
    masks2 = masks.clone()
    masks2[[1, 3]] = torch.rand(2, E, generator=gen) < 0.6
    masks2[4] = True
    second = ev.faithfulness(masks2)
    open_per_batch = [sum(i in (1, 3) for i in chunk) for chunk in ev.chunks]  # batches are cut by length
    assert rows == [3, 2] + [n for n in open_per_batch if n]
    monkeypatch.undo()
    whole = faithfulness(tiny_tl, facts, masks2, batch_size=3)
    assert torch.allclose(second, whole, atol=1e-5) and torch.equal(second[[0, 2]], first[[0, 2]])
    assert float(second[4]) == 1.0


def test_a_facts_faithfulness_does_not_depend_on_its_batch(tiny_tl):
    """The evaluator cuts its batches from the facts sorted by length: every fact gets the value it gets alone."""
    facts = tiny_facts(5)
    E = Graph.from_model(tiny_tl).n_edges
    masks = torch.rand(5, E, generator=torch.Generator().manual_seed(3)) < 0.5
    together = CircuitEvaluator(tiny_tl, facts, batch_size=2)
    assert sorted(i for c in together.chunks for i in c) == list(range(5))
    alone = torch.cat([faithfulness(tiny_tl, [f], masks[i : i + 1]) for i, f in enumerate(facts)])
    assert torch.allclose(together.faithfulness(masks), alone, atol=1e-5)
    assert torch.allclose(together.m_clean, CircuitEvaluator(tiny_tl, facts, batch_size=5).m_clean, atol=1e-5)

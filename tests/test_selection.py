"""Selection rules: greedy pruning under patched evaluation finds smaller faithful circuits than top-n."""

from __future__ import annotations

import math

import pytest
import torch

from circuitdyn.engine import attribution as A
from circuitdyn.engine.faithfulness import CircuitEvaluator, faithfulness
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import (
    Selection,
    helpfulness,
    on_paths,
    prune_faithful,
    select_top_n,
    smallest_faithful,
)
from circuitdyn.engine.settings import AttributionSettings as S
from circuitdyn.errors import CircuitdynError
from circuitdyn.testing import tiny_facts

GRAPH = Graph(3, 4)
NEEDED = [  # two input->logits paths: each fact's faithfulness depends on these edges only
    ["input->a0.h1<v>", "a0.h1->m1", "m1->logits"],
    ["input->a2.h3<q>", "a2.h3->logits", "input->m0", "m0->a1.h2<k>", "a1.h2->logits"],
]


def synthetic(n_decoys: int = 40, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Scores [2, edge] in which each fact's needed edges score -1 (helpful: their sum into logits is
    negative), `n_decoys` irrelevant edges not into logits score 2..5 in |score| with either sign, and the
    rest within +-0.05: top-n must take every decoy."""
    gen = torch.Generator().manual_seed(seed)
    scores = 0.1 * torch.rand(2, GRAPH.n_edges, generator=gen) - 0.05
    needed = [torch.tensor([GRAPH.edge_index[e] for e in names]) for names in NEEDED]
    not_logits = torch.tensor([not e.endswith("->logits") for e in GRAPH.edges])
    for f, idx in enumerate(needed):
        decoys = torch.randperm(GRAPH.n_edges, generator=gen)
        decoys = decoys[~torch.isin(decoys, idx) & not_logits[decoys]][:n_decoys]
        sign = torch.where(torch.rand(n_decoys, generator=gen) < 0.5, -1.0, 1.0)
        scores[f, decoys] = sign * (2 + 3 * torch.rand(n_decoys, generator=gen))
        scores[f, idx] = -1.0
    return scores, needed


def fake_faithfulness(needed: list[torch.Tensor], calls: list[int], undefined: tuple[int, ...] = ()):
    """Faithfulness = the share of a fact's needed edges on input->logits paths of its circuit, as exact
    patching would see it (off-path edges never count); NaN for the `undefined` facts."""

    def faith(masks: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        kept = on_paths(masks, GRAPH)
        out = torch.stack([kept[f, needed[f % len(needed)]].float().mean() for f in range(len(masks))])
        out[list(undefined)] = float("nan")
        return out

    return faith


def test_pruning_finds_the_needed_edges_where_top_n_takes_every_decoy():
    scores, needed = synthetic()
    calls: list[int] = []
    faith = fake_faithfulness(needed, calls)
    n_top, _, reached_top = smallest_faithful(scores, faith, 0.9, rel_tol=0.0)
    assert n_top.tolist() == [43, 45] and (reached_top >= 0.9).all()
    calls.clear()
    n, masks, reached = prune_faithful(scores, faith, 0.9, GRAPH, rounds=64)
    assert (reached >= 0.9).all() and torch.equal(faith(masks), reached)
    for f, idx in enumerate(needed):
        assert sorted(masks[f].nonzero().flatten().tolist()) == sorted(idx.tolist())
    assert n.tolist() == [3, 5] and (n * 8 < n_top).all()
    assert len(calls) <= 64 + 1 + 1 + 20  # rounds + final check + the start's bisection (E = 262)


def test_pruning_cost_and_start():
    scores, needed = synthetic()
    calls: list[int] = []
    faith = fake_faithfulness(needed, calls)
    start = select_top_n(scores, 120)
    n, masks, reached = prune_faithful(scores, faith, 0.9, GRAPH, start=start, rounds=5)
    assert len(calls) == 1 + 5 + 1
    assert (reached >= 0.9).all() and not (masks & ~start).any() and (n < on_paths(start, GRAPH).sum(1)).all()
    # no rounds: the start circuit, pruned to paths, at no cost beyond evaluating it twice
    calls.clear()
    _, masks0, _ = prune_faithful(scores, faith, 0.9, GRAPH, start=start, rounds=0)
    assert len(calls) == 2 and torch.equal(masks0, on_paths(start, GRAPH))
    # a start circuit below the target is returned as it is
    weak = select_top_n(scores, 10)
    _, masks_w, reached_w = prune_faithful(scores, faith, 0.9, GRAPH, start=weak, rounds=3)
    assert torch.equal(masks_w, on_paths(weak, GRAPH)) and (reached_w < 0.9).all()


def test_undefined_facts_keep_the_full_graph():
    scores, needed = synthetic()
    scores = torch.cat([scores, scores[:1]])
    n, masks, reached = prune_faithful(scores, fake_faithfulness(needed, [], undefined=(2,)), 0.9, GRAPH, rounds=32)
    assert masks[2].all() and int(n[2]) == GRAPH.n_edges and math.isnan(float(reached[2]))
    assert n[:2].tolist() == [3, 5]


def test_a_circuit_that_fails_its_final_check_gets_its_start_back():
    """Faithfulness that drops for fact 0 after a few calls: the pruned circuit no longer reaches the target
    when re-evaluated, so the start circuit (verified by the search) is returned instead."""
    scores, needed = synthetic()
    calls: list[int] = []
    honest = fake_faithfulness(needed, calls)

    def drifting(masks: torch.Tensor) -> torch.Tensor:
        out = honest(masks)
        if len(calls) > 6:
            out[0] = out[0] - 0.5
        return out

    start = select_top_n(scores, 120)
    _, masks, reached = prune_faithful(scores, drifting, 0.9, GRAPH, start=start, rounds=8)
    assert torch.equal(masks[0], on_paths(start, GRAPH)[0]) and float(reached[0]) >= 0.9
    assert int(masks[1].sum()) < int(on_paths(start, GRAPH)[1].sum())


def test_helpfulness_sign_comes_from_the_edges_into_logits():
    scores = torch.zeros(3, GRAPH.n_edges)
    logit_edge, other = GRAPH.edge_index["m2->logits"], GRAPH.edge_index["input->m0"]
    scores[0, [logit_edge, other]] = torch.tensor([-2.0, 0.5])  # m_corr < m_clean: negative scores help
    scores[1, [logit_edge, other]] = torch.tensor([2.0, 0.5])  # m_corr > m_clean: positive scores help
    scores[2, other] = -0.5  # no signal into logits: |score|
    h = helpfulness(scores, GRAPH)
    assert h[0, [logit_edge, other]].tolist() == [2.0, -0.5]
    assert h[1, [logit_edge, other]].tolist() == [2.0, 0.5]
    assert float(h[2, other]) == 0.5


def test_bad_arguments():
    scores, needed = synthetic()
    faith = fake_faithfulness(needed, [])
    with pytest.raises(CircuitdynError, match="target faithfulness"):
        prune_faithful(scores, faith, 0.0, GRAPH)
    with pytest.raises(CircuitdynError, match="rounds must be >= 0, got -1"):
        prune_faithful(scores, faith, 0.8, GRAPH, rounds=-1)
    with pytest.raises(CircuitdynError, match="min_block must be >= 1, got 0"):
        prune_faithful(scores, faith, 0.8, GRAPH, min_block=0)
    with pytest.raises(CircuitdynError, match="graph has 110"):
        prune_faithful(scores, faith, 0.8, Graph(2, 4))
    with pytest.raises(CircuitdynError, match=r"start circuits have shape \(1, 262\)"):
        prune_faithful(scores, faith, 0.8, GRAPH, start=torch.ones(1, GRAPH.n_edges, dtype=torch.bool))


def test_pruned_selection_parsing():
    sel = Selection.parse("pruned:0.8")
    assert sel == Selection("pruned", 0.8) and str(sel) == "pruned:0.8" and Selection.parse(str(sel)) == sel
    assert Selection.parse("pruned:80%") == sel and sel.needs_model and not Selection.parse("top:5").needs_model
    for bad in ("pruned:0", "pruned:2", "pruned:-0.5", "pruned:x", "prune:0.8"):
        with pytest.raises(CircuitdynError):
            Selection.parse(bad)
    scores, needed = synthetic()
    with pytest.raises(CircuitdynError, match="needs a model"):
        sel.select(scores, GRAPH)
    masks, reached = sel.select(scores, GRAPH, fake_faithfulness(needed, []))
    assert masks.sum(1).tolist() == [3, 5] and (reached >= 0.8).all()


# --- on a tiny model: path pruning is exact, pruned circuits reach the target when re-evaluated ---------
def test_path_pruning_leaves_the_patched_result_unchanged(tiny_tl):
    """Exact in math; in float32 the sparse and dense patch sums differ by ~1e-6 nats, which faithfulness
    divides by these facts' gaps of 0.18-0.7 nats (hence 1e-4 there). Dropping on-path edges instead moves
    the metric by far more, so the check has teeth."""
    facts = tiny_facts(4)
    graph = Graph.from_model(tiny_tl)
    ev = CircuitEvaluator(tiny_tl, facts)
    gen = torch.Generator().manual_seed(0)
    moved = []
    for density in (0.05, 0.15, 0.3):
        masks = torch.rand(4, graph.n_edges, generator=gen) < density
        pruned = on_paths(masks, graph)
        assert not (pruned & ~masks).any() and (pruned.sum(1) < masks.sum(1)).all()
        metric = ev.metric_of(masks)
        assert torch.allclose(ev.metric_of(pruned), metric, atol=1e-5)
        assert torch.allclose(ev.faithfulness(pruned), ev.faithfulness(masks), atol=1e-4)
        on_path_dropped = masks & ~(pruned & (torch.rand(pruned.shape, generator=gen) < 0.5))
        moved.append((ev.metric_of(on_path_dropped) - metric).abs().max())
    assert max(moved) > 1e-3


def test_pruned_circuits_reach_the_target_on_a_tiny_model(tiny_tl):
    facts = tiny_facts(4)
    scores = A.attribute(tiny_tl, facts, S("eap-ig", 3))
    graph = Graph.from_model(tiny_tl)
    ev = CircuitEvaluator(tiny_tl, facts)
    n_top, _, _ = smallest_faithful(scores, ev.faithfulness, 0.8, rel_tol=0.0)
    n, masks, reached = prune_faithful(scores, ev.faithfulness, 0.8, graph, rounds=24)  # the rule's default
    check = faithfulness(tiny_tl, facts, masks)
    assert (check >= 0.8).all() and torch.allclose(check, reached, atol=1e-5)
    assert (n <= n_top).all() and (n < n_top).any() and torch.equal(on_paths(masks, graph), masks)
    sel_masks, sel_reached = Selection.parse("pruned:0.8").select(scores, graph, ev.faithfulness)
    assert torch.equal(sel_masks, masks) and torch.allclose(sel_reached, reached)


def test_smallest_faithful_keeps_its_contract_where_faithfulness_is_not_monotone():
    """Faithfulness that rises with n but wobbles (as on SmolLM2, where it overshoots to 3 and dips back):
    the size returned reaches the target (its value is the one reported), a tested size `lo` below it fell
    short (or lo = 0) with n - lo <= rel_tol x n (at least 1), and a NaN fact keeps the full graph."""
    E = GRAPH.n_edges
    scores = torch.randn(5, E, generator=torch.Generator().manual_seed(1))
    target = 0.8

    def value(f: int, n: int) -> float:
        return 1.1 * n / E + 0.25 * math.sin(n / (3 + f))

    for rel_tol in (0.0, 0.05, 0.2):
        tested: list[tuple[int, int, float]] = []

        def faith(masks: torch.Tensor, tested: list = tested) -> torch.Tensor:
            out = torch.tensor([value(f, int(k)) for f, k in enumerate(masks.sum(1).tolist())])
            out[4] = float("nan")
            tested.extend((f, int(k), float(v)) for f, (k, v) in enumerate(zip(masks.sum(1), out)))
            return out

        n, masks, reached = smallest_faithful(scores, faith, target, rel_tol=rel_tol)
        assert torch.equal(masks.sum(1), n) and torch.equal(
            masks, select_top_n(scores, 0) | torch.stack([select_top_n(s, int(k)) for s, k in zip(scores, n)])
        )
        for f in range(4):
            k = int(n[f])
            assert float(reached[f]) >= target and float(reached[f]) == pytest.approx(value(f, k))
            short = [m for g, m, v in tested if g == f and m < k and v < target]
            lo = max(short, default=0)
            assert k - lo <= max(1, int(k * rel_tol)), (rel_tol, f, k, lo)
        assert int(n[4]) == E and masks[4].all() and math.isnan(float(reached[4]))
        assert len(tested) // 5 <= 1 + math.ceil(math.log2(E)) + 1


def test_smallest_faithful_on_an_evaluator_runs_only_open_facts(tiny_tl, monkeypatch):
    """With `CircuitEvaluator.faithfulness`, the full-graph check and facts whose bracket has closed cost no
    patched forward: every fact-row run is a new (fact, size); the sizes are the ones bisection finds."""
    import circuitdyn.engine.faithfulness as F

    facts = tiny_facts(5)
    scores = A.attribute(tiny_tl, facts, S("eap-ig", 3))
    rows: list[int] = []
    real = F.run_patched

    def counting(model, batch, keep, *args, **kwargs):
        rows.append(int(keep.shape[0]))
        return real(model, batch, keep, *args, **kwargs)

    sizes: list[list[int]] = []
    ev = CircuitEvaluator(tiny_tl, facts, batch_size=3)

    def faith(masks: torch.Tensor) -> torch.Tensor:
        sizes.append(masks.sum(1).tolist())
        return ev.faithfulness(masks)

    monkeypatch.setattr(F, "run_patched", counting)
    n, masks, reached = smallest_faithful(scores, faith, 0.8)
    monkeypatch.undo()
    E = Graph.from_model(tiny_tl).n_edges
    distinct = {(f, k) for call in sizes for f, k in enumerate(call) if 0 < k < E}
    assert sum(rows) == len(distinct) < 5 * (len(sizes) - 1)
    check = faithfulness(tiny_tl, facts, masks, batch_size=3)
    assert (reached >= 0.8).all() and torch.allclose(check, reached, atol=1e-5)

"""How much of a fact's recall does a circuit carry? Exact patching of everything outside the circuit.

faithfulness(circuit) = (m_circuit - m_corrupted) / (m_clean - m_corrupted), where m_circuit runs the
model with every edge outside the circuit patched to its corrupted value (`attribution.run_patched`).
The full graph gives 1.0 and the empty circuit 0.0. When clean and corrupted runs score the same
(|m_clean - m_corrupted| < 1e-6) the ratio is undefined and reported as NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.attribution import NOISE_SCALE, corrupted_sources, embed_inputs, make_batch, run_capture, run_patched
from circuitdyn.circuits import select_top_n, select_top_n_paths
from circuitdyn.errors import CircuitdynError
from circuitdyn.graph import Graph
from circuitdyn.probes import FactPrompt


class CircuitEvaluator:
    """Evaluates many circuits of the same facts on one model: m_clean / m_corr per fact are computed once,
    corrupted activations once per batch (on first use). `metric_of(masks)`, `faithfulness(masks)`."""

    def __init__(self, model: Any, facts: Sequence[FactPrompt], metric: str, seed: int, batch_size: int,
                 noise_scale: float) -> None:
        if not facts:
            raise CircuitdynError("no facts given to evaluate")
        self.model, self.metric = model, metric
        self.graph = Graph.from_model(model)
        self.chunks = [list(range(i, min(i + batch_size, len(facts)))) for i in range(0, len(facts), batch_size)]
        self.batches = [make_batch(model, [facts[i] for i in c], seed, noise_scale, metric) for c in self.chunks]
        self._corr: dict[int, Tensor] = {}
        m_clean, m_corr = [], []
        for batch in self.batches:
            clean_in, corr_in = embed_inputs(model, batch)
            with torch.no_grad():
                m_clean.append(run_capture(model, clean_in, batch, metric)[0])
                m_corr.append(run_capture(model, corr_in, batch, metric)[0])
        self.m_clean, self.m_corr = torch.cat(m_clean), torch.cat(m_corr)

    def metric_of(self, masks: Bool[Tensor, "fact edge"]) -> Float[Tensor, "fact"]:
        if masks.shape != (len(self.m_clean), self.graph.n_edges):
            raise CircuitdynError(
                f"circuit masks have shape {tuple(masks.shape)}, expected ({len(self.m_clean)}, {self.graph.n_edges})"
            )
        out = []
        for j, (chunk, batch) in enumerate(zip(self.chunks, self.batches)):
            if j not in self._corr:
                self._corr[j] = corrupted_sources(self.model, batch, self.metric)
            out.append(run_patched(self.model, batch, masks[chunk], self.metric, self._corr[j]))
        return torch.cat(out)

    def faithfulness(self, masks: Bool[Tensor, "fact edge"]) -> Float[Tensor, "fact"]:
        span = self.m_clean - self.m_corr
        f = (self.metric_of(masks) - self.m_corr) / span
        return torch.where(span.abs() < 1e-6, torch.full_like(f, float("nan")), f)


def circuit_metric(model: Any, facts: Sequence[FactPrompt], masks: Bool[Tensor, "fact edge"], metric: str = "logprob",
                   seed: int = 0, batch_size: int = 8, noise_scale: float = NOISE_SCALE) -> Float[Tensor, "fact"]:
    """m_circuit per fact: the metric with every edge outside `masks[fact]` patched to its corrupted value."""
    return CircuitEvaluator(model, facts, metric, seed, batch_size, noise_scale).metric_of(masks)


def faithfulness(model: Any, facts: Sequence[FactPrompt], masks: Bool[Tensor, "fact edge"], metric: str = "logprob",
                 seed: int = 0, batch_size: int = 8, noise_scale: float = NOISE_SCALE) -> Float[Tensor, "fact"]:
    """Faithfulness per fact of the circuits `masks` [fact, edge] (same facts, seed and metric as attribution)."""
    return CircuitEvaluator(model, facts, metric, seed, batch_size, noise_scale).faithfulness(masks)


def _select(scores: Tensor, graph: Graph, n: Tensor, paths: bool) -> Tensor:
    """Per-fact top-n masks for per-fact sizes n [fact]."""
    rows = [select_top_n_paths(s, graph, int(k)) if paths else select_top_n(s, int(k)) for s, k in zip(scores, n)]
    return torch.stack(rows)


def faithfulness_curve(model: Any, facts: Sequence[FactPrompt], scores: Float[Tensor, "fact edge"],
                       sizes: Sequence[int] | None = None, paths: bool = False, metric: str = "logprob",
                       seed: int = 0, batch_size: int = 8, noise_scale: float = NOISE_SCALE,
                       progress: bool = False) -> pd.DataFrame:
    """Faithfulness of each fact's top-n circuit for several n (default: 10 sizes log-spaced up to all edges).

    Columns: fact_id, n (requested), n_edges (selected; differs from n with `paths=True`), faithfulness.
    """
    from tqdm.auto import tqdm

    ev = CircuitEvaluator(model, facts, metric, seed, batch_size, noise_scale)
    E = ev.graph.n_edges
    if scores.shape != (len(facts), E):
        raise CircuitdynError(f"scores have shape {tuple(scores.shape)}, expected ({len(facts)}, {E})")
    if sizes is None:
        sizes = sorted({max(1, int(round(E ** (i / 9)))) for i in range(10)})
    rows = []
    for n in tqdm(list(sizes), desc="faithfulness curve", unit="size", disable=not progress):
        masks = _select(scores, ev.graph, torch.full((len(facts),), int(n)), paths)
        faith = ev.faithfulness(masks)
        for i, f in enumerate(facts):
            rows.append({"fact_id": f.fact_id, "n": int(n), "n_edges": int(masks[i].sum()),
                         "faithfulness": float(faith[i])})
    return pd.DataFrame(rows)


def smallest_faithful(model: Any, facts: Sequence[FactPrompt], scores: Float[Tensor, "fact edge"],
                      target: float = 0.8, paths: bool = False, metric: str = "logprob", seed: int = 0,
                      batch_size: int = 8, noise_scale: float = NOISE_SCALE, rel_tol: float = 0.05,
                      progress: bool = False) -> tuple[Tensor, Bool[Tensor, "fact edge"], Tensor]:
    """Per fact, the smallest top-n circuit reaching `target` faithfulness (bisection over n, all facts at once).

    Faithfulness is not exactly monotone in n; the bisection keeps an n that reaches the target
    (the full graph always does) and stops when the bracket is within `rel_tol` of it.
    Returns (n [fact], masks [fact, edge], faithfulness [fact]); a fact whose faithfulness is undefined
    (NaN) gets the full graph.
    """
    from tqdm.auto import tqdm

    ev = CircuitEvaluator(model, facts, metric, seed, batch_size, noise_scale)
    E = ev.graph.n_edges
    if scores.shape != (len(facts), E):
        raise CircuitdynError(f"scores have shape {tuple(scores.shape)}, expected ({len(facts)}, {E})")
    F_ = len(facts)
    hi = torch.full((F_,), E, dtype=torch.long)  # known to reach target
    undefined = (ev.m_clean - ev.m_corr).abs() < 1e-6
    lo = torch.where(undefined, hi, torch.zeros_like(hi))  # known (or assumed) below target
    best_f = torch.where(undefined, float("nan"), 1.0)
    bar = tqdm(desc=f"smallest circuit >= {target:.0%}", unit="round", disable=not progress)
    while True:
        open_ = (hi - lo) > torch.clamp((hi.float() * rel_tol).long(), min=1)
        if not open_.any():
            break
        mid = torch.where(open_, (lo + hi) // 2, hi)
        faith = ev.faithfulness(_select(scores, ev.graph, mid, paths))
        ok = faith >= target
        hi = torch.where(open_ & ok, mid, hi)
        best_f = torch.where(open_ & ok, faith, best_f)
        lo = torch.where(open_ & ~ok, mid, lo)
        bar.update()
    bar.close()
    masks = _select(scores, ev.graph, hi, paths)
    return hi, masks, best_f

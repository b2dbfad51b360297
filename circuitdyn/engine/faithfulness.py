"""How much of a fact's recall does a circuit carry? Exact patching of everything outside the circuit.

faithfulness(circuit) = (m_circuit - m_corrupted) / (m_clean - m_corrupted), where m_circuit runs the
model with every edge outside the circuit patched to its corrupted value (`attribution.run_patched`).
The full graph gives 1.0 and the empty circuit 0.0. When clean and corrupted runs score the same
(|m_clean - m_corrupted| < 1e-6) the ratio is undefined and reported as NaN.

`CircuitEvaluator.faithfulness` is the faithfulness callable that `circuitdyn.engine.selection` rules take
(e.g. `smallest_faithful(scores, evaluator.faithfulness, 0.8)`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.engine.forward import NOISE_SCALE, Metric, by_length, make_batch
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.patching import PatchBase, patch_base, run_patched
from circuitdyn.engine.selection import top_n_by_fact
from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import FactPrompt

MIN_GAP = 1.0
"""Smallest m_clean - m_corrupted (signed, in metric units: nats for answer-logprob, logits for logit-diff) at
which a fact's faithfulness is interpreted. Below it the corruption barely moves the metric, the ratio
divides by a near-zero gap (values like -7 or 66 appear), and circuits sized by it mean nothing; such facts
are excluded from comparisons and counted. A negative gap (the corruption *raises* the answer's score) is
excluded too, however large: the ratio's denominator then has the wrong sign."""


def gap_ok(gaps: Sequence[float] | np.ndarray, min_gap: float = MIN_GAP) -> np.ndarray:
    """Per fact: may its faithfulness be interpreted? True where gap = m_clean - m_corrupted >= `min_gap`
    (signed: a corruption that raises the answer's score is excluded), and where the gap is not recorded
    (NaN: nothing to exclude it on). Every place that filters on the gap calls this."""
    g = np.asarray(gaps, dtype=float)
    return np.isnan(g) | (g >= min_gap)


BASE_BUDGET_BYTES = 4 * 2**30
"""Memory an evaluator keeps for its batches' `patching.PatchBase`s (~190 MB per 8 chat-templated SmolLM2
facts); a batch past it recomputes its base when a circuit of it is evaluated, so memory stays bounded."""


class CircuitEvaluator:
    """Evaluates many circuits of the same facts on one model: each batch's `patching.PatchBase` (m_clean and
    m_corr per fact, the corrupted activations, the shared prefix's clean keys and values) is computed once,
    up front, and kept within BASE_BUDGET_BYTES. `metric_of(masks)`, `faithfulness(masks)`.

    A fact's full graph (m_clean: faithfulness exactly 1), its empty circuit (m_corr: 0) and a circuit it
    evaluated before (its first value) cost no forward, and only the other facts of a batch run: a search
    such as `selection.smallest_faithful` pays only for the facts whose bracket is still open."""

    def __init__(
        self,
        model: Any,
        facts: Sequence[FactPrompt],
        metric: str | Metric = "answer-logprob",
        seed: int = 0,
        batch_size: int = 8,
        noise_scale: float = NOISE_SCALE,
    ) -> None:
        if not facts:
            raise CircuitdynError("no facts given to evaluate")
        self.model, self.metric = model, metric
        self.graph = Graph.from_model(model)
        order = by_length(facts)
        self.chunks = [order[i : i + batch_size] for i in range(0, len(facts), batch_size)]
        self.batches = [make_batch(model, [facts[i] for i in c], seed, noise_scale, metric) for c in self.chunks]
        self._seen: list[dict[bytes, float]] = [{} for _ in facts]  # per fact: mask digest -> m_circuit
        self._base: dict[int, PatchBase] = {}  # per batch, while they fit BASE_BUDGET_BYTES
        self.m_clean, self.m_corr = torch.empty(len(facts), device="cpu"), torch.empty(len(facts), device="cpu")
        kept = 0
        for j, (chunk, batch) in enumerate(zip(self.chunks, self.batches)):
            base = patch_base(model, batch, metric)
            self.m_clean[chunk], self.m_corr[chunk] = base.m_clean.cpu(), base.m_corr.cpu()
            if kept + base.nbytes <= BASE_BUDGET_BYTES:
                self._base[j], kept = base, kept + base.nbytes

    def metric_of(self, masks: Bool[Tensor, "fact edge"]) -> Float[Tensor, " fact"]:
        if masks.shape != (len(self.m_clean), self.graph.n_edges):
            raise CircuitdynError(
                f"circuit masks have shape {tuple(masks.shape)}, expected ({len(self.m_clean)}, {self.graph.n_edges})"
            )
        # Rows whose value is known cost no forward: the full graph is the clean run (m_clean), the empty
        # circuit the corrupted run (m_corr), and a circuit evaluated before (e.g. a search's bracket end,
        # re-sent for a fact that has converged) gets its first value back. The rest of each batch runs as
        # a sub-batch of just those facts.
        rows = masks.detach().cpu()
        out = torch.where(rows.all(1), self.m_clean, self.m_corr).clone()
        todo = rows.any(1) & ~rows.all(1)
        keys: dict[int, bytes] = {}
        for i in todo.nonzero().flatten().tolist():
            keys[i] = hashlib.blake2b(np.packbits(rows[i].numpy()).tobytes(), digest_size=16).digest()
            if keys[i] in self._seen[i]:
                out[i] = self._seen[i][keys[i]]
                todo[i] = False
        for j, (chunk, batch) in enumerate(zip(self.chunks, self.batches)):
            sel = [k for k, i in enumerate(chunk) if todo[i]]
            if not sel:
                continue
            base = self._base[j] if j in self._base else patch_base(self.model, batch, self.metric)
            if len(sel) < len(chunk):  # only the open facts, without the padding they do not need
                batch = batch.take(sel)
                base = base.rows(sel, batch.clean.shape[1])
            idx = [chunk[k] for k in sel]
            vals = run_patched(self.model, batch, masks[idx], self.metric, base).float().cpu()
            for i, v in zip(idx, vals.tolist()):
                out[i] = v
                self._seen[i][keys[i]] = v
        return out

    def faithfulness(self, masks: Bool[Tensor, "fact edge"]) -> Float[Tensor, " fact"]:
        span = self.m_clean - self.m_corr
        f = (self.metric_of(masks) - self.m_corr) / span
        return torch.where(span.abs() < 1e-6, torch.full_like(f, float("nan")), f)


def circuit_metric(
    model: Any,
    facts: Sequence[FactPrompt],
    masks: Bool[Tensor, "fact edge"],
    metric: str | Metric = "answer-logprob",
    seed: int = 0,
    batch_size: int = 8,
    noise_scale: float = NOISE_SCALE,
) -> Float[Tensor, " fact"]:
    """m_circuit per fact: the metric with every edge outside `masks[fact]` patched to its corrupted value."""
    return CircuitEvaluator(model, facts, metric, seed, batch_size, noise_scale).metric_of(masks)


def faithfulness(
    model: Any,
    facts: Sequence[FactPrompt],
    masks: Bool[Tensor, "fact edge"],
    metric: str | Metric = "answer-logprob",
    seed: int = 0,
    batch_size: int = 8,
    noise_scale: float = NOISE_SCALE,
) -> Float[Tensor, " fact"]:
    """Faithfulness per fact of the circuits `masks` [fact, edge] (same facts, seed and metric as attribution)."""
    return CircuitEvaluator(model, facts, metric, seed, batch_size, noise_scale).faithfulness(masks)


def faithfulness_curve(
    model: Any,
    facts: Sequence[FactPrompt],
    scores: Float[Tensor, "fact edge"],
    sizes: Sequence[int] | None = None,
    paths: bool = False,
    metric: str | Metric = "answer-logprob",
    seed: int = 0,
    batch_size: int = 8,
    noise_scale: float = NOISE_SCALE,
    progress: bool = False,
) -> pd.DataFrame:
    """Faithfulness of each fact's top-n circuit for several n (default: 10 sizes log-spaced up to all edges).

    Columns: fact_id, n (requested), n_edges (selected; differs from n with `paths=True`), faithfulness.
    """
    from circuitdyn.progress import progress_bar

    ev = CircuitEvaluator(model, facts, metric, seed, batch_size, noise_scale)
    E = ev.graph.n_edges
    if scores.shape != (len(facts), E):
        raise CircuitdynError(f"scores have shape {tuple(scores.shape)}, expected ({len(facts)}, {E})")
    if sizes is None:
        sizes = sorted({max(1, int(round(E ** (i / 9)))) for i in range(10)})
    rows = []
    for n in progress_bar(list(sizes), desc="faithfulness curve", unit="size", disable=not progress):
        masks = top_n_by_fact(scores, torch.full((len(facts),), int(n), device=scores.device), ev.graph, paths)
        faith = ev.faithfulness(masks)
        for i, f in enumerate(facts):
            rows.append(
                {"fact_id": f.fact_id, "n": int(n), "n_edges": int(masks[i].sum()), "faithfulness": float(faith[i])}
            )
    return pd.DataFrame(rows)

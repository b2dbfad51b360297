"""Exact activation patching on the attribution graph: the ground truth the attribution scores estimate.

`run_patched(model, batch, keep)` runs the model with every edge outside `keep` patched to its value in the
corrupted run: a destination reads `resid - sum_{src not kept} (a_src(this run) - a_src(corrupted run))`.
All edges kept = the clean run; none kept = the corrupted run. `exact_edge_effects` / `exact_node_effects`
patch one edge (or one node's outgoing edges) at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.engine.forward import (
    FactBatch,
    LayerWeights,
    Metric,
    attend,
    check_supported,
    clean_prefix,
    embed_inputs,
    layer_weights,
    ln1,
    metric_at_answers,
    mlp,
    run_capture,
    shared_prefix,
    source_outputs,
)
from circuitdyn.engine.graph import Graph
from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

SPARSE_PATCH_FACTOR = 32
"""A patched read sums only the kept (or only the patched) edges when that side holds under 1/32 of them
(gathering a source's output per edge costs ~30x a dense multiply-add: on SmolLM2 the sparse path wins only
below ~3 % of edges, `benchmarks/pipeline.py`)."""


@dataclass(frozen=True)
class PatchBase:
    """What every patched run of one batch shares, computed once (`patch_base`) and reused across circuits:
    the weights, the clean run's keys and values of the batch's shared prefix (`forward.shared_prefix`: there
    every patch is zero, so patched runs start after it), the corrupted run's source outputs after it, and
    the two ends every circuit sits between: m_clean (the full graph) and m_corr (the empty circuit)."""

    start: int
    layers: list[LayerWeights]
    """The model's weights in the functional forward's shapes (prepared once, not per circuit)."""
    prefix: list[tuple[Tensor, Tensor]]
    """Per layer, the clean run's keys (rotated) and values at positions < start, per query head [B, start, H, dh]."""
    corrupted: Float[Tensor, "batch src pos d_model"]
    """Every source's output in the corrupted run at positions >= start."""
    m_clean: Float[Tensor, " batch"]
    m_corr: Float[Tensor, " batch"]

    @property
    def nbytes(self) -> int:
        return self.corrupted.nbytes + sum(k.nbytes + v.nbytes for k, v in self.prefix)

    def rows(self, idx: Sequence[int], n_pos: int) -> PatchBase:
        """Facts `idx` only, cut to `n_pos` positions in all (a sub-batch trimmed of padding)."""
        sel = torch.tensor(list(idx), device=self.corrupted.device)
        prefix = [(k[sel], v[sel]) for k, v in self.prefix]
        corrupted = self.corrupted[sel][:, :, : n_pos - self.start]
        return PatchBase(self.start, self.layers, prefix, corrupted, self.m_clean[sel], self.m_corr[sel])

    def repeat(self, n: int) -> PatchBase:
        """The base of `FactBatch.repeat(n)`."""
        prefix = [(k.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)) for k, v in self.prefix]
        corrupted = self.corrupted.repeat(n, 1, 1, 1)
        return PatchBase(self.start, self.layers, prefix, corrupted, self.m_clean.repeat(n), self.m_corr.repeat(n))


def patch_base(
    model: HookedTransformer, batch: FactBatch, metric: str | Metric = "answer-logprob", start: int | None = None
) -> PatchBase:
    """One run of the shared prefix (the same in both runs), then the clean and the corrupted run of the
    positions after it: about 1.4 full-length forwards on chat-templated probes instead of three (two runs and
    a prefix). `start`: share fewer positions (0: none)."""
    check_supported(model)
    layers = layer_weights(model)
    s = shared_prefix(batch) if start is None else min(start, shared_prefix(batch))
    clean_in, corr_in = embed_inputs(model, batch)
    prefix = clean_prefix(model, clean_in[:, :s], layers) if s else []
    past, after = prefix or None, batch.suffix(s)
    with torch.no_grad():
        m_clean = run_capture(model, clean_in[:, s:], after, metric, layers, past=past)[0]
        m_corr, st = run_capture(model, corr_in[:, s:], after, metric, layers, past=past)
        corrupted = source_outputs(model, corr_in[:, s:], st, layers).contiguous()
    return PatchBase(s, layers, prefix, corrupted, m_clean.float(), m_corr.float())


def run_patched(
    model: HookedTransformer,
    batch: FactBatch,
    keep: Bool[Tensor, "batch edge"],
    metric: str | Metric = "answer-logprob",
    base: PatchBase | None = None,
) -> Float[Tensor, " batch"]:
    """Metric with every edge outside `keep` patched to its corrupted value (exact, no approximation).

    A destination reads `resid - sum_{src not kept} (a_src(this run) - a_src(corrupted run))`: kept edges
    carry this run's activations, the others the corrupted run's. All edges kept = the clean run; none
    kept = the corrupted run. `base` (`patch_base`, computed here when absent) is what circuits of the
    same batch share: the run covers only the positions after the batch's shared prefix.
    """
    check_supported(model)
    cfg = model.cfg
    graph = Graph.from_model(model)
    if keep.shape != (batch.clean.shape[0], graph.n_edges):
        raise CircuitdynError(f"circuit mask shape {tuple(keep.shape)} != ({batch.clean.shape[0]}, {graph.n_edges})")
    if base is None:
        base = patch_base(model, batch, metric)
    start, corrupted_sources, layers = base.start, base.corrupted, base.layers
    clean_in = embed_inputs(model, batch)[0][:, start:]
    with torch.no_grad():
        B, P, D = clean_in.shape
        H = cfg.n_heads
        drop = torch.zeros(B, *graph.valid.shape, device=clean_in.device, dtype=clean_in.dtype)
        drop[:, graph.valid.to(clean_in.device)] = (~keep.to(clean_in.device)).to(clean_in.dtype)
        per_layer = H + int(graph.has_mlp)
        diffs = torch.empty_like(corrupted_sources)  # per source: this run's output - the corrupted run's
        diffs[:, 0] = clean_in - corrupted_sources[:, 0]
        diff_sum = diffs[:, 0].clone()  # over the sources written so far: x - diff_sum = the corrupted residual

        def read(x: Tensor, n_src: int, cols: slice) -> Tensor:
            """What each destination in `cols` (reading all `n_src` sources written so far) reads:
            x - sum_s drop[s] * diff[s], as [B, n_dest, P, D]."""
            d = drop[:, :n_src, cols]
            n_drop = int(d.sum())
            n_keep = d.numel() - n_drop
            if min(n_drop, n_keep) * SPARSE_PATCH_FACTOR >= d.numel():  # both sides dense: one fused contraction
                flat = diffs[:, :n_src].reshape(B, n_src, P * D)
                return torch.baddbmm(x.reshape(B, 1, P * D), d.transpose(1, 2), flat, alpha=-1.0).view(B, -1, P, D)
            # Sum over the sparser side only: a small circuit keeps few edges, so
            # x - sum_s diff[s] + sum_{kept s} diff[s] touches just the kept (fact, source, destination) triples.
            if n_drop <= n_keep:
                base, triples, sign = x, d, -1.0
            else:
                base, triples, sign = x - diff_sum, 1 - d, 1.0
            N = d.shape[-1]
            out = base.unsqueeze(1).repeat(1, N, 1, 1)  # new memory: index_add_ must not write into x
            b, src, dst = triples.nonzero(as_tuple=True)
            flat = out.view(B * N, P, D)
            for i in range(0, len(b), 1024):  # bounded memory for the gathered source outputs
                j = slice(i, i + 1024)
                flat.index_add_(0, b[j] * N + dst[j], diffs[b[j], src[j]], alpha=sign)
            return out

        x = clean_in
        col = 0
        for i, (block, layer) in enumerate(zip(model.blocks, layers)):
            n_src = 1 + i * per_layer
            ins = read(x, n_src, slice(col, col + 3 * H)).view(B, H, 3, P, D)
            col += 3 * H
            n, _, _ = ln1(layer, ins)
            qkv = (
                einops.einsum(
                    n, layer.W3, "batch head port pos d_model, head port dh d_model -> batch pos head port dh"
                )
                + layer.b3
            )
            past = base.prefix[i] if start else None
            z = attend(model, block, qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], past=past)
            heads = einops.einsum(z, layer.W_O, "batch pos head dh, head dh d_model -> batch head pos d_model")
            x = x + heads.sum(1) + layer.b_O
            s0 = 1 + i * per_layer
            diffs[:, s0 : s0 + H] = heads - corrupted_sources[:, s0 : s0 + H]
            diff_sum = diff_sum + diffs[:, s0 : s0 + H].sum(1)
            if graph.has_mlp:
                mlp_in = read(x, s0 + H, slice(col, col + 1))[:, 0]
                col += 1
                out = mlp(block, layer, mlp_in)
                x = x + out
                diffs[:, s0 + H] = out - corrupted_sources[:, s0 + H]
                diff_sum = diff_sum + diffs[:, s0 + H]
        final = read(x, len(graph.sources), slice(col, col + 1))[:, 0]
        return metric_at_answers(model, final, batch.suffix(start), metric)


def clean_and_corrupted_metric(
    model: Any, batch: FactBatch, metric: str | Metric = "answer-logprob"
) -> tuple[Tensor, Tensor]:
    """m(clean) and m(corrupted) per fact, from two full-length runs of the functional forward (the reference
    `patch_base`'s prefix-sharing runs are checked against)."""
    clean_in, corr_in = embed_inputs(model, batch)
    with torch.no_grad():
        return run_capture(model, clean_in, batch, metric)[0], run_capture(model, corr_in, batch, metric)[0]


def exact_edge_effects(
    model: Any,
    batch: FactBatch,
    edges: Sequence[int] | None = None,
    metric: str | Metric = "answer-logprob",
    chunk: int = 64,
) -> Float[Tensor, "batch edge"]:
    """True effect of patching each single edge: m(clean with e corrupted) - m(clean), [fact, len(edges)]."""
    graph = Graph.from_model(model)
    idx = list(range(graph.n_edges)) if edges is None else list(edges)
    return _exact_effects(model, batch, [[i] for i in idx], metric, chunk)


def exact_node_effects(
    model: Any, batch: FactBatch, metric: str | Metric = "answer-logprob", chunk: int = 64
) -> Float[Tensor, "batch source"]:
    """True effect of patching each source node (all its outgoing edges), in `Graph.sources` order."""
    graph = Graph.from_model(model)
    src, _ = graph.edge_src_dst
    groups = [(src == s).nonzero().flatten().tolist() for s in range(len(graph.sources))]
    return _exact_effects(model, batch, groups, metric, chunk)


def _exact_effects(model: Any, batch: FactBatch, groups: list[list[int]], metric: str | Metric, chunk: int) -> Tensor:
    graph = Graph.from_model(model)
    B = batch.clean.shape[0]
    base = patch_base(model, batch, metric)
    m_clean = base.m_clean
    out = torch.zeros(B, len(groups), device=m_clean.device)
    per = max(1, chunk // B)
    for start in range(0, len(groups), per):
        part = groups[start : start + per]
        keep = torch.ones(len(part), B, graph.n_edges, dtype=torch.bool, device=m_clean.device)
        for j, edges in enumerate(part):
            keep[j, :, edges] = False
        rep = batch.repeat(len(part))
        vals = run_patched(model, rep, keep.reshape(-1, graph.n_edges), metric, base.repeat(len(part)))
        out[:, start : start + len(part)] = (vals.reshape(len(part), B) - m_clean).T
    return out

"""Per-fact circuits on disk and in memory: `CircuitSet` storage plus the edge-selection rules.

A `CircuitSet` holds one attribution score per (fact, edge) of a `Graph`, the ordered edge names and
the provenance of the scores. Score sign convention (see `circuitdyn.attribution`): score(e) estimates
m(clean run with edge e patched to its corrupted value) - m(clean run); important edges for recalling a
fact are usually strongly negative, so selection ranks edges by |score|.

File format (`.safetensors`, never pickle): tensor `scores` [fact, edge] (float32, or float16 on request:
2 bytes/edge) and the safetensors header metadata `{"format": "circuitdyn-circuits/1", "meta": JSON,
"edges": JSON list, "fact_ids": JSON list}`. The sparse variant (`save(path, top_k=k)`) stores instead
`topk_index` int32 [fact, k], `topk_score` [fact, k] and per-node totals `node_in`/`node_out`
[fact, node] computed from the dense scores; on load the dense matrix is rebuilt with zeros outside the
top-k. Size on disk: dense = F x E x (4 or 2) bytes + the edge-name header (about 22 bytes/edge);
sparse = F x (k x (4 + 2 or 4) + N x 2 x (2 or 4)) bytes + header. For SmolLM2-135M (E = 123,211 edges,
N = 302 nodes) that is 493 KB/fact dense float32, 246 KB/fact dense float16 and 7.2 KB/fact sparse
float16 with k = 1000 (plus a 2.4 MB edge-name header per file); a 1B model (16 layers x 32 heads,
E = 386,713) with 1,000 facts x 10 epochs is 15.5 GB dense float32 vs. 81 MB sparse (k = 1000, float16).
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from circuitdyn.errors import CircuitdynError
from circuitdyn.graph import Graph

FORMAT = "circuitdyn-circuits/1"
SETTINGS = ("architecture", "method", "ig_steps", "metric", "seed", "probe_set_hash", "noise_scale")
"""Metadata fields that must agree before two circuit files are compared."""


class CircuitSet:
    """Scores [fact, edge] for one checkpoint and method, with the edge names and provenance metadata.

    `meta` keys written by the engine: model, architecture, checkpoint_hash, step, epoch, method,
    ig_steps, metric, corruption (one kind per fact), seed, noise_scale, probe_set_hash.
    """

    def __init__(
        self,
        scores: Float[Tensor, "fact edge"],
        edges: list[str],
        fact_ids: list[str],
        meta: dict[str, Any] | None = None,
        node_totals: dict[str, Tensor] | None = None,
    ) -> None:
        if scores.ndim != 2 or scores.shape != (len(fact_ids), len(edges)):
            raise CircuitdynError(
                f"scores shape {tuple(scores.shape)} does not match {len(fact_ids)} fact ids x {len(edges)} edges"
            )
        if len(set(fact_ids)) != len(fact_ids):
            dup = sorted({f for f in fact_ids if fact_ids.count(f) > 1})[:3]
            raise CircuitdynError(f"fact ids must be unique, repeated: {dup}")
        self.scores = scores
        self.edges = list(edges)
        self.fact_ids = list(fact_ids)
        self.meta = dict(meta or {})
        self._node_totals = node_totals

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={self.meta[k]!r}" for k in ("method", "metric", "epoch") if k in self.meta)
        return f"CircuitSet({len(self.fact_ids)} facts x {len(self.edges)} edges{', ' if keys else ''}{keys})"

    def __len__(self) -> int:
        return len(self.fact_ids)

    @cached_property
    def graph(self) -> Graph:
        """The graph the edge names describe (rebuilt without the model)."""
        return Graph.from_edge_names(self.edges)

    @property
    def sparse(self) -> bool:
        """True when loaded from a sparse file (scores outside each fact's top-k are zero)."""
        return "sparse_top_k" in self.meta

    # --- access ------------------------------------------------------------------------------------
    def index(self, fact_id: str) -> int:
        try:
            return self.fact_ids.index(fact_id)
        except ValueError:
            raise CircuitdynError(
                f"unknown fact id {fact_id!r}; this circuit set has {len(self.fact_ids)} facts, "
                f"e.g. {self.fact_ids[:3]}"
            ) from None

    def fact(self, fact_id: str) -> Float[Tensor, "edge"]:
        """The scores of one fact."""
        return self.scores[self.index(fact_id)]

    def mean(self, fact_ids: list[str] | None = None) -> Float[Tensor, "edge"]:
        """Aggregate circuit: mean score over all facts (or the given group of facts)."""
        rows = self.scores if fact_ids is None else self.scores[[self.index(f) for f in fact_ids]]
        return rows.float().mean(0)

    def subset(self, fact_ids: list[str]) -> CircuitSet:
        """The same circuits for a subset of facts (in the given order)."""
        rows = [self.index(f) for f in fact_ids]
        meta = dict(self.meta)
        if isinstance(meta.get("corruption"), list):
            meta["corruption"] = [self.meta["corruption"][i] for i in rows]
        totals = None if self._node_totals is None else {k: v[rows] for k, v in self._node_totals.items()}
        return CircuitSet(self.scores[rows], self.edges, list(fact_ids), meta, totals)

    def node_totals(self, direction: str = "out") -> Float[Tensor, "fact node"]:
        """Per fact, the sum of scores of the edges leaving (`out`) or entering (`in`) each node of `graph.nodes`.

        Exact even for sparse files (stored from the dense scores at save time).
        """
        if direction not in ("in", "out"):
            raise CircuitdynError(f"direction must be 'in' or 'out', got {direction!r}")
        if self._node_totals is not None:
            return self._node_totals[f"node_{direction}"].float()
        src, dst = self.graph.edge_node_ids
        ids = src if direction == "out" else dst
        out = torch.zeros(len(self.fact_ids), len(self.graph.nodes))
        return out.index_add_(1, ids, self.scores.float())

    # --- selection ---------------------------------------------------------------------------------
    def top_n(self, n: int, paths: bool = False) -> Bool[Tensor, "fact edge"]:
        """Per-fact masks of the n edges with the largest |score| (`paths=True`: on input->logits paths)."""
        if paths:
            return select_top_n_paths(self.scores, self.graph, n)
        return select_top_n(self.scores, n)

    def threshold(self, t: float) -> Bool[Tensor, "fact edge"]:
        """Per-fact masks of the edges with |score| >= t."""
        return select_threshold(self.scores, t)

    # --- compatibility -----------------------------------------------------------------------------
    def check_compatible(self, other: CircuitSet, same_facts: bool = False) -> None:
        """Raise CircuitdynError unless `other` has the same graph (edge list) and settings.

        With `same_facts`, the fact ids must also agree (same set; order may differ).
        """
        if self.edges != other.edges:
            if len(self.edges) != len(other.edges):
                what = f"{len(self.edges)} vs {len(other.edges)} edges"
            else:
                i = next(i for i, (a, b) in enumerate(zip(self.edges, other.edges)) if a != b)
                what = f"edge {i} is {self.edges[i]!r} vs {other.edges[i]!r}"
            raise CircuitdynError(f"circuit sets have different graphs ({what}); they come from different architectures")
        for key in SETTINGS:
            a, b = self.meta.get(key), other.meta.get(key)
            if a != b:
                raise CircuitdynError(f"circuit sets differ in setting {key!r}: {a!r} vs {b!r}")
        if same_facts and set(self.fact_ids) != set(other.fact_ids):
            only = sorted(set(self.fact_ids) ^ set(other.fact_ids))[:3]
            raise CircuitdynError(f"circuit sets cover different facts (e.g. {only} is in only one)")

    # --- storage -----------------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: str = "float32", top_k: int | None = None) -> Path:
        """Write atomically to `path` (.safetensors). `dtype` float32|float16; `top_k` -> sparse file."""
        path = Path(path)
        if dtype not in ("float32", "float16"):
            raise CircuitdynError(f"dtype must be float32 or float16, got {dtype!r}")
        tdtype = getattr(torch, dtype)
        meta = dict(self.meta)
        if top_k is None:
            tensors = {"scores": self.scores.detach().to(tdtype).contiguous()}
            meta.pop("sparse_top_k", None)
        else:
            k = min(int(top_k), len(self.edges))
            if k < 1:
                raise CircuitdynError(f"top_k must be >= 1, got {top_k}")
            idx = self.scores.abs().topk(k, dim=1).indices
            tensors = {
                "topk_index": idx.to(torch.int32).contiguous(),
                "topk_score": self.scores.gather(1, idx).detach().to(tdtype).contiguous(),
                "node_in": self.node_totals("in").to(tdtype).contiguous(),
                "node_out": self.node_totals("out").to(tdtype).contiguous(),
            }
            meta["sparse_top_k"] = k
        try:
            header = {
                "format": FORMAT,
                "meta": json.dumps(meta, sort_keys=True),
                "edges": json.dumps(self.edges),
                "fact_ids": json.dumps(self.fact_ids),
            }
        except TypeError as err:
            raise CircuitdynError(f"circuit metadata is not JSON-serialisable: {err}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CircuitSet:
        """Read a file written by `save` (dense or sparse)."""
        path = Path(path)
        if not path.is_file():
            raise CircuitdynError(f"circuit file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises several types for truncated/corrupt files
            raise CircuitdynError(f"circuit file {path} is not a readable safetensors file: {err}") from None
        if header.get("format") != FORMAT:
            raise CircuitdynError(f"circuit file {path}: header field 'format' is {header.get('format')!r}, expected {FORMAT!r}")
        try:
            meta = json.loads(header["meta"])
            edges = json.loads(header["edges"])
            fact_ids = json.loads(header["fact_ids"])
        except (KeyError, json.JSONDecodeError) as err:
            raise CircuitdynError(f"circuit file {path}: bad header metadata ({err})") from None
        if "scores" in tensors:
            return cls(tensors["scores"], edges, fact_ids, meta)
        if not {"topk_index", "topk_score", "node_in", "node_out"} <= tensors.keys():
            raise CircuitdynError(f"circuit file {path} holds neither 'scores' nor the sparse tensors")
        val = tensors["topk_score"]
        scores = torch.zeros(len(fact_ids), len(edges), dtype=val.dtype)
        scores.scatter_(1, tensors["topk_index"].long(), val)
        totals = {k: tensors[k] for k in ("node_in", "node_out")}
        return cls(scores, edges, fact_ids, meta, totals)


# --- selection rules (work on one fact [edge] or a batch [fact, edge]) ------------------------------
def select_top_n(scores: Float[Tensor, "*fact edge"], n: int) -> Bool[Tensor, "*fact edge"]:
    """Mask of the n edges with the largest |score| (per fact)."""
    n = max(0, min(int(n), scores.shape[-1]))
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    if n:
        mask.scatter_(-1, scores.float().abs().topk(n, dim=-1).indices, True)
    return mask


def select_threshold(scores: Float[Tensor, "*fact edge"], t: float) -> Bool[Tensor, "*fact edge"]:
    """Mask of the edges with |score| >= t."""
    return scores.float().abs() >= t


def select_top_n_paths(scores: Float[Tensor, "*fact edge"], graph: Graph, n: int) -> Bool[Tensor, "*fact edge"]:
    """Top edges by |score| restricted to input->logits paths, about n of them (per fact).

    Takes the smallest k such that the top-k edges, pruned of those not on a path from `input` to
    `logits`, keep at least n edges (pruning is monotone in k, so k is found by bisection). The result
    has >= n edges unless the whole graph has fewer; it can exceed n slightly when the k-th edge
    completes several paths at once.
    """
    if scores.ndim == 2:
        return torch.stack([select_top_n_paths(row, graph, n) for row in scores])
    order = scores.float().abs().argsort(descending=True).numpy()
    n_total = scores.shape[-1]

    def pruned(k: int) -> np.ndarray:
        mask = np.zeros(n_total, dtype=bool)
        mask[order[:k]] = True
        return graph.on_path_np(mask)

    if n <= 0:
        return torch.zeros(n_total, dtype=torch.bool)
    lo, hi = min(n, n_total), n_total
    if int(pruned(hi).sum()) >= n:
        while lo < hi:
            mid = (lo + hi) // 2
            if int(pruned(mid).sum()) >= n:
                hi = mid
            else:
                lo = mid + 1
    return torch.from_numpy(pruned(hi))

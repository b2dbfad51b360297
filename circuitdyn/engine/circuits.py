"""Per-fact circuits on disk and in memory: `CircuitSet` storage plus the edge-selection rules.

A `CircuitSet` holds one attribution score per (fact, edge) of a `Graph`, the ordered edge names and
the provenance of the scores. Score sign convention (see `circuitdyn.engine.attribution`): score(e) estimates
m(clean run with edge e patched to its corrupted value) - m(clean run); important edges for recalling a
fact are usually strongly negative, so selection ranks edges by |score|.

File format (`.safetensors`, never pickle), `circuitdyn-circuits/2`: tensor `scores` [fact, edge] and the
safetensors header metadata `{"format", "meta": JSON, "graph": JSON {n_layers, n_heads, has_mlp},
"edges_sha256", "fact_ids": JSON list}`. The edge names are not stored: a graph's edge list is canonical
(`Graph.edges`), rebuilt from its shape and checked against the hash (a non-canonical edge list is written as
JSON under "edges", as in format 1). Scores are float16 by default, stored as score / scale with a per-fact
float32 `scores_scale` (the fact's largest |score| / 2^14), so small scores keep float16's precision instead
of falling into its subnormal range, and read back as float32 (2 bytes per fact and edge; Spearman against
the float32 scores is reported by `benchmarks/scaling.py`); `dtype="float32"` stores them exactly. The
sparse variant (`save(path, top_k=k)`) stores instead `topk_index` int32 [fact, k], `topk_score` [fact, k]
and per-node totals `node_in`/`node_out` [fact, node] computed from the dense scores, and records in `meta`
the share of each fact's score mass (sum of |score|) the top-k keep (`sparse_mass_kept`); on load the dense
matrix is rebuilt with zeros outside the top-k. Files of format 1 (edge names as JSON in every file, plain
float32 or float16 scores) still load.

Size on disk: dense float16 = F x E x 2 bytes + F x 4 + a header of the fact ids and metadata; sparse =
F x (k x (4 + 2) + N x 2 x 2) bytes + header. For SmolLM2-135M (E = 123,211 edges, N = 302 nodes) that is
246 KB per fact dense float16 (format 1 added 2.4 MB of edge names to every file) and 7.2 KB per fact sparse
with k = 1000; a 1B model (16 layers x 32 heads, E = 386,713) with 1,000 facts x 10 epochs is 7.7 GB dense
float16 vs. 81 MB sparse (k = 1000).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import select_threshold, select_top_n, select_top_n_paths
from circuitdyn.engine.settings import META_KEYS, ONE_STEP_METHODS, SETTING_DEFAULTS, AttributionSettings, steps_taken
from circuitdyn.errors import CircuitdynError
from circuitdyn.io import atomic_path

FORMAT = "circuitdyn-circuits/2"
READABLE_FORMATS = ("circuitdyn-circuits/1", FORMAT)
FLOAT16_HEADROOM = 2.0**14
"""float16 scores are stored as score / (max |score| / FLOAT16_HEADROOM): the largest is 16384, far below
float16's maximum (65504), and scores down to ~1e-9 of the largest stay in its normal range."""
PER_FACT_META = ("corruption", "faithfulness", "m_clean", "m_corrupted")
"""Metadata lists with one value per fact (kept aligned by `CircuitSet.subset`)."""
SETTINGS = ("architecture", *META_KEYS.values(), "probe_set_hash")
"""What "the same settings" means: circuit sets (or files) that agree on these fields were extracted the
same way from the same facts, so they can be compared across checkpoints or reused instead of recomputed:
the model's architecture, the `settings.AttributionSettings` (as recorded: `AttributionSettings.to_meta`) and
`probe_set_hash`, the fact set's identity (`circuitdyn.probes.facts.FactSet.identity`)."""


def setting(meta: dict[str, Any], key: str) -> Any:
    """One setting of a circuit set's metadata, with `SETTING_DEFAULTS` for files that predate it."""
    return meta.get(key, SETTING_DEFAULTS.get(key))


def recorded_settings(architecture: str | None, settings: AttributionSettings, probe_set_hash: str) -> dict[str, Any]:
    """The `SETTINGS` a circuit file extracted with these settings records (known before any work is done)."""
    return {"architecture": architecture, **settings.to_meta(), "probe_set_hash": probe_set_hash}


def settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The `SETTINGS` fields of a circuit set's metadata (the one notion of "same settings")."""
    return {k: setting(meta, k) for k in SETTINGS}


def settings_mismatch(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first `SETTINGS` field on which two metadata dicts differ, described; None when they agree."""
    for key in SETTINGS:
        if setting(a, key) != setting(b, key):
            return f"{key!r}: {setting(a, key)!r} vs {setting(b, key)!r}"
    return None


def circuit_filename(epoch: int, meta: dict[str, Any]) -> str:
    """`epoch_3.eap-ig5.answer-logprob.s0.1a2b3c4d.safetensors`: the epoch and the settings (method, steps,
    IG grid unless `right`, e.g. `eap-ig3-gauss`; EAP and RelP, one step, as `eap` / `relp`; metric, seed and
    the fact set's hash), so that circuits of
    other facts or settings live side by side."""
    method, steps, grid = meta.get("method"), meta.get("ig_steps"), setting(meta, "ig_grid")
    facts = str(meta.get("probe_set_hash", "")).split(":")[-1][:8] or "nofacts"
    steps = "" if method in ONE_STEP_METHODS else f"{steps}{'' if grid == 'right' else '-' + str(grid)}"
    return f"epoch_{epoch}.{method}{steps}.{meta.get('metric')}.s{meta.get('seed')}.{facts}.safetensors"


class CircuitSet:
    """Scores [fact, edge] for one checkpoint and method, with the edge names and provenance metadata.

    `meta` keys written by the engine: model, architecture, checkpoint_hash, step, epoch, method,
    ig_steps, metric, corruption (one kind per fact), seed, noise_scale, probe_set_hash.
    """

    path: Path | None = None
    """The file the set was loaded from (`load`); None for sets built in memory."""

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

    def to_frame(self, top: int = 20) -> pd.DataFrame:
        """Each fact's `top` edges by |score|, tidy: fact_id, rank (1 = strongest), edge, source, destination,
        score (the whole set is `scores` [fact, edge] with `edges` and `fact_ids`)."""
        k = min(max(int(top), 1), len(self.edges))
        idx = self.scores.float().abs().topk(k, dim=1).indices
        rows = []
        for i, fact in enumerate(self.fact_ids):
            for r, e in enumerate(idx[i].tolist()):
                src, _, dst = self.edges[e].partition("->")
                rows.append(
                    {
                        "fact_id": fact,
                        "rank": r + 1,
                        "edge": self.edges[e],
                        "source": src,
                        "destination": dst,
                        "score": float(self.scores[i, e]),
                    }
                )
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        import html

        meta = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(self.meta[k]))}</td></tr>"
            for k in ("model", "epoch", "method", "ig_steps", "ig_grid", "metric", "seed")
            if k in self.meta
        )
        return f"<p>{html.escape(repr(self))}</p><table>{meta}</table>" + self.to_frame(top=3).to_html(index=False)

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

    def fact(self, fact_id: str) -> Float[Tensor, " edge"]:
        """The scores of one fact."""
        return self.scores[self.index(fact_id)]

    def mean(self, fact_ids: list[str] | None = None) -> Float[Tensor, " edge"]:
        """Aggregate circuit: mean score over all facts (or the given group of facts)."""
        rows = self.scores if fact_ids is None else self.scores[[self.index(f) for f in fact_ids]]
        return rows.float().mean(0)

    def subset(self, fact_ids: list[str]) -> CircuitSet:
        """The same circuits for a subset of facts (in the given order)."""
        rows = [self.index(f) for f in fact_ids]
        meta = dict(self.meta)
        for key in PER_FACT_META:
            if isinstance(meta.get(key), list) and len(meta[key]) == len(self.fact_ids):
                meta[key] = [self.meta[key][i] for i in rows]
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

    @cached_property
    def scores_digest(self) -> str:
        """SHA-256 of the scores' float32 bytes: what caches keyed by these circuits' content compare."""
        return hashlib.sha256(self.scores.detach().float().contiguous().numpy().tobytes()).hexdigest()

    @property
    def gaps(self) -> np.ndarray:
        """Per fact, m(clean) - m(corrupted) on the checkpoint the circuits come from (NaN when not recorded)."""
        clean, corr = self.meta.get("m_clean"), self.meta.get("m_corrupted")
        if not clean or not corr:
            return np.full(len(self.fact_ids), np.nan)
        return np.array([np.nan if a is None or b is None else a - b for a, b in zip(clean, corr)], dtype=float)

    # --- selection ---------------------------------------------------------------------------------
    def top_n(self, n: int, paths: bool = False) -> Bool[Tensor, "fact edge"]:
        """Per-fact masks of the n edges with the largest |score| (`paths=True`: on input->logits paths)."""
        if paths:
            return select_top_n_paths(self.scores, self.graph, n)
        return select_top_n(self.scores, n)

    def threshold(self, t: float) -> Bool[Tensor, "fact edge"]:
        """Per-fact masks of the edges with |score| >= t."""
        return select_threshold(self.scores, t)

    # --- export ------------------------------------------------------------------------------------
    def to_networkx(self, fact_id: str, mask: Any = None, *, circuit_only: bool = False) -> Any:
        """One fact's circuit as a networkx DiGraph over components (`Graph.to_networkx` with this fact's
        scores): node attributes layer, kind, head; edge attributes score (the sum over a head's q/k/v ports),
        score_q/k/v, and with `mask` (a bool tensor [edge], a Selection or a spec such as `top:200`; no
        `faith:`/`pruned:`) in_circuit and circuit_ports; graph attributes the metadata. `circuit_only`: keep
        only edges with a selected port. See `circuitdyn.engine.export`."""
        from circuitdyn.engine.export import circuit_graph

        return circuit_graph(self, fact_id, mask, circuit_only=circuit_only)

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
            raise CircuitdynError(
                f"circuit sets have different graphs ({what}); they come from different architectures"
            )
        differ = settings_mismatch(self.meta, other.meta)
        if differ:
            raise CircuitdynError(f"circuit sets differ in setting {differ}")
        if same_facts and set(self.fact_ids) != set(other.fact_ids):
            only = sorted(set(self.fact_ids) ^ set(other.fact_ids))[:3]
            raise CircuitdynError(f"circuit sets cover different facts (e.g. {only} is in only one)")

    # --- storage -----------------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: str = "float16", top_k: int | None = None) -> Path:
        """Write atomically to `path` (.safetensors). `dtype` float16 (scaled per fact, default) or float32
        (exact); `top_k` -> sparse file (recording each fact's share of score mass kept)."""
        path = Path(path)
        if dtype not in ("float32", "float16"):
            raise CircuitdynError(f"dtype must be float32 or float16, got {dtype!r}")
        tdtype = getattr(torch, dtype)
        meta = dict(self.meta)
        meta.pop("sparse_top_k", None)
        meta.pop("sparse_mass_kept", None)
        scores = self.scores.detach()
        if top_k is None:
            if dtype == "float16":
                scale = scores.float().abs().amax(1) / FLOAT16_HEADROOM
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                tensors = {
                    "scores": (scores.float() / scale[:, None]).to(tdtype).contiguous(),
                    "scores_scale": scale.contiguous(),
                }
            else:
                tensors = {"scores": scores.to(tdtype).contiguous()}
        else:
            k = min(int(top_k), len(self.edges))
            if k < 1:
                raise CircuitdynError(f"top_k must be >= 1, got {top_k}")
            idx = scores.abs().topk(k, dim=1).indices
            kept = scores.gather(1, idx)
            total = scores.float().abs().sum(1)
            mass = torch.where(total > 0, kept.float().abs().sum(1) / total.clamp_min(1e-30), torch.ones_like(total))
            tensors = {
                "topk_index": idx.to(torch.int32).contiguous(),
                "topk_score": kept.to(tdtype).contiguous(),
                "node_in": self.node_totals("in").to(tdtype).contiguous(),
                "node_out": self.node_totals("out").to(tdtype).contiguous(),
            }
            meta["sparse_top_k"] = k
            meta["sparse_mass_kept"] = [round(float(v), 6) for v in mass.tolist()]
        try:
            header = {"format": FORMAT, "meta": json.dumps(meta, sort_keys=True), "fact_ids": json.dumps(self.fact_ids)}
            header.update(_edge_header(self.edges))
        except TypeError as err:
            raise CircuitdynError(f"circuit metadata is not JSON-serialisable: {err}") from None
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CircuitSet:
        """Read a file written by `save` (dense or sparse, format 1 or 2)."""
        path = Path(path)
        if not path.is_file():
            raise CircuitdynError(f"circuit file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises several types for truncated/corrupt files
            raise CircuitdynError(f"circuit file {path} is not a readable safetensors file: {err}") from None
        if header.get("format") not in READABLE_FORMATS:
            raise CircuitdynError(
                f"circuit file {path}: header field 'format' is {header.get('format')!r}, expected "
                f"one of {', '.join(READABLE_FORMATS)}"
            )
        try:
            meta = json.loads(header["meta"])
            fact_ids = json.loads(header["fact_ids"])
            edges = _edges_from_header(header, path)
        except (KeyError, json.JSONDecodeError) as err:
            raise CircuitdynError(f"circuit file {path}: bad header metadata ({err})") from None
        if "scores" in tensors:
            scores = tensors["scores"]
            if "scores_scale" in tensors:
                scores = scores.float() * tensors["scores_scale"].float()[:, None]
            loaded = cls(scores, edges, fact_ids, meta)
            loaded.path = path
            return loaded
        if not {"topk_index", "topk_score", "node_in", "node_out"} <= tensors.keys():
            raise CircuitdynError(f"circuit file {path} holds neither 'scores' nor the sparse tensors")
        val = tensors["topk_score"].float()
        scores = torch.zeros(len(fact_ids), len(edges), dtype=val.dtype)
        scores.scatter_(1, tensors["topk_index"].long(), val)
        totals = {k: tensors[k] for k in ("node_in", "node_out")}
        loaded = cls(scores, edges, fact_ids, meta, totals)
        loaded.path = path
        return loaded


def edges_digest(edges: Sequence[str]) -> str:
    """SHA-256 of an edge list (names joined by newlines): the edge index a circuit file refers to."""
    return hashlib.sha256("\n".join(edges).encode()).hexdigest()


def _edge_header(edges: list[str]) -> dict[str, str]:
    """The header fields naming a file's edge list: the canonical graph's shape and the list's hash, or, for
    an edge list that is no canonical graph's, the names themselves."""
    try:
        graph = Graph.from_edge_names(edges)
    except CircuitdynError:
        return {"edges": json.dumps(edges)}
    shape = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "has_mlp": graph.has_mlp}
    return {"graph": json.dumps(shape, sort_keys=True), "edges_sha256": edges_digest(edges)}


def _edges_from_header(header: dict[str, str], path: Path) -> list[str]:
    if "edges" in header:
        return json.loads(header["edges"])
    shape = json.loads(header["graph"])
    edges = list(Graph.of(shape["n_layers"], shape["n_heads"], shape["has_mlp"]).edges)
    if edges_digest(edges) != header.get("edges_sha256"):
        raise CircuitdynError(
            f"circuit file {path}: header field 'edges_sha256' does not match the edge list of "
            f"its graph {shape} (written by a version with another edge order)"
        )
    return edges


# --- circuit files on disk ------------------------------------------------------------------------
def read_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of a circuit file, read from its header only (None if it is not a circuit file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") not in READABLE_FORMATS:
            return None
        meta = json.loads(header.get("meta", "{}"))
        meta["n_facts"] = len(json.loads(header.get("fact_ids", "[]")))
        return meta
    except Exception:  # safetensors raises several types for foreign or damaged files
        return None


def circuit_files(folder: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every circuit file under `folder` (recursively) with its metadata, read from the header only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CircuitdynError(f"circuit folder {folder} does not exist")
    found = ((path, read_meta(path)) for path in sorted(folder.rglob("*.safetensors")))
    return [(path, meta) for path, meta in found if meta is not None]


def find_circuits(
    folder: str | Path,
    epochs: Sequence[int] | None = None,
    checkpoint_hashes: dict[int, str] | None = None,
    where: dict[str, Any] | None = None,
) -> dict[int, Path]:
    """Epoch -> circuit file under `folder`, by each file's metadata (never by its name).

    Files are grouped by their `settings`; the group used must cover every epoch of
    `epochs` (default: the epochs of the largest group). `where` (metadata field -> required value, e.g.
    `method`, `probe_set_hash`; see `settings.settings_filter`) filters the groups; an `ig_steps` asked of an
    EAP or RelP file is the one step it takes. With `checkpoint_hashes`, a file must match its epoch's weights
    (stale circuits are skipped). Errors name the epochs without circuits, or the competing settings when
    several groups fit.
    """
    where = dict(where or {})
    method, ig_steps = where.pop("method", None), where.pop("ig_steps", None)
    groups: dict[str, dict[int, list[tuple[float, Path]]]] = {}
    for path, meta in circuit_files(folder):
        e = meta.get("epoch")
        # An EAP file records 1 step whatever was asked, so `ig_steps` only tells EAP-IG files apart.
        steps_ok = not ig_steps or meta.get("ig_steps") == steps_taken(meta.get("method"), ig_steps)
        if e is None or (method and meta.get("method") != method) or not steps_ok:
            continue
        if where and any(setting(meta, k) != v for k, v in where.items()):
            continue
        if (
            checkpoint_hashes
            and int(e) in checkpoint_hashes
            and meta.get("checkpoint_hash") not in (None, checkpoint_hashes[int(e)])
        ):
            continue
        key = json.dumps(settings(meta), sort_keys=True)
        groups.setdefault(key, {}).setdefault(int(e), []).append((path.stat().st_mtime, path))
    what = "".join(f" with {k} {v}" for k, v in (("method", method), ("ig_steps", ig_steps)) if v)
    if not groups:
        raise CircuitdynError(f"{folder}: no circuit files{what} found; run `circuitdyn extract` first")
    if epochs is None:
        largest = max(len(g) for g in groups.values())
        fitting = [k for k, g in groups.items() if len(g) == largest]
        wanted = sorted(groups[fitting[0]])
    else:
        wanted = list(epochs)
        fitting = [k for k, g in groups.items() if all(e in g for e in wanted)]
    if not fitting:
        have = sorted({e for g in groups.values() for e in g})
        best = max(groups.values(), key=lambda g: sum(e in g for e in wanted))
        missing = [e for e in wanted if e not in best]
        raise CircuitdynError(
            f"{folder}: no circuits for epoch(s) {missing}{what} (have epochs {have}); "
            "run `circuitdyn extract` for them"
        )
    if len(fitting) > 1:
        shown = ("method", "ig_steps", "metric")
        options = "; ".join(", ".join(f"{k}={v}" for k, v in json.loads(key).items() if k in shown) for key in fitting)
        raise CircuitdynError(
            f"{folder}: several circuit files for epoch {wanted[0]} with different settings "
            f"({options}); choose with --method / --steps"
        )
    group = groups[fitting[0]]
    return {e: max(group[e])[1] for e in wanted}

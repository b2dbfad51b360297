"""How two circuits differ: per fact and aggregated, counted above a noise floor.

`diff_circuits(a, b, selection)` compares two `CircuitSet`s of the same graph and settings (e.g. two
epochs of a run) at a selection rule and returns a `CircuitDiff`, whose pandas tables answer:

- which edges were added / removed / kept, and which kept edges moved or flipped sign;
- how similar the circuits are: edge and node Jaccard of the selected circuits, weighted Jaccard on
  |score| over all edges, Spearman correlation of all edge scores and rank-biased overlap (RBO, a
  top-weighted rank similarity of the |score| orderings);
- where importance moved: per layer and per component type (input / attention / MLP / logits,
  shallow vs deep half of the layers), as shares of the total |score|;
- the strongest input->logits paths in each circuit and which of them survived.

Noise floor: attribution scores move a little with no training at all (other IG step counts, other
corruptions). `noise_floor(repeats)` estimates per fact how much, from circuit sets extracted on the
same checkpoint with different settings; an edge counts as added/removed/changed only when its score
moved by more than the floor. Edges that crossed the selection cut by less are status `noise`.

Selection rules (`Selection`): `top:N` (N edges with largest |score|), `paths:N` (top edges on
input->logits paths), `abs:T` (|score| >= T) and `faith:F` (the smallest top-n circuit reaching
faithfulness F; needs a faithfulness callable bound to the model) - the last compares circuits of
different epochs at equal faithfulness rather than at equal size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.circuits import CircuitSet
from circuitdyn.errors import CircuitdynError
from circuitdyn.graph import Graph
from circuitdyn.selection import Faithfulness, Selection

MEAN = "(mean circuit)"
"""Fact id of the aggregate row: the diff of the facts' mean circuits."""

RBO_P = 0.99
"""RBO persistence: the top 1/(1-p) = 100 edges carry about 63 % of the weight."""

STATUSES = ("added", "removed", "changed", "kept", "noise")
"""Edge status in a diff (edges in either circuit): added / removed = entered / left the circuit and its
score moved by more than the noise floor; changed = in both, moved more than the floor; kept = in both,
within the floor; noise = crossed the selection cut while moving less than the floor."""


def restrict(circuits: CircuitSet, fact_ids: list[str], graph: Graph | None = None) -> CircuitSet:
    """`circuits` limited to `fact_ids` (itself when nothing changes), sharing an already rebuilt graph.

    Rebuilding a graph from ~10^5 edge names takes a noticeable moment, and compatible sets (same edge
    list) have the same graph, so it is passed on instead of rebuilt.
    """
    out = circuits if list(fact_ids) == circuits.fact_ids else circuits.subset(list(fact_ids))
    if graph is not None and "graph" not in out.__dict__:
        out.__dict__["graph"] = graph  # fills the cached_property
    return out


# --------------------------------------------------------------------------- noise floor


def noise_floor(repeats: Sequence[CircuitSet], quantile: float = 0.99) -> pd.Series:
    """Per fact, how far scores move without training: the `quantile` of |score_i - score_j| over all
    edges and all pairs of `repeats` (circuit sets of ONE checkpoint with different IG steps, seeds or
    corruptions). Returned as a Series indexed by fact id (facts common to all repeats)."""
    if len(repeats) < 2:
        raise CircuitdynError(f"a noise floor needs at least 2 repeated circuit sets, got {len(repeats)}")
    hashes = {r.meta.get("checkpoint_hash") for r in repeats}
    if len(hashes) > 1:
        raise CircuitdynError(f"noise-floor repeats must come from one checkpoint, got hashes {sorted(map(str, hashes))}")
    for r in repeats[1:]:
        if r.edges != repeats[0].edges:
            raise CircuitdynError("noise-floor repeats have different graphs (edge lists)")
    facts = [f for f in repeats[0].fact_ids if all(f in r.fact_ids for r in repeats[1:])]
    if not facts:
        raise CircuitdynError("noise-floor repeats share no fact ids")
    stack = torch.stack([r.subset(facts).scores.float() for r in repeats])
    deltas = torch.cat([(stack[i] - stack[j]).abs() for i in range(len(repeats)) for j in range(i)], dim=1)
    return pd.Series(torch.quantile(deltas, quantile, dim=1).numpy(), index=facts, name="noise_floor")


# --------------------------------------------------------------------------- similarity measures


def _rows(x: Tensor) -> Tensor:
    return x.float().reshape(-1, x.shape[-1])


def rank_rows(x: Float[Tensor, "*fact edge"]) -> np.ndarray:
    """Per row, average ranks (ties share their mean rank), centred and scaled to unit norm.

    Spearman's rho of two rows is the dot product of their `rank_rows` (NaN for a constant row).
    """
    rows = _rows(x).numpy().astype(np.float64)
    out = np.empty_like(rows)
    n = rows.shape[1]
    for i, row in enumerate(rows):
        order = np.argsort(row, kind="stable")
        sorted_row = row[order]
        starts = np.concatenate(([True], sorted_row[1:] != sorted_row[:-1]))
        dense = np.cumsum(starts) - 1
        bounds = np.concatenate((np.nonzero(starts)[0], [n]))
        avg = (bounds[:-1] + bounds[1:] - 1) / 2.0
        out[i, order] = avg[dense]
    out -= out.mean(1, keepdims=True)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, out / np.where(norm > 0, norm, 1), np.nan)


def spearman(a: Float[Tensor, "*fact edge"], b: Float[Tensor, "*fact edge"]) -> Float[Tensor, "*fact"]:
    """Spearman rank correlation of two score vectors (per row; ties get average ranks). NaN if constant."""
    rho = (rank_rows(a) * rank_rows(b)).sum(1)
    return torch.from_numpy(rho).float().reshape(a.shape[:-1])


def rbo_depth(n_edges: int, p: float = RBO_P) -> int:
    """Evaluation depth of RBO: where the weight left beyond it, p^d, drops below 1e-6."""
    return min(n_edges, max(1, int(math.ceil(math.log(1e-6) / math.log(p)))))


def top_positions(x: Float[Tensor, "*fact edge"], depth: int) -> Tensor:
    """Per row, the indices of the `depth` largest |x| in descending order (ties broken by index)."""
    rows = _rows(x).abs()
    return rows.topk(depth, dim=1, sorted=True).indices


def rbo_from_top(top_a: Tensor, top_b: Tensor, n_edges: int, p: float = RBO_P) -> Float[Tensor, "fact"]:
    """Extrapolated RBO from two `top_positions` results of the same depth."""
    n_rows, depth = top_a.shape
    ar = torch.arange(depth)
    pos_a = torch.full((n_rows, n_edges), depth, dtype=torch.long).scatter_(1, top_a, ar.expand(n_rows, -1))
    pos_b = torch.full((n_rows, n_edges), depth, dtype=torch.long).scatter_(1, top_b, ar.expand(n_rows, -1))
    both = torch.maximum(pos_a, pos_b).clamp_max(depth)  # depth at which an edge is in both prefixes
    counts = torch.zeros(n_rows, depth + 1).scatter_add_(1, both, torch.ones(n_rows, n_edges))[:, :depth]
    overlap = counts.cumsum(1).double()
    ks = torch.arange(1, depth + 1, dtype=torch.float64)
    agree = overlap / ks
    weights = p**ks
    rbo = (1 - p) / p * (agree * weights).sum(1) + agree[:, -1] * p**depth
    return rbo.float()


def rank_biased_overlap(
    a: Float[Tensor, "*fact edge"], b: Float[Tensor, "*fact edge"], p: float = RBO_P, depth: int | None = None
) -> Float[Tensor, "*fact"]:
    """Extrapolated rank-biased overlap (Webber et al. 2010) of the |score| orderings, per row.

    1 = same top ranking, 0 = disjoint tops; agreement at depth d weighs p^(d-1), so the top edges
    dominate. Evaluated to `depth` (default `rbo_depth`: where the remaining weight drops below 1e-6).
    """
    n = a.shape[-1]
    depth = min(n, depth or rbo_depth(n, p))
    out = rbo_from_top(top_positions(a, depth), top_positions(b, depth), n, p)
    return out.reshape(a.shape[:-1])


def weighted_jaccard(a: Float[Tensor, "*fact edge"], b: Float[Tensor, "*fact edge"]) -> Float[Tensor, "*fact"]:
    """sum min(|a|, |b|) / sum max(|a|, |b|) over all edges (1 = same magnitudes everywhere)."""
    xa, xb = a.float().abs(), b.float().abs()
    num, den = torch.minimum(xa, xb).sum(-1), torch.maximum(xa, xb).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(den, float("nan")))


def jaccard(ma: Bool[Tensor, "*fact n"], mb: Bool[Tensor, "*fact n"]) -> Float[Tensor, "*fact"]:
    """|A & B| / |A | B| of two masks (1.0 when both are empty)."""
    inter, union = (ma & mb).sum(-1).float(), (ma | mb).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def node_mask(graph: Graph, edges: Bool[Tensor, "*fact edge"]) -> Bool[Tensor, "*fact node"]:
    """Nodes (components of `graph.nodes`) touched by a selected edge."""
    src, dst = graph.edge_node_ids
    rows = _rows(edges)
    out = torch.zeros(rows.shape[0], len(graph.nodes))
    out.index_add_(1, src, rows).index_add_(1, dst, rows)
    return (out > 0).reshape(*edges.shape[:-1], len(graph.nodes))


def node_importance(graph: Graph, scores: Float[Tensor, "*fact edge"]) -> Float[Tensor, "*fact node"]:
    """Importance of each node: half the |score| of its outgoing plus half of its incoming edges."""
    src, dst = graph.edge_node_ids
    rows = _rows(scores).abs()
    out = torch.zeros(rows.shape[0], len(graph.nodes))
    out.index_add_(1, src, rows / 2).index_add_(1, dst, rows / 2)
    return out.reshape(*scores.shape[:-1], len(graph.nodes))


def node_kind(node: str) -> str:
    """input / attn / mlp / logits."""
    return node if node in ("input", "logits") else "attn" if node.startswith("a") else "mlp"


def layer_shares(graph: Graph, scores: Float[Tensor, "*fact edge"]) -> Float[Tensor, "*fact layer"]:
    """Share of the total node importance held by each block 0..n_layers-1 (its heads and MLP)."""
    imp = node_importance(graph, scores)
    layer_ids = torch.tensor([graph.layer_of(n) for n in graph.nodes])
    inside = (layer_ids >= 0) & (layer_ids < graph.n_layers)
    out = torch.zeros(*imp.shape[:-1], graph.n_layers)
    out.index_add_(-1, layer_ids[inside], imp[..., inside])
    total = imp.sum(-1, keepdim=True)
    return out / total.clamp_min(1e-30)


def component_shares(graph: Graph, scores: Float[Tensor, "*fact edge"]) -> dict[str, Float[Tensor, "*fact"]]:
    """Shares of the total node importance: input, attn, mlp, logits, shallow (first half of the layers), deep."""
    imp = node_importance(graph, scores)
    total = imp.sum(-1).clamp_min(1e-30)
    kinds = [node_kind(n) for n in graph.nodes]
    layers = [graph.layer_of(n) for n in graph.nodes]
    half = graph.n_layers / 2
    groups = {k: [i for i, x in enumerate(kinds) if x == k] for k in ("input", "attn", "mlp", "logits")}
    groups["shallow"] = [i for i, L in enumerate(layers) if 0 <= L < half]
    groups["deep"] = [i for i, L in enumerate(layers) if half <= L < graph.n_layers]
    return {k: imp[..., idx].sum(-1) / total for k, idx in groups.items()}


# --------------------------------------------------------------------------- paths


def circuit_graph(graph: Graph, scores: Float[Tensor, "edge"], mask: Bool[Tensor, "edge"]) -> nx.DiGraph:
    """The selected circuit as a component-level DiGraph; `weight` = |summed port score|."""
    g = graph.to_networkx(scores.float(), mask)
    g.remove_nodes_from([n for n in list(g.nodes) if g.degree(n) == 0])
    for _, _, d in g.edges(data=True):
        d["weight"] = abs(d["score"])
    return g


def strongest_paths(g: nx.DiGraph, k: int = 5) -> list[tuple[tuple[str, ...], float]]:
    """The k input->logits paths with the largest product of normalised edge weights (w / max w).

    Found as k shortest simple paths under cost -log(w / max w); returns (path, strength in (0, 1]).
    """
    if "input" not in g or "logits" not in g or not nx.has_path(g, "input", "logits"):
        return []
    wmax = max(d["weight"] for _, _, d in g.edges(data=True)) or 1.0
    for _, _, d in g.edges(data=True):
        d["cost"] = -math.log(max(d["weight"], 1e-30) / wmax)
    out = []
    for path in nx.shortest_simple_paths(g, "input", "logits", weight="cost"):
        out.append((tuple(path), path_strength(g, path)))
        if len(out) >= k:
            break
    return out


def path_strength(g: nx.DiGraph, path: Sequence[str]) -> float:
    """Product of w / max w along `path` in `g` (NaN when some edge of the path is not in `g`)."""
    if g.number_of_edges() == 0:
        return float("nan")
    wmax = max(d["weight"] for _, _, d in g.edges(data=True)) or 1.0
    s = 1.0
    for u, v in zip(path, path[1:]):
        if not g.has_edge(u, v):
            return float("nan")
        s *= g.edges[u, v]["weight"] / wmax
    return s


# --------------------------------------------------------------------------- the diff


@dataclass
class CircuitDiff:
    """The comparison of circuit sets `a` and `b` (same graph and settings, same facts, in `a`'s order).

    Tensors are [fact, edge] with one extra last row for `MEAN`, the facts' mean circuits (selected
    top-n with n = the mean per-fact circuit size, at the mean noise floor). Tables:
    `facts` (one row per fact + `MEAN`), `summary` (mean over facts), `edges(fact)`, `layers`,
    `components`, `paths(fact)`.
    """

    a: CircuitSet
    b: CircuitSet
    selection: Selection
    mask_a: Bool[Tensor, "row edge"]
    mask_b: Bool[Tensor, "row edge"]
    floor: Float[Tensor, "row"]
    faith_a: Float[Tensor, "fact"] | None = None
    faith_b: Float[Tensor, "fact"] | None = None
    label_a: str = "A"
    label_b: str = "B"
    k_paths: int = 5
    labels: dict[str, str] = field(default_factory=dict)
    """fact id -> readable label (entity: question), for viewers."""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def graph(self) -> Graph:
        return self.a.graph

    @property
    def rows(self) -> list[str]:
        """Fact ids of the rows: every fact, then `MEAN`."""
        return [*self.a.fact_ids, MEAN]

    @cached_property
    def scores_a(self) -> Float[Tensor, "row edge"]:
        return torch.cat([self.a.scores.float(), self.a.scores.float().mean(0, keepdim=True)])

    @cached_property
    def scores_b(self) -> Float[Tensor, "row edge"]:
        return torch.cat([self.b.scores.float(), self.b.scores.float().mean(0, keepdim=True)])

    def row(self, fact_id: str) -> int:
        if fact_id == MEAN:
            return len(self.a.fact_ids)
        return self.a.index(fact_id)

    @cached_property
    def status_codes(self) -> torch.Tensor:
        """[row, edge] int8: index into STATUSES, or -1 for edges in neither circuit."""
        ma, mb = self.mask_a, self.mask_b
        above = (self.scores_b - self.scores_a).abs() > self.floor[:, None]
        code = torch.full(ma.shape, -1, dtype=torch.int8)
        code[(ma | mb) & ~(ma & mb)] = STATUSES.index("noise")
        code[ma & mb] = STATUSES.index("kept")
        code[ma & mb & above] = STATUSES.index("changed")
        code[mb & ~ma & above] = STATUSES.index("added")
        code[ma & ~mb & above] = STATUSES.index("removed")
        return code

    @cached_property
    def sign_flips(self) -> Bool[Tensor, "row edge"]:
        """Edges of either circuit whose score changed sign, both sides above the noise floor."""
        sa, sb, f = self.scores_a, self.scores_b, self.floor[:, None]
        return (self.mask_a | self.mask_b) & (sa.abs() > f) & (sb.abs() > f) & (torch.sign(sa) != torch.sign(sb))

    @cached_property
    def facts(self) -> pd.DataFrame:
        """One row per fact (+ `MEAN`), indexed by fact id.

        n_a, n_b: circuit sizes; added, removed, changed, kept, noise: edge counts by `STATUSES`;
        sign_flips; edge_jaccard, node_jaccard: of the selected circuits; weighted_jaccard, spearman,
        rbo: of all edge scores; changed_frac: (added + removed) / |A or B|; attn_shift, mlp_shift,
        deep_shift: share of importance in B minus in A; noise_floor; paths_kept, paths_lost: of A's
        strongest paths (`paths`); faith_a, faith_b: faithfulness reached, with the `faith:` rule.
        """
        code = self.status_codes
        count = {s: (code == i).sum(1).numpy() for i, s in enumerate(STATUSES)}
        g = self.graph
        sh_a, sh_b = component_shares(g, self.scores_a), component_shares(g, self.scores_b)
        df = pd.DataFrame({
            "fact_id": self.rows,
            "n_a": self.mask_a.sum(1).numpy(),
            "n_b": self.mask_b.sum(1).numpy(),
            **count,
            "sign_flips": self.sign_flips.sum(1).numpy(),
            "edge_jaccard": jaccard(self.mask_a, self.mask_b).numpy(),
            "node_jaccard": jaccard(node_mask(g, self.mask_a), node_mask(g, self.mask_b)).numpy(),
            "weighted_jaccard": weighted_jaccard(self.scores_a, self.scores_b).numpy(),
            "spearman": spearman(self.scores_a, self.scores_b).numpy(),
            "rbo": rank_biased_overlap(self.scores_a, self.scores_b).numpy(),
            "changed_frac": self._changed_frac().numpy(),
            "attn_shift": (sh_b["attn"] - sh_a["attn"]).numpy(),
            "mlp_shift": (sh_b["mlp"] - sh_a["mlp"]).numpy(),
            "deep_shift": (sh_b["deep"] - sh_a["deep"]).numpy(),
            "noise_floor": self.floor.numpy(),
        })
        paths = [self._path_table(r) for r in range(len(self.rows))]
        df["paths_kept"] = [int((p["status"] == "kept").sum()) if len(p) else 0 for p in paths]
        df["paths_lost"] = [int((p["status"] == "lost").sum()) if len(p) else 0 for p in paths]
        if self.faith_a is not None and self.faith_b is not None:
            df["faith_a"] = [*self.faith_a.tolist(), float("nan")]
            df["faith_b"] = [*self.faith_b.tolist(), float("nan")]
        return df.set_index("fact_id")

    def _changed_frac(self) -> Float[Tensor, "row"]:
        """Share of the union of both circuits that was added or removed above the noise floor."""
        code = self.status_codes
        moved = ((code == STATUSES.index("added")) | (code == STATUSES.index("removed"))).sum(1).float()
        union = (code >= 0).sum(1).float()
        return torch.where(union > 0, moved / union.clamp_min(1), torch.zeros_like(union))

    @cached_property
    def summary(self) -> pd.Series:
        """Mean over facts of every column of `facts` (the `MEAN` row excluded), plus `n_facts`."""
        per_fact = self.facts.drop(index=MEAN)
        out = per_fact.mean(numeric_only=True).astype(float)
        out["n_facts"] = float(len(per_fact))
        return out

    def edges(self, fact_id: str = MEAN, include: str = "union") -> pd.DataFrame:
        """Per-edge table for one fact: scores in A and B, delta, status, sign flip.

        `include`: `union` (edges in either circuit), `all`.
        """
        r = self.row(fact_id)
        code = self.status_codes[r]
        keep = torch.ones_like(code, dtype=torch.bool) if include == "all" else code >= 0
        idx = keep.nonzero().flatten()
        names = [self.a.edges[i] for i in idx.tolist()]
        sa, sb = self.scores_a[r, idx], self.scores_b[r, idx]
        df = pd.DataFrame({
            "edge": names,
            "src": [n.split("->")[0] for n in names],
            "dst": [n.split("->")[1] for n in names],
            "score_a": sa.numpy(),
            "score_b": sb.numpy(),
            "delta": (sb - sa).numpy(),
            "status": [STATUSES[c] if c >= 0 else "none" for c in code[idx].tolist()],
            "sign_flip": self.sign_flips[r, idx].numpy(),
        })
        df["layer"] = [self.graph.layer_of(d) for d in df["dst"]]
        return df.sort_values("delta", key=lambda s: -s.abs(), kind="stable").reset_index(drop=True)

    @cached_property
    def layers(self) -> pd.DataFrame:
        """Long table (fact_id, layer, share_a, share_b, shift): importance share of each block."""
        la, lb = layer_shares(self.graph, self.scores_a), layer_shares(self.graph, self.scores_b)
        rows, L = len(self.rows), self.graph.n_layers
        return pd.DataFrame({
            "fact_id": np.repeat(self.rows, L),
            "layer": np.tile(np.arange(L), rows),
            "share_a": la.flatten().numpy(),
            "share_b": lb.flatten().numpy(),
            "shift": (lb - la).flatten().numpy(),
        })

    @cached_property
    def components(self) -> pd.DataFrame:
        """Long table (fact_id, component, share_a, share_b, shift) for input/attn/mlp/logits/shallow/deep."""
        ca, cb = component_shares(self.graph, self.scores_a), component_shares(self.graph, self.scores_b)
        parts = [pd.DataFrame({"fact_id": self.rows, "component": k, "share_a": ca[k].numpy(),
                               "share_b": cb[k].numpy(), "shift": (cb[k] - ca[k]).numpy()}) for k in ca]
        return pd.concat(parts, ignore_index=True)

    def circuit_graphs(self, fact_id: str = MEAN) -> tuple[nx.DiGraph, nx.DiGraph]:
        """The two selected circuits of one fact as component-level DiGraphs."""
        r = self.row(fact_id)
        return (circuit_graph(self.graph, self.scores_a[r], self.mask_a[r]),
                circuit_graph(self.graph, self.scores_b[r], self.mask_b[r]))

    def _path_table(self, r: int) -> pd.DataFrame:
        key = f"paths{r}"
        if key not in self._cache:
            ga = circuit_graph(self.graph, self.scores_a[r], self.mask_a[r])
            gb = circuit_graph(self.graph, self.scores_b[r], self.mask_b[r])
            top_a, top_b = strongest_paths(ga, self.k_paths), strongest_paths(gb, self.k_paths)
            rank_a = {p: i + 1 for i, (p, _) in enumerate(top_a)}
            rank_b = {p: i + 1 for i, (p, _) in enumerate(top_b)}
            records = []
            for p in list(rank_a) + [p for p in rank_b if p not in rank_a]:
                sa, sb = path_strength(ga, p), path_strength(gb, p)
                status = ("kept" if p in rank_a and p in rank_b else
                          "lost" if p in rank_a and math.isnan(sb) else
                          "demoted" if p in rank_a else
                          "new" if math.isnan(sa) else "promoted")
                records.append({"path": " -> ".join(p), "length": len(p) - 1, "rank_a": rank_a.get(p),
                                "rank_b": rank_b.get(p), "strength_a": sa, "strength_b": sb, "status": status})
            self._cache[key] = pd.DataFrame(records, columns=["path", "length", "rank_a", "rank_b",
                                                              "strength_a", "strength_b", "status"])
        return self._cache[key]

    def paths(self, fact_id: str = MEAN) -> pd.DataFrame:
        """The strongest input->logits paths of each circuit (top `k_paths`) and what became of them.

        status: kept (top in both), lost (path broken in B), demoted (still in B, no longer top),
        new (not a path of A's circuit), promoted (in A's circuit but not top there).
        Strength = product of w / max w along the path, w = |score| of the component-level edge.
        """
        return self._path_table(self.row(fact_id)).copy()

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain JSON-able data (for `--json`)."""
        def clean(v: Any) -> Any:
            if isinstance(v, (float, np.floating)):
                return None if math.isnan(v) else round(float(v), 6)
            if isinstance(v, np.integer):
                return int(v)
            return v
        return {
            "a": self.label_a, "b": self.label_b, "selection": str(self.selection),
            "summary": {k: clean(v) for k, v in self.summary.items()},
            "facts": {f: {k: clean(v) for k, v in row.items()} for f, row in self.facts.iterrows()},
            "paths": {f: self.paths(f).map(clean).to_dict(orient="records") for f in self.rows},
        }


def per_fact_floor(noise: float | pd.Series | None, fact_ids: list[str]) -> Float[Tensor, "fact"]:
    """The noise floor of each fact: 0 (None), a scalar for all, or a per-fact Series (`noise_floor`)."""
    if noise is None:
        return torch.zeros(len(fact_ids))
    if isinstance(noise, pd.Series):
        missing = [f for f in fact_ids if f not in noise.index]
        if missing:
            raise CircuitdynError(f"noise floor has no value for fact id(s) {missing[:3]}")
        return torch.tensor([float(noise[f]) for f in fact_ids])
    if noise < 0:
        raise CircuitdynError(f"noise floor must be >= 0, got {noise}")
    return torch.full((len(fact_ids),), float(noise))


def diff_circuits(
    a: CircuitSet,
    b: CircuitSet,
    selection: str | Selection = "top:200",
    *,
    noise: float | pd.Series | None = None,
    faithfulness_a: Faithfulness | None = None,
    faithfulness_b: Faithfulness | None = None,
    fact_ids: list[str] | None = None,
    labels: tuple[str, str] = ("A", "B"),
    k_paths: int = 5,
    selected: tuple[Tensor, Tensor] | None = None,
    reached: tuple[Tensor, Tensor] | None = None,
) -> CircuitDiff:
    """Compare two circuit sets fact by fact (and their mean circuits).

    `a` and `b` must share the graph and settings (`CircuitSet.check_compatible`) and the facts
    compared (`fact_ids`, default: all of `a`'s, which `b` must also hold). `noise`: a scalar floor or
    a per-fact Series from `noise_floor`. `faithfulness_a/b` evaluate masks on each set's model and
    are needed only for the `faith:` rule. `selected`: masks [fact, edge] for `a` and `b` chosen
    elsewhere (e.g. by `circuitdyn.faithfulness.smallest_faithful`), in `fact_ids` order, replacing the
    rule's own selection; `reached`: the faithfulness each of those circuits reached.
    """
    a.check_compatible(b)
    sel = Selection.parse(selection)
    facts = list(fact_ids) if fact_ids is not None else list(a.fact_ids)
    if not facts:
        raise CircuitdynError("no facts to compare")
    for f in facts:
        a.index(f)
        if f not in b.fact_ids:
            raise CircuitdynError(f"fact id {f!r} has a circuit in {labels[0]} but not in {labels[1]}")
    a = restrict(a, facts)
    b = restrict(b, facts, a.graph)
    floor = per_fact_floor(noise, facts)
    faith_a = faith_b = None
    if selected is not None:
        mask_a, mask_b = (m.bool() for m in selected)
        if mask_a.shape != a.scores.shape or mask_b.shape != b.scores.shape:
            raise CircuitdynError(f"selected masks have shapes {tuple(mask_a.shape)}, {tuple(mask_b.shape)}; "
                                  f"expected {tuple(a.scores.shape)}")
        if reached is not None:
            faith_a, faith_b = (r.float() for r in reached)
    else:
        if sel.needs_model and (faithfulness_a is None or faithfulness_b is None):
            raise CircuitdynError(f"selection {sel} needs a faithfulness evaluator for both circuit sets")
        mask_a, faith_a = sel.select(a.scores, a.graph, faithfulness_a)
        mask_b, faith_b = sel.select(b.scores, a.graph, faithfulness_b)
    n_mean = max(1, int(round(float(torch.cat([mask_a, mask_b]).sum(1).float().mean()))))
    mean_a, mean_b = (sel.mean_circuit(x.scores.float().mean(0), a.graph, n_mean) for x in (a, b))
    return CircuitDiff(
        a, b, sel,
        torch.cat([mask_a, mean_a[None]]), torch.cat([mask_b, mean_b[None]]),
        torch.cat([floor, floor.mean(0, keepdim=True)]),
        faith_a, faith_b, labels[0], labels[1], k_paths,
    )


def diff_checkpoints(
    a: str,
    b: str,
    probes: str | Path | None = None,
    *,
    limit: int | None = None,
    sample_n: int | None = None,
    rephrased: bool = False,
    template: str = "auto",
    selection: str | Selection = "top:200",
    method: str | None = None,
    steps: int | None = None,
    metric: str = "answer-logprob",
    seed: int = 0,
    circuits_dir: str | Path | None = None,
    fact_ids: list[str] | None = None,
    noise: float | pd.Series | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = False,
) -> CircuitDiff:
    """`diff_circuits` of two checkpoints (`RUN:EPOCH` or a model folder) or circuit files (`.safetensors`).

    With `probes`, the facts come from `circuitdyn.facts.load_facts` (`limit`, `sample_n`, `rephrased`,
    `template`) and their circuits are computed on each checkpoint, or reused from `circuits_dir` (default
    `extraction.circuits_dir`) when cached with the same settings; without, cached circuits are read.
    The `faith:` selection needs checkpoints and probes (circuits are evaluated on each model).
    """
    from circuitdyn.checkpoints import resolve
    from circuitdyn.extraction import checkpoint_circuits, run_evaluator
    from circuitdyn.facts import load_facts

    from circuitdyn.probes import load_probes

    sel = Selection.parse(selection)
    sides = []
    labels: dict[str, str] = {}
    for spec in (a, b):
        if str(spec).endswith(".safetensors"):
            if sel.needs_model:
                raise CircuitdynError(f"selection {sel} evaluates circuits on their model: give checkpoints, not "
                                      f"the circuit file {spec}")
            cs = CircuitSet.load(spec)
            if probes is not None:
                labels = {p.id: f"{p.entity}: {p.question}" for p in load_probes(probes, rephrased=rephrased)}
                _check_facts_match(cs, labels, probes, spec)
            sides.append((cs, None, None, None))
            continue
        run, epoch = resolve(str(spec), device=device, dtype=dtype)
        facts = None
        if probes is not None:
            facts = load_facts(probes, run.tokenizer(), limit=limit, sample_n=sample_n, rephrased=rephrased,
                               template=template)  # type: ignore[arg-type]
        elif sel.needs_model:
            raise CircuitdynError(f"selection {sel} evaluates circuits on their model: it needs the facts (--probes)")
        cs = checkpoint_circuits(run, epoch, facts, folder=circuits_dir, method=method, steps=steps,  # type: ignore[arg-type]
                                 metric=metric, seed=seed, progress=progress)
        sides.append((cs, run, epoch, facts))
    (ca, run_a, epoch_a, facts_a), (cb, run_b, epoch_b, facts_b) = sides
    for (cs, _, _, facts), spec in zip(sides, (a, b)):
        if facts is not None:
            _check_facts_match(cs, facts.labels, probes, spec)
            labels = facts.labels
    faith_a = faith_b = None
    if sel.needs_model:
        ids = fact_ids or ca.fact_ids
        ev_a, ev_b = run_evaluator(run_a, facts_a), run_evaluator(run_b, facts_b)
        sub_a, sub_b = ca.subset(ids), cb.subset(ids)
        faith_a = lambda masks: ev_a(epoch_a, sub_a, masks)  # noqa: E731
        faith_b = lambda masks: ev_b(epoch_b, sub_b, masks)  # noqa: E731
    d = diff_circuits(ca, cb, sel, noise=noise, fact_ids=fact_ids, labels=(short_label(a), short_label(b)),
                      faithfulness_a=faith_a, faithfulness_b=faith_b)
    d.labels = dict(labels)
    return d


def _check_facts_match(cs: CircuitSet, labels: dict[str, str], probes: Any, where: str) -> None:
    """Circuits read or computed for a probe file must be circuits of that file's facts."""
    missing = [f for f in cs.fact_ids if f not in labels]
    if missing:
        raise CircuitdynError(
            f"probe file {probes} does not match the circuits of {where}: {len(missing)} of its "
            f"{len(cs.fact_ids)} fact ids are not probe ids of the file (e.g. {missing[:3]})"
        )


def short_label(spec: str) -> str:
    """A short label for a checkpoint spec: `run:3` for `path/to/run:3`, the folder or file name otherwise."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and tail.isdigit() and not Path(spec).exists():
        return f"{Path(head).name}:{tail}"
    return Path(spec).name or str(spec)

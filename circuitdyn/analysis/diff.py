"""How two circuits differ: per fact and aggregated, measured against method noise.

`diff_circuits(a, b, selection)` compares two `CircuitSet`s of the same graph and settings (e.g. two
epochs of a run) and returns a `CircuitDiff`, whose pandas tables answer:

- which edges were added / removed / kept, and which kept edges moved or flipped sign beyond their
  method-noise band (`noise.MethodNoise.band`);
- how different the circuits are, per fact: the distances of `similarity.DISTANCES` (edge Jaccard of the
  selected circuits, weighted Jaccard and Spearman of all scores), each tested against that fact's
  method-noise distribution (`changes`: `changed_beyond_noise`, effect size);
- where importance moved: per layer and per component type (input / attention / MLP / logits,
  shallow vs deep half of the layers), as shares of the total |score|;
- the strongest input->logits paths in each circuit and which of them survived;
- `summary`: means with 95 % intervals (cluster bootstrap over entities, `stats.bootstrap_ci`), the n
  they rest on, and `n_changed_beyond_noise`.

Facts whose clean-corrupted metric gap is below `faithfulness.MIN_GAP` at either checkpoint are excluded
from the tests and aggregates (and counted): their circuits are not sized by anything meaningful.
Selection rules (`circuitdyn.engine.selection`): the default for comparisons is `faith:0.8`, circuits sized to
carry 80 % of the fact's metric gap on their own model; `pruned:0.8` prunes those greedily (far smaller).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.analysis.change_test import ALPHA, ChangeTest, aggregate_verdict, change_table, compare_replicates
from circuitdyn.analysis.noise import MethodNoise
from circuitdyn.analysis.similarity import (
    DISTANCES,
    as_rows,
    distances,
    jaccard,
    rank_biased_overlap,
    spearman,
    weighted_jaccard,
)
from circuitdyn.analysis.stats import bootstrap_ci
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.faithfulness import MIN_GAP, gap_ok
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import Faithfulness, Selection
from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    pass

MEAN = "(mean circuit)"
"""Fact id of the aggregate row: the diff of the facts' mean circuits."""

STATUSES = ("added", "removed", "changed", "kept", "noise")
"""Edge status in a diff (edges in either circuit): added / removed = entered / left the circuit and its
score moved by more than its method-noise band; changed = in both, moved more than the band; kept = in
both, within the band; noise = crossed the selection cut while moving less than the band. Without method
noise every band is 0."""

PRIMARY = "edge_jaccard"
"""The statistic of the headline `n_changed_beyond_noise`: how much of the selected circuits' edge sets differ."""


def restrict(circuits: CircuitSet, fact_ids: list[str], graph: Graph | None = None) -> CircuitSet:
    """`circuits` limited to `fact_ids` (itself when nothing changes), sharing an already rebuilt graph.

    Rebuilding a graph from ~10^5 edge names takes a noticeable moment, and compatible sets (same edge
    list) have the same graph, so it is passed on instead of rebuilt.
    """
    out = circuits if list(fact_ids) == circuits.fact_ids else circuits.subset(list(fact_ids))
    if graph is not None and "graph" not in out.__dict__:
        out.__dict__["graph"] = graph  # fills the cached_property
    return out


def node_mask(graph: Graph, edges: Bool[Tensor, "*fact edge"]) -> Bool[Tensor, "*fact node"]:
    """Nodes (components of `graph.nodes`) touched by a selected edge."""
    src, dst = graph.edge_node_ids
    rows = as_rows(edges)
    out = torch.zeros(rows.shape[0], len(graph.nodes))
    out.index_add_(1, src, rows).index_add_(1, dst, rows)
    return (out > 0).reshape(*edges.shape[:-1], len(graph.nodes))


def node_importance(graph: Graph, scores: Float[Tensor, "*fact edge"]) -> Float[Tensor, "*fact node"]:
    """Importance of each node: half the |score| of its outgoing plus half of its incoming edges."""
    src, dst = graph.edge_node_ids
    rows = as_rows(scores).abs()
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


def circuit_graph(graph: Graph, scores: Float[Tensor, " edge"], mask: Bool[Tensor, " edge"]) -> nx.DiGraph:
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


def entity_groups(fact_ids: list[str], entity_of: dict[str, str] | None = None) -> list[str]:
    """The entity of each fact (the bootstrap's resampling unit): from `entity_of`, else the id's prefix
    before the first `/` (probe ids are `<entity-slug>/<question type>/<index>`), else the id itself."""
    entity_of = entity_of or {}
    return [entity_of.get(f) or (f.split("/", 1)[0] if "/" in f else f) for f in fact_ids]


@dataclass
class CircuitDiff:
    """The comparison of circuit sets `a` and `b` (same graph and settings, same facts, in `a`'s order).

    Tensors are [fact, edge] with one extra last row for `MEAN`, the facts' mean circuits (selected
    top-n with n = the mean per-fact circuit size). Tables: `facts` (one row per fact + `MEAN`),
    `changes` (per fact and statistic, against method noise), `summary` (aggregates with intervals),
    `edges(fact)`, `layers`, `components`, `paths(fact)`.
    """

    a: CircuitSet
    b: CircuitSet
    selection: Selection
    mask_a: Bool[Tensor, "row edge"]
    mask_b: Bool[Tensor, "row edge"]
    band: Float[Tensor, "row edge"]
    """Per edge, the method-noise band of its score (zeros without method noise)."""
    faith_a: Float[Tensor, " fact"] | None = None
    faith_b: Float[Tensor, " fact"] | None = None
    label_a: str = "A"
    label_b: str = "B"
    k_paths: int = 5
    labels: dict[str, str] = field(default_factory=dict)
    """fact id -> readable label (entity: question), for viewers."""
    noise: MethodNoise | None = None
    """The replicates of both checkpoints (keys `noise_keys`) and their description; the change test uses them."""
    entity_of: dict[str, str] = field(default_factory=dict)
    min_gap: float = MIN_GAP
    noise_keys: tuple[int, int] = (0, 1)
    heldout: tuple[Tensor, Tensor] | None = None
    """Per fact, the faithfulness of A's and B's circuits on a corruption they were not selected on
    (`extraction.heldout_faithfulness`; `pruned:` circuits, which are pruned and scored on their own)."""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def graph(self) -> Graph:
        return self.a.graph

    @cached_property
    def test(self) -> tuple[ChangeTest, dict[str, list[np.ndarray]]] | None:
        """The calibrated change test (`change_test.compare_replicates`) of every included fact, with each
        statistic's split effects for the aggregate test; None without replicates of both checkpoints. The
        edge-set distance compares each fact's replicates at one size, the geometric mean of its two circuits'."""
        if self.noise is None:
            return None
        facts = self.a.fact_ids
        reps = [self.noise.replicates_for(k, facts) for k in self.noise_keys]
        if reps[0] is None or reps[1] is None:
            return None
        n = len(facts)
        sizes = (self.mask_a[:n].sum(1).double() * self.mask_b[:n].sum(1).double()).sqrt().round().long()
        return compare_replicates(reps[0], reps[1], facts, sizes, included=self.included, family=self.noise.family)

    @property
    def rows(self) -> list[str]:
        """Fact ids of the rows: every fact, then `MEAN`."""
        return [*self.a.fact_ids, MEAN]

    @property
    def entities(self) -> list[str]:
        """The entity of each fact (in `a.fact_ids` order)."""
        return entity_groups(self.a.fact_ids, self.entity_of)

    @cached_property
    def included(self) -> np.ndarray:
        """Per fact: True when its clean-corrupted gap is at least `min_gap` at both checkpoints, signed
        (`faithfulness.gap_ok`: a negative gap is excluded; a gap not recorded counts as large enough)."""
        return gap_ok(self.a.gaps, self.min_gap) & gap_ok(self.b.gaps, self.min_gap)

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
        above = (self.scores_b - self.scores_a).abs() > self.band
        code = torch.full(ma.shape, -1, dtype=torch.int8)
        code[(ma | mb) & ~(ma & mb)] = STATUSES.index("noise")
        code[ma & mb] = STATUSES.index("kept")
        code[ma & mb & above] = STATUSES.index("changed")
        code[mb & ~ma & above] = STATUSES.index("added")
        code[ma & ~mb & above] = STATUSES.index("removed")
        return code

    @cached_property
    def sign_flips(self) -> Bool[Tensor, "row edge"]:
        """Edges of either circuit whose score changed sign, both sides beyond the edge's noise band."""
        sa, sb, f = self.scores_a, self.scores_b, self.band
        return (self.mask_a | self.mask_b) & (sa.abs() > f) & (sb.abs() > f) & (torch.sign(sa) != torch.sign(sb))

    @cached_property
    def facts(self) -> pd.DataFrame:
        """One row per fact (+ `MEAN`), indexed by fact id.

        n_a, n_b: circuit sizes; added, removed, changed, kept, noise: edge counts by `STATUSES`;
        sign_flips; edge_jaccard, node_jaccard: of the selected circuits; weighted_jaccard, spearman,
        rbo: of all edge scores; changed_frac: (added + removed) / |A or B|; attn_shift, mlp_shift,
        deep_shift: share of importance in B minus in A; paths_kept, paths_lost: of A's strongest paths
        (`paths`); faith_a, faith_b: faithfulness reached (rules that evaluate it); gap_a, gap_b: the
        clean-corrupted metric gap; included: gap >= `min_gap` at both; changed_beyond_noise, effect,
        noise_distance, effect, p_value, q_value: the edge-set change test against method noise (`changes`).
        """
        code = self.status_codes
        count = {s: (code == i).sum(1).numpy() for i, s in enumerate(STATUSES)}
        g = self.graph
        sh_a, sh_b = component_shares(g, self.scores_a), component_shares(g, self.scores_b)
        df = pd.DataFrame(
            {
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
            }
        )
        paths = [self._path_table(r) for r in range(len(self.rows))]
        df["paths_kept"] = [int((p["status"] == "kept").sum()) if len(p) else 0 for p in paths]
        df["paths_lost"] = [int((p["status"] == "lost").sum()) if len(p) else 0 for p in paths]
        if self.faith_a is not None and self.faith_b is not None:
            df["faith_a"] = [*self.faith_a.tolist(), float("nan")]
            df["faith_b"] = [*self.faith_b.tolist(), float("nan")]
        if self.heldout is not None:
            df["faith_heldout_a"] = [*self.heldout[0].tolist(), float("nan")]
            df["faith_heldout_b"] = [*self.heldout[1].tolist(), float("nan")]
        df["gap_a"] = [*self.a.gaps, float("nan")]
        df["gap_b"] = [*self.b.gaps, float("nan")]
        df["included"] = [*self.included.tolist(), True]
        primary = self.changes[self.changes["statistic"] == PRIMARY].set_index("fact_id")
        df["changed_beyond_noise"] = pd.array([*primary["changed_beyond_noise"], pd.NA], dtype="boolean")
        for col in ("noise_distance", "effect", "p_value", "q_value"):
            df[col] = [*primary[col], float("nan")]
        return df.set_index("fact_id")

    @cached_property
    def changes(self) -> pd.DataFrame:
        """Per fact and statistic of `similarity.DISTANCES`: the distance between A's and B's circuit beside
        the calibrated change test (`change_test.change_table`: method noise, effect, p, q,
        `changed_beyond_noise`); facts excluded for a small gap get NA."""
        n = len(self.a.fact_ids)
        observed = distances(self.scores_a[:n], self.scores_b[:n], self.mask_a[:n], self.mask_b[:n])
        table = change_table(observed, self.a.fact_ids, None if self.test is None else self.test[0])
        excluded = set(np.asarray(self.a.fact_ids)[~self.included])
        out = table["fact_id"].isin(excluded)
        table.loc[out, "changed_beyond_noise"] = pd.NA
        table["included"] = ~out
        return table

    def _changed_frac(self) -> Float[Tensor, " row"]:
        """Share of the union of both circuits that was added or removed beyond the edges' noise bands."""
        code = self.status_codes
        moved = ((code == STATUSES.index("added")) | (code == STATUSES.index("removed"))).sum(1).float()
        union = (code >= 0).sum(1).float()
        return torch.where(union > 0, moved / union.clamp_min(1), torch.zeros_like(union))

    @cached_property
    def means(self) -> pd.Series:
        """Mean over the included facts of every numeric column of `facts` (the `MEAN` row left out)."""
        per_fact = self.facts.drop(index=MEAN)
        return per_fact[per_fact["included"]].mean(numeric_only=True).astype(float)

    @cached_property
    def summary(self) -> dict[str, Any]:
        """The aggregate numbers, each with the n it rests on.

        n_facts / n_included / n_excluded_gap; `n_changed_beyond_noise` (facts whose edge set changed beyond
        method noise, false discovery rate `change_test.ALPHA`) out of `n_tested`, and the same per statistic;
        per statistic the mean distance with its interval over entities, the mean method noise, and the
        aggregate change test (`change_test.aggregate_verdict`: mean effect with interval, stratified p,
        verdict); circuit sizes and faithfulness reached (median, range); `means` of the edge counts and
        similarities.
        """
        facts = self.facts.drop(index=MEAN)
        inc = facts["included"].to_numpy(bool)
        groups = np.asarray(self.entities)[inc]
        ch = self.changes[self.changes["included"]]
        out: dict[str, Any] = {
            "selection": str(self.selection),
            "n_facts": len(facts),
            "n_included": int(inc.sum()),
            "n_excluded_gap": int((~inc).sum()),
            "min_gap": self.min_gap,
            "n_entities": len(set(groups)),
            "method_noise": None if self.noise is None else self.noise.summary(),
        }
        test = self.test
        out["change_test"] = (
            None
            if test is None
            else {
                "family": test[0].family,
                "alpha": test[0].alpha,
                "replicates_per_checkpoint": list(test[0].n_replicates),
            }
        )
        for stat in DISTANCES:
            rows = ch[ch["statistic"] == stat].set_index("fact_id").reindex(facts.index[inc])
            out[stat] = {
                "distance": bootstrap_ci(rows["distance"].to_numpy(float), groups).to_dict(),
                "noise_distance": _num(np.nanmean(rows["noise_distance"])) if test is not None and len(rows) else None,
                "n_changed_beyond_noise": None,
                "n_tested": 0,
            }
            if test is not None:
                out[stat].update(
                    aggregate_verdict(test[0].statistic(stat).reset_index(), test[1][stat], self.entities, ALPHA)
                )
        out["n_changed_beyond_noise"] = out[PRIMARY]["n_changed_beyond_noise"]
        out["n_tested"] = out[PRIMARY]["n_tested"]
        sizes = {"a": facts.loc[inc, "n_a"], "b": facts.loc[inc, "n_b"]}
        out["circuit_size"] = {
            k: {
                "median": _num(v.median()),
                "min": _num(v.min()),
                "max": _num(v.max()),
                "share_of_graph": _num(v.median() / len(self.a.edges)),
            }
            for k, v in sizes.items()
        }
        if "faith_a" in facts:
            out["faithfulness_reached"] = {
                k: {"median": _num(facts.loc[inc, c].median()), "min": _num(facts.loc[inc, c].min())}
                for k, c in (("a", "faith_a"), ("b", "faith_b"))
            }
        if "faith_heldout_a" in facts:
            out["faithfulness_heldout"] = {
                k: {
                    "median": _num(facts.loc[inc, c].median()),
                    "min": _num(facts.loc[inc, c].min()),
                    "n": int(facts.loc[inc, c].notna().sum()),
                }
                for k, c in (("a", "faith_heldout_a"), ("b", "faith_heldout_b"))
            }
        out["means"] = {k: _num(v) for k, v in self.means.items()}
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
        df = pd.DataFrame(
            {
                "edge": names,
                "src": [n.split("->")[0] for n in names],
                "dst": [n.split("->")[1] for n in names],
                "score_a": sa.numpy(),
                "score_b": sb.numpy(),
                "delta": (sb - sa).numpy(),
                "status": [STATUSES[c] if c >= 0 else "none" for c in code[idx].tolist()],
                "sign_flip": self.sign_flips[r, idx].numpy(),
            }
        )
        df["layer"] = [self.graph.layer_of(d) for d in df["dst"]]
        return df.sort_values("delta", key=lambda s: -s.abs(), kind="stable").reset_index(drop=True)

    @cached_property
    def layers(self) -> pd.DataFrame:
        """Long table (fact_id, layer, share_a, share_b, shift): importance share of each block."""
        la, lb = layer_shares(self.graph, self.scores_a), layer_shares(self.graph, self.scores_b)
        rows, L = len(self.rows), self.graph.n_layers
        return pd.DataFrame(
            {
                "fact_id": np.repeat(self.rows, L),
                "layer": np.tile(np.arange(L), rows),
                "share_a": la.flatten().numpy(),
                "share_b": lb.flatten().numpy(),
                "shift": (lb - la).flatten().numpy(),
            }
        )

    @cached_property
    def components(self) -> pd.DataFrame:
        """Long table (fact_id, component, share_a, share_b, shift) for input/attn/mlp/logits/shallow/deep."""
        ca, cb = component_shares(self.graph, self.scores_a), component_shares(self.graph, self.scores_b)
        parts = [
            pd.DataFrame(
                {
                    "fact_id": self.rows,
                    "component": k,
                    "share_a": ca[k].numpy(),
                    "share_b": cb[k].numpy(),
                    "shift": (cb[k] - ca[k]).numpy(),
                }
            )
            for k in ca
        ]
        return pd.concat(parts, ignore_index=True)

    def circuit_graphs(self, fact_id: str = MEAN) -> tuple[nx.DiGraph, nx.DiGraph]:
        """The two selected circuits of one fact as component-level DiGraphs."""
        r = self.row(fact_id)
        return (
            circuit_graph(self.graph, self.scores_a[r], self.mask_a[r]),
            circuit_graph(self.graph, self.scores_b[r], self.mask_b[r]),
        )

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
                status = (
                    "kept"
                    if p in rank_a and p in rank_b
                    else "lost"
                    if p in rank_a and math.isnan(sb)
                    else "demoted"
                    if p in rank_a
                    else "new"
                    if math.isnan(sa)
                    else "promoted"
                )
                records.append(
                    {
                        "path": " -> ".join(p),
                        "length": len(p) - 1,
                        "rank_a": rank_a.get(p),
                        "rank_b": rank_b.get(p),
                        "strength_a": sa,
                        "strength_b": sb,
                        "status": status,
                    }
                )
            self._cache[key] = pd.DataFrame(
                records, columns=["path", "length", "rank_a", "rank_b", "strength_a", "strength_b", "status"]
            )
        return self._cache[key]

    def paths(self, fact_id: str = MEAN) -> pd.DataFrame:
        """The strongest input->logits paths of each circuit (top `k_paths`) and what became of them.

        status: kept (top in both), lost (path broken in B), demoted (still in B, no longer top),
        new (not a path of A's circuit), promoted (in A's circuit but not top there).
        Strength = product of w / max w along the path, w = |score| of the component-level edge.
        """
        return self._path_table(self.row(fact_id)).copy()

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain JSON-able data (for `--json`), with the findings (`describe`)."""

        def clean(v: Any) -> Any:
            if v is pd.NA:
                return None
            if isinstance(v, (float, np.floating)):
                return None if math.isnan(v) else round(float(v), 6)
            if isinstance(v, (np.integer, np.bool_)):
                return v.item()
            return v

        keys = (
            "distance",
            "noise_distance",
            "cross",
            "effect",
            "p_value",
            "q_value",
            "n_replicates",
            "changed_beyond_noise",
        )
        changes = {
            f: {r["statistic"]: {k: clean(r[k]) for k in keys} for _, r in g.iterrows()}
            for f, g in self.changes.groupby("fact_id", sort=False)
        }
        return {
            "a": self.label_a,
            "b": self.label_b,
            "selection": {"rule": self.selection.rule, "value": self.selection.value, "spec": str(self.selection)},
            "summary": self.summary,
            "n_changed_beyond_noise": self.summary["n_changed_beyond_noise"],
            "baseline": None if self.noise is None else self.noise.to_dict(),
            "ci": {stat: self.summary[stat] for stat in DISTANCES},
            "facts": {f: {k: clean(v) for k, v in row.items()} for f, row in self.facts.iterrows()},
            "changes": changes,
            "paths": {f: self.paths(f).map(clean).to_dict(orient="records") for f in self.rows},
            "findings": self.describe(),
        }

    # ----------------------------------------------------------------------- notebooks

    def to_frame(self) -> pd.DataFrame:
        """A tidy table: one row per (fact, statistic of `similarity.DISTANCES`), the change test of `changes`
        joined with the fact's row of `facts` (sizes, edge counts, similarities, gaps), its entity and label."""
        per_fact = self.facts.drop(index=MEAN)
        per_fact = per_fact.drop(columns=[c for c in per_fact.columns if c in self.changes.columns])
        out = self.changes.merge(per_fact, left_on="fact_id", right_index=True, how="left")
        ids = out["fact_id"].tolist()
        out.insert(1, "entity", entity_groups(ids, self.entity_of))
        out.insert(2, "label", [self.labels.get(f, "") for f in ids])
        return out.reset_index(drop=True)

    def describe(self) -> list[str]:
        """What the diff supports, in sentences (`report.describe_diff`): what the CLI prints."""
        from circuitdyn.analysis.report import describe_diff

        return describe_diff(self)

    def text(self) -> str:
        """The diff to read (`report.diff_text`): per-fact table, findings, strongest paths; what the CLI prints."""
        from circuitdyn.analysis.report import diff_text

        return diff_text(self)

    def figure(self, fact_id: str = MEAN) -> Any:
        """The viewer's figure of one fact (default the mean circuit): both circuits on one canvas, edges coloured
        by status (`viz.diff_figure`), a `plotly.graph_objects.Figure`."""
        from circuitdyn.viz import diff_figure

        return diff_figure(self, fact_id)

    def _repr_html_(self) -> str:
        import html

        from circuitdyn.analysis.report import html_block

        return html_block(
            f"<b>CircuitDiff</b> {html.escape(self.label_a)} &rarr; {html.escape(self.label_b)}: "
            f"{len(self.a.fact_ids)} facts, selection {html.escape(str(self.selection))}",
            self.describe(),
            self.to_frame(),
        )


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


Picked = tuple[Tensor, "Tensor | None"]
"""One side's circuits chosen elsewhere: masks [fact, edge] and the faithfulness each reached (or None)."""


def diff_circuits(
    a: CircuitSet,
    b: CircuitSet,
    selection: Selection,
    *,
    noise: MethodNoise | None = None,
    faithfulness: tuple[Faithfulness, Faithfulness] | None = None,
    fact_ids: list[str] | None = None,
    labels: tuple[str, str] = ("A", "B"),
    selected: tuple[Picked, Picked] | None = None,
    entity_of: dict[str, str] | None = None,
    noise_keys: tuple[int, int] = (0, 1),
) -> CircuitDiff:
    """Compare two circuit sets fact by fact (and their mean circuits), each fact's circuit chosen by `selection`.

    `a` and `b` must share the graph and settings (`CircuitSet.check_compatible`) and the facts
    compared (`fact_ids`, default: all of `a`'s, which `b` must also hold). `noise`: the facts' method
    noise with the replicates of both checkpoints under `noise_keys` (default 0 for a, 1 for b, as
    `noise.merge_noise` makes them; epochs for the noise of one run), which change is tested against.
    `faithfulness`: evaluators of masks on each set's model, needed only for rules that evaluate circuits
    (`faith:`). `selected`: each side's circuits chosen elsewhere (e.g. `extraction.select_circuits`: masks
    [fact, edge] in `fact_ids` order and the faithfulness reached, or None), replacing the rule's own selection.
    `entity_of`: fact id -> entity, the bootstrap's resampling unit (`entity_groups`). Facts whose
    clean-corrupted gap is below the diff's `min_gap` (`faithfulness.MIN_GAP`) at either checkpoint are
    excluded from tests and aggregates.
    """
    a.check_compatible(b)
    sel = selection
    facts = list(fact_ids) if fact_ids is not None else list(a.fact_ids)
    if not facts:
        raise CircuitdynError("no facts to compare")
    for f in facts:
        a.index(f)
        if f not in b.fact_ids:
            raise CircuitdynError(f"fact id {f!r} has a circuit in {labels[0]} but not in {labels[1]}")
    a = restrict(a, facts)
    b = restrict(b, facts, a.graph)
    band = torch.zeros(len(facts), len(a.edges)) if noise is None else noise.band_for(facts)
    faith_a = faith_b = None
    if selected is not None:
        (mask_a, reached_a), (mask_b, reached_b) = selected
        mask_a, mask_b = mask_a.bool(), mask_b.bool()
        if mask_a.shape != a.scores.shape or mask_b.shape != b.scores.shape:
            raise CircuitdynError(
                f"selected masks have shapes {tuple(mask_a.shape)}, {tuple(mask_b.shape)}; "
                f"expected {tuple(a.scores.shape)}"
            )
        if reached_a is not None and reached_b is not None:
            faith_a, faith_b = reached_a.float(), reached_b.float()
    else:
        if sel.needs_model and faithfulness is None:
            raise CircuitdynError(f"selection {sel} needs a faithfulness evaluator for both circuit sets")
        eval_a, eval_b = faithfulness or (None, None)
        mask_a, faith_a = sel.select(a.scores, a.graph, eval_a)
        mask_b, faith_b = sel.select(b.scores, a.graph, eval_b)
    n_mean = max(1, int(round(float(torch.cat([mask_a, mask_b]).sum(1).float().mean()))))
    mean_a, mean_b = (sel.mean_circuit(x.scores.float().mean(0), a.graph, n_mean) for x in (a, b))
    return CircuitDiff(
        a,
        b,
        sel,
        torch.cat([mask_a, mean_a[None]]),
        torch.cat([mask_b, mean_b[None]]),
        torch.cat([band, band.mean(0, keepdim=True)]),
        faith_a,
        faith_b,
        labels[0],
        labels[1],
        noise=noise,
        entity_of=dict(entity_of or {}),
        noise_keys=noise_keys,
    )


def check_facts_match(cs: CircuitSet, labels: dict[str, str], probes: Any, where: str) -> None:
    """Circuits read or computed for a probe file must be circuits of that file's facts."""
    missing = [f for f in cs.fact_ids if f not in labels]
    if missing:
        raise CircuitdynError(
            f"probe file {probes} does not match the circuits of {where}: {len(missing)} of its "
            f"{len(cs.fact_ids)} fact ids are not probe ids of the file (e.g. {missing[:3]})"
        )

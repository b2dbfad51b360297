"""How similar two circuits of the same fact are: the statistics every comparison in circuitdyn uses.

Similarities of two score vectors (per fact row) or of two selected circuits (masks):
`jaccard` (edge sets), `weighted_jaccard` (|score| magnitudes over all edges), `spearman` (rank
correlation of all edge scores) and `rank_biased_overlap` (top-weighted agreement of the |score|
orderings). `similarities(...)` computes the ones circuitdyn reports for a pair of circuit sets, and
`DISTANCES` names the dissimilarities (1 - similarity) that method noise and change tests compare.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

RBO_P = 0.99
"""RBO persistence: the top 1/(1-p) = 100 edges carry about 63 % of the weight."""


def as_rows(x: Tensor) -> Tensor:
    return x.float().reshape(-1, x.shape[-1])


def rank_rows(x: Float[Tensor, "*fact edge"]) -> np.ndarray:
    """Per row, average ranks (ties share their mean rank), centred and scaled to unit norm.

    Spearman's rho of two rows is the dot product of their `rank_rows` (NaN for a constant row).
    """
    rows = as_rows(x).numpy().astype(np.float64)
    out = np.empty_like(rows)
    n = rows.shape[1]
    for i, row in enumerate(rows):
        order = np.argsort(row)  # ties get their mean rank below, so their order does not matter (4x stable's speed)
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
    rows = as_rows(x).abs()
    return rows.topk(depth, dim=1, sorted=True).indices


def rbo_from_top(top_a: Tensor, top_b: Tensor, n_edges: int, p: float = RBO_P) -> Float[Tensor, " fact"]:
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


DISTANCES = ("edge_jaccard", "weighted_jaccard", "spearman")
"""The statistics whose change is tested against method noise, as distances 1 - similarity:
the selected circuits' edge sets, their |score| magnitudes, and the rank order of all edge scores."""


def similarities(
    scores_a: Float[Tensor, "row edge"],
    scores_b: Float[Tensor, "row edge"],
    mask_a: Bool[Tensor, "row edge"],
    mask_b: Bool[Tensor, "row edge"],
) -> dict[str, np.ndarray]:
    """Per row: edge Jaccard of the selected circuits, weighted Jaccard and Spearman of all scores, RBO."""
    return {
        "edge_jaccard": jaccard(mask_a, mask_b).numpy(),
        "weighted_jaccard": weighted_jaccard(scores_a, scores_b).numpy(),
        "spearman": spearman(scores_a, scores_b).numpy(),
        "rbo": rank_biased_overlap(scores_a, scores_b).numpy(),
    }


def distances(
    scores_a: Float[Tensor, "row edge"],
    scores_b: Float[Tensor, "row edge"],
    mask_a: Bool[Tensor, "row edge"],
    mask_b: Bool[Tensor, "row edge"],
) -> dict[str, np.ndarray]:
    """Per row, 1 - similarity for each of `DISTANCES`."""
    sims = similarities(scores_a, scores_b, mask_a, mask_b)
    return {k: 1.0 - sims[k] for k in DISTANCES}

"""Selection rules: how per-fact edge scores become circuits (per-fact edge masks).

Rules (`Selection.parse`): `top:N` (the N edges with the largest |score|), `paths:N` (top edges on
input->logits paths), `abs:T` (|score| >= T), `faith:F`: the smallest top-n circuit reaching faithfulness F
(`smallest_faithful`), which compares circuits of different epochs at equal faithfulness rather than at
equal size, and `pruned:F`: that circuit greedily pruned under patched evaluation (`prune_faithful`), a
circuit several times smaller at the same faithfulness, since ranking by |score| keeps edges that only
matter in the full model and edges that work against the answer. `faith:` and `pruned:` need a
faithfulness callable bound to a model (`circuitdyn.engine.faithfulness`); the rest work on scores alone.

This module knows nothing of models: a faithfulness callable maps masks [fact, edge] to one faithfulness
per fact, as the metric callable does in EAP-IG.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuitdyn.engine.graph import Graph
from circuitdyn.errors import CircuitdynError

Faithfulness = Callable[[Bool[Tensor, "fact edge"]], Float[Tensor, " fact"]]
"""Given per-fact edge masks, the faithfulness of each fact's circuit on one model (NaN where undefined)."""

Rule = Literal["top", "paths", "abs", "faith", "pruned"]


def select_top_n(scores: Float[Tensor, "*fact edge"], n: int) -> Bool[Tensor, "*fact edge"]:
    """Mask of the n edges with the largest |score| (per fact); n must be a whole number >= 0 (more than
    the edges there are selects them all)."""
    try:
        whole = not isinstance(n, bool) and float(n) >= 0 and float(n) == int(n)
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise CircuitdynError(f"top-n needs a whole number of edges >= 0, got {n!r}")
    n = min(int(n), scores.shape[-1])
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if n:
        mask.scatter_(-1, scores.float().abs().topk(n, dim=-1).indices, True)
    return mask


def select_threshold(scores: Float[Tensor, "*fact edge"], t: float) -> Bool[Tensor, "*fact edge"]:
    """Mask of the edges with |score| >= t (t a finite number >= 0)."""
    if not (math.isfinite(t) and t >= 0):
        raise CircuitdynError(f"threshold needs a finite number >= 0, got {t!r}")
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
    order = scores.float().abs().argsort(descending=True).cpu().numpy()
    n_total = scores.shape[-1]

    def pruned(k: int) -> np.ndarray:
        mask = np.zeros(n_total, dtype=bool)
        mask[order[:k]] = True
        return graph.on_path_np(mask)

    if n < 0:
        raise CircuitdynError(f"paths selection needs a whole number of edges >= 0, got {n!r}")
    if n == 0:
        return torch.zeros(n_total, dtype=torch.bool, device="cpu")
    lo, hi = min(n, n_total), n_total
    if int(pruned(hi).sum()) >= n:
        while lo < hi:
            mid = (lo + hi) // 2
            if int(pruned(mid).sum()) >= n:
                hi = mid
            else:
                lo = mid + 1
    return torch.from_numpy(pruned(hi))


def top_n_by_fact(
    scores: Float[Tensor, "fact edge"], n: Int[Tensor, " fact"], graph: Graph | None = None, paths: bool = False
) -> Bool[Tensor, "fact edge"]:
    """Per-fact top-n masks for per-fact sizes n (`paths`: on input->logits paths, needs `graph`)."""
    if paths:
        if graph is None:
            raise CircuitdynError("paths selection needs the graph")
        return torch.stack([select_top_n_paths(s, graph, int(k)) for s, k in zip(scores, n)])
    return score_ranks(scores) < n.to(scores.device)[:, None]


def score_ranks(scores: Float[Tensor, "fact edge"]) -> Int[Tensor, "fact edge"]:
    """Each edge's rank by |score| within its fact (0 = largest; ties in edge order): edge e is in the top-n
    circuit iff its rank < n."""
    order = scores.float().abs().argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1))
    return rank


WARM_STEP = 1.2
"""A warm-started search (`smallest_faithful(..., guess=)`) first steps this factor away from the guess,
doubling the step's exponent until the target is bracketed."""


def smallest_faithful(
    scores: Float[Tensor, "fact edge"],
    faithfulness: Faithfulness,
    target: float,
    *,
    graph: Graph | None = None,
    paths: bool = False,
    rel_tol: float = 0.05,
    guess: Int[Tensor, " fact"] | None = None,
) -> tuple[Int[Tensor, " fact"], Bool[Tensor, "fact edge"], Float[Tensor, " fact"]]:
    """The smallest circuit reaching faithfulness `target`, per fact: its top-n edges by |score| for the
    smallest n whose faithfulness is >= target.

    All facts are searched at once (one `faithfulness` call per round): `hi` is the smallest n seen to reach
    the target (the full graph reaches 1 by definition), `lo` the largest seen to fall short (the empty
    circuit: 0), and the search stops when hi - lo <= rel_tol x hi. Cold, it bisects [0, E] (~log2(E / (rel_tol
    x n)) rounds). With a `guess` per fact (e.g. the previous epoch's sizes; <= 0 for none), it tries the guess,
    steps away from it by WARM_STEP, WARM_STEP^2, WARM_STEP^4, ... until the target is bracketed, then bisects
    geometrically: about 4 rounds when the size moved by under 20 %. Faithfulness is not exactly monotone in n,
    so the size found reaches the target, and no size below `lo` was tested. A fact whose faithfulness is
    undefined (NaN: clean and corrupted runs agree) keeps the full graph, with NaN reached.
    Returns (n [fact], masks [fact, edge], faithfulness reached [fact]).
    """
    if not 0 < target <= 1.5:
        raise CircuitdynError(f"target faithfulness must be in (0, 1.5], got {target}")
    n_fact, n_edges = scores.shape
    ranks = None if paths else score_ranks(scores)

    def circuits(n: Tensor) -> Tensor:
        return top_n_by_fact(scores, n, graph, paths) if ranks is None else ranks < n.to(ranks.device)[:, None]

    hi = torch.full((n_fact,), n_edges, dtype=torch.long, device="cpu")
    full = faithfulness(torch.ones(n_fact, n_edges, dtype=torch.bool, device=scores.device)).float().cpu()
    undefined = full.isnan()
    lo = torch.where(undefined, hi, torch.zeros_like(hi))
    reached = torch.where(undefined, float("nan"), full)
    # Per fact, the next size to try while the target is not yet bracketed around the guess (0: bisect).
    probe = torch.zeros(n_fact, dtype=torch.long, device="cpu")
    if guess is not None:
        probe = torch.where(undefined, 0, guess.detach().cpu().long().clamp(0, n_edges))
        probe = torch.where(probe >= n_edges, 0, probe)
    step = torch.full((n_fact,), WARM_STEP, device="cpu")
    while True:
        open_ = (hi - lo) > torch.clamp((hi.float() * rel_tol).long(), min=1)
        if not open_.any():
            break
        bracketing = open_ & (probe > lo) & (probe < hi)
        geometric = (lo.float() * hi.float()).sqrt().long()
        mid = torch.where(lo > 0, geometric, (lo + hi) // 2).clamp(min=lo + 1, max=hi - 1)
        mid = torch.where(bracketing, probe, torch.where(open_, mid, hi))
        faith = faithfulness(circuits(mid)).float().cpu()
        ok = faith >= target
        hi = torch.where(open_ & ok, mid, hi)
        reached = torch.where(open_ & ok, faith, reached)
        lo = torch.where(open_ & ~ok, mid, lo)
        # A bracketing probe that passed steps down, one that failed steps up, each step the square of the last.
        nxt = torch.where(ok, (mid.float() / step).floor(), (mid.float() * step).ceil()).long()
        probe = torch.where(bracketing, nxt, torch.zeros_like(probe))
        step = torch.where(bracketing, step * step, step)
    return hi, circuits(hi), reached


def on_paths(masks: Bool[Tensor, "fact edge"], graph: Graph) -> Bool[Tensor, "fact edge"]:
    """Each circuit without its edges that lie on no input->logits path of circuit edges.

    Exact under patching: such an edge's destination feeds nothing that reaches the logits (its output is
    patched away downstream) or its source reads only corrupted inputs (it carries its corrupted value), so
    removing it never changes a circuit's patched metric, and the circuit gets smaller for free.
    """
    rows = masks.cpu().numpy().astype(bool)
    return torch.from_numpy(np.stack([graph.on_path_np(r) for r in rows])).to(masks.device)


def helpfulness(scores: Float[Tensor, "fact edge"], graph: Graph) -> Float[Tensor, "fact edge"]:
    """How much each edge helps its fact's clean answer: -score x sign(m_clean - m_corrupted).

    A score estimates m(edge patched) - m(clean), so a helpful edge's score has the sign of
    m_corrupted - m_clean. That sign comes from the scores themselves: the edges into `logits` partition
    the final residual stream, so their scores sum to about m_corrupted - m_clean (completeness of
    integrated gradients; EAP's first-order estimate). Edges of a fact whose sum is 0 get |score|.
    """
    _, dst = graph.edge_src_dst
    into_logits = (dst == len(graph.destinations) - 1).to(scores.device)
    sign = torch.sign(scores.float()[:, into_logits].sum(1, keepdim=True))
    return torch.where(sign == 0, scores.float().abs(), scores.float() * sign)


def prune_faithful(
    scores: Float[Tensor, "fact edge"],
    faithfulness: Faithfulness,
    target: float,
    graph: Graph,
    *,
    start: Bool[Tensor, "fact edge"] | None = None,
    rounds: int = 24,
    min_block: int = 1,
    rel_tol: float = 0.02,
    guess: Int[Tensor, " fact"] | None = None,
) -> tuple[Int[Tensor, " fact"], Bool[Tensor, "fact edge"], Float[Tensor, " fact"]]:
    """A small circuit reaching faithfulness `target`, per fact: the smallest faithful top-n circuit
    (`smallest_faithful`, warm-started from `guess` sizes when given, or `start`), pruned to input->logits
    paths, then greedily pruned with patched evaluation.

    Why: ranking by |score| keeps edges that only matter in the full model and edges that work against the
    answer (which the circuit must then outweigh), so it needs many edges; removing blocks and checking
    the patched faithfulness finds the edges this circuit really needs.

    Each fact queues its circuit's edges least helpful first (`helpfulness`: edges working against the
    answer, then the weakest helpful ones). Every round, each fact drops the next `block` queued edges,
    path-prunes, and all facts' candidates are evaluated with one `faithfulness` call. A fact keeps a
    candidate that reaches the target (and doubles its block, up to half of what is left in its queue),
    else halves its block; a block of `min_block` edges that fails stays in the circuit and the fact moves
    past it. The search stops after `rounds` rounds or when every queue is empty. The first block is half
    the circuit, so a circuit shrinks geometrically while its removals succeed. The order matters: on
    SmolLM2 facts (`benchmarks/circuit_size.py`, 10 rounds) it gives circuits a median 25.6x smaller than
    top-n at equal faithfulness, against 3.9x when queueing by |score|.

    Cost in `faithfulness` calls: smallest_faithful's (1 + ~log2(E / (rel_tol x n)), ~10-15 on SmolLM2) or 1
    with `start`, plus at most `rounds`, plus 1 that re-evaluates every returned circuit: a fact whose
    pruned circuit falls short there (e.g. float noise of a different batch) gets its start circuit back.
    Facts with undefined faithfulness (NaN) keep the full graph with NaN; a `start` circuit below the target
    is returned as it is. Returns (n [fact], masks [fact, edge], faithfulness reached [fact]).
    """
    if not 0 < target <= 1.5:
        raise CircuitdynError(f"target faithfulness must be in (0, 1.5], got {target}")
    if rounds < 0:
        raise CircuitdynError(f"rounds must be >= 0, got {rounds}")
    if min_block < 1:
        raise CircuitdynError(f"min_block must be >= 1, got {min_block}")
    n_edges = scores.shape[1]
    if graph.n_edges != n_edges:
        raise CircuitdynError(f"scores have {n_edges} edges but the graph has {graph.n_edges}")
    device = scores.device

    def evaluate(masks: np.ndarray) -> Tensor:
        return faithfulness(torch.from_numpy(masks).to(device)).float().cpu()

    if start is None:
        _, start, start_reached = smallest_faithful(
            scores, faithfulness, target, graph=graph, rel_tol=rel_tol, guess=guess
        )
        first = on_paths(start, graph).cpu().numpy()
    else:
        if start.shape != scores.shape:
            raise CircuitdynError(f"start circuits have shape {tuple(start.shape)}, expected {tuple(scores.shape)}")
        first = on_paths(start.bool(), graph).cpu().numpy()
        start_reached = evaluate(first)
    start_reached = start_reached.float().cpu()
    undefined = start_reached.isnan().numpy()
    first[undefined] = True
    masks = first.copy()

    key = helpfulness(scores, graph).cpu().numpy()
    todo = [np.flatnonzero(row)[np.argsort(k[row], kind="stable")] for row, k in zip(masks, key)]
    block = [max(min_block, len(t) // 2) for t in todo]
    active = ~undefined & (start_reached >= target).numpy()
    for _ in range(rounds):
        cand, tried = masks.copy(), {}
        for f in np.flatnonzero(active):
            todo[f] = todo[f][masks[f, todo[f]]]
            if not len(todo[f]):
                active[f] = False
                continue
            k = min(block[f], len(todo[f]))
            row = masks[f].copy()
            row[todo[f][:k]] = False
            cand[f], tried[f] = graph.on_path_np(row), k
        if not tried:
            break
        faith = evaluate(cand)
        for f, k in tried.items():
            if faith[f] >= target:
                masks[f] = cand[f]
                todo[f] = todo[f][k:]
                block[f] = max(min_block, min(2 * k, (len(todo[f]) + 1) // 2))
            elif k > min_block:
                block[f] = max(min_block, k // 2)
            else:
                todo[f] = todo[f][k:]

    final = evaluate(masks)
    short = ~(final >= target).numpy() & (masks != first).any(1)
    masks[short], final[short] = first[short], start_reached[short]
    final[undefined] = float("nan")
    out = torch.from_numpy(masks).to(device)
    return out.sum(1), out, final


@dataclass(frozen=True)
class Selection:
    """A rule that turns scores into circuits (per-fact edge masks). Parse one with `Selection.parse`."""

    rule: Rule
    value: float

    RULES = {
        "top": "top-n edges",
        "paths": "top-n edges on input->logits paths",
        "abs": "|score| threshold",
        "faith": "smallest top-n circuit reaching a faithfulness",
        "pruned": "greedily pruned circuit reaching a faithfulness",
    }

    def __post_init__(self) -> None:
        if self.rule not in self.RULES:
            raise CircuitdynError(f"selection rule {self.rule!r} is unknown; use one of {sorted(self.RULES)}")
        if not math.isfinite(self.value):
            raise CircuitdynError(f"selection {self.rule}:{self.value} needs a finite value")
        if self.rule in ("top", "paths") and (self.value < 1 or self.value != int(self.value)):
            raise CircuitdynError(f"selection {self.rule}:{self.value} needs a whole number of edges >= 1")
        if self.rule == "abs" and self.value < 0:
            raise CircuitdynError(f"selection abs:{self.value} needs a threshold >= 0")
        if self.rule in ("faith", "pruned") and not 0 < self.value <= 1.5:
            raise CircuitdynError(f"selection {self.rule}:{self.value} needs a target faithfulness in (0, 1.5]")

    @classmethod
    def parse(cls, spec: str | Selection) -> Selection:
        """`top:200`, `paths:200`, `abs:0.01`, `faith:0.8` (or `faith:80%`), `pruned:0.8`; a bare number
        means `top:N`."""
        if isinstance(spec, Selection):
            return spec
        text = str(spec).strip()
        m = re.fullmatch(r"(?:(top|paths|abs|faith|pruned):)?\s*([0-9.eE+-]+)(%?)", text)
        if not m:
            raise CircuitdynError(f"selection {text!r} is not RULE:VALUE with RULE in {sorted(cls.RULES)}")
        rule = m[1] or "top"
        try:
            value = float(m[2]) / (100 if m[3] else 1)
        except ValueError:
            raise CircuitdynError(f"selection {text!r}: {m[2]!r} is not a number") from None
        return cls(rule, value)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.rule}:{int(self.value) if self.rule in ('top', 'paths') else self.value:g}"

    @property
    def needs_model(self) -> bool:
        """True for rules that evaluate circuits on a model (`faith:`, `pruned:`)."""
        return self.rule in ("faith", "pruned")

    def select(
        self,
        scores: Float[Tensor, "fact edge"],
        graph: Graph,
        faithfulness: Faithfulness | None = None,
        guess: Int[Tensor, " fact"] | None = None,
    ) -> tuple[Bool[Tensor, "fact edge"], Float[Tensor, " fact"] | None]:
        """The circuits of every fact under this rule, and (for `faith:`, `pruned:`) the faithfulness each reached.
        `guess`: per fact, a size to start the `faith:` search from (e.g. the previous epoch's; <= 0: none)."""
        scores = scores.float()
        if self.rule == "top":
            return select_top_n(scores, int(self.value)), None
        if self.rule == "paths":
            return select_top_n_paths(scores, graph, int(self.value)), None
        if self.rule == "abs":
            return select_threshold(scores, self.value), None
        if faithfulness is None:
            raise CircuitdynError(f"selection {self} needs a model to evaluate faithfulness; none was given")
        if self.rule == "pruned":  # a pruned circuit's size is no guess for the top-n search it starts from
            _, masks, reached = prune_faithful(scores, faithfulness, self.value, graph)
        else:
            _, masks, reached = smallest_faithful(scores, faithfulness, self.value, graph=graph, guess=guess)
        return masks, reached

    def mean_circuit(self, mean_scores: Float[Tensor, " edge"], graph: Graph, n_mean: int) -> Bool[Tensor, " edge"]:
        """The circuit of the facts' mean scores: by the rule's threshold for `abs:`, else the top `n_mean`
        edges (on paths for `paths:`), n_mean being the mean per-fact circuit size."""
        if self.rule == "abs":
            return select_threshold(mean_scores.float(), self.value)
        if self.rule == "paths":
            return select_top_n_paths(mean_scores.float(), graph, n_mean)
        return select_top_n(mean_scores.float(), n_mean)


DEFAULT_SELECTION = Selection("faith", 0.8)
"""Circuits are compared at equal faithfulness on their own model, not at equal size."""

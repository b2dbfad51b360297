"""Edge attribution for per-fact knowledge circuits: EAP, EAP-IG (inputs) and RelP.

Sign convention: score(e) estimates m(clean run with edge e patched to its corrupted value) - m(clean),
where m is the per-fact metric (`circuitdyn.engine.forward`, answer log-prob by default). EAP scores
(a_src(corrupted) - a_src(clean)) . dm/d(input of dst), summed over positions; EAP-IG integrates that
gradient along the inputs interpolated from corrupted to clean embeddings with an m-point quadrature rule
(`ig_nodes`): `right` (alpha = k/m, k = 1..m, the EAP-IG code's earlier `range(1, steps + 1)` loop and
circuitdyn's grid so far), `left` (k = 0..m-1, later versions of hannamw/EAP-IG), `midpoint` or `gauss`
(Gauss-Legendre) or `shifted` (alpha = (k + u)/m with an offset u in [0, 1) drawn from the extraction seed:
a randomised midpoint rule, unbiased for the integral, whose seeds are the method-noise replicates'
equally valid draws, see `circuitdyn.analysis.noise`). With m = 1, EAP-IG on the right grid is EAP.

RelP (relevance patching, Jafari et al. 2025, arXiv 2508.21258) is EAP whose one backward pass follows LRP
rules instead of the gradient (`run_capture(..., relp=True)`): every norm's scale is a constant (ln1's in
`_PortGrads`, which then drops its rank-one term; ln2's and the final norm's by detaching it), the attention
pattern is a constant (relevance flows through the values only, so edges into q and k score 0), an MLP's
activation passes act(x)/x (identity rule) and a gated MLP's gate * up product passes half the gradient through
each factor (half rule). The forward values are unchanged, and so are the differences it multiplies. Same
cost as EAP (one forward, one backward); recorded with `ig_steps` 1 and `ig_grid` `right`, like EAP.

Why it is fast: gradients are taken only with respect to small tensors of the functional forward
(`circuitdyn.engine.forward.run_capture`: per-head q/k/v after projection, each MLP's input, the final residual),
and the q/k/v gradients are mapped back to per-head residual gradients through the layer-norm
vector-Jacobian product, which is linear in the upstream gradient: its main term is summed over IG steps
in d_head space, its rank-one correction kept as one (x_hat, coefficient) pair per step (`_PortGrads`).
Key/value heads of GQA models are expanded to the query heads before attention, so autograd hands us one
gradient per query head ("ungrouped" at no extra cost).

Why batching pays and memory per fact is small: nothing [fact, source, position, d_model]-sized is ever
held. The activation differences are kept as per-layer z and MLP-output differences (one d_model vector
per layer and position, not one per source), and the score contraction runs fact by fact over chunks of
positions (`_contract`): each chunk's source outputs and destination gradients are expanded there, and
multiplied in a few large matrix products (layers grouped so each product has >= 128 destination columns),
so its cost per fact does not depend on the batch. Padded positions are skipped.

Precision: the IG steps (forward and backward) compute in the model's dtype (float32, bfloat16 or float16)
over a float32 residual stream; gradients are summed over IG steps and contracted into scores in float32.
`buffer_dtype` stores the activation differences and the per-step x_hat in bf16/fp16 (sums stay float32).
For a bf16/fp16 model the clean and corrupted runs, whose difference every score multiplies, compute in
float32 (weights cast a layer at a time): bf16 rounding in two separate runs is of the order of that
difference (measured on SmolLM2: 8% error in it, Spearman 0.97 between bf16 and fp32 scores, > 0.99 with
this). Scores are [fact, edge] in `Graph.edges` order.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from circuitdyn.engine.forward import (
    FactBatch,
    LayerWeights,
    Metric,
    by_length,
    check_supported,
    clean_prefix,
    embed_inputs,
    get_metric,
    layer_weights,
    make_batch,
    run_capture,
    shared_prefix,
)
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.settings import (
    BUFFER_DTYPES,
    DEFAULT_IG_GRID,
    DEFAULT_IG_STEPS,
    DEFAULT_SETTINGS,
    AttributionSettings,
    BufferDtype,
    Compute,
    IGGrid,
    Method,
    check_method,
    grid_taken,
    steps_taken,
)
from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import FactPrompt

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class Attribution:
    """Edge scores and the two runs they were computed between: m_clean and m_corr per fact (the metric of the
    clean and the corrupted run; attribution runs both, so they come free)."""

    scores: Float[Tensor, "fact edge"]
    m_clean: Float[Tensor, " fact"]
    m_corr: Float[Tensor, " fact"]


def grid_offset(seed: int, fact_id: str = "") -> float:
    """The `shifted` rule's offset u in [0, 1) for an extraction seed and a fact: a fixed function of both, so
    a replicate is reproducible from the seed its circuit file records, and the offsets of different facts
    are independent draws (their replicates' errors are not shared)."""
    return float(np.random.default_rng([int(seed), zlib.crc32(fact_id.encode()), 0x5EED]).random())


def ig_nodes(ig_grid: str, steps: int, seed: int = 0, fact_id: str = "") -> tuple[list[float], list[float]]:
    """Interpolation points alpha (0 = corrupted, 1 = clean) and weights (summing to 1) of an m-step rule.

    `right`: k/m, k = 1..m (circuitdyn's grid so far); `left`: k/m, k = 0..m-1 (hannamw/EAP-IG);
    `midpoint`: (k + 1/2)/m; `gauss`: Gauss-Legendre nodes and weights on [0, 1] (exact for polynomials of
    degree 2m - 1, where the Riemann sums converge as 1/m); `shifted`: (k + u)/m with u = `grid_offset(seed,
    fact_id)`, one offset per fact.
    """
    grid_taken("eap-ig", ig_grid)
    m = int(steps)
    if m < 1:
        raise CircuitdynError(f"IG steps must be >= 1, got {steps}")
    if ig_grid == "gauss":
        x, w = np.polynomial.legendre.leggauss(m)
        return [float((a + 1) / 2) for a in x], [float(v / 2) for v in w]
    offsets = {"right": 1.0, "left": 0.0, "midpoint": 0.5}
    start = grid_offset(seed, fact_id) if ig_grid == "shifted" else offsets[ig_grid]
    return [(k + start) / m for k in range(m)], [1.0 / m] * m


def buffer_torch_dtype(buffer_dtype: str) -> torch.dtype:
    """The torch dtype of a `buffer_dtype` name, else a CircuitdynError naming the choices."""
    if buffer_dtype not in BUFFER_DTYPES:
        raise CircuitdynError(f"unknown buffer dtype {buffer_dtype!r}; choose one of {', '.join(BUFFER_DTYPES)}")
    return getattr(torch, buffer_dtype)


PASS_ROWS = 512
"""On a CPU, facts x positions of one forward and backward pass (matrix products are as efficient there as in
larger ones, and a pass's autograd state is the bulk of the memory a fact needs)."""


def default_pass_facts(device: torch.device | str, n_positions: int) -> int | None:
    """Facts per pass by default: PASS_ROWS // positions on a CPU, the whole batch (None) on an accelerator."""
    return max(1, PASS_ROWS // max(1, int(n_positions))) if torch.device(device).type == "cpu" else None


def attribute_batch(
    model: HookedTransformer,
    batch: FactBatch,
    method: Method = "eap-ig",
    steps: int = DEFAULT_IG_STEPS,
    metric: str | Metric = "answer-logprob",
    ig_grid: IGGrid = DEFAULT_IG_GRID,
    buffer_dtype: BufferDtype = "float32",
    pass_facts: int | None = None,
    seed: int = 0,
    ends: tuple[Tensor, Tensor] | None = None,
) -> Float[Tensor, "batch edge"]:
    """Scores [fact, edge] (float32) for one padded batch (see the module docstring for method and sign);
    `seed` sets the `shifted` grid's offset; `ends`: two [fact] tensors to fill with m_clean and m_corr.

    The facts are attributed `pass_facts` at a time (default `default_pass_facts`): each pass runs the
    corrupted, clean and IG forward and backward passes and the contraction of its facts, then frees them.
    """
    check_method(method)
    get_metric(metric)
    m = steps_taken(method, steps)
    grid = grid_taken(method, ig_grid)
    alphas: Sequence[float | Tensor]
    alphas, weights = ig_nodes(grid, m, seed)
    buf = buffer_torch_dtype(buffer_dtype)
    check_supported(model)
    graph = Graph.from_model(model)
    layers = layer_weights(model)
    relp = method == "relp"
    if relp and not model.cfg.attn_only and any(layer.mlp_t is None for layer in layers):
        raise CircuitdynError("RelP does not support MLPs with a layer-norm activation (SoLU); use eap or eap-ig")
    B, P = batch.clean.shape
    n = pass_facts or default_pass_facts(batch.clean.device, P) or B
    if n < 1:
        raise CircuitdynError(f"pass_facts must be >= 1, got {pass_facts}")
    out = torch.empty(B, graph.n_edges, device=batch.clean.device)
    for b0 in range(0, B, n):
        rows = batch.rows(b0, b0 + n)
        if grid == "shifted":  # one offset per fact: (k + u_f) / m as a [fact, 1, 1] tensor per step
            u = torch.tensor([grid_offset(seed, f.fact_id) for f in rows.facts], device=batch.clean.device)
            alphas = [((k + u) / m).view(-1, 1, 1) for k in range(m)]
        done = _attribute_pass(model, rows, graph, layers, metric, alphas, weights, buf, relp)
        out[b0 : b0 + n] = done.scores
        if ends is not None:
            ends[0][b0 : b0 + n], ends[1][b0 : b0 + n] = done.m_clean, done.m_corr
    return out


def _attribute_pass(
    model: HookedTransformer,
    batch: FactBatch,
    graph: Graph,
    layers: list[LayerWeights],
    metric: str | Metric,
    alphas: Sequence[float | Tensor],
    weights: list[float],
    buf: torch.dtype,
    relp: bool = False,
) -> Attribution:
    """`attribute_batch` for the facts of one pass; an alpha is a number, or one per fact ([fact, 1, 1]);
    `relp`: the gradient with RelP's rules."""
    m = len(alphas)
    # Relative weights: exactly 1.0 for the equal-weight rules, so the sums are what they always were.
    rel = [1.0] * m if len(set(weights)) == 1 else [w * m for w in weights]
    L = model.cfg.n_layers
    clean_in, corr_in = embed_inputs(model, batch)
    # Every run starts after the batch's shared prefix (where clean and corrupted runs agree, so every score's
    # activation difference is zero there), on the clean run's keys and values of it.
    start = shared_prefix(batch)
    past = past32 = None
    if start:
        past = clean_prefix(model, clean_in[:, :start], layers)
        past32 = (
            past
            if layers[0].W_qkv.dtype == torch.float32
            else clean_prefix(model, clean_in[:, :start], layers, torch.float32)
        )
        batch, clean_in, corr_in = batch.suffix(start), clean_in[:, start:], corr_in[:, start:]
    # A bf16/fp16 model's rounding differs between two runs by more than the small corrupted - clean
    # differences it would be subtracted from: those two runs compute in float32 (`run_capture`'s dtype).
    low = layers[0].W_qkv.dtype != torch.float32
    clean_step = None if low else next((k for k, a in enumerate(alphas) if isinstance(a, float) and a == 1.0), None)
    with torch.no_grad():
        m_corr, st = run_capture(model, corr_in, batch, metric, layers, torch.float32, past=past32)
        diffs = _SourceDiffs(st, corr_in - clean_in, buf)
        del st
        if clean_step is None:
            m_clean, st = run_capture(model, clean_in, batch, metric, layers, torch.float32, past=past32)
            diffs.subtract(st)
            del st
    acc = [_PortGrads(buf, constant_scale=relp) for _ in range(L)]
    B, P, D = clean_in.shape
    g_mlp = [torch.zeros(B, P, D, device=clean_in.device) for _ in range(0 if model.cfg.attn_only else L)]
    g_logits = torch.zeros(B, P, D, device=clean_in.device)
    for k, (alpha, u) in enumerate(zip(alphas, rel)):
        x0 = clean_in if isinstance(alpha, float) and alpha == 1.0 else corr_in + alpha * (clean_in - corr_in)
        with torch.enable_grad():
            values, st = run_capture(model, x0.detach().requires_grad_(), batch, metric, layers, relp=relp, past=past)
            # RelP's constant attention pattern leaves q and k out of the graph: their gradients are zeros.
            grads = list(
                torch.autograd.grad(
                    values.sum(),
                    st["q"] + st["k"] + st["v"] + st["mlp_in"] + st["final"],
                    allow_unused=relp,
                    materialize_grads=relp,
                )
            )
        if k == clean_step:
            m_clean = values.detach()
        del values
        with torch.no_grad():
            if k == clean_step:  # the clean run: its outputs complete the differences corrupted - clean
                diffs.subtract(st)
            for i, layer in enumerate(layers):  # each layer's gradients are folded in and released
                d = (grads[i], grads[L + i], grads[2 * L + i])
                qkv = (st["q"][i].detach(), st["k"][i].detach(), st["v"][i].detach())
                acc[i].add(layer, d, qkv, st["xhat"][i].detach(), st["scale"][i].detach(), u)
                grads[i] = grads[L + i] = grads[2 * L + i] = None  # type: ignore[call-overload]  # released
                for key in ("q", "k", "v", "xhat", "scale"):
                    st[key][i] = None  # type: ignore[call-overload]
            for i in range(len(g_mlp)):
                g_mlp[i].add_(grads[3 * L + i], alpha=u)
                grads[3 * L + i] = None  # type: ignore[call-overload]  # released
            g_logits.add_(grads[-1], alpha=u)
        del st, grads
    with torch.no_grad():
        for a in acc:
            a.finish()
        scores = _contract(graph, layers, diffs, acc, g_mlp, g_logits, batch.valid, m)
    return Attribution(scores, m_clean.float(), m_corr.float())


class _SourceDiffs:
    """corrupted - clean outputs of every source, compactly: the input's, and per layer z [B,P,H,dh] (a head's
    output is z @ W_O, expanded only in the contraction) and the MLP output [B,P,D]."""

    def __init__(self, corrupted: dict[str, list[Tensor]], d_input: Tensor, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.input = d_input.to(dtype)
        self.z = [t.float() for t in corrupted["z"]]
        self.mlp = [t.float() for t in corrupted["mlp_out"]]

    def subtract(self, clean: dict[str, list[Tensor]]) -> None:
        """Turn the corrupted run's outputs into differences with the clean run's (in float32, then stored)."""
        self.z = [(a - b.detach().float()).to(self.dtype) for a, b in zip(self.z, clean["z"])]
        self.mlp = [(a - b.detach().float()).to(self.dtype) for a, b in zip(self.mlp, clean["mlp_out"])]


class _PortGrads:
    """Weighted sum over IG steps of d metric / d(residual) for every head's q/k/v input of one layer.

    With `constant_scale` (RelP's LN rule) the scale is a constant of the backward pass: the VJP is the main
    term (dq Wf) / scale alone, no rank-one correction.

    The per-head residual gradient is the ln1 vector-Jacobian product of W^T dq: with Wf (ln weight folded
    in, centred for LN), g = (dq Wf - x_hat * <dq, q - offset> / D) / scale, where <dq, q - offset> =
    <dq Wf, x_hat> comes for free from the forward's q. The first term is linear in dq/scale, so it is
    summed in d_head space (`d`, [B,P,3H,dh]); the second is a rank-one outer product per position and step,
    kept as its x_hat [B,P,D] and coefficients [B,P,3H] (or, beyond `flush` steps, where that gets bigger
    than the product itself, summed into `outer` [B,P,3H,D]). Both are expanded to d_model only in the
    contraction, a chunk of positions at a time.
    """

    def __init__(self, dtype: torch.dtype, constant_scale: bool = False) -> None:
        self.dtype = dtype
        self.constant_scale = constant_scale
        self.d: Tensor | None = None
        self.outer: Tensor | None = None
        self.xs: list[Tensor] = []
        self.cs: list[Tensor] = []
        self.x_all: Tensor | None = None
        self.c_all: Tensor | None = None

    def add(
        self,
        layer: LayerWeights,
        d: tuple[Tensor, ...],
        qkv: tuple[Tensor, ...],
        xhat: Tensor,
        scale: Tensor,
        weight: float = 1.0,
    ) -> None:
        """One step's gradients wrt q, k, v [B,P,H,dh] (pre-rotary; k/v per query head), the forward's q/k/v,
        ln1's x_hat and scale, and the step's quadrature weight."""
        inv = weight / scale[..., None].float()  # [B,P,1,1]
        ds = torch.stack([g.float() * inv for g in d], dim=3)  # [B,P,H,3,dh]
        B, P, H = ds.shape[:3]
        if layer.ln_kind != "none" and not self.constant_scale:
            c = (ds * (torch.stack(qkv, dim=3).float() - layer.offset3.float())).sum(-1)  # [B,P,H,3]
            self.xs.append(xhat.to(self.dtype))
            self.cs.append(c.reshape(B, P, 3 * H) / xhat.shape[-1])
            if len(self.xs) >= max(1, 3 * H * xhat.shape[-1] // (xhat.shape[-1] + 3 * H)):
                self._flush()
        ds = ds.reshape(B, P, 3 * H, -1)
        self.d = ds if self.d is None else self.d.add_(ds)

    def _flush(self) -> None:
        xs = torch.stack(self.xs, dim=2).float()  # [B,P,S,D]
        cs = torch.stack(self.cs, dim=3)  # [B,P,3H,S]
        B, P, S, D = xs.shape
        part = torch.bmm(cs.reshape(B * P, -1, S), xs.reshape(B * P, S, D)).reshape(B, P, -1, D)
        self.outer = part if self.outer is None else self.outer.add_(part)
        self.xs, self.cs = [], []

    def finish(self) -> None:
        """Stack the steps' rank-one terms for the contraction (and release the per-step lists)."""
        if self.xs:
            self.x_all = torch.stack(self.xs, dim=2)  # [B,P,S,D]
            self.xs = []
            self.c_all = torch.stack(self.cs, dim=3)  # [B,P,3H,S]
            self.cs = []

    def expand(self, Wf: Tensor, b: int, p0: int, p1: int, out: Tensor) -> None:
        """Fact b's summed gradients at positions p0:p1 into `out` [3H, p1-p0, D] (head-major, q/k/v)."""
        assert self.d is not None
        torch.bmm(self.d[b, p0:p1].transpose(0, 1), Wf, out=out)
        if self.x_all is not None and self.c_all is not None:
            out -= torch.bmm(self.c_all[b, p0:p1], self.x_all[b, p0:p1].float()).transpose(0, 1)
        if self.outer is not None:
            out -= self.outer[b, p0:p1].transpose(0, 1)


CONTRACT_K = 8192
"""Elements of one position chunk (positions x d_model) in the contraction's matrix products."""
CONTRACT_COLUMNS = 128
"""Destination columns per matrix product at least (layers are grouped to reach it)."""


def _contract(
    graph: Graph,
    layers: list[LayerWeights],
    diffs: _SourceDiffs,
    acc: list[_PortGrads],
    g_mlp: list[Tensor],
    g_logits: Tensor,
    valid: Tensor,
    m: int,
) -> Float[Tensor, "batch edge"]:
    """scores[b, src, dst] = sum_p delta[b, src, p] . g_dst[b, p] / m, for valid (src upstream of dst) only.

    Fact by fact, over chunks of its real (unpadded) positions: the chunk's source outputs [S, K] and, per
    group of layers, its destinations' gradients [cols, K] are expanded and multiplied once; a group's product
    covers the sources its last destination reads (the few pairs outside `graph.valid` are dropped).
    """
    L, H, D = graph.n_layers, graph.n_heads, g_logits.shape[-1]
    per_src, per_dst = H + int(graph.has_mlp), 3 * H + int(graph.has_mlp)
    S, n_dst = len(graph.sources), len(graph.destinations)
    B = g_logits.shape[0]
    device = g_logits.device
    W_O = [layer.W_O.float() for layer in layers]
    Wf = [layer.Wf.float().reshape(3 * H, -1, D) for layer in layers]
    span = max(1, -(-CONTRACT_COLUMNS // per_dst))
    groups = [(a, min(L, a + span)) for a in range(0, L, span)]
    dense = torch.zeros(B, S, n_dst, device=device)
    pc = max(1, CONTRACT_K // D)
    lengths = valid.sum(1).tolist()
    for b in range(B):
        for p0 in range(0, int(lengths[b]), pc):
            p1 = min(int(lengths[b]), p0 + pc)
            n = p1 - p0
            src = torch.empty(S, n, D, device=device)
            src[0] = diffs.input[b, p0:p1]
            for j in range(L):
                base = 1 + j * per_src
                torch.bmm(diffs.z[j][b, p0:p1].transpose(0, 1).float(), W_O[j], out=src[base : base + H])
                if graph.has_mlp:
                    src[base + H] = diffs.mlp[j][b, p0:p1]
            src = src.reshape(S, n * D)
            for a, e in groups:
                last = e == L
                cols = (e - a) * per_dst + int(last)
                dst = torch.empty(cols, n, D, device=device)
                for i in range(a, e):
                    c = (i - a) * per_dst
                    acc[i].expand(Wf[i], b, p0, p1, dst[c : c + 3 * H])
                    if graph.has_mlp:
                        dst[c + 3 * H] = g_mlp[i][b, p0:p1]
                if last:
                    dst[-1] = g_logits[b, p0:p1]
                n_src = S if last else 1 + (e - 1) * per_src + (H if graph.has_mlp else 0)
                c0 = a * per_dst
                dense[b, :n_src, c0 : c0 + cols].addmm_(src[:n_src], dst.reshape(cols, n * D).T)
    return dense[:, graph.valid.to(device)] / m


def attribute(
    model: HookedTransformer,
    facts: Sequence[FactPrompt],
    settings: AttributionSettings | None = None,
    compute: Compute | None = None,
    *,
    progress: bool = False,
) -> Float[Tensor, "fact edge"]:
    """Per-fact edge scores [len(facts), n_edges]: `attribute_with_ends(...).scores`."""
    return attribute_with_ends(model, facts, settings, compute, progress=progress).scores


def attribute_with_ends(
    model: HookedTransformer,
    facts: Sequence[FactPrompt],
    settings: AttributionSettings | None = None,
    compute: Compute | None = None,
    *,
    progress: bool = False,
) -> Attribution:
    """Per-fact edge scores [len(facts), n_edges] (float32, on the CPU) in `Graph.from_model(model).edges` order,
    attributed with `settings` (default `DEFAULT_SETTINGS`).

    Facts are batched (`compute.batch_size`; sorted by length to limit padding); a fact's scores do not depend
    on its batch. With `compute.max_memory` (bytes or e.g. "8GiB", weights included), the facts per pass are
    chosen from the budget (`circuitdyn.engine.memory.fact_batch_for_memory`; also the batch when `batch_size` is
    None); a batch that runs out of memory anyway is halved and retried (said once on stderr).
    `compute.num_threads`: CPU threads (default: torch's setting, one per physical core unless changed;
    `circuitdyn.engine.memory.torch_threads`).
    """
    from circuitdyn.engine.memory import OOMBackoff, fact_batch_for_memory, parse_memory, torch_threads
    from circuitdyn.progress import progress_bar

    s = settings or DEFAULT_SETTINGS
    c = compute or Compute()
    if not facts:
        raise CircuitdynError("no facts given to attribute")
    order = by_length(facts)
    fit = None
    if c.max_memory is not None:
        longest = max(len(f.clean_tokens) + len(f.answer_tokens) - 1 for f in facts)
        fit = fact_batch_for_memory(model, longest, c.buffer_dtype, parse_memory(c.max_memory), s.steps)
    size = c.batch_size if c.batch_size is not None else fit
    if size is None or size < 1:
        raise CircuitdynError(f"batch_size must be >= 1 (or None with max_memory), got {c.batch_size}")
    out: list[Tensor | None] = [None] * len(facts)
    m_clean, m_corr = torch.empty(len(facts), device="cpu"), torch.empty(len(facts), device="cpu")
    backoff = OOMBackoff(size)
    with (
        torch_threads(c.num_threads),
        progress_bar(total=len(facts), desc=f"{s.method} attribution", unit="fact", disable=not progress) as bar,
    ):
        start = 0
        while start < len(order):
            chunk = order[start : start + backoff.size]
            batch = make_batch(model, [facts[i] for i in chunk], s.seed, s.noise_scale, s.metric)
            per_pass = None if fit is None and not backoff.halvings else min(fit or backoff.size, backoff.size)
            ends = (
                torch.empty(len(chunk), device=batch.clean.device),
                torch.empty(len(chunk), device=batch.clean.device),
            )
            scores = backoff.run(
                partial(
                    attribute_batch,
                    model,
                    batch,
                    s.method,
                    s.steps,
                    s.metric,
                    s.ig_grid,
                    c.buffer_dtype,
                    per_pass,
                    s.seed,
                    ends,
                )
            )
            if scores is None:
                continue  # out of memory: the batch was halved, retry
            for j, i in enumerate(chunk):
                out[i] = scores[j].cpu()
            m_clean[chunk], m_corr[chunk] = ends[0].cpu(), ends[1].cpu()
            start += len(chunk)
            bar.update(len(chunk))
    return Attribution(torch.stack(out), m_clean, m_corr)  # type: ignore[arg-type]

"""Edge attribution for per-fact knowledge circuits: EAP, EAP-IG (inputs) and exact edge patching.

Sign convention: score(e) estimates m(clean run with edge e patched to its corrupted value) - m(clean),
where m is the per-fact metric (teacher-forced answer log-prob by default). EAP scores
(a_src(corrupted) - a_src(clean)) . dm/d(input of dst), summed over positions; EAP-IG averages that
gradient over m inputs interpolated from corrupted to clean embeddings, alpha = k/m for k = 1..m (the
right Riemann sum of the EAP-IG code's earlier `range(1, steps + 1)` loop; later versions of hannamw/EAP-IG
use k = 0..m-1, which includes the corrupted end instead of the clean one). With m = 1, EAP-IG is EAP.

Why it is fast: instead of TransformerLens' split-input hooks (a [batch, pos, head, d_model] copy of the
residual per q/k/v input and per head output in the forward pass), we run our own functional forward
over the HookedTransformer's weights, take autograd gradients only with respect to small tensors
(per-head q/k/v after projection, each MLP's input, the final residual), and map the q/k/v gradients back
to per-head residual gradients through the layer-norm vector-Jacobian product, which is linear in the
upstream gradient: its main term is summed over IG steps in d_head space and expanded once, its rank-one
correction is buffered (`_PortGrads`). Key/value heads of GQA models are expanded to the query heads
before attention, so autograd hands us one gradient per query head ("ungrouped" at no extra cost). The
clean run's activations come from the alpha = 1 step, and the score contraction with the activation
differences happens once at the end.

Facts in a batch do not interact, so the gradient of the summed metric yields per-fact gradients and the
scores are [fact, edge]. Prompts are right-padded: with causal attention, real tokens never see pads and
pads get zero gradient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuitdyn.circuits import CircuitSet
from circuitdyn.errors import CircuitdynError
from circuitdyn.graph import Graph
from circuitdyn.probes import FactPrompt

METHODS = ("eap", "eap-ig")
METRICS = ("logprob", "logit-diff", "prob")
NOISE_SCALE = 3.0
"""Noise corruption: Gaussian noise with std = NOISE_SCALE x std(W_E) added to the input embeddings."""


# --- model support --------------------------------------------------------------------------------
def check_supported(model: Any) -> None:
    """Raise CircuitdynError for architecture features the functional forward does not implement."""
    cfg = model.cfg
    problems = []
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre", None):
        problems.append(f"normalization_type={cfg.normalization_type!r}")
    for flag in ("parallel_attn_mlp", "use_local_attn", "use_qk_norm", "use_normalization_before_and_after",
                 "post_embedding_ln", "use_attention_sinks", "use_logn_attn", "use_dynamic_ntk_rope",
                 "load_in_4bit"):
        if getattr(cfg, flag, False):
            problems.append(f"{flag}=True")
    for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if (getattr(cfg, cap, -1.0) or -1.0) > 0:
            problems.append(f"{cap}={getattr(cfg, cap)}")
    if getattr(cfg, "num_experts", None):
        problems.append(f"num_experts={cfg.num_experts}")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append(f"clip_qkv={cfg.clip_qkv}")
    if cfg.attention_dir != "causal":
        problems.append(f"attention_dir={cfg.attention_dir!r}")
    if cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "BertForMaskedLM"):
        problems.append(f"original_architecture={cfg.original_architecture!r}")
    if getattr(cfg, "attn_types", None) and any(t != "global" for t in cfg.attn_types):
        problems.append("local attention layers (attn_types)")
    if cfg.dtype != torch.float32:
        problems.append(f"dtype={cfg.dtype} (load the model in float32)")
    if problems:
        raise CircuitdynError(
            f"model {cfg.model_name!r} uses features the attribution engine does not support: {', '.join(problems)}"
        )


@dataclass
class _Layer:
    """Per-block weights (detached from autograd) in the shapes the functional forward uses."""

    W_qkv: Tensor  # [d_model, (H + 2 Hkv) d_head]
    b_qkv: Tensor  # [(H + 2 Hkv) d_head]
    W3: Tensor  # [H, 3, d_head, d_model]: W_Q, and W_K / W_V expanded to query heads (transposed)
    b3: Tensor  # [H, 3, d_head]
    W_O: Tensor  # [H, d_head, d_model]
    b_O: Tensor  # [d_model]
    ln_kind: str  # "LN" | "RMS" | "none"
    ln_w: Tensor | None
    ln_b: Tensor | None
    ln_eps: float
    Wf: Tensor  # W3 with ln1's weight folded in (and centred over d_model for LN): maps d q/k/v to d x_hat
    offset3: Tensor  # [H, 3, d_head]: b3 + ln1's bias projected, so (q/k/v - offset3) = Wf x_hat
    mlp_t: tuple[Tensor, ...] | None  # gated MLP (W_gate^T, W_in^T, W_out^T) contiguous, else None


def _ln_kind(module: Any) -> str:
    name = type(module).__name__
    if name in ("LayerNorm", "LayerNormPre"):
        return "LN"
    if name in ("RMSNorm", "RMSNormPre"):
        return "RMS"
    return "none"


def _layers(model: Any) -> list[_Layer]:
    cfg = model.cfg
    H, D = cfg.n_heads, cfg.d_model
    out = []
    for block in model.blocks:
        attn = block.attn
        if hasattr(attn, "_W_K"):
            W_K, W_V, b_K, b_V = attn._W_K, attn._W_V, attn._b_K, attn._b_V
        else:
            W_K, W_V, b_K, b_V = attn.W_K, attn.W_V, attn.b_K, attn.b_V
        rep = H // W_K.shape[0]
        W_qkv = torch.cat([w.permute(1, 0, 2).reshape(D, -1) for w in (attn.W_Q, W_K, W_V)], dim=1)
        b_qkv = torch.cat([attn.b_Q.reshape(-1), b_K.reshape(-1), b_V.reshape(-1)])
        W3 = torch.stack([attn.W_Q, W_K.repeat_interleave(rep, 0), W_V.repeat_interleave(rep, 0)], dim=1)
        W3 = W3.permute(0, 1, 3, 2).contiguous()  # [H, 3, d_head, d_model]
        b3 = torch.stack([attn.b_Q, b_K.repeat_interleave(rep, 0), b_V.repeat_interleave(rep, 0)], dim=1)
        ln = block.ln1
        kind, w, b = _ln_kind(ln), getattr(ln, "w", None), getattr(ln, "b", None)
        w = None if w is None else w.detach()
        b = None if b is None else b.detach()
        W3, b3 = W3.detach(), b3.detach()
        Wf = W3 if w is None else W3 * w
        if kind == "LN":
            Wf = Wf - Wf.mean(-1, keepdim=True)
        offset3 = b3 if b is None else b3 + W3 @ b
        mlp = getattr(block, "mlp", None)
        mlp_t = None
        if type(mlp).__name__ == "GatedMLP" and not cfg.is_layer_norm_activation():
            mlp_t = tuple(t.detach().T.contiguous() for t in (mlp.W_gate, mlp.W_in, mlp.W_out))
        out.append(_Layer(W_qkv.detach(), b_qkv.detach(), W3, b3, attn.W_O.detach(), attn.b_O.detach(), kind,
                          w, b, float(getattr(ln, "eps", cfg.eps)), Wf.contiguous(), offset3, mlp_t))
    return out


def _norm(layer: _Layer, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ln1 as TransformerLens computes it; returns (output, x_hat, scale) for the vector-Jacobian product."""
    if layer.ln_kind == "none":
        return x, x, torch.ones_like(x[..., :1])
    if layer.ln_kind == "LN":
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + layer.ln_eps).sqrt()
    xhat = x / scale
    out = xhat if layer.ln_w is None else xhat * layer.ln_w
    if layer.ln_b is not None:
        out = out + layer.ln_b
    return out, xhat, scale


# --- inputs ---------------------------------------------------------------------------------------
@dataclass
class FactBatch:
    """Facts as padded tensors: inputs `clean + answer[:-1]` (the last answer token is never read)."""

    facts: list[FactPrompt]
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    valid: Bool[Tensor, "batch pos"]
    target_pos: Int[Tensor, "batch answer"]  # position whose prediction is scored (0 where padded)
    target_tok: Int[Tensor, "batch answer"]
    target_mask: Bool[Tensor, "batch answer"]
    contrast: Int[Tensor, "batch"]
    noise: Float[Tensor, "batch pos d_model"] | None


def fact_seed(seed: int, fact_id: str) -> int:
    """A per-fact RNG seed, so a fact's noise does not depend on which batch it is in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{fact_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def make_batch(model: Any, facts: Sequence[FactPrompt], seed: int = 0, noise_scale: float = NOISE_SCALE,
               metric: str = "logprob") -> FactBatch:
    """Validate and pad facts into a `FactBatch` (noise drawn per fact from `fact_seed`)."""
    if not facts:
        raise CircuitdynError("no facts given to attribute")
    cfg = model.cfg
    seqs, corrs = [], []
    for f in facts:
        where = f"fact {f.fact_id!r}"
        if not f.clean_tokens or not f.answer_tokens:
            raise CircuitdynError(f"{where}: clean_tokens and answer_tokens must be non-empty")
        if len(f.corrupted_tokens) != len(f.clean_tokens):
            raise CircuitdynError(
                f"{where}: corrupted prompt has {len(f.corrupted_tokens)} tokens, clean has {len(f.clean_tokens)}; "
                "they must align position by position"
            )
        bad = [p for p in f.noise_positions if not 0 <= p < len(f.clean_tokens)]
        if bad:
            raise CircuitdynError(f"{where}: noise_positions {bad} outside the prompt (length {len(f.clean_tokens)})")
        if metric == "logit-diff" and f.contrast_token is None:
            raise CircuitdynError(f"{where}: metric 'logit-diff' needs a contrast_token")
        toks = [*f.clean_tokens, *f.corrupted_tokens, *f.answer_tokens]
        if f.contrast_token is not None:
            toks.append(f.contrast_token)
        if max(toks) >= cfg.d_vocab or min(toks) < 0:
            raise CircuitdynError(f"{where}: token id {max(toks)} outside the model's vocabulary ({cfg.d_vocab})")
        seqs.append([*f.clean_tokens, *f.answer_tokens[:-1]])
        corrs.append([*f.corrupted_tokens, *f.answer_tokens[:-1]])
    B, P, T = len(facts), max(map(len, seqs)), max(len(f.answer_tokens) for f in facts)
    if P > cfg.n_ctx:
        raise CircuitdynError(f"a fact needs {P} positions, more than the model's context {cfg.n_ctx}")
    clean = torch.zeros(B, P, dtype=torch.long)
    corrupted = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    target_pos = torch.zeros(B, T, dtype=torch.long)
    target_tok = torch.zeros(B, T, dtype=torch.long)
    target_mask = torch.zeros(B, T, dtype=torch.bool)
    contrast = torch.zeros(B, dtype=torch.long)
    noise = None
    for b, f in enumerate(facts):
        n = len(seqs[b])
        clean[b, :n] = torch.tensor(seqs[b])
        corrupted[b, :n] = torch.tensor(corrs[b])
        valid[b, :n] = True
        a = len(f.answer_tokens)
        target_pos[b, :a] = torch.arange(len(f.clean_tokens) - 1, len(f.clean_tokens) - 1 + a)
        target_tok[b, :a] = torch.tensor(f.answer_tokens)
        target_mask[b, :a] = True
        contrast[b] = f.contrast_token if f.contrast_token is not None else 0
        if f.noise_positions:
            if noise is None:
                noise = torch.zeros(B, P, cfg.d_model)
                std = noise_scale * float(model.W_E.detach().float().std())
            gen = torch.Generator().manual_seed(fact_seed(seed, f.fact_id))
            pos = torch.tensor(sorted(set(f.noise_positions)))
            noise[b, pos] = torch.randn(len(pos), cfg.d_model, generator=gen) * std
    return FactBatch(list(facts), clean, corrupted, valid, target_pos, target_tok, target_mask, contrast, noise)


def embed_inputs(model: Any, batch: FactBatch) -> tuple[Tensor, Tensor]:
    """The `input` node's output for the clean and the corrupted run (token + positional embeddings, + noise)."""
    with torch.no_grad():
        out = []
        for toks in (batch.clean, batch.corrupted):
            x = model.embed(toks)
            if model.cfg.positional_embedding_type == "standard":
                x = x + model.pos_embed(toks)
            out.append(x)
        if batch.noise is not None:
            out[1] = out[1] + batch.noise.to(out[1].dtype)
    return out[0], out[1]


def _metric(model: Any, resid: Tensor, batch: FactBatch, metric: str) -> Float[Tensor, "batch"]:
    """Per-fact metric from the final residual, unembedding only the scored positions."""
    b_idx = torch.arange(resid.shape[0])[:, None]
    rows = resid[b_idx, batch.target_pos]  # [B, T, D]
    logits = model.unembed(model.ln_final(rows) if hasattr(model, "ln_final") else rows)
    if metric == "logit-diff":
        first = logits[:, 0]
        ar = torch.arange(first.shape[0])
        return first[ar, batch.target_tok[:, 0]] - first[ar, batch.contrast]
    logp = logits.float().log_softmax(-1).gather(-1, batch.target_tok[..., None])[..., 0]
    total = (logp * batch.target_mask).sum(-1)
    return total.exp() if metric == "prob" else total


# --- the functional forward -----------------------------------------------------------------------
def _rotary(attn: Any, x: Tensor) -> Tensor:
    """TransformerLens' rotary embedding (same tables, bit-identical result), cheaper to differentiate:
    the half-rotation [-x2, x1] is a roll of x with the sign folded into the sine table."""
    cfg, P = attn.cfg, x.shape[1]
    if cfg.rotary_adjacent_pairs or P > attn.rotary_cos.shape[0]:
        return attn.apply_rotary(x)
    rd = cfg.rotary_dim
    half = rd // 2
    sign = torch.cat([-torch.ones(half, dtype=x.dtype), torch.ones(rd - half, dtype=x.dtype)])
    cos = attn.rotary_cos[None, :P, None, :]
    sin = (attn.rotary_sin[:P] * sign)[None, :, None, :]
    if rd == x.shape[-1]:
        return x * cos + x.roll(half, dims=-1) * sin
    x_rot = x[..., :rd]
    return torch.cat([x_rot * cos + x_rot.roll(half, dims=-1) * sin, x[..., rd:]], dim=-1)


def _attend(model: Any, block: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention on [B, P, H, d_head] q/k/v (k/v already per query head); returns z [B, P, H, d_head]."""
    if model.cfg.positional_embedding_type == "rotary":
        q = _rotary(block.attn, q)
        k = _rotary(block.attn, k)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=1.0 / block.attn.attn_scale
    )
    return z.transpose(1, 2)


def _mlp(block: Any, layer: _Layer, x: Tensor) -> Tensor:
    """block.mlp(block.ln2(x)), with a gated MLP's transposed weights prepared once (TL copies them per call)."""
    n = block.ln2(x)
    if layer.mlp_t is None:
        return block.mlp(n)
    mlp = block.mlp
    W_gate_t, W_in_t, W_out_t = layer.mlp_t
    post = mlp.act_fn(F.linear(n, W_gate_t)) * F.linear(n, W_in_t) + mlp.b_in
    return F.linear(post, W_out_t, mlp.b_out)


def _qkv(layer: _Layer, cfg: Any, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Project a normalized residual to q [B,P,H,dh] and k, v expanded to the query heads."""
    B, P, _ = n.shape
    H, dh = cfg.n_heads, cfg.d_head
    Hkv = (layer.W_qkv.shape[1] // dh - H) // 2
    qkv = n @ layer.W_qkv + layer.b_qkv
    q, k, v = qkv.split([H * dh, Hkv * dh, Hkv * dh], dim=-1)
    rep = H // Hkv
    k = k.reshape(B, P, Hkv, dh).repeat_interleave(rep, 2)
    v = v.reshape(B, P, Hkv, dh).repeat_interleave(rep, 2)
    return q.reshape(B, P, H, dh), k, v


def run_capture(model: Any, x0: Tensor, batch: FactBatch, metric: str, layers: list[_Layer] | None = None
                ) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Forward from the `input` node, keeping what attribution needs; no grad taken here.

    Returns the per-fact metric and, per layer, z [B,P,H,dh] and the MLP output [B,P,D], plus (when grad is
    enabled) the tensors to differentiate: q/k/v (pre-rotary), ln1 state, MLP inputs, final residual.
    """
    cfg = model.cfg
    layers = layers or _layers(model)
    store: dict[str, list[Tensor]] = {k: [] for k in ("q", "k", "v", "xhat", "scale", "z", "mlp_in", "mlp_out")}
    x = x0
    for block, layer in zip(model.blocks, layers):
        n, xhat, scale = _norm(layer, x)
        q, k, v = _qkv(layer, cfg, n)
        z = _attend(model, block, q, k, v)
        for key, val in (("q", q), ("k", k), ("v", v), ("xhat", xhat), ("scale", scale), ("z", z)):
            store[key].append(val)
        x = x + z.flatten(2) @ layer.W_O.flatten(0, 1) + layer.b_O
        if not cfg.attn_only:
            mlp_in = x.clone()
            m = _mlp(block, layer, mlp_in)
            store["mlp_in"].append(mlp_in)
            store["mlp_out"].append(m)
            x = x + m
    store["final"] = [x]
    return _metric(model, x, batch, metric), store


def _sources(model: Any, x0: Tensor, store: dict[str, list[Tensor]], layers: list[_Layer]
             ) -> Float[Tensor, "batch src pos d_model"]:
    """Every source node's output, in `Graph.sources` order."""
    B, P, D = x0.shape
    parts = [x0[:, None]]
    for i, layer in enumerate(layers):
        heads = torch.einsum("bphe,hed->bhpd", store["z"][i], layer.W_O)
        parts.append(heads)
        if store["mlp_out"]:
            parts.append(store["mlp_out"][i][:, None])
    return torch.cat(parts, dim=1)


# --- attribution ----------------------------------------------------------------------------------
def steps_taken(method: str | None, steps: int) -> int:
    """The interpolation steps a method really takes (and records as `ig_steps`): EAP is one gradient."""
    return 1 if method == "eap" else int(steps)


def attribute_batch(model: Any, batch: FactBatch, method: str = "eap-ig", steps: int = 5,
                    metric: str = "logprob") -> Float[Tensor, "batch edge"]:
    """Scores [fact, edge] for one padded batch (see the module docstring for method and sign)."""
    if method not in METHODS:
        raise CircuitdynError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if metric not in METRICS:
        raise CircuitdynError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    m = steps_taken(method, steps)
    if m < 1:
        raise CircuitdynError(f"IG steps must be >= 1, got {steps}")
    check_supported(model)
    cfg = model.cfg
    graph = Graph.from_model(model)
    layers = _layers(model)
    clean_in, corr_in = embed_inputs(model, batch)
    with torch.no_grad():
        _, st_corr = run_capture(model, corr_in, batch, metric, layers)
        delta = _sources(model, corr_in, st_corr, layers)
        del st_corr
    B, P, D = clean_in.shape
    L = cfg.n_layers
    acc = [_PortGrads() for _ in range(L)]
    g_mlp = [torch.zeros(B, P, D) for _ in range(0 if cfg.attn_only else L)]
    g_logits = torch.zeros(B, P, D)
    for k in range(1, m + 1):
        alpha = k / m
        x0 = clean_in if k == m else corr_in + alpha * (clean_in - corr_in)
        with torch.enable_grad():
            values, st = run_capture(model, x0.detach().requires_grad_(), batch, metric, layers)
            wrt = st["q"] + st["k"] + st["v"] + st["mlp_in"] + st["final"]
            grads = torch.autograd.grad(values.sum(), wrt)
        with torch.no_grad():
            if k == m:  # alpha = 1 is the clean run: its node outputs complete delta = corrupted - clean
                clean = {key: [t.detach() for t in st[key]] for key in ("z", "mlp_out")}
                delta.sub_(_sources(model, clean_in, clean, layers))
            for i, layer in enumerate(layers):
                d = (grads[i], grads[L + i], grads[2 * L + i])
                qkv = (st["q"][i].detach(), st["k"][i].detach(), st["v"][i].detach())
                acc[i].add(layer, d, qkv, st["xhat"][i].detach(), st["scale"][i].detach())
            for i in range(len(g_mlp)):
                g_mlp[i] += grads[3 * L + i]
            g_logits += grads[-1]
        del st, grads, wrt, values
    with torch.no_grad():
        return _contract(graph, layers, delta, acc, g_mlp, g_logits, batch.valid, m)


class _PortGrads:
    """Running sum over IG steps of d metric / d(residual) for every head's q/k/v input of one layer.

    The per-head residual gradient is the ln1 vector-Jacobian product of W^T dq: with Wf (ln weight folded
    in, centred for LN), g = (dq Wf - x_hat * <dq, q - offset> / D) / scale, where <dq, q - offset> =
    <dq Wf, x_hat> comes for free from the forward's q. The first term is linear in dq/scale, so it is
    summed in d_head space and expanded once; the second is a rank-one outer product per position,
    buffered and folded in with one batched matmul every few steps. Nothing [B, P, H, 3, d_model]-sized
    is touched per step.
    """

    FLUSH = 8

    def __init__(self) -> None:
        self.d: list[Tensor] = []
        self.outer: Tensor | None = None
        self.pending: list[tuple[Tensor, Tensor]] = []

    def add(self, layer: _Layer, d: tuple[Tensor, ...], qkv: tuple[Tensor, ...], xhat: Tensor, scale: Tensor) -> None:
        """One step's gradients wrt q, k, v [B,P,H,dh] (pre-rotary; k/v per query head) and the forward's q/k/v."""
        inv = 1.0 / scale[..., None]  # [B,P,1,1]
        ds = [g * inv for g in d]
        self.d = ds if not self.d else [a.add_(b) for a, b in zip(self.d, ds)]
        if layer.ln_kind != "none":
            c = torch.stack([(g * (x - layer.offset3[:, j])).sum(-1) for j, (g, x) in enumerate(zip(ds, qkv))], 3)
            self.pending.append((xhat, c / xhat.shape[-1]))  # c: [B,P,H,3]
            if len(self.pending) >= self.FLUSH:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        xs = torch.stack([x for x, _ in self.pending], dim=2)  # [B,P,S,D]
        cs = torch.stack([c.flatten(2) for _, c in self.pending], dim=3)  # [B,P,H*3,S]
        B, P, S, D = xs.shape
        part = torch.bmm(cs.reshape(B * P, -1, S), xs.reshape(B * P, S, D))
        self.outer = part if self.outer is None else self.outer.add_(part)
        self.pending = []

    def total(self, layer: _Layer) -> Float[Tensor, "batch head3 pos d_model"]:
        """The summed gradients as [B, H*3 (head-major, q/k/v), P, D]."""
        self._flush()
        d3 = torch.stack(self.d, dim=3)  # [B,P,H,3,dh]
        B, P, H, _, _ = d3.shape
        g = torch.einsum("bphce,hced->bhcpd", d3, layer.Wf).reshape(B, H * 3, P, -1)
        if self.outer is not None:
            g -= self.outer.reshape(B, P, H * 3, -1).transpose(1, 2)
        return g


def _contract(graph: Graph, layers: list[_Layer], delta: Tensor, acc: list[_PortGrads], g_mlp: list[Tensor],
              g_logits: Tensor, valid: Tensor, m: int) -> Float[Tensor, "batch edge"]:
    """scores[b, src, dst] = sum_p delta[b, src, p] . g_dst[b, p] / m, for valid (src upstream of dst) only."""
    B, S, P, D = delta.shape
    keep = valid.to(delta.dtype)[:, :, None]
    flat = (delta * keep[:, None]).reshape(B, S, P * D)
    per_layer = graph.n_heads + int(graph.has_mlp)
    dense = torch.zeros(B, S, len(graph.destinations))
    col = 0
    for i, layer in enumerate(layers):
        n_src = 1 + i * per_layer
        gd = acc[i].total(layer).reshape(B, -1, P * D)  # [B, H*3, P*D] head-major, then q/k/v
        dense[:, :n_src, col:col + gd.shape[1]] = torch.bmm(flat[:, :n_src], gd.transpose(1, 2))
        col += gd.shape[1]
        if graph.has_mlp:
            n_src = 1 + i * per_layer + graph.n_heads
            dense[:, :n_src, col] = torch.bmm(flat[:, :n_src], g_mlp[i].reshape(B, P * D, 1))[..., 0]
            col += 1
    dense[:, :, col] = torch.bmm(flat, g_logits.reshape(B, P * D, 1))[..., 0]
    return dense[:, graph.valid] / m


def attribute(model: Any, facts: Sequence[FactPrompt], method: str = "eap-ig", steps: int = 5,
              metric: str = "logprob", seed: int = 0, batch_size: int = 8, noise_scale: float = NOISE_SCALE,
              progress: bool = False) -> Float[Tensor, "fact edge"]:
    """Per-fact edge scores [len(facts), n_edges] in `Graph.from_model(model).edges` order.

    Facts are batched `batch_size` at a time (sorted by length to limit padding); a fact's scores do not
    depend on its batch.
    """
    from tqdm.auto import tqdm

    if not facts:
        raise CircuitdynError("no facts given to attribute")
    order = sorted(range(len(facts)), key=lambda i: len(facts[i].clean_tokens) + len(facts[i].answer_tokens))
    out: list[Tensor | None] = [None] * len(facts)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc=f"{method} attribution", unit="batch", disable=not progress):
        batch = make_batch(model, [facts[i] for i in chunk], seed, noise_scale, metric)
        scores = attribute_batch(model, batch, method, steps, metric)
        for j, i in enumerate(chunk):
            out[i] = scores[j]
    return torch.stack(out)  # type: ignore[arg-type]


def facts_hash(facts: Sequence[FactPrompt]) -> str:
    """A content hash of the attribution inputs (ids, tokens, corruptions), stored as `probe_set_hash`."""
    blob = json.dumps([dataclasses.asdict(f) for f in facts], sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def extract_circuits(model: Any, facts: Sequence[FactPrompt], method: str = "eap-ig", steps: int = 5,
                     metric: str = "logprob", seed: int = 0, batch_size: int = 8, noise_scale: float = NOISE_SCALE,
                     meta: dict[str, Any] | None = None, progress: bool = False) -> CircuitSet:
    """Attribute every fact and wrap the scores with their provenance in a `CircuitSet`.

    `meta` adds checkpoint provenance (checkpoint_hash, step, epoch, model...); the settings
    (method, ig_steps, metric, seed, noise_scale, corruption per fact, probe_set_hash, architecture)
    are filled in here.
    """
    scores = attribute(model, facts, method, steps, metric, seed, batch_size, noise_scale, progress)
    cfg = model.cfg
    info: dict[str, Any] = {
        "model": cfg.model_name,
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads,
        "d_model": cfg.d_model,
        "method": method,
        "ig_steps": steps_taken(method, steps),
        "metric": metric,
        "seed": seed,
        "noise_scale": noise_scale,
        "corruption": [f.corruption for f in facts],
        "probe_set_hash": facts_hash(facts),
        "sign": "score(e) ~ m(clean with e patched to corrupted) - m(clean)",
    }
    info.update(meta or {})
    return CircuitSet(scores, Graph.from_model(model).edges, [f.fact_id for f in facts], info)


@dataclass
class Extracted:
    """One epoch's result of `extract_run`: the circuit file and the faithfulness printed for it."""

    epoch: int
    path: Path
    skipped: bool
    fact_ids: list[str]
    faithfulness: list[float]  # of each fact's `selection` circuit (NaN where m_clean == m_corrupted)
    selection: str
    m_clean: list[float]
    m_corrupted: list[float]


def circuit_filename(epoch: int, method: str, steps: int, metric: str) -> str:
    """`epoch_3.eap-ig5.logprob.safetensors` (settings are in the metadata too; this keeps runs apart)."""
    return f"epoch_{epoch}.{method}{'' if method == 'eap' else steps}.{metric}.safetensors"


def _settings_match(path: Path, want: dict[str, Any]) -> bool:
    """Does the circuit file at `path` hold exactly these settings (header only, no tensors read)?"""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    except Exception:
        return False
    return all(meta.get(k) == v for k, v in want.items())


def extract_run(run: Any, facts: Sequence[FactPrompt], out_dir: str | Path, epochs: Sequence[int] | None = None,
                method: str = "eap-ig", steps: int = 5, metric: str = "logprob", seed: int = 0, batch_size: int = 8,
                top_n: int = 1000, dtype: str = "float32", sparse_top_k: int | None = None,
                extra_meta: dict[str, Any] | None = None, progress: bool = False) -> list[Extracted]:
    """One circuit file per epoch of a `checkpoints.Run` under `out_dir`, skipping finished ones.

    A file is reused when it holds the same checkpoint content hash and settings (method, IG steps,
    metric, seed, probe-set hash). Each new file's metadata also records the faithfulness of every
    fact's top-`top_n` circuit (`faithfulness`, `faithfulness_selection`) and the metric of the clean and
    corrupted runs (`m_clean`, `m_corrupted`): faithfulness is only meaningful where they differ clearly.
    """
    from tqdm.auto import tqdm

    from circuitdyn.faithfulness import CircuitEvaluator

    out = Path(out_dir)
    epochs = list(run.epochs if epochs is None else epochs)
    steps = steps_taken(method, steps)
    results = []
    for epoch in tqdm(epochs, desc="epochs", unit="epoch", disable=not progress or len(epochs) < 2):
        ck = run.checkpoint(epoch)
        path = out / circuit_filename(epoch, method, steps, metric)
        want = {"checkpoint_hash": ck.content_hash, "method": method, "ig_steps": steps, "metric": metric,
                "seed": seed, "probe_set_hash": facts_hash(facts)}
        selection = f"top:{top_n}"
        if path.exists() and _settings_match(path, want):
            cs = CircuitSet.load(path)
            results.append(Extracted(epoch, path, True, cs.fact_ids, _nan_list(cs.meta.get("faithfulness"), cs),
                                     cs.meta.get("faithfulness_selection", selection),
                                     _nan_list(cs.meta.get("m_clean"), cs), _nan_list(cs.meta.get("m_corrupted"), cs)))
            continue
        model = run.load_model(epoch)
        meta = {"model": run.base_model, "checkpoint_hash": ck.content_hash, "step": ck.step, "epoch": epoch,
                "train_loss": ck.train_loss, "checkpoint_path": str(ck.path), **(extra_meta or {})}
        cs = extract_circuits(model, facts, method, steps, metric, seed, batch_size, meta=meta, progress=progress)
        ev = CircuitEvaluator(model, facts, metric, seed, batch_size, NOISE_SCALE)
        faith = ev.faithfulness(cs.top_n(min(top_n, len(cs.edges))))
        cs.meta["faithfulness"] = [None if v != v else round(float(v), 6) for v in faith.tolist()]
        cs.meta["faithfulness_selection"] = selection
        cs.meta["m_clean"] = [round(float(v), 6) for v in ev.m_clean.tolist()]
        cs.meta["m_corrupted"] = [round(float(v), 6) for v in ev.m_corr.tolist()]
        cs.save(path, dtype=dtype, top_k=sparse_top_k)
        results.append(Extracted(epoch, path, False, cs.fact_ids, faith.tolist(), selection, ev.m_clean.tolist(),
                                 ev.m_corr.tolist()))
    return results


def _nan_list(values: list[float | None] | None, cs: CircuitSet) -> list[float]:
    return [float("nan") if v is None else float(v) for v in (values or [None] * len(cs.fact_ids))]


# --- exact patching -------------------------------------------------------------------------------
SPARSE_PATCH_FACTOR = 8
"""A patched read sums only the kept (or only the patched) edges when that side holds under 1/8 of them."""


def run_patched(model: Any, batch: FactBatch, keep: Bool[Tensor, "batch edge"], metric: str = "logprob",
                corrupted_sources: Tensor | None = None) -> Float[Tensor, "batch"]:
    """Metric with every edge outside `keep` patched to its corrupted value (exact, no approximation).

    A destination reads `resid - sum_{src not kept} (a_src(this run) - a_src(corrupted run))`: kept edges
    carry this run's activations, the others the corrupted run's. All edges kept = the clean run; none
    kept = the corrupted run.
    """
    check_supported(model)
    cfg = model.cfg
    graph = Graph.from_model(model)
    layers = _layers(model)
    if keep.shape != (batch.clean.shape[0], graph.n_edges):
        raise CircuitdynError(f"circuit mask shape {tuple(keep.shape)} != ({batch.clean.shape[0]}, {graph.n_edges})")
    clean_in, corr_in = embed_inputs(model, batch)
    with torch.no_grad():
        if corrupted_sources is None:
            _, st = run_capture(model, corr_in, batch, metric, layers)
            corrupted_sources = _sources(model, corr_in, st, layers)
            del st
        B, P, D = clean_in.shape
        H = cfg.n_heads
        drop = torch.zeros(B, *graph.valid.shape)
        drop[:, graph.valid] = (~keep).float()
        per_layer = H + int(graph.has_mlp)
        diffs = torch.empty_like(corrupted_sources)  # per source: this run's output - the corrupted run's
        diffs[:, 0] = clean_in - corrupted_sources[:, 0]
        diff_sum = diffs[:, 0].clone()  # over the sources written so far: x - diff_sum = the corrupted residual

        def read(x: Tensor, n_src: int, cols: slice) -> Tensor:
            """What each destination in `cols` (reading all `n_src` sources written so far) reads:
            x - sum_s drop[s] * diff[s], as [B, P, n_dest, D]."""
            d = drop[:, :n_src, cols]
            n_drop = int(d.sum())
            n_keep = d.numel() - n_drop
            if min(n_drop, n_keep) * SPARSE_PATCH_FACTOR >= d.numel():  # both sides dense: one contraction
                return x[:, :, None] - torch.einsum("bspd,bsn->bpnd", diffs[:, :n_src], d)
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
            return out.permute(0, 2, 1, 3)

        x = clean_in
        col = 0
        for i, (block, layer) in enumerate(zip(model.blocks, layers)):
            n_src = 1 + i * per_layer
            ins = read(x, n_src, slice(col, col + 3 * H)).reshape(B, P, H, 3, D)
            col += 3 * H
            n, _, _ = _norm(layer, ins)
            qkv = torch.einsum("bphcd,hced->bphce", n, layer.W3) + layer.b3
            z = _attend(model, block, qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2])
            heads = torch.einsum("bphe,hed->bhpd", z, layer.W_O)
            x = x + heads.sum(1) + layer.b_O
            s0 = 1 + i * per_layer
            diffs[:, s0:s0 + H] = heads - corrupted_sources[:, s0:s0 + H]
            diff_sum = diff_sum + diffs[:, s0:s0 + H].sum(1)
            if graph.has_mlp:
                mlp_in = read(x, s0 + H, slice(col, col + 1))[:, :, 0]
                col += 1
                out = _mlp(block, layer, mlp_in)
                x = x + out
                diffs[:, s0 + H] = out - corrupted_sources[:, s0 + H]
                diff_sum = diff_sum + diffs[:, s0 + H]
        final = read(x, len(graph.sources), slice(col, col + 1))[:, :, 0]
        return _metric(model, final, batch, metric)


def clean_and_corrupted_metric(model: Any, batch: FactBatch, metric: str = "logprob") -> tuple[Tensor, Tensor]:
    """m(clean) and m(corrupted) per fact, from the functional forward."""
    clean_in, corr_in = embed_inputs(model, batch)
    with torch.no_grad():
        return run_capture(model, clean_in, batch, metric)[0], run_capture(model, corr_in, batch, metric)[0]


def corrupted_sources(model: Any, batch: FactBatch, metric: str = "logprob") -> Float[Tensor, "batch src pos d_model"]:
    """Every source node's output in the corrupted run (reused across many `run_patched` calls)."""
    layers = _layers(model)
    _, corr_in = embed_inputs(model, batch)
    with torch.no_grad():
        _, st = run_capture(model, corr_in, batch, metric, layers)
        return _sources(model, corr_in, st, layers)


def exact_edge_effects(model: Any, batch: FactBatch, edges: Sequence[int] | None = None, metric: str = "logprob",
                       chunk: int = 64) -> Float[Tensor, "batch edge"]:
    """True effect of patching each single edge: m(clean with e corrupted) - m(clean), [fact, len(edges)]."""
    graph = Graph.from_model(model)
    idx = list(range(graph.n_edges)) if edges is None else list(edges)
    return _exact_effects(model, batch, [[i] for i in idx], metric, chunk)


def exact_node_effects(model: Any, batch: FactBatch, metric: str = "logprob", chunk: int = 64
                       ) -> Float[Tensor, "batch source"]:
    """True effect of patching each source node (all its outgoing edges), in `Graph.sources` order."""
    graph = Graph.from_model(model)
    src, _ = graph.edge_src_dst
    groups = [(src == s).nonzero().flatten().tolist() for s in range(len(graph.sources))]
    return _exact_effects(model, batch, groups, metric, chunk)


def _exact_effects(model: Any, batch: FactBatch, groups: list[list[int]], metric: str, chunk: int) -> Tensor:
    graph = Graph.from_model(model)
    B = batch.clean.shape[0]
    m_clean, _ = clean_and_corrupted_metric(model, batch, metric)
    corr = corrupted_sources(model, batch, metric)
    out = torch.zeros(B, len(groups))
    per = max(1, chunk // B)
    for start in range(0, len(groups), per):
        part = groups[start:start + per]
        keep = torch.ones(len(part), B, graph.n_edges, dtype=torch.bool)
        for j, edges in enumerate(part):
            keep[j, :, edges] = False
        rep = _repeat_batch(batch, len(part))
        vals = run_patched(model, rep, keep.reshape(-1, graph.n_edges), metric, corr.repeat(len(part), 1, 1, 1))
        out[:, start:start + len(part)] = (vals.reshape(len(part), B) - m_clean).T
    return out


def _repeat_batch(batch: FactBatch, n: int) -> FactBatch:
    """The batch repeated n times along the fact axis (block-major)."""
    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.repeat(n, *([1] * (t.ndim - 1)))

    return FactBatch(batch.facts * n, rep(batch.clean), rep(batch.corrupted), rep(batch.valid), rep(batch.target_pos),
                     rep(batch.target_tok), rep(batch.target_mask), rep(batch.contrast), rep(batch.noise))

"""The functional forward pass the attribution engine differentiates and patches, and the metrics it scores.

Instead of TransformerLens' split-input hooks (a [batch, pos, head, d_model] copy of the residual per
q/k/v input and per head output), circuitdyn runs its own forward over a `HookedTransformer`'s weights
(`run_capture`), keeping only what attribution and patching need. The node naming follows
`circuitdyn.engine.graph`: `input`, `a{L}.h{H}`, `m{L}`, `logits`.

Facts in a batch do not interact, so per-fact results come from one batched pass. Prompts are
right-padded: with causal attention, real tokens never see pads. Every tensor is created on the device
of the model or of its inputs, or explicitly on the CPU and then moved (`make_batch`), so the same code runs
on CPU, CUDA and MPS and nothing lands on a default device set with `torch.device(...)`.

Precision: weights and matmuls are in the model's dtype (float32, bfloat16 or float16); the residual stream
(input embeddings plus every source's output), the layer norms' statistics and the metric are float32.
`run_capture(..., dtype=torch.float32)` runs a bf16/fp16 model's blocks in float32, a layer at a time.

A metric is a callable (as in EAP-IG): `metric(logits, batch) -> [batch]`, where `logits` are the
model's logits at each fact's scored positions ([batch, answer, vocab], teacher-forced). The named
metrics are built from it: `answer-logprob` (sum of the answer tokens' log-probabilities, the default),
`answer-prob` (its exp) and `logit-diff` (first answer token minus the fact's contrast token, the
answer of the corrupted prompt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import FactPrompt

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

NOISE_SCALE = 3.0
"""Noise corruption: Gaussian noise with std = NOISE_SCALE x std(W_E) added to the input embeddings."""

MetricName = Literal["answer-logprob", "answer-prob", "logit-diff"]


# --- model support -------------------------------------------------------------------------------
def check_supported(model: HookedTransformer) -> None:
    """Raise CircuitdynError for architecture features the functional forward does not implement."""
    cfg = model.cfg
    problems = []
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre", None):
        problems.append(f"normalization_type={cfg.normalization_type!r}")
    for flag in (
        "parallel_attn_mlp",
        "use_local_attn",
        "use_qk_norm",
        "use_normalization_before_and_after",
        "post_embedding_ln",
        "use_attention_sinks",
        "use_logn_attn",
        "use_dynamic_ntk_rope",
        "load_in_4bit",
    ):
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
    if any(t != "global" for t in getattr(cfg, "attn_types", None) or []):
        problems.append("local attention layers (attn_types)")
    if cfg.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        problems.append(f"dtype={cfg.dtype} (use float32, bfloat16 or float16)")
    if problems:
        raise CircuitdynError(
            f"model {cfg.model_name!r} uses features the attribution engine does not support: {', '.join(problems)}"
        )


@dataclass
class Norm:
    """A LayerNorm / RMSNorm (or none) as TransformerLens computes it: normalized in float32 (bf16/fp16 lose
    too much in the mean of squares), then scaled by its weight and bias in their dtype."""

    kind: str  # "LN" | "RMS" | "none"
    w: Tensor | None
    b: Tensor | None
    eps: float

    @classmethod
    def of(cls, module: Any, eps: float) -> Norm:
        """The norm a TransformerLens module computes (LayerNorm(Pre), RMSNorm(Pre); anything else: none)."""
        name = type(module).__name__
        kind = "LN" if name in ("LayerNorm", "LayerNormPre") else "RMS" if name in ("RMSNorm", "RMSNormPre") else "none"
        w, b = getattr(module, "w", None), getattr(module, "b", None)
        return cls(
            kind,
            None if w is None else w.detach(),
            None if b is None else b.detach(),
            float(getattr(module, "eps", eps)),
        )

    def parts(self, x: Tensor, dtype: torch.dtype, constant_scale: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(output in `dtype`, x_hat, scale), x_hat and scale in float32 (for the vector-Jacobian product).
        `constant_scale`: the scale is detached (RelP's LN rule: the norm is linear for the backward pass; the
        centring of a LayerNorm is linear anyway and is kept)."""
        if self.kind == "none":
            return x.to(dtype), x, torch.ones_like(x[..., :1])
        x = x.float()
        if self.kind == "LN":
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if constant_scale:
            scale = scale.detach()
        xhat = x / scale
        out = xhat.to(dtype) if self.w is None else xhat.to(dtype) * self.w.to(dtype)
        if self.b is not None:
            out = out + self.b.to(dtype)
        return out, xhat, scale

    def to(self, dtype: torch.dtype) -> Norm:
        """The norm with its weight and bias cast to `dtype`."""
        return replace(self, w=_cast(self.w, dtype), b=_cast(self.b, dtype))


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


@dataclass
class LayerWeights:
    """Per-block weights (detached from autograd) in the shapes the functional forward uses."""

    W_qkv: Tensor  # [d_model, (H + 2 Hkv) d_head]
    b_qkv: Tensor  # [(H + 2 Hkv) d_head]
    W3: Tensor  # [H, 3, d_head, d_model]: W_Q, and W_K / W_V expanded to query heads (transposed)
    b3: Tensor  # [H, 3, d_head]
    W_O: Tensor  # [H, d_head, d_model]
    b_O: Tensor  # [d_model]
    norm1: Norm
    Wf: Tensor  # W3 with ln1's weight folded in (and centred for LN): maps d q/k/v to d x_hat
    offset3: Tensor  # [H, 3, d_head]: b3 + ln1's bias projected, so (q/k/v - offset3) = Wf x_hat
    norm2: Norm | None
    mlp_t: tuple[Tensor | None, Tensor, Tensor] | None
    """(W_gate^T or None, W_in^T, W_out^T), contiguous; None for MLPs with a layer-norm activation (run by
    TransformerLens' module in the model's dtype)."""
    b_in: Tensor | None
    b_out: Tensor | None

    @property
    def ln_kind(self) -> str:
        """ln1's kind: "LN", "RMS" or "none"."""
        return self.norm1.kind

    def to(self, dtype: torch.dtype) -> LayerWeights:
        """The weights `run_capture` reads, cast to `dtype` (the rest left as they are)."""
        return replace(
            self,
            W_qkv=self.W_qkv.to(dtype),
            b_qkv=self.b_qkv.to(dtype),
            W_O=self.W_O.to(dtype),
            b_O=self.b_O.to(dtype),
            norm1=self.norm1.to(dtype),
            norm2=self.norm2 and self.norm2.to(dtype),
            mlp_t=self.mlp_t and tuple(_cast(t, dtype) for t in self.mlp_t),  # type: ignore[arg-type]
            b_in=_cast(self.b_in, dtype),
            b_out=_cast(self.b_out, dtype),
        )


def layer_weights(model: HookedTransformer) -> list[LayerWeights]:
    cfg = model.cfg
    H, D = cfg.n_heads, cfg.d_model
    out = []
    for block in model.blocks:
        attn = block.attn
        # The public W_K / W_V / b_K / b_V are expanded to the query heads for grouped-query attention;
        # the projection computes each key/value head once, so keep every rep-th (the grouped weights).
        rep = H // (cfg.n_key_value_heads or H)
        W_K, W_V, b_K, b_V = (w[::rep] for w in (attn.W_K, attn.W_V, attn.b_K, attn.b_V))
        W_qkv = torch.cat([w.permute(1, 0, 2).reshape(D, -1) for w in (attn.W_Q, W_K, W_V)], dim=1)
        b_qkv = torch.cat([attn.b_Q.reshape(-1), b_K.reshape(-1), b_V.reshape(-1)])
        W3 = torch.stack([attn.W_Q, W_K.repeat_interleave(rep, 0), W_V.repeat_interleave(rep, 0)], dim=1)
        W3 = W3.permute(0, 1, 3, 2).contiguous()  # [H, 3, d_head, d_model]
        b3 = torch.stack([attn.b_Q, b_K.repeat_interleave(rep, 0), b_V.repeat_interleave(rep, 0)], dim=1)
        norm1 = Norm.of(block.ln1, cfg.eps)
        W3, b3 = W3.detach(), b3.detach()
        Wf = W3 if norm1.w is None else W3 * norm1.w
        if norm1.kind == "LN":
            Wf = Wf - Wf.mean(-1, keepdim=True)
        offset3 = b3 if norm1.b is None else b3 + W3 @ norm1.b
        mlp = getattr(block, "mlp", None)
        norm2 = None if cfg.attn_only else Norm.of(block.ln2, cfg.eps)
        mlp_t, b_in, b_out = None, None, None
        if mlp is not None and type(mlp).__name__ in ("MLP", "GatedMLP") and not cfg.is_layer_norm_activation():
            gate = mlp.W_gate.detach().T.contiguous() if type(mlp).__name__ == "GatedMLP" else None
            mlp_t = (gate, mlp.W_in.detach().T.contiguous(), mlp.W_out.detach().T.contiguous())
            b_in, b_out = mlp.b_in.detach(), mlp.b_out.detach()
        out.append(
            LayerWeights(
                W_qkv.detach(),
                b_qkv.detach(),
                W3,
                b3,
                attn.W_O.detach(),
                attn.b_O.detach(),
                norm1,
                Wf.contiguous(),
                offset3,
                norm2,
                mlp_t,
                b_in,
                b_out,
            )
        )
    return out


def ln1(layer: LayerWeights, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ln1 as TransformerLens computes it, output in the layer's dtype; returns (output, x_hat, scale), x_hat
    and scale in float32, for the vector-Jacobian product."""
    return layer.norm1.parts(x, layer.W_qkv.dtype)


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
    contrast: Int[Tensor, " batch"]
    noise: Float[Tensor, "batch pos d_model"] | None

    def to(self, device: torch.device | str) -> FactBatch:
        """The batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        return FactBatch(**moved)

    def rows(self, start: int, stop: int) -> FactBatch:
        """Facts start:stop of the batch, with the padding they do not need trimmed."""
        return self.take(range(start, min(stop, len(self.facts))))

    def take(self, idx: Sequence[int]) -> FactBatch:
        """Facts `idx` of the batch, with the padding they do not need trimmed (the batch is right-padded and
        attention causal, so trimming changes no kept position)."""
        sel = torch.tensor(list(idx), dtype=torch.long, device=self.clean.device)
        P = max(1, int(self.valid[sel].sum(1).max()))
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                value = value[sel]
                moved[name] = value[:, :P] if name in ("clean", "corrupted", "valid", "noise") else value
        moved["facts"] = [self.facts[i] for i in idx]
        return FactBatch(**moved)

    def suffix(self, start: int) -> FactBatch:
        """Positions start: of every fact, scored positions shifted to match (for a run after a cached prefix
        of `start` positions; `start` must not exceed the first scored position)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("clean", "corrupted", "valid", "noise"):
            if moved[name] is not None:
                moved[name] = moved[name][:, start:]
        moved["target_pos"] = (self.target_pos - start).clamp(min=0)
        return FactBatch(**moved)

    def repeat(self, n: int) -> FactBatch:
        """The batch repeated n times along the fact axis (block-major)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.repeat(n, *([1] * (value.ndim - 1)))
        moved["facts"] = self.facts * n
        return FactBatch(**moved)


def fact_seed(seed: int, fact_id: str) -> int:
    """A per-fact RNG seed, so a fact's noise does not depend on which batch it is in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{fact_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def by_length(facts: Sequence[FactPrompt]) -> list[int]:
    """Fact indices shortest first (prompt + answer tokens): batches cut from this order carry little padding,
    and a fact's result does not depend on its batch."""
    return sorted(range(len(facts)), key=lambda i: len(facts[i].clean_tokens) + len(facts[i].answer_tokens))


def make_batch(
    model: HookedTransformer,
    facts: Sequence[FactPrompt],
    seed: int = 0,
    noise_scale: float = NOISE_SCALE,
    metric: str | Metric = "answer-logprob",
) -> FactBatch:
    """Validate and pad facts into a `FactBatch` on the model's device (noise drawn per fact from `fact_seed`,
    on the CPU, so a fact's corruption does not depend on the device)."""
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
        if get_metric(metric) is logit_diff and f.contrast_token is None:
            raise CircuitdynError(
                f"{where}: metric 'logit-diff' needs a contrast_token (the corrupted prompt's answer)"
            )
        toks = [*f.clean_tokens, *f.corrupted_tokens, *f.answer_tokens]
        if f.contrast_token is not None:
            toks.append(f.contrast_token)
        if max(toks) >= cfg.d_vocab or min(toks) < 0:
            raise CircuitdynError(f"{where}: token id {max(toks)} outside the model's vocabulary ({cfg.d_vocab})")
        seqs.append([*f.clean_tokens, *f.answer_tokens[:-1]])
        corrs.append([*f.corrupted_tokens, *f.answer_tokens[:-1]])
    B, P, T = len(facts), max(map(len, seqs)), max(len(f.answer_tokens) for f in facts)
    if P > cfg.n_ctx:
        longest = max(facts, key=lambda f: len(f.clean_tokens) + len(f.answer_tokens))
        raise CircuitdynError(
            f"fact {longest.fact_id!r} needs {P} positions, more than the model's context {cfg.n_ctx}"
        )
    clean = torch.zeros(B, P, dtype=torch.long, device="cpu")
    corrupted = torch.zeros(B, P, dtype=torch.long, device="cpu")
    valid = torch.zeros(B, P, dtype=torch.bool, device="cpu")
    target_pos = torch.zeros(B, T, dtype=torch.long, device="cpu")
    target_tok = torch.zeros(B, T, dtype=torch.long, device="cpu")
    target_mask = torch.zeros(B, T, dtype=torch.bool, device="cpu")
    contrast = torch.zeros(B, dtype=torch.long, device="cpu")
    noise = None
    for b, f in enumerate(facts):
        n = len(seqs[b])
        clean[b, :n] = torch.tensor(seqs[b], device="cpu")
        corrupted[b, :n] = torch.tensor(corrs[b], device="cpu")
        valid[b, :n] = True
        a = len(f.answer_tokens)
        target_pos[b, :a] = torch.arange(len(f.clean_tokens) - 1, len(f.clean_tokens) - 1 + a, device="cpu")
        target_tok[b, :a] = torch.tensor(f.answer_tokens, device="cpu")
        target_mask[b, :a] = True
        contrast[b] = f.contrast_token if f.contrast_token is not None else 0
        if f.noise_positions:
            if noise is None:
                noise = torch.zeros(B, P, cfg.d_model, device="cpu")
                std = noise_scale * float(model.W_E.detach().float().std())
            gen = torch.Generator(device="cpu").manual_seed(fact_seed(seed, f.fact_id))
            pos = torch.tensor(sorted(set(f.noise_positions)), device="cpu")
            noise[b, pos] = torch.randn(len(pos), cfg.d_model, generator=gen, device="cpu") * std
    return FactBatch(list(facts), clean, corrupted, valid, target_pos, target_tok, target_mask, contrast, noise).to(
        model.W_E.device
    )


def embed_inputs(model: HookedTransformer, batch: FactBatch) -> tuple[Tensor, Tensor]:
    """The `input` node's output for the clean and the corrupted run (token + positional embeddings, + noise),
    in float32: the start of the float32 residual stream."""
    with torch.no_grad():
        out = []
        for toks in (batch.clean, batch.corrupted):
            x = model.embed(toks).float()
            if model.cfg.positional_embedding_type == "standard":
                x = x + model.pos_embed(toks).float()
            out.append(x)
        if batch.noise is not None:
            out[1] = out[1] + batch.noise.float()
    return out[0], out[1]


def shared_prefix(batch: FactBatch) -> int:
    """The number of leading positions where no fact's corrupted run differs from its clean run (no token
    swapped, no noise added), capped at the first scored position.

    With causal attention every activation there is the same in both runs, so every edge's patch (and every
    attribution score's activation difference) is zero there: patching and attribution run only the positions
    after it, on the clean run's keys and values of the prefix (`clean_prefix`). Exact, not an approximation.
    On chat-templated probes the shared prefix (system prompt, question start) is about two thirds of a prompt.
    """
    differs = (batch.clean != batch.corrupted) & batch.valid
    if batch.noise is not None:
        differs |= batch.noise.ne(0).any(-1)
    first = int(differs.any(0).float().argmax()) if bool(differs.any()) else batch.clean.shape[1]
    return min(first, int(batch.target_pos[:, 0].min()))


def clean_prefix(
    model: HookedTransformer, x0: Tensor, layers: list[LayerWeights], dtype: torch.dtype | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the keys (rotated) and values, per query head [B, S, H, dh], of a run of the first S
    positions `x0` [B, S, D] (the `input` node's output there), for `run_capture(..., past=)`."""
    with torch.no_grad():
        _, st = run_capture(model, x0, None, None, layers, dtype)
    if model.cfg.positional_embedding_type != "rotary":
        return list(zip(st["k"], st["v"]))
    return [(rotary(block.attn, k), v) for block, k, v in zip(model.blocks, st["k"], st["v"])]


def answer_logprob(logits: Float[Tensor, "batch answer vocab"], batch: FactBatch) -> Float[Tensor, " batch"]:
    """Sum over the answer tokens of their log-probability (teacher-forced): the default metric."""
    logp = logits.float().log_softmax(-1).gather(-1, batch.target_tok[..., None])[..., 0]
    return (logp * batch.target_mask).sum(-1)


def answer_prob(logits: Float[Tensor, "batch answer vocab"], batch: FactBatch) -> Float[Tensor, " batch"]:
    """Probability of the whole answer (exp of `answer_logprob`)."""
    return answer_logprob(logits, batch).exp()


def logit_diff(logits: Float[Tensor, "batch answer vocab"], batch: FactBatch) -> Float[Tensor, " batch"]:
    """Logit of the first answer token minus that of the contrast token (the corrupted prompt's answer),
    at the last prompt position: the paper's metric."""
    first = logits[:, 0].float()
    ar = torch.arange(first.shape[0], device=first.device)
    return first[ar, batch.target_tok[:, 0]] - first[ar, batch.contrast]


Metric = Callable[[Float[Tensor, "batch answer vocab"], FactBatch], Float[Tensor, " batch"]]
"""`metric(logits at the scored positions, batch) -> one value per fact`."""

METRICS: dict[str, Metric] = {"answer-logprob": answer_logprob, "answer-prob": answer_prob, "logit-diff": logit_diff}
"""The named metrics (`--metric`)."""
_ALIASES = {"logprob": "answer-logprob", "prob": "answer-prob"}


def metric_name(metric: str | Metric) -> str:
    """The canonical name of a metric (recorded in circuit files); a callable is named by its `__name__`."""
    if callable(metric):
        return next((k for k, v in METRICS.items() if v is metric), getattr(metric, "__name__", "custom"))
    name = _ALIASES.get(metric, metric)
    if name not in METRICS:
        raise CircuitdynError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return name


def get_metric(metric: str | Metric) -> Metric:
    """The callable of a metric name (a callable is returned as it is)."""
    return metric if callable(metric) else METRICS[metric_name(metric)]


def metric_at_answers(
    model: HookedTransformer, resid: Tensor, batch: FactBatch, metric: str | Metric, relp: bool = False
) -> Float[Tensor, " batch"]:
    """Per-fact metric from the final residual, unembedding only the scored positions (`relp`: with the final
    norm's scale detached, RelP's LN rule; same value)."""
    b_idx = torch.arange(resid.shape[0], device=resid.device)[:, None]
    rows = resid[b_idx, batch.target_pos]  # [B, T, D]
    if relp and hasattr(model, "ln_final"):
        normed = Norm.of(model.ln_final, model.cfg.eps).parts(rows, model.W_U.dtype, constant_scale=True)[0]
    else:
        normed = model.ln_final(rows) if hasattr(model, "ln_final") else rows
    logits = F.linear(normed.to(model.W_U.dtype), unembed_weight(model), model.unembed.b_U)
    return get_metric(metric)(logits, batch)


def unembed_weight(model: HookedTransformer) -> Tensor:
    """The unembedding as `F.linear` takes it ([d_vocab, d_model], contiguous): what TransformerLens' `Unembed`
    computes, without its copy of W_U (~100 MB for a 50k vocabulary) at every call. Copied once per version
    of the weight (an in-place update, e.g. an optimizer step, makes a new copy)."""
    W = model.unembed.W_U
    key = (W.data_ptr(), W._version, W.dtype, W.device)
    cached = model.unembed.__dict__.get("_circuitdyn_weight")
    if cached is None or cached[0] != key:
        cached = (key, W.detach().T.contiguous())
        model.unembed.__dict__["_circuitdyn_weight"] = cached
    return cached[1]


# --- the functional forward -----------------------------------------------------------------------
def rotary(attn: Any, x: Tensor, offset: int = 0) -> Tensor:
    """TransformerLens' rotary embedding (same tables, bit-identical result), cheaper to differentiate:
    the half-rotation [-x2, x1] is a roll of x with the sign folded into the sine table. `offset`: the
    position of x's first row (a suffix run after a cached prefix)."""
    cfg, P = attn.cfg, x.shape[1]
    if cfg.rotary_adjacent_pairs or offset + P > attn.rotary_cos.shape[0]:
        return attn.apply_rotary(x, offset)
    rd = cfg.rotary_dim
    half = rd // 2
    sign = torch.cat(
        [-torch.ones(half, dtype=x.dtype, device=x.device), torch.ones(rd - half, dtype=x.dtype, device=x.device)]
    )
    cos = attn.rotary_cos[None, offset : offset + P, None, :]
    sin = (attn.rotary_sin[offset : offset + P] * sign)[None, :, None, :]
    if rd == x.shape[-1]:
        return x * cos + x.roll(half, dims=-1) * sin
    x_rot = x[..., :rd]
    return torch.cat([x_rot * cos + x_rot.roll(half, dims=-1) * sin, x[..., rd:]], dim=-1)


def attend(
    model: HookedTransformer,
    block: Any,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    relp: bool = False,
    past: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Causal attention on [B, P, H, d_head] q/k/v (k/v already per query head); returns z [B, P, H, d_head].
    `relp`: the attention pattern is computed without grad (RelP's rule for attention heads: the pattern is a
    constant of the backward pass, relevance flows through the values only; q and k get no gradient).
    `past`: keys (rotated) and values of the positions before q's, [B, S, H, d_head]: q, k, v are then
    positions S..S+P-1 and attend to the past as well."""
    S = 0 if past is None else past[0].shape[1]
    if model.cfg.positional_embedding_type == "rotary":
        q = rotary(block.attn, q, S)
        k = rotary(block.attn, k, S)
    if past is not None and S:
        k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
    P = q.shape[1]
    ar = torch.arange(S + P, device=q.device)
    causal = ar[None, :] <= ar[S:, None]  # [P, S + P]: query i (position S + i) sees keys up to S + i
    if relp:
        with torch.no_grad():
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / block.attn.attn_scale
            pattern = scores.float().masked_fill(~causal, float("-inf")).softmax(-1).to(v.dtype)
        return torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    mask = {"is_causal": True} if not S else {"attn_mask": causal}
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0 / block.attn.attn_scale, **mask
    )
    return z.transpose(1, 2)


def mlp(block: Any, layer: LayerWeights, x: Tensor, relp: bool = False) -> Tensor:
    """block.mlp(block.ln2(x)) in the layer weights' dtype, with the transposed weights prepared once in
    `layer_weights` (TransformerLens copies them per call); `x` is the float32 residual.

    `relp`: the same value, with RelP's (LRP) rules in the backward pass: ln2's scale is a constant, the
    activation passes gradient act(x)/x (`identity_rule`), and a gated MLP's product gate * up passes half the
    gradient through each factor (`half_rule`)."""
    dtype = layer.W_O.dtype
    assert layer.norm2 is not None
    n, _, _ = layer.norm2.parts(x, dtype, constant_scale=relp)
    if layer.mlp_t is None:  # a layer-norm activation: TransformerLens' module, in the model's dtype
        if relp:
            raise CircuitdynError("RelP does not support MLPs with a layer-norm activation (SoLU)")
        return block.mlp(n.to(block.mlp.W_out.dtype)).to(dtype)
    W_gate_t, W_in_t, W_out_t = layer.mlp_t
    b_in = layer.b_in
    act = partial(identity_rule, block.mlp.act_fn) if relp else block.mlp.act_fn
    if W_gate_t is None:
        post = act(F.linear(n, W_in_t, b_in))
    elif relp:
        post = half_rule(act(F.linear(n, W_gate_t)), F.linear(n, W_in_t))
    else:
        post = act(F.linear(n, W_gate_t)) * F.linear(n, W_in_t)
    if W_gate_t is not None and b_in is not None:
        post = post + b_in
    return F.linear(post, W_out_t, layer.b_out)


def identity_rule(act: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """act(x), whose backward pass multiplies by act(x)/x as a constant (LRP's identity rule for an elementwise
    nonlinearity: act(x) = x * [act(x)/x]); where |x| < 1e-6 the ratio is taken at +-1e-6 (act'(0) in the limit)."""
    with torch.no_grad():
        y = act(x)
        tiny = torch.tensor(1e-6, dtype=x.dtype, device=x.device)
        small = x.abs() < tiny
        safe = torch.where(small, torch.where(x < 0, -tiny, tiny), x)
        ratio = torch.where(small, act(safe), y) / safe
    return y + (x - x.detach()) * ratio


def half_rule(a: Tensor, b: Tensor) -> Tensor:
    """a * b, whose backward pass sends half the gradient through each factor (LRP's half rule for a product
    of two inputs): 0.5 (a b' + a' b) with ' = detached, the same value."""
    return 0.5 * (a * b.detach() + a.detach() * b)


def _qkv(layer: LayerWeights, cfg: Any, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


def run_capture(
    model: HookedTransformer,
    x0: Tensor,
    batch: FactBatch | None,
    metric: str | Metric | None,
    layers: list[LayerWeights] | None = None,
    dtype: torch.dtype | None = None,
    relp: bool = False,
    past: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Forward from the `input` node, keeping what attribution needs; no grad taken here.
    (`metric=None`: no metric, an empty tensor in its place, e.g. for a prompt prefix without answers.
    `past`: per layer, the keys and values of a cached prefix (`clean_prefix`); x0 and `batch` are then the
    positions after it, as `FactBatch.suffix` cuts them.)

    Returns the per-fact metric and, per layer, z [B,P,H,dh] and the MLP output [B,P,D], plus (when grad is
    enabled) the tensors to differentiate: q/k/v (pre-rotary), ln1 state, MLP inputs, final residual.
    The residual stream is float32; the blocks compute in the model's dtype, or in `dtype` when given
    (weights cast one layer at a time: a bf16 model's activations in float32 without a float32 copy of it).
    `relp`: the same values, with the backward pass of RelP's rules (attention pattern and every norm's scale
    constant, `mlp`'s identity and half rules; the attribution engine's ln1 vector-Jacobian product, which
    starts from q/k/v, holds the scale constant too). Then q and k have no gradient.
    """
    cfg = model.cfg
    layers = layers or layer_weights(model)
    store: dict[str, list[Tensor]] = {k: [] for k in ("q", "k", "v", "xhat", "scale", "z", "mlp_in", "mlp_out")}
    x = x0.float()
    for i, (block, layer) in enumerate(zip(model.blocks, layers)):
        if dtype is not None and dtype != layer.W_qkv.dtype:
            layer = layer.to(dtype)
        n, xhat, scale = layer.norm1.parts(x, layer.W_qkv.dtype, constant_scale=relp) if relp else ln1(layer, x)
        q, k, v = _qkv(layer, cfg, n)
        z = attend(model, block, q, k, v, relp, None if past is None else past[i])
        for key, val in (("q", q), ("k", k), ("v", v), ("xhat", xhat), ("scale", scale), ("z", z)):
            store[key].append(val)
        x = x + z.flatten(2) @ layer.W_O.flatten(0, 1) + layer.b_O
        if not cfg.attn_only:
            mlp_in = x.clone()
            m = mlp(block, layer, mlp_in, relp)
            store["mlp_in"].append(mlp_in)
            store["mlp_out"].append(m)
            x = x + m
    store["final"] = [x]
    if metric is None or batch is None:
        return x.new_empty(0), store
    return metric_at_answers(model, x, batch, metric, relp), store


def source_outputs(
    model: HookedTransformer, x0: Tensor, store: dict[str, list[Tensor]], layers: list[LayerWeights]
) -> Float[Tensor, "batch src pos d_model"]:
    """Every source node's output, in `Graph.sources` order (float32, like the residual stream they sum to)."""
    parts = [x0.float()[:, None]]
    for i, layer in enumerate(layers):
        z = store["z"][i]
        parts.append(
            einops.einsum(
                z, layer.W_O.to(z.dtype), "batch pos head dh, head dh d_model -> batch head pos d_model"
            ).float()
        )
        if store["mlp_out"]:
            parts.append(store["mlp_out"][i].float()[:, None])
    return torch.cat(parts, dim=1)

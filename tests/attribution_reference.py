"""The naive reference for edge attribution: TransformerLens split-input hooks + autograd.

The textbook implementation the engine is checked against (tests) and timed against (benchmark):
`use_split_qkv_input` gives each head its own copy of the residual per q/k/v input, `use_attn_result`
gives per-head outputs, `use_hook_mlp_in` each MLP's own input, and GQA is ungrouped in TransformerLens.
Gradients are taken with respect to those hooked tensors, the `input` node is replaced at
`blocks.0.hook_resid_pre` by the IG interpolation, and scores are contracted over positions.

RelP (`relp=True`) the textbook way too: TransformerLens' own hooks make every norm's `hook_scale` and each
attention `hook_pattern` constants (detached), and `hook_post` of each MLP keeps its value but passes the
gradient of LRP's identity rule on the activation (act(x)/x) and, gated, the half rule on act(gate) * up.
"""

from __future__ import annotations

import torch

from circuitdyn.engine.forward import FactBatch, embed_inputs
from circuitdyn.engine.graph import Graph

_FLAGS = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in", "ungroup_grouped_query_attention")


def _metric(logits: torch.Tensor, batch: FactBatch, metric: str) -> torch.Tensor:
    b = torch.arange(logits.shape[0])
    if metric == "logit-diff":
        first = logits[b, batch.target_pos[:, 0]]
        return first[b, batch.target_tok[:, 0]] - first[b, batch.contrast]
    lp = logits.log_softmax(-1)[b[:, None], batch.target_pos].gather(-1, batch.target_tok[..., None])[..., 0]
    total = (lp * batch.target_mask).sum(-1)
    return total.exp() if metric == "prob" else total


def _relp_hooks(model) -> list:
    """Hooks that turn TransformerLens' backward pass into RelP's (the forward values unchanged)."""
    cfg = model.cfg
    seen: dict[str, torch.Tensor] = {}

    def detach(t, hook):
        return t.detach()

    def keep(t, hook):
        seen[hook.name] = t
        return t

    def post(t, hook):
        layer = hook.name.split(".")[1]
        pre = seen[f"blocks.{layer}.mlp.hook_pre"]
        act = model.blocks[int(layer)].mlp.act_fn
        safe = torch.where(pre.abs() < 1e-6, torch.full_like(pre, 1e-6), pre).detach()
        a = act(pre).detach() + (pre - pre.detach()) * (act(safe) / safe).detach()  # identity rule
        if cfg.gated_mlp:
            up = seen[f"blocks.{layer}.mlp.hook_pre_linear"]
            rule = 0.5 * (a * up.detach() + a.detach() * up)  # half rule
        else:
            rule = a
        return t.detach() + (rule - rule.detach())

    hooks = [
        (lambda name: name.endswith("hook_scale"), detach),
        (lambda name: name.endswith("attn.hook_pattern"), detach),
    ]
    if not cfg.attn_only:
        hooks += [
            (lambda name: name.endswith("mlp.hook_pre") or name.endswith("mlp.hook_pre_linear"), keep),
            (lambda name: name.endswith("mlp.hook_post"), post),
        ]
    return hooks


def _run(model, x0: torch.Tensor, batch: FactBatch, metric: str, relp: bool = False):
    """Hooked forward from input x0; returns metric and the dict of hooked activations (kept in graph)."""
    cfg = model.cfg
    acts: dict[str, torch.Tensor] = {}
    names = ["blocks.0.hook_resid_pre", f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    for layer in range(cfg.n_layers):
        names += [f"blocks.{layer}.hook_{p}_input" for p in "qkv"] + [f"blocks.{layer}.attn.hook_result"]
        if not cfg.attn_only:
            names += [f"blocks.{layer}.hook_mlp_in", f"blocks.{layer}.hook_mlp_out"]

    def hook(t, hook):
        if hook.name == "blocks.0.hook_resid_pre":
            t = x0.detach().clone().requires_grad_(torch.is_grad_enabled())
        acts[hook.name] = t
        return t

    hooks = [(n, hook) for n in names] + (_relp_hooks(model) if relp else [])
    logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
    return _metric(logits, batch, metric), acts


def reference_scores(
    model,
    batch: FactBatch,
    steps: int = 1,
    metric: str = "logprob",
    nodes: tuple[list[float], list[float]] | None = None,
    relp: bool = False,
) -> torch.Tensor:
    """EAP (steps=1) / EAP-IG scores [fact, edge] the textbook way (alpha = k/steps, k = 1..steps, or the
    interpolation points and weights `nodes`); `relp`: RelP's backward rules (with steps=1)."""
    cfg = model.cfg
    saved = {f: getattr(cfg, f) for f in _FLAGS}
    try:
        model.set_use_split_qkv_input(True)
        model.set_use_attn_result(True)
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(True)
        model.set_ungroup_grouped_query_attention(True)
        graph = Graph.from_model(model)
        clean_in, corr_in = embed_inputs(model, batch)
        L = cfg.n_layers
        src_acts = []
        with torch.no_grad():
            for x0 in (clean_in, corr_in):
                _, acts = _run(model, x0, batch, metric)
                parts = [acts["blocks.0.hook_resid_pre"][:, :, None]]
                for layer in range(L):
                    parts.append(acts[f"blocks.{layer}.attn.hook_result"])
                    if not cfg.attn_only:
                        parts.append(acts[f"blocks.{layer}.hook_mlp_out"][:, :, None])
                src_acts.append(torch.cat(parts, dim=2))  # [B, P, S, D]
        delta = src_acts[1] - src_acts[0]
        grad_sum = None
        alphas, weights = nodes or ([k / steps for k in range(1, steps + 1)], [1.0 / steps] * steps)
        for alpha, w in zip(alphas, weights):
            x0 = corr_in + alpha * (clean_in - corr_in)
            value, acts = _run(model, x0, batch, metric, relp)
            wanted = []
            for layer in range(L):
                wanted += [acts[f"blocks.{layer}.hook_{p}_input"] for p in "qkv"]
                if not cfg.attn_only:
                    wanted.append(acts[f"blocks.{layer}.hook_mlp_in"])
            wanted.append(acts[f"blocks.{L - 1}.hook_resid_post"])
            grads = [
                torch.zeros_like(w) if g is None else g
                for w, g in zip(wanted, torch.autograd.grad(value.sum(), wanted, allow_unused=relp))
            ]
            parts, i = [], 0
            for _layer in range(L):
                q, k_, v = grads[i : i + 3]
                i += 3
                parts.append(torch.stack([q, k_, v], dim=3).flatten(2, 3))  # [B, P, H*3, D] head-major
                if not cfg.attn_only:
                    parts.append(grads[i][:, :, None])
                    i += 1
            parts.append(grads[i][:, :, None])
            g = torch.cat(parts, dim=2) * (w * steps)  # [B, P, n_dst, D]
            grad_sum = g if grad_sum is None else grad_sum + g
        valid = batch.valid[:, :, None, None].float()
        dense = torch.einsum("bpsd,bpnd->bsn", delta * valid, grad_sum / steps)
        return dense[:, graph.valid]
    finally:
        for f, v in saved.items():
            setattr(cfg, f, v)

"""What the benchmarks measure on: the embedded SmolLM2-135M-Instruct with a seeded sample of the packaged
probes (chat-templated), or a tiny random Llama-like model with random facts for a quick check (`--tiny`).
Shared by `benchmarks/estimators.py` and `benchmarks/pipeline.py`, so both measure the same facts."""

from __future__ import annotations

from typing import Any

import torch

from circuitdyn.probes.probes import FactPrompt


def tiny_model_and_facts(n: int, seed: int = 0) -> tuple[Any, list[FactPrompt]]:
    """A random Llama-like HookedTransformer (RMSNorm, rotary, gated SiLU MLP, GQA; 2 layers) and n random
    facts (entity-swap corruption at positions 1 and 2)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_ctx=64,
        d_vocab=50,
        d_mlp=48,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=2,
        final_rms=True,
        seed=seed,
        original_architecture="LlamaForCausalLM",
    )
    model = HookedTransformer(cfg, move_to_device=False).eval()
    gen = torch.Generator().manual_seed(seed)
    facts = []
    for i in range(n):
        clean = torch.randint(1, 50, (5 + i % 4,), generator=gen).tolist()
        corrupted = list(clean)
        corrupted[1], corrupted[2] = corrupted[1] % 49 + 1, corrupted[2] * 7 % 49 + 1
        answer = torch.randint(1, 50, (1,), generator=gen).tolist()
        facts.append(FactPrompt(f"t{i}", tuple(clean), tuple(corrupted), tuple(answer), "entity"))
    return model, facts


def smollm2_model_and_facts(n: int, seed: int = 0) -> tuple[Any, list[FactPrompt]]:
    from circuitdyn.probes.facts import load_facts
    from circuitdyn.runs.checkpoints import open_run
    from circuitdyn.runs.gguf import default_model_dir

    run = open_run(default_model_dir())
    return run.load_model(0), list(load_facts(None, run.tokenizer(), sample_n=n, seed=seed))

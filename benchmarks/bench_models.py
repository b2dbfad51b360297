"""What the benchmarks measure on: the embedded SmolLM2-135M-Instruct with a seeded sample of the packaged
probes (chat-templated), or a tiny random Llama-like model with random facts for a quick check (`--tiny`).
Shared by `benchmarks/estimators.py` and `benchmarks/pipeline.py`, so both measure the same facts."""

from __future__ import annotations

from typing import Any

from circuitdyn.probes.probes import FactPrompt


def tiny_model_and_facts(n: int, seed: int = 0) -> tuple[Any, list[FactPrompt]]:
    """The package's tiny random Llama-like HookedTransformer (`circuitdyn.testing.tiny_tl_model`: RMSNorm,
    rotary, gated SiLU MLP, GQA; 2 layers) and n of its random facts, all entity swaps (corruption at positions
    1 and 2)."""
    from circuitdyn.testing import tiny_facts, tiny_tl_model

    return tiny_tl_model("llama", seed), tiny_facts(n, seed=seed, noise_every=0)


def smollm2_model_and_facts(n: int, seed: int = 0) -> tuple[Any, list[FactPrompt]]:
    from circuitdyn.probes.facts import load_facts
    from circuitdyn.runs.checkpoints import open_run
    from circuitdyn.runs.gguf import default_model_dir

    run = open_run(default_model_dir())
    return run.load_model(0), list(load_facts(None, run.tokenizer(), sample_n=n, seed=seed))

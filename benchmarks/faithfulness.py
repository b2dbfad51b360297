"""Evaluating a circuit by exact patching vs. a plain forward pass of the same batch.

On the embedded SmolLM2-135M-Instruct with a batch of seed facts (the first N seed probes through
`build_fact_prompts`), times, with the corrupted run's activations already cached (as
`faithfulness.CircuitEvaluator` does across the many circuits of a transfer matrix or a faithfulness curve):
- forward: one clean forward of the batch (`attribution.run_capture`, no grad);
- small:   `CircuitEvaluator.metric_of` of every fact's top-200 circuit (the size `circuitdyn demo` compares);
- half:    the same for random circuits holding half of all edges (no side of the patch is sparse).
A patched run must mix, at every reader, the outputs of all earlier writers, so its cost grows with
the circuit's *smaller* side (kept or patched edges); the small circuit is the common case.
Last line: `small_over_forward=X half_over_forward=Y`. Target: X <= 3.
The CPU is shared: numbers move when other jobs run; the script reports the median of its repeats.

    .venv/bin/python benchmarks/faithfulness.py            # batch 8 chat-templated facts, 3 repeats
    .venv/bin/python benchmarks/faithfulness.py --quick    # batch 2, 1 repeat

Measured 2026-11-24 on the shared 2-core CPU while it was quiet (batch 8 x 63 positions, 123,211 edges):
forward 0.93 s, top-200 circuits 2.07 s, half-graph circuits 4.52 s ->
`small_over_forward=2.21 half_over_forward=4.84`. With one dense contraction per read (before the
sparse sum), both circuits took 4.57 s (`small_over_forward=4.82`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from circuitdyn.engine.faithfulness import CircuitEvaluator  # noqa: E402
from circuitdyn.engine.forward import NOISE_SCALE, embed_inputs, run_capture  # noqa: E402
from circuitdyn.engine.selection import select_top_n  # noqa: E402
from circuitdyn.probes.probes import build_fact_prompts, load_probes  # noqa: E402
from circuitdyn.runs.checkpoints import open_run  # noqa: E402
from circuitdyn.runs.gguf import default_model_dir  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 2, 1 repeat")
    args = ap.parse_args()
    n, repeats = (2, 1) if args.quick else (8, 3)

    run = open_run(default_model_dir())
    model = run.load_model(0)
    probes = load_probes()
    facts = build_fact_prompts(probes[:n], run.tokenizer(), pool=probes)
    ev = CircuitEvaluator(model, facts, "logprob", 0, n, NOISE_SCALE)
    batch = ev.batches[0]
    clean_in, _ = embed_inputs(model, batch)
    n_edges = ev.graph.n_edges
    gen = torch.Generator().manual_seed(0)
    small = select_top_n(torch.randn(n, n_edges, generator=gen), 200)
    half = torch.rand(n, n_edges, generator=gen) < 0.5
    ev.metric_of(small)  # caches the corrupted run's activations

    def forward() -> None:
        with torch.no_grad():
            run_capture(model, clean_in, batch, "logprob")

    t_fwd = median_time(forward, repeats)
    t_small = median_time(lambda: ev.metric_of(small), repeats)
    t_half = median_time(lambda: ev.metric_of(half), repeats)
    print(
        f"SmolLM2-135M, batch {n} x {clean_in.shape[1]} positions, {n_edges} edges: forward {t_fwd:.2f} s, "
        f"top-200 circuits {t_small:.2f} s, half-graph circuits {t_half:.2f} s"
    )
    print(f"small_over_forward={t_small / t_fwd:.2f} half_over_forward={t_half / t_fwd:.2f}")


if __name__ == "__main__":
    main()

"""Attribution throughput in float32 vs bfloat16 (facts x edges per second), SmolLM2-135M and a 1B-class Llama.

EAP-IG (`attribute_batch`, M steps) on one batch of seed facts (the first N packaged probes through
`load_facts`), with the model opened once in float32 and once in bfloat16 (`open_run(dtype=...)`), timed
alternately (median of the repeats, the order flipped every repeat) so that load from other jobs hits both:
- smollm2: the embedded SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads, d_model 576; ~123k edges);
- llama1b: a random-init model of the Llama-3.2-1B shape (16 layers, 32 heads / 8 KV heads, d_model 2048,
           d_mlp 8192, vocab 128256, llama3 rope scaling), built from a transformers `LlamaConfig`, saved
           (bf16) to a temporary folder with SmolLM2's tokenizer and opened with `open_run`: no hub download.
           It is fed the same token ids; what it computes is meaningless, what it costs is the 1B cost.
Throughput = facts x edges / seconds per batch. bf16 runs the M IG steps (forward + backward) in bf16 and the
two end runs in float32 (`circuitdyn.engine.attribution`: the corrupted - clean differences need it), so its speedup
is below the raw matmul speedup and grows with M. Also printed: the Spearman correlation of the bf16 and fp32
scores (min over facts) and, on CUDA, peak memory. Last line:
`smollm2_bf16_over_fp32=X llama1b_bf16_over_fp32=Y smollm2_fp32=.. smollm2_bf16=.. llama1b_fp32=.. llama1b_bf16=..`
(throughput ratios, > 1: bf16 faster; throughputs in facts*edges/s; `-` where not measured).

The figures this benchmark is for need a GPU (CUDA: bf16 tensor cores; fp32 matmuls run without TF32, torch's
default). On a CPU, bf16 speed depends on the instruction set (AVX512-BF16 / AMX or emulation), the batch is
small, and the 1B model is skipped unless --llama1b (it needs ~15 GB of memory there).

    .venv/bin/python benchmarks/gpu.py                 # CUDA: batch 8, M = 5, 5 repeats; CPU: batch 2, M = 2, 3 repeats
    .venv/bin/python benchmarks/gpu.py --quick         # batch 2, M = 2, 1 repeat
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from circuitdyn.engine.attribution import attribute_batch  # noqa: E402
from circuitdyn.engine.forward import make_batch  # noqa: E402
from circuitdyn.engine.graph import Graph  # noqa: E402
from circuitdyn.probes.facts import load_facts  # noqa: E402
from circuitdyn.runs.checkpoints import open_run, resolve_device  # noqa: E402
from circuitdyn.runs.gguf import default_model_dir  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def build_llama1b(out: Path, device: torch.device) -> Path:
    """A random-init model of the Llama-3.2-1B shape saved as an HF folder (bf16 weights, SmolLM2 tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    for name in TOKENIZER_FILES:
        if (default_model_dir() / name).exists():
            shutil.copy(default_model_dir() / name, out / name)
    return out


def measure(name: str, path: Path, device: torch.device, n_facts: int, steps: int, repeats: int) -> tuple[float, float]:
    """Throughputs (facts*edges/s) of fp32 and bf16 EAP-IG on one batch, timed alternately."""
    t0 = time.perf_counter()
    models = {}
    for dtype in ("float32", "bfloat16"):
        models[dtype] = open_run(path, device=device, dtype=dtype).load_model(0)
    model = models["float32"]
    facts = list(load_facts(None, model.tokenizer, limit=n_facts))
    batch = make_batch(model, facts)
    n_edges = Graph.from_model(model).n_edges
    cfg = model.cfg
    print(
        f"{name}: {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_key_value_heads or cfg.n_heads} KV), "
        f"d_model {cfg.d_model}, {n_edges} edges; batch {n_facts} x {batch.clean.shape[1]} positions; M = {steps}; "
        f"load {time.perf_counter() - t0:.1f}s"
    )
    times: dict[str, list[float]] = {d: [] for d in models}
    peak: dict[str, float] = {}
    scores: dict[str, torch.Tensor] = {}

    def run(dtype: str) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t = time.perf_counter()
        scores[dtype] = attribute_batch(models[dtype], batch, "eap-ig", steps).cpu()
        sync(device)
        times[dtype].append(time.perf_counter() - t)
        if device.type == "cuda":
            peak[dtype] = torch.cuda.max_memory_allocated(device) / 2**30

    if repeats > 1 or device.type != "cpu":  # warm-up (kernels, allocator); not counted
        for dtype in models:
            attribute_batch(models[dtype], batch, "eap-ig", 1)
    for r in range(repeats):
        for dtype in ("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32"):
            run(dtype)
    rate = {d: n_facts * n_edges / statistics.median(ts) for d, ts in times.items()}
    rho = min(spearman(scores["bfloat16"][b], scores["float32"][b]) for b in range(n_facts))
    for d in models:
        mem = f", peak {peak[d]:.1f} GiB" if d in peak else ""
        print(
            f"  {d:9s} {statistics.median(times[d]):7.2f} s/batch  {rate[d]:12.4g} facts*edges/s  "
            f"(repeats {', '.join(f'{t:.2f}' for t in times[d])}{mem})"
        )
    print(f"  bf16 vs fp32 scores: Spearman over all edges, min over facts {rho:.4f}")
    models.clear()  # run() holds the dict and the batch: free the weights and inputs before the next model
    batch = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rate["float32"], rate["bfloat16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    ap.add_argument("--quick", action="store_true", help="batch 2, M = 2, 1 repeat")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="IG steps M")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--llama1b", action="store_true", help="also the 1B model on a CPU (skipped there by default)")
    ap.add_argument("--no-llama1b", action="store_true", help="skip the 1B model")
    args = ap.parse_args()
    device = resolve_device(args.device)
    gpu = device.type != "cpu"
    n_facts = args.batch or (8 if gpu and not args.quick else 2)
    steps = args.steps or (5 if gpu and not args.quick else 2)
    repeats = args.repeats or (1 if args.quick else 5 if gpu else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(
        f"device {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32}"
    )
    if not gpu:
        print("NOTE: running on the CPU. The GPU figures need a GPU: run this script on a CUDA machine.")

    results: dict[str, tuple[float, float]] = {}
    results["smollm2"] = measure("smollm2", default_model_dir(), device, n_facts, steps, repeats)
    if (gpu or args.llama1b) and not args.no_llama1b:
        with tempfile.TemporaryDirectory(prefix="circuitdyn-llama1b-") as tmp:
            t = time.perf_counter()
            path = build_llama1b(Path(tmp) / "llama1b", device)
            print(f"llama1b: random-init Llama-3.2-1B shape written in {time.perf_counter() - t:.1f}s")
            results["llama1b"] = measure("llama1b", path, device, n_facts, steps, repeats)
    else:
        print("llama1b: skipped on the CPU (pass --llama1b to run it with this batch)")

    def fmt(key: str, i: int | None) -> str:
        if key not in results:
            return "-"
        fp32, bf16 = results[key]
        return f"{bf16 / fp32:.2f}" if i is None else f"{results[key][i]:.4g}"

    print(
        " ".join(
            [
                f"smollm2_bf16_over_fp32={fmt('smollm2', None)}",
                f"llama1b_bf16_over_fp32={fmt('llama1b', None)}",
                f"smollm2_fp32={fmt('smollm2', 0)}",
                f"smollm2_bf16={fmt('smollm2', 1)}",
                f"llama1b_fp32={fmt('llama1b', 0)}",
                f"llama1b_bf16={fmt('llama1b', 1)}",
                f"device={device.type}",
            ]
        )
    )


if __name__ == "__main__":
    main()

"""Extraction on a local Ray cluster vs. a plain local run, and what a big grid costs (measured + projected).

1. ray_over_local: the same grid (a two-epoch run of the embedded SmolLM2-135M-Instruct, epoch_1 = epoch_0
   plus small noise; N seed facts; EAP-IG M steps) extracted with `extract_run(...)` and with
   `extract_run(..., Compute(ray="auto"))` on a local cluster of this machine's CPUs, alternately, each into a fresh
   folder; ray_over_local is the median over rounds of the ratio within a round (a round runs both back to
   back, so load from other jobs hits both alike), ray_over_local_of_medians the ratio of the medians. The
   cluster is started once before the timing (its start-up time is printed as ray_startup_s); one untimed
   round of each warms up the files and Ray's workers. Ray runs one task per CPU with one thread each; the
   local run uses `--threads` torch threads (default 1: on this shared 2-core machine two OpenMP threads ran
   one epoch 8x slower than one, 160 s vs. 21 s, because other jobs keep a core busy and the threads wait on
   each other). Alongside, ray_over_local_one_task times epoch 0 as a single Ray task against the same epoch
   locally: what Ray costs without the parallelism it buys (a worker, its own model load, the shard written
   and assembled). Ray starts its workers at niceness 15 (they yield to every other process); on a machine
   shared with other jobs that measures the other jobs, not Ray, so the cluster here runs them at niceness 0
   like the local run (`worker_niceness`). Scores are checked equal (max_abs_diff). Target: ray_over_local
   <= 1.3 on 2 CPUs.
2. Cost model: from the local rounds, the measured cost of one task's model load (open_run + load_model,
   timed apart) and of one fact (attribution + faithfulness of its top-1000 circuit, per fact) on this
   machine (at --steps; scaled to --table-steps by FLOPs), and the measured bytes per fact of a dense float32
   circuit file. With `--table` it prints the
   README's table: wall time and storage of 100 / 1,000 / 10,000 facts x 10 epochs on 1, 8 and 64 GPUs for
   SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B. Those are **projections**: per-fact time scales with the
   model's FLOPs per fact (2 x matmul parameters x tokens x (3M + 3) forward-equivalents: M forward and M
   backward IG steps, the clean, corrupted and patched runs), converted from this CPU's measured FLOP rate
   to an assumed effective GPU rate (`--gpu-tflops`, default 50 TFLOP/s: an H100-class GPU at ~5 % of its
   dense bf16 peak, which is what small batches of short prompts reach, an assumption, not a measurement);
   model load scales with parameter bytes from the measured SmolLM2 load; tasks are split as `extract --ray`
   splits them (`default_shard_size`) and run in whole rounds. Storage is computed from the file format
   (`circuitdyn.engine.circuits`) and each model's edge count.

Last line: `ray_over_local=X ray_over_local_one_task=Y ray_over_local_of_medians=Z local_s=.. ray_s=..
ray_startup_s=.. max_abs_diff=.. fact_s=.. load_s=.. bytes_per_fact=..`.

    .venv/bin/python benchmarks/scale.py [--facts 4] [--steps 2] [--batch-size 2] [--repeats 3] \\
        [--table [--table-steps 5]]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from epoch_switch import make_run

from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.settings import AttributionSettings, Compute
from circuitdyn.pipeline.extraction import default_shard_size, extract_run
from circuitdyn.probes.facts import load_facts
from circuitdyn.runs.checkpoints import open_run


@dataclass(frozen=True)
class Shape:
    """What the cost model needs of a model: its attribution graph and its matmul parameters."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_mlp: int
    vocab: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token (attention projections and gated MLP of every layer)."""
        attn = 2 * self.d_model * self.n_heads * self.d_head + 2 * self.d_model * self.n_kv_heads * self.d_head
        return self.n_layers * (attn + 3 * self.d_model * self.d_mlp)

    @property
    def weight_bytes(self) -> int:
        """float32 weights (embeddings included): what a task loads."""
        return 4 * (self.matmul_params + self.vocab * self.d_model)

    @property
    def edges(self) -> int:
        return Graph(self.n_layers, self.n_heads).n_edges

    @property
    def nodes(self) -> int:
        return len(Graph(self.n_layers, self.n_heads).nodes)


SMOLLM2 = Shape("SmolLM2-135M", 30, 9, 3, 576, 1536, 49152)
MODELS = (
    SMOLLM2,
    Shape("Llama-3.2-1B", 16, 32, 8, 2048, 8192, 128256),
    Shape("Llama-3.1-8B", 32, 32, 8, 4096, 14336, 128256),
)


def flops_per_fact(shape: Shape, tokens: float, steps: int) -> float:
    """Forward-equivalent matmul FLOPs of one fact: M IG forwards + M backwards (2x) + clean, corrupted, patched."""
    return 2 * shape.matmul_params * tokens * (3 * steps + 3)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def storage(shape: Shape, facts: int, epochs: int) -> dict[str, float]:
    """Bytes on disk of facts x epochs circuits (`circuitdyn.engine.circuits` format): dense float32 / float16, and
    sparse top-1000 float16 with node totals; one edge-name header (~22 bytes/edge) per epoch file."""
    header = 22 * shape.edges * epochs
    return {
        "fp32": 4 * shape.edges * facts * epochs + header,
        "fp16": 2 * shape.edges * facts * epochs + header,
        "sparse": (1000 * 6 + 4 * shape.nodes) * facts * epochs + header,
    }


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1e3:.3g} KB"


def human_time(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"


def projected_wall(facts: int, epochs: int, gpus: int, fact_s: float, load_s: float, batch: int) -> float:
    """Wall time of `extract --ray` on `gpus` GPUs: tasks split by `default_shard_size`, run in whole rounds."""
    shard = default_shard_size(facts, epochs, gpus, batch)
    shard = math.ceil(shard / batch) * batch
    per_epoch = math.ceil(facts / shard)
    rounds = math.ceil(epochs * per_epoch / gpus)
    return rounds * (load_s + min(shard, facts) * fact_s)


def table(
    fact_s: float, load_s: float, tokens: float, measured_steps: int, steps: int, gpu_tflops: float, batch: int
) -> str:
    cpu_rate = flops_per_fact(SMOLLM2, tokens, measured_steps) / fact_s
    lines = [
        (
            f"Measured on this CPU for SmolLM2-135M: {fact_s:.2f} s per fact at EAP-IG M={measured_steps} "
            f"({cpu_rate / 1e9:.1f} GFLOP/s effective), model load {load_s:.1f} s, {tokens:.0f} tokens per fact. "
            f"Projected below: M={steps}, {gpu_tflops:g} effective TFLOP/s per GPU, batch {batch}."
        ),
        "",
        "| model | facts x 10 epochs | 1 GPU | 8 GPUs | 64 GPUs | storage fp32 / fp16 / sparse top-1000 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for shape in MODELS:
        f_s = flops_per_fact(shape, tokens, steps) / (gpu_tflops * 1e12)
        l_s = load_s * shape.weight_bytes / SMOLLM2.weight_bytes
        for facts in (100, 1000, 10000):
            walls = [human_time(projected_wall(facts, 10, g, f_s, l_s, batch)) for g in (1, 8, 64)]
            st = storage(shape, facts, 10)
            lines.append(
                f"| {shape.name} ({shape.edges:,} edges) | {facts:,} | {' | '.join(walls)} | "
                f"{human_bytes(st['fp32'])} / {human_bytes(st['fp16'])} / {human_bytes(st['sparse'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--table-steps", type=int, default=5, help="EAP-IG steps the cost table is for")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-tflops", type=float, default=50.0, help="assumed effective TFLOP/s of one GPU")
    parser.add_argument("--table", action="store_true", help="print the README's cost table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local run (see above)")
    args = parser.parse_args()
    import ray

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run").mkdir()
        root = make_run(Path(tmp) / "run")
        run = open_run(root)
        facts = load_facts(None, run.tokenizer(), limit=args.facts)
        tokens = statistics.mean(len(f.clean_tokens) + len(f.answer_tokens) for f in facts)
        # Ray's memory monitor kills workers when the *machine* is above 95 % memory; on a machine shared with
        # other jobs that is their memory, and every kill restarts a task: this measurement leaves it off.
        os.environ["RAY_memory_monitor_refresh_ms"] = "0"
        startup = timed(
            lambda: ray.init(
                include_dashboard=False,
                logging_level="warning",
                log_to_driver=False,
                _system_config={"worker_niceness": 0},
            )
        )
        load_s = statistics.median(timed(lambda e=e: open_run(root).load_model(e)) for e in (0, 1, 0))
        walls: dict[tuple[str, bool], list[float]] = {}
        n = 0

        def once(grid: str, on_ray: bool, record: bool = True) -> Path:
            """`grid` "all": both epochs (Ray: one task per CPU); "one": epoch 0 only, as one Ray task."""
            nonlocal n
            n += 1
            out = Path(tmp) / f"out{n}"
            epochs = [0, 1] if grid == "all" else [0]
            settings = AttributionSettings(steps=args.steps)
            compute = Compute(
                args.batch_size, ray="auto" if on_ray else None, shard_size=None if grid == "all" else args.facts
            )
            wall = timed(lambda: extract_run(open_run(root), facts, out, epochs, settings, compute))
            if record:
                walls.setdefault((grid, on_ray), []).append(wall)
            return out

        ref, warm = once("all", False, record=False), once("all", True, record=False)
        diff = max(
            (CircuitSet.load(p).scores - CircuitSet.load(warm / p.name).scores).abs().max().item()
            for p in ref.glob("*.safetensors")
        )
        bytes_per_fact = statistics.mean(p.stat().st_size for p in ref.glob("*.safetensors")) / args.facts
        for i in range(args.repeats):
            for grid in ("all", "one"):
                for on_ray in (False, True) if i % 2 == 0 else (True, False):
                    shutil.rmtree(once(grid, on_ray))
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in walls.items()}
    fact_s = (med[("one", False)] - load_s) / args.facts  # one epoch: a fresh model load, then the facts
    print(
        f"grid: 2 epochs x {args.facts} facts of SmolLM2-135M, EAP-IG M={args.steps}, batch {args.batch_size}; "
        f"{os.cpu_count()} CPUs; local run: torch threads {torch.get_num_threads()}; Ray: one task per CPU"
    )
    for (grid, on_ray), v in walls.items():
        what = "both epochs" if grid == "all" else "epoch 0 as one task"
        print(f"{'Ray  ' if on_ray else 'local'} {what}: {[round(x, 1) for x in v]} s")
    if args.table:
        print()
        print(table(fact_s, load_s, tokens, args.steps, args.table_steps, args.gpu_tflops, 8))
        print()

    def paired(grid: str) -> float:
        """Median over rounds of Ray's time over the local time of the same round (run back to back)."""
        return statistics.median(r / loc for r, loc in zip(walls[(grid, True)], walls[(grid, False)]))

    print(
        f"ray_over_local={paired('all'):.3f} ray_over_local_one_task={paired('one'):.3f} "
        f"ray_over_local_of_medians={med[('all', True)] / med[('all', False)]:.3f} "
        f"local_s={med[('all', False)]:.1f} ray_s={med[('all', True)]:.1f} ray_startup_s={startup:.1f} "
        f"max_abs_diff={diff:.2e} fact_s={fact_s:.3f} load_s={load_s:.2f} bytes_per_fact={bytes_per_fact:.0f}"
    )


if __name__ == "__main__":
    main()

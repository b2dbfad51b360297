"""Attribution at scale on the embedded SmolLM2-135M-Instruct: batching, memory per fact, storage, IG quadrature.

Measured side by side in one run (each timing in a fresh subprocess, so its peak memory is its own; B = 1 and
B = 32 alternate, so load from other jobs on a shared CPU hits both alike):

- batching: seconds per fact of EAP-IG (3 steps, the default grid) for 4 facts attributed one at a time
  (B = 1) and for 32 facts in one batch (B = 32), chat-templated seed probes (~60 positions); one torch
  thread, then (one repeat) the default threads. `b32_over_b1_per_fact` is the ratio of the medians of
  CPU seconds per fact at one thread (the work per fact; wall-clock seconds, printed too, move with the load
  of other jobs on a shared CPU).
- memory: peak resident memory of the B = 32 run minus that of the B = 1 run, per additional fact
  (`mib_per_fact`).
- storage: the B = 32 scores written with `CircuitSet.save` (float16 scaled per fact, the default):
  `bytes_per_fact_edge` is the file size over facts x edges; Spearman of the stored scores against the float32
  ones (min over facts), and the share of score mass the sparse mode keeps at k = 1000.
- quadrature: per fact (4 plain-prompt probes), the distance of m-step EAP-IG scores (m = 2, 3, 5, 10) under
  each rule to a 64-step Gauss-Legendre reference (weighted-Jaccard distance, 1 - Spearman, and the top-200
  circuit's edge-set distance), next to the method noise of the same statistic (the distance between the
  reference and the reference under another corruption, `noise.replicates`' "other corruption"). A rule and
  m reach the reference when the median fact's weighted-Jaccard error is below a tenth of its method noise;
  the cheapest (in forward+backward passes) is the default. `quadrature_error_ratio` = median over facts of
  the default rule's error over the right-Riemann grid's error at the same m.

Last line: `b32_over_b1_per_fact=X mib_per_fact=Y bytes_per_fact_edge=Z quadrature_error_ratio=Q`.
Targets: X <= 0.6, Y <= 150, Z <= 2.1, Q <= 0.5.

    .venv/bin/python benchmarks/scaling.py            # ~25 min on the shared 2-core CPU under load (estimated ~6 quiet)
    .venv/bin/python benchmarks/scaling.py --quick    # B = 8 instead of 32, 1 repeat, m = 2, 3 only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def _model_and_facts(n: int, template: str, variant: int = 0):
    from circuitdyn.probes.probes import build_fact_prompts, load_probes
    from circuitdyn.runs.checkpoints import open_run
    from circuitdyn.runs.gguf import default_model_dir

    model = open_run(default_model_dir()).load_model(0)
    probes = load_probes()
    return model, build_fact_prompts(probes[:n], model.tokenizer, template=template, pool=probes, variant=variant)


def worker(args: argparse.Namespace) -> None:
    """One timed attribution in this process: prints JSON (seconds per fact, peak memory over the baseline)."""
    from circuitdyn.engine.attribution import attribute
    from circuitdyn.engine.settings import AttributionSettings, Compute

    torch.set_num_threads(args.threads)
    model, facts = _model_and_facts(args.facts, "auto")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    scores = attribute(model, facts, AttributionSettings("eap-ig", STEPS), Compute(batch_size=args.batch))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.save:
        torch.save(scores, args.save)
    print(
        json.dumps(
            {
                "wall_per_fact": wall / len(facts),
                "cpu_per_fact": cpu / len(facts),
                "peak_mib": peak / 1024,
                "base_mib": base / 1024,
            }
        )
    )


def run_worker(facts: int, batch: int, threads: int, save: str | None = None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--facts",
        str(facts),
        "--batch",
        str(batch),
        "--threads",
        str(threads),
    ] + (["--save", save] if save else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def batching(big: int, repeats: int, tmp: Path, default_threads: bool = True) -> tuple[float, float, Path]:
    from circuitdyn.engine.memory import default_threads as cores

    runs: dict[tuple[int, int], list[dict]] = {}
    plan = [(1, b) for _ in range(repeats) for b in (1, big)]
    if default_threads and cores() > 1:
        plan += [(cores(), b) for b in (1, big)]
    save = tmp / "scores.pt"
    for threads, b in plan:
        r = run_worker(4 if b == 1 else big, b, threads, str(save) if b == big and threads == 1 else None)
        runs.setdefault((threads, b), []).append(r)
        print(
            f"  threads {threads} B={b:<3d} {r['wall_per_fact']:6.2f} s/fact wall, {r['cpu_per_fact']:6.2f} s/fact "
            f"CPU, peak {r['peak_mib']:7.0f} MiB (model loaded: {r['base_mib']:.0f})",
            flush=True,
        )

    def med(threads: int, b: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(threads, b)])

    for threads in sorted({t for t, _ in runs}):
        wall = med(threads, big, "wall_per_fact") / med(threads, 1, "wall_per_fact")
        print(
            f"threads {threads}: B={big} over B=1 per fact: wall {wall:.2f}, "
            f"CPU {med(threads, big, 'cpu_per_fact') / med(threads, 1, 'cpu_per_fact'):.2f}"
        )
    # CPU seconds at one thread: the work per fact, unmoved by other jobs on a shared CPU (wall-clock printed above)
    x = med(1, big, "cpu_per_fact") / med(1, 1, "cpu_per_fact")
    per_fact = (med(1, big, "peak_mib") - med(1, 1, "peak_mib")) / (big - 1)
    return x, per_fact, save


def storage(scores_path: Path, tmp: Path) -> float:
    from circuitdyn.analysis.similarity import spearman
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.engine.graph import Graph
    from circuitdyn.runs.checkpoints import open_run
    from circuitdyn.runs.gguf import default_model_dir

    scores = torch.load(scores_path)
    model = open_run(default_model_dir()).load_model(0)
    edges = Graph.from_model(model).edges
    cs = CircuitSet(scores, edges, [f"f{i}" for i in range(len(scores))], {"method": "eap-ig", "ig_steps": STEPS})
    path = cs.save(tmp / "dense16.safetensors")
    F, E = scores.shape
    z = path.stat().st_size / (F * E)
    rho = spearman(CircuitSet.load(path).scores, scores)
    sparse = CircuitSet.load(cs.save(tmp / "sparse.safetensors", top_k=1000))
    mass = sparse.meta["sparse_mass_kept"]
    old = F * E * 4 + len(json.dumps(edges))
    print(
        f"storage: {F} facts x {E} edges: float16 {path.stat().st_size / 1e6:.2f} MB ({z:.3f} bytes/fact/edge; "
        f"format 1 float32: {old / 1e6:.2f} MB); Spearman vs float32 min {float(rho.min()):.6f} median "
        f"{float(rho.median()):.6f}; "
        f"sparse k=1000: {(tmp / 'sparse.safetensors').stat().st_size / F / 1e3:.1f} KB/fact, "
        f"keeps {statistics.median(mass):.1%} of score mass (median, min {min(mass):.1%})"
    )
    return z


def quadrature(ms: list[int], n_facts: int) -> float:
    import numpy as np

    from circuitdyn.analysis.similarity import distances
    from circuitdyn.engine.attribution import attribute, ig_nodes
    from circuitdyn.engine.selection import select_top_n
    from circuitdyn.engine.settings import IG_GRIDS, AttributionSettings, Compute

    torch.set_num_threads(1)
    model, facts = _model_and_facts(4 * n_facts, "plain")
    _, other = _model_and_facts(4 * n_facts, "plain", variant=1)
    # facts with another swap partner of the same token length, so that their method noise is measured
    keep = [i for i, (f, g) in enumerate(zip(facts, other)) if f.corrupted_tokens != g.corrupted_tokens][:n_facts]
    facts, other = [facts[i] for i in keep], [other[i] for i in keep]

    def ig(fs, grid: str, m: int) -> torch.Tensor:
        return attribute(model, fs, AttributionSettings("eap-ig", m, grid), Compute(batch_size=len(fs)))  # type: ignore[arg-type]

    def dist(a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
        return distances(a, b, select_top_n(a, 200), select_top_n(b, 200))

    t = time.perf_counter()
    ref = ig(facts, "gauss", 64)
    noise = dist(ref, ig(other, "gauss", 64))
    measured = noise["weighted_jaccard"] > 0  # a fact with no other swap partner measured no noise
    print(
        f"quadrature: {len(facts)} facts ({int(measured.sum())} with a measured noise), 64-step reference and its "
        f"other-corruption replicate "
        f"{time.perf_counter() - t:.0f}s; method noise (median over facts): "
        + ", ".join(f"{k} {np.median(v):.3f}" for k, v in noise.items())
    )
    err: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def of_noise(k: tuple[str, int]) -> float:
        return float(np.median(err[k]["weighted_jaccard"][measured] / noise["weighted_jaccard"][measured]))

    print(
        f"  {'rule':>8} {'m':>3} {'passes':>6} {'w-jaccard':>9} {'1-spearman':>10} {'top-200 edges':>13} "
        f"{'err/noise':>9}"
    )
    for m in ms:
        for grid in IG_GRIDS:
            err[grid, m] = dist(ig(facts, grid, m), ref)
            passes = m + (0 if 1.0 in ig_nodes(grid, m)[0] else 0.5)  # a clean forward is ~half a step
            ratio = of_noise((grid, m))
            print(
                f"  {grid:>8} {m:>3} {passes:>6.1f} {np.median(err[grid, m]['weighted_jaccard']):9.4f} "
                f"{np.median(err[grid, m]['spearman']):10.4f} {np.median(err[grid, m]['edge_jaccard']):13.3f} "
                f"{ratio:9.3f}",
                flush=True,
            )
    cost = {(g, m): m + (0 if 1.0 in ig_nodes(g, m)[0] else 0.5) for g, m in err}
    ok = [k for k in err if of_noise(k) <= 0.1]
    best = min(ok, key=lambda k: (cost[k], np.median(err[k]["weighted_jaccard"]))) if ok else None
    print(f"cheapest rule within a tenth of method noise: {best}")
    grid = best[0] if best else "gauss"
    m_q = best[1] if best else ms[-1]
    if grid == "right":
        grid = "gauss"
    q = float(np.median(err[grid, m_q]["weighted_jaccard"] / err["right", m_q]["weighted_jaccard"]))
    print(f"{grid} over right at m={m_q}: weighted-Jaccard error ratio {q:.3f} (median over facts)")
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B = 8, one repeat, m = 2 and 3 only")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of B = 1 and B = 32 at one thread")
    ap.add_argument(
        "--no-default-threads",
        action="store_true",
        help="skip the runs with the default threads (meaningless while other jobs load the CPU)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--facts", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    big = 8 if args.quick else 32
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = time.perf_counter()
        x, y, scores = batching(big, 1 if args.quick else args.repeats, tmp, not args.no_default_threads)
        print(f"batching {time.perf_counter() - t:.0f}s", flush=True)
        z = storage(scores, tmp)
    t = time.perf_counter()
    q = quadrature([2, 3] if args.quick else [2, 3, 5, 10], 4)
    print(f"quadrature {time.perf_counter() - t:.0f}s")
    print(
        f"b32_over_b1_per_fact={x:.2f} mib_per_fact={y:.0f} bytes_per_fact_edge={z:.3f} quadrature_error_ratio={q:.2f}"
    )


if __name__ == "__main__":
    main()

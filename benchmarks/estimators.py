"""Faithful circuits at the price of attribution? EAP, EAP-IG and RelP against exact patching.

For each fact (a seeded sample of the packaged validation probes on the embedded SmolLM2-135M-Instruct, or
random facts on a tiny random Llama-like model with `--tiny`), each estimator's scores are compared with
- exact single-edge patching (`patching.exact_edge_effects`): Spearman rank correlation per fact, on
  `--edges` edges drawn uniformly at random per fact (all edges when the graph has fewer; exact patching
  of SmolLM2's 123,211 edges costs one patched forward each, too slow here), and on the union of each
  method's top `--top` edges by |score| (the edges a circuit is made of; a subset no method is favoured in),
  and on the uniform sample without the edges into q and k (RelP scores those 0: its attention rule holds the
  pattern constant, so only values carry relevance; ties at 0 cost it rank correlation on them);
- faithfulness integrated over circuit sizes, MIB circuit-track style: each fact's top-k circuit (k a
  fraction of all edges, on the grid `FRACTIONS`) is evaluated by exact patching of everything outside it
  (`CircuitEvaluator.faithfulness`); CPR = area under faithfulness(k) over k in [0, 1] (trapezoid; higher
  is better), CMD = area under |1 - faithfulness(k)| (lower is better). Also reported on a log axis
  (`cpr_log`: mean over the log-spaced grid, which weighs small circuits as much as large ones).
- cost: per-fact attribution time of each method relative to EAP, measured interleaved (every round runs
  the three methods on every fact, in a rotating order) in this one process.
EAP-IG is the default rule (midpoint, 3 steps). Facts whose gap m_clean - m_corrupted is below
`faithfulness.MIN_GAP` are skipped (their faithfulness is not interpretable) and the next ones sampled.

    .venv/bin/python benchmarks/estimators.py --tiny              # seconds, a check that it runs
    .venv/bin/python benchmarks/estimators.py --facts 4 --threads 1

The last line reads `relp_spearman_vs_exact=A eapig_spearman_vs_exact=B relp_cpr=C eapig_cpr=D
relp_cost_over_eap=E eap_spearman_vs_exact=F eap_cpr=G eapig_cost_over_eap=H` (Spearman: the mean over facts
on the uniform edge sample; CPR: mean over facts, linear axis). Measured numbers: see the README (RelP).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_models import smollm2_model_and_facts, tiny_model_and_facts  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from circuitdyn.engine.attribution import attribute_batch  # noqa: E402
from circuitdyn.engine.faithfulness import MIN_GAP, CircuitEvaluator  # noqa: E402
from circuitdyn.engine.forward import make_batch  # noqa: E402
from circuitdyn.engine.patching import exact_edge_effects  # noqa: E402
from circuitdyn.engine.selection import select_top_n  # noqa: E402

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Circuit sizes as fractions of the graph's edges (MIB's grid); k = 0 (faithfulness 0) is added for the area."""

METHODS = {"eap": ("eap", 1), "eapig": ("eap-ig", 3), "relp": ("relp", 1)}
"""Name in the output -> (attribution method, steps); EAP-IG on the default midpoint rule."""


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def areas(fracs: list[float], faith: list[float]) -> tuple[float, float, float]:
    """(CPR, CMD, log-axis CPR) of one faithfulness curve, with k = 0 -> faithfulness 0 prepended."""
    k = np.array([0.0, *fracs])
    f = np.array([0.0, *faith])
    cpr = float(np.trapezoid(f, k))
    cmd = float(np.trapezoid(np.abs(1 - f), k))
    return cpr, cmd, float(np.mean(faith))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and random facts (a quick check)")
    ap.add_argument("--facts", type=int, default=4, help="facts to measure (default 4)")
    ap.add_argument("--edges", type=int, default=256, help="edges sampled uniformly per fact for exact patching")
    ap.add_argument("--top", type=int, default=32, help="each method's top edges added to the exact-patching set")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    if args.tiny:
        model, pool = tiny_model_and_facts(20 * args.facts, args.seed)
    else:
        model, pool = smollm2_model_and_facts(3 * args.facts, args.seed)
    # Keep the first `facts` facts whose corruption moves the metric by MIN_GAP or more.
    ev = CircuitEvaluator(model, pool, seed=args.seed)
    gaps = (ev.m_clean - ev.m_corr).tolist()
    keep = [i for i, g in enumerate(gaps) if g >= MIN_GAP][: args.facts]
    skipped = [f"{pool[i].fact_id} ({gaps[i]:.2f})" for i in range(max(keep, default=-1) + 1) if i not in keep]
    facts = [pool[i] for i in keep]
    if not facts:
        raise SystemExit("no fact with a gap >= MIN_GAP")
    print(
        f"{'tiny random model' if args.tiny else 'SmolLM2-135M-Instruct'}: {len(facts)} facts "
        f"(gaps {', '.join(f'{gaps[i]:.2f}' for i in keep)} nats); skipped for gap < {MIN_GAP:g}: "
        f"{', '.join(skipped) or '-'}",
        flush=True,
    )
    ev = CircuitEvaluator(model, facts, seed=args.seed)
    E = ev.graph.n_edges
    batches = [make_batch(model, [f], args.seed) for f in facts]

    # --- attribution, timed interleaved: round r runs the methods in a rotating order on every fact ----
    names = list(METHODS)
    times = {m: [0.0] * len(facts) for m in names}
    scores: dict[str, list[torch.Tensor]] = {m: [torch.empty(0)] * len(facts) for m in names}
    for r in range(args.rounds):
        for j, batch in enumerate(batches):
            for m in names[r % 3 :] + names[: r % 3]:
                method, steps = METHODS[m]
                t = time.perf_counter()
                s = attribute_batch(model, batch, method, steps)  # type: ignore[arg-type]
                dt = time.perf_counter() - t
                times[m][j] = dt if r == 0 else min(times[m][j], dt)  # fastest of the rounds
                scores[m][j] = s[0].cpu()
    per_fact = {m: statistics.mean(times[m]) for m in names}
    print(
        f"attribution time per fact (fastest of {args.rounds} interleaved rounds): "
        f"{', '.join(f'{m} {per_fact[m]:.2f} s' for m in names)}",
        flush=True,
    )

    # --- Spearman with exact single-edge patching -----------------------------------------------------
    rng = np.random.default_rng(args.seed)
    rho: dict[str, list[float]] = {m: [] for m in names}
    rho_top: dict[str, list[float]] = {m: [] for m in names}
    rho_vmo: dict[str, list[float]] = {m: [] for m in names}  # uniform sample, edges into q and k left out
    qk = np.array([e.endswith(("<q>", "<k>")) for e in ev.graph.edges])
    sampled = E > args.edges
    t = time.perf_counter()
    for j, (f, batch) in enumerate(zip(facts, batches)):
        uniform = np.sort(rng.choice(E, args.edges, replace=False)) if sampled else np.arange(E)
        top = sorted(set().union(*(scores[m][j].abs().topk(min(args.top, E)).indices.tolist() for m in names)))
        wanted = sorted(set(uniform.tolist()) | set(top))
        true = exact_edge_effects(model, batch, wanted)[0].cpu()
        pos = {e: i for i, e in enumerate(wanted)}
        iu, it = [pos[e] for e in uniform.tolist()], [pos[e] for e in top]
        iv = [pos[e] for e in uniform.tolist() if not qk[e]]
        for m in names:
            s = scores[m][j][wanted]
            rho[m].append(spearman(s[iu], true[iu]))
            rho_top[m].append(spearman(s[it], true[it]))
            rho_vmo[m].append(spearman(s[iv], true[iv]))
        print(
            f"  {f.fact_id}: exact effects of {len(wanted)} edges; Spearman uniform "
            f"{', '.join(f'{m} {rho[m][-1]:.3f}' for m in names)}; uniform without q/k edges ({len(iv)}) "
            f"{', '.join(f'{m} {rho_vmo[m][-1]:.3f}' for m in names)}; top-{args.top} union ({len(top)}) "
            f"{', '.join(f'{m} {rho_top[m][-1]:.3f}' for m in names)}",
            flush=True,
        )
    print(
        f"exact patching: {time.perf_counter() - t:.0f} s; Spearman over "
        f"{f'{args.edges} edges sampled uniformly per fact (of {E})' if sampled else f'all {E} edges'}",
        flush=True,
    )

    # --- faithfulness over circuit sizes (CPR, CMD) ---------------------------------------------------
    t = time.perf_counter()
    sizes = [max(1, round(k * E)) for k in FRACTIONS]
    fracs = [n / E for n in sizes]
    curve = {m: np.zeros((len(facts), len(sizes))) for m in names}
    for m in names:
        S = torch.stack(scores[m])
        for c, n in enumerate(sizes):
            curve[m][:, c] = ev.faithfulness(select_top_n(S, n)).numpy()
    print(f"faithfulness curves: {len(sizes)} sizes x {len(names)} methods, {time.perf_counter() - t:.0f} s")
    res = {m: [areas(fracs, curve[m][j].tolist()) for j in range(len(facts))] for m in names}
    head = " ".join(f"{k:>7g}" for k in FRACTIONS)
    print(f"{'fact':<28} {'method':<6} {head}   CPR    CMD  CPRlog  rho_unif rho_top")
    for j, f in enumerate(facts):
        for m in names:
            vals = " ".join(f"{v:7.3f}" for v in curve[m][j])
            cpr, cmd, cprl = res[m][j]
            print(
                f"{f.fact_id[:28]:<28} {m:<6} {vals} {cpr:6.3f} {cmd:6.3f} {cprl:6.3f}  {rho[m][j]:7.3f} "
                f"{rho_top[m][j]:7.3f}"
            )
    mean = {
        m: {k: float(np.mean([r[i] for r in res[m]])) for i, k in enumerate(("cpr", "cmd", "cpr_log"))} for m in names
    }
    for m in names:
        print(
            f"mean over {len(facts)} facts, {m:<5}: Spearman uniform {np.mean(rho[m]):.3f}, without q/k "
            f"{np.mean(rho_vmo[m]):.3f}, top union {np.mean(rho_top[m]):.3f}; CPR {mean[m]['cpr']:.3f}, "
            f"CMD {mean[m]['cmd']:.3f}, CPR (log axis) {mean[m]['cpr_log']:.3f}; "
            f"cost {per_fact[m] / per_fact['eap']:.2f}x EAP"
        )
    print(f"wall_s={time.perf_counter() - t0:.0f}")
    print(
        f"relp_spearman_vs_exact={np.mean(rho['relp']):.3f} eapig_spearman_vs_exact={np.mean(rho['eapig']):.3f} "
        f"relp_cpr={mean['relp']['cpr']:.3f} eapig_cpr={mean['eapig']['cpr']:.3f} "
        f"relp_cost_over_eap={per_fact['relp'] / per_fact['eap']:.2f} "
        f"eap_spearman_vs_exact={np.mean(rho['eap']):.3f} eap_cpr={mean['eap']['cpr']:.3f} "
        f"eapig_cost_over_eap={per_fact['eapig'] / per_fact['eap']:.2f}"
    )


if __name__ == "__main__":
    main()

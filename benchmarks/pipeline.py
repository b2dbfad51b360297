"""Faithful circuits at the price of attribution? Per-fact cost of a `faith:0.8` epoch against attribution.

On the embedded SmolLM2-135M-Instruct (chat-templated seed facts, a seeded sample of the packaged probes;
or random facts on a tiny random Llama-like model with `--tiny`), in batches of B = 8 facts, on one thread:

- attribution: `attribution.attribute` (default EAP-IG: midpoint rule, 3 steps);
- selection:   `faith:0.8` on those scores: a `faithfulness.CircuitEvaluator` on the batch (clean and
               corrupted runs) and `selection.smallest_faithful` (exact patched evaluation), cold (a run's
               first epoch);
- warm:        the same search started from the previous epoch's sizes, as a run's later epochs are searched
               (only with `--run RUN --epoch E`: E's facts searched from E - 1's circuit sizes);
- replicates:  the method-noise replicates the change test needs at that epoch: 5 attributions on the
               `shifted` grid with the seeds of `noise.draw_settings("estimation", 5)`, each cut at the
               fact's circuit size (`top_n_by_fact`, no selection).

Every round runs the three stages on every batch in a rotating order (so load from other processes hits
them alike); a stage's time per batch is the fastest of the rounds. Then
(a) = attribution, (b) = attribution + selection, (c) = (b) + replicates, per fact, and

    selection_over_attribution = (b) / (a)       (target <= 1.5: a faithful circuit costs ~ its attribution)
    pipeline_over_attribution  = (c) / (attribution work in (c), i.e. 1 + 5 attributions)   (target <= 2.5)

(c) / (a) is printed too (`pipeline_over_one_attribution`); it is >= 6 by construction (6 attributions).
With `--run`, (b) and (c) use the warm search (`selection_over_attribution`) and the cold one is printed
beside it (`cold_selection_over_attribution`); without, both are the cold search.

    .venv/bin/python benchmarks/pipeline.py --tiny               # seconds, a check that it runs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline.py --facts 8 --rounds 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline.py --run circuitdyn-demo/run --epoch 1 --rounds 2

`--curve N` instead samples each fact's faithfulness at N sizes log-spaced from 50 edges to all of them and
prints, per fact, the search's answer, the first and the largest sampled size below the target, and whether
every sampled size at or above the answer reaches it (how smooth is the curve a search brackets?).

Last line: `selection_over_attribution=X pipeline_over_attribution=Y pipeline_over_one_attribution=Z
cold_selection_over_attribution=C attribution_s=A selection_s=S warm_selection_s=W replicates_s=R` (the last
four: seconds per fact).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_models import smollm2_model_and_facts, tiny_model_and_facts  # noqa: E402

from circuitdyn.analysis.noise import REPLICATE_GRID, draw_settings  # noqa: E402
from circuitdyn.engine.attribution import attribute  # noqa: E402
from circuitdyn.engine.faithfulness import CircuitEvaluator  # noqa: E402
from circuitdyn.engine.selection import Selection, top_n_by_fact  # noqa: E402
from circuitdyn.engine.settings import AttributionSettings, Compute  # noqa: E402
from circuitdyn.probes.probes import FactPrompt  # noqa: E402

B = 8
"""Facts per batch (attribution's and the evaluator's default)."""
REPLICATES = 5
SELECTION = "faith:0.8"
STAGES = ("attribution", "selection", "warm", "replicates")


def run_model_and_facts(path: str, epoch: int, n: int) -> tuple[Any, Any, list[FactPrompt]]:
    """Epochs `epoch - 1` and `epoch` of a CPT run and the first n facts it last extracted circuits for."""
    from circuitdyn.probes.facts import run_facts
    from circuitdyn.runs.checkpoints import open_run

    run = open_run(path)
    return run.load_model(epoch - 1), run.load_model(epoch), list(run_facts(run))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and random facts (a quick check)")
    ap.add_argument("--facts", type=int, default=8, help="facts to measure (default 8: one batch)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", help="a CPT run folder (e.g. circuitdyn-demo/run): measure on its facts and epochs")
    ap.add_argument("--epoch", type=int, default=1, help="with --run: the epoch measured (>= 1; default 1)")
    ap.add_argument("--curve", type=int, metavar="N", help="sample the faithfulness curve at N sizes instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    previous = None
    if args.run:
        previous, model, facts = run_model_and_facts(args.run, args.epoch, args.facts)
    else:
        model, facts = (tiny_model_and_facts if args.tiny else smollm2_model_and_facts)(args.facts, args.seed)
    if args.curve:
        return curve(model, facts, args.curve, args.seed)
    batches = [facts[i : i + B] for i in range(0, len(facts), B)]
    draws = draw_settings("estimation", REPLICATES)
    sel = Selection.parse(SELECTION)
    print(
        f"{'tiny random model' if args.tiny else 'SmolLM2-135M-Instruct'}: {len(facts)} facts in "
        f"{len(batches)} batch(es) of <= {B}, {args.rounds} round(s), {torch.get_num_threads()} thread(s)",
        flush=True,
    )

    stages = [s for s in STAGES if s != "warm" or previous is not None]
    best: dict[str, list[float]] = {s: [float("inf")] * len(batches) for s in stages}
    sizes: list[list[int]] = [[] for _ in batches]
    guesses = []
    for chunk in batches:  # the previous epoch's circuit sizes, for the warm search (untimed)
        if previous is None:
            guesses.append(None)
            continue
        prev_scores = attribute(previous, chunk, AttributionSettings(seed=args.seed), Compute(batch_size=B))
        prev_ev = CircuitEvaluator(previous, chunk, seed=args.seed, batch_size=B)
        guesses.append(sel.select(prev_scores, prev_ev.graph, prev_ev.faithfulness)[0].sum(1))
    for r in range(args.rounds):
        order = stages[r % len(stages) :] + stages[: r % len(stages)]
        for j, chunk in enumerate(batches):
            # selection and replicates need the scores / the circuit sizes: computed (untimed) when absent
            scores = n = None
            for stage in order:
                if stage in ("selection", "warm", "replicates") and scores is None:
                    scores = attribute(model, chunk, AttributionSettings(seed=args.seed), Compute(batch_size=B))
                if stage == "replicates" and n is None:
                    ev = CircuitEvaluator(model, chunk, seed=args.seed, batch_size=B)
                    n = sel.select(scores, ev.graph, ev.faithfulness)[0].sum(1)
                t = time.perf_counter()
                if stage == "attribution":
                    scores = attribute(model, chunk, AttributionSettings(seed=args.seed), Compute(batch_size=B))
                elif stage in ("selection", "warm"):
                    ev = CircuitEvaluator(model, chunk, seed=args.seed, batch_size=B)
                    masks, _ = sel.select(scores, ev.graph, ev.faithfulness, guesses[j] if stage == "warm" else None)
                    n = masks.sum(1)
                else:
                    for d in draws:
                        rep = attribute(
                            model,
                            chunk,
                            AttributionSettings(ig_grid=REPLICATE_GRID, seed=d.seed),
                            Compute(batch_size=B),
                        )
                        top_n_by_fact(rep, n)
                best[stage][j] = min(best[stage][j], time.perf_counter() - t)
            sizes[j] = [int(k) for k in n]  # type: ignore[union-attr]
        print(f"round {r + 1}: " + ", ".join(f"{s} {sum(best[s]) / len(facts):.3f} s/fact" for s in stages), flush=True)
    per = {s: sum(best[s]) / len(facts) for s in stages}
    per.setdefault("warm", per["selection"])
    a, b = per["attribution"], per["attribution"] + per["warm"]
    c = b + per["replicates"]
    print(f"circuit sizes ({SELECTION}): {[k for s in sizes for k in s]}")
    print(
        f"per fact: (a) attribution {a:.3f} s, (b) + selection {b:.3f} s "
        f"({'warm-started' if previous is not None else 'cold'}; cold {a + per['selection']:.3f} s), "
        f"(c) + {REPLICATES} replicates {c:.3f} s"
    )
    print(
        f"selection_over_attribution={b / a:.3f} pipeline_over_attribution={c / (a + per['replicates']):.3f} "
        f"pipeline_over_one_attribution={c / a:.3f} cold_selection_over_attribution={1 + per['selection'] / a:.3f} "
        f"attribution_s={a:.4f} selection_s={per['selection']:.4f} warm_selection_s={per['warm']:.4f} "
        f"replicates_s={per['replicates']:.4f}"
    )


def curve(model: Any, facts: list[FactPrompt], n: int, seed: int) -> None:
    """Where the `faith:0.8` search's answer sits on each fact's sampled faithfulness curve."""
    import numpy as np

    from circuitdyn.engine.faithfulness import faithfulness_curve

    sel = Selection.parse(SELECTION)
    target = sel.value
    scores = attribute(model, facts, AttributionSettings(seed=seed), Compute(batch_size=B))
    ev = CircuitEvaluator(model, facts, seed=seed, batch_size=B)
    found = sel.select(scores, ev.graph, ev.faithfulness)[0].sum(1).tolist()
    sizes = sorted({int(round(x)) for x in np.geomspace(50, ev.graph.n_edges, n)})
    df = faithfulness_curve(model, facts, scores, sizes, seed=seed, batch_size=B)
    print(f"{len(sizes)} sizes from {sizes[0]} to {sizes[-1]} (ratio {sizes[-1] / sizes[-2]:.3f} at the top)")
    stays = 0
    for f, k in zip(facts, found):
        rows = df[df.fact_id == f.fact_id]
        reach = rows[rows.faithfulness >= target].n
        short = rows[rows.faithfulness < target].n
        stays_faithful = bool((rows[rows.n >= k].faithfulness >= target).all())
        stays += stays_faithful
        print(
            f"{f.fact_id}: found {k}, first sampled >= {target}: {reach.min() if len(reach) else '-'}, "
            f"largest sampled < {target}: {short.max() if len(short) else '-'}, "
            f"range [{rows.faithfulness.min():.2f}, {rows.faithfulness.max():.2f}], "
            f"all sampled sizes >= found reach it: {stays_faithful}"
        )
    print(f"facts_staying_faithful_above_found={stays} of {len(facts)}")


if __name__ == "__main__":
    main()

"""How many entities would the stay-put question need? A power curve for circuitdyn's own stay-put test.

"Do circuits stay put while a fact is recalled and change when its recall flips?" is answered in
`timeline.Timeline.stability` by a permutation test stratified by fact (`stats.permutation_test`) beside the
within-fact AUC with its entity-clustered interval (`stats.within_stratum_auc`). Both only use facts that
have retained *and* flipped transitions, so their power depends on how often facts flip. This script runs those
two functions on simulated studies whose parameters come from a pilot run (the demo, see README.md here):

- every fact's recall is a two-state Markov chain over `epochs`: recalled at epoch 0 with probability
  `start`, then acquired with probability `acquire` per epoch while not recalled and forgotten with probability
  `forget` while recalled; a transition is retained (recalled before and after), flipped (recall changed) or
  neither (not used); a share `excluded` of transitions is dropped for a small gap;
- a transition's circuit similarity to the previous epoch is fact mean + entity effect + noise (sd `sd`,
  within a fact), minus `delta` when the recall flipped; `delta` is set from the true within-fact AUC
  (P(a retained similarity > a flipped one)) as delta = sd * sqrt(2) * Phi^-1(AUC).

Per (entities, AUC): the share of studies in which the test claims the effect (p <= 0.05 and AUC > 0.5;
at AUC 0.5 this is the false-positive rate), the coverage of the true AUC by the printed interval (among
studies that print one), the median interval width, the median number of informative facts (with retained
and flipped transitions) and of entities with a usable flipped transition.

    python examples/study/power.py                 # the table in examples/study/README.md (about 10 min)
    python examples/study/power.py --studies 40    # quick look

Last line: `entities_for_width_0.3=N entities_for_power_0.8=M` (at the largest AUC simulated).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import norm

from circuitdyn.analysis.stats import permutation_test, within_stratum_auc


def simulate_study(
    rng: np.random.Generator, n_entities: int, args: argparse.Namespace, auc_true: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One simulated study: (similarity, retained?, fact, entity) per usable transition."""
    delta = args.sd * math.sqrt(2) * norm.ppf(auc_true)
    vals, kept, facts, ents = [], [], [], []
    for e in range(n_entities):
        u = rng.normal(0, args.entity_sd)
        for f in range(args.facts):
            mu = rng.normal(args.mean, args.fact_sd)
            recalled = rng.random() < args.start
            for _ in range(args.epochs):
                now = (rng.random() >= args.forget) if recalled else (rng.random() < args.acquire)
                if (recalled or now) and rng.random() >= args.excluded:
                    retained = recalled and now
                    vals.append(mu + u + rng.normal(0, args.sd) - (0 if retained else delta))
                    kept.append(retained)
                    facts.append(f"e{e}f{f}")
                    ents.append(f"e{e}")
                recalled = now
    return np.asarray(vals), np.asarray(kept, bool), np.asarray(facts), np.asarray(ents)


def curve(args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for n in args.entities:
        for a in args.aucs:
            rng = np.random.default_rng(args.seed + 1000 * n + int(100 * a))
            claims = covered = printed = 0
            widths, informative, flipping = [], [], []
            for s in range(args.studies):
                v, k, f, e = simulate_study(rng, n, args, a)
                test = permutation_test(v, k, f, n_perm=args.n_perm, seed=s)
                est = within_stratum_auc(v, k, f, e)
                claims += bool(test.p_value <= 0.05 and est.value > 0.5)
                informative.append(test.n_strata)
                flipping.append(len(set(e[~k])))
                if est.has_interval:
                    printed += 1
                    covered += est.lo <= a <= est.hi
                    widths.append(est.hi - est.lo)
            rows.append(
                {
                    "entities": n,
                    "auc": a,
                    "claims": claims / args.studies,
                    "studies": args.studies,
                    "coverage": covered / printed if printed else None,
                    "printed": printed,
                    "median_width": float(np.median(widths)) if widths else None,
                    "median_informative_facts": float(np.median(informative)),
                    "median_entities_flipping": float(np.median(flipping)),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, float]]) -> str:
    """The curve as the Markdown table in examples/study/README.md."""
    out = [
        "| entities | true AUC | claims (p <= 0.05, AUC > 0.5) | AUC interval covers | median width | "
        "informative facts | entities with a flip |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cov = f"{r['coverage']:.3f} of {r['printed']}" if r["coverage"] is not None else "none printed"
        width = f"{r['median_width']:.2f}" if r["median_width"] is not None else "-"
        out.append(
            f"| {r['entities']} | {r['auc']:g} | {r['claims']:.3f} of {r['studies']} | {cov} | {width} | "
            f"{r['median_informative_facts']:g} | {r['median_entities_flipping']:g} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entities", type=int, nargs="+", default=[8, 16, 30, 60, 120])
    p.add_argument("--aucs", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--facts", type=int, default=3, help="facts per entity")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--acquire", type=float, default=0.1, help="per-epoch probability an unrecalled fact is acquired")
    p.add_argument("--forget", type=float, default=0.1, help="per-epoch probability a recalled fact is forgotten")
    p.add_argument("--start", type=float, default=0.1, help="probability a fact is recalled at epoch 0")
    p.add_argument("--excluded", type=float, default=0.3, help="share of transitions dropped for a small gap")
    p.add_argument("--mean", type=float, default=0.4, help="mean similarity to the previous epoch")
    p.add_argument("--sd", type=float, default=0.1, help="sd of a fact's similarity across its transitions")
    p.add_argument("--fact-sd", type=float, default=0.1)
    p.add_argument("--entity-sd", type=float, default=0.05)
    p.add_argument("--n-perm", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the settings and the curve as JSON here")
    p.add_argument("--markdown", type=Path, metavar="JSON", help="print the table of a stored curve and exit")
    args = p.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())["curve"]))
        return
    rows = curve(args)
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "markdown")}
        args.out.write_text(json.dumps({"settings": settings, "curve": rows}, indent=1) + "\n")
    top = max(args.aucs)
    wide = [
        r["entities"] for r in rows if r["auc"] == top and r["median_width"] is not None and r["median_width"] <= 0.3
    ]
    strong = [r["entities"] for r in rows if r["auc"] == top and r["claims"] >= 0.8]
    print(
        f"entities_for_width_0.3={min(wide) if wide else 'more'} "
        f"entities_for_power_0.8={min(strong) if strong else 'more'}"
    )


if __name__ == "__main__":
    main()

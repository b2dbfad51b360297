"""Tables (markdown) and a plot (HTML; plotly.js from its CDN) of the multi-seed SmolLM2 reproduction, beside the
paper's released Llama-3.2-1B-Instruct numbers (VFT = plain CPT).

Reads the compact CSVs in this folder (written by `examples/reproduce_paper.py --collect`) and the paper's
release in `tests/data/paper-results/llama3-i-1b/`; writes `tables.md` and `reproduction.html` here (or into
`--out DIR`).
Means are over seeds with a 95 % interval over seeds (`circuitdyn.analysis.stats.bootstrap_ci`, the CR1 t interval)
only from `stats.MIN_ENTITIES` seeds on: with 3 seeds no interval is given (their range is not a 95 %
interval). Per-fact averages use the fact-epochs every other command uses: gap m_clean - m_corrupted >=
`faithfulness.MIN_GAP` (signed, `faithfulness.gap_ok`), and for the Jaccard with the previous epoch at both
epochs; the excluded ones are counted. Because the set of facts passing that filter changes over the epochs,
the per-fact table also gives the same summaries over the facts that pass it at every epoch in every seed,
and each fact's gap and faithfulness per seed and epoch.

    python examples/results/make_tables.py [FOLDER] [--out DIR]   # FOLDER: the CSVs (default: this one);
                                                                  # DIR: where to write (default: FOLDER)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from circuitdyn.analysis.dynamics import load_dynamics
from circuitdyn.analysis.stats import MIN_ENTITIES, bootstrap_ci
from circuitdyn.engine.faithfulness import MIN_GAP, gap_ok

HERE = Path(__file__).resolve().parent
PAPER = HERE.parents[1] / "tests" / "data" / "paper-results" / "llama3-i-1b"


def across_seeds(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per epoch: mean over seeds of `column`, its 95 % interval over seeds, and the number of seeds."""
    rows = []
    for epoch, g in df.groupby("epoch"):
        g = g.dropna(subset=[column])
        if g.empty:
            continue
        est = bootstrap_ci(g[column].astype(float).to_numpy(), g["seed"].to_numpy())
        rows.append({"epoch": int(epoch), "mean": est.value, "lo": est.lo, "hi": est.hi, "seeds": est.n_groups})
    return pd.DataFrame(rows, columns=["epoch", "mean", "lo", "hi", "seeds"]).set_index("epoch")


def fmt(row: pd.Series | None, digits: int = 2) -> str:
    if row is None or (isinstance(row, pd.Series) and np.isnan(row["mean"])):
        return "-"
    if np.isnan(row["lo"]):
        return f"{row['mean']:.{digits}f}"
    return f"{row['mean']:.{digits}f} [{row['lo']:.{digits}f}, {row['hi']:.{digits}f}]"


def row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def paper_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's VFT dynamics table and its task-circuit results per epoch (epoch 0 = baseline)."""
    dyn = load_dynamics(PAPER / "VFT").table().set_index("epoch")
    rows = []
    for epoch in range(11):
        path = (PAPER / "baseline" if epoch == 0 else PAPER / "VFT" / f"epoch_{epoch}") / "circuits" / "results.json"
        if path.is_file():
            r = json.loads(path.read_text())
            rows.append(
                {
                    "epoch": epoch,
                    "baseline_logit_diff": r["baseline"]["logit_diff"],
                    "baseline_hit_at_10": r["baseline"]["hit_at_10"],
                    "circuit_logit_diff": r["mean"]["logit_diff"],
                    "circuit_hit_at_10": r["mean"]["hit_at_10"],
                }
            )
    return dyn, pd.DataFrame(rows).set_index("epoch")


def per_fact_trajectories(facts: pd.DataFrame) -> list[str]:
    """Markdown lines: each fact's gap and gap-filtered faithfulness per seed and epoch."""
    epochs = sorted(facts["epoch"].unique())
    keyed = facts.set_index(["fact_id", "seed", "epoch"])
    pairs = sorted({(f, int(s)) for f, s in zip(facts["fact_id"], facts["seed"], strict=True)})
    lines: list[str] = []
    for title, cell in (
        (
            f"### Per-fact gap m_clean - m_corrupted by epoch (nat; a fact's faithfulness is read where it is "
            f">= {MIN_GAP})",
            lambda r: f"{r['m_clean'] - r['m_corrupted']:.2f}",
        ),
        (
            f"### Per-fact faithfulness by epoch ({', '.join(sorted(facts['selection'].unique()))} circuit; - where "
            "the gap filter excludes the fact)",
            lambda r: f"{r['faithfulness']:.2f}" if r["gap_ok"] else "-",
        ),
    ):
        lines += ["", title, "", row(["fact", "seed", *epochs]), row(["---"] * (2 + len(epochs)))]
        for fact, seed in pairs:
            cells = [cell(keyed.loc[(fact, seed, e)]) if (fact, seed, e) in keyed.index else "" for e in epochs]
            lines.append(row([fact, seed, *cells]))
    return lines


def tables(folder: Path = HERE) -> tuple[str, dict[str, Any]]:
    """The text of `tables.md` from the CSVs in `folder`, and the keyword arguments of `plot`."""
    dyn = pd.read_csv(folder / "dynamics.csv")
    task = pd.read_csv(folder / "task_circuit.csv")
    facts = pd.read_csv(folder / "fact_circuits.csv")
    controls = pd.read_csv(folder / "controls.csv")
    paper_dyn, paper_task = paper_tables()
    n_entities = int(pd.read_csv(folder / "entities.csv").groupby("seed")["entity"].nunique().max())
    seeds = sorted(dyn["seed"].unique())
    done = dyn.groupby("seed")["epoch"].max().to_dict()
    sub = controls.groupby("set")[["n", "subset"]].first()
    out = [
        f"Seeds {', '.join(map(str, seeds))}; last finished epoch per seed: {done}; {n_entities} entities; "
        f"control items per evaluation: "
        + ", ".join(f"{k} {int(v['n'])}{' (subset)' if v['subset'] else ''}" for k, v in sub.iterrows())
        + ".",
        "",
    ]

    cols = {
        c: across_seeds(dyn, c)
        for c in ("learned", "acquired", "retained", "forgotten", "mean_recall", "train_loss", "math", "SocialIQA")
    }
    out += [
        (
            "### Knowledge and control probes by epoch (SmolLM2-135M, mean [95 % interval] over seeds; "
            "paper: Llama-3.2-1B VFT, one run, 100 entities)"
        ),
        "",
        row(
            [
                "epoch",
                "seeds",
                f"learned (of {n_entities})",
                "acquired",
                "retained",
                "forgotten",
                "mean recall",
                "train loss",
                "math",
                "SocialIQA",
                "paper learned (of 100)",
                "paper acq / ret / forg",
                "paper math",
                "paper SocialIQA",
            ]
        ),
        row(["---"] * 14),
    ]
    for epoch in sorted(dyn["epoch"].unique()):
        get = {c: (t.loc[epoch] if epoch in t.index else None) for c, t in cols.items()}
        p = paper_dyn.loc[epoch] if epoch in paper_dyn.index else None
        arf = "-" if p is None or pd.isna(p["acquired"]) else f"{p['acquired']} / {p['retained']} / {p['forgotten']}"
        n_seeds = int(get["learned"]["seeds"]) if get["learned"] is not None else 0
        out.append(
            row(
                [
                    epoch,
                    n_seeds,
                    fmt(get["learned"], 1),
                    fmt(get["acquired"], 1),
                    fmt(get["retained"], 1),
                    fmt(get["forgotten"], 1),
                    fmt(get["mean_recall"], 3),
                    fmt(get["train_loss"], 3),
                    fmt(get["math"], 3),
                    fmt(get["SocialIQA"], 3),
                    "-" if p is None else p["learned"],
                    arf,
                    "-" if p is None else f"{p['math']:.3f}",
                    "-" if p is None else f"{p['SocialIQA']:.3f}",
                ]
            )
        )

    tcols = {
        c: across_seeds(task, c)
        for c in (
            "baseline_logit_diff",
            "baseline_hit_at_10",
            "circuit_logit_diff",
            "circuit_hit_at_10",
            "jaccard_prev",
        )
    }
    steps = ", ".join(map(str, sorted(task["ig_steps"].unique())))
    grid = ", ".join(sorted(task["ig_grid"].unique()))
    out += [
        "",
        (
            f"### Head-of-state task circuit by epoch (EAP-IG {steps} steps, {grid} grid, top 50,000 edges; "
            "full model = the paper's baseline)"
        ),
        "",
        row(
            [
                "epoch",
                "seeds",
                "full model logit diff",
                "full model hit@10",
                "circuit logit diff",
                "circuit hit@10",
                "Jaccard with previous epoch's circuit",
                "paper full model logit diff / hit@10",
                "paper circuit logit diff / hit@10",
            ]
        ),
        row(["---"] * 9),
    ]
    for epoch in sorted(task["epoch"].unique()):
        g = {c: (t.loc[epoch] if epoch in t.index else None) for c, t in tcols.items()}
        p = paper_task.loc[epoch] if epoch in paper_task.index else None
        pb = "-" if p is None else f"{p['baseline_logit_diff']:.2f} / {p['baseline_hit_at_10']:.3f}"
        pc = "-" if p is None else f"{p['circuit_logit_diff']:.2f} / {p['circuit_hit_at_10']:.3f}"
        out.append(
            row(
                [
                    epoch,
                    int((task["epoch"] == epoch).sum()),
                    fmt(g["baseline_logit_diff"]),
                    fmt(g["baseline_hit_at_10"], 3),
                    fmt(g["circuit_logit_diff"]),
                    fmt(g["circuit_hit_at_10"], 3),
                    fmt(g["jaccard_prev"], 3),
                    pb,
                    pc,
                ]
            )
        )

    facts = facts.sort_values(["seed", "fact_id", "epoch"], kind="stable")
    facts["gap_ok"] = gap_ok((facts["m_clean"] - facts["m_corrupted"]).to_numpy(float))
    prev_ok = facts.groupby(["seed", "fact_id"])["gap_ok"].shift(1).fillna(False).astype(bool)
    facts["faith_ok"] = facts["faithfulness"].where(facts["gap_ok"])
    facts["jaccard_ok"] = facts["jaccard_prev"].where(facts["gap_ok"] & prev_ok)
    facts["jaccard_excluded"] = facts["jaccard_prev"].notna() & facts["jaccard_ok"].isna()
    # the facts that pass the gap filter at every epoch in every seed: summaries over a set that does not change
    always = sorted(f for f, ok in facts.groupby("fact_id")["gap_ok"].all().items() if ok)
    fixed = facts["fact_id"].isin(always)
    facts["faith_fixed"] = facts["faith_ok"].where(fixed)
    facts["jaccard_fixed"] = facts["jaccard_ok"].where(fixed)
    fsum = (
        facts.groupby(["seed", "epoch"])
        .agg(
            jaccard_prev=("jaccard_ok", "mean"),
            faithfulness=("faith_ok", "median"),
            jaccard_fixed=("jaccard_fixed", "mean"),
            faith_fixed=("faith_fixed", "median"),
            excluded=("gap_ok", lambda g: int((~g).sum())),
            jaccard_excluded=("jaccard_excluded", "sum"),
        )
        .reset_index()
    )
    fj, ff = across_seeds(fsum, "jaccard_prev"), across_seeds(fsum, "faithfulness")
    fjx, ffx = across_seeds(fsum, "jaccard_fixed"), across_seeds(fsum, "faith_fixed")
    fsteps = ", ".join(map(str, sorted(facts["ig_steps"].unique())))
    fgrid = ", ".join(sorted(facts["ig_grid"].unique()))
    out += [
        "",
        (
            f"### Per-fact circuits ({facts['fact_id'].nunique()} facts sampled before training, EAP-IG {fsteps} "
            f"steps, {fgrid} grid, {facts['selection'].iloc[0]}; faithfulness only where the corruption moves the "
            f"answer log-prob by >= {MIN_GAP} nat, signed; Jaccard only where it does so at both epochs)"
        ),
        "",
        row(
            [
                "epoch",
                "seeds",
                "mean Jaccard with previous epoch",
                "median faithfulness",
                "fact-seeds excluded (gap)",
                "Jaccards excluded (gap at either epoch)",
                "mean Jaccard, same facts throughout",
                "median faithfulness, same facts throughout",
            ]
        ),
        row(["---"] * 8),
    ]
    for epoch in sorted(fsum["epoch"].unique()):
        g = fsum[fsum["epoch"] == epoch]
        out.append(
            row(
                [
                    epoch,
                    len(g),
                    fmt(fj.loc[epoch], 3) if epoch in fj.index else "-",
                    fmt(ff.loc[epoch], 3) if epoch in ff.index else "-",
                    int(g["excluded"].sum()),
                    int(g["jaccard_excluded"].sum()),
                    fmt(fjx.loc[epoch], 3) if epoch in fjx.index else "-",
                    fmt(ffx.loc[epoch], 3) if epoch in ffx.index else "-",
                ]
            )
        )
    out += [
        "",
        "Same facts throughout: the facts that pass the gap filter at every epoch in every seed ("
        + (", ".join(always) if always else "none")
        + "); the other columns summarise whichever facts pass at that epoch.",
    ]
    if len(seeds) < MIN_ENTITIES:
        out += [
            "",
            f"No intervals: {len(seeds)} seeds are fewer than the {MIN_ENTITIES} a 95 % interval over seeds "
            "needs to cover (`circuitdyn.analysis.stats.MIN_ENTITIES`); cells show the mean over seeds.",
        ]
    out += per_fact_trajectories(facts)
    text = "\n".join(out) + "\n"
    return text, {
        "cols": cols,
        "tcols": tcols,
        "paper_dyn": paper_dyn,
        "paper_task": paper_task,
        "n_entities": n_entities,
    }


def plot(
    folder: Path, cols: dict, tcols: dict, paper_dyn: pd.DataFrame, paper_task: pd.DataFrame, n_entities: int
) -> None:
    """Share of entities learned, math, and the task circuit's logit difference by epoch, ours against the paper's."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("entities learned (share)", "math exact match", "task circuit logit diff")
    )

    def band(t: pd.DataFrame, scale: float, name: str, col: int, color: str) -> None:
        x = list(t.index)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=t["mean"] / scale,
                name=name,
                line={"color": color},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": (t["hi"] - t["mean"]) / scale,
                    "arrayminus": (t["mean"] - t["lo"]) / scale,
                },
            ),
            row=1,
            col=col,
        )

    band(cols["learned"], n_entities, "SmolLM2-135M (seeds)", 1, "#1f77b4")
    fig.add_trace(
        go.Scatter(
            x=list(paper_dyn.index),
            y=paper_dyn["learned"] / 100,
            name="Llama-3.2-1B (paper)",
            line={"color": "#d62728"},
        ),
        row=1,
        col=1,
    )
    band(cols["math"], 1, "SmolLM2 math", 2, "#1f77b4")
    fig.add_trace(
        go.Scatter(x=list(paper_dyn.index), y=paper_dyn["math"], name="paper math", line={"color": "#d62728"}),
        row=1,
        col=2,
    )
    band(tcols["circuit_logit_diff"], 1, "SmolLM2 circuit", 3, "#1f77b4")
    fig.add_trace(
        go.Scatter(
            x=list(paper_task.index),
            y=paper_task["circuit_logit_diff"],
            name="paper circuit",
            line={"color": "#d62728"},
        ),
        row=1,
        col=3,
    )
    fig.update_layout(height=380, width=1200)
    fig.write_html(folder / "reproduction.html", include_plotlyjs="cdn", full_html=True, div_id="reproduction")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=HERE, help="folder holding the CSVs (default: this one)")
    ap.add_argument("--out", type=Path, help="folder to write tables.md and reproduction.html into (default: FOLDER)")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None else args.folder
    out.mkdir(parents=True, exist_ok=True)
    text, data = tables(args.folder)
    (out / "tables.md").write_text(text)
    print(text, end="")
    plot(out, **data)


if __name__ == "__main__":
    main()

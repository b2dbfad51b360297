"""What the numbers of a diff or a timeline support, in sentences: the text the CLI, the demo and the
viewers print.

Every sentence names the statistic, its 95 % interval and the n it rests on, puts method noise beside
every change, and says "no evidence" where an interval or a test does not clear it. Nothing here computes;
it reads `CircuitDiff.summary`, `Timeline.summary()` / `stability()` and `transfer.transfer_summary`.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from circuitdyn.analysis.change_test import ALPHA
from circuitdyn.analysis.diff import MEAN, PRIMARY, CircuitDiff
from circuitdyn.analysis.similarity import DISTANCES
from circuitdyn.analysis.timeline import Timeline

FAMILIES = {
    "estimation": "the same question, other IG quadrature offsets",
    "question": "other IG quadrature offsets and other swap partners of the corruption",
}

NAMES = {
    "edge_jaccard": "edge-set distance (1 - Jaccard)",
    "weighted_jaccard": "weighted-Jaccard distance",
    "spearman": "rank distance (1 - Spearman)",
}


def estimate(e: dict[str, Any] | None, digits: int = 3) -> str:
    """`0.412 [0.350, 0.470] (n=14 in 8 entities)` from an `Estimate.to_dict()`; without an interval, why
    (`0.412 (n=9 in 3 entities; too few entities for an interval, n=3 < 8)`)."""
    if not e or e.get("value") is None:
        return f"- (n={0 if not e else e.get('n', 0)})"
    ci = "" if e.get("lo") is None else f" [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"
    groups = e.get("n_groups", 0)
    note = f"; {e['interval']}" if e.get("interval") else ""
    return f"{e['value']:.{digits}f}{ci} (n={e['n']} in {groups} {'entity' if groups == 1 else 'entities'}{note})"


def _size(size: dict[str, Any], faith: dict[str, Any] | None) -> str:
    if size.get("median") is None:
        return "no circuits"
    text = (
        f"median {size['median']:,.0f} edges ({size['share_of_graph']:.1%} of the graph; "
        f"{size['min']:,.0f}-{size['max']:,.0f})"
    )
    if faith and faith.get("median") is not None:
        text += f", faithfulness reached median {faith['median']:.2f} (min {faith['min']:.2f})"
    return text


def _fmt(x: float | None, digits: int = 3) -> str:
    """A number, or "-" where there is none (e.g. no distances: every replicate came out identical)."""
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def _change_verdict(agg: dict[str, Any] | None) -> str:
    """The aggregate change test's verdict (`change_test.aggregate_verdict`), direction checked: change is
    claimed only for a positive mean effect (replicates of the two checkpoints further apart than replicates of
    one) with p <= `ALPHA`; a negative effect is said to be within method noise, whatever its p."""
    if not agg or not agg.get("n_tested"):
        return "nothing to test"
    effect, p = agg["effect"], agg["p_value"]
    counts = (
        f"{agg['n_changed_beyond_noise']} of {agg['n_tested']} fact-level tests clear method noise "
        f"(false discovery rate {ALPHA:.0%})"
    )
    if p is not None and p <= ALPHA and effect.get("value") is not None and effect["value"] > 0:
        return (
            f"circuits moved more than method noise (stratified permutation p = {p:.4f}, mean excess "
            f"{estimate(effect)}); {counts}"
        )
    if effect.get("value") is not None and effect["value"] < 0:
        return (
            f"no evidence of change: circuits moved less between the checkpoints than between replicates of "
            f"one checkpoint (p = {_fmt(p)}); {counts}"
        )
    return f"no evidence that circuits moved more than method noise (p = {_fmt(p)}); {counts}"


def describe_diff(d: CircuitDiff) -> list[str]:
    """Sentences for a `CircuitDiff`: circuits compared, facts and exclusions, method noise, change per
    statistic with intervals, and the verdict against noise."""
    s = d.summary
    reached = s.get("faithfulness_reached") or {}
    lines = [
        f"circuits ({s['selection']}): {d.label_a} {_size(s['circuit_size']['a'], reached.get('a'))}; "
        f"{d.label_b} {_size(s['circuit_size']['b'], reached.get('b'))}",
        f"facts compared: {s['n_included']} of {s['n_facts']} in {s['n_entities']} entities "
        f"({s['n_excluded_gap']} excluded: clean-corrupted metric gap below {s['min_gap']:g} "
        "at either checkpoint)",
    ]
    held = s.get("faithfulness_heldout")
    if held and held["a"]["n"] and held["b"]["n"]:
        lines.append(
            f"on a corruption they were not selected on (the next swap partner, or a new noise draw): "
            f"faithfulness median {held['a']['median']:.2f} ({d.label_a}), {held['b']['median']:.2f} "
            f"({d.label_b}), over {held['a']['n']} facts that have one"
        )
    noise, test = s.get("method_noise"), s.get("change_test")
    if noise and test:
        lines.append(
            f"method noise: {test['replicates_per_checkpoint'][0]} replicates per checkpoint drawn from the "
            f"'{test['family']}' family ({FAMILIES[test['family']]}); per fact an exact permutation test "
            f"of the checkpoint labels, Benjamini-Hochberg over facts"
        )
    for stat in DISTANCES:
        st = s[stat]
        text = f"{NAMES[stat]} {d.label_a} -> {d.label_b}: {estimate(st['distance'])}"
        if st.get("noise_distance") is not None:
            text += (
                f"; between replicates of one checkpoint {_fmt(st['noise_distance'])}; excess "
                f"{estimate(st['effect'])}, p = {_fmt(st['p_value'], 4)}; "
                f"beyond noise for {st['n_changed_beyond_noise']} of {st['n_tested']} facts"
            )
        lines.append(text)
    if noise and test:
        lines.append("verdict: " + _change_verdict(s[PRIMARY]))
    else:
        lines.append("no method noise measured (needs checkpoints and --probes): changes are not tested against noise")
    return lines


def describe_timeline(tl: Timeline) -> list[str]:
    """Sentences for a `Timeline`: circuits, facts and how they were chosen, reconfiguration against method
    noise, and the stay-put question with its test."""
    s = tl.summary()
    lines = [
        f"circuits ({s['selection']}): {_size(s['circuit_size'], s['faithfulness_reached'])}",
        f"facts: {s['facts']} ({s['fact_choice']}) in {s['n_entities']} entities; {s['n_fact_epochs_excluded']} "
        f"fact-epochs excluded (clean-corrupted gap below {s['min_gap']:g})",
    ]
    noise = s.get("method_noise")
    rate = f"reconfiguration: {estimate(s['reconfiguration_rate'])} of a circuit's edges replaced per epoch"
    if noise:
        lines.append(
            f"method noise at epochs {noise['epochs']} ({len(noise['replicates'])} replicates each, "
            f"'{noise['family']}' family): edge-set distance between replicates of one checkpoint, median "
            f"{_fmt(noise['edge_jaccard']['median_of_medians'])} per fact"
        )
        lines.append(f"{rate}; excess over method noise {estimate(s['excess_over_noise'])}")
        lines.append("verdict: " + _change_verdict(s.get("change_test")))
    else:
        lines.append(f"{rate}; no method noise measured, so not tested against it")
    st = s.get("stability")
    if st:
        lines += describe_stability(st)
    else:
        lines.append("no per-probe outcomes in the run: circuits are not joined with recall")
    return lines


def describe_stability(st: dict[str, Any]) -> list[str]:
    """The stay-put answer: similarity per transition kind, AUC with interval, the stratified test, verdict."""

    def kind(name: str) -> str:
        m, (lo, hi) = st[f"mean_{name}"], st[f"ci_{name}"]
        if m != m:
            return f"{name} - (n=0)"
        ci = "" if lo != lo else f" [{lo:.3f}, {hi:.3f}]"
        return f"{name} {m:.3f}{ci} (n={st[f'n_{name}']})"

    perm = st["permutation"]
    lines = [
        f"stay put while recalled? edge Jaccard to the previous epoch: {kind('retained')}, {kind('forgotten')}, "
        f"{kind('acquired')}; facts chosen: {st['fact_choice']}"
    ]
    if perm["n_strata"] == 0:
        lines.append("  not answerable on this run: no fact has both retained and flipped transitions")
        return lines
    lines.append(
        f"  AUC within facts {_auc(st)} (P(a retained transition's circuit is more similar than a flipped "
        f"one's of the same fact)); permutation test within facts: difference {perm['difference']:+.3f}, "
        f"p = {perm['p_value']:.3f} on {perm['n_1']} retained vs {perm['n_0']} flipped transitions of "
        f"{perm['n_strata']} facts ({st['n_entities']} entities)"
    )
    verdict = stability_verdict(st)
    if verdict.startswith("evidence") and "post hoc" in str(st["fact_choice"]):
        verdict += " (facts were chosen after seeing outcomes: treat as exploratory)"
    lines.append("  verdict: " + verdict)
    return lines


def _auc(st: dict[str, Any]) -> str:
    lo, hi = st["auc_ci"]
    if lo == lo and lo is not None:
        return f"{st['auc']:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{st['auc']:.2f} ({st.get('auc_interval') or 'no interval'})"


def stability_verdict(st: dict[str, Any]) -> str:
    """The stay-put verdict, direction checked: evidence only when the test is significant and its
    difference (retained - flipped) and the AUC interval (entirely above or below 0.5) point the same way."""
    perm = st["permutation"]
    diff, p = perm["difference"], perm["p_value"]
    lo, hi = st["auc_ci"]
    if lo is None or lo != lo:
        return (
            f"no evidence either way: {st.get('auc_interval') or 'too few entities for an interval'} on the "
            f"AUC (p = {p:.3f})"
        )
    if p >= ALPHA or lo <= 0.5 <= hi:
        return "no evidence either way at this size (the AUC interval includes 0.5 or p >= 0.05)"
    if diff > 0 and lo > 0.5:
        return "evidence that circuits stay more similar while a fact stays recalled"
    if diff < 0 and hi < 0.5:
        return "evidence that circuits are *less* similar while a fact stays recalled than when recall flips"
    return (
        "no evidence either way: the test's difference and the AUC interval point in opposite directions "
        f"(difference {diff:+.3f}, AUC [{lo:.2f}, {hi:.2f}])"
    )


def describe_transfer(summary: dict[str, Any]) -> list[str]:
    """The old-pathway question from `transfer.transfer_summary`."""
    first, last = summary["first"], summary["last"]
    return [
        f"old pathway still there? share of the fact's gap recovered (faithfulness clipped to [0, 1]): epoch "
        f"{first}'s circuit on epoch {last}'s model {estimate(summary['first_circuit_on_last_model'])}; epoch "
        f"{last}'s own circuit {estimate(summary['last_circuit_on_last_model'])}; "
        f"{summary['n_pairs_excluded_gap']} of {summary['n_pairs']} (fact, circuit, model) cells excluded "
        f"(gap below {summary['min_gap']:g})"
    ]


def html_block(title: str, lines: list[str], frame: pd.DataFrame, rows: int | None = 10) -> str:
    """A result's notebook display: its title, verdict lines and (the first `rows` rows of) its tidy frame."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    shown = frame if rows is None else frame.head(rows)
    table = shown.to_html(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-", escape=True)
    what = "to_frame()" if rows is None else f"to_frame() (first {rows} rows)"
    return f"<div>{title}<ul>{items}</ul><details><summary>{what}</summary>{table}</details></div>"


# --------------------------------------------------------------------------- text (what the CLI prints)


def _fmt3(x: float) -> str:
    return f"{x:.3f}"


def diff_text(d: CircuitDiff) -> str:
    """A `CircuitDiff` to read: the per-fact table, the findings against method noise, and the strongest paths
    of the mean circuit."""
    cols = {
        "n_a": "n_A",
        "n_b": "n_B",
        "faith_a": "faith_A",
        "faith_b": "faith_B",
        "gap_a": "gap_A",
        "added": "+",
        "removed": "-",
        "changed": "moved",
        "sign_flips": "flips",
        "edge_jaccard": "J",
        "noise_distance": "noise",
        "p_value": "p",
        "q_value": "q",
        "changed_beyond_noise": "beyond",
        "weighted_jaccard": "wJ",
        "spearman": "rho",
    }
    table = d.facts[[c for c in cols if c in d.facts]].rename(columns=cols)
    table.index = [f if len(f) <= 40 else f[:37] + "..." for f in table.index]
    lines = [table.to_string(float_format=_fmt3, na_rep="-"), "", *describe_diff(d)]
    paths = d.paths(MEAN)
    if len(paths):
        lines += [
            "",
            "strongest input->logits paths of the mean circuit:",
            paths[["path", "rank_a", "rank_b", "status"]].to_string(index=False, na_rep="-"),
        ]
    return "\n".join(lines)


def transfer_text(table: pd.DataFrame, entity_of: dict[str, str] | None = None) -> str:
    """The bounded transfer matrix, and how the first epoch's circuit fares on the last model."""
    from circuitdyn.analysis.transfer import transfer_pivot, transfer_summary

    pivot = transfer_pivot(table)
    return "\n".join(
        [
            "share of each fact's gap recovered by epoch i's circuit (rows) on epoch j's model (columns), "
            "faithfulness clipped to [0, 1], median over included facts:",
            pivot.to_string(float_format=_fmt3, na_rep="-"),
            *describe_transfer(transfer_summary(table, entity_of)),
        ]
    )


def timeline_text(tl: Timeline) -> str:
    """A `Timeline` to read: the per-epoch table, reconfiguration against method noise per transition, the
    findings, and the transfer matrix when there is one."""
    cols = [
        c
        for c in (
            "epoch",
            "train_loss",
            "knowledge_accuracy",
            "fact_accuracy",
            "n_edges",
            "jaccard_prev",
            "jaccard_first",
        )
        if c in tl.per_epoch
    ]
    lines = [tl.per_epoch[cols].to_string(index=False, float_format=_fmt3, na_rep="-")]
    rec = tl.reconfiguration
    if len(rec):
        lines += ["", "per transition: share of the circuit replaced [95 % interval], method noise, facts beyond noise"]
        for _, r in rec.iterrows():
            ci = "" if r["replaced_lo"] != r["replaced_lo"] else f" [{r['replaced_lo']:.3f}, {r['replaced_hi']:.3f}]"
            noise = "-" if r["noise"] != r["noise"] else f"{r['noise']:.3f}"
            beyond = (
                "-"
                if pd.isna(r["n_changed_beyond_noise"])
                else f"{int(r['n_changed_beyond_noise'])}/{int(r['n_tested'])}"
            )
            lines.append(
                f"  epoch {int(r['epoch'])}: {r['replaced']:.3f}{ci}  noise {noise}  beyond {beyond}  "
                f"(n={int(r['n'])}, excluded {int(r['n_excluded'])})"
            )
    lines += ["", *describe_timeline(tl)]
    if tl.transfer is not None:
        lines += ["", transfer_text(tl.transfer, tl.entity_of)]
    return "\n".join(lines)

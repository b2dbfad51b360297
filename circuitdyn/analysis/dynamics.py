"""Per-fact and per-entity learning dynamics across CPT epochs, with the paper's definitions.

An entity is *learned* at epoch e when the mean ROUGE-1 recall of its probes is >= the threshold
(0.6 in the paper). With L_e the learned set at epoch e (L_0 = the model before CPT):
acquired_e = L_e \\ L_{e-1}, retained_e = L_e & L_{e-1}, forgotten_e = L_{e-1} \\ L_e.
A probe is *correct* at an epoch when its own recall is >= the threshold, and the same definitions
apply per probe.

Results are read from a directory laid out as the paper's code writes it (and as `circuitdyn cpt`
writes it): `epoch_N/validation_probes_results.json` (per-entity recall, the paper's format),
optionally `epoch_N/probe_results.jsonl` (per probe) and `epoch_N/control_probes_results.json`
(out-of-domain exact match). The paper's release keeps epoch 0 in a sibling `baseline/` folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from circuitdyn.analysis.across_runs import AcrossRuns, across_runs, records
from circuitdyn.analysis.stopping import StopDecision, apply_rule, history_from_dynamics
from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import LEARNED_THRESHOLD, read_json, seed_data_dir

ENTITY_RESULTS = "validation_probes_results.json"
PROBE_RESULTS = "probe_results.jsonl"
CONTROL_RESULTS = "control_probes_results.json"
_EPOCH = re.compile(r"^epoch_(\d+)$")


# --------------------------------------------------------------------------- definitions


def learned_sets(
    scores: pd.DataFrame, threshold: float = LEARNED_THRESHOLD, key: str = "entity"
) -> dict[int, set[str]]:
    """Epoch -> the set of items (entities, or probes with key='probe_id') whose recall is >= threshold."""
    out: dict[int, set[str]] = {}
    for epoch, df in scores.groupby("epoch"):
        out[int(epoch)] = set(df.loc[df["recall"] >= threshold, key])
    return out


def transitions(sets: dict[int, set[str]]) -> pd.DataFrame:
    """Per epoch: learned count and acquired / retained / forgotten counts (and names) vs. the previous epoch."""
    rows = []
    prev: set[str] | None = None
    for epoch in sorted(sets):
        cur = sets[epoch]
        row: dict[str, Any] = {"epoch": epoch, "learned": len(cur)}
        if prev is None:
            row.update(acquired=None, retained=None, forgotten=None, acquired_names=[], forgotten_names=[])
        else:
            row.update(
                acquired=len(cur - prev),
                retained=len(cur & prev),
                forgotten=len(prev - cur),
                acquired_names=sorted(cur - prev),
                forgotten_names=sorted(prev - cur),
            )
        rows.append(row)
        prev = cur
    df = pd.DataFrame(rows)
    for col in ("acquired", "retained", "forgotten"):
        df[col] = df[col].astype("Int64")
    return df


def _windows(flags: list[tuple[int, bool]]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive learned epochs as (first, last)."""
    out: list[tuple[int, int]] = []
    previous = False
    for epoch, ok in flags:
        if ok and previous:
            out[-1] = (out[-1][0], epoch)
        elif ok:
            out.append((epoch, epoch))
        previous = ok
    return out


def item_dynamics(scores: pd.DataFrame, key: str, threshold: float = LEARNED_THRESHOLD) -> pd.DataFrame:
    """Per item (entity or probe, named by column `key`): the trajectory summarised.

    Columns: known_before (learned at the first epoch), first_learned, first_acquired (first later epoch where it became
    learned), flips (changes of state between consecutive epochs), acquisitions, forgettings,
    windows (runs of learned epochs), consolidated_from (learned from that epoch through the last),
    never_learned, best_recall, best_epoch (highest recall), final_learned.
    """
    meta = ("entity", "ne_label", "ne_frequency", "question_type", "group")
    meta_cols = [c for c in meta if c in scores and c != key]
    rows = []
    for item, df in scores.sort_values("epoch").groupby(key, sort=False):
        flags = [(int(e), bool(r >= threshold)) for e, r in zip(df["epoch"], df["recall"])]
        states = [ok for _, ok in flags]
        changes = [(flags[i][0], a, b) for i, (a, b) in enumerate(zip(states, states[1:]), 1) if a != b]
        acquired = [e for e, a, b in changes if b and not a]
        consolidated = None
        if states[-1]:
            i = len(states) - 1
            while i > 0 and states[i - 1]:
                i -= 1
            consolidated = flags[i][0]
        best = df.loc[df["recall"].idxmax()]
        row = {
            key: item,
            **{c: df[c].iloc[0] for c in meta_cols},
            "known_before": states[0],
            "first_learned": next((e for e, ok in flags if ok), None),
            "first_acquired": acquired[0] if acquired else None,
            "flips": len(changes),
            "acquisitions": len(acquired),
            "forgettings": sum(1 for _, a, b in changes if a and not b),
            "windows": _windows(flags),
            "consolidated_from": consolidated,
            "never_learned": not any(states),
            "best_recall": float(best["recall"]),
            "best_epoch": int(best["epoch"]),
            "final_learned": states[-1],
        }
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("first_learned", "first_acquired", "consolidated_from"):
        df[col] = df[col].astype("Int64")
    return df


def best_epoch(table: pd.DataFrame) -> int:
    """The epoch with the most learned entities (the earliest on ties)."""
    return int(table.sort_values(["learned", "epoch"], ascending=[False, True]).iloc[0]["epoch"])


def grouped(scores: pd.DataFrame, by: str, threshold: float = LEARNED_THRESHOLD) -> pd.DataFrame:
    """Per epoch and value of `by` (ne_frequency, ne_label, question_type, ...): items, mean recall,
    learned fraction, and acquired / forgotten counts vs. the previous epoch."""
    if by not in scores:
        raise CircuitdynError(f"cannot group by {by!r}: the results have no such column ({list(scores.columns)})")
    key = "probe_id" if "probe_id" in scores else "entity"
    rows = []
    for value, df in scores.groupby(by, dropna=False):
        sets = learned_sets(df, threshold, key)
        trans = transitions(sets).set_index("epoch")
        for epoch, e_df in df.groupby("epoch"):
            rows.append(
                {
                    by: value,
                    "epoch": int(epoch),
                    "items": len(e_df),
                    "mean_recall": float(e_df["recall"].mean()),
                    "learned_frac": float((e_df["recall"] >= threshold).mean()),
                    "acquired": trans.loc[epoch, "acquired"],
                    "forgotten": trans.loc[epoch, "forgotten"],
                }
            )
    return pd.DataFrame(rows).sort_values([by, "epoch"]).reset_index(drop=True)


# --------------------------------------------------------------------------- results


@dataclass
class Dynamics:
    """All learning-dynamics tables of one run (or one strategy of the paper's release)."""

    source: Path
    entity_scores: pd.DataFrame
    """One row per (epoch, entity): recall, f1 (mean over its probes), learned, metadata."""
    probe_scores: pd.DataFrame | None = None
    """One row per (epoch, probe_id) when per-probe results exist: recall, f1, logprob, generation, ..."""
    control: pd.DataFrame = field(default_factory=pd.DataFrame)
    """One row per epoch: out-of-domain exact match (math, SocialIQA, MMLU where present)."""
    loss: pd.DataFrame = field(default_factory=pd.DataFrame)
    """One row per epoch: step, train_loss (from run.json when present)."""
    threshold: float = LEARNED_THRESHOLD

    @property
    def epochs(self) -> list[int]:
        return sorted(int(e) for e in self.entity_scores["epoch"].unique())

    @property
    def learned(self) -> dict[int, set[str]]:
        return learned_sets(self.entity_scores, self.threshold)

    def table(self) -> pd.DataFrame:
        """The run-level table: per epoch learned / acquired / retained / forgotten, mean recall and F1,
        train loss and control-probe accuracy."""
        t = transitions(self.learned)
        means = (
            self.entity_scores.groupby("epoch")[["recall", "f1"]]
            .mean()
            .rename(columns={"recall": "mean_recall", "f1": "mean_f1"})
        )
        t = t.join(means, on="epoch")
        if not self.loss.empty:
            t = t.merge(self.loss, on="epoch", how="left")
        if not self.control.empty:
            t = t.merge(self.control, on="epoch", how="left")
        return t

    def entities(self) -> pd.DataFrame:
        """Per entity: known before CPT, first acquisition, flips, windows, consolidated, never learned."""
        return item_dynamics(self.entity_scores, "entity", self.threshold)

    def probes(self) -> pd.DataFrame:
        """Per probe (needs per-probe results): the same trajectory summary with correct = recall >= threshold."""
        if self.probe_scores is None:
            raise CircuitdynError(f"{self.source}: no per-probe results ({PROBE_RESULTS}) in this run")
        return item_dynamics(self.probe_scores, "probe_id", self.threshold)

    def best_epoch(self) -> int:
        return best_epoch(self.table())

    def grouped(self, by: str, level: str = "entity") -> pd.DataFrame:
        """Grouped dynamics (`by` = ne_frequency, ne_label or question_type; question_type needs level='probe')."""
        scores = self.entity_scores if level == "entity" else self.probe_scores
        if scores is None:
            raise CircuitdynError(f"{self.source}: no per-probe results ({PROBE_RESULTS}) in this run")
        return grouped(scores, by, self.threshold)


def _entity_meta() -> dict[str, dict[str, Any]]:
    """ne_label / ne_frequency of the seed entities (empty when the seed data is not available)."""
    try:
        data = read_json(seed_data_dir() / "validation_probes.json")
    except (CircuitdynError, OSError):
        return {}
    return {e: {"ne_label": v.get("ne_label"), "ne_frequency": v.get("ne_frequency")} for e, v in data.items()}


def _epoch_dirs(root: Path, baseline: Path | None = None) -> dict[int, Path]:
    """Epoch folders holding results: `epoch_N/` of root (or a Trainer run's `checkpoint-STEP/`, keyed as
    `trainer_output.trainer_checkpoints` keys them), plus `baseline` (default: a `baseline/` inside or beside root)
    as epoch 0 if needed."""
    from circuitdyn.runs.trainer_output import trainer_checkpoints

    found = {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := _EPOCH.match(p.name))}
    if not found:
        found = {c.epoch: c.folder for c in trainer_checkpoints(root)}
    found = {e: p for e, p in found.items() if (p / ENTITY_RESULTS).is_file() or (p / PROBE_RESULTS).is_file()}
    if baseline is not None:
        if not ((baseline / ENTITY_RESULTS).is_file() or (baseline / PROBE_RESULTS).is_file()):
            raise CircuitdynError(f"{baseline}: baseline folder holds no {ENTITY_RESULTS} or {PROBE_RESULTS}")
        found[0] = baseline
    if 0 not in found:
        for base in (root / "baseline", root.parent / "baseline"):
            if (base / ENTITY_RESULTS).is_file():
                found[0] = base
                break
    return dict(sorted(found.items()))


def _entity_rows(path: Path, epoch: int, meta: dict[str, dict[str, Any]], threshold: float) -> list[dict]:
    data = read_json(path)
    ents = data.get("entities") if isinstance(data, dict) else None
    if not isinstance(ents, dict):
        raise CircuitdynError(f"{path}: field 'entities' is missing or not an object")
    rows = []
    for name, v in ents.items():
        if not isinstance(v, dict):
            continue  # the ">=0.6" count sits beside the entities
        if "recall" not in v:
            raise CircuitdynError(f"{path}: entity {name!r} has no 'recall'")
        rows.append(
            {
                "epoch": epoch,
                "entity": name,
                "recall": float(v["recall"]),
                "f1": float(v.get("f1", float("nan"))),
                **meta.get(name, {"ne_label": None, "ne_frequency": None}),
            }
        )
    return rows


def load_dynamics(
    path: str | Path, *, threshold: float = LEARNED_THRESHOLD, baseline: str | Path | None = None
) -> Dynamics:
    """Read a run's (or the paper's released) per-epoch probe results into a `Dynamics`.

    `path` is a run folder written by `circuitdyn cpt`, a Trainer output folder whose checkpoints hold probe
    results (`circuitdyn.training.trainer.ProbeCallback`), or a strategy folder of the paper's release such as
    `paper-results/llama3-i-1b/VFT` (its sibling `baseline/` is epoch 0; `baseline` names another folder).
    """
    from circuitdyn.runs.trainer_output import trainer_checkpoints

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise CircuitdynError(
            f"threshold (mean ROUGE-1 recall at which an entity is learned) must be in (0, 1], got {threshold!r}"
        )
    root = Path(path)
    if not root.is_dir():
        raise CircuitdynError(f"{root}: no such run folder")
    if baseline is not None and not Path(baseline).is_dir():
        raise CircuitdynError(f"{baseline}: no such baseline folder")
    dirs = _epoch_dirs(root, None if baseline is None else Path(baseline))
    if not dirs:
        raise CircuitdynError(f"{root}: no epoch_N/{ENTITY_RESULTS} or epoch_N/{PROBE_RESULTS} results found")
    meta = _entity_meta()
    entity_rows: list[dict] = []
    probe_frames: list[pd.DataFrame] = []
    control_rows: list[dict] = []
    for epoch, d in dirs.items():
        if (d / PROBE_RESULTS).is_file():
            try:
                pf = pd.read_json(d / PROBE_RESULTS, lines=True, precise_float=True)
            except ValueError as err:
                raise CircuitdynError(f"{d / PROBE_RESULTS}: unreadable ({err})") from None
            pf["epoch"] = epoch
            probe_frames.append(pf)
        elif (d / ENTITY_RESULTS).is_file():
            entity_rows += _entity_rows(d / ENTITY_RESULTS, epoch, meta, threshold)
        if (d / CONTROL_RESULTS).is_file():
            ctrl = read_json(d / CONTROL_RESULTS)
            control_rows.append(
                {"epoch": epoch, **{k: v.get("exact_match") for k, v in ctrl.items() if isinstance(v, dict)}}
            )
    probe_scores = None
    if probe_frames:
        probe_scores = pd.concat(probe_frames, ignore_index=True)
        entity_scores = entity_scores_from_probes(probe_scores)
        if entity_rows:
            entity_scores = pd.concat([entity_scores, pd.DataFrame(entity_rows)], ignore_index=True)
    else:
        entity_scores = pd.DataFrame(entity_rows)
    entity_scores = entity_scores.sort_values(["epoch"], kind="stable").reset_index(drop=True)

    loss = pd.DataFrame()
    manifest = root / "run.json"
    if manifest.is_file():
        rows = [
            {"epoch": e["epoch"], "step": e.get("step"), "train_loss": e.get("train_loss")}
            for e in read_json(manifest).get("epochs", [])
        ]
        loss = pd.DataFrame(rows)
    elif trainer := trainer_checkpoints(root):
        loss = pd.DataFrame(
            [{"epoch": 0, "step": 0, "train_loss": None}]
            + [{"epoch": c.epoch, "step": c.step, "train_loss": c.loss} for c in trainer]
        )
    control = pd.DataFrame(control_rows)
    return Dynamics(root, entity_scores, probe_scores, control, loss, threshold)


def entity_scores_from_probes(probe_scores: pd.DataFrame) -> pd.DataFrame:
    """Per (epoch, entity) means of the probe scores (the paper's per-entity recall and F1)."""
    meta = [c for c in ("ne_label", "ne_frequency") if c in probe_scores]
    agg = probe_scores.groupby(["epoch", "entity"], sort=False).agg(
        recall=("recall", "mean"),
        f1=("f1", "mean"),
        n_probes=("recall", "size"),
        **{c: (c, "first") for c in meta},
    )
    return agg.reset_index()


def entity_results_json(entity_scores: pd.DataFrame, threshold: float = LEARNED_THRESHOLD) -> dict[str, Any]:
    """One epoch's per-entity scores in the paper's `validation_probes_results.json` format."""
    out: dict[str, Any] = {}
    for group in ("low", "high"):
        if "ne_frequency" in entity_scores:
            df = entity_scores[entity_scores.get("ne_frequency") == group]
        else:
            df = entity_scores.iloc[0:0]
        if len(df):
            out[group] = {"f1": float(df["f1"].mean()), "recall": float(df["recall"].mean())}
    out["avg"] = {"f1": float(entity_scores["f1"].mean()), "recall": float(entity_scores["recall"].mean())}
    ents: dict[str, Any] = {f">={threshold:g}": int((entity_scores["recall"] >= threshold).sum())}
    for _, r in entity_scores.iterrows():
        ents[r["entity"]] = {"f1": float(r["f1"]), "recall": float(r["recall"])}
    out["entities"] = ents
    return out


def format_table(dyn: Dynamics) -> str:
    """The run-level table as text (what `circuitdyn dynamics` prints)."""
    t = dyn.table().drop(columns=["acquired_names", "forgotten_names"])
    return t.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-")


@dataclass
class DynamicsReport:
    """What `circuitdyn dynamics RUN` shows: the run's dynamics, grouped `by` a field when asked, a stopping
    rule's decision (`stopping.StopDecision`) when asked, and the per-entity trajectories with `show_entities`."""

    dynamics: Dynamics
    by: str | None = None
    stop: StopDecision | None = None
    show_entities: bool = False

    def grouped(self) -> pd.DataFrame | None:
        if not self.by:
            return None
        return self.dynamics.grouped(self.by, "probe" if self.by == "question_type" else "entity")

    def to_dict(self) -> dict[str, Any]:
        """The run, threshold, best epoch, per-epoch table and entities (and the stop decision, the grouping)."""
        dyn = self.dynamics
        ents = dyn.entities()
        ents["windows"] = ents["windows"].map(lambda w: [list(x) for x in w])
        out: dict[str, Any] = {
            "run": str(dyn.source),
            "threshold": dyn.threshold,
            "best_epoch": dyn.best_epoch(),
            "table": records(dyn.table()),
            "entities": records(ents),
        }
        if self.stop is not None:
            out["stop"] = self.stop.to_dict()
        groups = self.grouped()
        if groups is not None:
            out["grouped"] = records(groups)
        return out

    def text(self) -> str:
        dyn = self.dynamics
        best = dyn.best_epoch()
        lines = [format_table(dyn), f"best epoch: {best} ({len(dyn.learned[best])} learned)"]
        if self.stop is not None:
            lines.append(self.stop.text())
        groups = self.grouped()
        if groups is not None:
            lines.append(groups.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-"))
        if self.show_entities:
            cols = [
                "entity",
                "known_before",
                "first_acquired",
                "flips",
                "windows",
                "consolidated_from",
                "never_learned",
                "best_recall",
                "best_epoch",
            ]
            lines.append(dyn.entities()[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-"))
        return "\n".join(lines)


def dynamics_report(
    path: str | Path,
    *,
    threshold: float = LEARNED_THRESHOLD,
    baseline: str | Path | None = None,
    by: str | None = None,
    stop: str | None = None,
    entities: bool = False,
) -> DynamicsReport:
    """The dynamics of the run at `path` (`load_dynamics`), with the decision of the stopping rule `stop`
    (`stopping.apply_rule` on the probe history) when given."""
    dyn = load_dynamics(path, threshold=threshold, baseline=baseline)
    decision = apply_rule(stop, history_from_dynamics(dyn)) if stop else None
    return DynamicsReport(dyn, by, decision, entities)


def dynamics_across(
    paths: Sequence[str], *, threshold: float = LEARNED_THRESHOLD, baseline: str | Path | None = None
) -> AcrossRuns:
    """The dynamics of several runs (e.g. the seeds of a sweep): per-epoch means with 95 % intervals across them
    (`across_runs.across_runs` of each run's `Dynamics.table()`)."""
    if len(set(paths)) != len(paths):
        raise CircuitdynError(f"a run folder is given twice: {list(paths)}")
    table = across_runs({run: load_dynamics(run, threshold=threshold, baseline=baseline).table() for run in paths})
    return AcrossRuns(
        f"learning dynamics of {len(paths)} runs: per-epoch mean [95 % bootstrap interval over runs]",
        [("", table)],
        {"runs": list(paths), "threshold": threshold, "across_runs": records(table)},
    )

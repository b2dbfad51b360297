"""Circuits across the epochs of a run, joined with probe outcomes and training loss.

`build_timeline(circuits, selection, outcomes=..., epochs=...)` takes one `CircuitSet` per epoch (same
graph, settings and facts) and answers, per fact and for the facts' mean circuit:

- how similar each epoch's circuit is to epoch 0's and to the previous epoch's (edge Jaccard, weighted
  Jaccard, RBO, Spearman, and the share of edges added/removed above the noise floor);
- edge lifetimes: when each selected edge is born, when it dies, how persistent it is;
- a reconfiguration rate per epoch and overall;
- joined with whether the fact was recalled at each epoch (`correct`) and its transition from the
  previous epoch (retained / forgotten / acquired / unknown), next to the training loss;
- `stability()`: does a fact's circuit stay put while it is recalled and change when it is forgotten?
  The summary number `gap` = mean similarity to the previous epoch over retained transitions minus
  over flipped ones (forgotten or acquired); `auc` = the probability that a random retained
  transition's circuit moved less than a random flipped one's (0.5 = no relation).

Outcomes come from `circuitdyn.dynamics` (`outcomes_from_dynamics`, `epochs_from_dynamics`) or any
DataFrame with columns fact_id, epoch, correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.attribution import Method
from circuitdyn.circuits import CircuitSet, find_circuits
from circuitdyn.diff import (
    MEAN,
    jaccard,
    layer_shares,
    per_fact_floor,
    rank_rows,
    rbo_depth,
    rbo_from_top,
    restrict,
    top_positions,
    weighted_jaccard,
)
from circuitdyn.errors import CircuitdynError
from circuitdyn.graph import Graph
from circuitdyn.probes import FactPrompt
from circuitdyn.selection import Faithfulness, Selection

TRANSITIONS = ("retained", "forgotten", "acquired", "unknown")
"""Per (fact, epoch > first): correct before and now / before only / now only / neither."""


@dataclass
class Timeline:
    """Circuits of the same facts at every epoch, with the tables described in the module docstring.

    Rows are facts plus `MEAN` (the facts' mean circuit selected top-n at the mean per-fact size).
    """

    circuits: dict[int, CircuitSet]
    selection: Selection
    masks: dict[int, Bool[Tensor, "row edge"]]
    floor: Float[Tensor, "row"]
    outcomes: pd.DataFrame | None = None
    epoch_table: pd.DataFrame | None = None
    reached: dict[int, Tensor | None] = field(default_factory=dict)
    """Per epoch, the faithfulness each fact's circuit reached (`faith:` selections; None otherwise)."""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def epochs(self) -> list[int]:
        return sorted(self.circuits)

    @property
    def fact_ids(self) -> list[str]:
        return self.circuits[self.epochs[0]].fact_ids

    @property
    def rows(self) -> list[str]:
        return [*self.fact_ids, MEAN]

    @property
    def fact_masks(self) -> dict[int, Bool[Tensor, "fact edge"]]:
        """Per epoch, the selected circuit of every fact (the mean circuit's row left out)."""
        return {e: m[:-1] for e, m in self.masks.items()}

    @property
    def graph(self) -> Graph:
        return self.circuits[self.epochs[0]].graph

    def scores(self, epoch: int) -> Float[Tensor, "row edge"]:
        """Scores at `epoch`: one row per fact, then the mean circuit."""
        if epoch not in self.circuits:
            raise CircuitdynError(f"epoch {epoch} has no circuits in this timeline (epochs: {self.epochs})")
        key = f"scores{epoch}"
        if key not in self._cache:
            s = self.circuits[epoch].scores.float()
            self._cache[key] = torch.cat([s, s.mean(0, keepdim=True)])
        return self._cache[key]

    def _ranks(self, epoch: int) -> tuple[np.ndarray, Tensor]:
        """Cached per epoch: normalised average ranks (for Spearman) and top-|score| positions (for RBO)."""
        key = f"ranks{epoch}"
        if key not in self._cache:
            s = self.scores(epoch)
            self._cache[key] = (rank_rows(s), top_positions(s, rbo_depth(s.shape[1])))
        return self._cache[key]

    def _pair(self, e0: int, e1: int) -> dict[str, np.ndarray]:
        sa, sb, ma, mb = self.scores(e0), self.scores(e1), self.masks[e0], self.masks[e1]
        (ra, ta), (rb, tb) = self._ranks(e0), self._ranks(e1)
        union = ma | mb
        moved = union & ~(ma & mb) & ((sb - sa).abs() > self.floor[:, None])
        n_union = union.sum(1).float()
        return {
            "jaccard": jaccard(ma, mb).numpy(),
            "weighted_jaccard": weighted_jaccard(sa, sb).numpy(),
            "rbo": rbo_from_top(ta, tb, sa.shape[1]).numpy(),
            "spearman": (ra * rb).sum(1),
            "changed_frac": torch.where(n_union > 0, moved.sum(1) / n_union.clamp_min(1), 0.0).numpy(),
        }

    @cached_property
    def similarity(self) -> pd.DataFrame:
        """Per (fact_id, epoch): circuit size and similarity to the first and to the previous epoch.

        Columns `*_first` compare with the first epoch, `*_prev` with the previous one (NaN at the first).
        """
        frames = []
        first = self.epochs[0]
        for i, e in enumerate(self.epochs):
            df = pd.DataFrame({"fact_id": self.rows, "epoch": e, "n_edges": self.masks[e].sum(1).numpy()})
            to_first = self._pair(first, e)
            to_prev = self._pair(self.epochs[i - 1], e) if i else {k: np.full(len(self.rows), np.nan) for k in to_first}
            for k, v in to_first.items():
                df[f"{k}_first"] = v
            for k, v in to_prev.items():
                df[f"{k}_prev"] = v
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    @cached_property
    def lifetimes(self) -> pd.DataFrame:
        """Per (fact_id, edge) selected at some epoch: birth, death, epochs present, persistence, segments.

        birth = first epoch selected; death = the epoch after its last selection (NA if still selected
        at the last epoch); persistence = share of epochs from birth on where it is selected;
        segments = number of separate runs of consecutive epochs (> 1: it left and came back).
        """
        stack = torch.stack([self.masks[e] for e in self.epochs])  # [epoch, row, edge]
        ever = stack.any(0)
        rows, edges = ever.nonzero(as_tuple=True)
        present = stack[:, rows, edges].T  # [item, epoch]
        n_ep = len(self.epochs)
        idx = torch.arange(n_ep)
        birth_i = torch.where(present, idx, n_ep).min(1).values
        last_i = torch.where(present, idx, -1).max(1).values
        starts = present & ~torch.cat([torch.zeros(len(present), 1, dtype=torch.bool), present[:, :-1]], 1)
        ep = np.array(self.epochs)
        death = pd.array([ep[i + 1] if i + 1 < n_ep else pd.NA for i in last_i.tolist()], dtype="Int64")
        n_present = present.sum(1)
        names = self.circuits[self.epochs[0]].edges
        return pd.DataFrame({
            "fact_id": [self.rows[r] for r in rows.tolist()],
            "edge": [names[i] for i in edges.tolist()],
            "birth": ep[birth_i.numpy()],
            "death": death,
            "epochs_present": n_present.numpy(),
            "persistence": (n_present / (n_ep - birth_i)).numpy(),
            "segments": starts.sum(1).numpy(),
        })

    @cached_property
    def reconfiguration(self) -> pd.DataFrame:
        """Per epoch after the first: mean over facts of the share of the circuit replaced (1 - Jaccard
        with the previous epoch) and of the share added/removed above the noise floor."""
        sim = self.similarity
        per_fact = sim[(sim["fact_id"] != MEAN) & (sim["epoch"] != self.epochs[0])]
        out = per_fact.groupby("epoch").agg(
            replaced=("jaccard_prev", lambda s: float((1 - s).mean())),
            changed_frac=("changed_frac_prev", "mean"),
            weighted_jaccard=("weighted_jaccard_prev", "mean"),
        )
        return out.reset_index()

    @property
    def reconfiguration_rate(self) -> float:
        """Mean share of a fact's circuit added/removed (above the noise floor) per epoch."""
        r = self.reconfiguration
        return float(r["changed_frac"].mean()) if len(r) else float("nan")

    @cached_property
    def table(self) -> pd.DataFrame:
        """`similarity` joined with the probe outcome (correct, transition) and the epoch's training loss."""
        df = self.similarity.copy()
        if self.outcomes is not None:
            out = self.outcomes[["fact_id", "epoch", "correct"]].copy()
            out["correct"] = out["correct"].astype("boolean")
            df = df.merge(out, on=["fact_id", "epoch"], how="left")
            df = df.sort_values(["fact_id", "epoch"], kind="stable")
            df["prev_correct"] = df.groupby("fact_id")["correct"].shift(1)
            df["transition"] = [_transition(p, c) for p, c in zip(df["prev_correct"], df["correct"])]
        if self.epoch_table is not None and "train_loss" in self.epoch_table:
            df = df.merge(self.epoch_table[["epoch", "train_loss"]], on="epoch", how="left")
        return df.sort_values(["epoch", "fact_id"], kind="stable").reset_index(drop=True)

    def fact(self, fact_id: str) -> pd.DataFrame:
        """The joined table of one fact (or `MEAN`), one row per epoch."""
        if fact_id not in self.rows:
            raise CircuitdynError(f"unknown fact id {fact_id!r}; the timeline has {len(self.fact_ids)} facts, e.g. {self.fact_ids[:3]}")
        return self.table[self.table["fact_id"] == fact_id].reset_index(drop=True)

    def stability(self, measure: str = "jaccard_prev") -> dict[str, Any]:
        """Does a fact's circuit stay put while recalled and change when forgotten?

        Groups per-fact transitions by retained / forgotten / acquired / unknown and reports the mean
        of `measure` (a similarity to the previous epoch) and the count in each, plus `gap` = retained
        minus flipped (forgotten + acquired), `gap_forgotten` = retained minus forgotten only, and
        `auc` = P(similarity of a retained transition > similarity of a flipped one), ties counted
        half. Positive gaps / auc > 0.5 = yes.
        """
        if self.outcomes is None:
            raise CircuitdynError("the timeline has no probe outcomes; pass outcomes= to build_timeline")
        t = self.table
        t = t[(t["fact_id"] != MEAN) & t[measure].notna() & (t["transition"] != "")]
        out: dict[str, Any] = {"measure": measure}
        for name in TRANSITIONS:
            vals = t.loc[t["transition"] == name, measure]
            out[f"n_{name}"] = int(len(vals))
            out[f"mean_{name}"] = float(vals.mean()) if len(vals) else float("nan")
        kept = t.loc[t["transition"] == "retained", measure].to_numpy(float)
        flipped = t.loc[t["transition"].isin(["forgotten", "acquired"]), measure].to_numpy(float)
        forgotten = t.loc[t["transition"] == "forgotten", measure].to_numpy(float)
        out["gap_forgotten"] = float(kept.mean() - forgotten.mean()) if len(kept) and len(forgotten) else float("nan")
        if len(kept) and len(flipped):
            out["gap"] = float(kept.mean() - flipped.mean())
            greater = (kept[:, None] > flipped[None, :]).mean()
            ties = (kept[:, None] == flipped[None, :]).mean()
            out["auc"] = float(greater + ties / 2)
        else:
            out["gap"] = out["auc"] = float("nan")
        return out

    @cached_property
    def layer_epoch(self) -> pd.DataFrame:
        """layer x epoch matrix of the share of importance per block (mean over facts)."""
        cols = {e: layer_shares(self.graph, self.scores(e)[:-1]).mean(0).numpy() for e in self.epochs}
        df = pd.DataFrame(cols)
        df.index.name, df.columns.name = "layer", "epoch"
        return df

    @cached_property
    def per_epoch(self) -> pd.DataFrame:
        """Per epoch: the run's numbers (step, train_loss, knowledge/OOD accuracy when known) with the mean
        circuit similarity to the first and previous epochs and the share of facts recalled."""
        sim = self.similarity[self.similarity["fact_id"] != MEAN]
        df = sim.groupby("epoch")[["n_edges", "jaccard_first", "jaccard_prev", "weighted_jaccard_prev",
                                   "changed_frac_prev"]].mean().reset_index()
        if self.outcomes is not None:
            o = self.outcomes[self.outcomes["fact_id"].isin(self.fact_ids)]
            acc = o.groupby("epoch")["correct"].mean().rename("fact_accuracy").reset_index()
            df = df.merge(acc, on="epoch", how="left")
        if self.epoch_table is not None:
            extra = self.epoch_table.drop(columns=[c for c in self.epoch_table if c in df and c != "epoch"])
            df = df.merge(extra, on="epoch", how="left")
        return df

    def summary(self) -> dict[str, Any]:
        """Headline numbers: facts, epochs, reconfiguration rate, mean similarity, and `stability()`."""
        sim = self.similarity[self.similarity["fact_id"] != MEAN]
        out: dict[str, Any] = {
            "facts": len(self.fact_ids), "epochs": self.epochs, "selection": str(self.selection),
            "reconfiguration_rate": self.reconfiguration_rate,
            "mean_jaccard_prev": float(sim["jaccard_prev"].mean()),
            "mean_jaccard_first_at_last": float(sim.loc[sim["epoch"] == self.epochs[-1], "jaccard_first"].mean()),
        }
        if self.outcomes is not None:
            out["stability"] = self.stability()
        return out


def _transition(prev: Any, cur: Any) -> str:
    if prev is None or cur is None or pd.isna(prev) or pd.isna(cur):
        return ""
    return "retained" if prev and cur else "forgotten" if prev else "acquired" if cur else "unknown"


def _common_masks(
    circuits: dict[int, CircuitSet], sel: Selection, faithfulness: dict[int, Faithfulness] | None
) -> tuple[dict[int, Tensor], dict[int, Tensor | None]]:
    """Per epoch, the selected circuits [fact + mean row, edge] and (for `faith:`) the faithfulness reached."""
    masks, reached = {}, {}
    for e, cs in circuits.items():
        if sel.needs_model and (not faithfulness or e not in faithfulness):
            raise CircuitdynError(f"selection {sel} needs a faithfulness evaluator for epoch {e}")
        masks[e], reached[e] = sel.select(cs.scores, cs.graph, (faithfulness or {}).get(e))
    n_mean = max(1, int(round(float(torch.cat(list(masks.values())).sum(1).float().mean()))))
    for e, cs in circuits.items():
        masks[e] = torch.cat([masks[e], sel.mean_circuit(cs.scores.float().mean(0), cs.graph, n_mean)[None]])
    return masks, reached


def build_timeline(
    circuits: dict[int, CircuitSet],
    selection: str | Selection = "top:200",
    *,
    outcomes: pd.DataFrame | None = None,
    epochs: pd.DataFrame | None = None,
    noise: float | pd.Series | None = None,
    faithfulness: dict[int, Faithfulness] | None = None,
) -> Timeline:
    """A `Timeline` over the facts common to every epoch's circuit set.

    `outcomes`: columns fact_id, epoch, correct (e.g. `outcomes_from_dynamics`); it must cover some of
    the circuits' facts. `epochs`: one row per epoch with train_loss and any accuracy columns
    (`epochs_from_dynamics`). `noise`: scalar or per-fact floor (`diff.noise_floor`).
    `faithfulness`: per epoch, needed only for the `faith:` selection.
    """
    if len(circuits) < 1:
        raise CircuitdynError("a timeline needs circuits for at least one epoch")
    sel = Selection.parse(selection)
    order = sorted(circuits)
    first = circuits[order[0]]
    for e in order[1:]:
        try:
            first.check_compatible(circuits[e])
        except CircuitdynError as err:
            raise CircuitdynError(f"epoch {order[0]} vs epoch {e}: {err}") from None
    facts = [f for f in first.fact_ids if all(f in circuits[e].fact_ids for e in order)]
    if not facts:
        raise CircuitdynError(f"the circuit sets of epochs {order} share no fact ids")
    graph = first.graph
    circuits = {e: restrict(circuits[e], facts, graph) for e in order}
    if outcomes is not None:
        missing_cols = {"fact_id", "epoch", "correct"} - set(outcomes.columns)
        if missing_cols:
            raise CircuitdynError(f"probe outcomes lack column(s) {sorted(missing_cols)}")
        known = set(outcomes["fact_id"])
        if not known & set(facts):
            raise CircuitdynError(
                f"probe outcomes do not match the circuits: no fact id in common (circuits e.g. {facts[:3]}, "
                f"outcomes e.g. {sorted(known)[:3]})"
            )
    floor = per_fact_floor(noise, facts)
    floor = torch.cat([floor, floor.mean(0, keepdim=True)])
    masks, reached = _common_masks(circuits, sel, faithfulness)
    return Timeline(circuits, sel, masks, floor, outcomes, epochs, reached)


# --------------------------------------------------------------------------- inputs from a run


def outcomes_from_dynamics(dyn: Any) -> pd.DataFrame:
    """fact_id, epoch, correct, recall per probe and epoch from a `circuitdyn.dynamics.Dynamics`
    (needs per-probe results; fact ids are probe ids)."""
    ps = getattr(dyn, "probe_scores", None)
    if ps is None or len(ps) == 0:
        raise CircuitdynError(f"{getattr(dyn, 'source', 'run')}: no per-probe results to join circuits with")
    out = ps[["probe_id", "epoch", "recall"]].rename(columns={"probe_id": "fact_id"}).copy()
    out["correct"] = out["recall"] >= dyn.threshold
    out["fact_id"] = out["fact_id"].astype(str)
    return out


def epochs_from_dynamics(dyn: Any) -> pd.DataFrame:
    """Per epoch: step, train_loss, knowledge accuracy (share of entities learned, mean recall) and the
    out-of-domain control accuracies, from a `circuitdyn.dynamics.Dynamics`."""
    t = dyn.table()
    n_entities = dyn.entity_scores.groupby("epoch")["entity"].nunique()
    t["knowledge_accuracy"] = t["learned"] / t["epoch"].map(n_entities)
    drop = [c for c in ("acquired_names", "forgotten_names") if c in t]
    return t.drop(columns=drop)


def load_run_timeline(
    run: Any,
    facts: Sequence[FactPrompt] | None = None,
    *,
    selection: str | Selection = "top:200",
    circuits_dir: str | Path | None = None,
    method: Method | None = None,
    steps: int | None = None,
    metric: str = "answer-logprob",
    seed: int = 0,
    where: dict[str, Any] | None = None,
    noise: float | pd.Series | None = None,
    progress: bool = False,
) -> Timeline:
    """The timeline of a run (a `checkpoints.Run` or its folder) over every epoch.

    With `facts` (e.g. `circuitdyn.facts.load_facts`), the circuits of exactly these facts are used:
    extracted where missing and reused where `circuits_dir` (default `extraction.circuits_dir(run)`) holds
    them with the same settings; the `faith:` selection evaluates circuits on each epoch's model. Without
    facts, the cached circuits of one extraction are read (`where` filters their metadata). Probe outcomes
    and loss come from `circuitdyn.dynamics` when the run has probe results.
    """
    from circuitdyn.checkpoints import open_run
    from circuitdyn.extraction import circuits_dir as default_dir
    from circuitdyn.extraction import extract_run, run_evaluator
    from circuitdyn.facts import facts_hash

    run = open_run(run) if isinstance(run, (str, Path)) else run
    folder = Path(circuits_dir) if circuits_dir is not None else default_dir(run)
    sel = Selection.parse(selection)
    if sel.needs_model and facts is None:
        raise CircuitdynError(f"selection {sel} evaluates circuits on each epoch's model: it needs the facts (--probes)")
    where = dict(where or {})
    if facts is not None:
        extract_run(run, facts, folder, run.epochs, method=method or "eap-ig", steps=steps or 5, metric=metric,
                    seed=seed, progress=progress)
        where["probe_set_hash"] = facts_hash(facts)
    hashes = {e: run.checkpoint(e).content_hash for e in run.epochs}
    files = find_circuits(folder, run.epochs, method, hashes, steps, where)
    circuits = {e: CircuitSet.load(p) for e, p in files.items()}
    outcomes = epochs_table = None
    try:
        from circuitdyn.dynamics import load_dynamics

        dyn = load_dynamics(run.path)
    except CircuitdynError:
        dyn = None
    if dyn is not None:
        epochs_table = epochs_from_dynamics(dyn)
        if dyn.probe_scores is not None:
            outcomes = outcomes_from_dynamics(dyn)
    if epochs_table is None:
        epochs_table = pd.DataFrame([{"epoch": e, "step": run.checkpoint(e).step,
                                      "train_loss": run.checkpoint(e).train_loss} for e in run.epochs])
    faithfulness = None
    if sel.needs_model and facts is not None:
        evaluate = run_evaluator(run, facts)
        faithfulness = {e: (lambda masks, e=e, cs=cs: evaluate(e, cs, masks)) for e, cs in circuits.items()}
    return build_timeline(circuits, sel, outcomes=outcomes, epochs=epochs_table, faithfulness=faithfulness,
                          noise=noise)

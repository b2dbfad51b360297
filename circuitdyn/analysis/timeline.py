"""Circuits across the epochs of a run, joined with probe outcomes and training loss, against method noise.

`build_timeline(circuits, selection, outcomes=..., epochs=..., noise=...)` takes one `CircuitSet` per epoch
(same graph, settings and facts) and answers, per fact and for the facts' mean circuit:

- how similar each epoch's circuit is to the first epoch's and to the previous epoch's (edge Jaccard,
  weighted Jaccard, RBO, Spearman, and the share of edges added/removed beyond their noise band);
- `changes`: per fact and transition, each distance of `similarity.DISTANCES` tested against the fact's
  method noise (`noise.MethodNoise`): `changed_beyond_noise`, effect size;
- edge lifetimes: when each selected edge is born, when it dies, how persistent it is;
- a reconfiguration rate per transition and overall (the mean edge-Jaccard distance to the previous epoch),
  with the method-noise level beside it and 95 % intervals (cluster bootstrap over entities);
- joined with whether the fact was recalled at each epoch (`correct`) and its transition from the
  previous epoch (retained / forgotten / acquired / unknown), next to the training loss;
- `stability()`: does a fact's circuit stay put while it is recalled and change when recall flips?
  Reported as the mean distance per transition kind with intervals, the AUC within facts (P(a flipped
  transition moved more than a retained one of the same fact)) with its interval, and a permutation test
  stratified by fact, with the numbers of transitions, facts and entities it rests on.

Facts whose clean-corrupted metric gap is below `faithfulness.MIN_GAP` at an epoch are left out of every
transition touching that epoch, and counted. Outcomes come from `circuitdyn.analysis.dynamics`
(`outcomes_from_dynamics`, `epochs_from_dynamics`) or any DataFrame with columns fact_id, epoch, correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.analysis.change_test import (
    ALPHA,
    change_table,
    compare_replicates,
    joint_permutation_p,
    replicate_distances,
    with_fdr,
)
from circuitdyn.analysis.diff import MEAN, PRIMARY, entity_groups, layer_shares, restrict
from circuitdyn.analysis.noise import MethodNoise
from circuitdyn.analysis.similarity import (
    jaccard,
    rank_rows,
    rbo_depth,
    rbo_from_top,
    top_positions,
    weighted_jaccard,
)
from circuitdyn.analysis.stats import Estimate, auc, bootstrap_ci, permutation_test, within_stratum_auc
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.faithfulness import MIN_GAP, gap_ok
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import Faithfulness, Selection
from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    pass

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
    band: Float[Tensor, "row edge"]
    """Per edge, the method-noise band of its score (zeros without method noise)."""
    outcomes: pd.DataFrame | None = None
    epoch_table: pd.DataFrame | None = None
    reached: dict[int, Tensor | None] = field(default_factory=dict)
    """Per epoch, the faithfulness each fact's circuit reached (`faith:` selections; None otherwise)."""
    noise: MethodNoise | None = None
    entity_of: dict[str, str] = field(default_factory=dict)
    min_gap: float = MIN_GAP
    fact_choice: str = "given"
    """How the facts were chosen (e.g. "seeded sample, before outcomes" or "post hoc: by recall flips")."""
    transfer: pd.DataFrame | None = None
    """The transfer matrix of the timeline's circuits (`transfer.transfer_matrix`), when it was asked for."""
    labels: dict[str, str] = field(default_factory=dict)
    """fact id -> readable label (entity: question), for viewers."""
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
        moved = union & ~(ma & mb) & ((sb - sa).abs() > self.band)
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

        Columns `*_first` compare with the first epoch, `*_prev` with the previous one (NaN at the first);
        `gap` is the fact's clean-corrupted metric gap at the epoch, `faithfulness` the one its circuit reached
        (rules that evaluate it), `included` whether the gap reaches `min_gap`.
        """
        frames = []
        first = self.epochs[0]
        for i, e in enumerate(self.epochs):
            df = pd.DataFrame({"fact_id": self.rows, "epoch": e, "n_edges": self.masks[e].sum(1).numpy()})
            gaps = self.circuits[e].gaps
            df["gap"] = [*gaps, np.nan]
            got = self.reached.get(e)
            df["faithfulness"] = [*(got.tolist() if got is not None else [np.nan] * len(gaps)), np.nan]
            df["included"] = [*gap_ok(gaps, self.min_gap).tolist(), True]
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
        return pd.DataFrame(
            {
                "fact_id": [self.rows[r] for r in rows.tolist()],
                "edge": [names[i] for i in edges.tolist()],
                "birth": ep[birth_i.numpy()],
                "death": death,
                "epochs_present": n_present.numpy(),
                "persistence": (n_present / (n_ep - birth_i)).numpy(),
                "segments": starts.sum(1).numpy(),
            }
        )

    @cached_property
    def changes(self) -> pd.DataFrame:
        """Per fact, transition (epoch vs the previous epoch) and statistic of `similarity.DISTANCES`: the
        distance beside the calibrated change test of the two epochs' replicates (`change_test.change_table`;
        NA where either epoch has none), the false discovery rate controlled over every tested fact-transition
        of the timeline, and `included` (the gap reaches `min_gap` at both epochs)."""
        sim = self.similarity[self.similarity["fact_id"] != MEAN].set_index(["fact_id", "epoch"])
        frames = []
        n = len(self.fact_ids)
        for prev, e in zip(self.epochs, self.epochs[1:]):
            rows = sim.xs(e, level="epoch").reindex(self.fact_ids)
            before = sim.xs(prev, level="epoch").reindex(self.fact_ids)
            observed = {
                "edge_jaccard": 1 - rows["jaccard_prev"].to_numpy(float),
                "weighted_jaccard": 1 - rows["weighted_jaccard_prev"].to_numpy(float),
                "spearman": 1 - rows["spearman_prev"].to_numpy(float),
            }
            inc = rows["included"].to_numpy(bool) & before["included"].to_numpy(bool)
            test = None
            if self.noise is not None:
                reps = [self.noise.replicates_for(x, self.fact_ids) for x in (prev, e)]
                if reps[0] is not None and reps[1] is not None:
                    sizes = (self.masks[prev][:n].sum(1).double() * self.masks[e][:n].sum(1).double()).sqrt()
                    test, _ = compare_replicates(
                        reps[0], reps[1], self.fact_ids, sizes.round().long(), included=inc, family=self.noise.family
                    )
            table = change_table(observed, self.fact_ids, test)
            table["included"] = np.tile(inc, len(table) // n)
            table.insert(1, "epoch", e)
            frames.append(table)
        if not frames:
            return pd.DataFrame(columns=["fact_id", "epoch", "statistic", "distance", "included"])
        return with_fdr(pd.concat(frames, ignore_index=True), ALPHA)

    def change_verdict(self, statistic: str = PRIMARY) -> dict[str, Any] | None:
        """The aggregate change test over every tested fact-transition: the mean effect with its interval over
        entities, and the p of a joint permutation of each fact's replicates across all epochs that have them
        (`change_test.joint_permutation_p`: consecutive transitions share an epoch's replicates, so they are
        not tested as independent strata); None without replicates at two consecutive epochs."""
        if self.noise is None:
            return None
        ch = self.changes
        rows = ch[(ch["statistic"] == statistic) & ch["p_value"].notna()]
        if not len(rows):
            return None
        epochs = [e for e in self.epochs if e in self.noise.replicates]
        reps = [r for e in epochs if (r := self.noise.replicates_for(e, self.fact_ids)) is not None]
        n = len(self.fact_ids)
        sizes = torch.stack([self.masks[e][:n].sum(1).double() for e in epochs]).log().mean(0).exp().round().long()
        dist = replicate_distances(torch.cat(reps), sizes)[statistic]
        groups = np.concatenate([[k] * len(r) for k, r in enumerate(reps)])
        pairs = [
            (k, k + 1)
            for k in range(len(epochs) - 1)
            if self.epochs.index(epochs[k + 1]) == self.epochs.index(epochs[k]) + 1
        ]
        tested = np.zeros((n, len(pairs)), dtype=bool)
        index = {f: i for i, f in enumerate(self.fact_ids)}
        for col, (k, _) in enumerate(pairs):
            done = rows[rows["epoch"] == epochs[k + 1]]
            tested[[index[f] for f in done["fact_id"]], col] = True
        _, p = joint_permutation_p(dist, groups, pairs, tested, n_perm=2000)
        entities = entity_groups(list(rows["fact_id"]), self.entity_of)
        est = bootstrap_ci(rows["effect"].to_numpy(float), entities)
        return {
            "effect": est.to_dict(),
            "p_value": None if p != p else round(p, 6),
            "n_tested": int(len(rows)),
            "n_changed_beyond_noise": int(rows["changed_beyond_noise"].fillna(False).sum()),
            "changed": bool(p <= ALPHA and est.value > 0) if p == p else None,
        }

    def _primary(self) -> pd.DataFrame:
        """`changes` of the primary statistic (edge-Jaccard distance) for included transitions, with entities."""
        ch = self.changes
        ch = ch[(ch["statistic"] == PRIMARY) & ch["included"]].copy()
        ch["entity"] = entity_groups(list(ch["fact_id"]), self.entity_of)
        return ch

    @cached_property
    def reconfiguration(self) -> pd.DataFrame:
        """Per transition (epoch after the first): over included facts, the share of the circuit replaced
        (edge-Jaccard distance to the previous epoch: mean and 95 % interval over entities), the facts'
        method-noise level (mean noise median), `n_changed_beyond_noise` of `n_tested`, the share added/
        removed beyond the edges' noise bands, and n included / excluded."""
        ch = self._primary()
        sim = self.similarity[(self.similarity["fact_id"] != MEAN) & (self.similarity["epoch"] != self.epochs[0])]
        rows = []
        for e in self.epochs[1:]:
            d = ch[ch["epoch"] == e]
            est = bootstrap_ci(d["distance"].to_numpy(float), d["entity"])
            tested = d["changed_beyond_noise"].dropna()
            rows.append(
                {
                    "epoch": e,
                    "replaced": est.value,
                    "replaced_lo": est.lo,
                    "replaced_hi": est.hi,
                    "noise": float(d["noise_distance"].mean()) if self.noise is not None and len(d) else np.nan,
                    "n_changed_beyond_noise": int(tested.sum()) if self.noise is not None else pd.NA,
                    "n_tested": int(len(tested)),
                    "n": est.n,
                    "n_excluded": int(len(self.fact_ids) - len(d)),
                    "changed_frac": float(sim.loc[sim["epoch"] == e, "changed_frac_prev"].mean()),
                    "weighted_jaccard": float(sim.loc[sim["epoch"] == e, "weighted_jaccard_prev"].mean()),
                }
            )
        return pd.DataFrame(rows)

    @cached_property
    def reconfiguration_estimate(self) -> Estimate:
        """Mean share of a fact's circuit replaced per epoch (edge-Jaccard distance to the previous epoch)
        over all included (fact, transition) pairs, with a 95 % interval from resampling entities."""
        ch = self._primary()
        return bootstrap_ci(ch["distance"].to_numpy(float), ch["entity"])

    @cached_property
    def excess_over_noise(self) -> Estimate:
        """Mean change-test effect (mean distance between replicates of consecutive epochs - mean distance
        within an epoch) over tested transitions, with its interval over entities: how much more circuits
        moved between epochs than re-attributing one checkpoint moves them."""
        ch = self._primary()
        ch = ch[ch["p_value"].notna()]
        return bootstrap_ci(ch["effect"].to_numpy(float), ch["entity"])

    @property
    def reconfiguration_rate(self) -> float:
        """`reconfiguration_estimate`'s value: mean share of a fact's circuit replaced per epoch."""
        return self.reconfiguration_estimate.value

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
            raise CircuitdynError(
                f"unknown fact id {fact_id!r}; the timeline has {len(self.fact_ids)} facts, e.g. {self.fact_ids[:3]}"
            )
        return self.table[self.table["fact_id"] == fact_id].reset_index(drop=True)

    def stability(self, measure: str = "jaccard_prev") -> dict[str, Any]:
        """Does a fact's circuit stay put while recalled and change when its recall flips?

        Over included transitions (both epochs' gaps >= `min_gap`): per transition kind (retained /
        forgotten / acquired / unknown) the count and the mean of `measure` (a similarity to the previous
        epoch) with a 95 % interval over entities; `gap` = retained minus flipped (forgotten + acquired),
        `gap_forgotten` = retained minus forgotten only; `auc` = P(a retained transition's similarity >
        a flipped one's) *within a fact*, ties half, averaged over the `auc_n_facts` facts holding both kinds
        weighted by their pairs (`stats.within_stratum_auc`), with its interval over entities (0.5 = no
        relation; `auc_interval` says why there is none) and `auc_pooled` across facts beside it; `permutation`:
        a test of retained vs flipped stratified by fact (labels shuffled among one fact's own transitions), with the
        transitions, facts and entities it rests on.
        """
        if self.outcomes is None:
            raise CircuitdynError("the timeline has no probe outcomes; pass outcomes= to build_timeline")
        t = self.table
        t = t[(t["fact_id"] != MEAN) & t[measure].notna() & (t["transition"] != "")].copy()
        inc = self.changes[self.changes["statistic"] == PRIMARY].set_index(["fact_id", "epoch"])["included"]
        t = t[[bool(inc.get((f, e), False)) for f, e in zip(t["fact_id"], t["epoch"])]]
        t["entity"] = entity_groups(list(t["fact_id"]), self.entity_of)
        out: dict[str, Any] = {
            "measure": measure,
            "fact_choice": self.fact_choice,
            "n_facts": int(t["fact_id"].nunique()),
            "n_entities": int(t["entity"].nunique()),
        }
        for name in TRANSITIONS:
            sub = t[t["transition"] == name]
            est = bootstrap_ci(sub[measure].to_numpy(float), sub["entity"])
            out[f"n_{name}"] = est.n
            out[f"mean_{name}"] = est.value
            out[f"ci_{name}"] = [est.lo, est.hi]
        kept = (t["transition"] == "retained").to_numpy()
        flipped = t["transition"].isin(["forgotten", "acquired"]).to_numpy()
        forgotten = (t["transition"] == "forgotten").to_numpy()
        vals = t[measure].to_numpy(float)
        out["gap_forgotten"] = (
            float(vals[kept].mean() - vals[forgotten].mean()) if kept.any() and forgotten.any() else float("nan")
        )
        out["gap"] = float(vals[kept].mean() - vals[flipped].mean()) if kept.any() and flipped.any() else float("nan")
        both = kept | flipped
        v, k = vals[both], kept[both]
        est = within_stratum_auc(v, k, t["fact_id"].to_numpy()[both], t["entity"].to_numpy()[both])
        out["auc"], out["auc_ci"], out["auc_n_facts"] = est.value, [est.lo, est.hi], est.n
        out["auc_interval"], out["auc_pooled"] = est.interval_note, auc(v[k], v[~k])
        test = permutation_test(vals[both], kept[both], t["fact_id"].to_numpy()[both])
        out["permutation"] = test.to_dict()
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
        df = (
            sim.groupby("epoch")[
                ["n_edges", "jaccard_first", "jaccard_prev", "weighted_jaccard_prev", "changed_frac_prev"]
            ]
            .mean()
            .reset_index()
        )
        if self.outcomes is not None:
            o = self.outcomes[self.outcomes["fact_id"].isin(self.fact_ids)]
            acc = o.groupby("epoch")["correct"].mean().rename("fact_accuracy").reset_index()
            df = df.merge(acc, on="epoch", how="left")
        if self.epoch_table is not None:
            extra = self.epoch_table.drop(columns=[c for c in self.epoch_table if c in df and c != "epoch"])
            df = df.merge(extra, on="epoch", how="left")
        return df

    def summary(self) -> dict[str, Any]:
        """Headline numbers, each with the n it rests on: facts (and how chosen), epochs, selection with the
        circuits' sizes and faithfulness, reconfiguration rate and its excess over method noise (with
        intervals), `n_changed_beyond_noise` over all transitions, mean similarity, and `stability()`."""
        sim = self.similarity[self.similarity["fact_id"] != MEAN]
        per_fact = sim[sim["included"]]
        ch = self._primary()
        tested = ch["changed_beyond_noise"].dropna()
        last = sim[(sim["epoch"] == self.epochs[-1]) & sim["included"]]
        out: dict[str, Any] = {
            "facts": len(self.fact_ids),
            "fact_choice": self.fact_choice,
            "epochs": self.epochs,
            "selection": str(self.selection),
            "n_entities": len(set(entity_groups(self.fact_ids, self.entity_of))),
            "circuit_size": {
                "median": _num(per_fact["n_edges"].median()),
                "min": _num(per_fact["n_edges"].min()),
                "max": _num(per_fact["n_edges"].max()),
                "share_of_graph": _num(per_fact["n_edges"].median() / len(self.graph.edges)),
            },
            "faithfulness_reached": {
                "median": _num(per_fact["faithfulness"].median()),
                "min": _num(per_fact["faithfulness"].min()),
            },
            "min_gap": self.min_gap,
            "n_fact_epochs_excluded": int((~sim["included"]).sum()),
            "reconfiguration_rate": self.reconfiguration_estimate.to_dict(),
            "method_noise": None if self.noise is None else self.noise.summary(),
            "excess_over_noise": self.excess_over_noise.to_dict(),
            "change_test": self.change_verdict(),
            "n_changed_beyond_noise": int(tested.sum()) if self.noise is not None else None,
            "n_tested": int(len(tested)),
            "mean_jaccard_prev": _num(per_fact["jaccard_prev"].mean()),
            "mean_jaccard_first_at_last": _num(last["jaccard_first"].mean()),
        }
        if self.outcomes is not None:
            out["stability"] = self.stability()
        return out

    # ----------------------------------------------------------------------- notebooks

    def to_frame(self) -> pd.DataFrame:
        """A tidy table: one row per (fact, epoch), `table` (size, gap, faithfulness, similarity to the first and
        previous epoch, recall and transition, training loss) joined with the change test of the edge-set
        distance to the previous epoch (`changes`: distance, noise_distance, effect, p, q, changed_beyond_noise),
        and the fact's entity; the mean circuit's rows left out."""
        t = self.table[self.table["fact_id"] != MEAN].copy()
        ch = self.changes
        ch = ch[ch["statistic"] == PRIMARY].drop(columns=["statistic", "included"], errors="ignore")
        ch = ch.rename(columns={"distance": "change_distance"})
        t = t.merge(ch, on=["fact_id", "epoch"], how="left")
        t.insert(1, "entity", entity_groups(t["fact_id"].tolist(), self.entity_of))
        return t.sort_values(["fact_id", "epoch"], kind="stable").reset_index(drop=True)

    def describe(self) -> list[str]:
        """What the timeline supports, in sentences (`report.describe_timeline`): what the CLI prints."""
        from circuitdyn.analysis.report import describe_timeline

        return describe_timeline(self)

    def text(self) -> str:
        """The timeline to read (`report.timeline_text`): per-epoch table, reconfiguration against method noise,
        findings, and the transfer matrix when there is one; what the CLI prints."""
        from circuitdyn.analysis.report import timeline_text

        return timeline_text(self)

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain JSON-able data (for `--json`): summary (intervals, n, method noise, stability test),
        per-epoch and per-transition tables, the findings, and the transfer table with its summary."""
        import json

        from circuitdyn.analysis.report import describe_timeline

        def records(table: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(table.to_json(orient="records"))

        summary = self.summary()
        out: dict[str, Any] = {
            "summary": summary,
            "selection": {"rule": self.selection.rule, "value": self.selection.value, "spec": str(self.selection)},
            "baseline": None if self.noise is None else self.noise.to_dict(),
            "reconfiguration": records(self.reconfiguration),
            "changes": records(self.changes),
            "per_epoch": records(self.per_epoch),
            "findings": describe_timeline(self),
            "n_changed_beyond_noise": summary["n_changed_beyond_noise"],
            "ci": {
                "reconfiguration_rate": summary["reconfiguration_rate"],
                "excess_over_noise": summary["excess_over_noise"],
            },
        }
        if self.transfer is not None:
            from circuitdyn.analysis.transfer import transfer_summary

            out["transfer"] = records(self.transfer)
            out["transfer_summary"] = transfer_summary(self.transfer, self.entity_of)
        return out

    def figure(self, fact_id: str | None = None) -> Any:
        """The viewer's line charts over epochs (training loss, accuracy, share of the circuit replaced against
        method noise; with `fact_id` that fact's similarity too; `viz.timeline_figure`), a plotly Figure."""
        from circuitdyn.viz import timeline_figure

        return timeline_figure(self, fact_id)

    def _repr_html_(self) -> str:
        import html

        from circuitdyn.analysis.report import html_block

        return html_block(
            f"<b>Timeline</b>: {len(self.fact_ids)} facts, epochs {self.epochs}, selection "
            f"{html.escape(str(self.selection))}",
            self.describe(),
            self.to_frame(),
        )


def _num(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else round(x, 6)


def _transition(prev: Any, cur: Any) -> str:
    if prev is None or cur is None or pd.isna(prev) or pd.isna(cur):
        return ""
    return "retained" if prev and cur else "forgotten" if prev else "acquired" if cur else "unknown"


def _common_masks(
    circuits: dict[int, CircuitSet],
    sel: Selection,
    faithfulness: dict[int, Faithfulness] | None,
    selected: dict[int, tuple[Tensor, Tensor | None]] | None,
) -> tuple[dict[int, Tensor], dict[int, Tensor | None]]:
    """Per epoch, the selected circuits [fact + mean row, edge] and (for `faith:`) the faithfulness reached."""
    masks, reached = {}, {}
    for e, cs in circuits.items():
        if selected is not None and e in selected:
            masks[e], reached[e] = selected[e]
            continue
        if sel.needs_model and (not faithfulness or e not in faithfulness):
            raise CircuitdynError(f"selection {sel} needs a faithfulness evaluator for epoch {e}")
        masks[e], reached[e] = sel.select(cs.scores, cs.graph, (faithfulness or {}).get(e))
    n_mean = max(1, int(round(float(torch.cat(list(masks.values())).sum(1).float().mean()))))
    for e, cs in circuits.items():
        masks[e] = torch.cat([masks[e], sel.mean_circuit(cs.scores.float().mean(0), cs.graph, n_mean)[None]])
    return masks, reached


def build_timeline(
    circuits: dict[int, CircuitSet],
    selection: Selection,
    *,
    outcomes: pd.DataFrame | None = None,
    epochs: pd.DataFrame | None = None,
    noise: MethodNoise | None = None,
    faithfulness: dict[int, Faithfulness] | None = None,
    selected: dict[int, tuple[Tensor, Tensor | None]] | None = None,
    entity_of: dict[str, str] | None = None,
    min_gap: float = MIN_GAP,
    fact_choice: str = "given",
) -> Timeline:
    """A `Timeline` over the facts common to every epoch's circuit set.

    `outcomes`: columns fact_id, epoch, correct (e.g. `outcomes_from_dynamics`); it must cover some of
    the circuits' facts. `epochs`: one row per epoch with train_loss and any accuracy columns
    (`epochs_from_dynamics`). `noise`: the facts' method noise (`noise.measure_method_noise`).
    `faithfulness`: per epoch, needed only for rules that evaluate circuits (`faith:`), unless `selected`
    gives each epoch's (masks [fact, edge] in the circuit set's fact order, faithfulness reached or None).
    `entity_of`: fact id -> entity (the bootstrap's unit). `fact_choice`: how the facts were chosen.
    """
    if len(circuits) < 1:
        raise CircuitdynError("a timeline needs circuits for at least one epoch")
    sel = selection
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
    band = torch.zeros(len(facts), len(first.edges)) if noise is None else noise.band_for(facts)
    band = torch.cat([band, band.mean(0, keepdim=True)])
    masks, reached = _common_masks(circuits, sel, faithfulness, selected)
    return Timeline(
        circuits, sel, masks, band, outcomes, epochs, reached, noise, dict(entity_of or {}), min_gap, fact_choice
    )


# --------------------------------------------------------------------------- inputs from a run


def outcomes_from_dynamics(dyn: Any) -> pd.DataFrame:
    """fact_id, epoch, correct, recall per probe and epoch from a `circuitdyn.analysis.dynamics.Dynamics`
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
    out-of-domain control accuracies, from a `circuitdyn.analysis.dynamics.Dynamics`."""
    t = dyn.table()
    n_entities = dyn.entity_scores.groupby("epoch")["entity"].nunique()
    t["knowledge_accuracy"] = t["learned"] / t["epoch"].map(n_entities)
    drop = [c for c in ("acquired_names", "forgotten_names") if c in t]
    return t.drop(columns=drop)


def noise_epochs(spec: Sequence[int] | str | None, epochs: list[int]) -> list[int]:
    """The epochs method noise is measured at: "ends" (first and last), "all", a list, or none."""
    if spec is None or spec == "none":
        return []
    if spec == "ends":
        return sorted({epochs[0], epochs[-1]})
    if spec == "all":
        return list(epochs)
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise CircuitdynError(
                f"noise epochs must be 'ends', 'all', 'none' or comma-separated epochs, got {spec!r}"
            ) from None
    unknown = [e for e in spec if e not in epochs]
    if unknown:
        raise CircuitdynError(f"noise epoch(s) {unknown} are not epochs of the run ({epochs})")
    return sorted(set(spec))

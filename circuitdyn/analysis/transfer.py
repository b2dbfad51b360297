"""Circuit transfer across epochs: how much of a fact does epoch i's circuit carry on epoch j's model?

`transfer_matrix(circuits, evaluate, selection)` evaluates every epoch's circuits on every epoch's model
(`extraction.run_evaluator` builds the evaluator for a `checkpoints.Run`). Faithfulness is a ratio over the
model's clean-corrupted gap, so it explodes where that gap is near zero (values of -7 or 66 appear). The
table therefore carries the gap, and `transfer` = faithfulness clipped to [0, 1] (the share of the fact's
metric gap the circuit recovers), NaN where the gap on that model is below `faithfulness.MIN_GAP`
(excluded, and counted by `transfer_summary`). A high value off the diagonal means an old pathway still
carries the fact on a later model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.analysis.diff import entity_groups, restrict
from circuitdyn.analysis.stats import bootstrap_ci
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.faithfulness import MIN_GAP, gap_ok
from circuitdyn.engine.selection import Faithfulness, Selection
from circuitdyn.errors import CircuitdynError
from circuitdyn.io import write_json_atomic
from circuitdyn.progress import progress_bar

Evaluator = Callable[[int, CircuitSet, Bool[Tensor, "fact edge"]], Float[Tensor, " fact"]]
"""(model epoch, circuit set, its per-fact masks) -> faithfulness of each circuit on that epoch's model (e.g.
`extraction.run_evaluator`)."""
TRANSFER_SELECTION = Selection("top", 200)
"""The circuits a transfer matrix evaluates unless told otherwise."""


def transfer_matrix(
    circuits: dict[int, CircuitSet],
    evaluate: Evaluator,
    selection: Selection = TRANSFER_SELECTION,
    *,
    own_faithfulness: Callable[[int], Faithfulness] | None = None,
    selected: dict[int, Bool[Tensor, "fact edge"]] | None = None,
    cache: str | Path | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Faithfulness of the circuit found at epoch i when run on the model of epoch j, for all i, j.

    Returns a long table (fact_id, circuit_epoch, model_epoch, faithfulness) for the facts common to
    all epochs; `transfer_pivot` gives the i x j matrix (median over facts). The diagonal is each circuit
    on its own model; an old circuit that still carries a forgotten-and-relearned fact shows up as a
    high value off the diagonal.

    `own_faithfulness(epoch)`: the faithfulness callable of that epoch's model, for `faith:` selections;
    `selected`: per epoch, masks [fact, edge] chosen already (e.g. `Timeline.masks`, rows in the circuit
    set's fact order), used instead of selecting again.

    `cache`: a JSON file holding the table, reused when it was computed from the same circuits (by
    score content and checkpoint hash), facts and selection, and (re)written atomically otherwise.
    """
    if not circuits:
        raise CircuitdynError("transfer matrix needs circuits for at least one epoch")
    sel = selection
    epochs = sorted(circuits)
    first = circuits[epochs[0]]
    for e in epochs[1:]:
        first.check_compatible(circuits[e])
    facts = [f for f in first.fact_ids if all(f in circuits[e].fact_ids for e in epochs)]
    if not facts:
        raise CircuitdynError(f"epochs {epochs} share no fact ids")
    key = _transfer_key(circuits, facts, sel)
    if cache is not None and Path(cache).is_file():
        stored = _read_cache(Path(cache))
        if isinstance(stored, dict) and stored.get("key") != key:
            # another table (other circuits, facts or selection) is kept: this one lives beside it
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            cache = Path(cache).with_name(f"{Path(cache).stem}.{digest}{Path(cache).suffix}")
            stored = _read_cache(cache) if cache.is_file() else None
        if isinstance(stored, dict) and stored.get("key") == key:
            return _transfer_table(stored["table"], circuits)
    masks = {}
    for i in epochs:
        cs = restrict(circuits[i], facts, first.graph)
        if selected is not None:
            masks[i] = (cs, selected[i][[circuits[i].index(f) for f in facts]])
        else:
            faith = own_faithfulness(i) if (own_faithfulness and sel.needs_model) else None
            masks[i] = (cs, sel.select(cs.scores, first.graph, faith)[0])
    rows: list[list[Any]] = []
    pairs = [(j, i) for j in epochs for i in epochs]  # model epoch outermost: one model loaded per row
    for j, i in progress_bar(pairs, desc="circuit transfer", unit="pair", disable=not progress):
        cs, m = masks[i]
        f = evaluate(j, cs, m).float().reshape(len(facts))
        rows += [[fid, i, j, None if math.isnan(v) else v] for fid, v in zip(facts, f.tolist())]
    if cache is not None:
        write_json_atomic(Path(cache), {"key": key, "table": rows})
    return _transfer_table(rows, circuits)


def _read_cache(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged cache is recomputed and replaced


def _transfer_table(rows: list[list[Any]], circuits: dict[int, CircuitSet], min_gap: float = MIN_GAP) -> pd.DataFrame:
    """The long transfer table from [fact_id, circuit_epoch, model_epoch, faithfulness or None] rows, with
    the model epoch's gap and the bounded `transfer` (NaN where the gap is below `min_gap`)."""
    table = pd.DataFrame(rows, columns=["fact_id", "circuit_epoch", "model_epoch", "faithfulness"])
    table = table.astype({"faithfulness": float})  # None = undefined (NaN), even when every value is
    gaps = {(f, e): g for e, cs in circuits.items() for f, g in zip(cs.fact_ids, cs.gaps)}
    table["gap"] = [gaps.get((f, e), float("nan")) for f, e in zip(table["fact_id"], table["model_epoch"])]
    table["transfer"] = table["faithfulness"].clip(0.0, 1.0).where(gap_ok(table["gap"].to_numpy(float), min_gap))
    return table


def _transfer_key(circuits: dict[int, CircuitSet], facts: list[str], sel: Selection) -> dict[str, Any]:
    """What a cached transfer table depends on: the selection, the facts, and each epoch's scores and weights."""
    per_epoch = {}
    for e in sorted(circuits):
        cs = circuits[e]
        per_epoch[str(e)] = {
            "scores_sha256": cs.scores_digest,
            "fact_ids": list(cs.fact_ids),
            **{k: cs.meta.get(k) for k in ("checkpoint_hash", "metric", "seed", "noise_scale")},
        }
    return {"selection": str(sel), "facts": facts, "circuits": per_epoch}


def transfer_pivot(table: pd.DataFrame, fact_id: str | None = None, value: str = "transfer") -> pd.DataFrame:
    """circuit_epoch x model_epoch matrix of `transfer` (bounded; median over the included facts, or one
    fact); `value="faithfulness"` gives the raw ratio."""
    if fact_id is not None:
        if fact_id not in set(table["fact_id"]):
            raise CircuitdynError(f"unknown fact id {fact_id!r} in the transfer table")
        table = table[table["fact_id"] == fact_id]
    return table.pivot_table(index="circuit_epoch", columns="model_epoch", values=value, aggfunc="median", dropna=False)


def transfer_summary(table: pd.DataFrame, entity_of: dict[str, str] | None = None) -> dict[str, Any]:
    """Does the first epoch's circuit still carry the facts on the last model? Mean bounded transfer of the
    first epoch's circuit on the last model, and of the last epoch's own circuit, with 95 % intervals over
    entities, the n each rests on, and how many (fact, model) pairs were excluded for a small gap."""
    first, last = int(table["circuit_epoch"].min()), int(table["circuit_epoch"].max())

    def cell(i: int, j: int) -> dict[str, Any]:
        sub = table[(table["circuit_epoch"] == i) & (table["model_epoch"] == j)]
        return bootstrap_ci(sub["transfer"].to_numpy(float), entity_groups(list(sub["fact_id"]), entity_of)).to_dict()

    return {
        "first_circuit_on_last_model": cell(first, last),
        "last_circuit_on_last_model": cell(last, last),
        "first_circuit_on_first_model": cell(first, first),
        "first": first,
        "last": last,
        "n_pairs_excluded_gap": int(table["transfer"].isna().sum()),
        "n_pairs": len(table),
        "min_gap": MIN_GAP,
    }

"""Circuit transfer across epochs: how faithful is epoch i's circuit on epoch j's model?

`transfer_matrix(circuits, evaluate, selection)` evaluates every epoch's circuits on every epoch's model
(`run_evaluator` builds the evaluator for a `checkpoints.Run`). A high value off the diagonal means an old
pathway still carries the fact on a later model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from circuitdyn.circuits import CircuitSet
from circuitdyn.diff import restrict
from circuitdyn.errors import CircuitdynError
from circuitdyn.extraction import Evaluator
from circuitdyn.io import write_json_atomic
from circuitdyn.selection import Faithfulness, Selection

def transfer_matrix(
    circuits: dict[int, CircuitSet],
    evaluate: Evaluator,
    selection: str | Selection = "top:200",
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
    sel = Selection.parse(selection)
    epochs = sorted(circuits)
    first = circuits[epochs[0]]
    for e in epochs[1:]:
        first.check_compatible(circuits[e])
    facts = [f for f in first.fact_ids if all(f in circuits[e].fact_ids for e in epochs)]
    if not facts:
        raise CircuitdynError(f"epochs {epochs} share no fact ids")
    key = _transfer_key(circuits, facts, sel)
    if cache is not None and Path(cache).is_file():
        try:
            stored = json.loads(Path(cache).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            stored = None  # a damaged cache is recomputed and replaced
        if isinstance(stored, dict) and stored.get("key") == key:
            return _transfer_table(stored["table"])
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
    for j, i in tqdm(pairs, desc="circuit transfer", unit="pair", disable=not progress):
        cs, m = masks[i]
        f = evaluate(j, cs, m).float().reshape(len(facts))
        rows += [[fid, i, j, None if math.isnan(v) else v] for fid, v in zip(facts, f.tolist())]
    if cache is not None:
        write_json_atomic(Path(cache), {"key": key, "table": rows})
    return _transfer_table(rows)


def _transfer_table(rows: list[list[Any]]) -> pd.DataFrame:
    """The long transfer table from [fact_id, circuit_epoch, model_epoch, faithfulness or None] rows."""
    table = pd.DataFrame(rows, columns=["fact_id", "circuit_epoch", "model_epoch", "faithfulness"])
    return table.astype({"faithfulness": float})  # None = undefined (NaN), even when every value is


def _transfer_key(circuits: dict[int, CircuitSet], facts: list[str], sel: Selection) -> dict[str, Any]:
    """What a cached transfer table depends on: the selection, the facts, and each epoch's scores and weights."""
    per_epoch = {}
    for e in sorted(circuits):
        cs = circuits[e]
        digest = hashlib.sha256(cs.scores.detach().float().contiguous().numpy().tobytes()).hexdigest()
        per_epoch[str(e)] = {"scores_sha256": digest, "fact_ids": list(cs.fact_ids),
                             **{k: cs.meta.get(k) for k in ("checkpoint_hash", "metric", "seed", "noise_scale")}}
    return {"selection": str(sel), "facts": facts, "circuits": per_epoch}


def transfer_pivot(table: pd.DataFrame, fact_id: str | None = None) -> pd.DataFrame:
    """circuit_epoch x model_epoch matrix of faithfulness (median over facts, or one fact).

    The median, because faithfulness is a ratio: on a model where a fact's clean and corrupted runs
    nearly agree it takes values like +-15 that would swamp a mean over facts."""
    if fact_id is not None:
        if fact_id not in set(table["fact_id"]):
            raise CircuitdynError(f"unknown fact id {fact_id!r} in the transfer table")
        table = table[table["fact_id"] == fact_id]
    return table.pivot_table(index="circuit_epoch", columns="model_epoch", values="faithfulness", aggfunc="median")

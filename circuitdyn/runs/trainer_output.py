"""A `transformers.Trainer` output folder read as a run: its `checkpoint-STEP/` folders and their
`trainer_state.json` (epoch, step, logged loss), without loading any model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuitdyn.errors import CircuitdynError

TRAINER_DIR = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def trainer_log(root: Path) -> list[dict[str, Any]]:
    """The `log_history` of a Trainer output folder: from the `trainer_state.json` of its last checkpoint
    (which holds the whole history), or [] when no checkpoint has one."""
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := TRAINER_DIR.match(p.name)) and p.is_dir())
    for _, folder in reversed(steps):
        state = _trainer_state(folder)
        if state is not None:
            return [e for e in state.get("log_history", []) if isinstance(e, dict)]
    return []


def _trainer_state(folder: Path) -> dict[str, Any] | None:
    f = folder / TRAINER_STATE
    if not f.is_file():
        return None
    try:
        state = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise CircuitdynError(f"{f}: invalid JSON ({err})") from None
    if not isinstance(state, dict):
        raise CircuitdynError(f"{f}: not a Trainer state (expected a JSON object)")
    return state


@dataclass(frozen=True)
class TrainerCheckpoint:
    """A `checkpoint-STEP/` folder of a Trainer output folder, as `trainer_state.json` describes it."""

    epoch: int
    """Its key in the run: the whole epoch it was saved at, or its rank (1, 2, ...) for step-based saves."""
    step: int
    folder: Path
    trained_epochs: float | None
    loss: float | None
    """The last loss logged at or before its step."""


def trainer_checkpoints(root: Path) -> list[TrainerCheckpoint]:
    """The `checkpoint-STEP/` folders of a Trainer output folder, in step order ([] when there are none).

    Each is keyed by its epoch when every checkpoint sits at a distinct whole epoch (`save_strategy="epoch"`),
    else by its rank (1, 2, ...).
    """
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := TRAINER_DIR.match(p.name)) and p.is_dir())
    if not found:
        return []
    log = trainer_log(root)
    rows = []
    for step, folder in found:
        state = _trainer_state(folder)
        epoch = state.get("epoch") if state else next((e.get("epoch") for e in log if e.get("step") == step), None)
        losses = [e["loss"] for e in log if "loss" in e and isinstance(e.get("step"), int) and e["step"] <= step]
        rows.append(
            (
                step,
                folder,
                float(epoch) if isinstance(epoch, (int, float)) else None,
                float(losses[-1]) if losses else None,
            )
        )
    whole = [round(e) for _, _, e, _ in rows if e is not None and abs(e - round(e)) < 1e-6 and round(e) >= 1]
    keys = whole if len(whole) == len(rows) and len(set(whole)) == len(whole) else list(range(1, len(rows) + 1))
    return [TrainerCheckpoint(key, step, folder, e, loss) for key, (step, folder, e, loss) in zip(keys, rows)]

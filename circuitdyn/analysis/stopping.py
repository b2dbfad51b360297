"""When to stop continual pre-training: named stopping rules over a run's per-epoch probe history.

The paper's central finding is that training loss keeps falling while factual knowledge peaks early and
out-of-domain (OOD) skill collapses, so "train until the loss stops falling" keeps the wrong checkpoint. Each
rule here reads the probe history (`history`: per epoch, entities learned, OOD exact match and train loss) and
has two faces:

- online, `rule.should_stop(history)`: called after every epoch with the history so far ("stop now?"), as the
  training callback (`circuitdyn.training.trainer`) does;
- offline, `apply_rule(rule, history)`: replays the run epoch by epoch and reports where the rule stopped
  (`stop_epoch`), the checkpoint it keeps (`kept_epoch`: the best by its objective among those saved until
  then), the best checkpoint in hindsight (`best_epoch`) and the objective lost (`regret`).

Rules (`RULES`, written `NAME` or `NAME:PARAM` on the command line):

- `patience[:P]` (P=2): objective = entities learned; stop when it has not beaten its best for P epochs.
- `ood-bound[:D]` (D=0.1): objective = entities learned while the OOD score is at most D below the base
  model's (epoch 0), else infeasible; stop at the first epoch that exceeds the bound.
- `combined[:W]` (W=1): objective = fraction of entities learned - W x OOD drop from the base (drops only);
  stop when it has not improved for 2 epochs.
- `loss-plateau[:R]` (R=0.01): the usual rule, for comparison: objective = -train loss; stop when the loss
  has not fallen by more than R (relative) for one epoch. Needs the train loss: the paper's release
  (sislab-unitn/Knowledge-Dynamics-LLMs) lists a `train_stats.json` per strategy, but circuitdyn does not
  ship its content (`tests/data/paper-results` holds the probe, control and circuit results only) nor read
  that file, so the rule is not evaluated on the release here.

The OOD score is the mean exact match over the control tasks the run has (math, SocialIQA, MMLU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from circuitdyn.errors import CircuitdynError

OOD_TASKS = ("math", "SocialIQA", "MMLU")


def history_from_table(table: pd.DataFrame, n_entities: int) -> pd.DataFrame:
    """The probe history a rule reads, from `Dynamics.table()`: per epoch `learned`, `learned_frac`, `ood`
    (mean control exact match, NaN without controls), `ood_drop` (base OOD - OOD) and `train_loss`."""
    tasks = [t for t in OOD_TASKS if t in table]
    hist = pd.DataFrame({"epoch": table["epoch"].astype(int), "learned": table["learned"].astype(int)})
    hist["learned_frac"] = hist["learned"] / max(n_entities, 1)
    hist["ood"] = table[tasks].astype(float).mean(axis=1) if tasks else float("nan")
    base = hist["ood"].iloc[0]
    hist["ood_drop"] = base - hist["ood"]
    hist["train_loss"] = table["train_loss"].astype(float) if "train_loss" in table else float("nan")
    return hist.sort_values("epoch").reset_index(drop=True)


def history_from_dynamics(dyn: Any) -> pd.DataFrame:
    """`history_from_table` of a `circuitdyn.analysis.dynamics.Dynamics`."""
    return history_from_table(dyn.table(), dyn.entity_scores["entity"].nunique())


@dataclass(frozen=True)
class StoppingRule:
    """A named stopping rule: `objective` scores an epoch's history row (higher is better, -inf = infeasible),
    `stop` says from the history so far whether to stop after its last epoch, `needs` the columns it reads."""

    name: str
    param: float
    objective: Callable[[pd.Series], float]
    stop: Callable[[pd.DataFrame], bool]
    needs: tuple[str, ...]
    description: str

    def applicable(self, history: pd.DataFrame) -> str | None:
        """None when the history has what the rule reads, else why not."""
        missing = [c for c in self.needs if c not in history or history[c].isna().all()]
        return f"the results have no {' or '.join(missing)}" if missing else None

    def should_stop(self, history: pd.DataFrame) -> bool:
        """Online: stop training after the history's last epoch?"""
        why = self.applicable(history)
        if why is not None:
            raise CircuitdynError(f"stopping rule {self.name!r} does not apply: {why}")
        return len(history) > 1 and bool(self.stop(history.reset_index(drop=True)))

    def __str__(self) -> str:
        return f"{self.name}:{self.param:g}"


def _stale(values: pd.Series, patience: int, min_gain: float = 0.0) -> bool:
    """The last `patience` values did not beat the best before them by more than `min_gain`."""
    if len(values) <= patience:
        return False
    before = values.iloc[: len(values) - patience].max()
    return not (values.iloc[-patience:] > before + min_gain).any()


def patience_rule(patience: float = 2) -> StoppingRule:
    p = int(patience)
    if p < 1:
        raise CircuitdynError(f"patience must be >= 1, got {patience}")
    return StoppingRule(
        "patience",
        p,
        lambda r: float(r["learned"]),
        lambda h: _stale(h["learned"], p),
        ("learned",),
        f"stop when entities learned has not beaten its best for {p} epochs",
    )


def ood_bound_rule(max_drop: float = 0.1) -> StoppingRule:
    if not 0 <= max_drop <= 1:
        raise CircuitdynError(f"ood-bound must be in [0, 1], got {max_drop}")

    def objective(r: pd.Series) -> float:
        return float(r["learned"]) if r["ood_drop"] <= max_drop + 1e-12 else -math.inf

    return StoppingRule(
        "ood-bound",
        max_drop,
        objective,
        lambda h: h["ood_drop"].iloc[-1] > max_drop + 1e-12,
        ("learned", "ood"),
        f"stop once OOD exact match falls more than {max_drop:g} below the base",
    )


def combined_rule(weight: float = 1.0, patience: int = 2) -> StoppingRule:
    if weight < 0:
        raise CircuitdynError(f"combined weight must be >= 0, got {weight}")

    def objective(r: pd.Series) -> float:
        return float(r["learned_frac"] - weight * max(0.0, r["ood_drop"]))

    return StoppingRule(
        "combined",
        weight,
        objective,
        lambda h: _stale(h.apply(objective, axis=1), patience),
        ("learned", "ood"),
        f"stop when learned fraction - {weight:g} x OOD drop has not improved for {patience} epochs",
    )


def loss_plateau_rule(min_rel_drop: float = 0.01) -> StoppingRule:
    if min_rel_drop < 0:
        raise CircuitdynError(f"loss-plateau must be >= 0, got {min_rel_drop}")

    def stop(h: pd.DataFrame) -> bool:
        loss = h["train_loss"].dropna()
        return len(loss) >= 2 and loss.iloc[-1] > loss.iloc[-2] * (1 - min_rel_drop)

    return StoppingRule(
        "loss-plateau",
        min_rel_drop,
        lambda r: -float(r["train_loss"]) if r["train_loss"] == r["train_loss"] else -math.inf,
        stop,
        ("train_loss",),
        f"stop when the train loss falls by less than {min_rel_drop:g} (relative) in an epoch",
    )


RULES: dict[str, Callable[..., StoppingRule]] = {
    "patience": patience_rule,
    "ood-bound": ood_bound_rule,
    "combined": combined_rule,
    "loss-plateau": loss_plateau_rule,
}
DEFAULT_RULE = "combined"


def parse_rule(spec: str | StoppingRule) -> StoppingRule:
    """`NAME` or `NAME:PARAM` (e.g. `patience:3`, `ood-bound:0.2`) -> the rule."""
    if isinstance(spec, StoppingRule):
        return spec
    name, _, param = str(spec).partition(":")
    if name not in RULES:
        raise CircuitdynError(f"unknown stopping rule {spec!r}; use one of {', '.join(RULES)} (optionally NAME:PARAM)")
    if not param:
        return RULES[name]()
    try:
        value = float(param)
    except ValueError:
        raise CircuitdynError(f"stopping rule {spec!r}: parameter {param!r} is not a number") from None
    return RULES[name](value)


@dataclass(frozen=True)
class StopDecision:
    """What a rule decided on a whole run, replayed epoch by epoch."""

    rule: str
    stop_epoch: int | None
    """The epoch after which the rule stopped training (the last epoch when it never fired)."""
    fired: bool
    kept_epoch: int | None
    """The checkpoint kept: the best by the rule's objective among the epochs saved up to `stop_epoch`."""
    best_epoch: int | None
    """The best epoch by the rule's objective over the whole run (hindsight)."""
    regret: float | None
    """objective(best_epoch) - objective(kept_epoch)."""
    objective: dict[int, float | None]
    not_applicable: str | None = None

    def text(self) -> str:
        """One line: where the rule stops and what it keeps, against the best epoch in hindsight."""
        if self.not_applicable:
            return f"stopping rule {self.rule}: does not apply ({self.not_applicable})"
        return (
            f"stopping rule {self.rule}: {'stops after' if self.fired else 'never fires; runs to'} epoch "
            f"{self.stop_epoch}, keeps epoch {self.kept_epoch}; best in hindsight epoch {self.best_epoch} "
            f"(regret {self.regret:.3f})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "stop_epoch": self.stop_epoch,
            "fired": self.fired,
            "kept_epoch": self.kept_epoch,
            "best_epoch": self.best_epoch,
            "regret": self.regret,
            "objective": {str(e): v for e, v in self.objective.items()},
            "not_applicable": self.not_applicable,
        }


def _argmax(values: dict[int, float]) -> int | None:
    feasible = {e: v for e, v in values.items() if v > -math.inf}
    return min(feasible, key=lambda e: (-feasible[e], e)) if feasible else None


def apply_rule(rule: str | StoppingRule, history: pd.DataFrame) -> StopDecision:
    """Replay `rule` over a run's history (offline): where it stops, what it keeps, what hindsight prefers."""
    rule = parse_rule(rule)
    why = rule.applicable(history)
    if why is not None:
        return StopDecision(str(rule), None, False, None, None, None, {}, why)
    history = history.sort_values("epoch").reset_index(drop=True)
    values = {int(r["epoch"]): rule.objective(r) for _, r in history.iterrows()}
    stop = int(history["epoch"].iloc[-1])
    fired = False
    for i in range(1, len(history)):
        if rule.should_stop(history.iloc[: i + 1]):
            stop, fired = int(history["epoch"].iloc[i]), True
            break
    kept = _argmax({e: v for e, v in values.items() if e <= stop})
    best = _argmax(values)
    regret = None if kept is None or best is None else values[best] - values[kept]
    shown = {e: (None if v == -math.inf else v) for e, v in values.items()}
    return StopDecision(str(rule), stop, fired, kept, best, regret, shown)

"""Stopping rules over the per-epoch probe history, on the paper's released Llama-3.2-1B results and on
synthetic histories whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from circuitdyn.analysis.dynamics import load_dynamics
from circuitdyn.analysis.stopping import (
    RULES,
    apply_rule,
    history_from_dynamics,
    history_from_table,
    parse_rule,
)
from circuitdyn.cli import main
from circuitdyn.errors import CircuitdynError

PAPER = Path(__file__).parent / "data" / "paper-results" / "llama3-i-1b"


def _history(
    learned: list[int], ood: list[float] | None = None, loss: list[float | None] | None = None, n: int = 10
) -> pd.DataFrame:
    table = pd.DataFrame({"epoch": range(len(learned)), "learned": learned})
    if ood is not None:
        table["math"] = ood
    if loss is not None:
        table["train_loss"] = loss
    return history_from_table(table, n)


def test_paper_vft_history_and_rules() -> None:
    hist = history_from_dynamics(load_dynamics(PAPER / "VFT"))
    assert hist["learned"].tolist() == [12, 14, 15, 13, 19, 19, 17, 23, 20, 21, 17]  # as the paper reports
    patience = apply_rule("patience", hist)  # best 15 @2, 13 @3, 19 @4, 19 @5, 17 @6: two epochs without a new best
    assert (patience.stop_epoch, patience.kept_epoch, patience.best_epoch, patience.regret) == (6, 4, 7, 4.0)
    bound = apply_rule("ood-bound:0.1", hist)  # epoch 1 already loses more than 0.1 mean exact match
    assert bound.fired and bound.stop_epoch == 1 and bound.kept_epoch == 0 and bound.objective[3] is None
    assert hist.loc[1, "ood_drop"] > 0.1 >= hist.loc[0, "ood_drop"] == 0
    plateau = apply_rule("loss-plateau", hist)
    assert plateau.stop_epoch is None and "train_loss" in plateau.not_applicable  # train_stats.json not shipped


@pytest.mark.parametrize(
    ("spec", "learned", "ood", "online", "stop", "fired", "kept"),
    [
        # best 5 at epoch 2; epochs 3, 4 (4, 4) do not beat it -> stop after epoch 4 (not 3, not 5); kept epoch 2.
        # Online, epochs 5 and 6 would not stop: 6 at epoch 5 beats 5, so only the first firing counts
        ("patience:2", [1, 3, 5, 4, 4, 6, 2], None, [False, False, False, True, False, False], 4, True, 2),
        # 2 at epoch 2 does not beat the 2 of epoch 1 -> stop after epoch 2; the tie keeps the earlier epoch 1
        ("patience:1", [0, 2, 2, 3], None, [False, True, False], 2, True, 1),
        # OOD drops 0, 0.05, 0.11, 0.2 below the base: the bound (0.1) is first crossed at epoch 2
        ("ood-bound:0.1", [0, 2, 4, 5], [0.9, 0.85, 0.79, 0.7], [False, True, True], 2, True, 1),
        # a new best every epoch: never fires, runs to the last epoch and keeps it
        ("patience:2", [0, 1, 2, 3], None, [False, False, False], 3, False, 3),
    ],
)
def test_online_and_offline_answers_known_by_hand(spec, learned, ood, online, stop, fired, kept) -> None:
    """Per prefix ending at epoch 1, 2, ... the online `should_stop` answers computed by hand, and the offline
    stop/kept epochs; the first two cases fail if `apply_rule` stopped one epoch early or late."""
    hist = _history(learned, ood=ood)
    rule = parse_rule(spec)
    assert [rule.should_stop(hist.iloc[: i + 1]) for i in range(1, len(hist))] == online
    decision = apply_rule(spec, hist)
    assert (decision.stop_epoch, decision.fired, decision.kept_epoch) == (stop, fired, kept)


def test_synthetic_histories() -> None:
    # loss keeps falling while knowledge peaks at epoch 2 and OOD collapses: the loss rule runs on and keeps the
    # last epoch, the knowledge rules keep epoch 2
    hist = _history([0, 3, 6, 4, 2, 1], ood=[0.9, 0.88, 0.85, 0.5, 0.2, 0.1], loss=[None, 3.0, 2.0, 1.5, 1.2, 1.0])
    plateau = apply_rule("loss-plateau", hist)
    assert (plateau.fired, plateau.stop_epoch, plateau.kept_epoch) == (False, 5, 5)
    assert apply_rule("patience:2", hist).kept_epoch == 2
    assert apply_rule("patience:2", hist).stop_epoch == 4
    combined = apply_rule("combined", hist)
    assert combined.kept_epoch == 2 and combined.objective[2] == pytest.approx(0.6 - 0.05)
    bound = apply_rule("ood-bound:0.1", hist)
    assert (bound.stop_epoch, bound.kept_epoch, bound.regret) == (3, 2, 0.0)
    assert apply_rule("loss-plateau:0.3", hist).stop_epoch == 3  # 2.0 -> 1.5 is a fall of only 25 %
    assert not parse_rule("patience").should_stop(hist.iloc[:1])  # nothing to decide before training
    with pytest.raises(CircuitdynError, match="does not apply: the results have no ood"):
        parse_rule("ood-bound").should_stop(_history([0, 1]))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", "unknown stopping rule 'nope'"),
        ("patience:x", "parameter 'x' is not a number"),
        ("patience:0", "patience must be >= 1"),
        ("ood-bound:2", r"ood-bound must be in \[0, 1\]"),
    ],
)
def test_bad_rules(spec: str, match: str) -> None:
    with pytest.raises(CircuitdynError, match=match):
        parse_rule(spec)


def test_cli_dynamics_stop_on_the_released_results(capsys) -> None:
    argv = ["dynamics", str(PAPER / "VFT"), "--baseline", str(PAPER / "baseline"), "--json"]
    assert main([*argv, "--stop"]) == 0
    stop = json.loads(capsys.readouterr().out)["stop"]
    assert stop["rule"] == "combined:1" and {"stop_epoch", "best_epoch", "regret", "kept_epoch"} <= set(stop)
    for rule in RULES:
        assert main([*argv, "--stop", rule]) == 0
        assert json.loads(capsys.readouterr().out)["stop"]["rule"].startswith(rule)
    assert main(["dynamics", str(PAPER / "EFT"), "--stop", "patience:3"]) == 0
    assert "stopping rule patience:3" in capsys.readouterr().out
    assert main(["dynamics", str(PAPER / "VFT"), "--stop", "loss-plateau"]) == 0
    assert "does not apply (the results have no train_loss)" in capsys.readouterr().out
    assert main([*argv, "--stop", "bogus"]) == 2
    assert main(["dynamics", str(PAPER / "VFT"), "--baseline", str(PAPER / "VFT")]) == 2
    assert "baseline folder holds no" in capsys.readouterr().err

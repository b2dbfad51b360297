"""Learning dynamics: the paper's definitions, pinned on the paper's released results."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATA

from circuitdyn.analysis.dynamics import (
    entity_results_json,
    entity_scores_from_probes,
    format_table,
    grouped,
    item_dynamics,
    learned_sets,
    load_dynamics,
    transitions,
)
from circuitdyn.errors import CircuitdynError


@pytest.fixture(scope="module")
def paper() -> Path:
    return DATA / "paper-results" / "llama3-i-1b"


def test_vft_learned_counts_and_transitions(paper: Path) -> None:
    dyn = load_dynamics(paper / "VFT")
    table = dyn.table().set_index("epoch")
    assert dyn.epochs == list(range(11))
    assert table["learned"].tolist() == [12, 14, 15, 13, 19, 19, 17, 23, 20, 21, 17]
    assert tuple(table.loc[2, ["acquired", "retained", "forgotten"]]) == (3, 12, 2)
    assert table.loc[0, "math"] == pytest.approx(0.9734848484848485)
    assert dyn.best_epoch() == 7
    # the counts agree with the release's own ">=0.6" field at every epoch
    for e in range(11):
        folder = paper / "baseline" if e == 0 else paper / "VFT" / f"epoch_{e}"
        release = json.loads((folder / "validation_probes_results.json").read_text())["entities"][">=0.6"]
        assert table.loc[e, "learned"] == release


def test_eft_table(paper: Path) -> None:
    table = load_dynamics(paper / "EFT").table().set_index("epoch")
    assert table["learned"].tolist() == [12, 16, 13, 14, 15, 18, 16, 12, 12, 21, 18]
    assert tuple(table.loc[1, ["acquired", "retained", "forgotten"]]) == (7, 9, 3)
    # acquired + retained = learned; retained + forgotten = previous learned
    t = table.iloc[1:]
    assert (t["acquired"] + t["retained"] == t["learned"]).all()
    assert (t["retained"] + t["forgotten"]).tolist() == table["learned"].iloc[:-1].tolist()


def test_entity_dynamics_and_groups(paper: Path) -> None:
    dyn = load_dynamics(paper / "VFT")
    ents = dyn.entities().set_index("entity")
    assert len(ents) == 100
    assert ents["known_before"].sum() == 12
    final = dyn.learned[10]
    assert set(ents.index[ents["final_learned"]]) == final
    consolidated = ents["consolidated_from"].dropna()
    assert set(consolidated.index) == final
    for _name, row in ents.iterrows():
        assert row["never_learned"] == (row["first_learned"] is pd.NA)
        assert row["flips"] == row["acquisitions"] + row["forgettings"]
    by_freq = dyn.grouped("ne_frequency")
    assert set(by_freq["ne_frequency"]) == {"low", "high"}
    assert by_freq.groupby("epoch")["items"].sum().tolist() == [100] * 11
    with pytest.raises(CircuitdynError, match="per-probe"):
        dyn.probes()
    assert "acquired" in format_table(dyn)


def _probe_rows() -> pd.DataFrame:
    # two entities (a: low frequency, b: high), two probes each, three epochs
    recall = {
        ("a", 0): [0.0, 0.2],
        ("a", 1): [1.0, 0.8],
        ("a", 2): [0.4, 0.4],
        ("b", 0): [1.0, 1.0],
        ("b", 1): [1.0, 0.0],
        ("b", 2): [1.0, 0.6],
    }
    rows = []
    for (ent, epoch), rs in recall.items():
        for i, r in enumerate(rs):
            rows.append(
                {
                    "epoch": epoch,
                    "probe_id": f"{ent}/{i}",
                    "entity": ent,
                    "recall": r,
                    "f1": r / 2,
                    "question_type": "factual" if i == 0 else "temporal",
                    "ne_frequency": "low" if ent == "a" else "high",
                }
            )
    return pd.DataFrame(rows)


def test_definitions_on_probe_results(tmp_path: Path) -> None:
    rows = _probe_rows()
    for epoch, df in rows.groupby("epoch"):
        d = tmp_path / f"epoch_{epoch}"
        d.mkdir()
        df.drop(columns="epoch").to_json(d / "probe_results.jsonl", orient="records", lines=True)
        (d / "control_probes_results.json").write_text(json.dumps({"math": {"exact_match": 0.5 - epoch / 10}}))
    dyn = load_dynamics(tmp_path)
    sets = dyn.learned
    assert sets == {0: {"b"}, 1: {"a"}, 2: {"b"}}
    t = transitions(sets).set_index("epoch")
    assert tuple(t.loc[1, ["acquired", "retained", "forgotten"]]) == (1, 0, 1)
    assert t.loc[2, "acquired_names"] == ["b"] and t.loc[2, "forgotten_names"] == ["a"]
    assert dyn.table()["math"].tolist() == [0.5, 0.4, 0.3]
    assert dyn.table()["mean_recall"].tolist() == pytest.approx([0.55, 0.7, 0.6])
    assert dyn.best_epoch() == 0  # one entity learned at every epoch: the earliest wins the tie
    ents = dyn.entities().set_index("entity")
    assert ents.loc["a", "windows"] == [(1, 1)] and ents.loc["a", "first_acquired"] == 1
    assert ents.loc["b", "known_before"] and ents.loc["b", "flips"] == 2 and ents.loc["b", "consolidated_from"] == 2
    assert (ents.loc["a", "best_epoch"], ents.loc["b", "best_epoch"]) == (1, 0)
    assert ents.loc["a", "best_recall"] == pytest.approx(0.9)
    probes = dyn.probes().set_index("probe_id")
    assert probes.loc["a/0", "best_epoch"] == 1 and probes.loc["b/0", "flips"] == 0
    assert probes.loc["b/1", "windows"] == [(0, 0), (2, 2)]
    assert probes.loc["b/1", "best_epoch"] == 0 and probes.loc["a/1", "best_recall"] == pytest.approx(0.8)
    qt = dyn.grouped("question_type", level="probe").set_index(["question_type", "epoch"])
    assert set(qt.index.get_level_values(0)) == {"factual", "temporal"}
    # factual: a/0 recalls 0.0, 1.0, 0.4 and b/0 1.0, 1.0, 1.0; temporal: a/1 0.2, 0.8, 0.4 and b/1 1.0, 0.0, 0.6
    assert qt.loc["factual", "mean_recall"].tolist() == pytest.approx([0.5, 1.0, 0.7])
    assert qt.loc["factual", "learned_frac"].tolist() == [0.5, 1.0, 0.5]
    assert qt.loc[("factual", 2), ["acquired", "forgotten"]].tolist() == [0, 1]
    assert qt.loc["temporal", "learned_frac"].tolist() == [0.5, 0.5, 0.5]
    assert qt.loc[("temporal", 1), ["acquired", "forgotten"]].tolist() == [1, 1]
    assert (qt.loc["factual", "items"] == 2).all()
    # recall exactly at the threshold counts as recalled (b/1 at epoch 2), on the frame and as read back from disk
    # (the reader keeps 0.6 exact; pandas' default float parser would give 0.6000000000000001)
    assert learned_sets(rows, key="probe_id")[2] == {"b/0", "b/1"}
    on_disk = dyn.probe_scores
    assert on_disk.loc[(on_disk["probe_id"] == "b/1") & (on_disk["epoch"] == 2), "recall"].tolist() == [0.6]
    assert item_dynamics(rows, "probe_id").set_index("probe_id").loc["b/1", "windows"] == [(0, 0), (2, 2)]
    raw = grouped(rows, "question_type").set_index(["question_type", "epoch"])
    assert raw.loc[("temporal", 2), "learned_frac"] == 0.5
    with pytest.raises(CircuitdynError, match="no such column"):
        dyn.grouped("colour")


def test_entity_results_json_roundtrip(tmp_path: Path) -> None:
    ents = entity_scores_from_probes(_probe_rows())
    for epoch, df in ents.groupby("epoch"):
        d = tmp_path / f"epoch_{epoch}"
        d.mkdir()
        out = entity_results_json(df)
        assert out["entities"][">=0.6"] == len(learned_sets(df)[epoch]) == 1
        (d / "validation_probes_results.json").write_text(json.dumps(out))
    # the paper's format by hand (F1 is half the recall here): at epoch 2 (`out`) a's probes recall 0.4 and 0.4;
    # at epoch 0 a's recall 0.0 and 0.2 (a: low frequency), b's 1.0 and 1.0 (b: high)
    assert out["entities"]["a"] == pytest.approx({"recall": 0.4, "f1": 0.2})
    first = json.loads((tmp_path / "epoch_0" / "validation_probes_results.json").read_text())
    assert first["entities"]["a"] == pytest.approx({"recall": 0.1, "f1": 0.05})
    assert first["low"] == pytest.approx({"recall": 0.1, "f1": 0.05})
    assert first["high"] == pytest.approx({"recall": 1.0, "f1": 0.5})
    assert first["avg"] == pytest.approx({"recall": 0.55, "f1": 0.275})
    back = load_dynamics(tmp_path)
    assert back.learned == {0: {"b"}, 1: {"a"}, 2: {"b"}}
    pd.testing.assert_frame_equal(
        back.entity_scores.set_index(["epoch", "entity"])[["recall", "f1"]],
        ents.set_index(["epoch", "entity"])[["recall", "f1"]],
        check_like=True,
    )


def test_bad_results(tmp_path: Path) -> None:
    with pytest.raises(CircuitdynError, match="no such run folder"):
        load_dynamics(tmp_path / "nope")
    with pytest.raises(CircuitdynError, match="no epoch_N"):
        load_dynamics(tmp_path)
    (tmp_path / "epoch_0").mkdir()
    (tmp_path / "epoch_0" / "validation_probes_results.json").write_text('{"avg": {}}')
    with pytest.raises(CircuitdynError, match="'entities'"):
        load_dynamics(tmp_path)

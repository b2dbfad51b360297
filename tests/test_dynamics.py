"""Learning dynamics: the paper's definitions, pinned on the paper's released results."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from circuitdyn.dynamics import (
    entity_results_json,
    entity_scores_from_probes,
    format_table,
    learned_sets,
    load_dynamics,
    transitions,
)
from circuitdyn.errors import CircuitdynError
from conftest import DATA


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
    for name, row in ents.iterrows():
        assert row["never_learned"] == (row["first_learned"] is pd.NA)
        assert row["flips"] == row["acquisitions"] + row["forgettings"]
    by_freq = dyn.grouped("ne_frequency")
    assert set(by_freq["ne_frequency"]) == {"low", "high"}
    assert by_freq.groupby("epoch")["items"].sum().tolist() == [100] * 11
    with pytest.raises(CircuitdynError, match="per-probe"):
        dyn.probes()
    assert "acquired" in format_table(dyn)


def _probe_rows() -> pd.DataFrame:
    # two entities, two probes each, three epochs
    recall = {
        ("a", 0): [0.0, 0.2], ("a", 1): [1.0, 0.8], ("a", 2): [0.4, 0.4],
        ("b", 0): [1.0, 1.0], ("b", 1): [1.0, 0.0], ("b", 2): [1.0, 0.6],
    }
    rows = []
    for (ent, epoch), rs in recall.items():
        for i, r in enumerate(rs):
            rows.append({"epoch": epoch, "probe_id": f"{ent}/{i}", "entity": ent, "recall": r, "f1": r / 2,
                         "question_type": "factual" if i == 0 else "temporal", "ne_frequency": "low"})
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
    ents = dyn.entities().set_index("entity")
    assert ents.loc["a", "windows"] == [(1, 1)] and ents.loc["a", "first_acquired"] == 1
    assert ents.loc["b", "known_before"] and ents.loc["b", "flips"] == 2 and ents.loc["b", "consolidated_from"] == 2
    probes = dyn.probes().set_index("probe_id")
    assert probes.loc["a/0", "best_epoch"] == 1 and probes.loc["b/0", "flips"] == 0
    assert probes.loc["b/1", "windows"] == [(0, 0), (2, 2)]
    qt = dyn.grouped("question_type", level="probe")
    assert set(qt["question_type"]) == {"factual", "temporal"}
    with pytest.raises(CircuitdynError, match="no such column"):
        dyn.grouped("colour")


def test_entity_results_json_roundtrip(tmp_path: Path) -> None:
    ents = entity_scores_from_probes(_probe_rows())
    for epoch, df in ents.groupby("epoch"):
        d = tmp_path / f"epoch_{epoch}"
        d.mkdir()
        out = entity_results_json(df)
        assert out["entities"][">=0.6"] == len(learned_sets(df)[epoch])
        (d / "validation_probes_results.json").write_text(json.dumps(out))
    assert load_dynamics(tmp_path).learned == {0: {"b"}, 1: {"a"}, 2: {"b"}}


def test_bad_results(tmp_path: Path) -> None:
    with pytest.raises(CircuitdynError, match="no such run folder"):
        load_dynamics(tmp_path / "nope")
    with pytest.raises(CircuitdynError, match="no epoch_N"):
        load_dynamics(tmp_path)
    (tmp_path / "epoch_0").mkdir()
    (tmp_path / "epoch_0" / "validation_probes_results.json").write_text('{"avg": {}}')
    with pytest.raises(CircuitdynError, match="'entities'"):
        load_dynamics(tmp_path)

"""The Trainer callback on real `transformers.Trainer` runs of a tiny model: probe results where `dynamics` and
`timeline` find them, circuits per checkpoint, and a stopping rule that really stops training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script, save_tiny_model

from circuitdyn.analysis.dynamics import load_dynamics
from circuitdyn.analysis.stopping import apply_rule, history_from_dynamics
from circuitdyn.cli import main

REPO = Path(__file__).resolve().parents[1]


def _example():
    return load_script(REPO / "examples" / "trainer_callback.py")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cb") / "base", "llama", tokenizer_dir, seed=0)


def test_example_callback_writes_what_dynamics_and_timeline_read(base: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    callback = _example().train(base, out, epochs=3, stop=None, circuits=True)
    assert callback.stopped_at is None and next(iter(callback.learned)) == 0 and len(callback.learned) == 4
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 3
    for folder in [out / "baseline", *checkpoints]:
        rows = [json.loads(x) for x in (folder / "probe_results.jsonl").read_text().splitlines()]
        assert {r["entity"] for r in rows} == {"Russia", "Patna"}
        assert json.loads((folder / "control_probes_results.json").read_text())["math"]["n"] == 4
    dyn = load_dynamics(out)
    table = dyn.table()
    assert table["epoch"].tolist() == [0, 1, 2, 3]
    assert table["train_loss"].iloc[1:].notna().all()  # from the Trainer's log history
    assert [len(dyn.learned[e]) for e in range(4)] == [len(v) for v in callback.learned.values()]
    assert len(list((out / "circuits").glob("epoch_*.safetensors"))) == 4  # base + 3 checkpoints
    capsys.readouterr()  # the Trainer's own log lines

    assert main(["timeline", str(out), "--top-n", "50", "--json", "--out", str(tmp_path / "t.html")]) == 0
    tl = json.loads(capsys.readouterr().out)
    assert tl["summary"]["epochs"] == [0, 1, 2, 3] and tl["summary"]["facts"] == 4
    assert [r["knowledge_accuracy"] is not None for r in tl["per_epoch"]] == [True] * 4
    assert main(["dynamics", str(out), "--stop", "patience:2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stop"]["stop_epoch"] in (2, 3)


def test_stopping_rule_stops_the_trainer(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    callback = _example().train(base, out, epochs=4, stop="patience:1", circuits=False)
    decision = apply_rule("patience:1", history_from_dynamics(load_dynamics(out)))
    assert decision.fired and callback.stopped_at is not None
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved[-1] == callback.stopped_at and len(saved) == decision.stop_epoch < 4

"""The demo pipeline end to end on a tiny random Llama (the SmolLM2 run is timed in the closing notes)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from circuitdyn.cli import main
from circuitdyn.demo import DEMO_COMPARISON, demo_config, pick_facts, run_demo
from circuitdyn.engine.selection import Selection
from circuitdyn.engine.settings import AttributionSettings as S
from circuitdyn.engine.settings import Comparison
from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import Probe


def _probe(entity: str, i: int) -> Probe:
    return Probe(id=f"{entity}/q/{i}", entity=entity, question=f"q{i}", answer=f"a{i}")


def test_pick_facts_post_hoc_prefers_flipping_facts() -> None:
    probes = [_probe(e, i) for e in ("x", "y") for i in range(4)]
    history = {  # correct at epochs 0..3
        "x/q/0": [0, 0, 0, 0],
        "x/q/1": [1, 1, 1, 1],
        "x/q/2": [0, 1, 0, 1],
        "x/q/3": [0, 1, 1, 1],
        "y/q/0": [0, 0, 0, 0],
        "y/q/1": [0, 0, 0, 0],
        "y/q/2": [0, 0, 1, 1],
        "y/q/3": [1, 1, 0, 0],
    }
    outcomes = pd.DataFrame(
        [(f, e, bool(c)) for f, flags in history.items() for e, c in enumerate(flags)],
        columns=["fact_id", "epoch", "correct"],
    ).sample(frac=1, random_state=0)  # epoch order must not matter
    chosen = [p.id for p in pick_facts(probes, 2, outcomes)]
    # x: q/2 flips 3 times, then q/3 (1 flip); y: q/2 and q/3 flip once each; probe-file order kept.
    assert chosen == ["x/q/2", "x/q/3", "y/q/2", "y/q/3"]
    assert [p.id for p in pick_facts(probes, 1, outcomes)] == ["x/q/2", "y/q/2"]
    assert len(pick_facts(probes, 9, outcomes)) == len(probes)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("demo-base") / "base", "llama", tokenizer_dir, seed=0)


def test_demo_end_to_end_and_resume(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    r = run_demo(
        tmp_path / "demo",
        S("eap-ig", 2),
        cpt=demo_config(2, 2, 1e-2, base_model=str(tiny_base)),
        facts_per_entity=2,
        progress=False,
        log=None,
    )
    assert r.timeline.epochs == [0, 1, 2]
    # facts: a seeded sample of 2 probes of each trained entity, chosen before training outcomes
    entities = {r.facts.entity_of[f] for f in r.timeline.fact_ids}
    assert len(r.timeline.fact_ids) == 4 and len(entities) == 2
    assert "chosen before outcomes" in r.timeline.fact_choice
    assert str(r.timeline.selection) == "faith:0.8" and r.timeline.noise is not None
    assert r.timeline.noise.epochs == [0, 1, 2]  # replicates at every epoch: every transition is tested
    assert (r.diff.label_a, r.diff.label_b) == ("epoch 0", "epoch 2")
    assert r.diff.noise is r.timeline.noise
    assert set(r.stage_s) == {"cpt", "circuits", "transfer", "analysis"}
    assert len(r.transfer) == 4 * 3 * 3 and (r.out_dir / "transfer.json").is_file()
    bundle = get_plotlyjs()[:2000]
    for html in (r.timeline_html, r.diff_html, r.circuit_html):
        text = html.read_text()
        assert bundle in text and not re.search(r"<script[^>]+src=", text), html
    circuit_files = sorted((r.run_dir / "circuits").rglob("*.safetensors"))
    # 3 epochs + 5 method-noise replicates at each; faith:0.8 selections of the 3 (replicates are cut at that size)
    assert len([f for f in circuit_files if f.parent.name != "selections"]) == 3 + 3 * 5
    assert len([f for f in circuit_files if f.parent.name == "selections"]) == 3
    checkpoints = sorted(r.run_dir.glob("epoch_*/**/*.safetensors"))
    assert len(checkpoints) >= 3  # one weight file per epoch at least
    reused = [*circuit_files, *checkpoints, r.out_dir / "transfer.json"]
    stamps = {f: f.stat().st_mtime_ns for f in reused}

    # A second run (from the shell) reuses every checkpoint, circuit and selection, and prints the findings.
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--base-model",
            str(tiny_base),
            "--entities",
            "2",
            "--epochs",
            "2",
            "--lr",
            "1e-2",
            "--facts-per-entity",
            "2",
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for heading in (
        "what CPT taught",
        "how the facts' circuits moved",
        "circuit diff epoch 0 -> epoch 2",
        "old pathway still there?",
        "method noise at epochs [0, 1, 2]",
        "reconfiguration:",
        "viewers:",
        str(r.timeline_html),
        f"2 trained entities: {', '.join(sorted(entities))}",
        "plan: 4 facts x 3 epochs, 5 replicates per epoch: 18 of 18 circuit files cached, 0 to compute",
        f"circuitdyn diff {r.run_dir}:0 {r.run_dir}:2",
        f"circuitdyn timeline {r.run_dir}",
    ):
        assert heading in out, heading
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps

    # The printed explore commands reuse the demo's circuits: the diff runs without computing anything.
    assert main(["diff", f"{r.run_dir}:0", f"{r.run_dir}:2", "--out", str(tmp_path / "d.html")]) == 0
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps


def test_demo_bad_settings(tiny_base: Path, tmp_path: Path) -> None:
    base = demo_config(base_model=str(tiny_base))
    with pytest.raises(CircuitdynError, match="facts_per_entity"):
        run_demo(tmp_path / "d", cpt=base, facts_per_entity=0, log=None)
    with pytest.raises(CircuitdynError, match="'exact'"):
        run_demo(tmp_path / "d", S("exact"), cpt=base, log=None)  # type: ignore[arg-type]
    with pytest.raises(CircuitdynError, match="pick"):
        run_demo(tmp_path / "d", cpt=base, pick="best", log=None)  # type: ignore[arg-type]
    with pytest.raises(CircuitdynError, match="selection"):
        run_demo(tmp_path / "d", cpt=base, comparison=Comparison(Selection.parse("best:3")), log=None)
    assert not (tmp_path / "d").exists()
    one = demo_config(1, 1, 1e-2, base_model=str(tiny_base))
    top10 = DEMO_COMPARISON.replace(selection=Selection("top", 10), transfer=False)
    r = run_demo(
        tmp_path / "d",
        S("eap"),
        cpt=one,
        facts_per_entity=1,
        pick="post-hoc",
        comparison=top10,
        progress=False,
        log=None,
    )
    assert r.transfer is None and "transfer" not in r.stage_s
    assert r.timeline.fact_choice.startswith("post hoc")
    assert "post hoc" in r.timeline.stability()["fact_choice"]
    # Resuming with another learning rate is another run: refused, naming the setting.
    with pytest.raises(CircuitdynError, match="lr"):
        run_demo(
            tmp_path / "d",
            S("eap"),
            cpt=demo_config(1, 1, 1e-3, base_model=str(tiny_base)),
            facts_per_entity=1,
            comparison=top10.replace(transfer=True),
            progress=False,
            log=None,
        )
    # The IG rule is the demo's to choose, and is what its circuit files record.
    r = run_demo(
        tmp_path / "d", S("eap-ig", 1, "right"), cpt=one, facts_per_entity=1, comparison=top10, progress=False, log=None
    )
    files = sorted((r.run_dir / "circuits").glob("*.safetensors"))
    assert any(".eap-ig1." in f.name for f in files) and not any("-midpoint" in f.name for f in files)
    assert {cs.meta["ig_grid"] for cs in r.timeline.circuits.values()} == {"right"}

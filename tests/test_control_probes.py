"""Out-of-domain control probes scored as the paper scores them, and the paper's CPT preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.control import (
    SYSTEM,
    chat_prompt,
    letter_prediction,
    load_mmlu,
    math_hit,
    math_prediction,
    mmlu_hit,
    siqa_hit,
    siqa_question,
)
from circuitdyn.probes.probes import (
    MathProbe,
    ReasoningProbe,
    load_math_probes,
    load_reasoning_probes,
)


def test_all_items_ship() -> None:
    assert len(load_math_probes()) == 264 and len(load_reasoning_probes()) == 100


def test_math_takes_the_first_run_of_digits() -> None:
    item = MathProbe("0", "What is 16 + 46?", "62", "add")
    assert math_prediction("62.") == "62" and math_hit("62.", item)
    # the paper's parsing: the first number wins, so restating the question is wrong
    assert not math_hit("16 + 46 = 62", item)
    assert math_prediction("-5") == "5" and math_prediction("none") == "none"
    assert not math_hit("1,200", MathProbe("1", "q", "1200", "t"))


def test_socialiqa_format_and_first_letter() -> None:
    item = ReasoningProbe("0", "Tracy went home.", "What will Tracy do?", ("sleep", "eat", "run"), 2, "t")
    assert siqa_question(item) == "Context: Tracy went home. Q: What will Tracy do?\nA. sleep\nB. eat\nC. run"
    assert siqa_hit("B", item) and siqa_hit("B. eat", item) and not siqa_hit("C", item)
    # the first A/B/C anywhere, as the paper's regex reads it: "Answer: B" starts with A
    assert not siqa_hit("Answer: B", item)
    assert letter_prediction("none", "ABC", 1) == "none"


def test_chat_prompt_puts_the_instruction_in_the_system_turn(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = chat_prompt(tok, SYSTEM["math"], "What is 2 + 2?")
    assert text.index(SYSTEM["math"]) < text.index("What is 2 + 2?")
    assert "system" in text


def test_mmlu_file(tmp_path: Path) -> None:
    path = tmp_path / "mmlu.jsonl"
    path.write_text(
        json.dumps({"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"})
        + "\n"
        + json.dumps({"question": "x", "choices": ["a", "b", "c", "d"], "answer": "D"})
        + "\n"
    )
    items = load_mmlu(path)
    assert [i.answer for i in items] == [1, 3]
    assert mmlu_hit("B", items[0]) and not mmlu_hit("A", items[0])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "x", "choices": ["a", "b"], "answer": 5}]))
    with pytest.raises(CircuitdynError, match="record 0"):
        load_mmlu(bad)
    with pytest.raises(CircuitdynError, match="no such MMLU file"):
        load_mmlu(tmp_path / "none.json")


def test_paper_preset_and_cli_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from circuitdyn.cli import main
    from circuitdyn.training import cpt

    cfg = cpt.CPTConfig.paper()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_init, cfg.lora_targets, cfg.train_embeddings) == (
        32,
        64,
        "gaussian",
        ["q_proj", "v_proj"],
        True,
    )
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.kl_weight, cfg.lora_dropout) == (1e-4, 10, 42, 1.0, 0.0)
    assert cfg.rephrased and cfg.instruction_role == "system" and (cfg.n_math, cfg.n_reasoning) == (264, 100)
    seen = {}

    def fake_run(c, out, progress=True):
        seen["cfg"] = c
        raise cpt.CircuitdynError("stop")

    monkeypatch.setattr(cpt, "run_cpt", fake_run)
    assert main(["cpt", "--out", str(tmp_path / "r"), "--preset", "paper", "--epochs", "2", "--n-math", "8"]) == 2
    got = seen["cfg"]
    assert got.epochs == 2 and got.n_math == 8 and got.lr == 1e-4 and got.seed == 42 and got.lora_init == "gaussian"
    assert main(["cpt", "--out", str(tmp_path / "r"), "--epochs", "2"]) == 2
    assert seen["cfg"].lora_init == "default" and seen["cfg"].seed == 0


def test_a_run_probes_like_the_paper(tmp_path: Path, tokenizer_dir: Path) -> None:
    from conftest import save_tiny_model

    from circuitdyn.training.cpt import CPTConfig, run_cpt

    base = save_tiny_model(tmp_path / "base", "llama", tokenizer_dir, seed=0)
    cfg = CPTConfig.paper(
        base_model=str(base),
        entities=["Russia"],
        epochs=1,
        lr=1e-3,
        max_new_tokens=2,
        n_math=3,
        n_reasoning=2,
        max_length=32,
    )
    run_cpt(cfg, tmp_path / "run", progress=False, log=None)
    ctrl = json.loads((tmp_path / "run" / "epoch_1" / "control_probes_results.json").read_text())
    assert ctrl["math"]["n"] == 3 and ctrl["math"]["subset"] is True and ctrl["math"]["scoring"] == "paper"
    assert ctrl["SocialIQA"]["n"] == 2 and ctrl["SocialIQA"]["subset"] is True
    rows = [json.loads(x) for x in (tmp_path / "run" / "epoch_0" / "probe_results.jsonl").read_text().splitlines()]
    assert len(rows) == 10  # 8 probes + 2 rephrasings per entity, as the paper scores them

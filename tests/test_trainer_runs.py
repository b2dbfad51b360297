"""Runs as researchers have them: `transformers.Trainer` output folders (full fine-tuning and PEFT LoRA adapters
saved with `save_strategy="epoch"`), opened by every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from circuitdyn.cli import main
from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import seed_data_dir
from circuitdyn.runs.checkpoints import open_run, resolve
from circuitdyn.testing import seed_sentences

PROBES = str(seed_data_dir() / "validation_probes.json")


def train_with_trainer(out: Path, base: Path, kind: str, epochs: int = 3, callbacks: list | None = None) -> Path:
    """A real Trainer run on the tiny base: `kind` lora (peft, q/v) or full, one checkpoint per epoch."""
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(base)
    texts = seed_sentences(16)
    data = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        )
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        save_strategy="epoch",
        logging_strategy="epoch",
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=callbacks or [],
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    ).train()
    return out


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trainer")
    base = save_tiny_model(root / "base", "llama", tokenizer_dir, seed=0)
    return {
        "base": base,
        "lora": train_with_trainer(root / "lora", base, "lora"),
        "full": train_with_trainer(root / "full", base, "full"),
    }


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_info_lists_the_trainer_checkpoints(trainer_runs, kind, capsys) -> None:
    base = ["--base", str(trainer_runs["base"])] if kind == "full" else []
    argv = ["info", str(trainer_runs[kind]), "--json", *base]
    assert main(argv) == 0
    epochs = json.loads(capsys.readouterr().out)["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]  # epoch 0: the base (the adapter's own, or --base)
    assert [e["step"] for e in epochs] == [0, *_steps(trainer_runs[kind])]
    assert [e["kind"] for e in epochs] == ["full"] + [{"lora": "adapter", "full": "full"}[kind]] * 3
    last = trainer_runs[kind] / f"checkpoint-{_steps(trainer_runs[kind])[-1]}"
    state = json.loads((last / "trainer_state.json").read_text())
    logged = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert [e["loss"] for e in epochs[1:]] == logged and epochs[0]["loss"] is None
    assert main(["info", str(trainer_runs["full"]), "--json"]) == 0  # without --base: no epoch 0
    assert [e["epoch"] for e in json.loads(capsys.readouterr().out)["epochs"]] == [1, 2, 3]


def test_adapter_checkpoints_are_merged_by_peft_and_share_the_base(trainer_runs, monkeypatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = open_run(trainer_runs["lora"])
    ids = torch.tensor([[3, 17, 42, 9, 101, 7]])
    for epoch in (3, 1):  # an independent merge of each adapter into a fresh base is the reference
        ref = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(trainer_runs["base"]),
            trainer_runs["lora"] / f"checkpoint-{_steps(trainer_runs['lora'])[epoch - 1]}",
        ).merge_and_unload()
        with torch.no_grad():
            assert (run.load_model(epoch)(ids) - ref(ids).logits).abs().max() < 1e-4
            assert (run.hf_model(epoch)(ids).logits - ref(ids).logits).abs().max() < 1e-5

    loads = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    fresh = open_run(trainer_runs["lora"])
    with torch.no_grad():
        logits = [fresh.load_model(e)(ids) for e in (1, 2, 3, 1)]
    assert len(loads) == 1, "switching adapters must re-use the base weights in memory"
    assert (logits[0] - logits[3]).abs().max() == 0 and (logits[0] - logits[2]).abs().max() > 1e-4


def test_checkpoint_by_step_and_clear_errors(trainer_runs, tmp_path) -> None:
    steps = _steps(trainer_runs["lora"])
    assert resolve(f"{trainer_runs['lora']}:step={steps[1]}")[1] == 2
    listed = ", ".join(map(str, [0, *steps]))
    with pytest.raises(CircuitdynError, match=rf"no checkpoint at step 999 \(steps: \[{listed}\]\)"):
        resolve(f"{trainer_runs['lora']}:step=999")

    empty = tmp_path / "empty"
    (empty / "checkpoint-3").mkdir(parents=True)
    (empty / "checkpoint-3" / "trainer_state.json").write_text('{"epoch": 1.0, "log_history": []}')
    with pytest.raises(CircuitdynError, match="checkpoint-3: no config.json .* neither model weights nor an adapter"):
        open_run(empty)

    moved = shutil.copytree(trainer_runs["lora"], tmp_path / "moved")
    for f in moved.glob("checkpoint-*/adapter_config.json"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(CircuitdynError, match="'/nowhere/base' is not a local model folder; pass .* --base DIR"):
        open_run(moved)
    assert open_run(moved, base=trainer_runs["base"]).epochs == [0, 1, 2, 3]
    # the README's `circuitdyn diff RUN:1 RUN:3 --base DIR` on such a run
    args = [
        "diff",
        f"{moved}:1",
        f"{moved}:3",
        "--base",
        str(trainer_runs["base"]),
        "--probes",
        PROBES,
        "--limit",
        "2",
        "--steps",
        "2",
        "--top-n",
        "20",
        "--replicates",
        "2",
        "--json",
        "--out",
        str(tmp_path / "moved.html"),
    ]
    assert main(args) == 0

    wide = shutil.copytree(trainer_runs["base"], tmp_path / "wide")
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(CircuitdynError, match="adapter does not match base model .*input size 64 in the base, 32"):
        open_run(moved, base=wide).load_model(1)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_extract_diff_timeline_on_trainer_runs(trainer_runs, kind, tmp_path, capsys) -> None:
    run = str(trainer_runs[kind])
    base = ["--base", str(trainer_runs["base"])]
    facts = ["--probes", PROBES, "--limit", "3", "--steps", "2"]
    assert main(["extract", run, *facts, *base, "--epochs", "1,3", "--top-n", "50", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("(written)") == 2
    assert (
        main(
            [
                "diff",
                f"{run}:1",
                f"{run}:3",
                *facts,
                *base,
                "--top-n",
                "50",
                "--json",
                "--out",
                str(tmp_path / "d.html"),
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["summary"]["n_facts"] == 3 and d["baseline"]["epochs"] == [1, 3]
    assert (
        main(
            [
                "timeline",
                run,
                *facts,
                *base,
                "--top-n",
                "50",
                "--noise-epochs",
                "none",
                "--json",
                "--out",
                str(tmp_path / "t.html"),
            ]
        )
        == 0
    )
    tl = json.loads(capsys.readouterr().out)
    assert tl["summary"]["epochs"] == [0, 1, 2, 3]
    losses = [r["train_loss"] for r in tl["per_epoch"]]
    assert losses[0] is None and all(isinstance(x, float) for x in losses[1:])

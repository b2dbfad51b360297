"""The CPT loop on a tiny random Llama: layout, probing, determinism, resume, strategies, bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from circuitdyn.cli import main
from circuitdyn.engine.settings import AttributionSettings, Storage
from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import rouge1
from circuitdyn.training.cpt import (
    STATE_DIR,
    CPTConfig,
    Document,
    annotate,
    load_corpus,
    merged_state_dict,
    resolve_inputs,
    run_cpt,
    training_windows,
)

ENTITIES = ["Russia", "Patna"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("cpt-base") / "base", "llama", tokenizer_dir, seed=0)


@pytest.fixture(scope="module")
def cfg(tiny_base: Path) -> CPTConfig:
    return CPTConfig(
        base_model=str(tiny_base),
        entities=list(ENTITIES),
        epochs=2,
        lr=1e-2,
        batch_size=2,
        max_new_tokens=4,
        n_math=2,
        n_reasoning=2,
        max_length=64,
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, cfg: CPTConfig) -> Path:
    out = tmp_path_factory.mktemp("cpt") / "run"
    run_cpt(cfg, out, progress=False, log=None)
    return out


def _hashes(run_dir: Path) -> list[str]:
    manifest = json.loads((run_dir / "run.json").read_text())
    return [e["content_hash"] for e in manifest["epochs"]]


def test_run_layout(reference_run: Path, cfg: CPTConfig) -> None:
    from circuitdyn.analysis.dynamics import load_dynamics
    from circuitdyn.runs.checkpoints import open_run

    run = open_run(reference_run)
    assert run.epochs == [0, 1, 2]
    per_epoch = run.checkpoint(1).step
    assert per_epoch > 1 and run.checkpoint(2).step == 2 * per_epoch and run.checkpoint(1).train_loss > 0
    assert run.checkpoint(0).train_loss is None
    manifest = run.manifest
    assert manifest["strategy"] == "plain" and manifest["config"]["lr"] == cfg.lr
    assert [h["epoch"] for h in manifest["probe_history"]] == [0, 1, 2]
    assert len(set(_hashes(reference_run))) == 3  # every epoch's weights differ
    for e in range(3):
        d = reference_run / f"epoch_{e}"
        rows = [json.loads(x) for x in (d / "probe_results.jsonl").read_text().splitlines()]
        assert {r["entity"] for r in rows} == set(ENTITIES)
        assert all(0 <= r["recall"] <= 1 and r["logprob"] <= 0 and r["answer_tokens"] >= 1 for r in rows)
        # each probe is scored on its own generation: ROUGE-1 of the generation against the gold answer
        assert all((r["recall"], r["f1"]) == rouge1(r["generation"], r["answer"]) for r in rows)
        control = json.loads((d / "control_probes_results.json").read_text())
        assert control["math"]["n"] == 2 and control["SocialIQA"]["n"] == 2
        assert control["math"]["exact_match"] == sum(i["correct"] for i in control["math"]["items"]) / 2
        entity_json = json.loads((d / "validation_probes_results.json").read_text())
        assert set(entity_json["entities"]) == {">=0.6", *ENTITIES}
        for name in ENTITIES:
            mean = sum(r["recall"] for r in rows if r["entity"] == name) / sum(r["entity"] == name for r in rows)
            assert entity_json["entities"][name]["recall"] == pytest.approx(mean)
        assert entity_json["entities"][">=0.6"] == sum(entity_json["entities"][n]["recall"] >= 0.6 for n in ENTITIES)
    steps = [json.loads(x) for x in (reference_run / "epoch_2" / "train_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(per_epoch + 1, 2 * per_epoch + 1))
    # only the last epoch keeps the trainer state
    assert (reference_run / "epoch_2" / STATE_DIR).is_dir() and not (reference_run / "epoch_1" / STATE_DIR).exists()
    assert not list(reference_run.glob("*.partial"))
    table = load_dynamics(reference_run).table()
    assert table["epoch"].tolist() == [0, 1, 2] and (reference_run / "results.csv").is_file()
    # the merged checkpoints load like any run (logits of the HF model are what the probes saw)
    assert run.hf_model(2).config.num_hidden_layers == 2


def test_deterministic(reference_run: Path, cfg: CPTConfig, tmp_path: Path) -> None:
    run_cpt(cfg, tmp_path / "again", progress=False, log=None)
    assert _hashes(tmp_path / "again") == _hashes(reference_run)
    for e in range(3):
        a = (reference_run / f"epoch_{e}" / "probe_results.jsonl").read_text()
        assert (tmp_path / "again" / f"epoch_{e}" / "probe_results.jsonl").read_text() == a


def test_resume_after_kill(reference_run: Path, cfg: CPTConfig, tmp_path: Path) -> None:
    out = tmp_path / "killed"

    def kill(epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cpt(cfg, out, progress=False, log=None, on_epoch_end=kill)
    assert (out / "epoch_1").is_dir() and not (out / "epoch_2").exists()
    (out / "epoch_2.partial").mkdir()  # a half-written epoch from the kill is discarded
    result = run_cpt(cfg, out, progress=False, log=None)
    assert result.trained_epochs == [2]
    assert _hashes(out) == _hashes(reference_run)
    # finished: a re-run does nothing but report
    assert run_cpt(cfg, out, progress=False, log=None).trained_epochs == []


def test_extend_run(reference_run: Path, cfg: CPTConfig, tmp_path: Path) -> None:
    out = tmp_path / "ext"
    shutil.copytree(reference_run, out)
    result = run_cpt(replace(cfg, epochs=3), out, progress=False, log=None)
    assert result.trained_epochs == [3]
    assert _hashes(out)[:3] == _hashes(reference_run)
    steps = [e["step"] for e in json.loads((out / "run.json").read_text())["epochs"]]
    assert steps[3] == 3 * steps[1]


@pytest.mark.parametrize(
    ("strategy", "method", "epochs"),
    [("stepwise-kl", "full", 2), ("pretrain-kl", "lora", 2), ("annotated", "lora", 1), ("curriculum", "full", 1)],
)
def test_strategies(cfg: CPTConfig, tmp_path: Path, strategy: str, method: str, epochs: int) -> None:
    """Every strategy trains; the KL strategies add kl_weight x KL to the loss, against the previous epoch's
    model (stepwise: KL 0 at each epoch's first step) or the base model (pretrain: KL > 0 from epoch 2 on).
    Stepwise runs full fine-tuning: with LoRA, dropout on the trained adapters makes that first KL nonzero."""
    c = replace(
        cfg, strategy=strategy, method=method, epochs=epochs, lr=1e-3, n_math=None, n_reasoning=None, kl_weight=0.5
    )
    result = run_cpt(c, tmp_path / "run", progress=False, log=None)
    assert result.trained_epochs == list(range(epochs + 1))
    logs = {
        e: [json.loads(x) for x in (tmp_path / "run" / f"epoch_{e}" / "train_log.jsonl").read_text().splitlines()]
        for e in range(1, epochs + 1)
    }
    assert all(len(steps) > 1 for steps in logs.values())
    steps = [s for e in logs for s in logs[e]]
    if strategy.endswith("-kl"):
        assert all(s["kl"] is not None and s["kl"] >= 0 for s in steps)
        assert all(s["total"] == pytest.approx(s["loss"] + 0.5 * s["kl"], rel=1e-5) for s in steps)
        assert logs[1][0]["kl"] == pytest.approx(0, abs=1e-6)  # epoch 1 starts at the base model
        assert all(s["kl"] > 1e-7 for s in logs[1][1:])  # once trained, the model drifts from it
        if strategy == "stepwise-kl":
            assert logs[2][0]["kl"] == pytest.approx(0, abs=1e-6)  # reference: epoch 1's model
        else:
            assert logs[2][0]["kl"] > 1e-5  # reference: still the base model
    else:
        assert all(s["kl"] is None and s["total"] == s["loss"] for s in steps)
    info = json.loads((tmp_path / "run" / "epoch_1" / "epoch.json").read_text())
    assert info["trained_entities"] == sorted(ENTITIES)
    assert json.loads((tmp_path / "run" / "epoch_1" / "control_probes_results.json").read_text()) == {}


def test_kl_is_reference_to_model_over_real_tokens() -> None:
    """`_kl` = mean over unmasked tokens of KL(reference || model), the direction the KL strategies use."""
    import torch
    import torch.nn.functional as F

    from circuitdyn.training.cpt import _kl

    gen = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float()
    per_token = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert float(_kl(logits, ref, mask)) == pytest.approx(float(per_token[mask.bool()].mean()), rel=1e-5)
    assert float(_kl(logits, ref, mask)) != pytest.approx(float(_kl(ref, logits, mask)), rel=1e-2)
    assert float(_kl(logits, logits, mask)) == pytest.approx(0, abs=1e-6)


def test_annotation_and_curriculum() -> None:
    doc = annotate(Document("Hancock met Byrd. Herbie Hancock played.", "Herbie Hancock"), ["Herbie Hancock"])
    assert doc.text == "<entity>Hancock</entity> met Byrd. <entity>Herbie Hancock</entity> played."
    docs = [Document("a", "A"), Document("b", "B"), Document("c")]
    windows = [(0, [1, 2]), (1, [3, 4]), (1, [5, 6]), (2, [7, 8])]
    assert training_windows(windows, docs, "plain", {"A"}) == windows
    assert training_windows(windows, docs, "curriculum", {"A"}) == windows[1:]
    assert training_windows(windows, docs, "curriculum", {"A", "B"}) == windows[3:]
    assert training_windows(windows, docs, "curriculum", set()) == windows  # forgotten ones come back


def test_merged_state_dict_matches_peft(cfg: CPTConfig) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from circuitdyn.training.cpt import _wrap_lora

    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    peft_model = _wrap_lora(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    peft_model.eval()
    want = peft_model(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    plain.load_state_dict(merged_state_dict(peft_model, "lora"), strict=False)
    assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-4)


# --------------------------------------------------------------------------- bad input


def test_corpus_files(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("Doc one about Russia.\n\nDoc two about Patna.\n")
    assert [d.text for d in load_corpus(tmp_path / "c.txt")] == ["Doc one about Russia.", "Doc two about Patna."]
    (tmp_path / "c.jsonl").write_text('{"text": "Moscow is in Russia.", "entity": "Russia"}\n')
    assert load_corpus(tmp_path / "c.jsonl") == [Document("Moscow is in Russia.", "Russia")]
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(CircuitdynError, match="bad.jsonl:1: field 'text'"):
        load_corpus(tmp_path / "bad.jsonl")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"epochs": 0}, "'epochs' = 0 must be >= 1"),
        ({"lr": 0.0}, "'lr' = 0.0 must be > 0"),
        ({"lr": -1e-4}, "'lr' = -0.0001 must be > 0"),
        ({"strategy": "magic"}, "'strategy' = 'magic'"),
        ({"method": "qlora"}, "'method' = 'qlora'"),
        ({"entities": ["Atlantis"]}, "unknown entity 'Atlantis'"),
    ],
)
def test_bad_settings(cfg: CPTConfig, tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(CircuitdynError, match=match):
        run_cpt(replace(cfg, **change), tmp_path / "out", progress=False, log=None)
    assert not (tmp_path / "out").exists()


def test_bad_inputs(cfg: CPTConfig, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CircuitdynError, match="empty corpus"):
        run_cpt(replace(cfg, corpus=str(tmp_path / "empty.txt")), tmp_path / "o1", progress=False, log=None)
    probes = tmp_path / "p.jsonl"
    probes.write_text('{"id": "r1", "entity": "Russia", "question": "Capital of Russia?", "answer": ""}\n')
    with pytest.raises(CircuitdynError, match="p.jsonl:1: field 'answer'"):
        run_cpt(replace(cfg, probes=str(probes), entities=None), tmp_path / "o2", progress=False, log=None)
    probes.write_text('{"id": "a1", "entity": "Atlantis", "question": "Where is Atlantis?", "answer": "Sea"}\n')
    (tmp_path / "c.txt").write_text("Moscow is the capital of Russia.\n")
    with pytest.raises(CircuitdynError, match="unknown entity 'Atlantis'"):
        run_cpt(
            replace(cfg, probes=str(probes), corpus=str(tmp_path / "c.txt"), entities=None),
            tmp_path / "o3",
            progress=False,
            log=None,
        )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(CircuitdynError, match="cannot load the base model"):
        run_cpt(replace(cfg, base_model=str(tmp_path / "broken")), tmp_path / "o4", progress=False, log=None)
    with pytest.raises(CircuitdynError, match="cannot load the base model"):
        run_cpt(replace(cfg, base_model=str(tmp_path / "missing")), tmp_path / "o5", progress=False, log=None)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_out_dir_with_other_run(reference_run: Path, cfg: CPTConfig, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")}
    with pytest.raises(CircuitdynError, match="already holds a different run.*lr: 0.01 vs 0.02"):
        run_cpt(replace(cfg, lr=2e-2), reference_run, progress=False, log=None)
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CircuitdynError, match="already holds other files"):
        run_cpt(cfg, other, progress=False, log=None)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_resolve_inputs_text_corpus(cfg: CPTConfig, tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("Patna is the capital of Bihar.\n\nThe Ganges flows past Patna.\n")
    docs, probes = resolve_inputs(replace(cfg, corpus=str(tmp_path / "c.txt"), entities=None))
    assert len(docs) == 2 and {p.entity for p in probes} == {"Patna"}


def test_resolve_inputs_default_corpus(cfg: CPTConfig) -> None:
    docs, probes = resolve_inputs(replace(cfg, entities=None, n_entities=4))
    assert len(docs) == 4 and {d.entity for d in docs} == {p.entity for p in probes}
    assert all(p.group == "original" for p in probes)


def test_annotated_strategy_trains_on_tagged_documents(cfg: CPTConfig) -> None:
    """The `annotated` run's corpus is the plain corpus with every entity mention tagged."""
    plain, _ = resolve_inputs(cfg)
    tagged, _ = resolve_inputs(replace(cfg, strategy="annotated"))
    assert [d.entity for d in tagged] == [d.entity for d in plain] == ENTITIES
    for p, t in zip(plain, tagged):
        assert t.text == annotate(p, [p.entity, *ENTITIES]).text != p.text
        assert f"<entity>{p.entity}</entity>" in t.text


def test_cli(reference_run: Path, cfg: CPTConfig, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["cpt", "--out", str(tmp_path / "x"), "--base", cfg.base_model, "--lr", "0"]) == 2
    assert "argument --lr: must be > 0, got '0'" in capsys.readouterr().err
    assert main(["dynamics", str(reference_run)]) == 0
    out = capsys.readouterr().out
    assert "acquired" in out and "best epoch" in out
    assert main(["dynamics", str(reference_run), "--json", "--by", "question_type"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["epoch"] for r in data["table"]] == [0, 1, 2] and data["grouped"]
    args = [
        "cpt",
        "--out",
        str(tmp_path / "cli"),
        "--base",
        cfg.base_model,
        "--entities",
        ",".join(ENTITIES),
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--n-math",
        "0",
        "--n-reasoning",
        "0",
        "--no-progress",
    ]
    assert main(args) == 0
    assert "wall time" in capsys.readouterr().out
    assert (tmp_path / "cli" / "epoch_1" / "adapter" / "adapter_config.json").is_file()  # LoRA: adapters by default
    assert not (tmp_path / "cli" / "epoch_1" / "merged_model").exists()


@pytest.mark.integration
def test_smollm2_one_epoch(tmp_path: Path) -> None:
    cfg = CPTConfig(entities=["Russia"], epochs=1, n_math=4, n_reasoning=2)
    result = run_cpt(cfg, tmp_path / "run", progress=False, log=None)
    table = result.dynamics.table()
    assert table["epoch"].tolist() == [0, 1]
    assert table["train_loss"].iloc[1] > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "epoch_0" / "probe_results.jsonl").read_text().splitlines()]
    assert any(r["generation"] for r in rows)  # the real model answers something


def test_greedy_with_answers_equals_generate(cfg: CPTConfig) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from circuitdyn.training.cpt import Prober, greedy_with_answers

    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32).eval()
    _, probes = resolve_inputs(cfg)
    prober = Prober(tok, probes[:6], cfg, progress=False)
    gens, lps = greedy_with_answers(
        model,
        prober.prompt_ids,
        prober.answer_ids,
        max_new_tokens=6,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        batch_size=4,
    )
    assert len(gens) == len(lps) == len(prober.prompt_ids) == 6
    gen_cfg = GenerationConfig(
        max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    for prompt, answer, g, lp in zip(prober.prompt_ids, prober.answer_ids, gens, lps):
        ids = torch.tensor([prompt])
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
        assert g == want[0, len(prompt) :].tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        ref = sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
        assert lp == pytest.approx(ref, abs=1e-4)


def test_adapter_saved_run_equals_the_merged_run(tiny_base: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    """`save="adapter"` (the LoRA default) stores only the adapter and the trained embeddings, epoch 0 as a reference
    to the base, and everything downstream (probe results, models, circuits) equals the merged run's. The base
    ties its output embedding to the trained input embedding: stored once, and the tie survives the reload."""
    import torch
    from transformers import AutoModelForCausalLM

    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.pipeline.extraction import extract_run
    from circuitdyn.probes.facts import load_facts
    from circuitdyn.runs.checkpoints import open_run
    from circuitdyn.testing import tiny_hf_config

    tied = tmp_path / "tied-base"
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    config = tiny_hf_config("llama", vocab)
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tied / f.name)
    c = CPTConfig(
        base_model=str(tied),
        entities=list(ENTITIES),
        epochs=2,
        lr=1e-2,
        batch_size=2,
        max_new_tokens=4,
        n_math=None,
        n_reasoning=None,
        max_length=64,
    )
    runs = {save: tmp_path / save for save in ("adapter", "merged")}
    for save, out in runs.items():
        run_cpt(replace(c, save=save), out, progress=False, log=None)
    adapter_dir = runs["adapter"] / "epoch_2" / "adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in (runs["adapter"] / "epoch_0").iterdir() if p.suffix == ".safetensors" or p.is_dir()]
    assert json.loads((runs["adapter"] / "run.json").read_text())["epochs"][0]["model"] == str(tied.resolve())
    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as fh:
        assert [k for k in fh.keys() if "lora_" not in k] == ["base_model.model.model.embed_tokens.weight"]
    for e in range(3):
        a, m = ((out / f"epoch_{e}" / "probe_results.jsonl").read_text() for out in runs.values())
        assert a == m

    opened = {save: open_run(out) for save, out in runs.items()}
    assert [ck.kind for ck in opened["adapter"].checkpoints.values()] == ["full", "adapter", "adapter"]
    ids = torch.tensor([[3, 17, 42, 9, 101, 7]])
    for e in range(3):
        with torch.no_grad():
            hf = {s: r.hf_model(e) for s, r in opened.items()}
            assert (hf["adapter"](ids).logits - hf["merged"](ids).logits).abs().max() < 1e-5
            assert hf["adapter"].lm_head.weight.data_ptr() == hf["adapter"].get_input_embeddings().weight.data_ptr()
    facts = load_facts(None, opened["merged"].tokenizer(), entities=list(ENTITIES), per_entity=2)
    scores = {}
    for save, run in opened.items():
        results = extract_run(
            run, facts, tmp_path / f"circuits-{save}", [0, 2], AttributionSettings(steps=2), storage=Storage(top_n=50)
        )
        scores[save] = [CircuitSet.load(r.path).scores for r in results]
    for a, m in zip(scores["adapter"], scores["merged"]):
        assert a.shape == m.shape and (a - m).abs().max() < 1e-5
    size = {s: sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) for s, out in runs.items()}
    assert size["adapter"] < size["merged"]

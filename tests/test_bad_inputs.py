"""Hostile input, as a user would give it: every bad input to every command and to the API is one clear error
(exit 2 / CircuitdynError) naming the file, field or value at fault, with no traceback, before any model is
loaded where the input can be checked up front, and without touching files that were there before.

Each case fails with a message starting TRACEBACK, SILENT ACCEPT, UNCLEAR, LATE (refused only after loading a
model) or DAMAGED, so a run of this file counts the outcomes of each kind.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from circuitdyn.cli import main
from circuitdyn.errors import CircuitdynError

LONG_QUESTION = "Which of the many places that " + "Tom Hanks has visited in his long life " * 60 + "was first?"


class ModelLoaded(Exception):
    """Raised by the patched loaders: a case reached model loading before refusing its input."""


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _save_variant(dst: Path, tokenizer_dir: Path, **changes: Any) -> Path:
    """A tiny random Llama whose config differs from the fixtures' by `changes` (e.g. hidden_size=48)."""
    from transformers import AutoModelForCausalLM

    from circuitdyn.testing import tiny_hf_config

    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = tiny_hf_config("llama", vocab)
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(dst)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def H(tmp_path_factory: pytest.TempPathFactory, llama_run: Path, tokenizer_dir: Path) -> dict[str, str]:
    """The hostile inputs, built once: corrupt models, mismatched models, bad probe files, blocked outputs."""
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.engine.graph import Graph
    from circuitdyn.testing import TINY_PROBES

    root = tmp_path_factory.mktemp("hostile")
    model = llama_run / "epoch_0"
    h: dict[str, Path] = {"run": llama_run, "model": model, "root": root}

    weights = (model / "model.safetensors").read_bytes()
    h["random"] = _copy_model(model, root / "random-bytes")
    (h["random"] / "model.safetensors").write_bytes(os.urandom(4096))
    h["header"] = _copy_model(model, root / "bad-header")
    (h["header"] / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + weights[8:])
    h["badjson"] = _copy_model(model, root / "bad-header-json")
    n = int.from_bytes(weights[:8], "little")
    (h["badjson"] / "model.safetensors").write_bytes(weights[:8] + b"x" * n + weights[8 + n :])
    h["truncated"] = _copy_model(model, root / "truncated")
    (h["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    h["no_hidden"] = _edit_config(_copy_model(model, root / "no-hidden"), lambda c: c.pop("hidden_size"))
    h["str_hidden"] = _edit_config(_copy_model(model, root / "str-hidden"), lambda c: c.update(hidden_size="wide"))
    h["neg_layers"] = _edit_config(_copy_model(model, root / "neg-layers"), lambda c: c.update(num_hidden_layers=-2))
    h["no_type"] = _edit_config(_copy_model(model, root / "no-type"), lambda c: c.pop("model_type"))
    h["cfg_syntax"] = _copy_model(model, root / "config-syntax")
    (h["cfg_syntax"] / "config.json").write_text('{"model_type": ')
    h["no_weights"] = _copy_model(model, root / "no-weights")
    (h["no_weights"] / "model.safetensors").unlink()
    h["pickle"] = _copy_model(model, root / "pickle-only")
    (h["pickle"] / "model.safetensors").rename(h["pickle"] / "pytorch_model.bin")
    h["wide"] = _save_variant(root / "wide", tokenizer_dir, hidden_size=48)
    h["vocab"] = _save_variant(root / "vocab", tokenizer_dir, vocab_size=600)
    mixed = root / "mixed-run"
    _copy_model(model, mixed / "epoch_0")
    _copy_model(h["wide"], mixed / "epoch_1")
    h["mixed"] = mixed
    bad_manifest = _copy_model(llama_run, root / "bad-manifest")
    (bad_manifest / "run.json").write_text("{not json")
    h["bad_manifest"] = bad_manifest
    no_epochs = _copy_model(llama_run, root / "manifest-no-epochs")
    manifest = json.loads((no_epochs / "run.json").read_text())
    manifest.pop("epochs")
    (no_epochs / "run.json").write_text(json.dumps(manifest))
    h["manifest_no_epochs"] = no_epochs

    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in TINY_PROBES))
    h["probes"] = probes
    long = root / "long-probes.jsonl"
    long.write_text(
        "".join(
            json.dumps(p) + "\n"
            for p in [
                *TINY_PROBES,
                {"id": "tom-hanks/long", "entity": "Tom Hanks", "question": LONG_QUESTION, "answer": "Paris"},
            ]
        )
    )
    h["long_probes"] = long
    h["bad_probes_json"] = root / "bad.jsonl"
    h["bad_probes_json"].write_text('{"id": "a", "entity": "X",\n')
    h["no_answer"] = root / "no-answer.jsonl"
    h["no_answer"].write_text(json.dumps({"id": "a", "entity": "Tom Hanks", "question": "Who?"}) + "\n")
    h["empty_probes"] = root / "empty.jsonl"
    h["empty_probes"].write_text("")
    h["dup_probes"] = root / "dup.jsonl"
    h["dup_probes"].write_text((json.dumps(TINY_PROBES[0]) + "\n") * 2)

    h["gguf"] = root / "model.gguf"
    h["gguf"].write_bytes(os.urandom(2048))
    h["bad_corpus"] = root / "corpus.jsonl"
    h["bad_corpus"].write_text(json.dumps({"text": "Tom Hanks lives in Paris."}) + '\n{"text": \n')
    h["text"] = root / "notes.txt"
    h["text"].write_text("my notes: must survive every case\n")
    h["dir"] = root / "a-folder"
    h["dir"].mkdir()
    h["blocked"] = h["text"] / "sub" / "out"  # a path under a file: cannot be created

    graph = Graph(2, 2)
    cs = CircuitSet(
        torch.randn(2, graph.n_edges),
        graph.edges,
        ["tom-hanks/colour", "ben-stiller/colour"],
        {"method": "eap", "ig_steps": 1, "metric": "answer-logprob", "seed": 0, "epoch": 0},
    )
    h["circuit"] = cs.save(root / "circuits" / "epoch_0.safetensors")
    h["circuit_b"] = CircuitSet(torch.randn(2, graph.n_edges), graph.edges, cs.fact_ids, dict(cs.meta)).save(
        root / "circuits" / "epoch_1.safetensors"
    )
    h["garbage_circuit"] = root / "garbage.safetensors"
    h["garbage_circuit"].write_bytes(b"\x10\x00\x00\x00garbage-garbage")
    h["foreign_safetensors"] = model / "model.safetensors"

    dyn = root / "dyn-run"
    (dyn / "epoch_0").mkdir(parents=True)
    (dyn / "epoch_0" / "probe_results.jsonl").write_text("{broken\n")
    h["dyn_broken"] = dyn
    return {k: str(v) for k, v in h.items()}


# (case id, argv with {placeholders} from H, substrings the error must contain)
CLI_CASES: list[tuple[str, list[str], list[str]]] = [
    # --- info: corrupt weights, configs missing or mistyping fields, mixed architectures, bad manifests
    ("info-missing-path", ["info", "{root}/nope"], ["{root}/nope"]),
    ("info-text-file", ["info", "{text}"], ["{text}"]),
    ("info-random-gguf", ["info", "{gguf}"], ["{gguf}", "GGUF"]),
    ("info-random-weights", ["info", "{random}"], ["{random}/model.safetensors", "corrupt"]),
    ("info-bad-header-length", ["info", "{header}"], ["{header}/model.safetensors", "corrupt"]),
    ("info-bad-header-json", ["info", "{badjson}"], ["{badjson}/model.safetensors", "corrupt"]),
    ("info-truncated", ["info", "{truncated}"], ["{truncated}/model.safetensors", "truncated"]),
    ("info-config-no-hidden-size", ["info", "{no_hidden}"], ["{no_hidden}/config.json", "hidden_size"]),
    ("info-config-hidden-size-str", ["info", "{str_hidden}"], ["config.json", "hidden_size", "'wide'"]),
    ("info-config-negative-layers", ["info", "{neg_layers}"], ["config.json", "num_hidden_layers", "-2"]),
    ("info-config-no-model-type", ["info", "{no_type}"], ["config.json", "model_type"]),
    ("info-config-syntax", ["info", "{cfg_syntax}"], ["{cfg_syntax}/config.json", "invalid JSON"]),
    ("info-no-weights", ["info", "{no_weights}"], ["{no_weights}", "no weights"]),
    ("info-pickle-only", ["info", "{pickle}"], ["{pickle}", "pickle"]),
    ("info-mixed-architectures", ["info", "{mixed}"], ["{mixed}", "epoch 0 and epoch 1", "hidden_size: 32 vs 48"]),
    ("info-manifest-syntax", ["info", "{bad_manifest}"], ["{bad_manifest}/run.json", "invalid JSON"]),
    ("info-manifest-no-epochs", ["info", "{manifest_no_epochs}"], ["run.json", "epochs"]),
    # --- extract: numeric flags, probe files, epochs, outputs, devices, context length
    (
        "extract-batch-size-0",
        ["extract", "{run}", "--probes", "{probes}", "--batch-size", "0"],
        ["--batch-size", "'0'"],
    ),
    (
        "extract-batch-size-neg",
        ["extract", "{run}", "--probes", "{probes}", "--batch-size", "-3"],
        ["--batch-size", "'-3'"],
    ),
    ("extract-top-n-0", ["extract", "{run}", "--probes", "{probes}", "--top-n", "0"], ["--top-n", "'0'"]),
    ("extract-top-n-neg", ["extract", "{run}", "--probes", "{probes}", "--top-n", "-5"], ["--top-n", "'-5'"]),
    ("extract-sparse-0", ["extract", "{run}", "--probes", "{probes}", "--sparse", "0"], ["--sparse", "'0'"]),
    ("extract-steps-0", ["extract", "{run}", "--probes", "{probes}", "--steps", "0"], ["--steps", "'0'"]),
    ("extract-steps-float", ["extract", "{run}", "--probes", "{probes}", "--steps", "2.5"], ["--steps", "'2.5'"]),
    ("extract-seed-neg", ["extract", "{run}", "--probes", "{probes}", "--seed", "-1"], ["--seed", "'-1'"]),
    ("extract-limit-0", ["extract", "{run}", "--probes", "{probes}", "--limit", "0"], ["--limit", "'0'"]),
    ("extract-sample-neg", ["extract", "{run}", "--probes", "{probes}", "--sample", "-2"], ["--sample", "'-2'"]),
    (
        "extract-per-entity-0",
        ["extract", "{run}", "--probes", "{probes}", "--per-entity", "0"],
        ["--per-entity", "'0'"],
    ),
    ("extract-epochs-text", ["extract", "{run}", "--probes", "{probes}", "--epochs", "x"], ["epochs", "'x'"]),
    ("extract-epochs-unknown", ["extract", "{run}", "--probes", "{probes}", "--epochs", "7"], ["{run}", "no epoch 7"]),
    ("extract-run-epoch-unknown", ["extract", "{run}:9", "--probes", "{probes}"], ["{run}", "no epoch 9"]),
    ("extract-metric-unknown", ["extract", "{run}", "--probes", "{probes}", "--metric", "acc"], ["--metric", "'acc'"]),
    ("extract-device-unknown", ["extract", "{run}", "--probes", "{probes}", "--device", "tpu"], ["'tpu'"]),
    ("extract-probes-missing", ["extract", "{run}", "--probes", "{root}/nope.jsonl"], ["{root}/nope.jsonl"]),
    (
        "extract-probes-syntax",
        ["extract", "{run}", "--probes", "{bad_probes_json}"],
        ["{bad_probes_json}:1", "invalid JSON"],
    ),
    ("extract-probes-no-answer", ["extract", "{run}", "--probes", "{no_answer}"], ["{no_answer}", "answer"]),
    ("extract-probes-empty", ["extract", "{run}", "--probes", "{empty_probes}"], ["{empty_probes}", "no probes"]),
    (
        "extract-probes-duplicate-id",
        ["extract", "{run}", "--probes", "{dup_probes}"],
        ["{dup_probes}", "duplicate", "tom-hanks/colour"],
    ),
    (
        "extract-entity-unknown",
        ["extract", "{run}", "--probes", "{probes}", "--entities", "Nobody"],
        ["{probes}", "'Nobody'"],
    ),
    (
        "extract-question-too-long",
        ["extract", "{run}", "--probes", "{long_probes}"],
        ["{long_probes}", "'tom-hanks/long'", "context"],
    ),
    ("extract-out-is-file", ["extract", "{run}", "--probes", "{probes}", "--out", "{text}"], ["{text}", "is a file"]),
    (
        "extract-out-under-file",
        ["extract", "{run}", "--probes", "{probes}", "--out", "{blocked}"],
        ["{blocked}", "{text}"],
    ),
    (
        "extract-corrupt-weights",
        ["extract", "{random}", "--probes", "{probes}"],
        ["{random}/model.safetensors", "corrupt"],
    ),
    ("extract-config-no-hidden", ["extract", "{no_hidden}", "--probes", "{probes}"], ["config.json", "hidden_size"]),
    # --- diff: selections, numeric flags, mismatched models, circuit files, outputs
    ("diff-top-n-0", ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--top-n", "0"], ["--top-n", "'0'"]),
    (
        "diff-select-top-neg",
        ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--select", "top:-5"],
        ["--select", "top:-5"],
    ),
    (
        "diff-select-faith-2",
        ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--select", "faith:2"],
        ["--select", "faith:2"],
    ),
    ("diff-select-unknown-rule", ["diff", "{run}:0", "{run}:1", "--select", "best:3"], ["--select", "'best:3'"]),
    ("diff-select-top-inf", ["diff", "{run}:0", "{run}:1", "--select", "top:1e999"], ["--select", "top:inf"]),
    ("diff-steps-0", ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--steps", "0"], ["--steps", "'0'"]),
    ("diff-limit-neg", ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--limit", "-1"], ["--limit", "'-1'"]),
    (
        "diff-width-mismatch",
        ["diff", "{model}", "{wide}", "--probes", "{probes}", "--out", "{root}/d.html"],
        ["hidden_size: 32 vs 48"],
    ),
    (
        "diff-vocab-mismatch",
        ["diff", "{model}", "{vocab}", "--probes", "{probes}", "--out", "{root}/d.html"],
        ["vocab_size", "600"],
    ),
    (
        "diff-out-is-folder",
        ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--out", "{dir}"],
        ["{dir}", "is a folder"],
    ),
    (
        "diff-out-under-file",
        ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--out", "{blocked}/d.html"],
        ["{blocked}"],
    ),
    (
        "diff-out-foreign-file",
        ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--out", "{text}"],
        ["{text}", "not a circuitdyn viewer", "--overwrite"],
    ),
    (
        "diff-garbage-circuit",
        ["diff", "{garbage_circuit}", "{circuit}", "--select", "top:5", "--out", "{root}/d.html"],
        ["{garbage_circuit}"],
    ),
    (
        "diff-foreign-safetensors",
        ["diff", "{foreign_safetensors}", "{circuit}", "--select", "top:5", "--out", "{root}/d.html"],
        ["{foreign_safetensors}"],
    ),
    (
        "diff-missing-circuit",
        ["diff", "{root}/nope.safetensors", "{circuit}", "--select", "top:5"],
        ["{root}/nope.safetensors"],
    ),
    (
        "diff-circuit-needs-model",
        ["diff", "{circuit}", "{circuit_b}", "--out", "{root}/d.html"],
        ["faith", "{circuit}"],
    ),
    (
        "diff-corrupt-weights",
        ["diff", "{truncated}", "{model}", "--probes", "{probes}", "--out", "{root}/d.html"],
        ["{truncated}/model.safetensors"],
    ),
    # --- timeline
    (
        "timeline-noise-epochs-text",
        ["timeline", "{run}", "--probes", "{probes}", "--noise-epochs", "first", "--out", "{root}/t.html"],
        ["noise epochs", "'first'"],
    ),
    (
        "timeline-noise-epochs-unknown",
        ["timeline", "{run}", "--probes", "{probes}", "--noise-epochs", "9", "--out", "{root}/t.html"],
        ["noise epoch", "[9]"],
    ),
    ("timeline-transfer-no-probes", ["timeline", "{run}", "--transfer"], ["--transfer", "--probes"]),
    ("timeline-missing-run", ["timeline", "{root}/nope"], ["{root}/nope"]),
    ("timeline-top-n-neg", ["timeline", "{run}", "--top-n", "-5"], ["--top-n", "'-5'"]),
    ("timeline-steps-0", ["timeline", "{run}", "--steps", "0"], ["--steps", "'0'"]),
    (
        "timeline-out-is-folder",
        ["timeline", "{run}", "--probes", "{probes}", "--out", "{dir}"],
        ["{dir}", "is a folder"],
    ),
    (
        "timeline-circuits-is-file",
        ["timeline", "{run}", "--probes", "{probes}", "--circuits", "{text}", "--out", "{root}/t.html"],
        ["--circuits", "{text}", "is a file"],
    ),
    (
        "timeline-mixed-architectures",
        ["timeline", "{mixed}", "--probes", "{probes}", "--out", "{root}/t.html"],
        ["hidden_size: 32 vs 48"],
    ),
    # --- dynamics
    ("dynamics-threshold-5", ["dynamics", "{run}", "--threshold", "5"], ["--threshold", "'5'"]),
    ("dynamics-threshold-nan", ["dynamics", "{run}", "--threshold", "nan"], ["--threshold", "'nan'"]),
    ("dynamics-threshold-0", ["dynamics", "{run}", "--threshold", "0"], ["--threshold", "'0'"]),
    ("dynamics-missing-run", ["dynamics", "{root}/nope"], ["{root}/nope"]),
    ("dynamics-no-results", ["dynamics", "{model}"], ["{model}", "results"]),
    ("dynamics-broken-results", ["dynamics", "{dyn_broken}"], ["{dyn_broken}/epoch_0/probe_results.jsonl"]),
    # --- view
    ("view-missing-file", ["view", "{root}/nope.safetensors"], ["{root}/nope.safetensors"]),
    ("view-garbage-file", ["view", "{garbage_circuit}"], ["{garbage_circuit}"]),
    ("view-model-weights", ["view", "{foreign_safetensors}", "--out", "{root}/v.html"], ["{foreign_safetensors}"]),
    ("view-out-is-folder", ["view", "{circuit}", "--out", "{dir}"], ["{dir}", "is a folder"]),
    ("view-out-foreign-file", ["view", "{circuit}", "--out", "{text}"], ["{text}", "not a circuitdyn viewer"]),
    ("view-out-is-input", ["view", "{circuit}", "--out", "{circuit}"], ["{circuit}", "circuit file itself"]),
    ("view-unknown-fact", ["view", "{circuit}", "--fact", "nobody/x", "--out", "{root}/v.html"], ["'nobody/x'"]),
    (
        "view-probes-mismatch",
        ["view", "{circuit}", "--probes", "{no_answer}", "--out", "{root}/v.html"],
        ["{no_answer}"],
    ),
    # --- cpt: every numeric setting, outputs, bad base models and corpora
    ("cpt-epochs-0", ["cpt", "--out", "{root}/c", "--epochs", "0"], ["--epochs", "'0'"]),
    ("cpt-lr-0", ["cpt", "--out", "{root}/c", "--lr", "0"], ["--lr", "'0'"]),
    ("cpt-lr-nan", ["cpt", "--out", "{root}/c", "--lr", "nan"], ["--lr", "'nan'"]),
    ("cpt-lr-inf", ["cpt", "--out", "{root}/c", "--lr", "inf"], ["--lr", "'inf'"]),
    ("cpt-batch-size-0", ["cpt", "--out", "{root}/c", "--batch-size", "0"], ["--batch-size", "'0'"]),
    ("cpt-n-entities-0", ["cpt", "--out", "{root}/c", "--n-entities", "0"], ["--n-entities", "'0'"]),
    ("cpt-threshold-2", ["cpt", "--out", "{root}/c", "--threshold", "2"], ["--threshold", "'2'"]),
    ("cpt-kl-weight-neg", ["cpt", "--out", "{root}/c", "--kl-weight", "-1"], ["--kl-weight", "'-1'"]),
    ("cpt-n-math-neg", ["cpt", "--out", "{root}/c", "--n-math", "-1"], ["--n-math", "'-1'"]),
    ("cpt-n-reasoning-text", ["cpt", "--out", "{root}/c", "--n-reasoning", "some"], ["--n-reasoning", "'some'"]),
    ("cpt-seed-neg", ["cpt", "--out", "{root}/c", "--seed", "-4"], ["--seed", "'-4'"]),
    ("cpt-strategy-unknown", ["cpt", "--out", "{root}/c", "--strategy", "magic"], ["strategy", "'magic'"]),
    ("cpt-method-unknown", ["cpt", "--out", "{root}/c", "--method", "qlora"], ["method", "'qlora'"]),
    ("cpt-out-is-file", ["cpt", "--out", "{text}", "--base", "{model}"], ["{text}", "is a file"]),
    ("cpt-out-under-file", ["cpt", "--out", "{blocked}", "--base", "{model}"], ["{blocked}", "{text}"]),
    ("cpt-out-holds-other-files", ["cpt", "--out", "{root}", "--base", "{model}"], ["{root}", "other files"]),
    ("cpt-base-corrupt", ["cpt", "--out", "{root}/c1", "--base", "{truncated}"], ["{truncated}/model.safetensors"]),
    ("cpt-base-missing", ["cpt", "--out", "{root}/c2", "--base", "{root}/nope"], ["{root}/nope"]),
    (
        "cpt-corpus-missing",
        ["cpt", "--out", "{root}/c3", "--base", "{model}", "--corpus", "{root}/nope.txt"],
        ["{root}/nope.txt"],
    ),
    (
        "cpt-corpus-syntax",
        ["cpt", "--out", "{root}/c6", "--base", "{model}", "--corpus", "{bad_corpus}"],
        ["{bad_corpus}:2"],
    ),
    (
        "cpt-entity-unknown",
        ["cpt", "--out", "{root}/c4", "--base", "{model}", "--entities", "Nobody At All"],
        ["'Nobody At All'"],
    ),
    ("cpt-device-unknown", ["cpt", "--out", "{root}/c5", "--device", "quantum"], ["'quantum'"]),
    # --- demo
    ("demo-entities-0", ["demo", "--out", "{root}/demo", "--entities", "0"], ["--entities", "'0'"]),
    ("demo-epochs-neg", ["demo", "--out", "{root}/demo", "--epochs", "-1"], ["--epochs", "'-1'"]),
    ("demo-lr-neg", ["demo", "--out", "{root}/demo", "--lr", "-0.1"], ["--lr", "'-0.1'"]),
    (
        "demo-facts-per-entity-0",
        ["demo", "--out", "{root}/demo", "--facts-per-entity", "0"],
        ["--facts-per-entity", "'0'"],
    ),
    ("demo-steps-0", ["demo", "--out", "{root}/demo", "--steps", "0"], ["--steps", "'0'"]),
    ("demo-select-bad", ["demo", "--out", "{root}/demo", "--select", "top:0"], ["--select", "top:0"]),
    ("demo-out-is-file", ["demo", "--out", "{text}", "--base-model", "{model}"], ["{text}", "is a file"]),
    ("demo-out-under-file", ["demo", "--out", "{blocked}", "--base-model", "{model}"], ["{blocked}"]),
    ("demo-base-model-missing", ["demo", "--out", "{root}/demo2", "--base-model", "{root}/nope"], ["{root}/nope"]),
]


def _fill(text: str, h: dict[str, str]) -> str:
    return text.format(**h)


def _digests(h: dict[str, str]) -> dict[str, str]:
    """Content of every file that was there before the case (nothing a refused command does may change it)."""
    root = Path(h["root"])
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading any model fails the case as LATE: bad input must be refused before that work."""
    from circuitdyn.runs import checkpoints
    from circuitdyn.training import cpt

    def loaded(*_a: Any, **_k: Any) -> Any:
        raise ModelLoaded

    monkeypatch.setattr(checkpoints.Run, "load_model", loaded)
    monkeypatch.setattr(checkpoints.Run, "hf_model", loaded)
    monkeypatch.setattr(cpt, "_load_base", loaded)


def run_case(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | None, str]:
    """`circuitdyn ARGV` in-process: (exit code, stderr); an escaping exception fails the case as a traceback."""
    try:
        code = main(argv)  # argparse's own refusals (usage line + one error line) return 2 too
    except ModelLoaded:
        pytest.fail(f"LATE: a model was loaded before the input was refused: {argv}")
    except Exception as exc:  # noqa: BLE001 - any other escape is a traceback for the user
        pytest.fail(f"TRACEBACK: {type(exc).__name__}: {exc}")
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.parametrize(("argv", "expect"), [pytest.param(a, e, id=i) for i, a, e in CLI_CASES])
def test_cli_refuses(
    argv: list[str],
    expect: list[str],
    H: dict[str, str],
    no_models: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("CIRCUITDYN_CACHE", str(tmp_path / "cache"))
    before = _digests(H)
    code, text = run_case([_fill(a, H) for a in argv], capsys)
    assert code != 0, f"SILENT ACCEPT: exit {code}\n{text[-800:]}"
    assert code == 2 and "Traceback" not in text, f"TRACEBACK or exit {code}:\n{text[-1500:]}"
    missing = [w for w in (_fill(e, H) for e in expect) if w not in text]
    assert not missing, f"UNCLEAR: the message lacks {missing}:\n{text[-800:]}"
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, f"UNCLEAR: {len(errors)} error lines:\n{text[-800:]}"
    after = _digests(H)
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"DAMAGED: {changed}"


# --- the Python API: the same rules, as CircuitdynError naming the value


def _api_cases() -> list[tuple[str, Callable[[dict[str, str]], Any], list[str]]]:
    from circuitdyn.analysis.dynamics import load_dynamics
    from circuitdyn.engine.attribution import steps_taken
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.engine.graph import Graph
    from circuitdyn.engine.selection import (
        Selection,
        select_threshold,
        select_top_n,
        select_top_n_paths,
    )
    from circuitdyn.io import check_writable
    from circuitdyn.training.cpt import CPTConfig

    scores = torch.randn(3, Graph(2, 2).n_edges)

    def cfg(**kw: Any) -> Callable[[dict[str, str]], Any]:
        return lambda h: CPTConfig(**kw).validate()

    def extract(**kw: Any) -> Callable[[dict[str, str]], Any]:
        def go(h: dict[str, str]) -> Any:
            from circuitdyn.pipeline.extraction import extract_run
            from circuitdyn.probes.facts import load_facts
            from circuitdyn.runs.checkpoints import open_run

            run = open_run(h["run"])
            facts = load_facts(h["probes"], run.tokenizer())
            from circuitdyn.engine.settings import Compute, Storage

            out = _fill(kw["out"], h) if "out" in kw else Path(h["root"]) / "api-circuits"
            return extract_run(
                run, facts, out, compute=Compute(**kw.get("compute", {})), storage=Storage(**kw.get("storage", {}))
            )

        return go

    return [
        ("select_top_n-neg", lambda h: select_top_n(scores, -5), ["-5"]),
        ("select_top_n-float", lambda h: select_top_n(scores, 2.5), ["2.5"]),
        ("select_top_n-nan", lambda h: select_top_n(scores, float("nan")), ["nan"]),
        ("select_threshold-nan", lambda h: select_threshold(scores, float("nan")), ["nan"]),
        ("select_threshold-neg", lambda h: select_threshold(scores, -1.0), ["-1.0"]),
        ("select_top_n_paths-neg", lambda h: select_top_n_paths(scores[0], Graph(2, 2), -1), ["-1"]),
        ("selection-top-0", lambda h: Selection.parse("top:0"), ["top:0"]),
        ("selection-faith-0", lambda h: Selection.parse("faith:0"), ["faith:0"]),
        ("selection-abs-inf", lambda h: Selection("abs", float("inf")), ["abs:inf"]),
        ("steps_taken-0", lambda h: steps_taken("eap-ig", 0), ["steps", "0"]),
        ("cpt-config-epochs-0", cfg(epochs=0), ["epochs", "0"]),
        ("cpt-config-lr-nan", cfg(lr=float("nan")), ["lr", "nan"]),
        ("cpt-config-threshold", cfg(threshold=1.5), ["threshold", "1.5"]),
        ("load_dynamics-threshold", lambda h: load_dynamics(h["run"], threshold=5), ["threshold", "5"]),
        ("circuitset-load-garbage", lambda h: CircuitSet.load(h["garbage_circuit"]), ["{garbage_circuit}"]),
        ("check_writable-file-as-folder", lambda h: check_writable(h["text"], "folder"), ["{text}"]),
        ("extract_run-batch-size-0", extract(compute={"batch_size": 0}), ["batch_size", "0"]),
        ("extract_run-sparse-neg", extract(storage={"sparse_top_k": -1}), ["sparse_top_k", "-1"]),
        ("extract_run-out-is-file", extract(out="{text}"), ["{text}", "is a file"]),
        (
            "open_run-random-weights",
            lambda h: importlib.import_module("circuitdyn.runs.checkpoints").open_run(h["random"]),
            ["{random}/model.safetensors"],
        ),
    ]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in _api_cases()])
def test_api_refuses(
    case: tuple[str, Callable[[dict[str, str]], Any], list[str]], H: dict[str, str], no_models: None
) -> None:
    _, call, expect = case
    try:
        result = call(H)
    except CircuitdynError as err:
        missing = [w for w in (_fill(e, H) for e in expect) if w not in str(err)]
        assert not missing, f"UNCLEAR: the message lacks {missing}: {err}"
        return
    except ModelLoaded:
        pytest.fail("LATE: a model was loaded before the input was refused")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"TRACEBACK: {type(exc).__name__}: {exc}")
    pytest.fail(f"SILENT ACCEPT: returned {type(result).__name__}")


READ_ONLY_CASES = [
    ("extract", ["extract", "{run}", "--probes", "{probes}", "--out", "{ro}/circuits"]),
    ("diff", ["diff", "{run}:0", "{run}:1", "--probes", "{probes}", "--out", "{ro}/diff.html"]),
    ("timeline", ["timeline", "{run}", "--probes", "{probes}", "--out", "{ro}/timeline.html"]),
    ("view", ["view", "{circuit}", "--out", "{ro}/view.html"]),
    ("cpt", ["cpt", "--out", "{ro}/run", "--base", "{model}"]),
    ("demo", ["demo", "--out", "{ro}/demo", "--base-model", "{model}"]),
]


@pytest.mark.parametrize("argv", [pytest.param(a, id=f"{i}-read-only-out") for i, a in READ_ONLY_CASES])
def test_read_only_output_is_refused_before_work(
    argv: list[str],
    H: dict[str, str],
    no_models: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A read-only filesystem (simulated: tests run as root, whom permissions do not stop) is named, with the
    OS's reason, before any model is loaded."""
    import errno
    import tempfile

    ro = tmp_path / "read-only"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("dir", "")).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, text = run_case([_fill(a, {**H, "ro": str(ro)}) for a in argv], capsys)
    assert code == 2, f"SILENT ACCEPT: exit {code}\n{text[-800:]}"
    assert str(ro) in text and "Read-only file system" in text, f"UNCLEAR:\n{text[-800:]}"
    assert list(ro.iterdir()) == [], "DAMAGED: something was written"

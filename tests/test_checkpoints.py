"""Loading per-epoch checkpoints into HookedTransformer: exactness, weight swapping, discovery, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from circuitdyn.cli import main
from circuitdyn.errors import CircuitdynError
from circuitdyn.runs.checkpoints import content_hash, open_run, resolve


def _ids(run, text: str = "The capital of France is Paris") -> torch.Tensor:
    return run.tokenizer()(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_match_hf_for_every_epoch_after_swapping(arch: str, llama_run: Path, gpt2_run: Path) -> None:
    run = open_run(llama_run if arch == "llama" else gpt2_run)
    ids = _ids(run)
    model = None
    for epoch in run.epochs + run.epochs[::-1]:
        loaded = run.load_model(epoch)
        model = model or loaded
        assert loaded is model, "switching epochs must reuse the model"
        with torch.no_grad():
            ours = loaded(ids)
            ref = run.hf_model(epoch)(ids).logits
        assert (ours - ref).abs().max().item() < 1e-4, f"epoch {epoch}"


def test_gqa_is_kept(llama_run: Path) -> None:
    model = open_run(llama_run).load_model(0)
    assert model.cfg.n_heads == 4 and model.cfg.n_key_value_heads == 2
    assert model.cfg.normalization_type == "RMS"  # no folding: ln weights exist as parameters
    assert "blocks.0.ln1.w" in dict(model.named_parameters())


def test_epochs_differ_and_manifest_fields(llama_run: Path) -> None:
    run = open_run(llama_run)
    assert run.epochs == [0, 1, 2]
    assert run.checkpoint(2).step == 20 and run.checkpoint(2).train_loss == pytest.approx(1.5)
    hashes = {run.checkpoint(e).content_hash for e in run.epochs}
    assert len(hashes) == 3
    assert run.checkpoint(1).content_hash == content_hash(llama_run / "epoch_1")


def test_discovery_without_manifest_and_merged_model_layout(make_run, tmp_path: Path) -> None:
    root = make_run("llama", 1, manifest=False, name="nomanifest")
    moved = tmp_path / "run"
    (moved / "epoch_0").mkdir(parents=True)
    shutil.copytree(root / "epoch_0", moved / "epoch_0" / "merged_model")
    shutil.copytree(root / "epoch_1", moved / "epoch_1")
    run = open_run(moved)
    assert run.epochs == [0, 1]
    assert run.checkpoint(0).path == moved / "epoch_0" / "merged_model"
    assert run.checkpoint(1).path == moved / "epoch_1"
    ids = _ids(run)
    with torch.no_grad():
        assert (run.load_model(1)(ids) - open_run(root).hf_model(1)(ids).logits).abs().max() < 1e-4


def test_single_hf_folder_is_one_checkpoint_run(llama_run: Path) -> None:
    run = open_run(llama_run / "epoch_1")
    assert run.epochs == [0] and run.checkpoint(0).path == llama_run / "epoch_1"
    assert run.checkpoint(0).content_hash == content_hash(llama_run / "epoch_1")


@pytest.mark.parametrize("folder", ["llama-3-run", "Llama-3.2-1B", "gemma-2-2b"])
def test_loading_ignores_what_folders_are_called(llama_run: Path, tmp_path: Path, folder: str) -> None:
    """TL guesses architectures from path names; ours must not depend on them."""
    target = tmp_path / folder
    shutil.copytree(llama_run / "epoch_0", target)
    run = open_run(target)
    model = run.load_model(0)
    assert model.cfg.d_model == 32 and model.cfg.n_layers == 2
    ids = _ids(run)
    with torch.no_grad():
        assert (model(ids) - run.hf_model(0)(ids).logits).abs().max() < 1e-4


def test_resolve_run_epoch_spec(llama_run: Path) -> None:
    run, epoch = resolve(f"{llama_run}:1")
    assert epoch == 1 and run.path == llama_run
    _, last = resolve(str(llama_run))
    assert last == 2
    with pytest.raises(CircuitdynError, match="no epoch 7"):
        resolve(f"{llama_run}:7")


# ---------------------------------------------------------------------------------------------- bad input


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CircuitdynError, match="no such file or folder"):
        open_run(tmp_path / "nope")


def test_epoch_without_config(llama_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(llama_run, tmp_path / "run")
    (run_dir / "epoch_1" / "config.json").unlink()
    with pytest.raises(CircuitdynError, match=r"epoch_1.*no config.json"):
        open_run(run_dir)


def test_epoch_without_weights(llama_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(llama_run, tmp_path / "run")
    (run_dir / "epoch_2" / "model.safetensors").unlink()
    with pytest.raises(CircuitdynError, match=r"epoch_2.*no weights"):
        open_run(run_dir)


def test_weights_not_matching_config(llama_run: Path, tmp_path: Path) -> None:
    """A weight file that lacks a tensor of the architecture is refused by name, not loaded half-initialised."""
    from safetensors.torch import load_file, save_file

    run_dir = _copy_run(llama_run, tmp_path / "run")
    weights = run_dir / "epoch_1" / "model.safetensors"
    state = load_file(weights)
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, weights, metadata={"format": "pt"})
    (run_dir / "run.json").unlink()  # its recorded hashes no longer fit
    run = open_run(run_dir)
    run.load_model(0)
    with pytest.raises(CircuitdynError, match=r"epoch_1: weights do not match config.json \(missing \['model.layers.1"):
        run.load_model(1)


def test_truncated_safetensors(llama_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(llama_run, tmp_path / "run")
    weights = run_dir / "epoch_1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CircuitdynError, match=r"epoch_1/model.safetensors: corrupt or truncated"):
        open_run(run_dir)


def test_garbage_safetensors(llama_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(llama_run, tmp_path / "run")
    (run_dir / "epoch_1" / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CircuitdynError, match="corrupt or truncated"):
        open_run(run_dir)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: m.pop("base_model"), "base_model"),
        (lambda m: m["epochs"][0].pop("path"), "epochs.0.path"),
        (lambda m: m["epochs"][1].update(step=-3), "epochs.1.step"),
        (lambda m: m["epochs"][0].update(content_hash="md5:abc"), "epochs.0.content_hash"),
        (lambda m: m.update(format="other/2"), "format"),
    ],
)
def test_manifest_violating_schema_names_the_field(llama_run: Path, tmp_path: Path, mutate, field: str) -> None:
    run_dir = _copy_run(llama_run, tmp_path / "run")
    manifest = json.loads((run_dir / "run.json").read_text())
    mutate(manifest)
    (run_dir / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(CircuitdynError, match=rf"run.json: field '{re.escape(field)}' is invalid"):
        open_run(run_dir)


def test_epochs_with_different_shapes_name_both(llama_run: Path, gpt2_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(llama_run, tmp_path / "run")
    shutil.rmtree(run_dir / "epoch_2")
    shutil.copytree(gpt2_run / "epoch_0", run_dir / "epoch_2")
    (run_dir / "run.json").unlink()
    with pytest.raises(CircuitdynError, match="epoch 0 and epoch 2 have different architectures"):
        open_run(run_dir).load_model(0)


def test_epochs_with_different_tokenizers_name_both(llama_run: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(llama_run, tmp_path / "run")
    tok = run_dir / "epoch_1" / "tokenizer.json"
    data = json.loads(tok.read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok.write_text(json.dumps(data))
    with pytest.raises(CircuitdynError, match="epoch 0 and epoch 1 have different tokenizers"):
        open_run(run_dir).load_model(1)


def test_pickle_only_checkpoint_refused_unless_opted_in(llama_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = _copy_run(llama_run / "epoch_0", tmp_path / "pickled")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CircuitdynError, match="pickle"):
        open_run(folder)
    run = open_run(folder, allow_pickle=True)
    ids = _ids(run)
    with torch.no_grad():
        expected = open_run(llama_run).hf_model(0)(ids).logits
        assert (run.load_model(0)(ids) - expected).abs().max() < 1e-4


def test_cli_info_json(llama_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(llama_run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["epoch"] for e in info["epochs"]] == [0, 1, 2] and info["epochs"][2]["kind"] == "full"
    assert (info["n_layers"], info["n_heads"], info["d_model"], info["n_key_value_heads"]) == (2, 4, 32, 2)
    assert all(ck["content_hash"].startswith("sha256:") for ck in info["checkpoints"])


def test_cli_reports_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "Traceback" not in err


@pytest.mark.integration
def test_smollm2_matches_transformers(smollm2_dir: Path) -> None:
    run = open_run(smollm2_dir)
    model = run.load_model(0)
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads, model.cfg.d_model) == (30, 9, 3, 576)
    tok = run.tokenizer()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        diff = (model(ids) - run.hf_model(0)(ids).logits).abs().max().item()
    assert diff < 1e-3  # 30 layers of float32 accumulate a little more than the tiny models' 1e-4

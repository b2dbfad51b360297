"""Any device, any precision: runs load where and in the dtype asked, the attribution hot path allocates
nothing on the default device, bf16 scores track fp32 ones, and `cpt` / `demo` take --device / --dtype."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from circuitdyn.cli import build_parser, main
from circuitdyn.engine import attribution as A
from circuitdyn.engine import forward as Fw
from circuitdyn.engine import patching as Pt
from circuitdyn.engine.faithfulness import CircuitEvaluator, faithfulness_curve
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import smallest_faithful
from circuitdyn.engine.settings import AttributionSettings as S
from circuitdyn.engine.settings import Compute
from circuitdyn.errors import CircuitdynError
from circuitdyn.runs.checkpoints import open_run, resolve_device, resolve_dtype
from circuitdyn.testing import tiny_facts, tiny_tl_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _bf16(model):
    """A bf16 copy of a tiny HookedTransformer (weights and cfg.dtype)."""
    out = copy.deepcopy(model).to(torch.bfloat16, print_details=False)
    assert out.cfg.dtype == torch.bfloat16
    return out


# --- devices and dtypes ---------------------------------------------------------------------------------
def test_resolve_device_and_dtype() -> None:
    auto = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert auto.type == expected and resolve_device(None) == auto
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").index is not None  # as tensors report their device
    for bad in ("tpu", "meta", f"cuda:{torch.cuda.device_count() + 7}"):
        with pytest.raises(CircuitdynError, match=bad):
            resolve_device(bad)
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(CircuitdynError, match="float64"):
        resolve_dtype("float64")
    with pytest.raises(CircuitdynError, match="'tpu'"):
        open_run("nowhere", device="tpu")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_load_model_in_dtype_and_swap_epochs(request: pytest.FixtureRequest, arch: str, dtype: str) -> None:
    """Every parameter is in the dtype asked, equal to the fp32 load cast to it; swapping epochs writes
    into the same storage and keeps the dtype, both ways."""
    path = request.getfixturevalue(f"{arch}_run")
    dt = DTYPES[dtype]
    run = open_run(path, device="cpu", dtype=dtype)
    ref = open_run(path, device="cpu")
    assert run.device == torch.device("cpu") and run.dtype is dt
    model = run.load_model(0)
    assert model.cfg.dtype is dt
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}

    def check(epoch: int) -> None:
        ours, theirs = run.load_model(epoch), ref.load_model(epoch)
        assert ours is model
        for name, p in ours.named_parameters():
            assert p.dtype is dt and p.device.type == "cpu" and p.data_ptr() == ptrs[name], name
            assert torch.equal(p, theirs.get_parameter(name).detach().to(dt)), name

    for epoch in (0, 1, 0):
        check(epoch)
    hf = run.hf_model(1)
    assert hf.dtype is dt and hf.device.type == "cpu"
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        ours, theirs = model(ids).float(), ref.load_model(0)(ids)
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()


# --- no allocation on the default device ----------------------------------------------------------------
@pytest.mark.parametrize("arch, bf16", [("llama", False), ("gpt2", False), ("llama", True)])
def test_hot_path_allocates_nothing_on_the_default_device(arch: str, bf16: bool) -> None:
    """Under `torch.device("meta")` any tensor created without an explicit device lands on meta and the
    computation fails: attribution, patching, faithfulness and the smallest-faithful search run anyway
    and give the same results."""
    model = tiny_tl_model(arch)
    model = _bf16(model) if bf16 else model
    facts = tiny_facts(4)
    n_edges = Graph.from_model(model).n_edges
    keep = torch.rand(4, n_edges, generator=torch.Generator(device="cpu").manual_seed(0), device="cpu") > 0.5
    sparse = torch.rand(4, n_edges, generator=torch.Generator(device="cpu").manual_seed(1), device="cpu") > 0.97

    def everything() -> list[torch.Tensor]:
        graph = Graph.from_model(model)
        scores = A.attribute(model, facts, S("eap-ig", 2), Compute(batch_size=3))
        eap = A.attribute(model, facts, S("eap", metric="logit-diff"))
        batch = Fw.make_batch(model, facts)
        dense_patch = Pt.run_patched(model, batch, keep)
        sparse_patch = Pt.run_patched(model, batch, sparse)
        single = Pt.exact_edge_effects(model, batch, edges=[0, 7, n_edges - 1])
        ev = CircuitEvaluator(model, facts, batch_size=3)
        faith = ev.faithfulness(keep)
        n, masks, reached = smallest_faithful(scores, ev.faithfulness, 0.8)
        n_paths, _, _ = smallest_faithful(scores, ev.faithfulness, 0.8, graph=graph, paths=True)
        curve = faithfulness_curve(model, facts, scores, sizes=[5, 50])
        return [
            scores,
            eap,
            dense_patch,
            sparse_patch,
            single,
            faith,
            n,
            masks,
            reached,
            n_paths,
            torch.tensor(curve["faithfulness"].to_numpy(), device="cpu"),
        ]

    expected = everything()
    with torch.device("meta"):
        got = everything()
    for e, g in zip(expected, got):
        assert g.device.type == "cpu"
        assert torch.allclose(e.float(), g.float(), equal_nan=True, atol=1e-6, rtol=0)


# --- precision ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_scores_track_fp32(arch: str) -> None:
    """bf16 EAP-IG computes in bf16 and accumulates in float32: scores come back float32 and rank the
    edges as fp32 does (Spearman >= 0.99 per fact over all edges)."""
    model = tiny_tl_model(arch)
    facts = tiny_facts(4)
    fp32 = A.attribute(model, facts, S("eap-ig", 3))
    bf16 = A.attribute(_bf16(model), facts, S("eap-ig", 3))
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    for b in range(len(facts)):
        assert _spearman(bf16[b], fp32[b]) >= 0.99, b
    batch = Fw.make_batch(model, facts)
    m32, _ = Pt.clean_and_corrupted_metric(model, batch)
    m16, _ = Pt.clean_and_corrupted_metric(_bf16(model), batch)
    assert m16.dtype == torch.float32 and (m16 - m32).abs().max() < 0.05


@pytest.mark.integration
def test_smollm2_bf16_eap_ig_matches_fp32(smollm2_dir: Path) -> None:
    """On SmolLM2, bf16 and fp32 EAP-IG scores of one fact rank all edges alike (Spearman >= 0.99)."""
    from circuitdyn.probes.facts import load_facts

    r16 = open_run(smollm2_dir, dtype="bfloat16", device="cpu")
    r32 = open_run(smollm2_dir, dtype="float32", device="cpu")
    facts = list(load_facts(None, r32.tokenizer(), limit=1))
    m16 = r16.load_model(0)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    s16 = A.attribute(m16, facts, S("eap-ig", 2))
    del m16, r16
    s32 = A.attribute(r32.load_model(0), facts, S("eap-ig", 2))
    assert s16.dtype == torch.float32
    rho = _spearman(s16[0], s32[0])
    assert rho >= 0.99, rho


# --- cpt and demo ---------------------------------------------------------------------------------------
def test_cpt_identity_has_dtype_not_device() -> None:
    from circuitdyn.training.cpt import CPTConfig

    cfg = CPTConfig(device="cpu")
    assert "device" not in cfg.identity() and cfg.identity()["dtype"] == "float32"
    assert cfg.identity() == replace(cfg, device="auto").identity()
    assert cfg.identity() != replace(cfg, dtype="bfloat16").identity()
    with pytest.raises(CircuitdynError, match="dtype.*'float64'"):
        replace(cfg, dtype="float64").validate()
    with pytest.raises(CircuitdynError, match="'tpu'"):
        replace(cfg, device="tpu").validate()


def test_cpt_trains_in_bf16_and_resumes_on_another_device(tmp_path: Path, tokenizer_dir: Path) -> None:
    from safetensors import safe_open

    from circuitdyn.training.cpt import MODEL_DIR, CPTConfig, _check_out_dir, run_cpt

    base = save_tiny_model(tmp_path / "base", "llama", tokenizer_dir, seed=0)
    cfg = CPTConfig(
        base_model=str(base),
        entities=["Russia"],
        epochs=1,
        lr=1e-2,
        max_new_tokens=2,
        n_math=None,
        n_reasoning=None,
        max_length=32,
        device="cpu",
        dtype="bfloat16",
        save="merged",
    )
    out = tmp_path / "run"
    run_cpt(cfg, out, progress=False, log=None)
    for epoch in (0, 1):
        with safe_open(out / f"epoch_{epoch}" / MODEL_DIR / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["dtype"] == "bfloat16" and manifest["config"]["device"] == "cpu"
    again = run_cpt(replace(cfg, device="auto"), out, progress=False, log=None)
    assert again.trained_epochs == []
    with pytest.raises(CircuitdynError, match="different run.*dtype"):
        run_cpt(replace(cfg, dtype="float32"), out, progress=False, log=None)
    # a run written before the setting existed trained in float32
    for key in ("dtype", "device"):
        del manifest["config"][key]
    (out / "run.json").write_text(json.dumps(manifest))
    assert _check_out_dir(out, replace(cfg, dtype="float32")) is not None
    with pytest.raises(CircuitdynError, match="dtype"):
        _check_out_dir(out, cfg)
    # adapters (the LoRA default) are merged back in the run's dtype: the same bfloat16 model as the merged run's
    from circuitdyn.runs.checkpoints import open_run

    run_cpt(replace(cfg, save="adapter"), tmp_path / "adapter", progress=False, log=None)
    assert (tmp_path / "adapter" / "epoch_1" / "probe_results.jsonl").read_text() == (
        out / "epoch_1" / "probe_results.jsonl"
    ).read_text()
    merged, adapter = (open_run(d, dtype="bfloat16").hf_model(1) for d in (out, tmp_path / "adapter"))
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), adapter.state_dict().values()))


def test_cpt_and_demo_take_device_and_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from circuitdyn.demo import demo_config

    parser = build_parser()
    for cmd in (["cpt", "--out", "x"], ["demo"]):
        args = parser.parse_args(cmd)
        assert (args.device, args.dtype) == ("auto", "float32")
        args = parser.parse_args([*cmd, "--device", "cpu", "--dtype", "bfloat16"])
        assert (args.device, args.dtype) == ("cpu", "bfloat16")
    cfg = demo_config()  # the demo's CPT: where and in which precision it trains and probes
    assert (cfg.device, cfg.dtype) == ("auto", "float32")
    assert main(["cpt", "--out", str(tmp_path / "r"), "--device", "tpu"]) == 2
    assert "'tpu'" in capsys.readouterr().err and not (tmp_path / "r").exists()

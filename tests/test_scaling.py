"""Attribution at scale: IG quadrature rules, passes, buffer precision, memory budget, OOM back-off, threads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from attribution_reference import reference_scores

from circuitdyn.analysis.similarity import spearman
from circuitdyn.engine import attribution as A
from circuitdyn.engine import forward as Fw
from circuitdyn.engine import memory as M
from circuitdyn.engine.circuits import circuit_filename
from circuitdyn.engine.settings import IG_GRIDS, Compute, grid_taken
from circuitdyn.engine.settings import AttributionSettings as S
from circuitdyn.errors import CircuitdynError
from circuitdyn.testing import tiny_facts


def test_ig_nodes():
    assert A.ig_nodes("right", 4) == ([0.25, 0.5, 0.75, 1.0], [0.25] * 4)
    assert A.ig_nodes("left", 4) == ([0.0, 0.25, 0.5, 0.75], [0.25] * 4)
    assert A.ig_nodes("midpoint", 2) == ([0.25, 0.75], [0.5, 0.5])
    for m in (1, 2, 3, 5, 10):
        alphas, weights = A.ig_nodes("gauss", m)
        assert math.isclose(sum(weights), 1.0) and all(0 < a < 1 for a in alphas)
        # exact for polynomials of degree 2m - 1: the integral of x^(2m-1) over [0, 1] is 1 / (2m)
        assert math.isclose(sum(w * a ** (2 * m - 1) for a, w in zip(alphas, weights)), 1 / (2 * m), rel_tol=1e-9)
    with pytest.raises(CircuitdynError, match="unknown IG grid 'trapezoid'"):
        A.ig_nodes("trapezoid", 3)
    assert grid_taken("eap", "gauss") == "right"


@pytest.mark.parametrize("grid", IG_GRIDS)
def test_every_grid_equals_the_naive_reference_with_its_nodes(tiny_tl, grid):
    batch = Fw.make_batch(tiny_tl, tiny_facts(4))
    ours = A.attribute_batch(tiny_tl, batch, "eap-ig", 3, ig_grid=grid)
    if grid == "shifted":  # each fact's grid has its own offset: compare fact by fact
        facts = tiny_facts(4)
        ref = torch.cat(
            [
                reference_scores(tiny_tl, Fw.make_batch(tiny_tl, [f]), 3, nodes=A.ig_nodes(grid, 3, 0, f.fact_id))
                for f in facts
            ]
        )
        order = {f.fact_id: i for i, f in enumerate(facts)}
        ref = ref[[order[f.fact_id] for f in batch.facts]]
        assert len({A.grid_offset(0, f.fact_id) for f in facts}) == len(facts)
    else:
        ref = reference_scores(tiny_tl, batch, 3, nodes=A.ig_nodes(grid, 3))
    assert ref.abs().max() > 1e-3
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0)


def test_right_grid_reproduces_todays_scores_and_gauss_converges_faster(tiny_tl):
    batch = Fw.make_batch(tiny_tl, tiny_facts(3, noise_every=0))
    right = A.attribute_batch(tiny_tl, batch, "eap-ig", 3, ig_grid="right")
    assert torch.allclose(right, reference_scores(tiny_tl, batch, 3), atol=1e-4, rtol=0)
    fine = A.attribute_batch(tiny_tl, batch, "eap-ig", 32, ig_grid="gauss")
    err = {
        g: float((A.attribute_batch(tiny_tl, batch, "eap-ig", 3, ig_grid=g) - fine).abs().sum())
        for g in ("right", "left", "gauss")
    }
    assert err["gauss"] < 0.5 * min(err["right"], err["left"]), err


def test_passes_and_buffer_dtype(tiny_tl):
    """Scores do not depend on how many facts share a pass; bf16/fp16 buffers keep the ranking."""
    batch = Fw.make_batch(tiny_tl, tiny_facts(5))
    whole = A.attribute_batch(tiny_tl, batch, "eap-ig", 3, pass_facts=5)
    for n in (1, 2):
        assert torch.allclose(A.attribute_batch(tiny_tl, batch, "eap-ig", 3, pass_facts=n), whole, atol=1e-5, rtol=0)
    for dtype in ("bfloat16", "float16"):
        low = A.attribute_batch(tiny_tl, batch, "eap-ig", 3, buffer_dtype=dtype)
        assert float(spearman(low, whole).min()) > 0.999
    with pytest.raises(CircuitdynError, match="unknown buffer dtype"):
        A.attribute_batch(tiny_tl, batch, buffer_dtype="int8")  # type: ignore[arg-type]


def test_memory_budget_picks_the_batch(tiny_tl):
    assert M.parse_memory("8GiB") == 8 * 2**30 and M.parse_memory("500MB") == 500 * 10**6
    assert M.parse_memory(1024) == 1024
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(CircuitdynError, match="memory size"):
            M.parse_memory(bad)
    fixed = M.fixed_bytes(tiny_tl)
    per = M.bytes_per_fact(tiny_tl, 20)
    assert M.bytes_per_fact(tiny_tl, 40) == 2 * per
    assert M.bytes_per_fact(tiny_tl, 20, "bfloat16") < per
    assert M.fact_batch_for_memory(tiny_tl, 20, "float32", fixed + 10 * per) == 10
    assert M.fact_batch_for_memory(tiny_tl.cfg, 20, "float32", 2 * fixed + 10 * per) >= 10  # config alone
    with pytest.raises(CircuitdynError, match="too small"):
        M.fact_batch_for_memory(tiny_tl, 20, "float32", fixed + per // 2)
    facts = tiny_facts(5)
    budget = fixed + 2 * M.bytes_per_fact(tiny_tl, 40)
    assert torch.allclose(
        A.attribute(tiny_tl, facts, S("eap-ig", 2), Compute(batch_size=None, max_memory=budget)),
        A.attribute(tiny_tl, facts, S("eap-ig", 2)),
        atol=1e-5,
        rtol=0,
    )


def test_out_of_memory_halves_the_batch_once_said(tiny_tl, monkeypatch, capsys):
    facts = tiny_facts(5)
    want = A.attribute(tiny_tl, facts, S("eap-ig", 2), Compute(batch_size=5))
    real = A.attribute_batch
    sizes = []

    def small_memory(model, batch, *args, **kwargs):
        sizes.append(len(batch.facts))
        if len(batch.facts) > 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(A, "attribute_batch", small_memory)
    got = A.attribute(tiny_tl, facts, S("eap-ig", 2), Compute(batch_size=5))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert sizes[:3] == [5, 2, 1]
    assert capsys.readouterr().err.count("out of memory") == 1
    monkeypatch.setattr(A, "attribute_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not swallowed
        A.attribute(tiny_tl, facts, S("eap-ig", 2))


def test_threads_are_set_and_restored(tiny_tl, monkeypatch):
    seen = []
    real = A.attribute_batch
    monkeypatch.setattr(A, "attribute_batch", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    A.attribute(tiny_tl, tiny_facts(2), S("eap"), Compute(num_threads=2))
    assert seen == [2] and torch.get_num_threads() == before
    assert 1 <= M.default_threads() <= (len(__import__("os").sched_getaffinity(0)))
    with pytest.raises(CircuitdynError, match="threads must be >= 1"):
        A.attribute(tiny_tl, tiny_facts(2), S("eap"), Compute(num_threads=0))


def test_grid_is_a_setting_and_names_the_file(tiny_tl):
    from circuitdyn.pipeline.extraction import extract_circuits, extraction_settings

    facts = tiny_facts(2)
    meta = extraction_settings("LlamaForCausalLM", facts, S("eap-ig", 3, "gauss"))
    assert meta["ig_grid"] == "gauss"
    assert extraction_settings("LlamaForCausalLM", facts, S("eap", 3, "gauss"))["ig_grid"] == "right"
    assert ".eap-ig3-gauss." in circuit_filename(1, meta)
    assert ".eap-ig3." in circuit_filename(1, {**meta, "ig_grid": "right"})
    cs = extract_circuits(tiny_tl, facts, S("eap-ig", 2, "midpoint"))
    assert cs.meta["ig_grid"] == "midpoint"
    assert np.isfinite(cs.scores.numpy()).all()


def test_cli_extract_scale_flags_are_checked(llama_run, capsys):
    from circuitdyn.cli import main
    from circuitdyn.probes.probes import seed_data_dir

    base = ["extract", str(llama_run), "--probes", str(seed_data_dir() / "validation_probes.json"), "--limit", "1"]
    assert main([*base, "--max-memory", "lots"]) == 2
    assert "memory size 'lots'" in capsys.readouterr().err
    assert main([*base, "--threads", "0"]) == 2
    assert "argument --threads: must be a whole number >= 1" in capsys.readouterr().err
    assert main([*base, "--float16", "--float32"]) == 2
    assert "exclude each other" in capsys.readouterr().err

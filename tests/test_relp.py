"""RelP (relevance patching): attribution patching with LRP rules in its one backward pass.

Checked against TransformerLens' own modules with the rules applied by hooks (`reference_scores(...,
relp=True)`), against EAP where the rules change nothing, against exact patching (Spearman printed), and end
to end through `circuitdyn extract --method relp`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attribution_reference import reference_scores

from circuitdyn.engine import attribution as A
from circuitdyn.engine import forward as Fw
from circuitdyn.engine import patching as Pt
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.settings import METHODS, check_method, grid_taken, steps_taken
from circuitdyn.engine.settings import AttributionSettings as S
from circuitdyn.testing import tiny_facts, tiny_tl_model


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


@pytest.mark.parametrize("metric", ["logprob", "logit-diff"])
def test_relp_equals_hooked_reference(tiny_tl, metric):
    """The engine's RelP = TransformerLens with detached norm scales and attention patterns and the identity /
    half rules in the MLP (hooks), over every edge; and it is not EAP (the rules do change the scores)."""
    batch = Fw.make_batch(tiny_tl, tiny_facts(4))
    ours = A.attribute_batch(tiny_tl, batch, "relp", metric=metric)
    ref = reference_scores(tiny_tl, batch, 1, metric, relp=True)
    assert ref.abs().max() > 1e-2
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
    eap = A.attribute_batch(tiny_tl, batch, "eap", metric=metric)
    assert (eap - ours).abs().max() > 1e-2


def test_relp_scores_shape_sign_and_determinism(tiny_tl):
    """[fact, edge] float32, finite, reproducible, batch-independent; edges into q and k score exactly 0
    (the attention pattern is a constant); the largest edges have the sign of their exact patching effect."""
    facts = tiny_facts(4, noise_every=0)
    batch = Fw.make_batch(tiny_tl, facts)
    graph = Graph.from_model(tiny_tl)
    r = A.attribute_batch(tiny_tl, batch, "relp")
    assert r.shape == (4, graph.n_edges) and r.dtype == torch.float32 and torch.isfinite(r).all()
    assert torch.equal(r, A.attribute_batch(tiny_tl, batch, "relp"))
    alone = A.attribute(tiny_tl, facts[1:2], S("relp"))
    assert torch.allclose(alone[0], r[1], atol=1e-5)
    qk = torch.tensor([e.endswith(("<q>", "<k>")) for e in graph.edges])
    assert qk.any() and (r[:, qk] == 0).all() and (r[:, ~qk] != 0).float().mean() > 0.9
    true = Pt.exact_edge_effects(tiny_tl, batch)
    eap = A.attribute_batch(tiny_tl, batch, "eap")
    agree = []
    for b in range(4):
        top = (true[b].abs() * ~qk).topk(5).indices  # the biggest edges RelP scores at all
        agree.append((torch.sign(r[b, top]) == torch.sign(true[b, top])).float().mean())
        print(
            f"{tiny_tl.cfg.original_architecture} fact {b}: Spearman vs exact patching, all edges: "
            f"relp {_spearman(r[b], true[b]):.3f} eap {_spearman(eap[b], true[b]):.3f}; "
            f"v/mlp/logits edges: relp {_spearman(r[b, ~qk], true[b, ~qk]):.3f} "
            f"eap {_spearman(eap[b, ~qk], true[b, ~qk]):.3f}"
        )
    assert sum(agree) / len(agree) >= 0.8, agree


def test_relp_equals_eap_where_the_rules_change_nothing():
    """No norms, a ReLU MLP (act(x)/x is its derivative), one position (the pattern is 1 whatever q and k):
    every RelP rule is the gradient, so RelP is EAP, edge for edge."""
    model = tiny_tl_model("gpt2", seed=2, act_fn="relu", normalization_type=None)
    facts = [
        dataclasses.replace(
            f,
            clean_tokens=f.clean_tokens[:1],
            corrupted_tokens=(f.clean_tokens[0] % 49 + 1,),
            answer_tokens=f.answer_tokens[:1],
            noise_positions=(),
        )
        for f in tiny_facts(4)
    ]
    batch = Fw.make_batch(model, facts)
    assert batch.clean.shape[1] == 1
    eap = A.attribute_batch(model, batch, "eap")
    relp = A.attribute_batch(model, batch, "relp")
    assert eap.abs().max() > 1e-2
    assert torch.allclose(relp, eap, atol=1e-5, rtol=0), (relp - eap).abs().max()


def test_rules_keep_values_and_shape_gradients():
    """identity_rule: act's value, gradient act(x)/x; half_rule: a*b, gradients b/2 and a/2; a norm with a
    constant scale: same output, gradient w/scale (RMS) with no term through the scale."""
    x = torch.tensor([-2.0, -1e-8, 0.0, 0.5, 3.0], requires_grad=True)
    act = torch.nn.functional.silu
    y = Fw.identity_rule(act, x)
    assert torch.equal(y, act(x.detach()))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.sigmoid(x.detach()), atol=1e-6)  # silu(x)/x = sigmoid(x), 1/2 at 0
    a = torch.randn(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    ga, gb = torch.autograd.grad(Fw.half_rule(a, b).sum(), (a, b))
    assert torch.allclose(Fw.half_rule(a, b), a * b) and torch.allclose(ga, b / 2) and torch.allclose(gb, a / 2)
    w = 1 + 0.1 * torch.randn(8)
    for kind in ("RMS", "LN"):
        norm = Fw.Norm(kind, w, None, 1e-5)
        x = torch.randn(3, 8, requires_grad=True)
        out, _, scale = norm.parts(x, torch.float32, constant_scale=True)
        assert torch.allclose(out, norm.parts(x, torch.float32)[0])
        up = torch.randn(3, 8)
        (g,) = torch.autograd.grad((out * up).sum(), x)
        want = up * w / scale.detach()
        if kind == "LN":
            want = want - want.mean(-1, keepdim=True)  # the centring is linear: kept
        assert torch.allclose(g, want, atol=1e-6)


def test_relp_records_one_step_on_the_right_grid():
    from circuitdyn.engine.circuits import circuit_filename

    assert "relp" in METHODS and check_method("relp") == "relp"
    assert steps_taken("relp", 7) == 1 and grid_taken("relp", "gauss") == "right"
    meta = {
        "method": "relp",
        "ig_steps": 1,
        "ig_grid": "right",
        "metric": "answer-logprob",
        "seed": 0,
        "probe_set_hash": "sha256:0123456789abcdef",
    }
    assert circuit_filename(2, meta) == "epoch_2.relp.answer-logprob.s0.01234567.safetensors"


def test_relp_refuses_layer_norm_activations():
    from circuitdyn.errors import CircuitdynError

    model = tiny_tl_model("gpt2", n_layers=1, act_fn="solu_ln")
    with pytest.raises(CircuitdynError, match="RelP"):
        A.attribute_batch(model, Fw.make_batch(model, tiny_facts(1)), "relp")


def test_cli_extract_relp(llama_run, tmp_path, capsys):
    from circuitdyn.cli import main
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.probes.probes import seed_data_dir

    probes = str(seed_data_dir() / "validation_probes.json")
    out = tmp_path / "circuits"
    argv = [
        str(llama_run),
        "--probes",
        probes,
        "--limit",
        "3",
        "--method",
        "relp",
        "--epochs",
        "1",
        "--top-n",
        "50",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(["extract", *argv]) == 0
    text = capsys.readouterr().out
    assert "relp, metric" in text and text.count("(written)") == 1
    (path,) = out.glob("*.safetensors")
    assert path.name.startswith("epoch_1.relp.answer-logprob.s0.")
    cs = CircuitSet.load(path)
    assert cs.meta["method"] == "relp" and cs.meta["ig_steps"] == 1 and cs.meta["ig_grid"] == "right"
    assert len(cs.meta["faithfulness"]) == 3 and torch.isfinite(cs.scores.float()).all()
    assert main(["extract", *argv]) == 0
    assert capsys.readouterr().out.count("(cached)") == 1

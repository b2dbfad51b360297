"""The attribution engine against the naive TransformerLens-hook reference, exact patching and batching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from attribution_reference import reference_scores

from circuitdyn.engine import attribution as A
from circuitdyn.engine import forward as Fw
from circuitdyn.engine import patching as Pt
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.settings import AttributionSettings as S
from circuitdyn.engine.settings import Compute
from circuitdyn.errors import CircuitdynError
from circuitdyn.testing import tiny_facts, tiny_tl_model


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().float()
    rb = b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_functional_forward_matches_transformer_lens(tiny_tl):
    facts = tiny_facts(4)
    batch = Fw.make_batch(tiny_tl, facts)
    m_clean, _ = Pt.clean_and_corrupted_metric(tiny_tl, batch)
    for b, f in enumerate(facts):
        toks = torch.tensor([[*f.clean_tokens, *f.answer_tokens[:-1]]])
        with torch.no_grad():
            lp = tiny_tl(toks).log_softmax(-1)[0]
        n = len(f.clean_tokens)
        ref = sum(lp[n - 1 + t, a] for t, a in enumerate(f.answer_tokens))
        assert abs(float(m_clean[b]) - float(ref)) < 1e-4


@pytest.mark.parametrize(
    "method, steps, metric",
    [
        ("eap", 1, "logprob"),
        ("eap-ig", 4, "logprob"),
        ("eap-ig", 3, "logit-diff"),
        ("eap", 1, "prob"),
        ("eap-ig", 11, "logprob"),
    ],
)
def test_scores_equal_naive_reference(tiny_tl, method, steps, metric):
    batch = Fw.make_batch(tiny_tl, tiny_facts(4))
    ours = A.attribute_batch(tiny_tl, batch, method, steps, metric, ig_grid="right")
    ref = reference_scores(tiny_tl, batch, steps if method == "eap-ig" else 1, metric)
    assert ours.shape == (4, Graph.from_model(tiny_tl).n_edges)
    assert ref.abs().max() > 1e-3
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0)


def test_batch_equals_single_facts(tiny_tl):
    facts = tiny_facts(5)
    together = A.attribute(tiny_tl, facts, S("eap-ig", 3), Compute(batch_size=5))
    for i, f in enumerate(facts):
        alone = A.attribute(tiny_tl, [f], S("eap-ig", 3))
        assert torch.allclose(together[i], alone[0], atol=1e-5, rtol=0)
    assert torch.allclose(A.attribute(tiny_tl, facts, S("eap-ig", 3), Compute(batch_size=2)), together, atol=1e-5)


def test_eap_ig_ranks_edges_like_exact_patching():
    """EAP-IG tracks single-edge patching effects (Spearman >= 0.9 over the top edges) better than EAP.

    Noise corruption (3x embedding std at two positions) on the GQA model: far from linear, which is
    where integrating the gradient matters. Averaged over four facts, top 20 of 110 edges by true effect.
    """
    model = tiny_tl_model("llama", seed=3)
    facts = [
        dataclasses.replace(f, corrupted_tokens=f.clean_tokens, noise_positions=(1, 2), corruption="noise")
        for f in tiny_facts(4, seed=5, noise_every=0)
    ]
    batch = Fw.make_batch(model, facts)
    true = Pt.exact_edge_effects(model, batch)
    eap = A.attribute_batch(model, batch, "eap")
    ig = A.attribute_batch(model, batch, "eap-ig", steps=20, ig_grid="right")
    mid = A.attribute_batch(model, batch, "eap-ig", steps=20, ig_grid="midpoint")  # the default rule
    rho_ig, rho_eap, err_ig, err_eap = [], [], [], []
    for b in range(len(facts)):
        top = true[b].abs().topk(20).indices
        rho_ig.append(_spearman(ig[b, top], true[b, top]))
        rho_eap.append(_spearman(eap[b, top], true[b, top]))
        err_ig.append(float((ig[b] - true[b]).abs().mean()))
        err_eap.append(float((eap[b] - true[b]).abs().mean()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(rho_ig) >= 0.9, (rho_ig, rho_eap)
    rho_mid = [
        _spearman(mid[b, true[b].abs().topk(20).indices], true[b, true[b].abs().topk(20).indices])
        for b in range(len(facts))
    ]
    assert mean(rho_mid) >= 0.85 and mean(rho_mid) > mean(rho_eap), (rho_mid, rho_eap)
    assert mean(rho_ig) > mean(rho_eap), (rho_ig, rho_eap)
    assert mean(err_ig) < mean(err_eap), (err_ig, err_eap)


def test_sign_convention_matches_patching(tiny_tl):
    """score(e) ~ m(clean with e corrupted) - m(clean): same sign as the exact effect for big edges."""
    batch = Fw.make_batch(tiny_tl, tiny_facts(2, noise_every=0))
    true = Pt.exact_edge_effects(tiny_tl, batch)
    ig = A.attribute_batch(tiny_tl, batch, "eap-ig", steps=10)
    for b in range(2):
        top = true[b].abs().topk(5).indices
        assert (torch.sign(ig[b, top]) == torch.sign(true[b, top])).float().mean() >= 0.8


def test_noise_is_seeded_per_fact(tiny_tl):
    facts = tiny_facts(4)
    a = Fw.make_batch(tiny_tl, facts, seed=1)
    b = Fw.make_batch(tiny_tl, facts[1:2], seed=1)
    c = Fw.make_batch(tiny_tl, facts, seed=2)
    assert a.noise is not None and torch.equal(a.noise[1, : b.noise.shape[1]], b.noise[0])
    last = Fw.make_batch(tiny_tl, facts[3:], seed=1)  # the other noise fact, alone: same draw as in the batch
    assert torch.equal(a.noise[3, : last.noise.shape[1]], last.noise[0])
    assert not torch.equal(a.noise[1, 1:3], a.noise[3, 1:3])  # each fact draws its own noise
    assert not torch.equal(a.noise, c.noise)
    assert a.noise[0].abs().sum() == 0  # entity-swap facts carry no noise
    assert a.noise[1, [0, *range(3, a.noise.shape[1])]].abs().sum() == 0  # only at the noise positions
    std = float(a.noise[1, 1:3].std())
    assert 1.5 < std / float(tiny_tl.W_E.detach().std()) < 4.5


def test_bad_inputs(tiny_tl):
    f = tiny_facts(1)[0]
    with pytest.raises(CircuitdynError, match="must align"):
        Fw.make_batch(tiny_tl, [dataclasses.replace(f, corrupted_tokens=f.clean_tokens[:-1])])
    with pytest.raises(CircuitdynError, match="noise_positions"):
        Fw.make_batch(tiny_tl, [dataclasses.replace(f, noise_positions=(99,))])
    with pytest.raises(CircuitdynError, match="contrast_token"):
        Fw.make_batch(tiny_tl, [dataclasses.replace(f, contrast_token=None)], metric="logit-diff")
    with pytest.raises(CircuitdynError, match="vocabulary"):
        Fw.make_batch(tiny_tl, [dataclasses.replace(f, answer_tokens=(10_000,))])
    with pytest.raises(CircuitdynError, match="no facts"):
        A.attribute(tiny_tl, [])
    batch = Fw.make_batch(tiny_tl, [f])
    with pytest.raises(CircuitdynError, match="unknown method"):
        A.attribute_batch(tiny_tl, batch, "acdc")
    with pytest.raises(CircuitdynError, match="unknown metric"):
        A.attribute_batch(tiny_tl, batch, metric="kl")


def test_unsupported_architecture_is_refused():
    model = tiny_tl_model("gpt2", n_layers=1, positional_embedding_type="alibi")
    with pytest.raises(CircuitdynError, match="alibi"):
        Fw.check_supported(model)


def test_cli_extract_writes_and_skips(llama_run, tmp_path, capsys):
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
        "--steps",
        "2",
        "--epochs",
        "0,2",
        "--top-n",
        "50",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(["extract", *argv]) == 0
    text = capsys.readouterr().out
    assert "3 facts" in text and text.count("(written)") == 2
    assert "plan: 3 facts x 2 epochs, no method-noise replicates: 0 of 2 circuit files cached, 2 to compute" in text
    files = sorted(out.glob("*.safetensors"))
    short_hash = CircuitSet.load(files[0]).meta["probe_set_hash"].split(":")[1][:8]
    assert [f.name for f in files] == [
        f"epoch_{e}.eap-ig2-midpoint.answer-logprob.s0.{short_hash}.safetensors" for e in (0, 2)
    ]
    cs = CircuitSet.load(files[1])
    assert cs.meta["epoch"] == 2 and cs.meta["checkpoint_hash"].startswith("sha256:")
    assert cs.meta["step"] == 20 and len(cs.meta["faithfulness"]) == 3 and cs.meta["ig_steps"] == 2
    assert len(cs.meta["m_clean"]) == len(cs.meta["m_corrupted"]) == 3
    assert main(["extract", *argv]) == 0
    text = capsys.readouterr().out
    assert text.count("(cached)") == 2 and "2 of 2 circuit files cached, 0 to compute" in text
    # without --probes: the run's recorded facts (the same 3), their circuits reused
    bare = [a for a in argv if a not in ("--probes", probes, "--limit", "3")]
    assert main(["extract", *bare]) == 0
    assert capsys.readouterr().out.count("(cached)") == 2
    assert main(["extract", *bare, "--limit", "2"]) == 2
    assert "--limit choose among --probes FILE's probes" in capsys.readouterr().err
    assert main(["extract", str(llama_run), "--probes", probes, "--epochs", "x", "--out", str(out)]) == 2
    assert "epochs must be comma-separated integers, got 'x'" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2_scores_match_forward_and_full_circuit(smollm2_dir):
    """On the real SmolLM2-135M-Instruct: the functional forward equals TransformerLens, EAP-IG scores are
    finite over all 123,211 edges, and patching with the full graph / no edge gives the clean / corrupted run."""
    from circuitdyn.engine.faithfulness import circuit_metric
    from circuitdyn.probes.probes import build_fact_prompts, load_probes
    from circuitdyn.runs.checkpoints import open_run

    run = open_run(smollm2_dir)
    model = run.load_model(0)
    probes = load_probes()
    facts = build_fact_prompts(probes[:2], model.tokenizer, template="plain", pool=probes)
    batch = Fw.make_batch(model, facts)
    m_clean, m_corr = Pt.clean_and_corrupted_metric(model, batch)
    for b, f in enumerate(facts):
        with torch.no_grad():
            lp = model(torch.tensor([[*f.clean_tokens, *f.answer_tokens[:-1]]])).log_softmax(-1)[0]
        n = len(f.clean_tokens)
        assert abs(float(m_clean[b]) - float(sum(lp[n - 1 + t, a] for t, a in enumerate(f.answer_tokens)))) < 1e-3
    scores = A.attribute(model, facts, S("eap-ig", 2))
    assert scores.shape == (2, 123211) and torch.isfinite(scores).all()
    full = circuit_metric(model, facts, torch.ones_like(scores, dtype=torch.bool))
    empty = circuit_metric(model, facts, torch.zeros_like(scores, dtype=torch.bool))
    assert torch.allclose(full, m_clean, atol=1e-3) and torch.allclose(empty, m_corr, atol=1e-3)


def test_node_effects_are_grouped_edge_patching(tiny_tl):
    batch = Fw.make_batch(tiny_tl, tiny_facts(2))
    nodes = Pt.exact_node_effects(tiny_tl, batch)
    graph = Graph.from_model(tiny_tl)
    assert nodes.shape == (2, len(graph.sources))
    # patching `input` everywhere is the corrupted run
    m_clean, m_corr = Pt.clean_and_corrupted_metric(tiny_tl, batch)
    assert torch.allclose(nodes[:, 0], m_corr - m_clean, atol=1e-5)
    last = graph.sources.index(f"m{graph.n_layers - 1}")
    only = Pt.exact_edge_effects(tiny_tl, batch, edges=[graph.edge_index[f"m{graph.n_layers - 1}->logits"]])
    assert torch.allclose(nodes[:, last], only[:, 0], atol=1e-6)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_sparse_patching_equals_dense(tiny_tl, monkeypatch, density):
    """run_patched sums only the sparser side of the mask; it must equal the one dense contraction."""
    batch = Fw.make_batch(tiny_tl, tiny_facts(3))
    n_edges = Graph.from_model(tiny_tl).n_edges
    keep = torch.rand(3, n_edges, generator=torch.Generator().manual_seed(1)) < density
    monkeypatch.setattr(Pt, "SPARSE_PATCH_FACTOR", 10**9)  # always dense
    dense = Pt.run_patched(tiny_tl, batch, keep)
    monkeypatch.setattr(Pt, "SPARSE_PATCH_FACTOR", 0)  # always sparse
    sparse = Pt.run_patched(tiny_tl, batch, keep)
    assert torch.allclose(sparse, dense, atol=1e-5), (sparse, dense)
    m_clean, m_corr = Pt.clean_and_corrupted_metric(tiny_tl, batch)
    if density in (0.0, 1.0):
        assert torch.allclose(sparse, m_corr if density == 0.0 else m_clean, atol=1e-5)


def test_partial_rotary_and_lnpre_forward_match_transformer_lens():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    for extra in (
        {"normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_dim": 4},
        {"normalization_type": "LNPre", "positional_embedding_type": "standard"},
    ):
        cfg = HookedTransformerConfig(
            n_layers=2, d_model=32, d_head=8, n_heads=4, n_ctx=64, d_vocab=50, d_mlp=48, act_fn="silu", seed=1, **extra
        )
        model = HookedTransformer(cfg, move_to_device=False)
        facts = tiny_facts(2)
        m_clean, _ = Pt.clean_and_corrupted_metric(model, Fw.make_batch(model, facts))
        f = facts[0]
        with torch.no_grad():
            lp = model(torch.tensor([[*f.clean_tokens, *f.answer_tokens[:-1]]])).log_softmax(-1)[0]
        n = len(f.clean_tokens)
        assert abs(float(m_clean[0]) - float(sum(lp[n - 1 + t, a] for t, a in enumerate(f.answer_tokens)))) < 1e-4
        batch = Fw.make_batch(model, facts)
        assert torch.allclose(
            A.attribute_batch(model, batch, "eap-ig", 2, ig_grid="right"), reference_scores(model, batch, 2), atol=1e-4
        )


def _prefixed_facts(n: int = 4, prefix_len: int = 6) -> list:
    """Facts sharing a prompt prefix (as chat-templated probes do), corrupted only after it."""
    from circuitdyn.probes.probes import FactPrompt

    shared = tuple(range(3, 3 + prefix_len))
    out = []
    for f in tiny_facts(n):
        clean = shared + f.clean_tokens
        if f.corruption == "noise":
            out.append(
                dataclasses.replace(f, clean_tokens=clean, corrupted_tokens=clean, noise_positions=(prefix_len + 1,))
            )
        else:
            out.append(
                FactPrompt(
                    f.fact_id, clean, shared + f.corrupted_tokens, f.answer_tokens, "entity", (), f.contrast_token
                )
            )
    return out


@pytest.mark.parametrize("density", [0.0, 0.3, 0.95, 1.0])
def test_patching_after_a_shared_prefix_is_exact(tiny_tl, density):
    """Patched runs start after the batch's shared prefix, on the clean run's cached keys and values: the same
    metric as patching every position."""
    facts = _prefixed_facts()
    batch = Fw.make_batch(tiny_tl, facts)
    assert Pt.shared_prefix(batch) == 7  # the 6 shared tokens and each fact's first own token
    keep = (
        torch.rand(len(facts), Graph.from_model(tiny_tl).n_edges, generator=torch.Generator().manual_seed(2)) < density
    )
    whole = Pt.run_patched(tiny_tl, batch, keep, base=Pt.patch_base(tiny_tl, batch, start=0))
    shared = Pt.run_patched(tiny_tl, batch, keep)
    assert torch.allclose(shared, whole, atol=1e-5), (shared, whole)
    m_clean, m_corr = Pt.clean_and_corrupted_metric(tiny_tl, batch)
    if density in (0.0, 1.0):
        assert torch.allclose(shared, m_corr if density == 0.0 else m_clean, atol=1e-5)
    base = Pt.patch_base(tiny_tl, batch)  # its two ends, from the prefix run and the two runs after it
    assert base.start == 7
    assert torch.allclose(base.m_clean, m_clean, atol=1e-5) and torch.allclose(base.m_corr, m_corr, atol=1e-5)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "relp"])
def test_attribution_after_a_shared_prefix_is_exact(tiny_tl, monkeypatch, method):
    """Attribution runs only the positions after the batch's shared prefix: the same scores as running all."""
    batch = Fw.make_batch(tiny_tl, _prefixed_facts())
    shared = A.attribute_batch(tiny_tl, batch, method, 3)
    monkeypatch.setattr(A, "shared_prefix", lambda batch: 0)
    whole = A.attribute_batch(tiny_tl, batch, method, 3)
    assert torch.allclose(shared, whole, atol=1e-5, rtol=1e-4), (shared - whole).abs().max()


@pytest.mark.parametrize(
    ("method", "grid"), [("eap", "midpoint"), ("eap-ig", "right"), ("eap-ig", "midpoint"), ("relp", "midpoint")]
)
def test_attribution_reports_the_runs_it_was_computed_between(tiny_tl, method, grid):
    """`attribute_with_ends` gives m_clean and m_corr of the runs attribution made anyway (the right grid's
    clean run is its last IG step): the same as running them on their own, in the facts' order."""
    from circuitdyn.engine.settings import AttributionSettings, Compute

    facts = _prefixed_facts() + tiny_facts(3)
    done = A.attribute_with_ends(
        tiny_tl, facts, AttributionSettings(method=method, ig_grid=grid), Compute(batch_size=2)
    )
    m_clean, m_corr = Pt.clean_and_corrupted_metric(tiny_tl, Fw.make_batch(tiny_tl, facts))
    assert torch.allclose(done.m_clean, m_clean, atol=1e-5) and torch.allclose(done.m_corr, m_corr, atol=1e-5)
    assert torch.equal(
        done.scores,
        A.attribute(tiny_tl, facts, AttributionSettings(method=method, ig_grid=grid), Compute(batch_size=2)),
    )

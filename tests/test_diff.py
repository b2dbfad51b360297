"""Circuit diffs on synthetic circuit sets: counts, similarity measures, noise floor, paths, transfer."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from circuitdyn.circuits import CircuitSet
from circuitdyn.diff import (
    MEAN,
    CircuitDiff,
    circuit_graph,
    diff_circuits,
    noise_floor,
    rank_biased_overlap,
    spearman,
    strongest_paths,
    weighted_jaccard,
)
from circuitdyn.errors import CircuitdynError
from circuitdyn.graph import Graph
from circuitdyn.selection import Selection, smallest_faithful
from circuitdyn.transfer import transfer_matrix, transfer_pivot

GRAPH = Graph(3, 2)
META = {"architecture": "LlamaForCausalLM", "method": "eap-ig", "ig_steps": 5, "metric": "logprob", "seed": 0}


def make_set(scores: torch.Tensor, facts: list[str] | None = None, graph: Graph = GRAPH, **meta) -> CircuitSet:
    facts = facts or [f"f{i}" for i in range(scores.shape[0])]
    return CircuitSet(scores, graph.edges, facts, {**META, **meta})


def random_scores(n_facts: int = 3, seed: int = 0, graph: Graph = GRAPH) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_facts, graph.n_edges, generator=g) * torch.rand(graph.n_edges, generator=g) ** 3


def test_identical_sets_are_identical():
    s = random_scores()
    d = diff_circuits(make_set(s), make_set(s.clone()), "top:20")
    f = d.facts
    assert list(f.index) == ["f0", "f1", "f2", MEAN]
    assert (f["kept"] == 20).all() and (f[["added", "removed", "changed", "noise", "sign_flips"]] == 0).all().all()
    for col in ("edge_jaccard", "node_jaccard", "weighted_jaccard", "spearman", "rbo"):
        assert f[col].to_numpy() == pytest.approx(1.0, abs=1e-5), col
    assert (f["paths_lost"] == 0).all() and (f["paths_kept"] > 0).all()
    assert d.summary["n_facts"] == 3 and d.summary["edge_jaccard"] == pytest.approx(1.0)


def test_added_removed_kept_and_sign_flip_counts():
    n = GRAPH.n_edges
    a = torch.zeros(1, n)
    b = torch.zeros(1, n)
    a[0, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    b[0, :4] = torch.tensor([5.0, -4.0, 0.0, 2.05])  # edge 1 flips, edge 2 leaves
    b[0, 10] = 3.0  # edge 10 enters
    b[0, 11] = 1.9  # within the floor of edge 3's score: crosses the cut by noise only
    a[0, 11] = 1.95
    d = diff_circuits(make_set(a), make_set(b), "top:4", noise=0.5)
    row = d.facts.loc["f0"]
    assert (row["added"], row["removed"], row["sign_flips"]) == (1, 1, 1)
    assert row["changed"] == 1  # edge 1 kept but moved by 8
    assert row["kept"] == 2  # edges 0 and 3 (3 moved by 0.05 < floor)
    edges = d.edges("f0").set_index("edge")
    assert edges.loc[GRAPH.edges[10], "status"] == "added"
    assert edges.loc[GRAPH.edges[2], "status"] == "removed"
    assert bool(edges.loc[GRAPH.edges[1], "sign_flip"])
    assert row["edge_jaccard"] == pytest.approx(3 / 5)
    # the same change under a floor larger than every move counts nothing as changed
    quiet = diff_circuits(make_set(a), make_set(b), "top:4", noise=100.0).facts.loc["f0"]
    assert quiet["added"] == quiet["removed"] == quiet["changed"] == quiet["sign_flips"] == 0
    assert quiet["noise"] == 2


def test_similarity_measures_against_hand_values():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert float(spearman(a, a * 2)) == pytest.approx(1.0)
    assert float(spearman(a, -a)) == pytest.approx(-1.0)
    assert float(weighted_jaccard(a, torch.tensor([[1.0, 1.0, 3.0, 0.0]]))) == pytest.approx(5 / 10)
    assert float(rank_biased_overlap(a, a)) == pytest.approx(1.0)
    disjoint = float(rank_biased_overlap(torch.tensor([[4.0, 3, 0, 0]]), torch.tensor([[0.0, 0, 4, 3]]), depth=2))
    assert disjoint == pytest.approx(0.0)
    # top-weighted: swapping the two top edges costs more than swapping the two bottom ones
    x = torch.arange(100, 0, -1).float()[None]
    top_swap, bottom_swap = x.clone(), x.clone()
    top_swap[0, [0, 1]] = top_swap[0, [1, 0]]
    bottom_swap[0, [98, 99]] = bottom_swap[0, [99, 98]]
    assert float(rank_biased_overlap(x, top_swap)) < float(rank_biased_overlap(x, bottom_swap))


def test_layer_and_component_shift():
    n = GRAPH.n_edges
    src, dst = GRAPH.edge_node_ids
    layer = torch.tensor([GRAPH.layer_of(node) for node in GRAPH.nodes])
    a = torch.where((layer[src] <= 0) & (layer[dst] == 0), 1.0, 0.0)[None]
    b = torch.where((layer[src] >= 1) & (layer[dst] >= 2), 1.0, 0.0)[None]
    d = diff_circuits(make_set(a), make_set(b), "abs:0.5")
    layers = d.layers[d.layers["fact_id"] == "f0"].set_index("layer")
    assert layers.loc[0, "shift"] < 0 and layers.loc[2, "shift"] > 0
    assert d.layers.groupby("fact_id")["share_a"].sum().le(1 + 1e-5).all()
    comp = d.components[d.components["fact_id"] == "f0"].set_index("component")
    assert comp.loc["deep", "shift"] > 0 and comp.loc["shallow", "shift"] < 0
    assert d.facts.loc["f0", "deep_shift"] == pytest.approx(comp.loc["deep", "shift"])
    assert n == a.shape[1]


def test_strongest_paths_and_path_changes():
    n = GRAPH.n_edges
    idx = GRAPH.edge_index
    a = torch.zeros(1, n)
    for e, w in [("input->a0.h0<q>", 5.0), ("a0.h0->m0", 4.0), ("m0->logits", 4.0), ("input->a1.h1<v>", 1.0),
                 ("a1.h1->logits", 1.0)]:
        a[0, idx[e]] = w
    b = a.clone()
    b[0, idx["m0->logits"]] = 0.0  # breaks the strongest path
    b[0, idx["input->m2"]] = 3.0
    b[0, idx["m2->logits"]] = 3.0
    g = circuit_graph(GRAPH, a[0], a[0] != 0)
    top = strongest_paths(g, 3)
    assert top[0][0] == ("input", "a0.h0", "m0", "logits") and top[0][1] == pytest.approx(4 / 5 * 4 / 5)
    d = diff_circuits(make_set(a), make_set(b), "abs:0.5")
    paths = d.paths("f0").set_index("path")
    assert paths.loc["input -> a0.h0 -> m0 -> logits", "status"] == "lost"
    assert paths.loc["input -> m2 -> logits", "status"] == "new"
    assert d.facts.loc["f0", "paths_lost"] == 1


def test_noise_floor_from_repeats():
    s = random_scores(2)
    r1, r2 = make_set(s, checkpoint_hash="h"), make_set(s + 0.01 * torch.randn_like(s), checkpoint_hash="h")
    floor = noise_floor([r1, r2], quantile=1.0)
    assert list(floor.index) == ["f0", "f1"]
    assert floor["f0"] == pytest.approx(float((r1.scores[0] - r2.scores[0]).abs().max()))
    with pytest.raises(CircuitdynError, match="one checkpoint"):
        noise_floor([r1, make_set(s, checkpoint_hash="other")])
    with pytest.raises(CircuitdynError, match="at least 2"):
        noise_floor([r1])
    d = diff_circuits(r1, r2, "top:10", noise=floor)
    assert (d.facts.drop(index=MEAN)[["added", "removed", "changed"]] == 0).all().all()
    with pytest.raises(CircuitdynError, match="no value for fact"):
        diff_circuits(r1, r2, noise=pd.Series({"f0": 0.1}))


def test_selection_parsing_and_masks():
    assert Selection.parse("200") == Selection("top", 200)
    assert Selection.parse("faith:80%") == Selection("faith", 0.8)
    assert str(Selection.parse("paths:50")) == "paths:50"
    for bad in ("best:3", "top:0", "top:2.5", "faith:3", "abs:-1", "top:x"):
        with pytest.raises(CircuitdynError):
            Selection.parse(bad)
    cs = make_set(random_scores())
    assert (Selection.parse("top:7").select(cs.scores, cs.graph)[0].sum(1) == 7).all()
    paths = Selection.parse("paths:7").select(cs.scores, cs.graph)[0]
    assert (paths.sum(1) >= 7).all()
    assert torch.equal(GRAPH.on_path(paths[0]), paths[0])
    with pytest.raises(CircuitdynError, match="faithfulness"):
        Selection.parse("faith:0.8").select(cs.scores, cs.graph)[0]


def test_smallest_faithful_circuit():
    s = random_scores(2)
    # a fake faithfulness: fraction of total |score| captured, so larger circuits are more faithful
    def faith(masks: torch.Tensor) -> torch.Tensor:
        return (s.abs() * masks).sum(1) / s.abs().sum(1)

    n, masks, reached = smallest_faithful(s, faith, 0.8, rel_tol=0.0)
    assert (reached >= 0.8).all() and torch.equal(masks.sum(1), n)
    assert torch.allclose(faith(masks), reached)
    for row in range(2):  # this fake faithfulness grows with n, so with no tolerance n is exactly the smallest
        top = torch.zeros_like(masks).index_fill_(1, s[row].abs().topk(int(n[row]) - 1).indices, True)
        assert float(faith(top)[row]) < 0.8
    n_tol, _, _ = smallest_faithful(s, faith, 0.8, rel_tol=0.2)
    assert (n_tol >= n).all() and (n_tol <= n / 0.8 + 1).all()
    d = diff_circuits(make_set(s), make_set(s * 0.5), "faith:0.8", faithfulness_a=faith, faithfulness_b=faith)
    assert "faith_a" in d.facts and (d.facts.drop(index=MEAN)["faith_a"] >= 0.8).all()
    with pytest.raises(CircuitdynError, match="faithfulness"):
        diff_circuits(make_set(s), make_set(s), "faith:0.8")


def test_bad_inputs():
    s = random_scores()
    other_arch = Graph(2, 2)
    with pytest.raises(CircuitdynError, match="different architectures"):
        diff_circuits(make_set(s), make_set(random_scores(3, graph=other_arch), graph=other_arch))
    with pytest.raises(CircuitdynError, match="ig_steps"):
        diff_circuits(make_set(s), make_set(s, ig_steps=30))
    with pytest.raises(CircuitdynError, match="unknown fact id 'nope'"):
        diff_circuits(make_set(s), make_set(s), fact_ids=["nope"])
    with pytest.raises(CircuitdynError, match="not in B"):
        diff_circuits(make_set(s), make_set(s[:2]))
    d = diff_circuits(make_set(s), make_set(s), labels=("epoch 0", "epoch 1"))
    with pytest.raises(CircuitdynError, match="unknown fact id"):
        d.edges("zzz")


def test_to_dict_is_json():
    import json

    d = diff_circuits(make_set(random_scores(seed=1)), make_set(random_scores(seed=2)), "top:15")
    out = json.loads(json.dumps(d.to_dict()))
    assert set(out["facts"]) == {"f0", "f1", "f2", MEAN}
    assert 0 <= out["summary"]["edge_jaccard"] <= 1
    assert isinstance(d, CircuitDiff)


def test_transfer_matrix(tmp_path):
    circuits = {e: make_set(random_scores(seed=e)) for e in range(3)}

    def evaluate(model_epoch: int, cs: CircuitSet, masks: torch.Tensor) -> torch.Tensor:
        own = circuits[model_epoch].subset(cs.fact_ids).scores.abs()
        return (own * masks).sum(1) / own.sum(1)

    table = transfer_matrix(circuits, evaluate, "top:30")
    assert len(table) == 3 * 3 * 3
    pivot = transfer_pivot(table)
    assert pivot.shape == (3, 3)
    assert all(pivot.loc[i, i] >= pivot.loc[i].drop(i).max() for i in range(3))  # own circuit fits best
    assert not math.isnan(transfer_pivot(table, "f1").loc[0, 2])
    with pytest.raises(CircuitdynError, match="unknown fact id"):
        transfer_pivot(table, "zz")
    # A cached table is reused for the same circuits and selection, and recomputed otherwise.
    calls = []

    def counting(model_epoch: int, cs: CircuitSet, masks: torch.Tensor) -> torch.Tensor:
        calls.append(model_epoch)
        return evaluate(model_epoch, cs, masks)

    cache = tmp_path / "transfer.json"
    pd.testing.assert_frame_equal(transfer_matrix(circuits, counting, "top:30", cache=cache), table)
    assert len(calls) == 9
    pd.testing.assert_frame_equal(transfer_matrix(circuits, counting, "top:30", cache=cache), table)
    assert len(calls) == 9
    transfer_matrix(circuits, counting, "top:31", cache=cache)
    assert len(calls) == 18
    changed = {**circuits, 2: make_set(random_scores(seed=7))}
    transfer_matrix(changed, counting, "top:31", cache=cache)
    assert len(calls) == 27
    cache.write_text("{not json")
    transfer_matrix(changed, counting, "top:31", cache=cache)
    assert len(calls) == 36
    # One fact whose clean and corrupted runs nearly agree on a model does not swamp the matrix.
    spiked = table.copy()
    spiked.loc[(spiked["fact_id"] == "f1") & (spiked["model_epoch"] == 1), "faithfulness"] = 15.0
    assert transfer_pivot(spiked).loc[0, 1] <= table.loc[table["model_epoch"] == 1, "faithfulness"].max()


# --------------------------------------------------------------------------- CLI


def write_probes(path, ids):
    import json

    path.write_text("".join(json.dumps({"id": i, "entity": "Ada Lovelace", "question": f"Who is {i}?", "answer": "x"}) + "\n"
                            for i in ids))
    return path


def test_cli_diff_on_circuit_files(tmp_path, capsys):
    import json

    from circuitdyn.cli import main

    a = make_set(random_scores(seed=1), epoch=0).save(tmp_path / "a.safetensors")
    b = make_set(random_scores(seed=2), epoch=1).save(tmp_path / "b.safetensors")
    probes = write_probes(tmp_path / "probes.jsonl", ["f0", "f1", "f2"])
    out = tmp_path / "d.html"
    assert main(["diff", str(a), str(b), "--probes", str(probes), "--top-n", "15", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selection top:15" in text and "f1" in text and MEAN in text and "viewer:" in text
    assert out.is_file() and "Who is f1?" in out.read_text()
    assert main(["diff", str(a), str(b), "--select", "paths:10", "--json", "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["selection"] == "paths:10" and set(data["facts"]) == {"f0", "f1", "f2", MEAN}


def test_cli_diff_bad_inputs(tmp_path, capsys, make_run):
    from circuitdyn.cli import main

    a = make_set(random_scores()).save(tmp_path / "a.safetensors")
    other = Graph(2, 2)
    b = make_set(random_scores(graph=other), graph=other).save(tmp_path / "b.safetensors")
    out = str(tmp_path / "d.html")
    assert main(["diff", str(a), str(b), "--out", out]) == 2
    assert "different architectures" in capsys.readouterr().err
    wrong = write_probes(tmp_path / "wrong.jsonl", ["other/0", "other/1"])
    assert main(["diff", str(a), str(a), "--probes", str(wrong), "--out", out]) == 2
    assert "does not match the circuits" in capsys.readouterr().err
    assert main(["diff", str(a), str(a), "--fact", "nope", "--out", out]) == 2
    assert "unknown fact id 'nope'" in capsys.readouterr().err
    run = make_run("llama", 2, name="diff-run")
    graph = Graph(2, 4)
    for e in (0, 1):
        make_set(random_scores(graph=graph, seed=e), graph=graph, epoch=e).save(run / "circuits" / f"e{e}.safetensors")
    assert main(["diff", f"{run}:0", f"{run}:1", "--out", out]) == 0
    assert "selection top:200" in capsys.readouterr().out
    assert main(["diff", f"{run}:0", f"{run}:2", "--out", out]) == 2
    assert "no circuits for epoch(s) [2]" in capsys.readouterr().err


def test_cli_diff_computes_reuses_and_selects_by_faithfulness(make_run, tmp_path, capsys):
    """On a tiny run: circuits are computed through the attribution engine, cached, reused; noise floor
    from a second IG step count; the faith: selection evaluates circuits on each checkpoint."""
    from circuitdyn.cli import main
    from circuitdyn.probes import load_probes, write_probes_jsonl

    run = make_run("llama", 2, name="diff-compute-run")
    probes = write_probes_jsonl(load_probes()[:3], tmp_path / "probes.jsonl")
    out = tmp_path / "d.html"
    args = ["diff", f"{run}:0", f"{run}:2", "--probes", str(probes), "--steps", "2", "--top-n", "20", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "(mean circuit)" in text and out.is_file()
    files = sorted((run / "circuits").glob("*.safetensors"))
    assert len(files) == 2  # epochs 0 and 2
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main([*args, "--select", "faith:0.5", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["selection"] == "faith:0.5"
    per_fact = [v for k, v in data["facts"].items() if k != MEAN]
    assert all("faith_a" in v and "faith_b" in v for v in per_fact)
    assert all(v[k] is None or v[k] >= 0.5 for v in per_fact for k in ("faith_a", "faith_b"))  # None: undefined
    assert [f.stat().st_mtime_ns for f in files] == stamps  # reused, not recomputed
    # the cached circuits are found without --probes too; circuits of other settings are told apart
    assert main([*args, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["diff", f"{run}:0", f"{run}:2", "--method", "eap-ig", "--circuits", str(run / "circuits"),
                 "--out", str(out)]) == 2
    assert "several circuit files for epoch 0 with different settings" in capsys.readouterr().err
    assert main(["diff", f"{run}:0", f"{run}:2", "--steps", "2", "--out", str(out)]) == 0
    assert "selection top:200" in capsys.readouterr().out


def test_transfer_matrix_on_a_run(make_run):
    from circuitdyn.checkpoints import open_run
    from circuitdyn.circuits import CircuitSet
    from circuitdyn.extraction import extract_run, run_evaluator
    from circuitdyn.facts import load_facts
    from circuitdyn.probes import load_probes

    run = open_run(make_run("llama", 1, name="transfer-run"))
    facts = load_facts(load_probes()[:2], run.tokenizer())
    done = extract_run(run, facts, run.path / "circuits", steps=1, method="eap")
    circuits = {r.epoch: CircuitSet.load(r.path) for r in done}
    n = len(circuits[0].edges)
    table = transfer_matrix(circuits, run_evaluator(run, facts), f"top:{n}")
    assert table.shape == (2 * 2 * 2, 4)
    full = table["faithfulness"].dropna()
    # The full graph is faithful on every model. The random model's clean and corrupted log-probs (~-118)
    # differ by only ~0.004 nats, so one float32 rounding step (7.6e-6) already moves the ratio by 0.2 %.
    assert full.to_numpy() == pytest.approx(1.0, abs=5e-3)
    pivot = transfer_pivot(table)
    assert list(pivot.index) == [0, 1] and list(pivot.columns) == [0, 1]


@pytest.mark.integration
def test_cli_diff_on_smollm2(smollm2_dir, tmp_path, capsys):
    """The real model against itself: circuits computed once and reused, and identical (Jaccard 1)."""
    from circuitdyn.cli import main

    out = tmp_path / "diff.html"
    from circuitdyn.probes import seed_data_dir

    args = ["diff", str(smollm2_dir), str(smollm2_dir), "--probes", str(seed_data_dir() / "validation_probes.json"),
            "--limit", "1", "--method", "eap", "--top-n", "100",
            "--circuits", str(tmp_path / "circuits"), "--out", str(out), "--json"]
    assert main(args) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["edge_jaccard"] == 1.0 and data["summary"]["added"] == 0
    assert len(list((tmp_path / "circuits").glob("*.safetensors"))) == 1
    assert out.is_file()


def test_cli_diff_checkpoints_of_different_architectures(make_run, tmp_path, capsys):
    from circuitdyn.cli import main
    from circuitdyn.probes import load_probes, write_probes_jsonl

    llama, gpt2 = make_run("llama", 1, name="arch-llama"), make_run("gpt2", 1, name="arch-gpt2")
    probes = write_probes_jsonl(load_probes()[:1], tmp_path / "p.jsonl")
    args = ["diff", f"{llama}:1", f"{gpt2}:1", "--probes", str(probes), "--method", "eap", "--out", str(tmp_path / "d.html")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "architecture" in err and "LlamaForCausalLM" in err and "GPT2LMHeadModel" in err

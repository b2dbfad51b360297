"""Circuit tasks as data: the packaged head-of-state task, the corruption rule, the paper's protocol and its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuitdyn.cli import main
from circuitdyn.engine.settings import PAPER_SETTINGS
from circuitdyn.errors import CircuitdynError
from circuitdyn.pipeline.tasks import (
    Task,
    evaluate_task_circuit,
    extract_task,
    extract_task_run,
    hit_at_10,
    load_task,
    results_path,
    task_circuit,
    task_facts,
)


class WordTokenizer:
    """Whitespace tokenizer: one id per word (BOS = 0 with special tokens), enough for `task_facts`."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_packaged_head_of_state_is_the_papers_task() -> None:
    task = load_task("head-of-state")
    assert task.template == "The name of the current head of state of {} is"
    assert len(task.subjects) == len(task.answers) == 16
    assert task.subjects[0] == "USA" and task.answers[0] == " Donald Trump"
    assert task.subjects[-1] == "Iran" and task.answers[-1] == " Masoud Pezeshkian"
    assert task.corruption == "next-subject-cyclic"


def test_next_subject_cyclic_and_unequal_lengths_moved_along_the_cycle() -> None:
    task = Task("t", "x {} y", ("a", "b", "c d", "e", "f g"), (" A", " B", " C", " E", " F"))
    tok = WordTokenizer()
    tf = task_facts(task, tok)
    ids = {w: tok(w, add_special_tokens=False)["input_ids"][0] for w in ("A", "B", "C", "E", "F")}
    # a -> b (equal length); b's partner "c d" is longer, so b takes e; "c d" -> "f g"; e -> a (cyclic); "f g" -> "c d"
    assert [f.corruption for f in tf.facts] == ["swap:b", "swap:e", "swap:f g", "swap:a", "swap:c d"]
    assert tf.substituted == [("b", "c d", "e"), ("c d", "e", "f g"), ("e", "f g", "a"), ("f g", "a", "c d")]
    assert [f.contrast_token for f in tf.facts] == [ids["B"], ids["E"], ids["F"], ids["A"], ids["C"]]
    assert all(len(f.clean_tokens) == len(f.corrupted_tokens) for f in tf.facts)
    assert tf.facts[0].clean_tokens[0] == 0  # special tokens as the tokenizer adds them


def test_a_subject_without_an_equal_length_partner_is_an_error() -> None:
    with pytest.raises(CircuitdynError, match="'c d e'"):
        task_facts(Task("t", "x {} y", ("a", "b", "c d e"), (" A", " B", " C")), WordTokenizer())


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"template": "no slot"}, "'template'"),
        ({"answers": [" A"]}, "'answers' has 1 entries for 2 subjects"),
        ({"subjects": ["a", "a"]}, "repeats a subject"),
        ({"corruption": "random"}, "'corruption'"),
        ({"subjects": "a"}, "'subjects' must be"),
    ],
)
def test_bad_task_files_name_the_field(tmp_path: Path, patch: dict, message: str) -> None:
    data = {"template": "x {} y", "subjects": ["a", "b"], "answers": [" A", " B"], **patch}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CircuitdynError, match=message):
        load_task(path)
    with pytest.raises(CircuitdynError, match="no such task"):
        load_task(tmp_path / "missing.json")


def test_hit_at_10_counts_the_correct_token_in_the_top_10() -> None:
    logits = torch.arange(20.0).repeat(2, 1, 1)  # token 19 largest, 10..19 the top 10
    batch = type("B", (), {"target_tok": torch.tensor([[10], [9]])})()
    assert hit_at_10(logits, batch).tolist() == [1.0, 0.0]


def _equal_length_task(tokenizer) -> Task:
    """A task whose prompts all have one token length under the tiny test tokenizer."""
    words = ["Russia", "Patna", "India", "Japan", "China", "the", "of", "and", "was", "born", "city", "river"]
    template = "The capital of {} is"
    by_len: dict[int, list[str]] = {}
    for w in words:
        by_len.setdefault(len(tokenizer(template.format(w))["input_ids"]), []).append(w)
    subjects = max(by_len.values(), key=len)[:4]
    assert len(subjects) >= 3
    answers = [" river", " city", " born", " was"][: len(subjects)]
    return Task("tiny", template, tuple(subjects), tuple(answers))


def test_task_protocol_on_a_tiny_run(llama_run: Path, tmp_path: Path) -> None:
    from circuitdyn.engine.graph import Graph
    from circuitdyn.runs.checkpoints import open_run

    run = open_run(llama_run)
    task = _equal_length_task(run.tokenizer())
    model = run.load_model(0)
    cs, res = extract_task(model, task, PAPER_SETTINGS.replace(steps=2), top_n=200, runs=2)
    assert len(cs.fact_ids) == len(task.subjects) and cs.meta["metric"] == "logit-diff"
    assert set(res) >= {"baseline", "circuits", "mean", "stdev"} and set(res["circuits"]) == {"0", "1"}
    # runs differ only by the order of attribution: the same circuit, the same scores
    assert res["stdev"]["logit_diff"] == pytest.approx(0.0, abs=1e-5)
    facts = task_facts(task, run.tokenizer()).facts
    graph = Graph.from_model(model)
    # the whole graph as the circuit is the full model; the empty circuit is the corrupted model
    full = evaluate_task_circuit(model, facts, torch.ones(graph.n_edges, dtype=torch.bool))
    assert full["logit_diff"] == pytest.approx(res["baseline"]["logit_diff"], abs=1e-4)
    assert full["hit_at_10"] == res["baseline"]["hit_at_10"]
    from circuitdyn.engine.faithfulness import CircuitEvaluator

    empty = evaluate_task_circuit(model, facts, torch.zeros(graph.n_edges, dtype=torch.bool))
    corrupted = float(CircuitEvaluator(model, facts, "logit-diff").m_corr.mean())
    assert empty["logit_diff"] == pytest.approx(corrupted, abs=1e-4)
    circuit = task_circuit(cs.scores, graph, 200)
    assert 0 < int(circuit.sum()) <= 200


def test_task_run_files_resume_and_refuse(llama_run: Path, tmp_path: Path) -> None:
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.runs.checkpoints import open_run

    run = open_run(llama_run)
    task = _equal_length_task(run.tokenizer())
    task_file = tmp_path / "task.json"
    task_file.write_text(
        json.dumps(
            {
                "name": task.name,
                "template": task.template,
                "subjects": list(task.subjects),
                "answers": list(task.answers),
            }
        )
    )
    out = tmp_path / "out"
    done = extract_task_run(run, load_task(task_file), out, [0, 1], PAPER_SETTINGS.replace(steps=1), top_n=100, runs=1)
    assert [d.skipped for d in done] == [False, False]
    for d in done:
        assert d.results_path == results_path(out, d.epoch) and d.results_path.is_file()
        cs = CircuitSet.load(d.circuit_path)
        assert len(cs.fact_ids) == len(task.subjects) and cs.meta["metric"] == "logit-diff"
        assert cs.meta["epoch"] == d.epoch
    again = extract_task_run(run, load_task(task_file), out, [0, 1], PAPER_SETTINGS.replace(steps=1), top_n=100, runs=1)
    assert [d.skipped for d in again] == [True, True]
    with pytest.raises(CircuitdynError, match="overwrite"):
        extract_task_run(run, load_task(task_file), out, [0], PAPER_SETTINGS.replace(steps=1), top_n=50, runs=1)
    assert main(["extract", str(llama_run), "--task", str(task_file), "--probes", "x.jsonl"]) == 2


@pytest.mark.integration
def test_head_of_state_on_smollm2_cli(smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from circuitdyn.engine.circuits import CircuitSet

    assert (
        main(
            [
                "extract",
                str(smollm2_dir),
                "--task",
                "head-of-state",
                "--steps",
                "1",
                "--runs",
                "1",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    [path] = list(tmp_path.glob("epoch_0.*.safetensors"))
    cs = CircuitSet.load(path)
    assert len(cs.fact_ids) == 16 and cs.meta["metric"] == "logit-diff"
    res = json.loads((tmp_path / "epoch_0" / "results.json").read_text())
    assert set(res["baseline"]) == {"logit_diff", "hit_at_10"}
    assert res["settings"]["substituted_pairs"] == []  # SmolLM2 splits every pair equally
    assert 0.0 <= res["baseline"]["hit_at_10"] <= 1.0 and res["baseline"]["logit_diff"] > 0
    assert "moved for unequal token length: none" in capsys.readouterr().out


def test_logit_diff_for_probe_facts(llama_run: Path, tmp_path: Path) -> None:
    """`--metric logit-diff` on probe facts: the contrast is the corrupted prompt's answer (first token)."""
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.probes.probes import load_probes, select_entities, write_probes_jsonl

    probes = write_probes_jsonl(
        select_entities(load_probes(rephrased=False), ["Russia", "Patna"])[:6]
        + select_entities(load_probes(rephrased=False), ["Patna"])[:2],
        tmp_path / "p.jsonl",
    )
    out = tmp_path / "c"
    assert (
        main(
            [
                "extract",
                f"{llama_run}:1",
                "--probes",
                str(probes),
                "--metric",
                "logit-diff",
                "--steps",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    [path] = list(out.glob("epoch_1.*.safetensors"))
    cs = CircuitSet.load(path)
    assert cs.meta["metric"] == "logit-diff" and len(cs.fact_ids) == 8
    assert all(abs(a - b) > 0 for a, b in zip(cs.meta["m_clean"], cs.meta["m_corrupted"]))

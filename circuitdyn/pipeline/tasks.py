"""Circuit tasks as data: one task-level knowledge circuit per checkpoint, as arXiv 2601.03858 extracts it.

A task is a small JSON file: a prompt `template` with one `{}` slot, the `subjects` that fill it, each
subject's `answers` (the continuation text, leading space included; only its first token is scored) and a
corruption rule. The paper's head-of-state task ships in `circuitdyn/data/tasks/head-of-state.json`;
`load_task` takes a packaged name or a path to a user's file of the same shape.

Corruption rule `next-subject-cyclic` (the paper's): the corrupted prompt of subject i is the template
filled with subject i+1 (cyclic), and the incorrect token is the first token of answer i+1. The paper's
code asserts that both prompts have the same token length; where a tokenizer splits a pair differently,
circuitdyn takes the next subject further along the cycle whose prompt has the clean prompt's length (and
that subject's answer as the incorrect one) and reports the pair (`TaskFacts.substituted`).

The protocol (`extract_task`): metric = logit difference (correct - incorrect first token) at the last
prompt position; EAP-IG on inputs (30 steps); scores of the 16 prompts stored row by row (the task circuit
is their mean, which is what EAP-IG on the batch-mean metric computes); circuit = the top 50,000 edges of
the mean by |score|, pruned of edges on no input->logits path (as `Graph.apply_topn` of the EAP-IG library
does); evaluated by exact patching as logit difference and hit@10 (the correct token among the 10 largest
logits) for the full model (`baseline`) and for the circuit. Each of `runs` runs attributes the prompts in
the order of a seeded shuffle, as the paper's runs do; attribution here is order-independent up to float
rounding, so runs agree (the paper's released runs agree too: stdev 0.0 at every epoch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import DATA_DIR, FactPrompt, read_json, slug

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.engine.forward import FactBatch
    from circuitdyn.engine.settings import AttributionSettings
    from circuitdyn.runs.checkpoints import Run

CorruptionRule = Literal["next-subject-cyclic"]
CORRUPTION_RULES = ("next-subject-cyclic",)
TASKS_DIR = DATA_DIR / "tasks"
RESULTS_FILE = "results.json"

PAPER_TOP_N = 50_000
PAPER_RUNS = 5
"""The paper's task circuit: the top 50,000 edges, over 5 seeded runs; attributed with `settings.PAPER_SETTINGS`."""


@dataclass(frozen=True)
class Task:
    """A circuit task: prompts `template.format(subject)` whose correct continuation starts with `answers[i]`."""

    name: str
    template: str
    subjects: tuple[str, ...]
    answers: tuple[str, ...]
    corruption: CorruptionRule = "next-subject-cyclic"
    description: str = ""

    def prompts(self) -> list[str]:
        return [self.template.format(s) for s in self.subjects]


def packaged_tasks() -> list[str]:
    """Names of the tasks shipped in the package."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.json"))


def load_task(name_or_path: str | Path) -> Task:
    """A packaged task by name (`head-of-state`) or a task file; every field is checked, errors name it."""
    path = Path(name_or_path)
    if not path.is_file():
        packaged = TASKS_DIR / f"{name_or_path}.json"
        if not packaged.is_file():
            raise CircuitdynError(
                f"{name_or_path}: no such task file or packaged task (packaged: {', '.join(packaged_tasks())})"
            )
        path = packaged
    data = read_json(path)
    if not isinstance(data, dict):
        raise CircuitdynError(f"{path}: a task file holds one JSON object")
    for key in ("template", "subjects", "answers"):
        if key not in data:
            raise CircuitdynError(f"{path}: field '{key}' is missing")
    template, subjects, answers = data["template"], data["subjects"], data["answers"]
    if not isinstance(template, str) or template.count("{}") != 1:
        raise CircuitdynError(
            f"{path}: field 'template' must be a string with exactly one '{{}}' slot, got {template!r}"
        )
    for key, values in (("subjects", subjects), ("answers", answers)):
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise CircuitdynError(f"{path}: field '{key}' must be a non-empty list of non-empty strings")
    if len(subjects) < 2:
        raise CircuitdynError(f"{path}: field 'subjects' needs at least 2 subjects (the corruption swaps them)")
    if len(answers) != len(subjects):
        raise CircuitdynError(f"{path}: field 'answers' has {len(answers)} entries for {len(subjects)} subjects")
    if len(set(subjects)) != len(subjects):
        raise CircuitdynError(f"{path}: field 'subjects' repeats a subject")
    rule = data.get("corruption", "next-subject-cyclic")
    if rule not in CORRUPTION_RULES:
        raise CircuitdynError(f"{path}: field 'corruption' = {rule!r}; known rules: {', '.join(CORRUPTION_RULES)}")
    name = data.get("name") or path.stem
    if not isinstance(name, str):
        raise CircuitdynError(f"{path}: field 'name' must be a string")
    return Task(name, template, tuple(subjects), tuple(answers), rule, str(data.get("description", "")))


@dataclass(frozen=True)
class TaskFacts:
    """A task's prompts as attribution inputs, and the pairs whose corruption partner was moved along the
    cycle because the rule's partner tokenizes to another length: (subject, rule's partner, partner used)."""

    task: Task
    facts: list[FactPrompt]
    substituted: list[tuple[str, str, str]]


def task_facts(task: Task, tokenizer: PreTrainedTokenizerBase) -> TaskFacts:
    """One `FactPrompt` per subject: clean = template(subject i), corrupted = template(partner), answer = the
    first token of answer i, contrast (incorrect) = the first token of the partner's answer. Prompts start with
    the BOS token, as the paper's pipeline tokenizes them (a HookedTransformer's tokenizer prepends it where the
    plain tokenizer does not, e.g. SmolLM2's)."""
    bos = getattr(tokenizer, "bos_token_id", None)

    def encode(text: str) -> list[int]:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids

    def first(answer: str) -> int:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise CircuitdynError(f"task {task.name!r}: answer {answer!r} tokenizes to nothing")
        return ids[0]

    prompts = [encode(p) for p in task.prompts()]
    n = len(task.subjects)
    facts, substituted = [], []
    for i, subject in enumerate(task.subjects):
        j = next((k % n for k in range(i + 1, i + n) if len(prompts[k % n]) == len(prompts[i])), None)
        if j is None:
            raise CircuitdynError(
                f"task {task.name!r}: no other subject's prompt has the token length of "
                f"{subject!r}'s ({len(prompts[i])} tokens); the corruption needs one"
            )
        if j != (i + 1) % n:
            substituted.append((subject, task.subjects[(i + 1) % n], task.subjects[j]))
        facts.append(
            FactPrompt(
                f"{task.name}/{i}-{slug(subject)}",
                tuple(prompts[i]),
                tuple(prompts[j]),
                (first(task.answers[i]),),
                f"swap:{task.subjects[j]}",
                contrast_token=first(task.answers[j]),
            )
        )
    return TaskFacts(task, facts, substituted)


def hit_at_10(logits: Float[Tensor, "batch answer vocab"], batch: FactBatch) -> Float[Tensor, " batch"]:
    """1 where the correct first token is among the 10 largest logits at the last prompt position, else 0."""
    top = logits[:, 0].float().topk(10, dim=-1).indices
    return (top == batch.target_tok[:, :1]).any(-1).float()


def task_circuit(scores: Float[Tensor, "prompt edge"], graph: Any, top_n: int = PAPER_TOP_N) -> Tensor:
    """The task circuit: the top-n edges of the prompts' mean score by |score|, without edges on no
    input->logits path of circuit edges (`Graph.apply_topn`'s pruning in the EAP-IG library)."""
    from circuitdyn.engine.selection import on_paths, select_top_n

    return on_paths(select_top_n(scores.float().mean(0, keepdim=True), top_n), graph)[0]


class _LogitDiffAndHits:
    """The logit-diff metric that also keeps hit@10 of the same logits (one patched run gives both)."""

    __name__ = "logit-diff"

    def __init__(self) -> None:
        self.hits: list[Tensor] = []

    def __call__(self, logits: Float[Tensor, "batch answer vocab"], batch: FactBatch) -> Float[Tensor, " batch"]:
        from circuitdyn.engine.forward import logit_diff

        self.hits.append(hit_at_10(logits, batch))
        return logit_diff(logits, batch)


class TaskEvaluator:
    """Logit difference and hit@10 of task circuits on one model, by exact patching of every edge outside the
    circuit to its corrupted value. The prompts go in one batch; the clean run (the paper's `baseline`) and the
    corrupted activations are computed once."""

    def __init__(self, model: HookedTransformer, facts: Sequence[FactPrompt]) -> None:
        from circuitdyn.engine.faithfulness import CircuitEvaluator

        self.facts = list(facts)
        self.metric = _LogitDiffAndHits()
        self.evaluator = CircuitEvaluator(model, self.facts, self.metric, 0, len(self.facts))
        # the evaluator runs the clean prompts first, then the corrupted ones
        self.clean_hits, self.corrupted_hits = self.metric.hits[0], self.metric.hits[1]
        self.baseline = {"logit_diff": float(self.evaluator.m_clean.mean()), "hit_at_10": float(self.clean_hits.mean())}
        self._seen: dict[bytes, dict[str, float]] = {}

    def circuit(self, circuit: Tensor) -> dict[str, float]:
        """Mean logit difference and hit@10 over the prompts with only `circuit`'s edges clean. The evaluator
        runs no forward for the full graph (the clean run), the empty circuit (the corrupted run) or a circuit it
        has seen, so hit@10 is taken from those runs then, not from the metric's last call."""
        key = bytes(np.packbits(circuit.detach().cpu().numpy()))
        if key in self._seen:
            return dict(self._seen[key])
        before = len(self.metric.hits)
        values = self.evaluator.metric_of(circuit.expand(len(self.facts), -1).contiguous())
        if len(self.metric.hits) > before:
            hits = self.metric.hits[-1]
        elif bool(circuit.all()) or not bool(circuit.any()):
            hits = self.clean_hits if bool(circuit.all()) else self.corrupted_hits
        else:
            raise RuntimeError("a task circuit was served from the evaluator's cache without its hit@10")
        self._seen[key] = {"logit_diff": float(values.mean()), "hit_at_10": float(hits.float().mean())}
        return dict(self._seen[key])


def evaluate_task_circuit(
    model: HookedTransformer, facts: Sequence[FactPrompt], circuit: Tensor | None
) -> dict[str, float]:
    """Mean logit difference and hit@10 over the prompts of a task circuit; `circuit=None` scores the full model
    (the paper's `baseline`)."""
    ev = TaskEvaluator(model, facts)
    return ev.baseline if circuit is None else ev.circuit(circuit)


def summarize_runs(baseline: dict[str, float], runs: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The paper's results.json shape: baseline, circuits per run, their mean and sample stdev (0 for one run)."""
    keys = ("logit_diff", "hit_at_10")
    values = {k: [r[k] for r in runs.values()] for k in keys}
    return {
        "baseline": {k: baseline[k] for k in keys},
        "circuits": runs,
        "mean": {k: mean(values[k]) for k in keys},
        "stdev": {k: stdev(values[k]) if len(values[k]) > 1 else 0.0 for k in keys},
    }


def extract_task(
    model: HookedTransformer,
    task: Task | TaskFacts,
    settings: AttributionSettings | None = None,
    *,
    top_n: int = PAPER_TOP_N,
    runs: int = PAPER_RUNS,
    batch_size: int = 8,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> tuple[CircuitSet, dict[str, Any]]:
    """The paper's protocol on one model: the per-prompt scores (run 0's rows, in task order, attributed with
    `settings`, default `settings.PAPER_SETTINGS`: EAP-IG, 30 steps, left grid, metric `logit-diff`) as a
    `CircuitSet`, and the results in the paper's `results.json` shape (plus `settings`)."""
    from circuitdyn.engine.attribution import attribute
    from circuitdyn.engine.graph import Graph
    from circuitdyn.engine.settings import PAPER_SETTINGS, Compute
    from circuitdyn.pipeline.extraction import extract_circuits
    from circuitdyn.probes.facts import facts_hash

    s = settings or PAPER_SETTINGS
    compute = Compute(batch_size=batch_size)
    if runs < 1:
        raise CircuitdynError(f"runs must be >= 1, got {runs}")
    if isinstance(task, TaskFacts):
        tf = task
    elif model.tokenizer is None:
        raise CircuitdynError("the model has no tokenizer to build the task's prompts with")
    else:
        tf = task_facts(task, model.tokenizer)
    facts = tf.facts
    graph = Graph.from_model(model)
    evaluator = TaskEvaluator(model, facts)
    baseline = evaluator.baseline
    circuits: dict[str, dict[str, float]] = {}
    cs = None
    sizes = []
    for r in range(runs):
        order = torch.randperm(len(facts), generator=torch.Generator().manual_seed(r)).tolist()
        shuffled = [facts[i] for i in order]
        if r == 0:
            cs = extract_circuits(model, shuffled, s, compute, meta=meta, progress=progress).subset(
                [f.fact_id for f in facts]
            )
            cs.meta["probe_set_hash"] = facts_hash(facts)  # the task's prompts in task order, not run 0's shuffle
            scores = cs.scores
        else:
            raw = attribute(model, shuffled, s, compute, progress=progress)
            scores = torch.empty_like(raw)
            scores[order] = raw
        circuit = task_circuit(scores, graph, top_n)
        sizes.append(int(circuit.sum()))
        circuits[str(r)] = evaluator.circuit(circuit)
    assert cs is not None
    results = summarize_runs(baseline, circuits)
    results["settings"] = {
        "task": tf.task.name,
        "template": tf.task.template,
        "corruption": tf.task.corruption,
        "method": s.method,
        "ig_steps": s.steps,
        "ig_grid": s.ig_grid,
        "metric": s.metric_name,
        "top_n": top_n,
        "runs": runs,
        "circuit_edges": sizes,
        "graph_edges": graph.n_edges,
        "substituted_pairs": [list(p) for p in tf.substituted],
        **{k: cs.meta.get(k) for k in ("model", "checkpoint_hash", "epoch", "step", "probe_set_hash")},
    }
    cs.meta.update(
        {
            "task": tf.task.name,
            "task_top_n": top_n,
            "task_runs": runs,
            "task_baseline": results["baseline"],
            "task_mean": results["mean"],
        }
    )
    return cs, results


@dataclass
class TaskExtracted:
    """One epoch's result of `extract_task_run`."""

    epoch: int
    circuit_path: Path
    results_path: Path
    results: dict[str, Any]
    skipped: bool

    def text(self) -> str:
        """The epoch's files, and the full model's and the circuit's logit difference and hit@10."""
        r = self.results
        return "\n".join(
            [
                f"epoch {self.epoch}: {self.circuit_path} ({'cached' if self.skipped else 'written'}), "
                f"{self.results_path}",
                f"  baseline  logit diff {r['baseline']['logit_diff']:.4f}  hit@10 {r['baseline']['hit_at_10']:.4f}",
                f"  circuit   logit diff {r['mean']['logit_diff']:.4f} (sd {r['stdev']['logit_diff']:.4f})  "
                f"hit@10 {r['mean']['hit_at_10']:.4f} (sd {r['stdev']['hit_at_10']:.4f})  "
                f"edges {r['settings']['circuit_edges']}",
            ]
        )


def describe_task(tf: TaskFacts, epochs: Sequence[int], settings: AttributionSettings, top_n: int, runs: int) -> str:
    """One line on what `extract_task_run` is about to do: the task, its prompts, epochs and protocol, and the
    corruption partners moved for unequal token length."""
    moved = "; ".join(f"{a} -> {c} (not {b})" for a, b, c in tf.substituted) or "none"
    return (
        f"task {tf.task.name}: {len(tf.facts)} prompts; epochs {list(epochs)}; {settings.method} "
        f"M={settings.steps}, metric {settings.metric_name}, top {top_n:,} edges, {runs} run(s); corruption "
        f"partners moved for unequal token length: {moved}"
    )


def results_path(out_dir: str | Path, epoch: int) -> Path:
    """Where an epoch's task results go: `OUT/epoch_N/results.json` (the paper's per-epoch layout)."""
    return Path(out_dir) / f"epoch_{epoch}" / RESULTS_FILE


def extract_task_run(
    run: Run,
    task: Task,
    out_dir: str | Path,
    epochs: Sequence[int] | None = None,
    settings: AttributionSettings | None = None,
    *,
    top_n: int = PAPER_TOP_N,
    runs: int = PAPER_RUNS,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = False,
) -> list[TaskExtracted]:
    """The task circuit of every epoch of a `checkpoints.Run`, attributed with `settings` (default
    `settings.PAPER_SETTINGS`): the circuit file (16 rows for the paper's task) under `out_dir`, named like
    per-fact circuit files, and the epoch's `results.json` in `out_dir/epoch_N/`. An epoch whose two files
    already hold this checkpoint and these settings is reused; files of another checkpoint or other settings are
    replaced only with `overwrite`."""
    from circuitdyn.engine.circuits import circuit_filename
    from circuitdyn.engine.settings import PAPER_SETTINGS
    from circuitdyn.io import file_lock, write_json_atomic
    from circuitdyn.pipeline.extraction import checkpoint_meta, extraction_settings, is_done

    s = settings or PAPER_SETTINGS
    tf = task_facts(task, run.tokenizer())
    want = extraction_settings(run.architecture, tf.facts, s)
    out = Path(out_dir)
    done = []
    for epoch in list(run.epochs if epochs is None else epochs):
        ck = run.checkpoint(epoch)
        path, rpath = out / circuit_filename(epoch, want), results_path(out, epoch)
        with file_lock(path):
            circuit_done = is_done(path, want, ck.content_hash, overwrite)  # refuses other content unless overwrite
            prior = json.loads(rpath.read_text()) if rpath.is_file() else None
            recorded = (prior or {}).get("settings") or {}
            if (
                circuit_done
                and prior is not None
                and recorded.get("checkpoint_hash") == ck.content_hash
                and ({k: recorded.get(k) for k in ("top_n", "runs")} == {"top_n": top_n, "runs": runs})
            ):
                done.append(TaskExtracted(epoch, path, rpath, prior, True))
                continue
            if rpath.exists() and not overwrite:
                raise CircuitdynError(
                    f"{rpath} holds another checkpoint's task results or other settings; choose "
                    "another output folder, or pass --overwrite (overwrite=True) to replace it"
                )
            model = run.load_model(epoch)
            cs, results = extract_task(
                model,
                tf,
                s,
                top_n=top_n,
                runs=runs,
                batch_size=batch_size,
                meta=checkpoint_meta(run, epoch),
                progress=progress,
            )
            cs.save(path)
            write_json_atomic(rpath, results)
            done.append(TaskExtracted(epoch, path, rpath, results, False))
    return done

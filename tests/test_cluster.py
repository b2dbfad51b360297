"""Circuits and CPT sweeps on a real local Ray cluster: the same files as a local run, surviving killed workers."""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

from circuitdyn.errors import CircuitdynError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray workers through /proc")


def extract_args(**compute) -> tuple:
    """The settings, compute and storage of every extraction here (Ray options in `compute`)."""
    from circuitdyn.engine.settings import AttributionSettings, Compute, Storage

    return AttributionSettings("eap-ig", 2), Compute(batch_size=2, **compute), Storage(top_n=50)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one takes seconds on 2 cores)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run_and_facts(make_run):
    from circuitdyn.probes.facts import load_facts
    from circuitdyn.probes.probes import load_probes
    from circuitdyn.runs.checkpoints import open_run

    run = open_run(make_run("llama", 1, name="ray-run"))
    return run, load_facts(load_probes()[:6], run.tokenizer())


@pytest.fixture(scope="module")
def local(run_and_facts, tmp_path_factory):
    """The circuit files of a plain local run: what every Ray run must reproduce."""
    from circuitdyn.pipeline.extraction import extract_run

    run, facts = run_and_facts
    return extract_run(run, facts, tmp_path_factory.mktemp("local"), None, *extract_args())


def assert_same_files(local, folder: Path, extra_meta: dict | None = None) -> None:
    from circuitdyn.engine.circuits import CircuitSet

    recorded = {"facts.json", ".facts.json.lock"}  # the run's record of a probe file's facts, beside the circuits
    assert sorted(p.name for p in folder.iterdir() if p.name not in recorded) == sorted(r.path.name for r in local)
    for r in local:
        a, b = CircuitSet.load(r.path), CircuitSet.load(folder / r.path.name)
        assert a.fact_ids == b.fact_ids and a.edges == b.edges
        assert (a.scores - b.scores).abs().max().item() <= 1e-6
        assert {**a.meta, **(extra_meta or {})} == b.meta


def busy_workers() -> list[int]:
    """Pids of Ray workers running an `extract_shard` task (Ray titles a busy worker `ray::<task name>`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::extract_shard"):
                pids.append(int(entry.name))
    return pids


def extract_killing_one_worker(run, facts, out: Path, **kw):
    """`extract_run` on Ray while the first busy worker seen is SIGKILLed mid-task; (result or error, killed pid)."""
    from circuitdyn.pipeline.extraction import extract_run

    box: dict = {}

    def work():
        try:
            box["result"] = extract_run(run, facts, out, None, *extract_args(ray="auto", shard_size=2, **kw))
        except CircuitdynError as err:
            box["error"] = err

    thread = threading.Thread(target=work)
    thread.start()
    killed = None
    while thread.is_alive() and killed is None:
        pids = busy_workers()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.005)
    thread.join()
    return box, killed


def test_cli_extract_on_ray_writes_the_local_files(cluster, run_and_facts, local, tmp_path, capsys):
    from circuitdyn.cli import main
    from circuitdyn.probes.probes import load_probes, write_probes_jsonl

    run, _ = run_and_facts
    out = tmp_path / "ray"
    probes = write_probes_jsonl(load_probes()[:6], tmp_path / "probes.jsonl")
    args = [
        "extract",
        str(run.path),
        "--probes",
        str(probes),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--top-n",
        "50",
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        "--ray",
        "--shard-size",
        "3",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.count("(written)") == 2
    assert_same_files(local, out, {"probe_file": str(probes)})
    assert (out / "facts.json").is_file()  # the CLI's facts come from a probe file: the folder records them
    assert main(args) == 0  # a re-run finds every epoch's file and computes nothing
    assert capsys.readouterr().out.count("(cached)") == 2


def test_a_killed_worker_is_retried_and_the_result_is_identical(cluster, run_and_facts, local, tmp_path):
    run, facts = run_and_facts
    box, killed = extract_killing_one_worker(run, facts, tmp_path / "ray", max_retries=2)
    assert killed is not None, "no busy Ray worker was seen to kill"
    assert "error" not in box
    assert [r.epoch for r in box["result"]] == [0, 1]
    assert_same_files(local, tmp_path / "ray")


def test_a_repeated_failure_names_checkpoint_and_shard_and_a_rerun_resumes(
    cluster, run_and_facts, local, tmp_path, monkeypatch
):
    from circuitdyn.pipeline import ray as cluster_module

    run, facts = run_and_facts
    out = tmp_path / "ray"
    box, killed = extract_killing_one_worker(run, facts, out, max_retries=0)
    assert killed is not None, "no busy Ray worker was seen to kill"
    msg = str(box["error"])
    assert "checkpoint epoch" in msg and "shard " in msg and "worker died" in msg, msg
    shards = sorted((out / ".shards").rglob("*.safetensors"))
    assert 0 < len(shards) < 6  # 2 epochs x 3 shards of 2 facts; the killed one is missing
    submitted = []
    real = cluster_module.run_tasks

    def counting(rt, tasks, **kw):
        submitted.extend(tasks)
        return real(rt, tasks, **kw)

    monkeypatch.setattr(cluster_module, "run_tasks", counting)
    from circuitdyn.pipeline.extraction import extract_run

    extract_run(run, facts, out, None, *extract_args(ray="auto", shard_size=2))
    assert len(submitted) == 6 - len(shards)  # finished shards are not computed again
    assert_same_files(local, out)


def test_without_ray_the_error_says_what_to_install(run_and_facts, tmp_path, monkeypatch):
    from circuitdyn.pipeline.extraction import extract_run

    run, facts = run_and_facts
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(CircuitdynError, match=r"pip install 'circuitdyn\[ray\]'"):
        extract_run(run, facts, tmp_path, None, *extract_args(ray="auto"))


def test_cluster_runs_tasks_in_order_and_names_the_failed_one(cluster):
    from circuitdyn.pipeline.ray import Task, run_tasks

    assert run_tasks(cluster, [Task(f"t{i}", statistics.mean, ([i, 3 * i],)) for i in range(4)]) == [0, 2, 4, 6]
    with pytest.raises(CircuitdynError, match=r"^part b failed: StatisticsError: mean requires at least one"):
        run_tasks(cluster, [Task("part a", statistics.mean, ([1],)), Task("part b", statistics.mean, ([],))])


def test_cpt_sweep_on_ray_and_dynamics_across_seeds(cluster, tokenizer_dir, tmp_path, capsys):
    import json

    from conftest import save_tiny_model

    from circuitdyn.cli import main

    base = save_tiny_model(tmp_path / "base", "llama", tokenizer_dir, seed=0)
    args = [
        "cpt",
        "--out",
        str(tmp_path / "sweep"),
        "--base",
        str(base),
        "--entities",
        "Russia,Patna",
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--n-math",
        "0",
        "--n-reasoning",
        "0",
        "--no-progress",
        "--seeds",
        "0,1",
        "--strategy",
        "plain,stepwise-kl",
        "--ray",
    ]
    assert main(args) == 0
    runs = [tmp_path / "sweep" / s / f"seed_{k}" for s in ("plain", "stepwise-kl") for k in (0, 1)]
    printed = capsys.readouterr().out
    assert all(str(r) in printed for r in runs)
    hashes = {str(r): [e["content_hash"] for e in json.loads((r / "run.json").read_text())["epochs"]] for r in runs}
    assert len({h[0] for h in hashes.values()}) == 1  # the same base model
    assert len({h[1] for h in hashes.values()}) == 4  # four different trainings
    assert main(["dynamics", *map(str, runs[:2]), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["across_runs"]
    recall = [r for r in table if r["quantity"] == "mean_recall"]
    assert [r["epoch"] for r in recall] == [0, 1] and all(r["n"] == 2 for r in recall)
    # epoch 0 is the same base model in both runs; 2 runs are too few for an interval, and the table says so
    assert recall[0]["lo"] is None and recall[0]["hi"] is None and "too few" in recall[0]["interval"]
    assert main(["dynamics", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "mean_recall" in out

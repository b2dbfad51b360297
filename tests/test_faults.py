"""Faults while writing results: SIGKILL mid-`extract` and mid-`cpt` then resume (identical results), two
concurrent extracts into one folder, a full disk, and results that must never be replaced silently."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from circuitdyn.cli import main
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.selection import Selection
from circuitdyn.errors import CircuitdynError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two probe files of the tiny tokenizer's entities: A (colour questions) and B (city questions)."""
    from circuitdyn.testing import TINY_PROBES

    root = tmp_path_factory.mktemp("fault-probes")
    a, b = root / "a.jsonl", root / "b.jsonl"
    a.write_text("".join(json.dumps(p) + "\n" for p in TINY_PROBES if p["id"].endswith("colour")))
    b.write_text("".join(json.dumps(p) + "\n" for p in TINY_PROBES if p["id"].endswith("city")))
    return a, b


def _extract_argv(run: Path, probes: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        str(run),
        "--probes",
        str(probes),
        "--out",
        str(out),
        "--method",
        "eap-ig",
        "--steps",
        "2",
        "--top-n",
        "50",
        "--no-progress",
        *extra,
    ]


def _cli_process(argv: list[str], cache: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CIRCUITDYN_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from circuitdyn.cli import main; sys.exit(main())", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _files(folder: Path) -> dict[str, CircuitSet]:
    return {p.name: CircuitSet.load(p) for p in sorted(folder.glob("*.safetensors"))}


def _same(a: dict[str, CircuitSet], b: dict[str, CircuitSet]) -> None:
    assert sorted(a) == sorted(b)
    for name, cs in a.items():
        assert torch.equal(cs.scores, b[name].scores), name
        assert cs.meta == b[name].meta and cs.fact_ids == b[name].fact_ids, name


def _leftovers(folder: Path) -> list[Path]:
    """Temporary files of an interrupted write (a lock file is not one: it is empty and reused)."""
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


@pytest.fixture(scope="module")
def reference(llama_run: Path, probes: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted extraction of probe file A on every epoch of the tiny run."""
    out = tmp_path_factory.mktemp("reference") / "circuits"
    assert main(_extract_argv(llama_run, probes[0], out)) == 0
    assert len(list(out.glob("*.safetensors"))) == 3
    return out


def test_sigkill_mid_extract_then_resume_is_identical(llama_run, probes, reference, tmp_path, capsys):
    out = tmp_path / "circuits"
    proc = _cli_process(_extract_argv(llama_run, probes[0], out), tmp_path / "cache")
    deadline = time.monotonic() + 120
    while not list(out.glob("epoch_0.*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(out.glob("*.safetensors"))
    assert proc.returncode == -signal.SIGKILL and 1 <= len(done) < 3, proc.stdout.read()
    assert main(_extract_argv(llama_run, probes[0], out)) == 0
    text = capsys.readouterr().out
    assert text.count("(cached)") == len(done) and text.count("(written)") == 3 - len(done)
    _same(_files(out), _files(reference))
    assert not _leftovers(out)


def test_two_concurrent_extracts_into_one_folder(llama_run, probes, reference, tmp_path):
    """Both finish (exit 0); each circuit file is computed once (the second process waits on its lock, then
    reuses it) and equals the uninterrupted run's; a reader polling the folder meanwhile never sees half a file."""
    out = tmp_path / "circuits"
    procs = [_cli_process(_extract_argv(llama_run, probes[0], out), tmp_path / f"cache{i}") for i in range(2)]
    loads = 0
    while any(p.poll() is None for p in procs):
        for f in out.glob("*.safetensors"):
            CircuitSet.load(f)  # raises on a half-written file
            loads += 1
        time.sleep(0.01)
    logs = [p.stdout.read() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum(log.count("(written)") for log in logs) == 3 and sum(log.count("(cached)") for log in logs) == 3, logs
    _same(_files(out), _files(reference))
    assert not _leftovers(out) and loads > 0


def test_sigkill_mid_cpt_then_resume_is_identical(tmp_path, tokenizer_dir):
    from conftest import save_tiny_model

    base = save_tiny_model(tmp_path / "base", "llama", tokenizer_dir, seed=0)
    script = (
        "import sys; from circuitdyn.training.cpt import CPTConfig, run_cpt\n"
        f"cfg = CPTConfig(base_model={str(base)!r}, entities=['Russia', 'Patna'], epochs=3, lr=1e-2, batch_size=2, "
        "max_new_tokens=4, n_math=2, n_reasoning=2, max_length=64, device='cpu')\n"
        "run_cpt(cfg, sys.argv[1], progress=False, log=None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def cpt(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", script, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    reference = cpt(whole)
    proc = cpt(killed)
    deadline = time.monotonic() + 300
    while not (killed / "epoch_1").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "epoch_3").exists(), proc.stdout.read()
    resumed = cpt(killed)
    assert resumed.wait() == 0 and reference.wait() == 0, (resumed.stdout.read(), reference.stdout.read())
    hashes = [[e["content_hash"] for e in json.loads((d / "run.json").read_text())["epochs"]] for d in (killed, whole)]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 4
    for e in range(4):
        assert (killed / f"epoch_{e}" / "probe_results.jsonl").read_text() == (
            whole / f"epoch_{e}" / "probe_results.jsonl"
        ).read_text()
    assert not _leftovers(killed)


def test_second_cpt_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    from circuitdyn.io import file_lock
    from circuitdyn.training.cpt import CPTConfig, run_cpt

    out = tmp_path / "run"
    with file_lock(out), pytest.raises(CircuitdynError, match=r"another circuitdyn process is writing a CPT run"):
        run_cpt(CPTConfig(), out, progress=False, log=None)  # the lock is held as a running `cpt` holds it


def test_full_disk_keeps_finished_epochs_and_says_so(llama_run, probes, reference, tmp_path, capsys, monkeypatch):
    """The disk fills while epoch 1 is written: exit 2 with one line naming the file and the OS error, epoch 0's
    file is kept, no temporary file is left; once there is room, a re-run computes only what is missing."""
    from circuitdyn import io

    out = tmp_path / "circuits"
    real_fsync, calls = io._fsync, []

    def fsync(path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(path)

    monkeypatch.setattr(io, "_fsync", fsync)
    assert main(_extract_argv(llama_run, probes[0], out)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "No space left on device" in err and "kept" in err and "epoch_1." in err
    assert [p.name.split(".")[0] for p in out.glob("*.safetensors")] == ["epoch_0"] and not _leftovers(out)
    monkeypatch.setattr(io, "_fsync", real_fsync)
    assert main(_extract_argv(llama_run, probes[0], out)) == 0
    text = capsys.readouterr().out
    assert text.count("(cached)") == 1 and text.count("(written)") == 2
    _same(_files(out), _files(reference))


def test_os_error_anywhere_is_one_line(monkeypatch, capsys, llama_run):
    """An OS error met where no file is named (here: the disk fails while reading a config) is one line too."""
    from circuitdyn.runs import checkpoints

    def broken(_path):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(llama_run / "epoch_0" / "config.json"))

    monkeypatch.setattr(checkpoints, "_read_config", broken)
    assert main(["info", str(llama_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Input/output error" in err and "config.json" in err and "Traceback" not in err


def test_other_facts_live_side_by_side_and_other_checkpoints_are_not_replaced(llama_run, probes, tmp_path, capsys):
    """The silent overwrite of issue 15: probe files A then B into one folder keep both; a file of another
    checkpoint under the same name is refused unless --overwrite."""
    out = tmp_path / "circuits"
    assert main(_extract_argv(f"{llama_run}:0", probes[0], out)) == 0
    first = _files(out)
    assert main(_extract_argv(f"{llama_run}:0", probes[1], out)) == 0
    both = _files(out)
    assert len(both) == 2 and set(first) < set(both)
    _same({k: both[k] for k in first}, first)
    capsys.readouterr()
    assert main(_extract_argv(f"{llama_run}:1", probes[0], out)) == 0
    name = next(iter(set(_files(out)) - set(both)))
    (out / name).rename(out / name.replace("epoch_1", "epoch_0"))  # epoch 1's circuits under epoch 0's name
    stale = out / name.replace("epoch_1", "epoch_0")
    kept = stale.read_bytes()
    assert main(_extract_argv(f"{llama_run}:0", probes[0], out)) == 2
    err = capsys.readouterr().err
    assert str(stale) in err and "another checkpoint" in err and "--overwrite" in err
    assert stale.read_bytes() == kept
    assert main(_extract_argv(f"{llama_run}:0", probes[0], out, "--overwrite")) == 0
    _same({stale.name: CircuitSet.load(stale)}, {stale.name: first[stale.name]})


def test_viewer_replaces_only_a_viewer(tmp_path):
    """A viewer is regenerated over an earlier circuitdyn viewer; any other file at --out needs --overwrite."""
    from circuitdyn.engine.graph import Graph
    from circuitdyn.viz import write_circuit_html

    g = Graph(2, 2)
    cs = CircuitSet(torch.randn(2, g.n_edges), g.edges, ["a", "b"], {"method": "eap"})
    page = write_circuit_html(cs, tmp_path / "v.html")
    write_circuit_html(cs, page)  # its own earlier viewer: replaced
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my page</html>")
    with pytest.raises(CircuitdynError, match="not a circuitdyn viewer"):
        write_circuit_html(cs, mine)
    assert mine.read_text() == "<html>my page</html>"
    write_circuit_html(cs, mine, overwrite=True)
    assert "circuitdyn-data" in mine.read_text()


def test_transfer_cache_of_another_table_is_kept(tmp_path):
    """Two transfer tables (other selections) cached under one name live side by side, each reused."""
    from circuitdyn.analysis.transfer import transfer_matrix
    from circuitdyn.engine.graph import Graph

    g = Graph(2, 2)
    torch.manual_seed(0)
    circuits = {
        e: CircuitSet(torch.randn(2, g.n_edges), g.edges, ["a", "b"], {"method": "eap", "epoch": e}) for e in range(2)
    }
    calls = []

    def evaluate(model_epoch, cs, masks):
        calls.append(model_epoch)
        return masks.float().mean(1)

    cache = tmp_path / "transfer.json"
    t5 = transfer_matrix(circuits, evaluate, Selection.parse("top:5"), cache=cache)
    t9 = transfer_matrix(circuits, evaluate, Selection.parse("top:9"), cache=cache)
    assert len(list(tmp_path.glob("transfer*.json"))) == 2 and len(calls) == 8
    assert transfer_matrix(circuits, evaluate, Selection.parse("top:5"), cache=cache).equals(t5)
    assert transfer_matrix(circuits, evaluate, Selection.parse("top:9"), cache=cache).equals(t9)
    assert len(calls) == 8  # both reused


def test_stray_epoch_folders_are_warned_of(llama_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    for name in ("epoch_x", "epoch_-1"):
        shutil.copytree(llama_run / "epoch_0", run / name)
    assert main(["info", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {run / 'epoch_x'}: ignored" in err and f"warning: {run / 'epoch_-1'}: ignored" in err
    (run / "run.json").unlink()  # discovery without a manifest warns the same
    import warnings

    from circuitdyn import messages
    from circuitdyn.runs.checkpoints import open_run

    messages.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # like PYTHONWARNINGS=ignore: user-facing notices are not Python warnings
        assert open_run(run).epochs == [0, 1, 2]
        assert open_run(run).epochs == [0, 1, 2]
    err = capsys.readouterr().err
    for name in ("epoch_x", "epoch_-1"):  # once each, though the run was opened twice
        assert err.count(f"circuitdyn: warning: {run / name}: ignored") == 1


def test_answer_outside_the_vocabulary_is_refused(tmp_path):
    """An answer the tokenizer can only write as <unk> would be scored as <unk>: refused, naming fact and file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from circuitdyn.probes.facts import load_facts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = "Answer the following question using as few words as possible. Where does Tom Hanks live? Paris Rome"
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    probes = tmp_path / "p.jsonl"
    probes.write_text(
        json.dumps(
            {"id": "th/city", "entity": "Tom Hanks", "question": "Where does Tom Hanks live?", "answer": "Москва"}
        )
        + "\n"
    )
    with pytest.raises(CircuitdynError, match=rf"{probes}: probe 'th/city': the answer 'Москва' .*<unk>"):
        load_facts(probes, fast, template="plain")


def test_results_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temp file, but the result is readable as any file written there."""
    import os

    from circuitdyn.io import atomic_dir, write_text_atomic

    mask = os.umask(0o022)
    try:
        f = write_text_atomic(tmp_path / "r.json", "{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(mask)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755

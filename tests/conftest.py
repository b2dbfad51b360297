"""Shared fixtures: tiny random checkpoints and a small tokenizer, built inside the tests (no hub)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from circuitdyn.testing import tiny_hf_model, tiny_run, tiny_tl_model, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny models are dominated by per-op overhead, which a second thread only adds to (and on a loaded 2-core
# machine threads fight); the integration tests on SmolLM2 get the machine's threads back.
TORCH_THREADS = torch.get_num_threads()
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_for_integration_tests(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("integration"):
        torch.set_num_threads(TORCH_THREADS)
        yield
        torch.set_num_threads(1)
    else:
        yield


REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
"""Fixtures the tests read (the paper's released results); probe sets come from the package."""


# --- the suite never writes into the repository: `git status` before and after the session must agree ---
_CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info")


def _git_status() -> dict[str, str] | None:
    """Every path `git status` reports in the checkout (changed, untracked, and ignored entries other than
    Python's and pytest's caches), mapped to its status and, for files, a digest of the content; None when git
    is missing or the tests do not run from a git checkout (an sdist, an unpacked wheel)."""
    import hashlib
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None:
        return None

    def porcelain(*extra: str) -> list[str] | None:
        try:
            done = subprocess.run(
                [git, "-C", str(REPO), "status", "--porcelain=v1", "-z", *extra],
                capture_output=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.decode("utf-8", "surrogateescape").split("\0") if done.returncode == 0 else None

    try:
        top = subprocess.run(
            [git, "-C", str(REPO), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO:
        return None
    changed = porcelain("--untracked-files=all")
    ignored = porcelain("--ignored=traditional", "--untracked-files=normal")
    if changed is None or ignored is None:
        return None
    entries: list[tuple[str, str]] = []
    fields = iter(changed)
    for entry in fields:
        if entry:
            entries.append((entry[:2], entry[3:]))
            if entry[0] in "RC":
                next(fields, None)  # a rename's or copy's source path, given as a field of its own
    entries += [(e[:2], e[3:]) for e in ignored if e.startswith("!! ")]
    out: dict[str, str] = {}
    for status, path in entries:
        if any(part in _CACHES or part.endswith(".egg-info") or part.endswith(".pyc") for part in Path(path).parts):
            continue
        file = REPO / path
        digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else ""
        out[path] = f"{status} {digest}"
    return out


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # once per run (the controller under pytest-xdist)
        session.config.stash[_GIT_BEFORE] = _git_status()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_GIT_BEFORE, None)
    if before is None:
        return
    after = _git_status()
    if after is None:
        return
    written = sorted(p for p in after if after[p] != before.get(p))
    gone = sorted(p for p in before if p not in after)
    if written or gone:
        lines = [f"the test session changed the repository ({REPO}); tests must write under tmp_path:"]
        lines += [f"  {after[p][:2]} {p}" for p in written]
        lines += [f"  gone {p}" for p in gone]
        session.config.stash[_GIT_CHANGES] = lines
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_GIT_CHANGES, None)
    if lines:
        terminalreporter.section("repository changed", sep="!", red=True, bold=True)
        for line in lines:
            terminalreporter.write_line(line, red=True)


_GIT_BEFORE = pytest.StashKey["dict[str, str] | None"]()
_GIT_CHANGES = pytest.StashKey["list[str]"]()


def load_script(path: Path, name: str | None = None) -> types.ModuleType:
    """A script of the repository (a benchmark, an example, the tutorial runner) imported as a module, registered
    in sys.modules under `name` (default: the file's stem) so that its dataclasses resolve."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def save_tiny_model(out_dir: Path, arch: str, tokenizer_dir: Path, seed: int) -> Path:
    """Save a randomly initialised tiny model (+ tokenizer files) as an HF folder."""
    import shutil

    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    tiny_hf_model(vocab, seed, arch).save_pretrained(out_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def make_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[..., Path]:
    """Factory: a run folder of `n_epochs + 1` tiny random checkpoints (epoch_0 ... epoch_N) with run.json."""

    def make(arch: str = "llama", n_epochs: int = 2, manifest: bool = True, name: str | None = None) -> Path:
        from circuitdyn.runs.checkpoints import write_manifest

        root = tmp_path_factory.mktemp(name or f"run-{arch}")
        for e in range(n_epochs + 1):
            save_tiny_model(root / f"epoch_{e}", arch, tokenizer_dir, seed=e)
        if manifest:
            write_manifest(
                root,
                base_model=f"tiny-{arch}",
                epochs=[
                    {"epoch": e, "path": f"epoch_{e}", "step": 10 * e, "train_loss": None if e == 0 else 3.0 / e}
                    for e in range(n_epochs + 1)
                ],
            )
        return root

    return make


@pytest.fixture(scope="session")
def llama_run(make_run: Callable[..., Path]) -> Path:
    return make_run("llama", 2)


@pytest.fixture(scope="session")
def gpt2_run(make_run: Callable[..., Path]) -> Path:
    return make_run("gpt2", 1)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real embedded default model (integration tests only)."""
    from circuitdyn.runs.gguf import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_tl(request):
    """Each tiny attribution model in turn (session-scoped: do not modify its weights)."""
    return tiny_tl_model(request.param)


@pytest.fixture(scope="session")
def trained_pair_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    """A run whose epoch 0 and epoch 1 are tiny Llamas trained from different random inits until both recall
    the same six facts (three entities, two parallel questions each); returns (run folder, probe file)."""
    return tiny_run(tmp_path_factory.mktemp("trained-pair"), n_epochs=1, tokenizer_dir=tokenizer_dir)

"""Execute every tutorial in docs/tutorials/ top to bottom; exit non-zero on the first error.

    python docs/run_tutorials.py [NAME ...]     # e.g. 01_quickstart; default: all of them
    python docs/run_tutorials.py --keep DIR     # also write the executed notebooks (.ipynb) to DIR

Each tutorial (a jupytext percent-format `.py` file) is converted to a notebook with jupytext and executed with
nbclient on a kernel of this very Python, in a fresh temporary working directory; when jupytext, nbclient or
ipykernel are missing (the `docs` extra is not installed) it is run as a plain script there instead. Nothing is
written into the repository: the tutorials write their toy runs under the temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TUTORIALS = HERE / "tutorials"
REPO = HERE.parent
TIMEOUT = 600
"""Seconds a cell (or, run as a script, a whole tutorial) may take before the run fails."""


def tutorials(names: list[str]) -> list[Path]:
    found = sorted(p for p in TUTORIALS.glob("[0-9]*.py"))
    if names:
        found = [p for p in found if p.stem in names or p.name in names]
        if not found:
            raise SystemExit(f"run_tutorials: no tutorial named {names} in {TUTORIALS}")
    return found


def environment(work: Path) -> dict[str, str]:
    """The tutorials' environment: offline, one thread, temporary files under `work`, the tutorials' folder and
    the repository (the package, `examples/`) on the path."""
    env = dict(os.environ)
    path = [str(TUTORIALS), str(REPO), env.get("PYTHONPATH", "")]
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in path if p),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        MPLBACKEND="Agg",
        TMPDIR=str(work),
        HOME=env.get("HOME", str(work)),
        JUPYTER_PATH=str(work / "jupyter"),
        JUPYTER_RUNTIME_DIR=str(work / "runtime"),
        IPYTHONDIR=str(work / "ipython"),
    )
    return env


def kernel_spec(work: Path) -> str:
    """A kernel spec for this interpreter under `work` (never a python3 kernel found elsewhere on the machine)."""
    name = "circuitdyn-docs"
    spec = work / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "circuitdyn docs",
                "language": "python",
            }
        )
    )
    return name


def run_notebook(path: Path, work: Path, keep: Path | None = None) -> None:
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    env = environment(work)
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            nb, timeout=TIMEOUT, kernel_name=kernel_spec(work), resources={"metadata": {"path": str(work)}}
        )
        client.execute()
        if keep is not None:
            import nbformat

            keep.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, keep / f"{path.stem}.ipynb")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_script(path: Path, work: Path, keep: Path | None = None) -> None:
    subprocess.run([sys.executable, str(path)], cwd=work, env=environment(work), check=True, timeout=TIMEOUT)


def notebook_tools() -> bool:
    try:
        import ipykernel  # noqa: F401
        import jupytext  # noqa: F401
        import nbclient  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv)
    keep = None
    if "--keep" in names:
        i = names.index("--keep")
        keep = Path(names[i + 1]).resolve()
        del names[i : i + 2]
    notebooks = notebook_tools()
    if not notebooks:
        print(
            "run_tutorials: jupytext/nbclient/ipykernel missing (pip install -e '.[docs]'); running the "
            "tutorials as plain scripts",
            file=sys.stderr,
        )
    failed = []
    for path in tutorials(names):
        work = Path(tempfile.mkdtemp(prefix=f"circuitdyn-{path.stem}-"))
        start = time.perf_counter()
        try:
            (run_notebook if notebooks else run_script)(path, work, keep)
        except Exception as exc:  # a cell's error (nbclient.exceptions.CellExecutionError) or the script's
            failed.append(path.name)
            print(f"FAILED {path.name} ({time.perf_counter() - start:.0f} s):\n{exc}", file=sys.stderr)
        else:
            print(f"ok {path.name} ({time.perf_counter() - start:.0f} s, {'notebook' if notebooks else 'script'})")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"tutorials: {len(tutorials(names)) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

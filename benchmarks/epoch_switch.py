"""Switching a loaded HookedTransformer to another epoch: weight swap vs. reading the file vs. rebuilding.

Builds a two-epoch run of the embedded SmolLM2-135M-Instruct (epoch_1 = epoch_0 plus small noise) in a
temporary folder, then times, side by side and with the files in the page cache:
- read:    reading the epoch's safetensors file into tensors (`safetensors.torch.load(path.read_bytes())`);
- switch:  `run.load_model(epoch)` on a run whose model is already built (weights copied in place);
- rebuild: a fresh `open_run(...).load_model(epoch)` (a new HookedTransformer).
Last line: `switch_over_read=X rebuild_over_switch=Y`. Target: switch_over_read <= 1.5.

    .venv/bin/python benchmarks/epoch_switch.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save_file

from circuitdyn.runs.checkpoints import open_run, write_manifest
from circuitdyn.runs.gguf import default_model_dir


def make_run(root: Path) -> Path:
    base = default_model_dir()
    (root / "epoch_0").symlink_to(base)
    (root / "epoch_1").mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (root / "epoch_1" / f.name).symlink_to(f)
    torch.manual_seed(0)
    state = {k: v + 1e-3 * torch.randn_like(v) for k, v in load_file(base / "model.safetensors").items()}
    save_file(state, root / "epoch_1" / "model.safetensors", metadata={"format": "pt"})
    write_manifest(root, "SmolLM2-135M-Instruct", [{"epoch": e, "path": f"epoch_{e}"} for e in (0, 1)])
    return root


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_run(Path(tmp))
        run = open_run(root)
        run.load_model(0)
        files = {e: run.checkpoint(e).weight_files[0] for e in run.epochs}
        reads, switches, rebuilds = [], [], []
        for i in range(args.repeats):
            epoch = 1 - i % 2
            reads.append(timed(lambda e=epoch: load(files[e].read_bytes())))
            switches.append(timed(lambda e=epoch: run.load_model(e)))
            rebuilds.append(timed(lambda e=epoch: open_run(root).load_model(e)))
        read, switch, rebuild = (statistics.median(x) for x in (reads, switches, rebuilds))
        size = files[0].stat().st_size / 2**20
        print(
            f"weights {size:.0f} MiB; median of {args.repeats}: read {read:.3f}s  switch {switch:.3f}s  "
            f"rebuild {rebuild:.3f}s"
        )
        print(f"switch_over_read={switch / read:.2f} rebuild_over_switch={rebuild / switch:.1f}")


if __name__ == "__main__":
    main()

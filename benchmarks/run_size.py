"""Disk size of a CPT run stored as adapters vs. as merged models, from one real epoch of the demo's settings.

Runs epoch 0 and one LoRA epoch of `circuitdyn cpt` on the embedded SmolLM2-135M-Instruct with the demo's
settings (4 seed entities, lr 1e-3, r=32 on q/v + trained embeddings) twice in a temporary folder, once with
`save="adapter"` (the default) and once with `save="merged"`, measures each epoch folder's model bytes, and
projects both to the demo's run (epoch 0 + `--epochs` epochs; the trainer state is kept for the last epoch
only). Last line: `adapter_over_merged=X projected_adapter_bytes=A projected_merged_bytes=M`. Target: the
projected adapter run < 1.2e9 bytes. The two runs' probe results must be identical.

    .venv/bin/python benchmarks/run_size.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from circuitdyn.training.cpt import STATE_DIR, CPTConfig, run_cpt


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="epochs of the projected run (the demo's: 5)")
    args = p.parse_args()
    torch.set_num_threads(1)
    sizes: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="circuitdyn-size-") as tmp:
        for save in ("adapter", "merged"):
            out = Path(tmp) / save
            run_cpt(CPTConfig(n_entities=4, epochs=1, lr=1e-3, device="cpu", save=save), out, progress=False, log=None)
            state = folder_bytes(out / "epoch_1" / STATE_DIR)
            sizes[save] = {
                "epoch_0": folder_bytes(out / "epoch_0"),
                "epoch": folder_bytes(out / "epoch_1") - state,
                "state": state,
            }
            print(
                f"{save}: epoch_0 {sizes[save]['epoch_0']} B, epoch_1 {sizes[save]['epoch']} B "
                f"(+ trainer state {state} B)"
            )
        same = all(
            (Path(tmp) / "adapter" / f"epoch_{e}" / "probe_results.jsonl").read_text()
            == (Path(tmp) / "merged" / f"epoch_{e}" / "probe_results.jsonl").read_text()
            for e in (0, 1)
        )
    projected = {s: v["epoch_0"] + args.epochs * v["epoch"] + v["state"] for s, v in sizes.items()}
    print(f"identical_probe_results={same}")
    print(
        f"adapter_over_merged={projected['adapter'] / projected['merged']:.3f} "
        f"projected_adapter_bytes={projected['adapter']} projected_merged_bytes={projected['merged']}"
    )


if __name__ == "__main__":
    main()

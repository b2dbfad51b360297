"""Resources of an attribution: how many facts one batch can hold in a memory budget, and CPU threads.

`fact_batch_for_memory` is the memory model of `circuitdyn.engine.attribution`'s engine: a fixed part (the model's
weights and per-layer working copies) plus, per fact of a pass, the activation differences and gradient sums
it keeps across IG steps and one IG step's autograd state. Its constants were measured on SmolLM2-135M (peak
memory per additional fact at batch 1 to 8, one pass) and are expressed per layer, position and d_model /
d_mlp, so they carry over to other shapes of the same architecture family (an upper bound for bf16 models,
whose autograd state is counted in float32). The facts it returns are what one pass (`attribute_batch`'s
`pass_facts`) may hold; facts beyond a pass add only their scores (4 bytes per edge). A batch that runs out
of memory anyway is halved and retried (`OOMBackoff`), which says so once.

Threads: on a CPU, torch defaults to one thread per physical core. On a shared machine that can be much
slower than fewer threads (measured on a shared 2-core machine: two threads were 3-12x slower than one
while another job ran), hence `num_threads` / `--threads`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from circuitdyn.errors import CircuitdynError

T = TypeVar("T")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

AUTOGRAD_RESIDUAL = 20
"""One IG step's autograd state and captures, in float32 d_model-sized vectors per layer and position
(fitted: SmolLM2-135M at 63 positions peaks 178 MiB higher per fact, batch 1 to 8, CPU)."""
AUTOGRAD_MLP = 5
"""... and in d_mlp-sized vectors per layer and position (gate, input, activation, product, their grads)."""
WORKSPACE = 1280 * 2**20
"""Bytes for everything else: the torch runtime, allocator slack, the contraction's chunks (measured on a CPU:
SmolLM2-135M's process peaks at 2.5 GiB for one fact, of which the weights and their per-layer copies are
about 1 GiB)."""


def parse_memory(value: float | str) -> int:
    """Bytes of a memory size: a number of bytes, or text like "8GiB", "500MB", "12G" (G = 10^9, GiB = 2^30)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match[2].lower() if match else None
        if not match or unit not in _UNITS:
            raise CircuitdynError(f"memory size {value!r} is not a number of bytes or a size like 8GiB, 500MB")
        size = float(match[1]) * _UNITS[unit]
    if not size > 0:
        raise CircuitdynError(f"memory size must be > 0, got {value!r}")
    return int(size)


def _cfg(model_or_cfg: Any) -> Any:
    return getattr(model_or_cfg, "cfg", model_or_cfg)


def _itemsize(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)  # type: ignore[assignment]
    if not isinstance(dtype, torch.dtype):
        raise CircuitdynError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_fact(model_or_cfg: Any, n_positions: int, dtype: str | torch.dtype = "float32", steps: int = 5) -> int:
    """Peak bytes one more fact adds to an attribution batch of `n_positions` positions.

    `dtype` is the buffer dtype of the activation differences and per-step x_hat (`buffer_dtype`); sums and
    the IG step's autograd state are counted in float32 (an upper bound for a bf16/fp16 model).
    """
    cfg = _cfg(model_or_cfg)
    L, D, H = int(cfg.n_layers), int(cfg.d_model), int(cfg.n_heads)
    dh = int(cfg.d_head)
    d_mlp = 0 if getattr(cfg, "attn_only", False) else int(cfg.d_mlp or 4 * D)
    b = _itemsize(dtype)
    flush = max(1, 3 * H * D // (D + 3 * H))
    rank_one = min(int(steps), flush) * (D * b + 3 * H * 4) if steps <= flush else 3 * H * D * 4
    kept = L * ((H * dh + D) * b + 3 * H * dh * 4 + D * 4 + rank_one) + 4 * D * 4
    step = L * (AUTOGRAD_RESIDUAL * D + AUTOGRAD_MLP * d_mlp) * 4
    return int(n_positions) * (kept + step)


def fixed_bytes(model_or_cfg: Any) -> int:
    """Bytes an attribution needs whatever its batch: the model's weights (in their dtype) twice (the engine's
    per-layer copies, `forward.layer_weights`) and `WORKSPACE`."""
    model = model_or_cfg if hasattr(model_or_cfg, "parameters") else None
    if model is not None:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        cfg = _cfg(model_or_cfg)
        n = int(cfg.n_params) + 2 * int(cfg.d_vocab) * int(cfg.d_model)
        weights = n * _itemsize(getattr(cfg, "dtype", "float32"))
    return 2 * weights + WORKSPACE


def fact_batch_for_memory(
    model_or_cfg: Any, n_positions: int, dtype: str | torch.dtype, budget_bytes: int, steps: int = 5
) -> int:
    """The largest fact batch whose attribution fits `budget_bytes` (weights included), by the memory model
    above, for facts of up to `n_positions` positions; a CircuitdynError when not even one fact fits."""
    per_fact = bytes_per_fact(model_or_cfg, n_positions, dtype, steps)
    free = int(budget_bytes) - fixed_bytes(model_or_cfg)
    if free < per_fact:
        need = (fixed_bytes(model_or_cfg) + per_fact) / 2**30
        raise CircuitdynError(
            f"max memory {budget_bytes / 2**30:.2f} GiB is too small: one fact of {n_positions} "
            f"positions needs about {need:.2f} GiB with this model"
        )
    return max(1, free // per_fact)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception is a device or host allocator running out of memory."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and (
        isinstance(err, MemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
        or "failed to allocate" in text
    )


class OOMBackoff:
    """Run a batch; on an out-of-memory error halve the batch size (down to 1) and report it once."""

    def __init__(self, size: int, stream: Any = None) -> None:
        self.size = int(size)
        self.stream = stream
        self.halvings = 0

    def run(self, fn: Callable[[], T]) -> T | None:
        """`fn()`, or None after halving `size` when it ran out of memory (then retry with `size` facts)."""
        try:
            return fn()
        except Exception as err:
            if not is_out_of_memory(err) or self.size <= 1:
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.size = max(1, self.size // 2)
        self.halvings += 1
        if self.halvings == 1:
            print(
                f"circuitdyn: out of memory; halving the fact batch (now {self.size}) and retrying",
                file=self.stream or sys.stderr,
            )
        return None


def default_threads() -> int:
    """CPU threads by default: the number of physical cores (logical CPUs available when that is unknown)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores or available, available))


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[int]:
    """Run torch's CPU ops with `num_threads` threads, restored afterwards; None keeps torch's setting (by
    default one thread per physical core, like `default_threads`)."""
    n = torch.get_num_threads() if num_threads is None else int(num_threads)
    if n < 1:
        raise CircuitdynError(f"threads must be >= 1, got {num_threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)

"""Running independent jobs as tasks on a Ray cluster: connect, request resources, retry, report failures.

circuitdyn's big grids (circuits for facts x epochs, CPT runs for seeds x strategies) are many independent
jobs. `run_tasks` runs them as Ray tasks: each requests one CPU, or `num_gpus` when the cluster has GPUs; a
worker that dies (killed, out of memory) is retried by Ray up to `max_retries` times; an exception raised by
the job itself is not retried (it would fail again). Every task runs to its end before a failure is raised,
so that what did finish is on disk for the next run to reuse; the error names the task that failed.

Ray is an optional dependency (`pip install circuitdyn[ray]`), imported only here and only when used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from circuitdyn.errors import CircuitdynError

LOCAL = "auto"
"""`ray="auto"` starts a local Ray cluster on this machine (`ray.init()`); any other value is the address of
an existing cluster to join (`ray.init(address=...)`, e.g. `ray://head:10001` or `head:6379`)."""


@dataclass(frozen=True)
class Task:
    """One job: `fn(*args)` run on a worker. `label` names it in progress and errors (what and which part)."""

    label: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = field(default=())


def import_ray() -> Any:
    """The `ray` module, or a CircuitdynError saying what to install."""
    try:
        import ray
    except ImportError:
        raise CircuitdynError(
            "--ray needs Ray, which is not installed: pip install 'circuitdyn[ray]' (or pip install 'ray>=2.9')"
        ) from None
    return ray


@contextlib.contextmanager
def connected(address: str = LOCAL) -> Iterator[Any]:
    """The `ray` module, connected: to the cluster this process already joined, else to `address` (`LOCAL`
    starts one on this machine). A cluster started here is shut down when the block ends."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        if address == LOCAL:
            ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
        else:
            ray.init(address=address, logging_level="warning", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:  # what Ray raises for an address it cannot join
        raise CircuitdynError(f"--ray {address}: cannot start or join a Ray cluster ({err})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_gpus(ray: Any) -> float:
    """The GPUs of the connected cluster (0 on a CPU-only cluster)."""
    return float(ray.cluster_resources().get("GPU", 0))


def task_slots(ray: Any, num_gpus: float) -> int:
    """How many tasks the connected cluster runs at once: its GPUs / `num_gpus` per task, else its CPUs."""
    res = ray.cluster_resources()
    if num_gpus > 0:
        return max(1, int(res.get("GPU", 0) // num_gpus))
    return max(1, int(res.get("CPU", 1)))


def run_tasks(
    ray: Any,
    tasks: Sequence[Task],
    *,
    num_gpus: float = 0,
    max_retries: int = 3,
    progress: bool = False,
    desc: str = "tasks",
) -> list[Any]:
    """The results of `tasks` (in order), run as Ray tasks on the connected cluster.

    Each task gets 1 CPU and `num_gpus` GPUs. A worker that dies is retried up to `max_retries` times; an
    exception raised by the task is not retried. When a task fails for good, the others still run to their end,
    then a CircuitdynError names the failed task (and how many failed) with its cause.
    """
    from circuitdyn.progress import progress_bar

    remote = {}
    refs = []
    for task in tasks:
        if task.fn not in remote:
            remote[task.fn] = ray.remote(task.fn)
        opts = {
            "num_cpus": 1,
            "num_gpus": num_gpus,
            "max_retries": max_retries,
            "retry_exceptions": False,
            "name": task.fn.__name__,
        }
        refs.append(remote[task.fn].options(**opts).remote(*task.args))
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(tasks)
    failed: list[tuple[int, BaseException]] = []
    pending = list(refs)
    with progress_bar(total=len(refs), desc=desc, unit="task", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    results[index[ref]] = ray.get(ref)
                except ray.exceptions.RayError as err:  # RayTaskError (the task raised), WorkerCrashedError...
                    failed.append((index[ref], err))
                bar.update(1)
    if failed:
        i, first = min(failed, key=lambda f: f[0])
        more = f" ({len(failed)} of {len(tasks)} tasks failed)" if len(failed) > 1 else ""
        raise CircuitdynError(f"{tasks[i].label} failed{more}: {_cause(ray, first, max_retries)}") from None
    return results


def _cause(ray: Any, err: BaseException, max_retries: int) -> str:
    """One line on why a task failed: the task's own error message, or the worker's death after its retries."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
        return (
            str(cause).strip().splitlines()[-1]
            if isinstance(cause, CircuitdynError)
            else (f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}")
        )
    if isinstance(err, ray.exceptions.RayError):
        return (
            f"its worker died on each of its {max_retries + 1} attempt(s) (killed, or out of memory): "
            f"{type(err).__name__}"
        )
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"

"""The values every stage passes on, each one frozen object instead of a loose list of keywords.

- `AttributionSettings`: what a circuit *is* (method, IG steps and grid, metric, corruption seed, noise scale).
  It is what a circuit file records (`to_meta`) and what "the same settings" compares (`circuits.SETTINGS`).
  `DEFAULT_SETTINGS` are circuitdyn's defaults, `PAPER_SETTINGS` the values of the paper's protocol
  (arXiv 2601.03858: EAP-IG, 30 steps on hannamw/EAP-IG's left grid, logit difference).
- `Compute`: how attribution runs (batch, memory budget, threads, Ray); no field changes a score.
- `Storage`: what an extraction writes beside the scores (precision, sparsity, recorded faithfulness).
- `Comparison`: how circuits are compared (selection rule, method-noise replicates, timeline extras).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from circuitdyn.engine.forward import NOISE_SCALE, Metric, metric_name
from circuitdyn.engine.selection import DEFAULT_SELECTION, Selection
from circuitdyn.errors import CircuitdynError

Method = Literal["eap", "eap-ig", "relp"]
METHODS = ("eap", "eap-ig", "relp")
ONE_STEP_METHODS = ("eap", "relp")
"""Methods taking one gradient at the clean end (no interpolation: 1 step, the `right` grid recorded)."""
IGGrid = Literal["right", "left", "midpoint", "gauss", "shifted"]
IG_GRIDS = ("right", "left", "midpoint", "gauss", "shifted")
DEFAULT_IG_GRID: IGGrid = "midpoint"
DEFAULT_IG_STEPS = 3
"""The default IG rule and steps: the cheapest that keeps the discretisation error (distance to a 64-step
reference) within a tenth of method noise for the median fact (`benchmarks/scaling.py` on SmolLM2: midpoint
with 3 steps, 3x more accurate than the right-Riemann grid at 5 steps; see the README)."""
BufferDtype = Literal["float32", "bfloat16", "float16"]
BUFFER_DTYPES = ("float32", "bfloat16", "float16")

Family = Literal["estimation", "question"]
FAMILIES: tuple[Family, ...] = ("estimation", "question")
DEFAULT_FAMILY: Family = "estimation"
DEFAULT_REPLICATES = 5
"""Replicates per checkpoint: with r = 5 the exact permutation test's smallest p is 2/252 (r = 4: 2/70)."""


def check_method(method: str) -> Method:
    """`method` if it is one of `METHODS`, else a CircuitdynError naming the choices."""
    if method not in METHODS:
        raise CircuitdynError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def steps_taken(method: str | None, steps: int) -> int:
    """The interpolation steps a method really takes (and records as `ig_steps`): EAP and RelP are one
    gradient. EAP-IG needs a whole number of steps >= 1."""
    if method in ONE_STEP_METHODS:
        return 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CircuitdynError(f"steps must be a whole number >= 1 (EAP-IG interpolation steps), got {steps!r}")
    return steps


def grid_taken(method: str | None, ig_grid: str) -> IGGrid:
    """The IG grid a method really uses (and records as `ig_grid`): EAP and RelP take the gradient at the
    clean end (`right` with one step)."""
    if ig_grid not in IG_GRIDS:
        raise CircuitdynError(f"unknown IG grid {ig_grid!r}; choose one of {', '.join(IG_GRIDS)}")
    return "right" if method in ONE_STEP_METHODS else ig_grid  # type: ignore[return-value]


def check_family(family: str) -> Family:
    if family not in FAMILIES:
        raise CircuitdynError(f"unknown replicate family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def _whole(name: str, value: Any, low: int = 1, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CircuitdynError(f"{name} must be a whole number >= {low}, got {value!r}")


@dataclass(frozen=True)
class AttributionSettings:
    """What a circuit is: the attribution method, its IG interpolation `steps` and quadrature `ig_grid`
    (`attribution.ig_nodes`), the `metric` a circuit must carry (a name of `forward.METRICS`, or a callable),
    the corruption `seed` (noise draws, and the `shifted` grid's offsets) and the `noise_scale` of noise
    corruptions.

    The values are those really used: EAP and RelP take one gradient at the clean end, so their `steps` is 1
    and their `ig_grid` `right` whatever was asked, and a metric name is canonical (`logprob` is
    `answer-logprob`). Two circuit sets were extracted the same way when their settings are equal.
    """

    method: Method = "eap-ig"
    steps: int = DEFAULT_IG_STEPS
    ig_grid: IGGrid = DEFAULT_IG_GRID
    metric: str | Metric = "answer-logprob"
    seed: int = 0
    noise_scale: float = NOISE_SCALE

    def __post_init__(self) -> None:
        check_method(self.method)
        object.__setattr__(self, "steps", steps_taken(self.method, self.steps))
        object.__setattr__(self, "ig_grid", grid_taken(self.method, self.ig_grid))
        if isinstance(self.metric, str):
            object.__setattr__(self, "metric", metric_name(self.metric))
        _whole("seed", self.seed, low=0, optional=False)

    def replace(self, **changes: Any) -> AttributionSettings:
        """These settings with some fields changed (checked like new ones)."""
        return dataclasses.replace(self, **changes)

    @property
    def metric_name(self) -> str:
        """The metric's canonical name (what a circuit file records)."""
        return metric_name(self.metric)

    def to_meta(self) -> dict[str, Any]:
        """The fields a circuit file records, under their metadata names (`steps` is recorded as `ig_steps`)."""
        return {
            META_KEYS[f.name]: (self.metric_name if f.name == "metric" else getattr(self, f.name)) for f in fields(self)
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> AttributionSettings:
        """The settings a circuit file's metadata records (`SETTING_DEFAULTS` for files older than a field)."""
        values = {name: meta.get(key, SETTING_DEFAULTS.get(key)) for name, key in META_KEYS.items()}
        return cls(**{k: v for k, v in values.items() if v is not None})

    def describe(self) -> str:
        """`eap-ig M=3 (midpoint rule), metric answer-logprob`, or `eap, metric ...` for one-step methods."""
        steps = "" if self.method in ONE_STEP_METHODS else f" M={self.steps} ({self.ig_grid} rule)"
        return f"{self.method}{steps}, metric {self.metric_name}"


META_KEYS = {f.name: "ig_steps" if f.name == "steps" else f.name for f in fields(AttributionSettings)}
"""AttributionSettings field -> the name a circuit file records it under."""
SETTING_DEFAULTS = {"ig_grid": "right"}
"""Values of settings that files written before the field existed had (circuitdyn's IG grid was `right`)."""


def settings_filter(
    method: str | None = None, steps: int | None = None, ig_grid: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """The metadata filter (`circuits.find_circuits`' `where`) of settings chosen only in part, for reading
    cached circuits: the fields given (None: any) and the extraction seed."""
    where: dict[str, Any] = {"seed": seed}
    if method is not None:
        where["method"] = check_method(method)
    if steps is not None:
        where["ig_steps"] = steps
    if ig_grid is not None:
        where["ig_grid"] = grid_taken(method or "eap-ig", ig_grid)
    return where


DEFAULT_SETTINGS = AttributionSettings()
"""circuitdyn's defaults: EAP-IG on inputs, the midpoint rule with 3 steps, answer log-prob, seed 0."""
PAPER_SETTINGS = AttributionSettings(method="eap-ig", steps=30, ig_grid="left", metric="logit-diff")
"""The paper's protocol (arXiv 2601.03858, `extract --task`): EAP-IG on inputs with 30 steps on hannamw/EAP-IG's
alpha grid (k/m, k = 0..m-1), the logit difference of the first answer token."""


@dataclass(frozen=True)
class Compute:
    """How attribution runs; no field changes a score (a fact's scores do not depend on its batch).

    `batch_size`: facts per batch (None: chosen from `max_memory`); `buffer_dtype`: precision of the stored
    activation differences (sums stay float32); `max_memory`: a memory budget (bytes or e.g. "8GiB", weights
    included) the facts per pass are chosen from (`memory.fact_batch_for_memory`); `num_threads`: CPU threads
    (default torch's setting). `ray` ("auto" for a local cluster, or a cluster's address) runs an extraction
    as Ray tasks of `shard_size` facts (`extraction.extract_on_ray`), each retried `max_retries` times when
    its worker dies, with `num_gpus` per task (default 1 on a cluster with GPUs).
    """

    batch_size: int | None = 8
    buffer_dtype: BufferDtype = "float32"
    max_memory: int | str | None = None
    num_threads: int | None = None
    ray: str | None = None
    shard_size: int | None = None
    max_retries: int = 3
    num_gpus: float | None = None

    def __post_init__(self) -> None:
        _whole("batch_size", self.batch_size)
        if self.buffer_dtype not in BUFFER_DTYPES:
            raise CircuitdynError(
                f"unknown buffer dtype {self.buffer_dtype!r}; choose one of {', '.join(BUFFER_DTYPES)}"
            )

    def replace(self, **changes: Any) -> Compute:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Storage:
    """What an extraction writes beside the scores: `dtype` float16 (scaled per fact, the default) or float32;
    `sparse_top_k`: keep only each fact's top-k edges (`CircuitSet.save`); `top_n`: record the faithfulness
    of each fact's top-n circuit (None: skipped, as for method-noise replicates)."""

    dtype: Literal["float16", "float32"] = "float16"
    sparse_top_k: int | None = None
    top_n: int | None = 1000

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16"):
            raise CircuitdynError(f"store must be float32 or float16, got {self.dtype!r}")
        for name in ("top_n", "sparse_top_k"):
            _whole(name, getattr(self, name))


@dataclass(frozen=True)
class Comparison:
    """How circuits are compared: the `selection` rule that turns scores into circuits, and the method-noise
    replicates every change is tested against: `replicates` draws of the replicate `family` per checkpoint
    (None: no replicates, changes are not tested). For timelines, `noise_epochs` are the epochs whose
    replicates are drawn ("all", "ends" = first and last, "none", or a list of epochs) and `transfer` also
    evaluates every epoch's circuit on every epoch's model (`transfer.transfer_matrix`)."""

    selection: Selection = DEFAULT_SELECTION
    family: Family = DEFAULT_FAMILY
    replicates: int | None = DEFAULT_REPLICATES
    noise_epochs: str | tuple[int, ...] | None = "all"
    transfer: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.selection, Selection):
            raise CircuitdynError(f"a comparison's selection is a Selection (Selection.parse({self.selection!r}))")
        check_family(self.family)
        if self.replicates is not None and (
            isinstance(self.replicates, bool) or not isinstance(self.replicates, int) or self.replicates < 2
        ):
            raise CircuitdynError(f"replicates per checkpoint must be a whole number >= 2, got {self.replicates!r}")
        if isinstance(self.noise_epochs, list):
            object.__setattr__(self, "noise_epochs", tuple(self.noise_epochs))

    def replace(self, **changes: Any) -> Comparison:
        return dataclasses.replace(self, **changes)

    @property
    def method_noise(self) -> bool:
        """True when replicates are drawn (and changes tested against them)."""
        return self.replicates is not None

"""Per-fact circuits for every checkpoint of a run: attribute, evaluate, store, and reuse what is stored.

`extract_circuits(model, facts)` attributes every fact on one model and wraps the scores with their
provenance in a `CircuitSet`. `extract_run(run, facts, out_dir)` does that for every epoch of a run and
writes one circuit file per epoch, named by its settings (`circuits.circuit_filename`), so extractions of
other facts or settings live side by side. A file that already holds the same checkpoint and settings
(`circuits.settings`) is reused; one that holds another checkpoint's circuits is never replaced unless
`overwrite=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtyping import Bool, Float
from torch import Tensor

from tqdm.auto import tqdm

from circuitdyn.attribution import (DEFAULT_IG_GRID, DEFAULT_IG_STEPS, BufferDtype, IGGrid, Method, attribute, check_method, grid_taken,
                                   steps_taken)
from circuitdyn.circuits import CircuitSet, circuit_filename, read_meta, settings_mismatch
from circuitdyn.errors import CircuitdynError
from circuitdyn.facts import facts_hash
from circuitdyn.faithfulness import CircuitEvaluator
from circuitdyn.forward import NOISE_SCALE, metric_name
from circuitdyn.graph import Graph
from circuitdyn.probes import FactPrompt
from circuitdyn.selection import Selection

SIGN = "score(e) ~ m(clean with e patched to corrupted) - m(clean)"


def extraction_settings(architecture: str, facts: Sequence[FactPrompt], method: Method = "eap-ig", steps: int = DEFAULT_IG_STEPS,
                        metric: str = "answer-logprob", seed: int = 0, noise_scale: float = NOISE_SCALE,
                        ig_grid: IGGrid = DEFAULT_IG_GRID) -> dict[str, Any]:
    """The `circuits.SETTINGS` an extraction with these arguments records (known before any work is done)."""
    return {
        "architecture": architecture,
        "method": check_method(method),
        "ig_steps": steps_taken(method, steps),
        "ig_grid": grid_taken(method, ig_grid),
        "metric": metric_name(metric),
        "seed": seed,
        "noise_scale": noise_scale,
        "probe_set_hash": facts_hash(facts),
    }


def extract_circuits(model: Any, facts: Sequence[FactPrompt], method: Method = "eap-ig", steps: int = DEFAULT_IG_STEPS,
                     metric: str = "answer-logprob", seed: int = 0, batch_size: int = 8,
                     noise_scale: float = NOISE_SCALE, meta: dict[str, Any] | None = None,
                     progress: bool = False, ig_grid: IGGrid = DEFAULT_IG_GRID, buffer_dtype: BufferDtype = "float32",
                     max_memory: int | str | None = None, num_threads: int | None = None) -> CircuitSet:
    """Attribute every fact and wrap the scores with their provenance in a `CircuitSet`.

    `meta` adds checkpoint provenance (checkpoint_hash, step, epoch, model...); the settings
    (`extraction_settings`), the architecture's shape and each fact's corruption are filled in here.
    `ig_grid`, `buffer_dtype`, `max_memory` (facts per batch from a memory budget, see
    `circuitdyn.memory.fact_batch_for_memory`) and `num_threads` are passed to `attribution.attribute`.
    """
    info = extraction_settings(model.cfg.original_architecture, facts, method, steps, metric, seed, noise_scale,
                               ig_grid)
    scores = attribute(model, facts, method, steps, metric, seed, batch_size, noise_scale, progress, ig_grid=ig_grid,
                       buffer_dtype=buffer_dtype, max_memory=max_memory, num_threads=num_threads)
    cfg = model.cfg
    info.update({
        "model": cfg.model_name,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads,
        "d_model": cfg.d_model,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "corruption": [f.corruption for f in facts],
        "sign": SIGN,
    })
    info.update(meta or {})
    return CircuitSet(scores, Graph.from_model(model).edges, [f.fact_id for f in facts], info)


@dataclass
class Extracted:
    """One epoch's result of `extract_run`: the circuit file and the faithfulness printed for it."""

    epoch: int
    path: Path
    skipped: bool
    fact_ids: list[str]
    faithfulness: list[float]  # of each fact's `selection` circuit (NaN where m_clean == m_corrupted)
    selection: str
    m_clean: list[float]
    m_corrupted: list[float]

    @classmethod
    def from_file(cls, epoch: int, path: Path, skipped: bool, cs: CircuitSet) -> Extracted:
        def floats(key: str) -> list[float]:
            values = cs.meta.get(key) or [None] * len(cs.fact_ids)
            return [float("nan") if v is None else float(v) for v in values]

        return cls(epoch, path, skipped, cs.fact_ids, floats("faithfulness"), cs.meta.get("faithfulness_selection", ""),
                   floats("m_clean"), floats("m_corrupted"))


def extract_run(run: Any, facts: Sequence[FactPrompt], out_dir: str | Path, epochs: Sequence[int] | None = None,
                method: Method = "eap-ig", steps: int = DEFAULT_IG_STEPS, metric: str = "answer-logprob", seed: int = 0,
                batch_size: int = 8, top_n: int = 1000, store: str = "float16", sparse_top_k: int | None = None,
                extra_meta: dict[str, Any] | None = None, overwrite: bool = False,
                progress: bool = False, ig_grid: IGGrid = DEFAULT_IG_GRID, buffer_dtype: BufferDtype = "float32",
                max_memory: int | str | None = None, num_threads: int | None = None) -> list[Extracted]:
    """One circuit file per epoch of a `checkpoints.Run` under `out_dir`, skipping finished ones.

    A file is reused when it holds the same checkpoint content hash and `settings`. Each new file's
    metadata also records the faithfulness of every fact's top-`top_n` circuit (`faithfulness`,
    `faithfulness_selection`) and the metric of the clean and corrupted runs (`m_clean`, `m_corrupted`):
    faithfulness is only meaningful where they differ clearly. `store`: float16 (scaled per fact, the
    default) or float32 scores; `sparse_top_k`: keep each fact's top-k edges (`CircuitSet.save`).
    `ig_grid`, `buffer_dtype`, `max_memory` and `num_threads`: see `extract_circuits`.
    """
    if not facts:
        raise CircuitdynError("no facts given to attribute")
    out = Path(out_dir)
    epochs = list(run.epochs if epochs is None else epochs)
    for epoch in epochs:
        run.checkpoint(epoch)
    want = extraction_settings(run.architecture, facts, method, steps, metric, seed, ig_grid=ig_grid)
    results = []
    for epoch in tqdm(epochs, desc="epochs", unit="epoch", disable=not progress or len(epochs) < 2):
        ck = run.checkpoint(epoch)
        path = out / circuit_filename(epoch, want)
        if path.exists():
            meta = read_meta(path)
            if meta is not None and not settings_mismatch(meta, want) and meta.get("checkpoint_hash") == ck.content_hash:
                results.append(Extracted.from_file(epoch, path, True, CircuitSet.load(path)))
                continue
            if not overwrite:
                why = "is not a circuit file" if meta is None else (
                    f"holds circuits of another checkpoint ({meta.get('checkpoint_hash')})"
                    if not settings_mismatch(meta, want) else f"holds other settings ({settings_mismatch(meta, want)})")
                raise CircuitdynError(f"{path} {why}; choose another output folder, or pass --overwrite "
                                      "(overwrite=True) to replace it")
        model = run.load_model(epoch)
        meta = {"model": run.base_model, "checkpoint_hash": ck.content_hash, "step": ck.step, "epoch": epoch,
                "train_loss": ck.train_loss, "checkpoint_path": str(ck.path), **(extra_meta or {})}
        cs = extract_circuits(model, facts, method, steps, metric, seed, batch_size, meta=meta, progress=progress,
                              ig_grid=ig_grid, buffer_dtype=buffer_dtype, max_memory=max_memory,
                              num_threads=num_threads)
        ev = CircuitEvaluator(model, facts, metric, seed, batch_size, NOISE_SCALE)
        selection = f"top:{top_n}"
        faith = ev.faithfulness(cs.top_n(min(top_n, len(cs.edges))))
        cs.meta["faithfulness"] = [None if v != v else round(float(v), 6) for v in faith.tolist()]
        cs.meta["faithfulness_selection"] = selection
        cs.meta["m_clean"] = [round(float(v), 6) for v in ev.m_clean.tolist()]
        cs.meta["m_corrupted"] = [round(float(v), 6) for v in ev.m_corr.tolist()]
        cs.save(path, dtype=store, top_k=sparse_top_k)
        results.append(Extracted.from_file(epoch, path, False, cs))
    return results


Evaluator = Callable[[int, CircuitSet, Bool[Tensor, "fact edge"]], Float[Tensor, "fact"]]
"""(model epoch, circuit set, its per-fact masks) -> faithfulness of each circuit on that epoch's model."""


def run_evaluator(run: Any, facts: Sequence[Any], metric: str | None = None, seed: int | None = None,
                  batch_size: int = 8) -> Evaluator:
    """An `Evaluator` for `transfer_matrix` on a `checkpoints.Run`: loads the model epoch (weights are
    swapped in place) and evaluates circuits with `circuitdyn.faithfulness.CircuitEvaluator` on the facts
    (`FactPrompt`s) of the circuit set, with the set's own metric, seed and noise scale unless given.
    The evaluator of the current model epoch is kept, so a row of the matrix costs one clean and one
    corrupted run plus one patched run per circuit."""
    by_id = {f.fact_id: f for f in facts}
    current: dict[tuple, Any] = {}

    def evaluate(model_epoch: int, cs: CircuitSet, masks: Tensor) -> Tensor:
        missing = [f for f in cs.fact_ids if f not in by_id]
        if missing:
            raise CircuitdynError(f"the probe facts do not match the circuits: no prompt for fact id(s) {missing[:3]}")
        m = metric or cs.meta.get("metric", "answer-logprob")
        sd = int(cs.meta.get("seed", 0) if seed is None else seed)
        noise = float(cs.meta.get("noise_scale", NOISE_SCALE))
        key = (model_epoch, tuple(cs.fact_ids), m, sd, noise)
        if key not in current:
            current.clear()
            model = run.load_model(model_epoch)
            current[key] = CircuitEvaluator(model, [by_id[f] for f in cs.fact_ids], m, sd, batch_size, noise)
        run.load_model(model_epoch)  # no-op unless another caller swapped the weights meanwhile
        return current[key].faithfulness(masks)

    return evaluate


def circuits_dir(run: Any) -> Path:
    """Where a run's circuits are cached by default: `RUN/circuits` for a run folder; for a plain model folder
    (which may be read-only or shared), `$CIRCUITDYN_CACHE/circuits/<its weight hash>`."""
    from circuitdyn.checkpoints import cache_dir

    if (Path(run.path) / "config.json").is_file():
        return cache_dir() / "circuits" / run.checkpoint(run.epochs[0]).content_hash.split(":")[-1][:16]
    return Path(run.path) / "circuits"


def checkpoint_circuits(
    run: Any, epoch: int, facts: Sequence[FactPrompt] | None = None, *, folder: str | Path | None = None,
    method: Method | None = None, steps: int | None = None, metric: str = "answer-logprob", seed: int = 0,
    batch_size: int = 8, progress: bool = False, ig_grid: IGGrid = DEFAULT_IG_GRID,
) -> CircuitSet:
    """The circuits of one checkpoint: computed for `facts` (or reused when `folder` holds them with the same
    settings), or, without facts, the cached circuits of that checkpoint in `folder` (default `circuits_dir`)."""
    from circuitdyn.circuits import find_circuits

    folder = Path(folder) if folder is not None else circuits_dir(run)
    if facts is not None:
        done = extract_run(run, facts, folder, [epoch], method=method or "eap-ig", steps=steps or DEFAULT_IG_STEPS, metric=metric,
                           seed=seed, batch_size=batch_size, progress=progress, ig_grid=ig_grid)[0]
        return CircuitSet.load(done.path)
    if not folder.is_dir():
        raise CircuitdynError(f"{run.path} epoch {epoch}: no cached circuits in {folder}; pass probes (--probes FILE) "
                              "to compute them, or the folder holding them (--circuits DIR)")
    where = {"seed": seed, **({"ig_grid": ig_grid} if method == "eap-ig" else {})}
    path = find_circuits(folder, [epoch], method, {epoch: run.checkpoint(epoch).content_hash}, steps, where)[epoch]
    return CircuitSet.load(path)


def select_circuits(
    run: Any, epoch: int, circuits: CircuitSet, selection: str | Selection, facts: Sequence[FactPrompt] | None = None,
    *, cache_dir: str | Path | None = None,
) -> tuple[Bool[Tensor, "fact edge"], Float[Tensor, "fact"] | None]:
    """Each fact's circuit under `selection` (and, for rules that evaluate on the model, the faithfulness
    reached), for circuits of `run` at `epoch`.

    Rules that need the model (`faith:`) evaluate circuits with the set's own metric, seed and corruption,
    so `facts` must be the facts the circuits were extracted from. Their result is cached in `cache_dir`
    (a small file per circuit set and rule, keyed by the scores' content, the checkpoint and the rule), so a
    re-run does not search again.
    """
    sel = Selection.parse(selection)
    if not sel.needs_model:
        return sel.select(circuits.scores, circuits.graph)
    if facts is None:
        raise CircuitdynError(f"selection {sel} evaluates circuits on the model: it needs the facts (--probes)")
    key = {"scores_sha256": circuits.scores_digest, "selection": str(sel),
           "checkpoint_hash": run.checkpoint(epoch).content_hash, "fact_ids": circuits.fact_ids}
    path = None
    if cache_dir is not None:
        name = f"select.{circuits.scores_digest[:12]}.{str(sel).replace(':', '')}.e{epoch}.safetensors"
        path = Path(cache_dir) / "selections" / name
        hit = _read_selection(path, key, circuits)
        if hit is not None:
            return hit
    evaluate = run_evaluator(run, facts)
    masks, reached = sel.select(circuits.scores, circuits.graph, lambda m: evaluate(epoch, circuits, m))
    if path is not None:
        _write_selection(path, key, masks, reached)
    return masks, reached


def _write_selection(path: Path, key: dict[str, Any], masks: Tensor, reached: Tensor | None) -> None:
    import json

    import numpy as np
    import torch
    from safetensors.torch import save_file

    from circuitdyn.io import atomic_path

    packed = torch.from_numpy(np.packbits(masks.cpu().numpy().astype(np.uint8), axis=1))
    tensors = {"masks": packed}
    if reached is not None:
        tensors["reached"] = reached.float().cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})


def _read_selection(path: Path, key: dict[str, Any], circuits: CircuitSet) -> tuple[Tensor, Tensor | None] | None:
    import json

    import numpy as np
    import torch
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != json.loads(json.dumps(key, sort_keys=True)):
                return None
            packed = f.get_tensor("masks").numpy()
            reached = f.get_tensor("reached") if "reached" in f.keys() else None
    except Exception:  # a damaged cache file is recomputed and replaced
        return None
    masks = np.unpackbits(packed, axis=1, count=len(circuits.edges)).astype(bool)
    return torch.from_numpy(masks), reached

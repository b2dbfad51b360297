"""Per-fact circuits for every checkpoint of a run: attribute, evaluate, store, and reuse what is stored.

`extract_circuits(model, facts)` attributes every fact on one model and wraps the scores with their
provenance in a `CircuitSet`. `extract_run(run, facts, out_dir)` does that for every epoch of a run and
writes one circuit file per epoch, named by its settings (`circuits.circuit_filename`), so extractions of
other facts or settings live side by side. A file that already holds the same checkpoint and settings
(`circuits.settings`) is reused; one that holds another checkpoint's circuits is never replaced unless
`overwrite=True`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuitdyn.analysis.transfer import Evaluator
from circuitdyn.engine.attribution import attribute_with_ends
from circuitdyn.engine.circuits import CircuitSet, circuit_filename, read_meta, recorded_settings, settings_mismatch
from circuitdyn.engine.faithfulness import CircuitEvaluator
from circuitdyn.engine.forward import NOISE_SCALE
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import Selection
from circuitdyn.engine.settings import DEFAULT_SETTINGS, AttributionSettings, Compute, Storage
from circuitdyn.errors import CircuitdynError
from circuitdyn.io import check_writable, file_lock, remove_stale_temps
from circuitdyn.probes.facts import check_context, facts_hash, record_facts
from circuitdyn.probes.probes import FactPrompt
from circuitdyn.progress import progress_bar

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from circuitdyn.probes.facts import FactSet
    from circuitdyn.runs.checkpoints import Run

SIGN = "score(e) ~ m(clean with e patched to corrupted) - m(clean)"


def extraction_settings(
    architecture: str | None, facts: Sequence[FactPrompt], settings: AttributionSettings | None = None
) -> dict[str, Any]:
    """The `circuits.SETTINGS` an extraction of `facts` with `settings` records (known before any work is done)."""
    return recorded_settings(architecture, settings or DEFAULT_SETTINGS, facts_hash(facts))


def extract_circuits(
    model: HookedTransformer,
    facts: Sequence[FactPrompt],
    settings: AttributionSettings | None = None,
    compute: Compute | None = None,
    *,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> CircuitSet:
    """Attribute every fact with `settings` (`attribution.attribute`, run as `compute` says) and wrap the scores
    with their provenance in a `CircuitSet`.

    `meta` adds checkpoint provenance (checkpoint_hash, step, epoch, model...); the settings
    (`extraction_settings`), the architecture's shape and each fact's corruption are filled in here.
    """
    info = extraction_settings(model.cfg.original_architecture, facts, settings)
    done = attribute_with_ends(model, facts, settings, compute, progress=progress)
    cfg = model.cfg
    info.update(
        {
            "model": cfg.model_name,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "n_key_value_heads": cfg.n_key_value_heads,
            "d_model": cfg.d_model,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "corruption": [f.corruption for f in facts],
            "sign": SIGN,
            "m_clean": [round(float(v), 6) for v in done.m_clean.tolist()],
            "m_corrupted": [round(float(v), 6) for v in done.m_corr.tolist()],
        }
    )
    info.update(meta or {})
    return CircuitSet(done.scores, Graph.from_model(model).edges, [f.fact_id for f in facts], info)


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
    metric: str = ""

    @classmethod
    def from_file(cls, epoch: int, path: Path, skipped: bool, cs: CircuitSet) -> Extracted:
        def floats(key: str) -> list[float]:
            values = cs.meta.get(key) or [None] * len(cs.fact_ids)
            return [float("nan") if v is None else float(v) for v in values]

        return cls(
            epoch,
            path,
            skipped,
            cs.fact_ids,
            floats("faithfulness"),
            cs.meta.get("faithfulness_selection", ""),
            floats("m_clean"),
            floats("m_corrupted"),
            str(cs.meta.get("metric", "")),
        )

    def text(self) -> str:
        """The epoch's file and each fact's faithfulness and clean / corrupted metric, as `extract` prints them."""
        vals = [v for v in self.faithfulness if not math.isnan(v)]
        mean = sum(vals) / len(vals) if vals else float("nan")
        status = "cached" if self.skipped else "written"
        lines = [
            f"epoch {self.epoch}: {self.path} ({status})",
            f"faithfulness of each fact's {self.selection} circuit (mean {mean:.3f}); m = {self.metric} of the "
            "clean / corrupted run",
            f"  {'faith':>7} {'m_clean':>9} {'m_corr':>9}  fact",
        ]
        lines += [
            f"  {v:7.3f} {mc:9.3f} {mx:9.3f}  {fid}"
            for fid, v, mc, mx in zip(self.fact_ids, self.faithfulness, self.m_clean, self.m_corrupted)
        ]
        return "\n".join(lines)


def checkpoint_meta(run: Run, epoch: int) -> dict[str, Any]:
    """What a circuit file records of the checkpoint it was extracted on (its content hash decides reuse)."""
    ck = run.checkpoint(epoch)
    return {
        "model": run.base_model,
        "checkpoint_hash": ck.content_hash,
        "step": ck.step,
        "epoch": epoch,
        "train_loss": ck.train_loss,
        "checkpoint_path": str(ck.path),
    }


def is_done(path: Path, want: dict[str, Any], checkpoint_hash: str, overwrite: bool = False) -> bool:
    """True when `path` holds circuits of this checkpoint with the settings `want` (reuse it); False when there
    is nothing there, or something to replace with `overwrite`; else a CircuitdynError saying what is there."""
    if not path.exists():
        return False
    meta = read_meta(path)
    if meta is not None and not settings_mismatch(meta, want) and meta.get("checkpoint_hash") == checkpoint_hash:
        return True
    if not overwrite:
        why = (
            "is not a circuit file"
            if meta is None
            else (
                f"holds circuits of another checkpoint ({meta.get('checkpoint_hash')})"
                if not settings_mismatch(meta, want)
                else f"holds other settings ({settings_mismatch(meta, want)})"
            )
        )
        raise CircuitdynError(
            f"{path} {why}; choose another output folder, or pass --overwrite (overwrite=True) to replace it"
        )
    return False


def extract_run(
    run: Run,
    facts: Sequence[FactPrompt],
    out_dir: str | Path,
    epochs: Sequence[int] | None = None,
    settings: AttributionSettings | None = None,
    compute: Compute | None = None,
    storage: Storage | None = None,
    *,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> list[Extracted]:
    """One circuit file per epoch of a `checkpoints.Run` under `out_dir`, extracted with `settings` (default
    `DEFAULT_SETTINGS`), skipping finished ones.

    A file is reused when it holds the same checkpoint content hash and settings (`circuits.SETTINGS`). Each new
    file's metadata also records the faithfulness of every fact's top-`storage.top_n` circuit (`faithfulness`,
    `faithfulness_selection`; skipped with `top_n=None`, as for method-noise replicates) and the metric of the
    clean and corrupted runs (`m_clean`, `m_corrupted`): faithfulness is only meaningful where they differ
    clearly. `storage`: the scores' precision and sparsity (`settings.Storage`); `compute`: batch, memory,
    threads (`settings.Compute`). When `facts` is a `facts.FactSet` read from a probe file, `out_dir/facts.json`
    then records it (`facts.record_facts`), so that `facts.run_facts` can rebuild it.

    `compute.ray` (`"auto"` for a local cluster, or a cluster's address) runs the work as Ray tasks of one
    checkpoint x one shard of `compute.shard_size` facts each (`extract_on_ray`): the same files, the same scores.
    """
    s, c, st = settings or DEFAULT_SETTINGS, compute or Compute(), storage or Storage()
    if not facts:
        raise CircuitdynError("no facts given to attribute")
    out = check_writable(out_dir, "folder")
    epochs = list(run.epochs if epochs is None else epochs)
    for epoch in epochs:
        run.checkpoint(epoch)
    run.check_consistent()
    want = extraction_settings(run.architecture, facts, s)
    check_context(facts, run.context_length)
    if c.ray is not None:
        done = extract_on_ray(
            run, facts, out, epochs, s, c, st, extra_meta=extra_meta, overwrite=overwrite, progress=progress
        )
        record_facts(out, facts)  # type: ignore[arg-type]  # a FactSet of a probe file: the run remembers it
        return done
    results = []
    for epoch in progress_bar(epochs, desc="epochs", unit="epoch", disable=not progress or len(epochs) < 2):
        ck = run.checkpoint(epoch)
        path = out / circuit_filename(epoch, want)
        with file_lock(path):  # a second run extracting the same file waits here, then reuses the first's file
            remove_stale_temps(path)
            if is_done(path, want, ck.content_hash, overwrite):
                results.append(Extracted.from_file(epoch, path, True, CircuitSet.load(path)))
                continue
            model = run.load_model(epoch)
            meta = {**checkpoint_meta(run, epoch), **(extra_meta or {})}
            cs = extract_circuits(model, facts, s, c, meta=meta, progress=progress)
            if st.top_n is not None:
                ev = CircuitEvaluator(model, facts, s.metric, s.seed, c.batch_size or 8, s.noise_scale)
                faith = ev.faithfulness(cs.top_n(min(st.top_n, len(cs.edges))))
                cs.meta["faithfulness"] = [None if v != v else round(float(v), 6) for v in faith.tolist()]
                cs.meta["faithfulness_selection"] = f"top:{st.top_n}"
            cs.save(path, dtype=st.dtype, top_k=st.sparse_top_k)
            results.append(Extracted.from_file(epoch, path, False, cs))
    record_facts(out, facts)  # type: ignore[arg-type]  # a FactSet of a probe file: the run remembers it
    return results


SHARDS = ".shards"
"""The folder under `out_dir` where `extract_on_ray` keeps finished shards until their epoch's file is written."""


@dataclass(frozen=True)
class Shard:
    """One Ray task of `extract_on_ray`: the facts `start:stop` (in the given order) on one epoch's model."""

    epoch: int
    start: int
    stop: int
    folder: Path
    file: Path
    """The shard's circuit file in `folder` (named by `extract_run` from its settings and facts)."""

    def label(self, run: Run, n_shards: int, index: int) -> str:
        return (
            f"checkpoint epoch {self.epoch} ({run.checkpoint(self.epoch).path}), shard {index + 1}/{n_shards} "
            f"(facts {self.start}-{self.stop - 1})"
        )


def default_shard_size(n_facts: int, n_epochs: int, slots: int, batch_size: int) -> int:
    """Facts per task so that the epochs' shards fill the cluster's `slots` in whole rounds: each epoch is split
    into slots / gcd(slots, epochs) shards (2 slots, 3 epochs: 6 tasks in 3 full rounds, not 3 tasks in 2
    rounds with a slot idle), but no shard is smaller than a batch."""
    per_epoch = min(slots // math.gcd(slots, n_epochs), math.ceil(n_facts / batch_size))
    return math.ceil(n_facts / max(1, per_epoch))


def extract_shard(
    run_path: str,
    allow_pickle: bool,
    device: str,
    dtype: str,
    epoch: int,
    facts: list[FactPrompt],
    folder: str,
    how: tuple[AttributionSettings, Compute, Storage, dict[str, Any] | None],
    base: str | None = None,
) -> str:
    """One task of `extract_on_ray`, on a worker: open the run (with the adapter's `base`, if any), load the
    epoch's model once, extract the facts' circuits into `folder` (atomically, through `extract_run`, with the
    settings, compute, storage and extra metadata `how`; stored exact, sparsity left to the assembled file) and
    return the file's path."""
    from circuitdyn.runs.checkpoints import open_run

    settings, compute, storage, extra_meta = how
    run = open_run(run_path, allow_pickle=allow_pickle, device=device, dtype=dtype, base=base)
    done = extract_run(
        run,
        facts,
        folder,
        [epoch],
        settings,
        compute.replace(ray=None),
        Storage(dtype="float32", top_n=storage.top_n),
        extra_meta=extra_meta,
        overwrite=True,
    )
    return str(done[0].path)


def assemble(parts: Sequence[CircuitSet], facts: Sequence[FactPrompt]) -> CircuitSet:
    """The circuit set of all `facts` from the circuit sets of consecutive shards of them (same checkpoint and
    settings): scores and per-fact metadata concatenated in fact order, the fact set's hash recorded."""
    import torch

    from circuitdyn.engine.circuits import PER_FACT_META

    meta = dict(parts[0].meta)
    for key in PER_FACT_META:
        if all(isinstance(p.meta.get(key), list) for p in parts):
            meta[key] = [v for p in parts for v in p.meta[key]]
    meta["probe_set_hash"] = facts_hash(facts)
    ids = [i for p in parts for i in p.fact_ids]
    if ids != [f.fact_id for f in facts]:
        raise CircuitdynError("the shards' facts do not add up to the facts asked for")
    return CircuitSet(torch.cat([p.scores for p in parts]), parts[0].edges, ids, meta)


def extract_on_ray(
    run: Run,
    facts: Sequence[FactPrompt],
    out_dir: str | Path,
    epochs: Sequence[int],
    settings: AttributionSettings | None = None,
    compute: Compute | None = None,
    storage: Storage | None = None,
    *,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> list[Extracted]:
    """`extract_run` on a Ray cluster (`compute.ray`: "auto", the default, starts a local one, else the address of
    one to join).

    The work is split into tasks of one checkpoint x one shard of consecutive facts; each task loads its model
    once and writes its shard atomically under `out_dir/.shards`, so a re-run skips finished shards and a
    worker killed mid-task (retried by Ray up to `compute.max_retries` times) leaves nothing half-written. When
    every shard of an epoch is there, they are assembled into the same file a local run writes and removed.
    Shards are whole multiples of `compute.batch_size` facts, so each fact is batched with the same neighbours
    as in a local run. `compute.num_gpus` per task defaults to 1 on a cluster with GPUs (the task's model goes
    on its GPU), else 0. `compute.shard_size` defaults to `default_shard_size`.
    """
    import shutil

    from circuitdyn.pipeline import ray as ray_tasks

    s, c, st = settings or DEFAULT_SETTINGS, compute or Compute(ray="auto"), storage or Storage()
    out = Path(out_dir)
    facts = list(facts)
    want = extraction_settings(run.architecture, facts, s)
    finals = {e: out / circuit_filename(e, want) for e in epochs}
    todo = [e for e in epochs if not is_done(finals[e], want, run.checkpoint(e).content_hash, overwrite)]
    how = (s, c, st, extra_meta)
    batch_size = c.batch_size or 8
    with ray_tasks.connected(c.ray or ray_tasks.LOCAL) if todo else contextlib.nullcontext() as rt:
        shards: dict[int, list[Shard]] = {}
        if todo:
            gpus = (1.0 if ray_tasks.cluster_gpus(rt) else 0.0) if c.num_gpus is None else float(c.num_gpus)
            shard_size = c.shard_size
            if shard_size is None:
                shard_size = default_shard_size(len(facts), len(todo), ray_tasks.task_slots(rt, gpus), batch_size)
            if shard_size < 1:
                raise CircuitdynError(f"shard_size must be >= 1, got {shard_size}")
            size = math.ceil(shard_size / batch_size) * batch_size
            device = "cuda" if gpus else "cpu"
            tasks = []
            for e in todo:
                starts = range(0, len(facts), size)
                shards[e] = []
                for k, i in enumerate(starts):
                    part = facts[i : i + size]
                    part_want = extraction_settings(run.architecture, part, s)
                    folder = out / SHARDS / finals[e].stem / f"facts_{i}-{i + len(part) - 1}"
                    sh = Shard(e, i, i + len(part), folder, folder / circuit_filename(e, part_want))
                    shards[e].append(sh)
                    if is_done(sh.file, part_want, run.checkpoint(e).content_hash, overwrite=True):
                        continue
                    args = (
                        str(run.path),
                        bool(getattr(run.checkpoint(e), "allow_pickle", False)),
                        device,
                        str(run.dtype).removeprefix("torch."),
                        e,
                        part,
                        str(folder),
                        how,
                        str(ck.base) if (ck := run.checkpoint(e)).kind == "adapter" and ck.base else None,
                    )
                    tasks.append(ray_tasks.Task(sh.label(run, len(starts), k), extract_shard, args))
            ray_tasks.run_tasks(
                rt, tasks, num_gpus=gpus, max_retries=c.max_retries, progress=progress, desc="circuit shards"
            )
    results = []
    for e in epochs:
        if e not in shards:
            results.append(Extracted.from_file(e, finals[e], True, CircuitSet.load(finals[e])))
            continue
        parts = [CircuitSet.load(sh.file) for sh in shards[e]]
        cs = assemble(parts, facts)
        cs.save(finals[e], dtype=st.dtype, top_k=st.sparse_top_k)
        shutil.rmtree(shards[e][0].folder.parent, ignore_errors=True)
        results.append(Extracted.from_file(e, finals[e], False, cs))
    if (out / SHARDS).is_dir() and not any((out / SHARDS).iterdir()):
        (out / SHARDS).rmdir()
    return results


def run_evaluator(
    run: Run, facts: Sequence[FactPrompt], metric: str | None = None, seed: int | None = None, batch_size: int = 8
) -> Evaluator:
    """An `Evaluator` for `transfer_matrix` on a `checkpoints.Run`: loads the model epoch (weights are
    swapped in place) and evaluates circuits with `circuitdyn.engine.faithfulness.CircuitEvaluator` on the facts
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


def heldout_faithfulness(run: Run, epoch: int, circuits: CircuitSet, masks: Tensor, facts: FactSet) -> Tensor:
    """Faithfulness of circuits selected on the facts' own corruption (e.g. `pruned:F`, pruned and scored on
    it), evaluated on another corruption of the same kind they were not fitted to: the next valid swap partner
    (`FactSet.with_variant(1)`), or a new noise draw for noise-corrupted facts. NaN for a fact whose only valid
    swap partner is the one it was selected on."""
    other = facts.with_variant(1)
    ids = circuits.fact_ids
    mine, theirs = facts.by_id(ids), other.by_id(ids)
    seed = int(circuits.meta.get("seed", 0)) + 1
    got = run_evaluator(run, other, seed=seed)(epoch, circuits, masks).float().clone()
    same = torch.tensor(
        [a.corruption.startswith("swap") and a.corrupted_tokens == b.corrupted_tokens for a, b in zip(mine, theirs)]
    )
    got[same] = float("nan")
    return got


def checkpoint_circuits(
    run: Run,
    epoch: int,
    facts: Sequence[FactPrompt] | None = None,
    settings: AttributionSettings | None = None,
    *,
    folder: str | Path | None = None,
    where: dict[str, Any] | None = None,
    compute: Compute | None = None,
    progress: bool = False,
) -> CircuitSet:
    """The circuits of one checkpoint: computed for `facts` with `settings` (default `DEFAULT_SETTINGS`; reused when
    `folder` holds them), or, without facts, the cached circuits of that checkpoint in `folder` (default
    `circuits_dir`) whose metadata matches `where` (`settings.settings_filter`; default the fields of `settings`
    when given, else seed 0)."""
    from circuitdyn.engine.circuits import find_circuits
    from circuitdyn.runs.checkpoints import circuits_dir

    folder = Path(folder) if folder is not None else circuits_dir(run)
    if facts is not None:
        done = extract_run(run, facts, folder, [epoch], settings, compute, progress=progress)[0]
        return CircuitSet.load(done.path)
    if not folder.is_dir():
        raise CircuitdynError(
            f"{run.path} epoch {epoch}: no cached circuits in {folder}; pass probes (--probes FILE) "
            "to compute them, or the folder holding them (--circuits DIR)"
        )
    if where is None:
        where = settings.to_meta() if settings is not None else {"seed": 0}
    path = find_circuits(folder, [epoch], {epoch: run.checkpoint(epoch).content_hash}, where)[epoch]
    return CircuitSet.load(path)


def select_circuits(
    run: Run,
    epoch: int,
    circuits: CircuitSet,
    selection: Selection,
    facts: Sequence[FactPrompt] | None = None,
    *,
    cache_dir: str | Path | None = None,
    guess: dict[str, int] | None = None,
    progress: bool = False,
) -> tuple[Bool[Tensor, "fact edge"], Float[Tensor, " fact"] | None]:
    """Each fact's circuit under `selection` (and, for rules that evaluate on the model, the faithfulness
    reached), for circuits of `run` at `epoch`. `guess`: fact id -> a circuit size to start the faithfulness
    search from (the previous epoch's: a warm start needs about half the patched runs of a cold search).

    Rules that need the model (`faith:`) evaluate circuits with the set's own metric, seed and corruption,
    so `facts` must be the facts the circuits were extracted from. Their result is cached in `cache_dir`
    (a small file per circuit set and rule, keyed by the scores' content, the checkpoint and the rule), so a
    re-run does not search again.
    """
    sel = selection
    if not sel.needs_model:
        return sel.select(circuits.scores, circuits.graph)
    if facts is None:
        raise CircuitdynError(f"selection {sel} evaluates circuits on the model: it needs the facts (--probes)")
    key = {
        "scores_sha256": circuits.scores_digest,
        "selection": str(sel),
        "checkpoint_hash": run.checkpoint(epoch).content_hash,
        "fact_ids": circuits.fact_ids,
    }
    path = None
    if cache_dir is not None:
        name = f"select.{circuits.scores_digest[:12]}.{str(sel).replace(':', '')}.e{epoch}.safetensors"
        path = Path(cache_dir) / "selections" / name
        hit = _read_selection(path, key, circuits)
        if hit is not None:
            return hit
    evaluate = run_evaluator(run, facts)
    start = None if guess is None else torch.tensor([guess.get(f, 0) for f in circuits.fact_ids])
    label = f"{sel} selection, epoch {epoch} ({len(circuits.fact_ids)} facts, {'warm' if guess else 'cold'} start)"
    with progress_bar(desc=label, unit="round", disable=not progress, leave=False) as bar:

        def faithfulness(masks: Tensor) -> Tensor:
            out = evaluate(epoch, circuits, masks)
            bar.update(1)
            return out

        masks, reached = sel.select(circuits.scores, circuits.graph, faithfulness, start)
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

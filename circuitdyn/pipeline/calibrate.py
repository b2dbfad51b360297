"""`calibrate`: measure the change test's error rates at one checkpoint of a run (see `calibration`): null
replicates of the unmodified model, replicates of copies with a planted change, and interval coverage."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from circuitdyn.analysis.calibration import (
    AGGREGATE_ROUNDS,
    Calibration,
    CalibrationSettings,
    Plant,
    coverage,
    rate,
)
from circuitdyn.analysis.change_test import (
    ALPHA,
    aggregate_p,
    compare_replicates,
    distance_test,
    replicate_distances,
    split_effects,
    splits,
)
from circuitdyn.analysis.diff import PRIMARY, entity_groups, node_importance, node_kind
from circuitdyn.analysis.noise import REPLICATE_GRID, Draw, draw_settings
from circuitdyn.analysis.similarity import DISTANCES
from circuitdyn.engine.attribution import attribute
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.faithfulness import MIN_GAP, gap_ok
from circuitdyn.errors import CircuitdynError
from circuitdyn.pipeline.replicates import replicate_scores

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from circuitdyn.probes.facts import FactSet
    from circuitdyn.runs.checkpoints import Run


def _planted_component(graph: Any, scores: Tensor, plant: Plant) -> tuple[str, int, int | None]:
    """The MLP (or attention head) with the largest mean importance over the facts' circuits: (node, layer, head)."""
    imp = node_importance(graph, scores.float()).mean(0)
    kind = "mlp" if plant == "mlp" else "attn"
    candidates = [i for i, n in enumerate(graph.nodes) if node_kind(n) == kind]
    best = max(candidates, key=lambda i: float(imp[i]))
    node = graph.nodes[best]
    head = int(node.split(".h")[1]) if kind == "attn" else None
    return node, graph.layer_of(node), head


def _scaled(model: HookedTransformer, plant: Plant, layer: int, head: int | None, factor: float) -> Callable[[], None]:
    """Scale one component's output weights in place; returns the function that restores them."""
    block: Any = model.blocks[layer]  # nn.ModuleList items are typed as plain Module
    if plant == "mlp":
        params = [block.mlp.W_out, block.mlp.b_out]
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.data.mul_(factor)
    else:
        params = [block.attn.W_O]
        saved = [params[0].detach().clone()]
        params[0].data[head].mul_(factor)

    def restore() -> None:
        for p, s in zip(params, saved):
            p.data.copy_(s)

    return restore


def _planted_scores(
    model: HookedTransformer,
    facts: FactSet,
    draws: Sequence[Draw],
    s: CalibrationSettings,
    cache: Path,
    key: dict[str, Any],
) -> Tensor:
    """Replicates of the planted model, cached per draw under `cache` (keyed by checkpoint, plant and draw)."""
    out = []
    for d in draws:
        path = cache / f"planted.{key['component']}.x{key['factor']:g}.{d.name.replace(' ', '')}.safetensors"
        want = json.dumps({**key, "draw": asdict(d)}, sort_keys=True)
        if path.is_file():
            cs = CircuitSet.load(path)
            if cs.meta.get("calibration_key") == want and cs.fact_ids == facts.ids:
                out.append(cs.scores.float())
                continue
        rep = d.facts(facts)
        scores = attribute(model, list(rep), s.attribution.replace(ig_grid=REPLICATE_GRID, seed=d.seed), s.compute)
        cs = CircuitSet(scores, key["edges"], facts.ids, {"calibration_key": want, "method": s.attribution.method})
        path.parent.mkdir(parents=True, exist_ok=True)
        cs.save(path, dtype="float32")
        out.append(scores.float())
    return torch.stack(out)


def calibrate(
    run: Run,
    epoch: int,
    facts: FactSet,
    settings: CalibrationSettings | None = None,
    *,
    folder: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Calibration:
    """Measure the change test's false-positive rates, power and interval coverage at one checkpoint of `run`
    (see the module docstring). Replicates are cached in `folder` (default the run's circuits folder), so a
    re-run resumes."""
    from circuitdyn.pipeline.extraction import checkpoint_circuits, select_circuits
    from circuitdyn.runs.checkpoints import circuits_dir

    s = settings or CalibrationSettings()
    say = log or (lambda text: None)
    folder = Path(folder) if folder is not None else circuits_dir(run)
    main = checkpoint_circuits(run, epoch, facts, s.attribution, folder=folder, compute=s.compute, progress=progress)
    main = main.subset(facts.ids)
    masks, _ = select_circuits(run, epoch, main, s.selection, facts, cache_dir=folder)
    sizes = masks.sum(1).long().clamp_min(1)
    included = gap_ok(main.gaps)
    entities = entity_groups(facts.ids, facts.entity_of)
    n_tested = int(included.sum())
    if n_tested < 2:
        raise CircuitdynError(
            f"{run.path} epoch {epoch}: only {n_tested} of {len(facts)} facts have a clean - "
            f"corrupted gap >= {MIN_GAP:g}; calibration needs more (choose more facts)"
        )
    r, k = s.replicates, s.null_tests
    say(
        f"calibrate: {len(facts)} facts, {n_tested} with gap >= {MIN_GAP:g} (only these are tested and drawn): "
        f"{2 * r * k} null replicates and {len(s.strengths)} x {r} planted replicates per fact"
    )
    n_all = len(facts)
    facts = facts.subset([f for f, ok in zip(facts.ids, included) if ok])
    sizes, entities = sizes[torch.from_numpy(included)], [e for e, ok in zip(entities, included) if ok]
    main = main.subset(facts.ids)
    included = np.ones(len(facts), dtype=bool)
    pool = replicate_scores(
        run,
        epoch,
        facts,
        draw_settings(s.family, 2 * r * k, s.seed),
        folder,
        s.attribution,
        compute=s.compute,
        progress=progress,
    )
    inc_entities = entities

    # the null: K disjoint tests of r against r replicates of the same checkpoint (distances computed once)
    say(f"calibrate: distances between the {2 * r * k} null replicates of every fact")
    pool_dist = replicate_distances(pool, sizes)

    def sub(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {stat: d[:, idx][:, :, idx] for stat, d in pool_dist.items()}

    null_p: dict[str, list[float]] = {stat: [] for stat in DISTANCES}
    any_flag, null_effects = 0, []
    for j in range(k):
        test, _ = distance_test(
            sub(np.arange(2 * r * j, 2 * r * (j + 1))), r, r, facts.ids, included=included, family=s.family
        )
        for stat in DISTANCES:
            null_p[stat] += test.statistic(stat)["p_value"].dropna().tolist()
        primary = test.statistic(PRIMARY)
        any_flag += bool(primary["changed_beyond_noise"].fillna(False).any())
        null_effects.append(primary["effect"].to_numpy(float))
    rng = np.random.default_rng(s.seed)
    agg_fire = {stat: 0 for stat in DISTANCES}
    n_facts = len(facts.ids)
    for _ in range(AGGREGATE_ROUNDS):
        # each fact's 2r replicates drawn at random from its own pool (facts' draws are independent)
        picks = np.stack([rng.permutation(2 * r * k)[: 2 * r] for _ in range(n_facts)])
        for stat in DISTANCES:
            d = pool_dist[stat][np.arange(n_facts)[:, None, None], picks[:, :, None], picks[:, None, :]]
            split = split_effects(d, splits(r, r))
            tested = np.flatnonzero(included & ~np.isnan(d).any(axis=(1, 2)))
            p = aggregate_p([split[i] for i in tested], n_perm=1000, seed=int(rng.integers(1 << 31)))
            agg_fire[stat] += p <= ALPHA and float(split[tested, 0].mean()) > 0

    # planted changes of known size, each against the first r null replicates
    model = run.load_model(epoch)
    node, layer, head = _planted_component(main.graph, main.scores[included], s.plant)
    power = []
    per_stat_power: dict[str, list[dict[str, Any]]] = {stat: [] for stat in DISTANCES}
    base_key = {
        "checkpoint_hash": run.checkpoint(epoch).content_hash,
        "component": node,
        "plant": s.plant,
        "steps": s.attribution.steps,
        "metric": s.attribution.metric_name,
        "method": s.attribution.method,
        "probe_set_hash": facts.identity,
    }
    for i, strength in enumerate(s.strengths):
        restore = _scaled(model, s.plant, layer, head, 1 - strength)
        try:
            draws = draw_settings(s.family, r, s.seed + 1 + i)
            say(f"calibrate: planted {node} output x {1 - strength:g}")
            planted = _planted_scores(
                model,
                facts,
                draws,
                s,
                folder / "calibration",
                {**base_key, "factor": 1 - strength, "edges": main.edges},
            )
        finally:
            restore()
        run.load_model(epoch)
        test, effects = compare_replicates(pool[:r], planted, facts.ids, sizes, included=included, family=s.family)
        for stat in DISTANCES:
            t = test.statistic(stat)
            p = t["p_value"].dropna()
            agg = aggregate_p(effects[stat], seed=s.seed)
            entry = {
                "strength": strength,
                **rate(int((p <= ALPHA).sum()), len(p)),
                "flagged": int(t["changed_beyond_noise"].fillna(False).sum()),
                "aggregate_p": round(agg, 6),
                "mean_effect": round(float(t["effect"][included].mean()), 6),
            }
            per_stat_power[stat].append(entry)
        power.append(per_stat_power[PRIMARY][-1])

    # null effects have a known truth: replicates of one checkpoint are exchangeable, so E[effect] = 0 per fact
    covered = coverage(
        np.stack(null_effects, 1)[included], inc_entities, s.entity_counts, "null effects", s.seed, truth=0.0
    )
    planted_effect = test.statistic(PRIMARY)["effect"].to_numpy(float)[included]
    covered += coverage(
        planted_effect, inc_entities, s.entity_counts, f"planted x{1 - s.strengths[-1]:g} effects", s.seed + 1
    )
    per_statistic: dict[str, dict[str, Any]] = {
        stat: {
            "fact_fpr": rate(int((np.asarray(null_p[stat]) <= ALPHA).sum()), len(null_p[stat])),
            "aggregate_fpr": rate(agg_fire[stat], AGGREGATE_ROUNDS),
            "power": per_stat_power[stat],
        }
        for stat in DISTANCES
    }
    return Calibration(
        f"{run.path}:{epoch}",
        s,
        n_all,
        n_tested,
        len(set(inc_entities)),
        PRIMARY,
        per_statistic[PRIMARY]["fact_fpr"],
        rate(any_flag, k),
        per_statistic[PRIMARY]["aggregate_fpr"],
        power,
        covered,
        node,
        per_statistic,
    )

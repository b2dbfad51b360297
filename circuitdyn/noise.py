"""Method noise: how much a circuit statistic moves when nothing about the model changes.

A circuit is an estimate. Re-attributing the **same checkpoint** with other method settings gives another
circuit, and the difference between the two is method noise, not learning. circuitdyn measures it with
the **same statistic** it reports for change between checkpoints, fact by fact:

- replicates (`replicates`): the extraction as asked (IG steps m, corruption as built), EAP-IG with 2m
  steps (the IG discretisation), and another corruption of the same kind (the second valid swap partner,
  and a new noise draw for noise-corrupted facts). Batch order is not a source: a fact's scores do not
  depend on its batch (tested).
- per fact and statistic (`similarity.DISTANCES`: edge Jaccard of the selected circuits, weighted Jaccard
  and Spearman of all scores, as distances 1 - similarity), the distances between every pair of replicates
  of one checkpoint, pooled over the checkpoints where noise was measured: that fact's method-noise
  distribution. A pair that came out identical for a fact (no other swap partner of the same token length
  exists, say) measured nothing and is left out, so `per_fact` reports how many distances each fact has;
- per fact and edge, the noise band of its score: the largest |score difference| between replicates.

A change between two checkpoints counts as real for a fact (`changed_beyond_noise`) only when its distance
exceeds the `NOISE_QUANTILE` (95th percentile) of that fact's method-noise distribution. With 3 replicates
at 2 checkpoints a fact has 6 noise distances, so the 95th percentile sits near their maximum: the rule
asks a change to exceed (almost) every difference that method settings alone produced. A checkpoint
compared with itself has distance 0 and never counts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from circuitdyn.attribution import DEFAULT_IG_GRID, DEFAULT_IG_STEPS
from circuitdyn.circuits import CircuitSet
from circuitdyn.errors import CircuitdynError
from circuitdyn.selection import Selection
from circuitdyn.similarity import DISTANCES, distances

NOISE_QUANTILE = 0.95
"""A change counts as real when it exceeds this quantile of the fact's method-noise distances."""


@dataclass(frozen=True)
class Replicate:
    """One re-attribution setting of the same checkpoint."""

    name: str
    steps: int
    variant: int
    seed_offset: int


def replicates(method: str, steps: int) -> list[Replicate]:
    """The extraction as asked, then the method-noise replicates: 2m IG steps (EAP-IG only) and another
    corruption of the same kind."""
    out = [Replicate("as extracted", steps, 0, 0)]
    if method == "eap-ig":
        out.append(Replicate(f"{2 * steps} IG steps", 2 * steps, 0, 0))
    out.append(Replicate("other corruption", steps, 1, 1))
    if method != "eap-ig":
        out.append(Replicate("third corruption", steps, 2, 2))
    return out


@dataclass
class MethodNoise:
    """Method-noise distributions per fact, measured at `epochs` of a run with `replicate_names`.

    `distances`: long table (fact_id, epoch, pair, statistic, distance). `band`: [fact, edge] the largest
    |score difference| between replicates of one checkpoint (max over the noise epochs), in `fact_ids` order.
    """

    fact_ids: list[str]
    epochs: list[int]
    replicate_names: list[str]
    distances: pd.DataFrame
    band: Float[Tensor, "fact edge"]
    selection: str
    sizes: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Per (fact_id, epoch, replicate): circuit size and faithfulness reached (when the rule evaluates it)."""

    def per_fact(self, statistic: str = "edge_jaccard") -> pd.DataFrame:
        """Per fact: n noise distances, their median, `NOISE_QUANTILE` quantile and max."""
        if statistic not in DISTANCES:
            raise CircuitdynError(f"unknown statistic {statistic!r}; choose one of {', '.join(DISTANCES)}")
        d = self.distances[self.distances["statistic"] == statistic]
        g = d.astype({"distance": float}).groupby("fact_id")["distance"]
        out = pd.DataFrame({
            "n": g.count(),
            "median": g.median(),
            "q": g.quantile(NOISE_QUANTILE),
            "max": g.max(),
        })
        return out.reindex(self.fact_ids)

    def band_for(self, fact_ids: Sequence[str]) -> Float[Tensor, "fact edge"]:
        """The per-edge score noise band of these facts."""
        index = {f: i for i, f in enumerate(self.fact_ids)}
        missing = [f for f in fact_ids if f not in index]
        if missing:
            raise CircuitdynError(f"method noise was not measured for fact id(s) {missing[:3]}")
        return self.band[[index[f] for f in fact_ids]]

    def summary(self) -> dict[str, Any]:
        """Median over facts of each statistic's median noise distance, and what it rests on."""
        out: dict[str, Any] = {"epochs": self.epochs, "replicates": self.replicate_names, "selection": self.selection,
                               "quantile": NOISE_QUANTILE, "n_facts": len(self.fact_ids)}
        for stat in DISTANCES:
            pf = self.per_fact(stat)
            out[stat] = {"median_of_medians": _num(pf["median"].median()), "median_of_q": _num(pf["q"].median()),
                         "n_per_fact": int(pf["n"].min()) if len(pf) else 0}
        return out

    def to_dict(self) -> dict[str, Any]:
        """`summary()` plus each fact's distribution (for `--json`)."""
        per_fact = {stat: {f: [_num(x) for x in g["distance"]] for f, g in
                           self.distances[self.distances["statistic"] == stat].groupby("fact_id")}
                    for stat in DISTANCES}
        return {**self.summary(), "per_fact": per_fact}


def _num(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else round(x, 6)


Replica = tuple[str, CircuitSet, Tensor, "Tensor | None"]
"""(replicate name, circuit set, selected masks [fact, edge], faithfulness reached [fact] or None)."""


def noise_from_replicates(per_epoch: dict[int, list[Replica]], selection: str | Selection) -> MethodNoise:
    """`MethodNoise` from replicate circuits of the same checkpoints: per epoch, at least two replicates over
    the same facts (`Replica` tuples)."""
    if not per_epoch:
        raise CircuitdynError("method noise needs replicate circuits of at least one checkpoint")
    first = next(iter(per_epoch.values()))
    fact_ids, edges = list(first[0][1].fact_ids), first[0][1].edges
    rows, size_rows = [], []
    band = torch.zeros(len(fact_ids), len(edges))
    for epoch, reps in per_epoch.items():
        if len(reps) < 2:
            raise CircuitdynError(f"epoch {epoch}: method noise needs at least 2 replicates, got {len(reps)}")
        aligned = []
        for name, cs, masks, got in reps:
            if cs.edges != edges:
                raise CircuitdynError(f"epoch {epoch} replicate {name!r}: another graph than the other replicates")
            order = [cs.index(f) for f in fact_ids]
            m = masks[order]
            faith = [float("nan")] * len(fact_ids) if got is None else got[order].tolist()
            size_rows += [{"fact_id": f, "epoch": epoch, "replicate": name, "n_edges": int(n), "faithfulness": v}
                          for f, n, v in zip(fact_ids, m.sum(1).tolist(), faith)]
            aligned.append((name, cs.scores[order].float(), m))
        for (na, sa, ma), (nb, sb, mb) in itertools.combinations(aligned, 2):
            band = torch.maximum(band, (sa - sb).abs())
            dist = distances(sa, sb, ma, mb)
            # A replicate that came out identical for a fact (e.g. no other swap partner of the same length
            # exists) measured nothing: it is left out rather than counted as zero noise.
            same = (sa == sb).all(1).tolist()
            for stat in DISTANCES:
                rows += [{"fact_id": f, "epoch": epoch, "pair": f"{na} vs {nb}", "statistic": stat,
                          "distance": float(v)} for f, v, eq in zip(fact_ids, dist[stat], same) if not eq]
    names = [rep[0] for rep in first]
    table = pd.DataFrame(rows, columns=["fact_id", "epoch", "pair", "statistic", "distance"])
    return MethodNoise(fact_ids, sorted(per_epoch), names, table, band, str(Selection.parse(selection)),
                       pd.DataFrame(size_rows))


def change_table(observed: dict[str, np.ndarray], fact_ids: Sequence[str], noise: MethodNoise | None
                 ) -> pd.DataFrame:
    """Per fact and statistic: the observed distance, the fact's noise median and quantile, whether the
    change is beyond noise, the effect size (observed - noise median) and the share of noise distances at
    least as large as the observed one (`p_noise`, resolution 1/(n+1))."""
    frames = []
    for stat in DISTANCES:
        obs = np.asarray(observed[stat], dtype=float)
        df = pd.DataFrame({"fact_id": list(fact_ids), "statistic": stat, "distance": obs})
        if noise is None:
            df["noise_median"] = df["noise_q"] = np.nan
            df["n_noise"] = 0
            df["changed_beyond_noise"] = pd.array([pd.NA] * len(df), dtype="boolean")
            df["effect"] = df["p_noise"] = np.nan
        else:
            pf = noise.per_fact(stat).reindex(list(fact_ids))
            dist = noise.distances[noise.distances["statistic"] == stat].groupby("fact_id")["distance"]
            values = {f: g.to_numpy() for f, g in dist}
            df["noise_median"] = pf["median"].to_numpy()
            df["noise_q"] = pf["q"].to_numpy()
            df["n_noise"] = pf["n"].fillna(0).astype(int).to_numpy()
            defined = ~np.isnan(obs) & ~np.isnan(df["noise_q"].to_numpy())
            df["changed_beyond_noise"] = pd.array(
                [bool(o > q) if ok else pd.NA for o, q, ok in zip(obs, df["noise_q"], defined)], dtype="boolean")
            df["effect"] = obs - df["noise_median"].to_numpy()
            df["p_noise"] = [(1 + int((values.get(f, np.array([])) >= o).sum())) / (1 + len(values.get(f, [])))
                             if not np.isnan(o) else np.nan for f, o in zip(fact_ids, obs)]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def measure_method_noise(
    run: Any, facts: Any, epochs: Sequence[int], selection: str | Selection, *, method: str = "eap-ig",
    steps: int = DEFAULT_IG_STEPS, metric: str = "answer-logprob", seed: int = 0, folder: str | Path | None = None,
    batch_size: int = 8, progress: bool = False, ig_grid: str | None = None,
) -> MethodNoise:
    """Re-attribute `epochs` of `run` with every `replicates` setting (cached as circuit files in `folder`
    like any extraction), select each replicate's circuits with `selection` (faithfulness evaluated under
    the replicate's own corruption), and measure the distances between them.

    `facts` is a `circuitdyn.facts.FactSet` (its corruption variants are built from the same probes);
    `ig_grid`: the IG quadrature of every replicate (default `attribution.DEFAULT_IG_GRID`).
    """
    from circuitdyn.extraction import circuits_dir, extract_run, select_circuits

    if not epochs:
        raise CircuitdynError("method noise needs at least one checkpoint (noise epochs)")
    folder = Path(folder) if folder is not None else circuits_dir(run)
    sel = Selection.parse(selection)
    per_epoch: dict[int, list[Replica]] = {}
    for rep in replicates(method, steps):
        rep_facts = facts if rep.variant == 0 else facts.with_variant(rep.variant)
        done = extract_run(run, rep_facts, folder, list(epochs), method=method, steps=rep.steps,  # type: ignore[arg-type]
                           metric=metric, seed=seed + rep.seed_offset, batch_size=batch_size, progress=progress,
                           ig_grid=ig_grid or DEFAULT_IG_GRID)  # type: ignore[arg-type]
        for r in done:
            cs = CircuitSet.load(r.path)
            masks, got = select_circuits(run, r.epoch, cs, sel, rep_facts, cache_dir=folder)
            per_epoch.setdefault(r.epoch, []).append((rep.name, cs, masks, got))
    return noise_from_replicates(per_epoch, sel)


def merge_noise(parts: Sequence[MethodNoise]) -> MethodNoise:
    """Method noise measured on several runs (e.g. the two sides of a diff of two model folders), pooled."""
    if not parts:
        raise CircuitdynError("nothing to merge: no method noise")
    first = parts[0]
    for other in parts[1:]:
        if other.fact_ids != first.fact_ids or other.band.shape != first.band.shape:
            raise CircuitdynError("method noise of different facts or graphs cannot be pooled")
    band = torch.stack([p.band for p in parts]).amax(0)
    return MethodNoise(first.fact_ids, sorted({e for p in parts for e in p.epochs}), first.replicate_names,
                       pd.concat([p.distances for p in parts], ignore_index=True), band, first.selection,
                       pd.concat([p.sizes for p in parts], ignore_index=True))

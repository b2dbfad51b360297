"""Method noise: how much a circuit moves when nothing about the model changes, drawn as replicates.

A circuit is an estimate. circuitdyn declares a **family** of equally valid attribution settings and treats
each checkpoint's circuit as a draw from it (`FAMILIES`):

- `estimation`: the same question (the fact's corruption as built) with the IG integral evaluated on a
  randomly shifted midpoint grid (`attribution.grid_offset`: alpha = (k + u)/m, u drawn from the replicate's
  seed and the fact, so facts' draws are independent; noise-corrupted facts also get a new noise draw). It
  measures the estimator's own error.
- `question`: as `estimation`, and each fact's swap partner drawn among its first `N_VARIANTS` valid ones
  of equal token length (`FactSet.with_variant`, per fact). It adds how much the circuit depends on which
  counterfactual asks the question.

`draw_settings` draws seeds (and variants) at random, `pipeline.replicates.replicate_scores` extracts them
(cached as circuit files like any extraction, so a re-run resumes), and `circuitdyn.analysis.change_test` tests
whether the checkpoint matters with an exact permutation test over the replicates of two checkpoints.
`MethodNoise` describes the same replicates: per fact and statistic, the distances between replicates of one
checkpoint, and per edge the noise band of its score (the largest |score difference| between replicates), which
diffs use to say whether an edge moved.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuitdyn.analysis.similarity import DISTANCES, distances
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.selection import Selection, top_n_by_fact
from circuitdyn.engine.settings import (
    DEFAULT_FAMILY,
    DEFAULT_REPLICATES,
    Family,
    IGGrid,
    check_family,
)
from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from circuitdyn.probes.facts import FactSet
    from circuitdyn.runs.checkpoints import Run

N_VARIANTS = 3
"""The `question` family draws the corruption's swap partner among the first 3 valid ones."""
REPLICATE_GRID: IGGrid = "shifted"
"""The IG rule of every replicate: a midpoint grid shifted by an offset drawn from the replicate's seed."""


@dataclass(frozen=True)
class Draw:
    """One replicate's setting: the extraction seed (each fact's grid offset, and the noise draw of
    noise-corrupted facts) and, in the `question` family, each fact's corruption variant drawn from the seed."""

    seed: int
    family: Family = DEFAULT_FAMILY

    @property
    def name(self) -> str:
        return f"s{self.seed}" + (" q" if self.family == "question" else "")

    def facts(self, facts: FactSet) -> FactSet:
        """The facts this replicate attributes: as built, or (`question` family) each with the swap partner
        drawn for it among its first `N_VARIANTS` valid ones."""
        if self.family != "question":
            return facts
        return facts.with_variant(
            {
                f: int(np.random.default_rng([self.seed, zlib.crc32(f.encode()), 0xF00D]).integers(N_VARIANTS))
                for f in facts.ids
            }
        )


def draw_settings(family: str, n: int, seed: int = 0) -> list[Draw]:
    """`n` independent draws from `family` (distinct seeds, so no two replicates coincide); callers slice one
    stream per study (e.g. draws [i r, (i + 1) r) for its i-th checkpoint), so that the replicates of any two
    checkpoints are independent draws of one distribution."""
    check_family(family)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CircuitdynError(f"the number of replicates must be a whole number >= 1, got {n!r}")
    rng = np.random.default_rng([int(seed), 0xD1CE])
    seeds: list[int] = []
    while len(seeds) < n:
        s = int(rng.integers(1, 2**31 - 1))
        if s not in seeds:
            seeds.append(s)
    return [Draw(s, family) for s in seeds]  # type: ignore[arg-type]


@dataclass
class MethodNoise:
    """Method noise per fact, described from the replicates of `epochs` (`replicate_names`).

    `distances`: long table (fact_id, epoch, pair, statistic, distance) of every pair of replicates of one
    checkpoint. `band`: [fact, edge] the largest |score difference| between replicates of one checkpoint (max
    over the checkpoints), in `fact_ids` order. `replicates`: per checkpoint key (an epoch, or 0 and 1 for the
    two sides of a diff of two runs), the replicate scores [rep, fact, edge] the change test uses.
    """

    fact_ids: list[str]
    epochs: list[int]
    replicate_names: list[str]
    distances: pd.DataFrame
    band: Float[Tensor, "fact edge"]
    selection: str
    sizes: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Per (fact_id, epoch, replicate): circuit size and faithfulness reached (when the rule evaluates it)."""
    family: str = DEFAULT_FAMILY
    replicates: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def per_fact(self, statistic: str = "edge_jaccard") -> pd.DataFrame:
        """Per fact: n noise distances, their median and max."""
        if statistic not in DISTANCES:
            raise CircuitdynError(f"unknown statistic {statistic!r}; choose one of {', '.join(DISTANCES)}")
        d = self.distances[self.distances["statistic"] == statistic]
        g = d.astype({"distance": float}).groupby("fact_id")["distance"]
        out = pd.DataFrame({"n": g.count(), "median": g.median(), "max": g.max()})
        return out.reindex(self.fact_ids)

    def to_frame(self) -> pd.DataFrame:
        """The tidy table of every replicate pair's distance (fact_id, epoch, pair, statistic, distance)."""
        return self.distances.copy()

    def _repr_html_(self) -> str:
        import html

        head = (
            f"method noise: {len(self.replicate_names)} replicates ('{self.family}' family) at epochs {self.epochs}, "
            f"{len(self.fact_ids)} facts, circuits {self.selection}; per fact, edge-set distance between replicates:"
        )
        return f"<p>{html.escape(head)}</p>" + self.per_fact().to_html(float_format="{:.3f}".format)

    def band_for(self, fact_ids: Sequence[str]) -> Float[Tensor, "fact edge"]:
        """The per-edge score noise band of these facts."""
        index = {f: i for i, f in enumerate(self.fact_ids)}
        missing = [f for f in fact_ids if f not in index]
        if missing:
            raise CircuitdynError(f"method noise was not measured for fact id(s) {missing[:3]}")
        return self.band[[index[f] for f in fact_ids]]

    def replicates_for(self, key: int, fact_ids: Sequence[str]) -> Tensor | None:
        """The replicate scores [rep, fact, edge] of checkpoint `key` for these facts (None if not drawn)."""
        if key not in self.replicates:
            return None
        index = {f: i for i, f in enumerate(self.fact_ids)}
        return self.replicates[key][:, [index[f] for f in fact_ids]]

    def summary(self) -> dict[str, Any]:
        """Median over facts of each statistic's median noise distance, and what it rests on."""
        out: dict[str, Any] = {
            "epochs": self.epochs,
            "replicates": self.replicate_names,
            "selection": self.selection,
            "family": self.family,
            "n_facts": len(self.fact_ids),
        }
        for stat in DISTANCES:
            pf = self.per_fact(stat)
            out[stat] = {
                "median_of_medians": _num(pf["median"].median()),
                "n_per_fact": int(pf["n"].min()) if len(pf) and pf["n"].notna().all() else 0,
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """`summary()` plus each fact's distribution (for `--json`)."""
        per_fact = {
            stat: {
                f: [_num(x) for x in g["distance"]]
                for f, g in self.distances[self.distances["statistic"] == stat].groupby("fact_id")
            }
            for stat in DISTANCES
        }
        return {**self.summary(), "per_fact": per_fact}


def _num(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else round(x, 6)


Replica = tuple[str, CircuitSet, Tensor, "Tensor | None"]
"""(replicate name, circuit set, selected masks [fact, edge], faithfulness reached [fact] or None)."""
Aligned = tuple[str, Tensor, Tensor, "list[float]"]
"""(replicate name, scores [fact, edge], masks [fact, edge], faithfulness per fact) in one fact order."""


def _describe(
    fact_ids: list[str],
    per_epoch: dict[int, list[Aligned]],
    selection: str,
    family: str,
    replicates: dict[int, Tensor] | None = None,
) -> MethodNoise:
    rows, size_rows = [], []
    n_edges = next(iter(per_epoch.values()))[0][1].shape[1]
    band = torch.zeros(len(fact_ids), n_edges)
    for epoch, reps in per_epoch.items():
        if len(reps) < 2:
            raise CircuitdynError(f"epoch {epoch}: method noise needs at least 2 replicates, got {len(reps)}")
        for name, _, m, faith in reps:
            size_rows += [
                {"fact_id": f, "epoch": epoch, "replicate": name, "n_edges": int(n), "faithfulness": v}
                for f, n, v in zip(fact_ids, m.sum(1).tolist(), faith)
            ]
        for (na, sa, ma, _), (nb, sb, mb, _) in itertools.combinations(reps, 2):
            band = torch.maximum(band, (sa - sb).abs())
            dist = distances(sa, sb, ma, mb)
            # A replicate that came out identical for a fact (e.g. no other swap partner of the same length
            # exists) measured nothing: it is left out rather than counted as zero noise.
            same = (sa == sb).all(1).tolist()
            for stat in DISTANCES:
                rows += [
                    {"fact_id": f, "epoch": epoch, "pair": f"{na} vs {nb}", "statistic": stat, "distance": float(v)}
                    for f, v, eq in zip(fact_ids, dist[stat], same)
                    if not eq
                ]
    names = [rep[0] for rep in next(iter(per_epoch.values()))]
    table = pd.DataFrame(rows, columns=["fact_id", "epoch", "pair", "statistic", "distance"])
    return MethodNoise(
        fact_ids,
        sorted(per_epoch),
        names,
        table,
        band,
        selection,
        pd.DataFrame(size_rows),
        family,
        dict(replicates or {}),
    )


def noise_from_replicates(
    per_epoch: dict[int, list[Replica]], selection: Selection, family: str = DEFAULT_FAMILY
) -> MethodNoise:
    """`MethodNoise` from replicate circuit sets of the same checkpoints: per epoch, at least two replicates
    over the same facts (`Replica` tuples, circuits already selected). Their scores become the replicates
    the change test draws on."""
    if not per_epoch:
        raise CircuitdynError("method noise needs replicate circuits of at least one checkpoint")
    first = next(iter(per_epoch.values()))
    fact_ids, edges = list(first[0][1].fact_ids), first[0][1].edges
    aligned: dict[int, list[Aligned]] = {}
    for epoch, reps in per_epoch.items():
        for name, cs, masks, got in reps:
            if cs.edges != edges:
                raise CircuitdynError(f"epoch {epoch} replicate {name!r}: another graph than the other replicates")
            order = [cs.index(f) for f in fact_ids]
            faith = [float("nan")] * len(fact_ids) if got is None else got[order].tolist()
            aligned.setdefault(epoch, []).append((name, cs.scores[order].float(), masks[order], faith))
    replicates = {e: torch.stack([a[1] for a in reps]) for e, reps in aligned.items()}
    return _describe(fact_ids, aligned, str(selection), family, replicates)


def noise_from_scores(
    replicates: dict[int, Float[Tensor, "rep fact edge"]],
    fact_ids: Sequence[str],
    sizes: dict[int, Int[Tensor, " fact"]],
    selection: Selection,
    draws: Mapping[int, Sequence[Draw]],
    family: str = DEFAULT_FAMILY,
) -> MethodNoise:
    """`MethodNoise` from replicate scores per checkpoint key; each replicate's circuit is its top-n edges at
    the size of the fact's selected circuit there (`sizes`), so replicates differ only in their scores."""
    if not replicates:
        raise CircuitdynError("method noise needs replicate circuits of at least one checkpoint")
    aligned: dict[int, list[Aligned]] = {}
    for key, reps in replicates.items():
        nan = [float("nan")] * len(fact_ids)
        aligned[key] = [(d.name, r, top_n_by_fact(r, sizes[key]), nan) for d, r in zip(draws[key], reps)]
    return _describe(list(fact_ids), aligned, str(selection), family, replicates)


def run_draws(
    run: Run, epochs: Sequence[int], family: str = DEFAULT_FAMILY, r: int = DEFAULT_REPLICATES, seed: int = 0
) -> dict[int, list[Draw]]:
    """The replicate draws of these epochs of `run`: the i-th epoch of the run takes draws [i r, (i + 1) r) of
    the stream `seed`, so a checkpoint's replicates are the same in every study of the run (and cached once),
    and two checkpoints never share a draw."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 2:
        raise CircuitdynError(f"replicates per checkpoint must be a whole number >= 2, got {r!r}")
    stream = draw_settings(family, r * len(run.epochs), seed)
    return {e: stream[run.epochs.index(e) * r : (run.epochs.index(e) + 1) * r] for e in epochs}


def merge_noise(parts: Sequence[MethodNoise]) -> MethodNoise:
    """Method noise measured on two runs (the two sides of a diff of two model folders), pooled; the first
    part's replicates become key 0 and the second's key 1."""
    if len(parts) != 2:
        raise CircuitdynError(f"merge_noise pools the two sides of a diff, got {len(parts)} parts")
    first, second = parts
    if second.fact_ids != first.fact_ids or second.band.shape != first.band.shape:
        raise CircuitdynError("method noise of different facts or graphs cannot be pooled")
    band = torch.maximum(first.band, second.band)
    reps = {k: next(iter(p.replicates.values())) for k, p in enumerate(parts) if p.replicates}
    return MethodNoise(
        first.fact_ids,
        sorted({e for p in parts for e in p.epochs}),
        first.replicate_names,
        pd.concat([p.distances for p in parts], ignore_index=True),
        band,
        first.selection,
        pd.concat([p.sizes for p in parts], ignore_index=True),
        first.family,
        reps,
    )

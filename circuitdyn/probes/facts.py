"""The one road from a probe set to the facts that attribution, patching and every command consume.

`load_facts(probes, tokenizer, ...)` reads a probe file (or the packaged validation probes), picks the
facts to study, and builds each one's clean prompt, answer, corrupted prompt and contrast token
(`circuitdyn.probes.probes.build_fact_prompts`). Every command and the Python API go through it, so that
`extract`, `diff`, `timeline` and `demo` build the same facts from the same file and settings.

Facts are chosen **before** any outcome is seen: all of the file, its first `limit` probes, or a fixed
seeded sample of `sample` probes (`probes.sample`). The swap pool of the corruption is always the whole
file, so choosing fewer facts never changes a fact's corruption.

A `FactSet`'s `identity` is a hash of its facts' ids, tokens, answers, corruptions and contrast tokens;
every circuit file stores it (`probe_set_hash`), so a command reuses circuits of the same facts and
refuses circuits of others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.probes import FactPrompt, Probe, Template, build_fact_prompts, load_probes, sample
from circuitdyn.probes.probes import entities as entity_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from circuitdyn.runs.checkpoints import Run


def facts_hash(facts: Sequence[FactPrompt]) -> str:
    """A content hash of attribution inputs (ids, tokens, answers, corruptions, contrast tokens)."""
    blob = json.dumps([dataclasses.asdict(f) for f in facts], sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def check_context(facts: Sequence[FactPrompt], n_ctx: int) -> None:
    """Refuse, before any model is loaded, a fact whose prompt and answer need more positions than the
    model's context; the message names the fact and its probe file."""
    for f in facts:
        need = len(f.clean_tokens) + len(f.answer_tokens) - 1
        if need > n_ctx:
            source = getattr(facts, "source", None)
            raise CircuitdynError(
                f"{source + ': ' if source else ''}fact {f.fact_id!r} needs {need} positions (prompt "
                f"{len(f.clean_tokens)} + answer {len(f.answer_tokens)} tokens), more than the model's context "
                f"of {n_ctx}; shorten it or leave it out (--entities, --limit)"
            )


@dataclass(frozen=True)
class FactSet(Sequence[FactPrompt]):
    """Facts ready for attribution, with the probes they come from (entities, questions) and their source."""

    facts: tuple[FactPrompt, ...]
    probes: tuple[Probe, ...]
    source: str
    pool: tuple[Probe, ...] = ()
    """The probe set the corruption's swap partners come from (the whole file)."""
    template: Template = "auto"
    variant: int | tuple[tuple[str, int], ...] = 0
    """Which valid swap partner each fact's corruption uses (0 = the first; see `build_fact_prompts`), for all
    facts or per fact id."""
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, compare=False, repr=False)
    options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The arguments `load_facts` was called with (`probes`: the probe file's absolute path, or None for the
    packaged validation probes; absent for probes given in memory), so that the facts can be rebuilt
    (`record_facts`, `run_facts`)."""

    def __post_init__(self) -> None:
        if not self.facts:
            raise CircuitdynError(f"{self.source}: no facts chosen")
        if [f.fact_id for f in self.facts] != [p.id for p in self.probes]:
            raise CircuitdynError("FactSet: facts and probes must be given in the same order")

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[FactPrompt]:
        return iter(self.facts)

    @overload
    def __getitem__(self, i: int) -> FactPrompt: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[FactPrompt, ...]: ...

    def __getitem__(self, i: int | slice) -> FactPrompt | tuple[FactPrompt, ...]:
        return self.facts[i]

    @cached_property
    def identity(self) -> str:
        """`facts_hash` of the facts: what circuit files record as `probe_set_hash`."""
        return facts_hash(self.facts)

    @property
    def ids(self) -> list[str]:
        return [f.fact_id for f in self.facts]

    @cached_property
    def entity_of(self) -> dict[str, str]:
        """fact id -> entity (the unit a bootstrap resamples: facts of one entity are not independent)."""
        return {p.id: p.entity for p in self.probes}

    @cached_property
    def labels(self) -> dict[str, str]:
        """fact id -> "entity: question", for viewers and tables."""
        return {p.id: f"{p.entity}: {p.question}" for p in self.probes}

    def with_variant(self, variant: int | Mapping[str, int]) -> FactSet:
        """The same facts with another corruption of the same kind: the (variant+1)-th valid swap partner, for
        all facts or per fact id. Facts corrupted by noise keep their positions; their noise changes with the
        extraction seed."""
        if self.tokenizer is None:
            raise CircuitdynError("this fact set was not built by load_facts (no tokenizer): no corruption variants")
        facts = build_fact_prompts(
            self.probes, self.tokenizer, template=self.template, pool=self.pool or self.probes, variant=variant
        )
        key = variant if isinstance(variant, int) else tuple(sorted(variant.items()))
        return FactSet(
            tuple(facts),
            self.probes,
            self.source,
            self.pool,
            self.template,
            key,
            self.tokenizer,
            {**self.options, "variant": key} if self.options else {},
        )

    def subset(self, fact_ids: Sequence[str]) -> FactSet:
        """These facts only (in this set's order), with the same swap pool, template and tokenizer."""
        self.by_id(fact_ids)  # an unknown id is an error naming it
        keep = set(fact_ids)
        idx = [i for i, f in enumerate(self.facts) if f.fact_id in keep]
        return dataclasses.replace(
            self, facts=tuple(self.facts[i] for i in idx), probes=tuple(self.probes[i] for i in idx), options={}
        )

    def by_id(self, fact_ids: Sequence[str]) -> list[FactPrompt]:
        """The facts of these ids, in that order; an unknown id is an error naming it."""
        index = {f.fact_id: f for f in self.facts}
        missing = [f for f in fact_ids if f not in index]
        if missing:
            raise CircuitdynError(
                f"{self.source}: no fact with id(s) {missing[:3]} (the facts do not match the circuits)"
            )
        return [index[f] for f in fact_ids]


def load_facts(
    probes: str | Path | Sequence[Probe] | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    limit: int | None = None,
    sample_n: int | None = None,
    per_entity: int | None = None,
    entities: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    seed: int = 0,
    rephrased: bool = False,
    template: Template = "auto",
) -> FactSet:
    """The facts of a probe set: a probe file (seed JSON or JSONL), probes in memory, or None for the
    packaged validation probes.

    `limit` keeps the first N probes, `sample_n` a fixed seeded sample of N, `per_entity` a fixed seeded
    sample of N probes of every entity (file order kept); all are chosen before any outcome is seen.
    `entities` keeps only these entities' probes, `ids` only these probe ids (an unknown one is an error);
    the swap pool stays the whole probe set either way. `rephrased` adds the seed's rephrased questions
    (off: they restate the original facts). The corruption's swap pool is the whole probe set.
    """
    if limit is not None and limit < 1:
        raise CircuitdynError(f"limit must be >= 1, got {limit}")
    if sample_n is not None and sample_n < 1:
        raise CircuitdynError(f"sample must be >= 1, got {sample_n}")
    if per_entity is not None and per_entity < 1:
        raise CircuitdynError(f"per_entity must be >= 1, got {per_entity}")
    if probes is None or isinstance(probes, (str, Path)):
        source = str(probes) if probes is not None else "packaged validation probes"
        pool = load_probes(probes, rephrased=rephrased)
    else:
        source, pool = "probes", list(probes)
        if not pool:
            raise CircuitdynError("no probes given")
    chosen = pool[:limit] if limit else pool
    if entities is not None:
        known_entities = set(entity_names(chosen))
        missing = [e for e in entities if e not in known_entities]
        if missing:
            raise CircuitdynError(f"{source}: no probes of entity {missing[0]!r} (e.g. {sorted(known_entities)[:3]})")
        chosen = [p for p in chosen if p.entity in set(entities)]
    if ids is not None:
        known = {p.id for p in chosen}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise CircuitdynError(f"{source}: no probe with id(s) {unknown[:3]}")
        wanted = set(ids)
        chosen = [p for p in chosen if p.id in wanted]
    chosen = sample(chosen, sample_n, seed) if sample_n else chosen
    if per_entity:
        keep = {
            p.id for e in entity_names(chosen) for p in sample([q for q in chosen if q.entity == e], per_entity, seed)
        }
        chosen = [p for p in chosen if p.id in keep]
    try:
        facts = build_fact_prompts(chosen, tokenizer, template=template, pool=pool)
    except CircuitdynError as err:
        raise CircuitdynError(f"{source}: {err}") from None
    options: dict[str, Any] = {
        "limit": limit,
        "sample_n": sample_n,
        "per_entity": per_entity,
        "entities": None if entities is None else list(entities),
        "ids": None if ids is None else list(ids),
        "seed": seed,
        "rephrased": rephrased,
        "template": template,
    }
    if probes is None or isinstance(probes, (str, Path)):
        options = {"probes": None if probes is None else str(Path(probes).expanduser().resolve()), **options}
    return FactSet(tuple(facts), tuple(chosen), source, tuple(pool), template, 0, tokenizer, options)


@dataclass(frozen=True)
class FactSpec:
    """Which facts to study, before there is a tokenizer: a probe file (None: the packaged validation probes) and
    the choice among its probes, as `load_facts` takes it. `load(tokenizer)` builds the `FactSet`; a spec is
    what a command line or a diff of two runs (each side tokenizes the same choice) carries."""

    probes: str | Path | None = None
    limit: int | None = None
    sample_n: int | None = None
    per_entity: int | None = None
    entities: tuple[str, ...] | None = None
    ids: tuple[str, ...] | None = None
    seed: int = 0
    rephrased: bool = False
    template: Template = "auto"

    def load(self, tokenizer: PreTrainedTokenizerBase) -> FactSet:
        """The facts of this choice, tokenized by `tokenizer` (`load_facts`)."""
        return load_facts(
            self.probes,
            tokenizer,
            limit=self.limit,
            sample_n=self.sample_n,
            per_entity=self.per_entity,
            entities=None if self.entities is None else list(self.entities),
            ids=None if self.ids is None else list(self.ids),
            seed=self.seed,
            rephrased=self.rephrased,
            template=self.template,
        )

    @classmethod
    def of(cls, facts: FactSet) -> FactSpec | None:
        """The spec `load_facts` built `facts` from (None for facts not read from a probe file or the packaged
        probes, or of another corruption variant)."""
        o = facts.options
        if not o or "probes" not in o or o.get("variant"):
            return None
        entities, ids = (None if o[k] is None else tuple(o[k]) for k in ("entities", "ids"))
        return cls(
            o["probes"],
            o["limit"],
            o["sample_n"],
            o["per_entity"],
            entities,
            ids,
            o["seed"],
            o["rephrased"],
            o["template"],
        )

    @property
    def choice(self) -> str:
        """How these facts are chosen, for the reader of a timeline."""
        return (
            "seeded sample, chosen before outcomes"
            if self.sample_n or self.per_entity
            else "the probe file's facts, in file order"
        )


# --------------------------------------------------------------------------- the facts a run remembers

FACTS_FILE = "facts.json"
"""In a circuits folder: the fact sets whose circuits were extracted there (probe file, options, identity)."""

OPTION_KEYS = ("limit", "sample_n", "per_entity", "entities", "ids", "seed", "rephrased", "template")


def record_facts(folder: str | Path, facts: FactSet) -> Path | None:
    """Record in `folder/facts.json` how to rebuild `facts` (its probe file's absolute path, the `load_facts`
    options and the fact set's identity), keyed by identity beside the fact sets recorded before; the most
    recent becomes the `default`. Only fact sets read from a probe file (or the packaged probes) by `load_facts`
    are recorded (None otherwise). The file is rewritten atomically, under a lock, and only when it changes."""
    from circuitdyn.io import file_lock, write_json_atomic

    options = getattr(facts, "options", None) or {}
    if "probes" not in options or options.get("variant"):
        return None
    path = Path(folder) / FACTS_FILE
    entry = {
        "probes": options["probes"],
        "options": {k: options.get(k) for k in OPTION_KEYS},
        "n_facts": len(facts),
        "source": facts.source,
    }
    with file_lock(path):
        data = _read_facts_file(path) if path.is_file() else {"default": None, "fact_sets": {}}
        if data.get("default") == facts.identity and data["fact_sets"].get(facts.identity) == entry:
            return path
        data["fact_sets"].pop(facts.identity, None)
        data["fact_sets"][facts.identity] = entry  # insertion order: the most recent last
        data["default"] = facts.identity
        write_json_atomic(path, data)
    return path


def _read_facts_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CircuitdynError(f"{path}: cannot read the run's recorded facts ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("fact_sets"), dict):
        raise CircuitdynError(f"{path}: not a circuitdyn facts record (no 'fact_sets')")
    return data


def recorded_facts(folder: str | Path) -> dict[str, Any] | None:
    """The contents of `folder/facts.json` (`default`: the identity of the most recent fact set; `fact_sets`:
    identity -> probe file, options, number of facts), or None when nothing was recorded there."""
    path = Path(folder) / FACTS_FILE
    return _read_facts_file(path) if path.is_file() else None


def run_facts(run: Run, *, folder: str | Path | None = None, identity: str | None = None) -> FactSet:
    """The fact set last extracted for `run` (a `checkpoints.Run` or its folder), rebuilt from the record in its
    circuits folder (`folder`, default `checkpoints.circuits_dir(run)`); `identity` picks another recorded one.
    A clear error when nothing is recorded, the probe file moved, or it no longer gives the same facts."""
    from circuitdyn.runs.checkpoints import circuits_dir, open_run

    run = open_run(run) if isinstance(run, (str, Path)) else run
    folder = Path(folder) if folder is not None else circuits_dir(run)
    data = recorded_facts(folder)
    if not data or not data["fact_sets"]:
        raise CircuitdynError(
            f"{run.path}: no recorded facts in {folder} (extract circuits with a probe file "
            "first, or pass the probe file: --probes FILE / load_facts(FILE, run))"
        )
    key = identity or data.get("default") or next(reversed(data["fact_sets"]))
    if key not in data["fact_sets"]:
        raise CircuitdynError(
            f"{folder / FACTS_FILE}: no recorded fact set {key!r} (recorded: {list(data['fact_sets'])})"
        )
    entry = data["fact_sets"][key]
    probes = entry.get("probes")
    if probes is not None and not Path(probes).is_file():
        raise CircuitdynError(
            f"{run.path}: the run's facts came from the probe file {probes}, which is no longer "
            "there (moved or deleted); pass the probe file again (--probes FILE)"
        )
    facts = load_facts(
        probes, run.tokenizer(), **{k: v for k, v in entry.get("options", {}).items() if k in OPTION_KEYS}
    )
    if facts.identity != key:
        raise CircuitdynError(
            f"{run.path}: the probe file {probes} no longer gives the facts the run's circuits "
            f"were extracted for (identity {facts.identity[:19]}... vs recorded {key[:19]}...); "
            "it changed since; pass the probe file and options again (--probes FILE)"
        )
    return facts

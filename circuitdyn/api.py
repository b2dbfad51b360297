"""The notebook's front door, and the command line's: thin functions over the modules, re-exported by `circuitdyn`.

    import circuitdyn as cd
    run = cd.open_run("runs/my-run")
    facts = cd.load_facts("probes.jsonl", run, per_entity=3)
    circuits = cd.extract(run, facts)          # epoch -> CircuitSet (cached in RUN/circuits)
    tl = cd.timeline(run, facts)               # a Timeline; tl.to_frame(), tl.figure(), tl.describe()
    d = cd.diff(f"{run.path}:0", f"{run.path}:5", "probes.jsonl")

This is where loose input becomes values: a run's folder is opened, a probe file becomes a `FactSpec` and its
facts, a selection rule is parsed (`Selection.parse`), settings chosen only in part (a dict of
`AttributionSettings` fields) are completed, as the command line completes them: with the settings of the
circuits cached for the run's recorded facts, else the defaults. Everything below takes the values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from circuitdyn.analysis.across_runs import AcrossRuns
    from circuitdyn.analysis.diff import CircuitDiff
    from circuitdyn.analysis.timeline import Timeline
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.engine.selection import Selection
    from circuitdyn.engine.settings import AttributionSettings, Comparison, Compute, Storage
    from circuitdyn.pipeline.compare import Side
    from circuitdyn.probes.facts import FactSet, FactSpec
    from circuitdyn.runs.checkpoints import Run

Log = Callable[[str], None]


def _run(run: str | Path | Run) -> Run:
    from circuitdyn.runs.checkpoints import open_run

    return open_run(run) if isinstance(run, (str, Path)) else run


def _is_run(x: Any) -> bool:
    return hasattr(x, "tokenizer") and hasattr(x, "epochs") and hasattr(x, "checkpoint")


def load_facts(probes: Any = None, tokenizer: Any = None, **options: Any) -> FactSet:
    """The facts to study (`circuitdyn.probes.facts.load_facts`), with a run standing in for its tokenizer:

    - `load_facts(run)`: the facts last extracted for the run (`facts.run_facts`, from `RUN/circuits/facts.json`);
    - `load_facts("probes.jsonl", run, per_entity=3)`: a probe file's facts, tokenized by the run's tokenizer
      (`limit`, `sample_n`, `per_entity`, `entities`, `ids`, `seed`, `rephrased`, `template`);
    - `load_facts(None, run)`: the packaged validation probes; a tokenizer may be given instead of a run.
    """
    from circuitdyn.probes import facts as facts_mod

    if _is_run(probes) and tokenizer is None:
        return facts_mod.run_facts(probes, **{k: v for k, v in options.items() if k in ("folder", "identity")})
    if tokenizer is None:
        raise CircuitdynError(
            "load_facts needs a run (or a tokenizer) to tokenize the probes: "
            "load_facts(FILE, run), or load_facts(run) for the run's recorded facts"
        )
    if isinstance(tokenizer, (str, Path)):
        tokenizer = _run(tokenizer)
    if _is_run(tokenizer):
        tokenizer = tokenizer.tokenizer()
    return facts_mod.load_facts(probes, tokenizer, **options)


def settings_of(settings: AttributionSettings | Mapping[str, Any] | None) -> AttributionSettings:
    """Complete settings: as given, or the fields of a dict with the defaults for the others."""
    from circuitdyn.engine.settings import AttributionSettings

    return settings if isinstance(settings, AttributionSettings) else AttributionSettings(**dict(settings or {}))


@dataclass(frozen=True)
class Chosen:
    """What a command works on, once its loose input is resolved: the facts (None: the cached circuits are read
    as they are), the spec they come from, the complete settings, or (without facts) the metadata filter of the
    cached circuits to read."""

    facts: FactSet | None
    spec: FactSpec | None
    settings: AttributionSettings | None
    where: dict[str, Any] | None

    @property
    def fact_choice(self) -> str:
        return self.spec.choice if self.spec is not None else "given"


def choose(
    run: Run,
    folder: Path,
    facts: FactSet | FactSpec | str | Path | None,
    settings: AttributionSettings | Mapping[str, Any] | None,
    log: Log | None = None,
) -> Chosen:
    """Resolve a command's facts and settings for `run`, whose circuits are cached in `folder`.

    Facts: a `FactSet`, a `FactSpec` or a probe file (tokenized by the run), or None: the run's recorded facts
    (`facts.run_facts`) when it has them, else none (the cached circuits are read as they are). Settings:
    complete (`AttributionSettings`), a dict of the fields chosen, or None (nothing chosen).

    With facts given, settings chosen in part get the defaults. With the run's recorded facts, they get those of
    the facts' cached circuits when exactly one set of cached settings fits what was chosen (several: an error
    naming them), else the defaults. Without facts, what was chosen filters the cached circuits
    (`settings.settings_filter`)."""
    from circuitdyn.engine.settings import AttributionSettings, settings_filter
    from circuitdyn.probes.facts import FactSet, FactSpec, recorded_facts, run_facts

    if isinstance(facts, FactSet):
        return Chosen(facts, None, settings_of(settings), None)
    if facts is not None:
        named = facts if isinstance(facts, FactSpec) else FactSpec(facts)
        return Chosen(named.load(run.tokenizer()), named, settings_of(settings), None)
    complete = settings if isinstance(settings, AttributionSettings) else None
    given = None if isinstance(settings, AttributionSettings) else dict(settings or {})
    recorded = run_facts(run, folder=folder) if recorded_facts(folder) is not None else None
    spec = FactSpec.of(recorded) if recorded is not None else None
    if recorded is None or spec is None or spec.ids is not None or spec.probes is None:
        # no facts, or facts the command line cannot name: the cached circuits are read as they are
        if given is None:
            return Chosen(None, None, complete, None)
        return Chosen(
            None,
            None,
            None,
            settings_filter(given.get("method"), given.get("steps"), given.get("ig_grid"), given.get("seed", 0)),
        )
    if log is not None:
        log(f"facts: the run's recorded facts ({len(recorded)} facts from {spec.probes})")
    if given is None:
        return Chosen(recorded, spec, complete, None)
    fits = [
        c
        for c in cached_settings(folder, recorded.identity, given.get("seed", 0))
        if all(given.get(k) is None or getattr(c, k) == given[k] for k in ("method", "steps", "ig_grid"))
    ]
    if len(fits) > 1:
        options = "; ".join(f"method={c.method}, ig_steps={c.steps}, ig_grid={c.ig_grid}" for c in fits)
        raise CircuitdynError(
            f"{folder}: several circuit files of the run's recorded facts with different settings "
            f"({options}); choose with --method / --steps / --ig-grid"
        )
    if fits:
        given.update(method=fits[0].method, steps=fits[0].steps, ig_grid=fits[0].ig_grid)
    return Chosen(recorded, spec, AttributionSettings(**given), None)


def cached_settings(folder: str | Path, identity: str, seed: int = 0) -> list[AttributionSettings]:
    """The distinct settings (method, steps, IG grid) of the circuit files in `folder` of the fact set `identity`
    and extraction `seed`, method-noise replicates (`noise.REPLICATE_GRID`) left out: what a command reusing a
    run's recorded facts can take when it is not told the settings."""
    from circuitdyn.analysis.noise import REPLICATE_GRID
    from circuitdyn.engine.circuits import circuit_files, setting
    from circuitdyn.engine.settings import AttributionSettings

    found: list[AttributionSettings] = []
    for _, meta in circuit_files(folder) if Path(folder).is_dir() else []:
        if meta.get("probe_set_hash") != identity or meta.get("seed") != seed:
            continue
        grid = setting(meta, "ig_grid")
        if grid == REPLICATE_GRID:
            continue
        s = AttributionSettings(meta["method"], meta["ig_steps"], grid)
        if s not in found:
            found.append(s)
    return found


def extract(
    run: str | Path | Run,
    facts: FactSet | FactSpec | str | Path | None = None,
    settings: AttributionSettings | Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    epochs: Sequence[int] | None = None,
    compute: Compute | None = None,
    storage: Storage | None = None,
    progress: bool = False,
) -> dict[int, CircuitSet]:
    """Per-fact circuits at every epoch of `run` (a `Run` or its folder), as {epoch: CircuitSet}.

    `facts`: a `FactSet`, a `FactSpec` or a probe file (read with the run's tokenizer), or None for the run's
    recorded facts. `settings`: `AttributionSettings`, or a dict of its fields (the others the defaults).
    Circuits are written to `out` (default the run's circuits folder) and reused where cached
    (`extraction.extract_run`, run as `compute` says, stored as `storage` says).
    """
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.pipeline.extraction import extract_run
    from circuitdyn.probes.facts import FactSet, FactSpec
    from circuitdyn.runs.checkpoints import circuits_dir

    run = _run(run)
    if facts is None:
        facts = load_facts(run)
    elif not isinstance(facts, FactSet):
        facts = (facts if isinstance(facts, FactSpec) else FactSpec(facts)).load(run.tokenizer())
    done = extract_run(
        run,
        facts,
        out if out is not None else circuits_dir(run),
        epochs,
        settings_of(settings),
        compute,
        storage,
        progress=progress,
    )
    return {r.epoch: CircuitSet.load(r.path) for r in done}


def _side(side: str | Path | Side | tuple[Run, int]) -> Side:
    from circuitdyn.pipeline.compare import Side

    if isinstance(side, Side):
        return side
    if isinstance(side, tuple):
        run, epoch = side
        return Side(f"{run.path}:{epoch}", run, epoch)
    return Side.open(side)


def diff(
    a: str | Path | Side | tuple[Run, int],
    b: str | Path | Side | tuple[Run, int],
    facts: FactSpec | str | Path | None = None,
    settings: AttributionSettings | Mapping[str, Any] | None = None,
    comparison: Comparison | None = None,
    *,
    circuits: str | Path | None = None,
    fact_ids: list[str] | None = None,
    progress: bool = False,
    log: Log | None = None,
) -> CircuitDiff:
    """How the circuits changed between two checkpoints (`RUN:EPOCH`, a model folder, `(run, epoch)`, a
    `compare.Side`) or circuit files (`.safetensors`): `compare.diff_checkpoints`, circuits chosen and changes tested
    as `comparison` says (default `Comparison()`: `faith:0.8` circuits, 5 replicates per checkpoint).

    `facts`: a `FactSpec` or a probe file, tokenized by each side's run; None: the recorded facts of `a`'s run
    when it has them (see `choose`), else the cached circuits are read (`faith:` then needs facts).
    `settings`: see `choose`. `circuits`: the folder caching the circuits (default each run's). `log`: where
    the facts and the plan (`plan.diff_plan`: which circuit files are cached, which to compute) are said.
    """
    from circuitdyn.engine.settings import Comparison
    from circuitdyn.pipeline.compare import diff_checkpoints
    from circuitdyn.pipeline.plan import diff_plan
    from circuitdyn.probes.facts import FactSpec
    from circuitdyn.runs.checkpoints import circuits_dir

    sa, sb = _side(a), _side(b)
    cmp = comparison or Comparison()
    spec = facts if isinstance(facts, FactSpec) or facts is None else FactSpec(facts)
    if sa.run is None or sb.run is None or sa.epoch is None or sb.epoch is None:
        return diff_checkpoints(
            sa,
            sb,
            spec,
            settings_of(settings) if spec is not None else None,
            cmp,
            circuits_dir=circuits,
            fact_ids=fact_ids,
            where=None if spec is not None else _where(settings),
            progress=progress,
        )
    sides = [(sa.run, sa.epoch), (sb.run, sb.epoch)]
    folders = [Path(circuits) if circuits else circuits_dir(run) for run, _ in sides]
    chosen = choose(sa.run, folders[0], spec, settings, log)
    if chosen.facts is not None and log is not None:
        log(diff_plan(sides, chosen.facts, folders, chosen.settings, cmp).line())
    return diff_checkpoints(
        sa,
        sb,
        chosen.spec,
        chosen.settings,
        cmp,
        circuits_dir=circuits,
        fact_ids=fact_ids,
        where=chosen.where,
        progress=progress,
    )


def _where(settings: AttributionSettings | Mapping[str, Any] | None) -> dict[str, Any] | None:
    from circuitdyn.engine.settings import AttributionSettings, settings_filter

    if settings is None or isinstance(settings, AttributionSettings):
        return None
    return settings_filter(
        settings.get("method"), settings.get("steps"), settings.get("ig_grid"), settings.get("seed", 0)
    )


def timeline(
    run: str | Path | Run,
    facts: FactSet | FactSpec | str | Path | None = None,
    settings: AttributionSettings | Mapping[str, Any] | None = None,
    comparison: Comparison | None = None,
    *,
    circuits: str | Path | None = None,
    progress: bool = False,
    log: Log | None = None,
) -> Timeline:
    """The circuits of every epoch of `run` (a `Run` or its folder), joined with recall and loss and tested
    against method noise: `compare.load_run_timeline`, circuits chosen and changes tested as `comparison` says
    (default `Comparison()`; its `transfer` adds the transfer matrix, `Timeline.transfer`).

    `facts` and `settings`: see `choose` (None: the run's recorded facts when it has them, else its cached
    circuits as they are). `circuits`: the folder caching the circuits (default the run's). `log`:
    where the facts and the plan (`plan.timeline_plan`) are said.
    """
    from circuitdyn.engine.settings import Comparison
    from circuitdyn.io import check_writable
    from circuitdyn.pipeline.compare import load_run_timeline
    from circuitdyn.pipeline.plan import timeline_plan
    from circuitdyn.runs.checkpoints import circuits_dir

    run = _run(run)
    cmp = comparison or Comparison()
    folder = Path(circuits) if circuits else circuits_dir(run)
    chosen = choose(run, folder, facts, settings, log)
    if chosen.facts is not None:
        check_writable(folder, "folder", flag="--circuits" if circuits else "")
        if log is not None:
            log(timeline_plan(run, chosen.facts, folder, chosen.settings, cmp).line())
    return load_run_timeline(
        run,
        chosen.facts,
        chosen.settings,
        cmp,
        circuits_dir=folder,
        where=chosen.where,
        fact_choice=chosen.fact_choice,
        progress=progress,
    )


def load_circuits(path: str | Path) -> CircuitSet:
    """A circuit file (`.safetensors`) as a `CircuitSet` (`CircuitSet.load`)."""
    from circuitdyn.engine.circuits import CircuitSet

    return CircuitSet.load(path)


def diff_circuits(
    a: CircuitSet, b: CircuitSet, selection: str | Selection = "faith:0.8", **options: Any
) -> CircuitDiff:
    """`diff.diff_circuits` with the selection rule given as text (`top:200`, `faith:0.8`, ...) or a `Selection`;
    `options` as `diff.diff_circuits` takes them (noise, faithfulness, fact_ids, labels, ...)."""
    from circuitdyn.analysis.diff import diff_circuits as diff_sets
    from circuitdyn.engine.selection import Selection

    return diff_sets(a, b, Selection.parse(selection), **options)


def view(obj: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write the offline HTML viewer of a `CircuitSet`, `CircuitDiff` or `Timeline` to `path` (the pages of
    `circuitdyn.viz`: `write_circuit_html`, `write_diff_html`, `write_timeline_html`; keyword arguments go to
    them). For a figure inside the notebook, use the object's `figure()` (or `circuitdyn.viz.*_figure`)."""
    from circuitdyn import viz
    from circuitdyn.analysis.diff import CircuitDiff
    from circuitdyn.analysis.timeline import Timeline
    from circuitdyn.engine.circuits import CircuitSet

    if isinstance(obj, CircuitSet):
        return viz.write_circuit_html(obj, path, **kwargs)
    if isinstance(obj, CircuitDiff):
        return viz.write_diff_html(obj, path, **{"labels": obj.labels, **kwargs})
    if isinstance(obj, Timeline):
        return viz.write_timeline_html(obj, path, **kwargs)
    raise CircuitdynError(f"view takes a CircuitSet, CircuitDiff or Timeline, not {type(obj).__name__}")


def timelines(
    runs: Sequence[str | Path | Run],
    facts: FactSpec | str | Path | None = None,
    settings: AttributionSettings | Mapping[str, Any] | None = None,
    comparison: Comparison | None = None,
    *,
    progress: bool = False,
) -> AcrossRuns:
    """The timelines of several runs (e.g. the seeds of a sweep), each with its own circuits folder: per-epoch
    means with 95 % intervals across them (`across_runs.across_runs`) of the per-epoch tables and of the share
    of the circuit replaced per transition. `facts`: a `FactSpec` or probe file, tokenized by each run (None:
    each run's cached circuits as they are, filtered by `settings` chosen in part)."""
    from circuitdyn.analysis.across_runs import AcrossRuns, across_runs, records
    from circuitdyn.pipeline.compare import load_run_timeline
    from circuitdyn.probes.facts import FactSpec
    from circuitdyn.runs.checkpoints import circuits_dir

    names = [str(r) if isinstance(r, (str, Path)) else str(r.path) for r in runs]
    if len(set(names)) != len(names):
        raise CircuitdynError(f"a run folder is given twice: {names}")
    spec = facts if isinstance(facts, FactSpec) or facts is None else FactSpec(facts)
    per_epoch, changes = {}, {}
    for name, r in zip(names, runs):
        run = _run(r)
        tl = load_run_timeline(
            run,
            None if spec is None else spec.load(run.tokenizer()),
            settings_of(settings) if spec is not None else None,
            comparison,
            circuits_dir=circuits_dir(run),
            where=None if spec is not None else _where(settings),
            progress=progress,
        )
        per_epoch[name] = tl.per_epoch
        changes[name] = tl.reconfiguration
    table = across_runs(per_epoch)
    rec = across_runs(changes, [c for c in ("replaced", "noise") if all(c in t for t in changes.values())])
    shown = ("train_loss", "knowledge_accuracy", "fact_accuracy", "n_edges", "jaccard_prev", "jaccard_first")
    sections = [("", table[table["quantity"].isin(shown)])]
    if len(rec):
        sections.append(("share of the circuit replaced per transition, and method noise, across runs:", rec))
    return AcrossRuns(
        f"circuit timelines of {len(names)} runs: per-epoch mean [95 % bootstrap interval over runs]",
        sections,
        {"runs": names, "per_epoch": records(table), "reconfiguration": records(rec)},
    )


def view_circuits(
    file: str | Path,
    out: str | Path | None = None,
    *,
    probes: str | Path | None = None,
    fact_ids: Sequence[str] | None = None,
    overwrite: bool = False,
) -> tuple[CircuitSet, Path]:
    """The circuit viewer of a circuit file, written to `out` (default the file with `.html`): its facts labelled
    with their questions when `probes` (the probe file they come from) is given, only `fact_ids` when given
    (beside the mean circuit). Returns the circuit set and the page."""
    from circuitdyn.analysis.diff import MEAN, check_facts_match
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.io import check_writable
    from circuitdyn.probes.probes import load_probes
    from circuitdyn.viz import check_viewer_target, write_circuit_html

    page = Path(out) if out else Path(file).with_suffix(".html")
    if page.resolve() == Path(file).resolve():
        raise CircuitdynError(f"--out {page}: is the circuit file itself; choose another output file")
    cs = CircuitSet.load(file)
    flag = "--out" if out else ""
    check_writable(page, "file", flag=flag)
    if not overwrite:
        check_viewer_target(page, flag=flag)
    labels = {}
    if probes:
        labels = {p.id: f"{p.entity}: {p.question}" for p in load_probes(probes)}
        check_facts_match(cs, labels, probes, str(file))
    shown = [MEAN, *fact_ids] if fact_ids else None
    return cs, write_circuit_html(cs, page, facts=shown, labels=labels, overwrite=overwrite)

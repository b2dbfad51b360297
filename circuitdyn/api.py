"""The notebook's front door: thin functions over the modules, re-exported by `circuitdyn` itself.

    import circuitdyn as cd
    run = cd.open_run("runs/my-run")
    facts = cd.load_facts("probes.jsonl", run, per_entity=3)
    circuits = cd.extract(run, facts)          # epoch -> CircuitSet (cached in RUN/circuits)
    tl = cd.timeline(run, facts)               # a Timeline; tl.to_frame(), tl.figure(), tl.describe()
    d = cd.diff(f"{run.path}:0", f"{run.path}:5", "probes.jsonl")

Everything here accepts a run or its folder, and does nothing the modules do not: it picks the defaults the
command line picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from circuitdyn.checkpoints import Run
    from circuitdyn.circuits import CircuitSet
    from circuitdyn.facts import FactSet


def _run(run: str | Path | Run) -> Run:
    from circuitdyn.checkpoints import open_run

    return open_run(run) if isinstance(run, (str, Path)) else run


def _is_run(x: Any) -> bool:
    return hasattr(x, "tokenizer") and hasattr(x, "epochs") and hasattr(x, "checkpoint")


def load_facts(probes: Any = None, tokenizer: Any = None, **options: Any) -> FactSet:
    """The facts to study (`circuitdyn.facts.load_facts`), with a run standing in for its tokenizer:

    - `load_facts(run)`: the facts last extracted for the run (`facts.run_facts`, from `RUN/circuits/facts.json`);
    - `load_facts("probes.jsonl", run, per_entity=3)`: a probe file's facts, tokenized by the run's tokenizer
      (`limit`, `sample_n`, `per_entity`, `entities`, `ids`, `seed`, `rephrased`, `template`);
    - `load_facts(None, run)`: the packaged validation probes; a tokenizer may be given instead of a run.
    """
    from circuitdyn import facts as facts_mod

    if _is_run(probes) and tokenizer is None:
        return facts_mod.run_facts(probes, **{k: v for k, v in options.items() if k in ("folder", "identity")})
    if tokenizer is None:
        raise CircuitdynError("load_facts needs a run (or a tokenizer) to tokenize the probes: "
                              "load_facts(FILE, run), or load_facts(run) for the run's recorded facts")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = _run(tokenizer)
    if _is_run(tokenizer):
        tokenizer = tokenizer.tokenizer()
    return facts_mod.load_facts(probes, tokenizer, **options)


def extract(run: str | Path | Run, facts: FactSet | str | Path | None = None, *,
            out: str | Path | None = None, epochs: Sequence[int] | None = None,
            **kwargs: Any) -> dict[int, CircuitSet]:
    """Per-fact circuits at every epoch of `run` (a `Run` or its folder), as {epoch: CircuitSet}.

    `facts`: a `FactSet`, a probe file (read with the run's tokenizer), or None for the run's recorded facts.
    Circuits are written to `out` (default the run's circuits folder) and reused where cached;
    other keyword arguments go to `extraction.extract_run` (method, steps, metric, seed, batch_size, ...).
    """
    from circuitdyn.circuits import CircuitSet
    from circuitdyn.extraction import circuits_dir, extract_run

    run = _run(run)
    if facts is None:
        facts = load_facts(run)
    elif isinstance(facts, (str, Path)):
        facts = load_facts(facts, run)
    done = extract_run(run, facts, out if out is not None else circuits_dir(run), epochs, **kwargs)
    return {r.epoch: CircuitSet.load(r.path) for r in done}


def load_circuits(path: str | Path) -> CircuitSet:
    """A circuit file (`.safetensors`) as a `CircuitSet` (`CircuitSet.load`)."""
    from circuitdyn.circuits import CircuitSet

    return CircuitSet.load(path)


def view(obj: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write the offline HTML viewer of a `CircuitSet`, `CircuitDiff` or `Timeline` to `path` (the pages of
    `circuitdyn.viz`: `write_circuit_html`, `write_diff_html`, `write_timeline_html`; keyword arguments go to
    them). For a figure inside the notebook, use the object's `figure()` (or `circuitdyn.viz.*_figure`)."""
    from circuitdyn import viz
    from circuitdyn.circuits import CircuitSet
    from circuitdyn.diff import CircuitDiff
    from circuitdyn.timeline import Timeline

    if isinstance(obj, CircuitSet):
        return viz.write_circuit_html(obj, path, **kwargs)
    if isinstance(obj, CircuitDiff):
        return viz.write_diff_html(obj, path, **{"labels": obj.labels, **kwargs})
    if isinstance(obj, Timeline):
        return viz.write_timeline_html(obj, path, **kwargs)
    raise CircuitdynError(f"view takes a CircuitSet, CircuitDiff or Timeline, not {type(obj).__name__}")

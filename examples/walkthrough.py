# %% [markdown]
# # circuitdyn walk-through: what did continual pre-training change inside my model?
#
# Open a CPT run, extract a circuit for every probe fact at every epoch, measure how much circuits move
# when nothing but the method changes (method noise), diff two epochs against that noise, and follow the
# circuits across the run next to recall and training loss. Runs as a script
# (`python examples/walkthrough.py`) or cell by cell (`# %%`) in VS Code / Jupyter.
#
# Settings come from the environment: `CIRCUITDYN_RUN` (a run folder as written by `circuitdyn cpt` or
# `circuitdyn demo`; default `circuitdyn-demo/run`, what `make demo` leaves), `CIRCUITDYN_PROBES`
# (probe file; default: the demo's `probes.jsonl` beside the run when there is one, else the packaged
# probes), `CIRCUITDYN_FACTS` (how many facts, a seeded sample chosen before looking at outcomes; default 8),
# `CIRCUITDYN_OUT` (where HTML goes).

# %%
import os
import sys
from pathlib import Path

from circuitdyn.engine.selection import Selection
from circuitdyn.engine.settings import AttributionSettings, Comparison
from circuitdyn.probes.facts import load_facts
from circuitdyn.probes.probes import corruption_counts
from circuitdyn.runs.checkpoints import open_run

RUN = os.environ.get("CIRCUITDYN_RUN", "circuitdyn-demo/run")
DEMO_PROBES = Path(RUN).parent / "probes.jsonl"
PROBES = os.environ.get("CIRCUITDYN_PROBES") or (str(DEMO_PROBES) if DEMO_PROBES.is_file() else None)
N_FACTS = int(os.environ.get("CIRCUITDYN_FACTS", "8"))
OUT = Path(os.environ.get("CIRCUITDYN_OUT", "walkthrough-out"))
SHOW = "ipykernel" in sys.modules  # fig.show() in notebooks; files only when run as a script
SETTINGS = AttributionSettings(steps=3)  # EAP-IG with 3 interpolation steps (the paper used 30)
SELECTION = Selection("faith", 0.8)  # each fact's smallest circuit carrying 80 % of its metric gap on its own model

run = open_run(RUN)
first, last = run.epochs[0], run.epochs[-1]
print(f"{run.path}: epochs {run.epochs}, base model {run.base_model}")

# %% [markdown]
# ## Probe facts -> attribution inputs
# `load_facts` is the one road from a probe file to facts: each probe becomes a clean prompt, its answer
# tokens, a same-length corrupted prompt (the entity swapped for another of the same token length, or
# noise on its embeddings) and a contrast token for `logit-diff`. The facts are a seeded sample, chosen
# before looking at any outcome.

# %%
facts = load_facts(PROBES, run.tokenizer(), sample_n=N_FACTS)
print(f"{len(facts)} facts, corruption kinds {corruption_counts(facts)}")

# %% [markdown]
# ## One circuit per fact per epoch, and how much the method alone moves it
# `load_run_timeline` extracts every epoch's circuits (one file per epoch, reused when cached), sizes
# each fact's circuit by faithfulness on its own model, and re-attributes the first and last epochs with
# 2x IG steps and another corruption: the method-noise distribution every change is tested against.

# %%
from circuitdyn.pipeline.compare import load_run_timeline

timeline = load_run_timeline(
    run,
    facts,
    SETTINGS,
    Comparison(SELECTION, noise_epochs="ends"),
    fact_choice="seeded sample, chosen before outcomes",
    progress=True,
)
print(timeline.noise.per_fact("edge_jaccard").round(3))

# %%
from circuitdyn import viz
from circuitdyn.analysis.diff import MEAN

OUT.mkdir(parents=True, exist_ok=True)
circuits = timeline.circuits
fig = viz.circuit_figure(circuits[first], facts[0].fact_id, n=100, label=facts.labels[facts[0].fact_id])
if SHOW:
    fig.show()
print("circuit viewer:", viz.write_circuit_html(circuits[first], OUT / "circuit.html", labels=facts.labels))

# %% [markdown]
# ## How did the circuits change between the first and the last epoch?
# Per fact: the distance between the two epochs' circuits, next to that fact's method noise; a change
# counts only beyond the noise's 95th percentile. Aggregates come with 95 % intervals over entities.

# %%
from circuitdyn.analysis.diff import diff_circuits
from circuitdyn.analysis.report import describe_diff, describe_timeline

diff = diff_circuits(
    circuits[first],
    circuits[last],
    timeline.selection,
    noise=timeline.noise,
    labels=(f"epoch {first}", f"epoch {last}"),
    selected=(
        (timeline.fact_masks[first], timeline.reached.get(first)),
        (timeline.fact_masks[last], timeline.reached.get(last)),
    ),
    entity_of=facts.entity_of,
)
print("\n".join(describe_diff(diff)))
print(diff.changes[diff.changes["statistic"] == "edge_jaccard"].round(3).to_string(index=False))
print(diff.paths(MEAN))
if SHOW:
    viz.diff_figure(diff, MEAN).show()
    viz.sankey_figure(diff, MEAN).show()
print("diff viewer:", viz.write_diff_html(diff, OUT / "diff.html", labels=facts.labels))

# %% [markdown]
# ## Across the whole run
# The share of each fact's circuit replaced per epoch against method noise, edge lifetimes, and the join
# with recall: does a circuit stay put while its fact is recalled and change when recall flips?

# %%
print(timeline.per_epoch.round(3).to_string(index=False))
print(timeline.reconfiguration.round(3).to_string(index=False))
print("\n".join(describe_timeline(timeline)))
print(timeline.lifetimes.sort_values("persistence").head())
if SHOW:
    viz.timeline_figure(timeline).show()
    viz.heatmap_figure(timeline).show()
print("timeline viewer:", viz.write_timeline_html(timeline, OUT / "timeline.html", labels=facts.labels))

# %% [markdown]
# ## Does an old circuit still carry the fact on a later model?
# The share of each fact's metric gap that epoch i's circuit recovers on epoch j's model (faithfulness
# clipped to [0, 1]; facts whose gap on that model is too small to mean anything are left out and counted).

# %%
from circuitdyn.analysis.report import describe_transfer
from circuitdyn.analysis.transfer import transfer_matrix, transfer_pivot, transfer_summary
from circuitdyn.pipeline.extraction import run_evaluator

transfer = transfer_matrix(circuits, run_evaluator(run, facts), timeline.selection, selected=timeline.fact_masks)
print(transfer_pivot(transfer).round(3))
print("\n".join(describe_transfer(transfer_summary(transfer, facts.entity_of))))

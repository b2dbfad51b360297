# %% [markdown]
# # circuitdyn walk-through: what did continual pre-training change inside my model?
#
# Open a CPT run, extract a circuit for every probe fact at every epoch, diff two epochs, and follow
# the circuits across the run next to recall and training loss. Runs as a script
# (`python examples/walkthrough.py`) or cell by cell (`# %%`) in VS Code / Jupyter.
#
# Settings come from the environment: `CIRCUITDYN_RUN` (a run folder as written by `circuitdyn cpt` or
# `circuitdyn demo`; default `circuitdyn-demo/run`, what `make demo` leaves), `CIRCUITDYN_PROBES`
# (probe file; default: the demo's `probes.jsonl` beside the run when there is one, else the seed
# probes), `CIRCUITDYN_FACTS` (how many facts, default 8), `CIRCUITDYN_OUT` (where HTML goes).

# %%
import os
import sys
from pathlib import Path

from circuitdyn.checkpoints import open_run
from circuitdyn.circuits import CircuitSet
from circuitdyn.extraction import extract_run
from circuitdyn.facts import load_facts
from circuitdyn.probes import corruption_counts

RUN = os.environ.get("CIRCUITDYN_RUN", "circuitdyn-demo/run")
DEMO_PROBES = Path(RUN).parent / "probes.jsonl"
PROBES = os.environ.get("CIRCUITDYN_PROBES") or (str(DEMO_PROBES) if DEMO_PROBES.is_file() else None)
N_FACTS = int(os.environ.get("CIRCUITDYN_FACTS", "8"))
OUT = Path(os.environ.get("CIRCUITDYN_OUT", "walkthrough-out"))
SHOW = "ipykernel" in sys.modules  # fig.show() in notebooks; files only when run as a script
STEPS = 5  # EAP-IG interpolation steps (the paper used 30)

run = open_run(RUN)
first, last = run.epochs[0], run.epochs[-1]
print(f"{run.path}: epochs {run.epochs}, base model {run.base_model}")

# %% [markdown]
# ## Probe facts -> attribution inputs
# Each probe becomes a clean prompt, its answer tokens, and a same-length corrupted prompt (the entity
# swapped for another of the same token length, or noise on its embeddings).

# %%
facts = load_facts(PROBES, run.tokenizer(), limit=N_FACTS)  # swap partners come from the whole set
questions = facts.labels
print(f"{len(facts)} facts, corruption kinds {corruption_counts(facts)}")

# %% [markdown]
# ## One circuit per fact per epoch
# `extract_run` writes one circuit file per epoch (scores [fact, edge] + provenance) and skips epochs
# already extracted with the same checkpoint hash and settings, so re-running this cell is cheap.

# %%
results = extract_run(run, facts, run.path / "circuits", method="eap-ig", steps=STEPS, progress=True)
circuits = {r.epoch: CircuitSet.load(r.path) for r in results}
print(circuits[first])

# %%
from circuitdyn import viz
from circuitdyn.diff import MEAN

OUT.mkdir(parents=True, exist_ok=True)
fig = viz.circuit_figure(circuits[first], facts[0].fact_id, n=100, label=questions[facts[0].fact_id])
if SHOW:
    fig.show()
print("circuit viewer:", viz.write_circuit_html(circuits[first], OUT / "circuit.html", labels=questions))

# %% [markdown]
# ## How did the circuits change between the first and the last epoch?
# A noise floor first: the same checkpoint attributed with fewer IG steps shows how far scores move
# with no training at all; edges count as changed only beyond it.

# %%
from circuitdyn.diff import diff_circuits, noise_floor
from circuitdyn.extraction import run_evaluator
from circuitdyn.transfer import transfer_matrix, transfer_pivot

repeat = extract_run(run, facts, run.path / "circuits", [first], method="eap-ig", steps=max(1, STEPS // 2))[0]
floor = noise_floor([circuits[first], CircuitSet.load(repeat.path)])
diff = diff_circuits(circuits[first], circuits[last], "top:200", noise=floor,
                     labels=(f"epoch {first}", f"epoch {last}"))
print(diff.summary.round(3).to_string())
print(diff.facts[["added", "removed", "kept", "sign_flips", "edge_jaccard", "rbo", "spearman"]].round(3))
print(diff.paths(MEAN))
print(diff.edges(facts[0].fact_id).head(10))
if SHOW:
    viz.diff_figure(diff, MEAN).show()
    viz.sankey_figure(diff, MEAN).show()
print("diff viewer:", viz.write_diff_html(diff, OUT / "diff.html", labels=questions))

# %% [markdown]
# ## Across the whole run
# Similarity of each fact's circuit to epoch 0 and to the previous epoch, edge lifetimes, and the join
# with recall: does a circuit stay put while its fact is recalled and change when it is forgotten?

# %%
from circuitdyn.timeline import load_run_timeline

timeline = load_run_timeline(run, facts, selection="top:200", steps=STEPS)
print(timeline.per_epoch.round(3).to_string(index=False))
print(f"reconfiguration rate {timeline.reconfiguration_rate:.3f} per epoch")
print(timeline.lifetimes.sort_values("persistence").head())
if timeline.outcomes is not None:
    print(timeline.stability())
if SHOW:
    viz.timeline_figure(timeline).show()
    viz.heatmap_figure(timeline).show()
print("timeline viewer:", viz.write_timeline_html(timeline, OUT / "timeline.html", labels=questions))

# %% [markdown]
# ## Does an old circuit still carry the fact on a later model?
# Faithfulness of epoch i's circuit evaluated on epoch j's model, for all i, j (exact patching).

# %%
transfer = transfer_matrix(circuits, run_evaluator(run, facts), "top:200")
print(transfer_pivot(transfer).round(3))

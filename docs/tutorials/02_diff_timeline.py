# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---
# ruff: noqa: E402, B018

# %% [markdown]
# # Diff and timeline: verdicts, intervals, error rates
#
# A circuit is an estimate: extract it again with another equally valid setting and a few edges change. So
# circuitdyn never reports "the circuit changed" on one extraction. At each checkpoint it draws **replicates**
# (here 4; the default is 5) from a declared family of settings, and asks per fact whether the circuits of two
# checkpoints differ more than the replicates of one checkpoint do: a permutation test with an exact p-value,
# Benjamini-Hochberg over facts, and one aggregate test. `cd.calibrate` then *measures* the test's error rates
# on a checkpoint.
#
# Same toy run as the quick start (three tiny Llamas, each trained from its own random start to recall six
# facts); small settings throughout so that the notebook runs in well under a minute on a CPU.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

import circuitdyn as cd
from circuitdyn.testing import tiny_run

run_dir, probes = tiny_run(Path(tempfile.mkdtemp(prefix="circuitdyn-tutorial-")), n_epochs=2)
run = cd.open_run(run_dir)
facts = cd.load_facts(probes, run)

# %% [markdown]
# Settings shared by every call below: how circuits are attributed (`cd.AttributionSettings`: EAP-IG with 2
# integral steps) and how they are compared (`cd.Comparison`: the top 30 edges per fact as its circuit, and
# 4 replicates per checkpoint; the default selection, `faith:0.8`, is the smallest circuit that carries 80 % of
# the fact; it costs exact patching).

# %%
settings = cd.AttributionSettings(steps=2)
compare = cd.Comparison(cd.Selection("top", 30), replicates=4)

# %% [markdown]
# ## Diff two checkpoints
#
# `cd.diff("RUN:EPOCH", "RUN:EPOCH", probes)` extracts (or reuses) both checkpoints' circuits and replicates.

# %%
d = cd.diff(f"{run_dir}:0", f"{run_dir}:1", probes, settings, compare)
d

# %% [markdown]
# `describe()` gives the verdict lines the command line prints: per-fact changes beyond noise, the aggregate
# test, intervals clustered by entity with the number of facts and entities they rest on (with 3 entities,
# fewer than `stats.MIN_ENTITIES`, no interval is given, and the text says so).

# %%
print("\n".join(d.describe()))

# %% [markdown]
# `to_frame()` is a tidy table: one row per fact and statistic, with the distance, its p-value, the
# Benjamini-Hochberg verdict, circuit sizes, edges added and removed, and the facts' gaps.

# %%
df = d.to_frame()
df[["fact_id", "statistic", "distance", "p_value", "changed_beyond_noise", "n_a", "n_b"]].head(6)

# %%
d.figure()

# %% [markdown]
# ## A timeline over every epoch
#
# `cd.timeline(run, facts)` does the same for every consecutive pair of epochs, next to recall and loss when
# the run has probe results, and summarises how fast circuits reconfigure.

# %%
tl = cd.timeline(run, facts, settings, compare)
print("\n".join(tl.describe()))

# %%
tl.to_frame().head()

# %%
tl.figure()

# %% [markdown]
# Every circuit computed above is cached in the run's `circuits/` folder, so a second call costs nothing:

# %%
cd.timeline(run, facts, settings, compare).epochs

# %% [markdown]
# ## Take a circuit out: networkx, graph JSON, files
#
# Each epoch's `CircuitSet` (`tl.circuits[epoch]`) gives one fact's circuit as a networkx graph over components
# (`to_networkx`: nodes with layer and kind, edges with their score), as graph JSON (`cd.to_graph_json`; the
# schema ships as `circuitdyn/schemas/graph.schema.json`) or as a file (`cd.export`; in the shell
# `circuitdyn export CIRCUIT_FILE --format json|graphml|csv`).

# %%
cs = tl.circuits[1]
fact = cs.fact_ids[0]
g = cs.to_networkx(fact, "top:30", circuit_only=True)
src, dst, data = max(g.edges(data=True), key=lambda e: abs(e[2]["score"]))
print(f"{g.number_of_nodes()} nodes, {g.number_of_edges()} edges; strongest {src} -> {dst}: {data['score']:.4f}")

# %%
doc = cd.to_graph_json(cs, fact, "top:30")
print(sorted(doc), len(doc["links"]), "links")
cd.export(cs, Path(tempfile.mkdtemp()) / "circuit.graphml", "graphml", fact, "top:30")

# %% [markdown]
# ## What are the test's error rates here?
#
# `cd.calibrate(run, epoch, facts, settings)` measures, at one checkpoint, how often the change test fires when
# nothing changed (replicates split at random: the false-positive rate per fact and of the aggregate claim),
# how often it fires when a change is planted (the MLP that carries most of the circuits, its output scaled
# by 1 - strength: power), and how
# often the entity-clustered intervals cover. Each rate comes with its Clopper-Pearson 95 % interval and its n.

# %%
from circuitdyn.analysis.calibration import CalibrationSettings

calibration = CalibrationSettings(
    settings, replicates=4, null_tests=2, strengths=(0.5, 1.0), selection=cd.Selection("top", 30)
)
cal = cd.calibrate(run, 1, facts, calibration)
print("\n".join(cal.describe()))

# %%
cal.to_frame()

# %%
cal.figure()

# %% [markdown]
# Six facts and two null tests give wide intervals; on a real run, `circuitdyn calibrate RUN:EPOCH` with the
# defaults (5 replicates, 5 null tests, three strengths) is the number to report beside a verdict.
# `cd.view(d, "diff.html")` and `cd.view(tl, "timeline.html")` write the offline HTML viewers.

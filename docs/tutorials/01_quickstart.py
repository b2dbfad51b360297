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
# # Quick start: a run, its facts, their circuits
#
# circuitdyn answers *what did continual pre-training change inside my model?* one fact at a time: for every
# probe fact and every epoch's checkpoint it extracts a **circuit** (the edges of the model's computation graph
# that carry the fact), then compares circuits across epochs against method noise.
#
# This notebook runs in seconds on a CPU. It builds a **toy run**: three tiny random Llamas (2 layers,
# hidden size 32), each trained from its own random start until it recalls six facts, saved as
# `epoch_0 ... epoch_2` with a `run.json` manifest. Your own run is a folder of checkpoints in the same
# layout (or a `transformers.Trainer` output folder, see the third tutorial).

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a model hub

import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest

# %% [markdown]
# ## A tiny run
#
# `circuitdyn.testing.tiny_run` trains a small BPE tokenizer on the packaged seed probes and writes the
# checkpoints with `circuitdyn.runs.checkpoints.write_manifest`. It also writes the probe file: one JSON object per
# line with `id`, `entity`, `question` and `answer`.

# %%
import tempfile
from pathlib import Path

import circuitdyn as cd
from circuitdyn.testing import tiny_run

work = Path(tempfile.mkdtemp(prefix="circuitdyn-tutorial-"))
run_dir, probes = tiny_run(work, n_epochs=2)
print(probes.read_text().splitlines()[0])
sorted(p.name for p in run_dir.iterdir())

# %% [markdown]
# ## Open it
#
# `cd.open_run` reads the manifest (or recognises a Trainer folder) and loads checkpoints on demand.

# %%
run = cd.open_run(run_dir)
run.epochs

# %% [markdown]
# ## Facts
#
# `cd.load_facts(FILE, run)` tokenizes the probes with the run's tokenizer and pairs every fact with a
# counterfactual (here: the same question about another entity whose name has as many tokens). Options choose
# a fixed, seeded sample before any outcome is known: `limit`, `per_entity`, `sample_n`, `entities`, `ids`.

# %%
facts = cd.load_facts(probes, run)
len(facts), facts.ids

# %% [markdown]
# ## Circuits at every epoch
#
# `cd.extract` runs attribution patching on every epoch with the given `cd.AttributionSettings` (EAP-IG;
# `steps` is the number of integrated-gradient steps, kept small here) and returns `{epoch: CircuitSet}`.
# Circuits are cached in the run's `circuits/` folder and reused by every later call, and the run remembers
# the facts (`cd.load_facts(run)`).

# %%
circuits = cd.extract(run, facts, cd.AttributionSettings(steps=2))
cs = circuits[0]
cs

# %% [markdown]
# A `CircuitSet` holds one attribution score per edge per fact, and each fact's clean - corrupted gap
# (the log-probability difference the circuit has to explain):

# %%
print(cs.scores.shape, "facts x edges")
dict(zip(cs.fact_ids, [round(float(g), 2) for g in cs.gaps]))

# %%
assert cd.load_facts(run).ids == facts.ids  # the run's recorded facts

# %% [markdown]
# ## The real thing
#
# The same pipeline on the embedded SmolLM2-135M-Instruct (continual pre-training, per-fact circuits every
# epoch, method noise, HTML viewers) is one command; it takes a while on a CPU, so it is not run here:
#
# ```bash
# make demo
# ```
#
# Next: the diff and timeline tutorial (`02_diff_timeline.py`) compares these circuits across epochs against
# method noise.

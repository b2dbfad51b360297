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
# # Your own Trainer: one callback, then the whole analysis
#
# In your own `transformers.Trainer` script (full fine-tuning or a PEFT adapter), circuitdyn needs one line:
# `trainer.add_callback(ProbeCallback(...))`. The callback scores the probes on the base model and at every
# checkpoint save, extracts the per-fact circuits of each checkpoint, and stops training when a **stopping
# rule** says so. Afterwards the Trainer's output folder is a run for `cd.open_run`, `cd.timeline` and every
# command.
#
# Here: a tiny random Llama with LoRA (peft) on the seed documents of two entities, three epochs, in seconds.
# (`examples/trainer_callback.py` is the same as a script; this notebook borrows its Trainer.)

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

from transformers import AutoTokenizer

import circuitdyn as cd
from circuitdyn.testing import tiny_hf_model, tiny_tokenizer

work = Path(tempfile.mkdtemp(prefix="circuitdyn-tutorial-"))
tok = AutoTokenizer.from_pretrained(tiny_tokenizer(work / "tokenizer"))
base = work / "base"
tiny_hf_model(len(tok), seed=0, hidden=64).save_pretrained(base)
tok.save_pretrained(base)

# %% [markdown]
# ## Training data: the documents of two seed entities
#
# The packaged seed probes come with a document per entity; the probes ask questions answered in it.

# %%
from circuitdyn.probes.probes import entity_documents, load_probes, select_entities

ENTITIES = ["Russia", "Patna"]
docs = entity_documents(select_entities(load_probes(None), ENTITIES))
train = [tok(docs[e], truncation=True, max_length=128) for e in ENTITIES] * 4
len(train), docs["Patna"][:120]

# %% [markdown]
# ## The Trainer, with circuitdyn's callback
#
# `lora_trainer` (from `examples/trainer_callback.py`) is the Trainer of any LoRA script, nothing of circuitdyn
# in it: peft on `q_proj` and `v_proj`, and `TrainingArguments` that save a checkpoint every epoch
# (`save_strategy="epoch"`), which is when the callback probes and extracts circuits.
#
# `ProbeCallback` options used here: the entities to probe, 4 out-of-domain math probes (`n_math`, to watch
# forgetting), short generations, circuits for 2 facts per entity with 2 EAP-IG steps, and the stopping rule
# `patience:2` (stop when the number of learned entities has not improved for two saves; `circuitdyn.analysis.stopping`
# lists the rules).

# %%
from circuitdyn.training.cpt import CPTConfig
from circuitdyn.training.trainer import ProbeCallback
from examples.trainer_callback import lora_trainer

out = work / "trainer-run"
trainer = lora_trainer(base, out, train, tok, epochs=3)
probing = CPTConfig(n_math=4, n_reasoning=0, max_new_tokens=8)  # the probing half of a CPT configuration
callback = ProbeCallback(
    probing, entities=ENTITIES, circuits=cd.AttributionSettings(steps=2), facts_per_entity=2, stop="patience:2"
)
trainer.add_callback(callback)  # the one line circuitdyn needs
trainer.train()
callback.learned, callback.stopped_at

# %% [markdown]
# A random 2-layer model learns no entity in a few LoRA steps, so `patience:2` stopped training after the
# second save, before the third epoch: `stopped_at` is the global step where it did.

# %% [markdown]
# ## The output folder is a run
#
# The checkpoints are adapter folders; `cd.open_run` finds their base model from the adapter config.
# `circuitdyn.analysis.dynamics` reads the probe results the callback wrote: learned and forgotten entities per epoch.

# %%
from circuitdyn.analysis.dynamics import format_table, load_dynamics

run = cd.open_run(out)
print(run.epochs)
print(format_table(load_dynamics(out)))

# %% [markdown]
# ## When should training have stopped?
#
# The same rules apply offline to the recorded history, so you can compare rules after the fact:

# %%
from circuitdyn.analysis.stopping import apply_rule, history_from_dynamics

decision = apply_rule("patience:2", history_from_dynamics(load_dynamics(out)))
decision.rule, decision.stop_epoch, decision.kept_epoch, decision.best_epoch

# %% [markdown]
# ## Circuits across the checkpoints
#
# The callback extracted every checkpoint's circuits and recorded the facts, so the timeline needs nothing
# more: `cd.load_facts(run)` rebuilds the facts, and the cached circuits are reused. Without method-noise
# replicates (`noise_epochs=None`) it describes how circuits moved but makes no claim against noise.

# %%
facts = cd.load_facts(run)
tl = cd.timeline(run, facts, cd.AttributionSettings(steps=2), cd.Comparison(cd.Selection("top", 30), noise_epochs=None))
print("\n".join(tl.describe()))
tl.to_frame().head()

# %% [markdown]
# Here every fact-epoch is excluded: the untrained toy model does not prefer the right answer over the
# counterfactual's by the 1-nat gap that attribution needs (`MIN_GAP`), and the timeline says so and counts
# them rather than comparing noise. On a real model most facts clear it.
#
# On a real run: `circuitdyn dynamics OUT --stop patience:2`, `circuitdyn timeline OUT`, and
# `circuitdyn diff OUT:1 OUT:3` with method-noise replicates (see the diff and timeline tutorial).

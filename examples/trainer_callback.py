"""circuitdyn in your own `transformers.Trainer` script: one callback line, then the whole analysis.

The callback scores the probes before training and at every checkpoint save, extracts the per-fact circuits of
every checkpoint, and stops training when a stopping rule says so. Afterwards the Trainer's output folder is a
run for every circuitdyn command:

    circuitdyn dynamics OUT --stop patience:2    # learned / forgotten entities per epoch, and when to stop
    circuitdyn timeline OUT --top-n 200          # the circuits across the checkpoints, next to recall and loss
    circuitdyn diff OUT:1 OUT:3 --probes ...     # what changed inside the model between two checkpoints

This example runs in about a minute on a CPU: a tiny random Llama (the embedded SmolLM2's tokenizer, or
`--base DIR`, any local causal LM folder), LoRA via peft on two seed entities' documents, three epochs.

    python examples/trainer_callback.py [--out trainer-run] [--base MODEL_DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, Trainer

    from circuitdyn.training.trainer import ProbeCallback

ENTITIES = ["Russia", "Patna"]


def tiny_model(out: Path) -> Path:
    """A 2-layer random Llama with the embedded SmolLM2 tokenizer (local, nothing is downloaded from a hub)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from circuitdyn.runs.gguf import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def lora_trainer(
    base: Path, out: Path, data: Dataset | Sequence[Mapping[str, Any]], tok: PreTrainedTokenizerBase, epochs: int = 3
) -> Trainer:
    """A plain `transformers.Trainer` for LoRA (peft, rank 8 on q_proj and v_proj) on tokenized `data`, saving a
    checkpoint every epoch: the Trainer of your own script, before circuitdyn's callback is added to it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        save_strategy="epoch",
        logging_strategy="epoch",
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )


def train(
    base: Path, out: Path, epochs: int = 3, stop: str | None = "patience:2", circuits: bool = True
) -> ProbeCallback:
    """LoRA-train `base` on the seed documents of ENTITIES with the Trainer, circuitdyn's callback attached."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from circuitdyn.engine.settings import AttributionSettings
    from circuitdyn.probes.probes import entity_documents, load_probes, select_entities
    from circuitdyn.training.cpt import CPTConfig
    from circuitdyn.training.trainer import ProbeCallback

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    docs = entity_documents(select_entities(load_probes(None), ENTITIES))
    data = Dataset.from_dict({"text": [docs[e] for e in ENTITIES] * 4})
    data = data.map(lambda b: tok(b["text"], truncation=True, max_length=128), batched=True, remove_columns=["text"])
    trainer = lora_trainer(base, out, data, tok, epochs)
    probing = CPTConfig(n_math=4, n_reasoning=0, max_new_tokens=8)  # the probing half of a CPT configuration
    callback = ProbeCallback(
        probing, entities=ENTITIES, circuits=circuits and AttributionSettings(steps=2), facts_per_entity=2, stop=stop
    )
    trainer.add_callback(callback)  # the one line circuitdyn needs
    trainer.train()
    return callback


def main(argv: list[str] | None = None) -> None:
    from circuitdyn.analysis.dynamics import format_table, load_dynamics
    from circuitdyn.analysis.stopping import apply_rule, history_from_dynamics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="trainer-run", help="the Trainer's output folder (default trainer-run)")
    p.add_argument("--base", help="base model folder (default: a tiny random Llama built here)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    out = Path(args.out)
    base = Path(args.base) if args.base else tiny_model(out.with_name(out.name + "-base"))
    callback = train(base, out)
    dyn = load_dynamics(out)
    print(format_table(dyn))
    decision = apply_rule("patience:2", history_from_dynamics(dyn))
    print(
        f"stopped by the callback at step {callback.stopped_at}; offline, {decision.rule} stops after epoch "
        f"{decision.stop_epoch} and keeps epoch {decision.kept_epoch} (best {decision.best_epoch})"
    )
    print(f"circuit files: {sorted(p.name for p in (out / 'circuits').glob('*.safetensors'))}")
    print(f"next: circuitdyn timeline {out} --top-n 200")


if __name__ == "__main__":
    main()

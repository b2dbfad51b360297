"""Tiny models for the tutorials: a small BPE tokenizer and 2-layer Llamas, built in seconds, nothing downloaded.

`tiny_run(folder)` writes a circuitdyn run: `epoch_0 ... epoch_N` model folders and a `run.json` manifest
(`circuitdyn.runs.checkpoints.write_manifest`), plus `probes.jsonl` with six facts about three entities. Each epoch is
a tiny Llama trained from its own random start until it recalls all six facts, so the circuits differ between
epochs while every fact has a clean - corrupted gap worth attributing. It is a toy for learning the API: its
verdicts say nothing about real continual pre-training (for that, `make demo` on the embedded SmolLM2).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ENTITIES = (
    ("tom-hanks", "Tom Hanks", "red", "Paris"),
    ("ben-stiller", "Ben Stiller", "blue", "Rome"),
    ("miles-davis", "Miles Davis", "green", "Oslo"),
)
PROBES = [
    {"id": f"{slug}/{kind}", "entity": name, "question": question.format(name=name), "answer": answer}
    for slug, name, colour, city in ENTITIES
    for kind, question, answer in (
        ("colour", "What is the favourite colour of {name}?", colour),
        ("city", "In which city does {name} live?", city),
    )
]
"""Six facts; the three names split into equally many tokens, so every fact has swap partners."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def seed_sentences(limit: int = 400) -> list[str]:
    """Text for the tokenizer's vocabulary: the packaged seed probes' questions, answers and documents."""
    from circuitdyn.probes.probes import DATA_DIR

    data = json.loads((DATA_DIR / "validation_probes.json").read_text())
    out: list[str] = []
    for entity, groups in data.items():
        out.append(entity)
        for probes in groups.values():
            if isinstance(probes, list):
                out += [
                    str(p.get(k, "")) for p in probes if isinstance(p, dict) for k in ("question", "answer", "chunk")
                ]
        if len(out) >= limit:
            break
    return out


def tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer trained on seed text, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(seed_sentences(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_llama(vocab_size: int, seed: int, hidden: int = 32):
    """A random 2-layer Llama (4 heads, 2 key-value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def train_to_recall(model, tokenizer, probes: list[dict], seed: int, max_steps: int = 600) -> int:
    """Train on prompt + answer until every answer token is the greedy prediction; returns the steps taken."""
    from circuitdyn.probes.probes import Probe, answer_text, prompt_text

    torch.manual_seed(seed)
    seqs, spans = [], []
    for rec in probes:
        text = prompt_text(Probe(**rec), tokenizer, template="chat")
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(answer_text(text, rec["answer"]), add_special_tokens=False)["input_ids"]
        seqs.append(prompt + answer)
        spans.append((len(prompt), len(prompt) + len(answer)))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(spans):
        labels[i, a:b] = ids[i, a:b]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    step = 0
    while step < max_steps:
        step += 1
        logits = model(input_ids=ids).logits
        target, mask = labels[:, 1:], labels[:, 1:] != -100
        token_logp = logits[:, :-1].log_softmax(-1).gather(-1, target.clamp_min(0)[..., None])[..., 0] * mask
        loss = -(token_logp.sum() / mask.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            greedy = (logits[:, :-1].argmax(-1) == target) | ~mask
            if greedy.all() and bool((token_logp.sum(1) > -0.1).all()):
                break
    model.eval()
    return step


def tiny_run(root: str | Path, n_epochs: int = 2) -> tuple[Path, Path]:
    """Write a run of `n_epochs + 1` trained tiny Llamas under `root/run` and the facts to `root/probes.jsonl`;
    returns (run folder, probe file)."""
    from transformers import AutoTokenizer

    from circuitdyn.runs.checkpoints import write_manifest

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    tok_dir = tiny_tokenizer(root / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    run = root / "run"
    losses = []
    for epoch in range(n_epochs + 1):
        model = tiny_llama(len(tok), seed=11 + epoch)
        steps = train_to_recall(model, tok, PROBES, seed=11 + epoch)
        model.save_pretrained(run / f"epoch_{epoch}")
        tok.save_pretrained(run / f"epoch_{epoch}")
        losses.append(steps)
    write_manifest(
        run,
        base_model="tiny-llama (one random start per epoch)",
        epochs=[{"epoch": e, "path": f"epoch_{e}", "step": e, "train_loss": None} for e in range(n_epochs + 1)],
    )
    return run, probes

"""Tiny random models and facts, built in seconds with nothing downloaded: for trying the pipeline without
weights, and for the tests, tutorials and benchmarks that need a model but not a real one.

Two kinds, for the two ends of the pipeline:

- `tiny_tl_model` and `tiny_facts`: a random 2-layer HookedTransformer and random token facts, straight into the
  attribution engine (`circuitdyn.engine.attribution.attribute`).
- `tiny_tokenizer`, `tiny_hf_model` and `tiny_run`: Hugging Face folders, as a run on disk holds them;
  `tiny_run` writes a whole circuitdyn run of tiny Llamas trained to recall six facts (`TINY_PROBES`).

They are toys for learning the API: their circuits say nothing about real continual pre-training (for that,
`circuitdyn demo` on the embedded SmolLM2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuitdyn.probes.probes import FactPrompt

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

TINY_ENTITIES = (
    ("tom-hanks", "Tom Hanks", "red", "Paris"),
    ("ben-stiller", "Ben Stiller", "blue", "Rome"),
    ("miles-davis", "Miles Davis", "green", "Oslo"),
)
"""(slug, name, colour, city): names the tiny tokenizer splits into equally many tokens, so every fact has two
swap partners."""

TINY_PROBES = [
    {"id": f"{slug}/{kind}", "entity": name, "question": question.format(name=name), "answer": answer}
    for slug, name, colour, city in TINY_ENTITIES
    for kind, question, answer in (
        ("colour", "What is the favourite colour of {name}?", colour),
        ("city", "In which city does {name} live?", city),
    )
]
"""Six probe records (`id`, `entity`, `question`, `answer`): two parallel questions about each entity."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
"""The tiny tokenizer's chat template: SmolLM2's turn markers, without its system prompt."""


# --------------------------------------------------------------------------- straight into the engine
def tiny_tl_model(
    arch: str = "llama", seed: int = 0, n_layers: int = 2, d_vocab: int = 50, **overrides: Any
) -> HookedTransformer:
    """A random HookedTransformer: `llama` = RMSNorm, rotary, gated SiLU MLP, GQA (4 heads, 2 KV heads);
    `gpt2` = LayerNorm, learned positions, GELU MLP. Biases and norm weights are randomized too, so that no
    edge scores zero by construction. `overrides` replace fields of the config (`act_fn="relu"`, ...)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common: dict[str, Any] = dict(
        n_layers=n_layers, d_model=32, d_head=8, n_heads=4, n_ctx=64, d_vocab=d_vocab, seed=seed, init_weights=True
    )
    if arch == "llama":
        fields = dict(
            d_mlp=48,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            gated_mlp=True,
            n_key_value_heads=2,
            final_rms=True,
            original_architecture="LlamaForCausalLM",
        )
    elif arch == "gpt2":
        fields = dict(
            d_mlp=64,
            act_fn="gelu_new",
            normalization_type="LN",
            positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: llama or gpt2")
    cfg = HookedTransformerConfig(**{**common, **fields, **overrides, "device": "cpu"})
    model = HookedTransformer(cfg, move_to_device=False)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b") or name.endswith(".w"):
                base = 1.0 if name.endswith(".w") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model


def tiny_facts(n: int = 4, d_vocab: int = 50, seed: int = 0, noise_every: int = 2) -> list[FactPrompt]:
    """`n` random facts of varied lengths (4 to 8 tokens) with 1 to 3 answer tokens and a contrast token:
    every `noise_every`-th one (the 2nd, 4th, ... for 2; none for 0) a noise corruption at positions 1 and 2,
    the others an entity swap that changes the tokens at those positions."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 3) % 5
        clean = torch.randint(1, d_vocab, (length,), generator=gen).tolist()
        answer = torch.randint(1, d_vocab, (1 + i % 3,), generator=gen).tolist()
        contrast = int(torch.randint(1, d_vocab, (1,), generator=gen))
        noise = bool(noise_every) and i % noise_every == 1
        corrupted = list(clean)
        if not noise:
            corrupted[1] = (corrupted[1] % (d_vocab - 1)) + 1
            corrupted[2] = (corrupted[2] * 7 % (d_vocab - 1)) + 1
        out.append(
            FactPrompt(
                f"f{i}",
                tuple(clean),
                tuple(corrupted),
                tuple(answer),
                "noise" if noise else "entity",
                noise_positions=(1, 2) if noise else (),
                contrast_token=contrast,
            )
        )
    return out


# --------------------------------------------------------------------------- Hugging Face folders
def seed_sentences(limit: int = 400) -> list[str]:
    """Real text for the tiny tokenizer's vocabulary: the packaged seed probes' questions, answers and chunks."""
    from circuitdyn.probes.probes import DATA_DIR

    data = json.loads((DATA_DIR / "validation_probes.json").read_text())
    out: list[str] = []
    for entity, groups in data.items():
        out.append(entity)
        for probes in groups.values():
            if isinstance(probes, list):
                for p in probes:
                    if isinstance(p, dict):
                        out += [str(p.get(k, "")) for k in ("question", "answer", "chunk")]
        if len(out) >= limit:
            break
    return out


def tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer trained on the seed text, with `CHAT_TEMPLATE`, saved as a Hugging Face
    tokenizer folder; returns the folder."""
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


def tiny_hf_config(arch: str, vocab_size: int, hidden: int = 32) -> PretrainedConfig:
    """A 2-layer model config: `llama` has grouped-query attention (4 heads, 2 KV heads) and an MLP twice as wide
    as `hidden`; `gpt2` has 4 heads."""
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
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
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    raise ValueError(f"unknown tiny architecture {arch!r}: llama or gpt2")


def tiny_hf_model(vocab_size: int, seed: int = 0, arch: str = "llama", hidden: int = 32) -> PreTrainedModel:
    """A randomly initialised `tiny_hf_config` model (float32), the same for the same seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_hf_config(arch, vocab_size, hidden), dtype=torch.float32)


def train_to_recall(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[dict[str, str]],
    seed: int,
    max_steps: int = 600,
) -> int:
    """Train `model` on the probes' chat prompt + answer until every answer token is its greedy prediction and
    each answer's log-prob exceeds -0.1 (teacher-forced); returns the steps taken. Raises RuntimeError when
    `max_steps` are not enough."""
    from circuitdyn.probes.probes import Probe, answer_text, prompt_text

    torch.manual_seed(seed)
    seqs, spans = [], []
    for rec in probes:
        p = Probe(**rec)
        text = prompt_text(p, tokenizer, template="chat")
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer_text(text, p.answer), add_special_tokens=False)["input_ids"]
        seqs.append(prompt_ids + answer_ids)
        spans.append((len(prompt_ids), len(prompt_ids) + len(answer_ids)))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(spans):
        labels[i, a:b] = ids[i, a:b]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(1, max_steps + 1):
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
                model.eval()
                return step
    raise RuntimeError(f"the tiny model (seed {seed}) did not learn the probes in {max_steps} steps")


def tiny_run(root: str | Path, n_epochs: int = 2, tokenizer_dir: str | Path | None = None) -> tuple[Path, Path]:
    """A circuitdyn run of `n_epochs + 1` tiny Llamas under `root/run` (`epoch_0 ... epoch_N` and `run.json`)
    and `TINY_PROBES` in `root/probes.jsonl`; returns (run folder, probe file).

    Each epoch is a Llama trained from its own random start (seed 11 + epoch) until it recalls all six facts,
    so the circuits differ between epochs while every fact has a clean - corrupted gap worth attributing. The
    tokenizer is `tiny_tokenizer`, trained here unless `tokenizer_dir` holds one already."""
    from transformers import AutoTokenizer

    from circuitdyn.runs.checkpoints import write_manifest

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in TINY_PROBES))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or tiny_tokenizer(root / "tokenizer"))
    run = root / "run"
    for epoch in range(n_epochs + 1):
        model = tiny_hf_model(len(tok), seed=11 + epoch)
        train_to_recall(model, tok, TINY_PROBES, seed=11 + epoch)
        model.save_pretrained(run / f"epoch_{epoch}")
        tok.save_pretrained(run / f"epoch_{epoch}")
    write_manifest(
        run,
        base_model="tiny-llama (one random start per epoch)",
        epochs=[{"epoch": e, "path": f"epoch_{e}", "step": e, "train_loss": None} for e in range(n_epochs + 1)],
    )
    return run, probes

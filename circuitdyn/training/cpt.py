"""Continual pre-training (CPT) with the paper's strategies, probing the model before and after every epoch.

Training follows the paper's code: causal-LM loss on the documents, AdamW, constant learning rate
(no scheduler); LoRA via `peft` (r=32, alpha=64 on q_proj/v_proj, input embeddings trainable,
lr 1e-4) or full fine-tuning. Strategies:

- `plain`: the causal-LM loss only.
- `stepwise-kl`: plus `kl_weight` x KL(previous epoch's model || model) on the training tokens.
- `pretrain-kl`: plus `kl_weight` x KL(frozen base model || model).
- `annotated`: entity mentions in the documents are tagged `<entity>...</entity>`.
- `curriculum`: each epoch trains only on documents of entities not learned at the last probe
  evaluation (learned entities drop out, forgotten ones come back).

The run folder follows `checkpoints_spec/`: `run.json` and `epoch_0/` (the untouched base) ...
`epoch_N/`, each holding its model beside the epoch's results. With LoRA, an epoch stores only what training
changed, as people store PEFT runs (`save="adapter"`, the default): the adapter and the trained input embeddings
in `adapter/` (peft format, `base_model_name_or_path` = the base folder), and epoch 0 is a reference to the base
folder in `run.json`, not a copy; `save="merged"` (and full fine-tuning) writes the merged model to
`merged_model/` in every epoch folder instead. Beside the model, each epoch folder holds:
`probe_results.jsonl` (per probe: generation, ROUGE-1 recall/F1, teacher-forced answer log-prob),
`validation_probes_results.json` (per entity, the paper's format), `control_probes_results.json`
(math and SocialIQA exact match), `train_log.jsonl` (loss per step) and `epoch.json`. The run-level
table is `results.csv`. An epoch folder appears only when complete (built as `epoch_N.partial/`
then renamed); the last epoch also keeps the trainer state (`trainer_state/`: trainable weights and
AdamW moments, safetensors) so a killed run resumes from the last finished epoch with identical results.

The model is trained and probed on `CPTConfig.device` in `CPTConfig.dtype` (the merged checkpoints are saved
in that dtype). A run may resume on another device, not in another dtype.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F

from circuitdyn.errors import CircuitdynError
from circuitdyn.probes.control import MAX_NEW_TOKENS as CONTROL_MAX_NEW_TOKENS
from circuitdyn.probes.control import SYSTEM as CONTROL_SYSTEM
from circuitdyn.probes.control import (
    chat_prompt,
    load_mmlu,
    math_hit,
    math_question,
    mmlu_hit,
    mmlu_question,
    siqa_hit,
    siqa_question,
)
from circuitdyn.probes.probes import (
    INSTRUCTION,
    LEARNED_THRESHOLD,
    Probe,
    answer_text,
    entities,
    entity_documents,
    find_mention,
    load_math_probes,
    load_probes,
    load_reasoning_probes,
    prompt_text,
    read_jsonl,
    rouge1,
    sample,
    select_entities,
)
from circuitdyn.progress import progress_bar
from circuitdyn.runs.checkpoints import DTYPES, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from circuitdyn.analysis.dynamics import Dynamics

STRATEGIES = ("plain", "stepwise-kl", "pretrain-kl", "annotated", "curriculum")
METHODS = ("lora", "full")
STATE_DIR = "trainer_state"
MODEL_DIR = "merged_model"
ADAPTER_DIR = "adapter"
SAVES = ("adapter", "merged")
RESULTS_TABLE = "results.csv"


@dataclass
class CPTConfig:
    """Everything that defines a CPT run (stored in run.json; a resumed run must match it, except `epochs`)."""

    base_model: str | None = None
    """Checkpoint folder, run folder or `RUN:EPOCH`; None = the embedded SmolLM2-135M-Instruct."""
    corpus: str | None = None
    """Text file (documents separated by blank lines) or JSONL (`text`, optional `entity`); None = the
    seed `chunk` sentences of the chosen entities, one document per entity."""
    probes: str | None = None
    """Probe file (seed JSON or our JSONL); None = the seed validation probes."""
    entities: list[str] | None = None
    n_entities: int = 8
    rephrased: bool = False
    epochs: int = 4
    lr: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    strategy: str = "plain"
    method: str = "lora"
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_init: Literal["default", "gaussian"] = "default"
    """peft's `init_lora_weights`: `default` (Kaiming-uniform A, zero B) or `gaussian` (the paper's)."""
    train_embeddings: bool = True
    kl_weight: float = 1.0
    max_length: int = 512
    template: Literal["auto", "chat", "plain"] = "auto"
    instruction: str = INSTRUCTION
    instruction_role: Literal["user", "system"] = "user"
    """Where the probes' instruction goes in the chat: before the question in the user turn, or as the system
    message with the question alone as the user turn (the paper's)."""
    threshold: float = LEARNED_THRESHOLD
    max_new_tokens: int = 25
    n_math: int | None = 32
    n_reasoning: int | None = 16
    eval_batch_size: int = 64
    mmlu: str | None = None
    """A file of MMLU test items (`circuitdyn.probes.control.load_mmlu`), scored like the paper when given;
    MMLU is not shipped."""
    device: str = "auto"
    """Where the model is trained and probed: `auto` (cuda, else mps, else cpu), `cpu`, `cuda`, `cuda:N`, `mps`.
    Not part of `identity`: a run may resume on another device."""
    dtype: str = "float32"
    """Precision the model is trained and probed in (`float32`, `bfloat16`, `float16`); the merged
    checkpoints are saved in it. Part of `identity`."""
    save: Literal["adapter", "merged"] = "adapter"
    """How LoRA epochs are stored: `adapter` (adapter + trained embeddings; epoch 0 refers to the base) or
    `merged` (a full merged model per epoch). Full fine-tuning always stores full models."""

    def validate(self) -> None:
        """Reject bad settings before anything is loaded or written."""
        checks = [
            (self.epochs >= 1, "epochs", self.epochs, "must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be > 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1"),
            (self.strategy in STRATEGIES, "strategy", self.strategy, f"must be one of {', '.join(STRATEGIES)}"),
            (self.method in METHODS, "method", self.method, f"must be one of {', '.join(METHODS)}"),
            (self.n_entities >= 1, "n_entities", self.n_entities, "must be >= 1"),
            (self.max_length >= 8, "max_length", self.max_length, "must be >= 8"),
            (self.kl_weight >= 0, "kl_weight", self.kl_weight, "must be >= 0"),
            (0 < self.threshold <= 1, "threshold", self.threshold, "must be in (0, 1]"),
            (self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1"),
            (self.lora_r >= 1, "lora_r", self.lora_r, "must be >= 1"),
            (self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {', '.join(DTYPES)}"),
            (self.save in SAVES, "save", self.save, f"must be one of {', '.join(SAVES)}"),
            (self.lora_init in ("default", "gaussian"), "lora_init", self.lora_init, "must be default or gaussian"),
            (
                self.instruction_role in ("user", "system"),
                "instruction_role",
                self.instruction_role,
                "must be user or system",
            ),
        ]
        for ok, name, value, why in checks:
            if not ok:
                raise CircuitdynError(f"CPT setting '{name}' = {value!r} {why}")
        resolve_device(self.device)

    @classmethod
    def paper(cls, **overrides: Any) -> CPTConfig:
        """The paper's settings (`--preset paper`): LoRA r=32, alpha=64, no dropout, Gaussian init, on q_proj and
        v_proj with the input embeddings trainable, AdamW lr 1e-4 without scheduler, 10 epochs, seed 42, KL weight
        1; probes as system-message chat with the rephrased questions (10 per entity), all 264 math and 100
        SocialIQA control items. `overrides` replace any of these."""
        return cls(**{**PAPER_PRESET, **overrides})

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share (all but the number of epochs and the device: the same
        run may continue on another machine, but not in another precision)."""
        d = asdict(self)
        d.pop("epochs")
        d.pop("device")
        return d


PAPER_PRESET: dict[str, Any] = {
    "lora_r": 32,
    "lora_alpha": 64,
    "lora_dropout": 0.0,
    "lora_init": "gaussian",
    "lora_targets": ["q_proj", "v_proj"],
    "train_embeddings": True,
    "method": "lora",
    "lr": 1e-4,
    "epochs": 10,
    "seed": 42,
    "kl_weight": 1.0,
    "rephrased": True,
    "instruction_role": "system",
    "max_new_tokens": 25,
    "n_math": 264,
    "n_reasoning": 100,
}
"""arXiv 2601.03858's CPT and probing settings (its `subparsers/fine_tune.py` and `utils/data.py`)."""


@dataclass(frozen=True)
class Document:
    """One training document, optionally tied to the entity it is about (for curriculum/annotation)."""

    text: str
    entity: str | None = None


@dataclass
class CPTResult:
    """What a finished (or resumed) run returns."""

    run_dir: Path
    dynamics: Dynamics
    wall_s: float
    trained_epochs: list[int]


# --------------------------------------------------------------------------- corpus and probes


def load_corpus(path: str | Path) -> list[Document]:
    """Documents from a text file (blank-line separated) or JSONL (`text`, optional `entity`)."""
    path = Path(path)
    if not path.is_file():
        raise CircuitdynError(f"{path}: no such corpus file")
    docs: list[Document] = []
    if path.suffix == ".jsonl":
        for n, rec in read_jsonl(path):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CircuitdynError(f"{path}:{n}: field 'text' is missing or not a string")
            if rec["text"].strip():
                docs.append(Document(rec["text"].strip(), rec.get("entity")))
    else:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CircuitdynError(f"{path}: not UTF-8 text ({err})") from None
        docs = [Document(block.strip()) for block in raw.split("\n\n") if block.strip()]
    if not docs:
        raise CircuitdynError(f"{path}: empty corpus (no non-empty documents)")
    return docs


def annotate(doc: Document, names: Sequence[str]) -> Document:
    """Tag every mention of the named entities (full name or a name word) as `<entity>...</entity>`."""
    text = doc.text
    spans: list[tuple[int, int]] = []
    for name in names:
        found = find_mention(text, name)
        if found:
            spans += [s for s in found[1] if all(s[1] <= a or s[0] >= b for a, b in spans)]
    for s, e in sorted(spans, reverse=True):
        text = f"{text[:s]}<entity>{text[s:e]}</entity>{text[e:]}"
    return Document(text, doc.entity)


def resolve_inputs(cfg: CPTConfig) -> tuple[list[Document], list[Probe]]:
    """The corpus and the probes of a run, checked against each other."""
    all_probes = load_probes(cfg.probes, rephrased=cfg.rephrased)
    docs = load_corpus(cfg.corpus) if cfg.corpus else None
    if cfg.entities:
        probes = select_entities(all_probes, cfg.entities)
    elif docs and any(d.entity for d in docs):
        names = list(dict.fromkeys(d.entity for d in docs if d.entity))
        known = set(entities(all_probes))
        probes = select_entities(all_probes, [n for n in names if n in known]) if known & set(names) else []
    elif docs and cfg.probes is None:
        # plain-text corpus, seed probes: the entities the corpus mentions
        probes = [p for p in all_probes if any(find_mention(d.text, p.entity) for d in docs)]
    elif docs:
        probes = all_probes
    else:
        probes = select_entities(all_probes, n=cfg.n_entities)
    if docs is None:
        by_entity = entity_documents(probes)
        docs = [Document(by_entity[e], e) for e in entities(probes) if e in by_entity]
        if not docs:
            raise CircuitdynError("empty corpus: the chosen entities' probes have no 'chunk' sentences")
    if not probes:
        raise CircuitdynError(
            f"{cfg.corpus}: no probe of {cfg.probes or 'the seed probes'} is about an entity of the corpus"
        )
    doc_entities = {d.entity for d in docs if d.entity}
    for name in entities(probes):
        if name in doc_entities:
            continue
        if not any(find_mention(d.text, name) for d in docs):
            raise CircuitdynError(f"unknown entity {name!r}: probes ask about it but no corpus document covers it")
    if cfg.strategy == "annotated":
        names = entities(probes)
        docs = [annotate(d, [d.entity, *names] if d.entity else names) for d in docs]
    return docs, probes


def _tokenize_docs(
    docs: Sequence[Document], tok: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[int, list[int]]]:
    """(document index, token ids) windows of at most max_length tokens, EOS-terminated."""
    out = []
    for i, d in enumerate(docs):
        ids = tok(d.text)["input_ids"]
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        for s in range(0, len(ids), max_length):
            window = ids[s : s + max_length]
            if len(window) >= 2:
                out.append((i, window))
    return out


# --------------------------------------------------------------------------- models


def _load_base(
    spec: str | None, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, Path]:
    from circuitdyn.runs.checkpoints import resolve
    from circuitdyn.runs.gguf import default_model_dir

    try:
        run, epoch = resolve(str(spec) if spec else str(default_model_dir()), device=device, dtype=dtype)
        model = run.hf_model(epoch)
        tok = run.tokenizer()
        hf_dir = run.checkpoint(epoch).path
    except CircuitdynError as err:
        raise CircuitdynError(f"cannot load the base model {spec or 'SmolLM2 (default)'}: {err}") from None
    except Exception as err:  # anything transformers raises on a broken folder
        raise CircuitdynError(f"cannot load the base model {spec or 'SmolLM2 (default)'}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, str(spec) if spec else "SmolLM2-135M-Instruct", hf_dir


def _wrap_lora(model: PreTrainedModel, cfg: CPTConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora_targets if t not in names]
    if missing:
        raise CircuitdynError(f"LoRA target module {missing[0]!r} does not exist in this model")
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights="gaussian" if cfg.lora_init == "gaussian" else True,
        ),
    )
    if cfg.train_embeddings:
        base_model: Any = peft_model.get_base_model()  # peft types it as a plain nn.Module
        base_model.get_input_embeddings().weight.requires_grad_(True)
    return peft_model


def merged_state_dict(train_model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The plain-architecture weights of the training model (LoRA deltas merged in, out of place)."""
    if method == "full":
        return {k: v.detach().clone() for k, v in train_model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base: Any = cast("PeftModel", train_model).get_base_model()  # peft types it as a plain nn.Module
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight
            delta = module.get_delta_weight("default")  # type: ignore[attr-defined]  # on LoraLayer's subclasses
            merged[f"{name}.weight"] = (w + delta).detach().clone()
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        merged.setdefault(plain, value.detach().clone())
    return merged


def save_adapter(train_model: torch.nn.Module, folder: Path, base_dir: Path, embeddings: bool) -> None:
    """Save a LoRA training model as a PEFT adapter folder that peft (and `checkpoints.open_run`) merges back
    into exactly the trained model: the adapter weights, and with `embeddings` the trained input embeddings
    (peft's `save_embedding_layers`). A tied output embedding is the same tensor and is not stored twice;
    `base_model_name_or_path` is the base folder's absolute path."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_model = cast("PeftModel", train_model)
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=embeddings)
    base: Any = peft_model.get_base_model()  # peft types it as a plain nn.Module
    out_emb, in_emb = base.get_output_embeddings(), base.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        tied = next(f"base_model.model.{n}.weight" for n, m in base.named_modules() if m is out_emb)
        state.pop(tied, None)
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.base_model_name_or_path = str(Path(base_dir).resolve())
    config.inference_mode = True
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        folder / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )


def _load_weights(model: PreTrainedModel, hf_dir: Path) -> None:
    """Copy a saved HF folder's safetensors weights into a model of the same architecture."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(f))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise CircuitdynError(f"{hf_dir}: weights do not fit the model (e.g. {unexpected[0]})")
    model.tie_weights()


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Trainable weights + AdamW state as safetensors (no pickle), settings as JSON."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}, path / "trainable.safetensors")
    sd = opt.state_dict()
    tensors = {
        f"{i}.{k}": v.cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)
    }
    save_file(tensors, path / "optimizer.safetensors")
    (path / "state.json").write_text(json.dumps({**meta, "param_groups": sd["param_groups"]}, indent=2))


def _load_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    params = _trainable(model)
    saved = load_file(path / "trainable.safetensors")
    if set(saved) != set(params):
        raise CircuitdynError(f"{path}: trainer state does not match this model's trainable weights")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path / "optimizer.safetensors").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# --------------------------------------------------------------------------- probing


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all sequences, leaving at least one token of each."""
    n = min(len(x) for x in seqs) - 1
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(x[i] != first[i] for x in seqs):
            return i
    return max(n, 0)


@torch.no_grad()
def greedy_with_answers(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]] | None,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generate",
) -> tuple[list[list[int]], list[float | None]]:
    """Greedy continuations of each prompt and (when answers are given) the teacher-forced sum of the
    answer tokens' log-probs, sharing work: the prompts' common prefix (chat template and instruction)
    is run once, and one pass over prompt + answer gives both the answer log-prob and the first
    generated token; decoding then continues from the prompt's cache with the answer slots masked out.
    Equal to `generate(do_sample=False)` on each prompt alone, up to floating-point ties (for models
    whose logits are the output head applied to the decoder's last hidden state).
    """
    import copy
    import inspect

    # Run the decoder stack and apply the output head only where logits are needed.
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # transformers 5 names the KV cache `cache`; 4.x names it `past_key_values`
    key = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    def run(
        ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: cache})
        return out.last_hidden_state, (out.cache if key == "cache" else out.past_key_values)

    dev = model.device
    n0 = _common_prefix(prompts)
    prefix_cache = None
    if n0:
        _, prefix_cache = run(torch.tensor([list(prompts[0][:n0])], device=dev), None, None, None)
    gens: list[list[int]] = []
    logprobs: list[float | None] = []
    order = range(0, len(prompts), batch_size)
    for s in progress_bar(order, desc=desc, disable=not progress, leave=False):
        suffixes = [list(p[n0:]) for p in prompts[s : s + batch_size]]
        ans = [list(a) for a in answers[s : s + batch_size]] if answers is not None else [[] for _ in suffixes]
        b = len(suffixes)
        seqs = [x + a for x, a in zip(suffixes, ans)]
        width = max(map(len, seqs))
        ids = torch.tensor([x + [pad_token_id] * (width - len(x)) for x in seqs], device=dev)
        cur = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=dev)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(b)
        ones = torch.ones(b, n0, dtype=torch.long, device=dev)
        pos = (n0 + torch.arange(width, device=dev)).expand(b, width)
        hidden, cache = run(ids, torch.cat([ones, cur], 1), pos, cache)
        ends = torch.tensor([len(x) for x in suffixes], device=dev)
        for row, (x, a) in enumerate(zip(suffixes, ans)):
            if answers is None:
                logprobs.append(None)
            else:
                lp = head(hidden[row, len(x) - 1 : len(x) + len(a) - 1]).float().log_softmax(-1)
                logprobs.append(float(lp[torch.arange(len(a), device=dev), torch.tensor(a, device=dev)].sum()))
        nxt = head(hidden[torch.arange(b, device=dev), ends - 1]).float().argmax(-1)
        # for decoding, only the prefix and each row's own prompt are visible (answer slots masked)
        mask = torch.cat([ones, (torch.arange(width, device=dev)[None, :] < ends[:, None]).long()], 1)
        first = nxt.tolist()
        out_tokens = [[t] for t in first]
        done = [eos_token_id is not None and t == eos_token_id for t in first]
        positions = n0 + ends
        for _ in range(max_new_tokens - 1):
            if all(done):
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long, device=dev)], 1)
            hidden, cache = run(nxt[:, None], mask, positions[:, None], cache)
            nxt = head(hidden[:, -1]).float().argmax(-1)
            positions = positions + 1
            for row, t in enumerate(nxt.tolist()):
                if not done[row]:
                    out_tokens[row].append(t)
                    done[row] = eos_token_id is not None and t == eos_token_id
        gens += out_tokens
    return gens, logprobs


class Prober:
    """Scores a model on the run's probes (greedy generation + ROUGE-1, answer log-prob) and controls."""

    def __init__(self, tok: PreTrainedTokenizerBase, probes: Sequence[Probe], cfg: CPTConfig, progress: bool) -> None:
        self.tok, self.probes, self.cfg, self.progress = tok, list(probes), cfg, progress
        chat = bool(getattr(tok, "chat_template", None)) and cfg.template != "plain"
        system = chat and cfg.instruction_role == "system"
        prompts = [
            chat_prompt(tok, cfg.instruction, p.question)
            if system and not p.prompt
            else prompt_text(p, tok, template=cfg.template, instruction=cfg.instruction)
            for p in probes
        ]
        # Templated prompts already hold their special tokens; plain and cloze prompts get the usual ones.
        self.prompt_ids = [
            tok(t, add_special_tokens=not chat or bool(p.prompt))["input_ids"] for p, t in zip(probes, prompts)
        ]
        self.answer_ids = [
            tok(answer_text(t, p.answer), add_special_tokens=False)["input_ids"] for p, t in zip(probes, prompts)
        ]
        # Control probes as the paper scores them (`circuitdyn.probes.control`); fewer items = a labelled subset.
        all_math, all_siqa = load_math_probes(), load_reasoning_probes()
        self.control_totals = {"math": len(all_math), "SocialIQA": len(all_siqa)}
        self.controls: dict[str, tuple[list[Any], Callable[[Any], str], Callable[[str, Any], bool]]] = {}
        if cfg.n_math:
            self.controls["math"] = (sample(all_math, cfg.n_math), math_question, math_hit)
        if cfg.n_reasoning:
            self.controls["SocialIQA"] = (sample(all_siqa, cfg.n_reasoning), siqa_question, siqa_hit)
        if cfg.mmlu:
            mmlu = load_mmlu(cfg.mmlu)
            self.control_totals["MMLU"] = len(mmlu)
            self.controls["MMLU"] = (mmlu, mmlu_question, mmlu_hit)
        self.control_ids = {
            name: [
                tok(chat_prompt(tok, CONTROL_SYSTEM[name], question(item)), add_special_tokens=not chat)["input_ids"]
                for item in items
            ]
            for name, (items, question, _) in self.controls.items()
        }

    def _run(
        self, model: PreTrainedModel, prompts: list[list[int]], answers: list[list[int]] | None, max_new: int, desc: str
    ) -> tuple[list[str], list[float | None]]:
        gens, lps = greedy_with_answers(
            model,
            prompts,
            answers,
            max_new_tokens=max_new,
            eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id,
            batch_size=self.cfg.eval_batch_size,
            progress=self.progress,
            desc=desc,
        )
        texts = [self.tok.decode(g, skip_special_tokens=True) for g in gens]
        return [t.strip() for t in texts], lps  # type: ignore[union-attr]  # decode of one sequence: a str

    def evaluate(self, model: PreTrainedModel) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-probe rows and the control-probe summary for one model."""
        model.eval()
        gens, lps = self._run(model, self.prompt_ids, self.answer_ids, self.cfg.max_new_tokens, "probes")
        rows = []
        for p, g, lp, a in zip(self.probes, gens, lps, self.answer_ids):
            recall, f1 = rouge1(g, p.answer)
            rows.append(
                {
                    "probe_id": p.id,
                    "entity": p.entity,
                    "question_type": p.question_type,
                    "group": p.group,
                    "ne_label": p.ne_label,
                    "ne_frequency": p.ne_frequency,
                    "question": p.question,
                    "answer": p.answer,
                    "generation": g,
                    "recall": recall,
                    "f1": f1,
                    "logprob": lp,
                    "answer_tokens": len(a),
                }
            )
        control: dict[str, Any] = {}
        for name, (items, _, hit) in self.controls.items():
            gens, _ = self._run(model, self.control_ids[name], None, CONTROL_MAX_NEW_TOKENS, name)
            hits = [hit(g, item) for g, item in zip(gens, items)]
            control[name] = {
                "exact_match": sum(hits) / len(hits),
                "n": len(hits),
                "subset": len(hits) < self.control_totals[name],
                "scoring": "paper",
                "items": [{"id": item.id, "generation": g, "correct": h} for item, g, h in zip(items, gens, hits)],
            }
        return rows, control


def _write_results(epoch_dir: Path, rows: list[dict[str, Any]], control: dict[str, Any], threshold: float) -> None:
    import pandas as pd

    from circuitdyn.analysis.dynamics import (
        CONTROL_RESULTS,
        ENTITY_RESULTS,
        PROBE_RESULTS,
        entity_results_json,
        entity_scores_from_probes,
    )

    (epoch_dir / PROBE_RESULTS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    df = pd.DataFrame(rows).assign(epoch=0)
    entity_json = entity_results_json(entity_scores_from_probes(df), threshold)
    (epoch_dir / ENTITY_RESULTS).write_text(json.dumps(entity_json, indent=1))
    (epoch_dir / CONTROL_RESULTS).write_text(json.dumps(control, indent=1))


def training_windows(
    windows: Sequence[tuple[int, list[int]]], docs: Sequence[Document], strategy: str, learned: set[str]
) -> list[tuple[int, list[int]]]:
    """The token windows an epoch trains on: all, or for `curriculum` those of documents whose entity is
    not learned at the last probe evaluation (documents without an entity always stay)."""
    if strategy != "curriculum":
        return list(windows)
    return [(i, w) for i, w in windows if docs[i].entity is None or docs[i].entity not in learned]


def _learned(rows: list[dict[str, Any]], threshold: float) -> set[str]:
    per: dict[str, list[float]] = {}
    for r in rows:
        per.setdefault(r["entity"], []).append(r["recall"])
    return {e for e, rs in per.items() if sum(rs) / len(rs) >= threshold}


# --------------------------------------------------------------------------- the loop


def _check_out_dir(out: Path, cfg: CPTConfig) -> dict[str, Any] | None:
    """None for a fresh folder; the existing manifest when it holds this same run (resume)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise CircuitdynError(f"{out}: exists and is not a folder")
    entries = [p for p in out.iterdir() if not p.name.endswith(".partial")]
    if not entries:
        return None
    manifest = out / "run.json"
    if not manifest.is_file():
        raise CircuitdynError(f"{out}: the output folder already holds other files (no run.json); choose another --out")
    try:
        existing = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise CircuitdynError(f"{manifest}: invalid JSON ({err}); choose another --out") from None
    theirs = (existing.get("config") or {}).copy()
    theirs.pop("epochs", None)
    theirs.pop("device", None)
    theirs.setdefault("dtype", "float32")  # runs from before the setting existed trained in float32
    theirs.setdefault("save", "merged")  # and stored merged models
    for key, old in (("lora_init", "default"), ("instruction_role", "user"), ("mmlu", None)):
        theirs.setdefault(key, old)
    ours = json.loads(json.dumps(cfg.identity()))
    if existing.get("created_by", "").split(" ")[0] != "circuitdyn" or theirs != ours:
        diff = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        detail = ", ".join(f"{k}: {theirs.get(k)!r} vs {ours.get(k)!r}" for k in diff[:3]) or "not a circuitdyn cpt run"
        raise CircuitdynError(
            f"{out}: the output folder already holds a different run ({detail}); choose another --out"
        )
    return existing


def _completed_epochs(out: Path) -> list[int]:
    return sorted(
        int(p.name.split("_", 1)[1])
        for p in out.glob("epoch_*")
        if p.is_dir() and p.name.split("_", 1)[1].isdigit() and (p / "epoch.json").is_file()
    )


def _finish_epoch(partial: Path, final: Path) -> None:
    os.replace(partial, final)


def _write_manifest(out: Path, base_name: str, cfg: CPTConfig, done: list[int]) -> None:
    from circuitdyn.runs.checkpoints import write_manifest

    epochs = []
    history = []
    for e in done:
        info = json.loads((out / f"epoch_{e}" / "epoch.json").read_text())
        epochs.append(
            {
                "epoch": e,
                "path": f"epoch_{e}",
                "step": info["step"],
                "train_loss": info["train_loss"],
                "content_hash": info["content_hash"],
                **({"model": info["model"]} if info.get("model") else {}),
            }
        )
        history.append(
            {"epoch": e, "learned": info["learned"], "math": info.get("math"), "SocialIQA": info.get("SocialIQA")}
        )
    write_manifest(out, base_name, epochs, strategy=cfg.strategy, config=asdict(cfg), probe_history=history)


def _kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(ref || model)."""
    lp = logits.log_softmax(-1)
    lq = ref_logits.log_softmax(-1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def run_cpt(
    cfg: CPTConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> CPTResult:
    """Run (or resume) CPT into `out_dir` and return its learning dynamics.

    Epoch 0 is the base model, probed before training. Re-running with the same settings skips finished
    epochs and continues from the last one (a larger `epochs` extends the run); a folder holding a
    different run or other files is refused, and nothing in it is touched.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    from circuitdyn.io import check_writable, file_lock, remove_stale_temps

    try:
        cfg.validate()
        out = check_writable(out_dir, "folder")
        if cfg.base_model:  # a missing or corrupt base is refused before anything is loaded or written
            from circuitdyn.runs.checkpoints import resolve

            try:
                resolve(str(cfg.base_model))
            except CircuitdynError as err:
                raise CircuitdynError(f"cannot load the base model {cfg.base_model}: {err}") from None
        with file_lock(out, wait=False, what="a CPT run"):  # two runs into one folder would interleave epochs
            for pattern in (".*.tmp", "epoch_*/.*.tmp"):  # left by a killed run: no live writer owns them
                remove_stale_temps(out, pattern)
            return _run_cpt(cfg, out, progress, on_epoch_end, log or (lambda _m: None))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run_cpt(
    cfg: CPTConfig, out: Path, progress: bool, on_epoch_end: Callable[[int], None] | None, say: Callable[[str], None]
) -> CPTResult:
    from circuitdyn.analysis.dynamics import format_table, load_dynamics
    from circuitdyn.io import write_text_atomic
    from circuitdyn.runs.checkpoints import content_hash

    t_start = time.perf_counter()
    cfg.validate()
    resume = _check_out_dir(out, cfg)
    docs, probes = resolve_inputs(cfg)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    model, tok, base_name, base_dir = _load_base(cfg.base_model, device, dtype)
    if cfg.method == "lora" and cfg.save == "adapter" and not (base_dir / "config.json").is_file():
        raise CircuitdynError(
            f"{cfg.base_model}: adapters are saved relative to a full base model folder, and this "
            "base is itself an adapter checkpoint; use --save merged"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("epoch_*.partial"):
        shutil.rmtree(stale)
    say(
        f"CPT {cfg.strategy}/{cfg.method}: {len(docs)} documents, {len(probes)} probes about "
        f"{len(entities(probes))} entities, {cfg.epochs} epochs -> {out}"
    )

    torch.manual_seed(cfg.seed)
    eval_model = model
    if cfg.method == "lora":
        from transformers import AutoModelForCausalLM

        eval_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, local_files_only=True)
        eval_model = eval_model.to(device)  # type: ignore[arg-type]  # `to` typed through a decorator
        train_model = _wrap_lora(model, cfg)
    else:
        train_model = model
    opt = torch.optim.AdamW([p for p in train_model.parameters() if p.requires_grad], lr=cfg.lr)
    prober = Prober(tok, probes, cfg, progress)
    windows = _tokenize_docs(docs, tok, cfg.max_length)
    if not windows:
        raise CircuitdynError("empty corpus: the documents tokenize to nothing")

    done = _completed_epochs(out) if resume is not None else []
    # Resume: the last finished epoch holds the trainer state; earlier finished epochs stay as they are.
    start = 0
    step = 0
    last_rows: list[dict[str, Any]] | None = None
    if done:
        last = done[-1]
        state = out / f"epoch_{last}" / STATE_DIR
        if last > 0 and not state.is_dir():
            raise CircuitdynError(f"{state}: trainer state missing; cannot resume this run (choose another --out)")
        if last > 0:
            meta = _load_state(state, train_model, opt)
            step = int(meta["step"])
        else:
            step = 0
        if cfg.method == "lora" and (out / f"epoch_{last}" / MODEL_DIR).is_dir():
            _load_weights(eval_model, out / f"epoch_{last}" / MODEL_DIR)
        elif cfg.method == "lora" and last > 0:
            with torch.no_grad():
                eval_model.load_state_dict(merged_state_dict(train_model, "lora"), strict=False)
                eval_model.tie_weights()
        last_rows = [json.loads(x) for x in (out / f"epoch_{last}" / "probe_results.jsonl").read_text().splitlines()]
        start = last + 1
        say(f"resuming after epoch {last} (step {step})")

    trained: list[int] = []
    for epoch in range(start, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        partial = out / f"epoch_{epoch}.partial"
        partial.mkdir()
        losses: list[float] = []
        trained_entities: list[str] = []
        log_lines: list[str] = []
        if epoch > 0:
            use = training_windows(windows, docs, cfg.strategy, _learned(last_rows or [], cfg.threshold))
            trained_entities = sorted({e for i, _ in use if (e := docs[i].entity)})
            ref: PreTrainedModel | None = None
            if cfg.strategy in ("stepwise-kl", "pretrain-kl"):
                from transformers import AutoModelForCausalLM

                ref_epoch = 0 if cfg.strategy == "pretrain-kl" else epoch - 1
                ref_dir = out / f"epoch_{ref_epoch}" / MODEL_DIR
                if ref_dir.is_dir():
                    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=dtype, local_files_only=True)
                else:
                    from circuitdyn.runs.checkpoints import open_run

                    ref = open_run(out, dtype=dtype).hf_model(ref_epoch)
                ref = ref.to(device).eval()  # type: ignore[arg-type]  # `to` typed through a decorator
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(len(use), generator=gen, device="cpu").tolist()
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            train_model.train()
            batches = [[use[j] for j in order[s : s + cfg.batch_size]] for s in range(0, len(order), cfg.batch_size)]
            bar = progress_bar(batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False)
            for batch in bar:
                width = max(len(w) for _, w in batch)
                pad = tok.pad_token_id
                ids = torch.tensor([w + [pad] * (width - len(w)) for _, w in batch], device=device)
                mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for _, w in batch], device=device)
                labels = ids.masked_fill(mask == 0, -100)
                logits = train_model(input_ids=ids, attention_mask=mask).logits.float()
                ce = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
                )
                loss = ce
                kl_value = None
                if ref is not None and cfg.kl_weight > 0:
                    with torch.no_grad():
                        ref_logits = ref(input_ids=ids, attention_mask=mask).logits.float()
                    kl = _kl(logits, ref_logits, mask.float())
                    loss = ce + cfg.kl_weight * kl
                    kl_value = kl.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                losses.append(ce.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                log_lines.append(
                    json.dumps({"step": step, "epoch": epoch, "loss": losses[-1], "kl": kl_value, "total": loss.item()})
                )
            del ref
            with torch.no_grad():
                if cfg.method == "lora":
                    eval_model.load_state_dict(merged_state_dict(train_model, "lora"), strict=False)
                    eval_model.tie_weights()
        (partial / "train_log.jsonl").write_text("".join(x + "\n" for x in log_lines))
        as_adapter = cfg.method == "lora" and cfg.save == "adapter"
        if not as_adapter:
            eval_model.save_pretrained(partial / MODEL_DIR)
            tok.save_pretrained(partial / MODEL_DIR)
            weights_hash = content_hash(partial / MODEL_DIR)
        elif epoch == 0:
            weights_hash = content_hash(base_dir)
        else:
            save_adapter(train_model, partial / ADAPTER_DIR, base_dir, cfg.train_embeddings)
            weights_hash = content_hash(partial / ADAPTER_DIR, base=base_dir)
        rows, control = prober.evaluate(eval_model)
        _write_results(partial, rows, control, cfg.threshold)
        learned = sorted(_learned(rows, cfg.threshold))
        train_loss = sum(losses) / len(losses) if losses else None
        info = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "steps": len(losses),
            "trained_entities": trained_entities,
            "learned": learned,
            "math": control.get("math", {}).get("exact_match"),
            "SocialIQA": control.get("SocialIQA", {}).get("exact_match"),
            "content_hash": weights_hash,
            "wall_s": time.perf_counter() - t_epoch,
            **({"model": str(base_dir.resolve())} if as_adapter and epoch == 0 else {}),
        }
        if epoch > 0:
            _save_state(partial / STATE_DIR, train_model, opt, {"epoch": epoch, "step": step})
        (partial / "epoch.json").write_text(json.dumps(info, indent=1))
        _finish_epoch(partial, out / f"epoch_{epoch}")
        prev_state = out / f"epoch_{epoch - 1}" / STATE_DIR
        if epoch > 0 and prev_state.is_dir():
            shutil.rmtree(prev_state)
        done = _completed_epochs(out)
        _write_manifest(out, base_name, cfg, done)
        last_rows = rows
        trained.append(epoch)
        loss_txt = "-" if train_loss is None else f"{train_loss:.4f}"
        controls = "".join(
            f", {k} {v['exact_match']:.3f} ({v['n']} items{', a subset' if v['subset'] else ''})"
            for k, v in control.items()
        )
        say(
            f"epoch {epoch}: loss {loss_txt}, learned {len(learned)}/{len(entities(probes))} entities "
            f"{learned}{controls} ({info['wall_s']:.0f}s)"
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    dyn = load_dynamics(out, threshold=cfg.threshold)
    table = dyn.table()
    write_text_atomic(out / RESULTS_TABLE, table.to_csv(index=False))
    wall = time.perf_counter() - t_start
    say(format_table(dyn))
    return CPTResult(out, dyn, wall, trained)

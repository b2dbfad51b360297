"""Shared fixtures: tiny random checkpoints and a small tokenizer, built inside the tests (no hub)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny models are dominated by per-op overhead, which a second thread only adds to (and on a loaded 2-core
# machine threads fight); the integration tests on SmolLM2 get the machine's threads back.
TORCH_THREADS = torch.get_num_threads()
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_for_integration_tests(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("integration"):
        torch.set_num_threads(TORCH_THREADS)
        yield
        torch.set_num_threads(1)
    else:
        yield


REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
"""Fixtures the tests read (the paper's released results); probe sets come from the package."""


# --- the suite never writes into the repository: `git status` before and after the session must agree ---
_CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info")


def _git_status() -> dict[str, str] | None:
    """Every path `git status` reports in the checkout (changed, untracked, and ignored entries other than
    Python's and pytest's caches), mapped to its status and, for files, a digest of the content; None when git
    is missing or the tests do not run from a git checkout (an sdist, an unpacked wheel)."""
    import hashlib
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None:
        return None

    def porcelain(*extra: str) -> list[str] | None:
        try:
            done = subprocess.run(
                [git, "-C", str(REPO), "status", "--porcelain=v1", "-z", *extra],
                capture_output=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.decode("utf-8", "surrogateescape").split("\0") if done.returncode == 0 else None

    try:
        top = subprocess.run(
            [git, "-C", str(REPO), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO:
        return None
    changed = porcelain("--untracked-files=all")
    ignored = porcelain("--ignored=traditional", "--untracked-files=normal")
    if changed is None or ignored is None:
        return None
    entries: list[tuple[str, str]] = []
    fields = iter(changed)
    for entry in fields:
        if entry:
            entries.append((entry[:2], entry[3:]))
            if entry[0] in "RC":
                next(fields, None)  # a rename's or copy's source path, given as a field of its own
    entries += [(e[:2], e[3:]) for e in ignored if e.startswith("!! ")]
    out: dict[str, str] = {}
    for status, path in entries:
        if any(part in _CACHES or part.endswith(".egg-info") or part.endswith(".pyc") for part in Path(path).parts):
            continue
        file = REPO / path
        digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else ""
        out[path] = f"{status} {digest}"
    return out


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # once per run (the controller under pytest-xdist)
        session.config.stash[_GIT_BEFORE] = _git_status()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_GIT_BEFORE, None)
    if before is None:
        return
    after = _git_status()
    if after is None:
        return
    written = sorted(p for p in after if after[p] != before.get(p))
    gone = sorted(p for p in before if p not in after)
    if written or gone:
        lines = [f"the test session changed the repository ({REPO}); tests must write under tmp_path:"]
        lines += [f"  {after[p][:2]} {p}" for p in written]
        lines += [f"  gone {p}" for p in gone]
        session.config.stash[_GIT_CHANGES] = lines
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = config.stash.get(_GIT_CHANGES, None)
    if lines:
        terminalreporter.section("repository changed", sep="!", red=True, bold=True)
        for line in lines:
            terminalreporter.write_line(line, red=True)


_GIT_BEFORE = pytest.StashKey["dict[str, str] | None"]()
_GIT_CHANGES = pytest.StashKey["list[str]"]()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def load_script(path: Path, name: str | None = None) -> types.ModuleType:
    """A script of the repository (a benchmark, an example, the tutorial runner) imported as a module, registered
    in sys.modules under `name` (default: the file's stem) so that its dataclasses resolve."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def seed_sentences(limit: int = 400) -> list[str]:
    """Real text for the tiny tokenizer's vocabulary: the seed probes' questions, answers and chunks."""
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


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """A small byte-level BPE tokenizer trained on seed text, saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(seed_sentences(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def tiny_hf_config(arch: str, vocab_size: int):
    """A 2-layer model config: `llama` has grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
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
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    raise ValueError(arch)


def save_tiny_model(out_dir: Path, arch: str, tokenizer_dir: Path, seed: int) -> Path:
    """Save a randomly initialised tiny model (+ tokenizer files) as an HF folder."""
    import shutil

    from transformers import AutoModelForCausalLM

    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, vocab), dtype=torch.float32)
    model.save_pretrained(out_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def make_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[..., Path]:
    """Factory: a run folder of `n_epochs + 1` tiny random checkpoints (epoch_0 ... epoch_N) with run.json."""

    def make(arch: str = "llama", n_epochs: int = 2, manifest: bool = True, name: str | None = None) -> Path:
        from circuitdyn.runs.checkpoints import write_manifest

        root = tmp_path_factory.mktemp(name or f"run-{arch}")
        for e in range(n_epochs + 1):
            save_tiny_model(root / f"epoch_{e}", arch, tokenizer_dir, seed=e)
        if manifest:
            write_manifest(
                root,
                base_model=f"tiny-{arch}",
                epochs=[
                    {"epoch": e, "path": f"epoch_{e}", "step": 10 * e, "train_loss": None if e == 0 else 3.0 / e}
                    for e in range(n_epochs + 1)
                ],
            )
        return root

    return make


@pytest.fixture(scope="session")
def llama_run(make_run: Callable[..., Path]) -> Path:
    return make_run("llama", 2)


@pytest.fixture(scope="session")
def gpt2_run(make_run: Callable[..., Path]) -> Path:
    return make_run("gpt2", 1)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real embedded default model (integration tests only)."""
    from circuitdyn.runs.gguf import default_model_dir

    return default_model_dir()


# --- tiny HookedTransformers for the attribution engine (built directly from a config, random weights) ---
def tiny_tl_model(arch: str = "llama", seed: int = 0, n_layers: int = 2, d_vocab: int = 50):
    """A random HookedTransformer: `llama` = RMSNorm, rotary, gated SiLU MLP, GQA (4 heads, 2 KV heads);
    `gpt2` = LayerNorm, learned positions, GELU MLP. Biases and norm weights are randomized too."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    common = dict(
        n_layers=n_layers,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_ctx=64,
        d_vocab=d_vocab,
        seed=seed,
        init_weights=True,
        device="cpu",
    )
    if arch == "llama":
        cfg = HookedTransformerConfig(
            **common,
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
        cfg = HookedTransformerConfig(
            **common,
            d_mlp=64,
            act_fn="gelu_new",
            normalization_type="LN",
            positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel",
        )
    else:
        raise ValueError(arch)
    model = HookedTransformer(cfg, move_to_device=False)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b") or name.endswith(".w"):
                base = 1.0 if name.endswith(".w") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model


def tiny_facts(n: int = 4, d_vocab: int = 50, seed: int = 0, noise_every: int = 2):
    """Random FactPrompts of varied lengths (some entity-swap, some noise corruption, multi-token answers)."""
    from circuitdyn.probes.probes import FactPrompt

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 3) % 5
        clean = torch.randint(1, d_vocab, (length,), generator=gen).tolist()
        answer = torch.randint(1, d_vocab, (1 + i % 3,), generator=gen).tolist()
        contrast = int(torch.randint(1, d_vocab, (1,), generator=gen))
        if noise_every and i % noise_every == 1:
            out.append(
                FactPrompt(
                    f"f{i}",
                    tuple(clean),
                    tuple(clean),
                    tuple(answer),
                    "noise",
                    noise_positions=(1, 2),
                    contrast_token=contrast,
                )
            )
        else:
            corrupted = list(clean)
            corrupted[1] = (corrupted[1] % (d_vocab - 1)) + 1
            corrupted[2] = (corrupted[2] * 7 % (d_vocab - 1)) + 1
            out.append(
                FactPrompt(f"f{i}", tuple(clean), tuple(corrupted), tuple(answer), "entity", contrast_token=contrast)
            )
    return out


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_tl(request):
    """Each tiny attribution model in turn (session-scoped: do not modify its weights)."""
    return tiny_tl_model(request.param)


# --- two tiny models that recall the same facts, trained from different random initialisations ---
PAIR_ENTITIES = (
    ("tom-hanks", "Tom Hanks", "red", "Paris"),
    ("ben-stiller", "Ben Stiller", "blue", "Rome"),
    ("miles-davis", "Miles Davis", "green", "Oslo"),
)
"""Names whose mentions the tiny tokenizer splits into equally many tokens, so every fact has two swap partners."""
PAIR_PROBES = [
    {"id": f"{slug}/{kind}", "entity": name, "question": question.format(name=name), "answer": answer}
    for slug, name, colour, city in PAIR_ENTITIES
    for kind, question, answer in (
        ("colour", "What is the favourite colour of {name}?", colour),
        ("city", "In which city does {name} live?", city),
    )
]


def train_to_recall(model, tokenizer, probes, seed: int, max_steps: int = 600) -> int:
    """Train `model` on the probes' prompt + answer until every answer token is its greedy prediction and
    the answer's log-prob exceeds -0.1 (teacher-forced); returns the steps taken (fails if never reached)."""
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
        logp = logits[:, :-1].log_softmax(-1)
        target = labels[:, 1:]
        mask = target != -100
        token_logp = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0] * mask
        loss = -(token_logp.sum() / mask.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            greedy = (logits[:, :-1].argmax(-1) == target) | ~mask
            if greedy.all() and bool((token_logp.sum(1) > -0.1).all()):
                model.eval()
                return step
    raise AssertionError(f"the tiny model (seed {seed}) did not learn the probes in {max_steps} steps")


@pytest.fixture(scope="session")
def trained_pair_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    """A run whose epoch 0 and epoch 1 are tiny Llamas trained from different random inits until both recall
    the same six facts (three entities, two parallel questions each); returns (run folder, probe file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuitdyn.runs.checkpoints import write_manifest

    root = tmp_path_factory.mktemp("trained-pair")
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in PAIR_PROBES))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    run = root / "run"
    for epoch, seed in ((0, 11), (1, 12)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_hf_config("llama", vocab), dtype=torch.float32)
        train_to_recall(model, tok, PAIR_PROBES, seed)
        model.save_pretrained(run / f"epoch_{epoch}")
        tok.save_pretrained(run / f"epoch_{epoch}")
    write_manifest(
        run,
        base_model="tiny-llama (two inits)",
        epochs=[{"epoch": e, "path": f"epoch_{e}", "step": e, "train_loss": None} for e in (0, 1)],
    )
    return run, probes

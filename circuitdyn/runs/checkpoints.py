"""Per-epoch CPT checkpoints on disk, and loading them offline into a HookedTransformer.

A *run* is a folder laid out as `checkpoints_spec/` describes: `run.json` plus `epoch_0/` (the model
before CPT) ... `epoch_N/`, each a Hugging Face `save_pretrained` folder or one holding it in
`merged_model/`, or a PEFT adapter in `adapter/`. Discovery also works without `run.json`, on a single plain
HF folder (a one-checkpoint run), on a `.gguf` file and on a `transformers.Trainer` output folder
(`checkpoint-STEP/` folders with `trainer_state.json`, full weights or PEFT adapters). An adapter-only
checkpoint is merged into its base model's weights in memory (peft), and the base weights stay loaded while
switching between adapters. All epochs of a run share one architecture and tokenizer, so switching to
another epoch swaps weights into the same `HookedTransformer` instead of building a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from circuitdyn.errors import CircuitdynError
from circuitdyn.io import cache_dir, write_json_atomic
from circuitdyn.runs.gguf import gguf_cache_dir, gguf_to_hf
from circuitdyn.runs.trainer_output import trainer_checkpoints

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MANIFEST = "run.json"
MANIFEST_FORMAT = "circuitdyn-run/1"
SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "run.schema.json"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"
CheckpointKind = Literal["full", "adapter"]
# Config fields that must agree between epochs of one run (they fix every tensor's shape).
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
)
_REQUIRED_FIELDS = {
    "width": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocabulary": ("vocab_size",),
}
"""Shape fields config.json must state (any one name of each group): transformers would fill in its defaults
(a 4096-wide, 32-layer Llama), describing a model that is not on disk."""
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")


Device = str
"""`auto` (cuda if available, else mps, else cpu), `cpu`, `cuda`, `cuda:N` or `mps`."""
DType = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device meant by `device` (`auto`: cuda if available, else mps, else cpu), with its index
    (`cuda` is the current CUDA device, `cuda:0` say, as tensors report it); an unknown or unavailable device
    is a CircuitdynError naming it."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        mps = getattr(torch.backends, "mps", None)
        name = "cuda" if torch.cuda.is_available() else "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CircuitdynError(f"device {name!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise CircuitdynError(f"device {name!r} is not available here (CUDA devices: {torch.cuda.device_count()})")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CircuitdynError(f"device {name!r} is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise CircuitdynError(f"device {name!r} is not supported (use auto, cpu, cuda, cuda:N or mps)")
    if dev.index is None and dev.type != "cpu":
        dev = torch.device(dev.type, torch.cuda.current_device() if dev.type == "cuda" else 0)
    return dev


def resolve_dtype(dtype: str | torch.dtype = "float32") -> torch.dtype:
    """The torch dtype of `float32`, `bfloat16` or `float16`."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if str(dtype) not in DTYPES:
        raise CircuitdynError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


# --------------------------------------------------------------------------- weights on disk


def weight_files(hf_dir: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of an HF folder (or of a PEFT adapter folder), safetensors preferred; pickle files
    only with `allow_pickle`."""
    if is_adapter_dir(hf_dir):
        return _adapter_weight_files(hf_dir, allow_pickle)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CircuitdynError(f"{index}: not a valid safetensors index ({err})") from None
        return [hf_dir / s for s in shards]
    if (hf_dir / "model.safetensors").exists():
        return [hf_dir / "model.safetensors"]
    safetensors = sorted(hf_dir.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = sorted(hf_dir.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise CircuitdynError(
                f"{hf_dir}: holds only pickle weights ({pickles[0].name}); pickle can run arbitrary code, so it is "
                "refused. Convert it to safetensors, or opt in with allow_pickle=True / --allow-pickle "
                "(loaded with torch.load(weights_only=True))."
            )
        return pickles
    raise CircuitdynError(f"{hf_dir}: no weights found (expected model.safetensors or model-*.safetensors)")


def is_adapter_dir(folder: Path) -> bool:
    """A PEFT adapter folder: `adapter_config.json` and no model `config.json` of its own."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def _adapter_weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    if (folder / "adapter_model.safetensors").is_file():
        return [folder / "adapter_model.safetensors"]
    if (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise CircuitdynError(
                f"{folder}: the adapter is a pickle file (adapter_model.bin); pickle can run "
                "arbitrary code, so it is refused. Opt in with allow_pickle=True / --allow-pickle."
            )
        return [folder / "adapter_model.bin"]
    raise CircuitdynError(f"{folder}: {ADAPTER_CONFIG} but no adapter weights (expected adapter_model.safetensors)")


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read weight files into a state dict (safetensors memory-mapped; pickle only via weights_only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                state.update(load_file(f))
            except (SafetensorError, OSError, ValueError) as err:
                raise CircuitdynError(f"{f}: corrupt or truncated safetensors file ({err})") from None
        else:
            try:
                state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as err:  # torch raises many kinds on bad pickles
                raise CircuitdynError(f"{f}: cannot load pickle weights with weights_only=True ({err})") from None
    return state


def check_weight_headers(files: list[Path]) -> None:
    """Open each safetensors header and check the file is as long as the header says (catches truncation)."""
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with open(f, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                n = int.from_bytes(head, "little")
                if n > f.stat().st_size - 8:
                    raise ValueError(f"header length {n} exceeds the file's {f.stat().st_size} bytes")
                header = json.loads(fh.read(n))
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size < 8 + n + end:
                raise ValueError(f"file has {f.stat().st_size} bytes, header needs {8 + n + end}")
        except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError) as err:
            raise CircuitdynError(f"{f}: corrupt or truncated safetensors file ({err})") from None


@cache
def _hash_files(key: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _size, _mtime in key:
        h.update(Path(path).name.encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def content_hash(hf_dir: str | Path, *, allow_pickle: bool = False, base: str | Path | None = None) -> str:
    """sha256 over the weight files' names and bytes: the identity of a checkpoint's weights. An adapter
    folder's identity covers its `base` model's weight files and the adapter's."""
    files = weight_files(Path(hf_dir), allow_pickle=allow_pickle)
    if is_adapter_dir(Path(hf_dir)):
        if base is None:
            raise CircuitdynError(f"{hf_dir}: an adapter's content hash needs its base model folder")
        files = weight_files(Path(base), allow_pickle=allow_pickle) + files
    return _hash_files(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def tokenizer_fingerprint(hf_dir: Path) -> str:
    """A hash of the tokenizer files, to check that epochs share one tokenizer."""
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = hf_dir / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Checkpoint:
    """One epoch of a run: where its HF folder (or PEFT adapter folder) is and what the manifest says of it."""

    epoch: int
    path: Path
    step: int | None = None
    train_loss: float | None = None
    recorded_hash: str | None = None
    allow_pickle: bool = False
    kind: CheckpointKind = "full"
    """`full`: an HF folder with all weights; `adapter`: PEFT adapter weights applied to `base`."""
    base: Path | None = None
    """The base model folder an adapter applies to (None for full checkpoints)."""
    trained_epochs: float | None = None
    """Epochs of training done, as `trainer_state.json` records it (fractional for step-based saves)."""

    @property
    def model_dir(self) -> Path:
        """The HF folder holding this checkpoint's config.json and tokenizer (an adapter's base)."""
        return self.base if self.kind == "adapter" and self.base is not None else self.path

    @property
    def content_hash(self) -> str:
        """The recorded hash if the manifest has one, else computed from the weight files (an adapter's: its
        base's and its own)."""
        return self.recorded_hash or content_hash(self.path, allow_pickle=self.allow_pickle, base=self.base)

    @property
    def weight_files(self) -> list[Path]:
        return weight_files(self.path, allow_pickle=self.allow_pickle)

    @property
    def config(self) -> dict[str, Any]:
        return _read_config(self.model_dir)


def _read_config(hf_dir: Path) -> dict[str, Any]:
    f = hf_dir / "config.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CircuitdynError(f"{hf_dir}: no config.json (not a Hugging Face model folder)") from None
    except json.JSONDecodeError as err:
        raise CircuitdynError(f"{f}: invalid JSON ({err})") from None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def adapter_base(adapter_dir: Path, base: str | Path | None = None) -> Path:
    """The base model folder of a PEFT adapter: `base` when given, else the adapter's
    `base_model_name_or_path` when that is a local model folder."""
    if base is not None:
        folder = Path(base).expanduser()
        if not (folder / "config.json").is_file():
            raise CircuitdynError(f"{folder}: the base model given (--base) is not a model folder (no config.json)")
        return folder
    cfg_file = adapter_dir / ADAPTER_CONFIG
    try:
        named = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as err:
        raise CircuitdynError(f"{cfg_file}: invalid adapter config ({err})") from None
    if named and (Path(named).expanduser() / "config.json").is_file():
        return Path(named).expanduser()
    raise CircuitdynError(
        f"{adapter_dir}: adapter-only checkpoint whose base model {named!r} is not a local model "
        "folder; pass the base model folder with --base DIR (base=... in the API)"
    )


def check_adapter_fits(ck: Checkpoint) -> None:
    """Check an adapter's tensor shapes against its base's modules (read from the headers and config alone),
    so a base of another architecture or vocabulary is named as such rather than failing inside peft."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    assert ck.base is not None
    files = [f for f in ck.weight_files if f.suffix == ".safetensors"]
    if not files:
        return
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ck.base, local_files_only=True))
    except Exception as err:
        raise CircuitdynError(f"{ck.base}: cannot read the adapter's base model config ({err})") from None
    params = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    modules = dict(skeleton.named_modules())
    with safe_open(files[0], "pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    for key, shape in shapes.items():
        name = re.sub(r"^base_model\.model\.", "", key)
        lora = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if lora:
            module = modules.get(lora.group(1))
            if module is None:
                raise CircuitdynError(
                    f"{ck.path}: adapter does not match base model {ck.base}: the base has no "
                    f"module {lora.group(1)!r} (different architecture)"
                )
            feature = "in_features" if lora.group(2) == "A" else "out_features"
            want = getattr(module, feature, None)
            got = shape[1] if lora.group(2) == "A" else shape[0]
            if want is not None and want != got:
                raise CircuitdynError(
                    f"{ck.path}: adapter does not match base model {ck.base}: {lora.group(1)} has "
                    f"{'input' if lora.group(2) == 'A' else 'output'} size {want} in the base, "
                    f"{got} in the adapter (different architecture)"
                )
            continue
        plain = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
        if plain in params and params[plain] != shape:
            what = "vocabulary" if any(n in plain for n in ("embed", "lm_head", "wte")) else "architecture"
            raise CircuitdynError(
                f"{ck.path}: adapter does not match base model {ck.base}: {plain} is "
                f"{list(shape)} in the adapter, {list(params[plain])} in the base "
                f"(different {what})"
            )


def check_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of an HF folder, refused (naming the field) when it lacks `model_type` or a shape field, or
    when a shape field is not a whole number >= 1."""
    f = hf_dir / "config.json"
    config = _read_config(hf_dir)
    if not isinstance(config, dict):
        raise CircuitdynError(f"{f}: expected a JSON object")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise CircuitdynError(f"{f}: field 'model_type' is missing or not a string ({config.get('model_type')!r})")
    for what, names in _REQUIRED_FIELDS.items():
        if not any(n in config for n in names):
            raise CircuitdynError(f"{f}: field '{names[0]}' (the model's {what}) is missing")
    for name in (*_SHAPE_FIELDS, *(n for names in _REQUIRED_FIELDS.values() for n in names)):
        value = config.get(name)
        if name == "model_type" or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CircuitdynError(f"{f}: field '{name}' must be a whole number >= 1, got {value!r}")
    return config


def architecture_difference(a: Checkpoint, b: Checkpoint) -> str | None:
    """What makes two checkpoints' circuits incomparable: the shape-fixing config fields that differ (named,
    with both values), or their tokenizers; None when they share both."""
    ca, cb = a.config, b.config
    diff = {k: (ca.get(k), cb.get(k)) for k in _SHAPE_FIELDS if ca.get(k) != cb.get(k)}
    if diff:
        names = [(c.get("architectures") or [c.get("model_type")])[0] for c in (ca, cb)]
        arch = f"{names[0]} vs {names[1]}: " if names[0] != names[1] else ""
        return f"different architectures ({arch}{', '.join(f'{k}: {x} vs {y}' for k, (x, y) in diff.items())})"
    if (
        _has_tokenizer(a.model_dir)
        and _has_tokenizer(b.model_dir)
        and tokenizer_fingerprint(a.model_dir) != tokenizer_fingerprint(b.model_dir)
    ):
        return "different tokenizers"
    return None


def _hf_dir_of(epoch_dir: Path) -> Path:
    """An epoch folder is an HF folder itself or holds one in `merged_model/` (the paper's layout)."""
    for candidate in (epoch_dir, epoch_dir / "merged_model"):
        if (candidate / "config.json").exists():
            return candidate
    raise CircuitdynError(f"{epoch_dir}: no config.json (nor merged_model/config.json) in this epoch folder")


def validate_manifest(manifest: Any, where: Path) -> None:
    """Check `run.json` against the schema; the error names the offending field."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        parts = [str(p) for p in err.absolute_path]
        if err.validator == "required" and (m := re.match(r"'(.+)' is a required property", err.message)):
            parts.append(m.group(1))
        field_path = ".".join(parts) or "(top level)"
        raise CircuitdynError(f"{where}: field '{field_path}' is invalid: {err.message}")


@dataclass
class Run:
    """A CPT run: its epochs' checkpoints, and one HookedTransformer reused across them."""

    path: Path
    checkpoints: dict[int, Checkpoint]
    manifest: dict[str, Any] = field(default_factory=dict)
    _model: HookedTransformer | None = field(default=None, repr=False)
    _model_epoch: int | None = field(default=None, repr=False)
    _hf_skeleton: PreTrainedModel | None = field(default=None, repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _architecture: str | None = field(default=None, repr=False)
    _base_model: PreTrainedModel | None = field(default=None, repr=False)
    _base_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _consistent: tuple[tuple[int, str], ...] | None = field(default=None, repr=False)

    @property
    def epochs(self) -> list[int]:
        return sorted(self.checkpoints)

    @property
    def base_model(self) -> str:
        return str(self.manifest.get("base_model") or self.checkpoint(self.epochs[0]).path)

    @property
    def architecture(self) -> str:
        """The TransformerLens architecture name of the run's checkpoints (read from config.json, no weights)."""
        if self._architecture is None:
            self._architecture = tl_config(self.checkpoint(self.epochs[0]).model_dir).original_architecture
        return self._architecture

    @property
    def context_length(self) -> int:
        """How many positions the run's model takes (TransformerLens `n_ctx`, read from config.json)."""
        return int(tl_config(self.checkpoint(self.epochs[0]).path).n_ctx)

    def checkpoint(self, epoch: int) -> Checkpoint:
        if epoch not in self.checkpoints:
            raise CircuitdynError(f"{self.path}: no epoch {epoch} (epochs: {self.epochs})")
        return self.checkpoints[epoch]

    def epoch_at_step(self, step: int) -> int:
        """The epoch whose checkpoint was saved at optimizer step `step`."""
        for e in self.epochs:
            if self.checkpoints[e].step == step:
                return e
        steps = [self.checkpoints[e].step for e in self.epochs if self.checkpoints[e].step is not None]
        raise CircuitdynError(f"{self.path}: no checkpoint at step {step} (steps: {steps})")

    def check_consistent(self) -> None:
        """All epochs must share architecture (every shape-fixing config field) and tokenizer (checked once per
        opened run: every extraction asks, and an adapter's check builds its base model's skeleton)."""
        checked = tuple((e, str(self.checkpoints[e].path)) for e in self.epochs)
        if self._consistent == checked:
            return
        first = self.checkpoint(self.epochs[0])
        for e in self.epochs:
            ck = self.checkpoint(e)
            if ck.kind == "adapter":
                check_adapter_fits(ck)
            why = architecture_difference(first, ck) if e != first.epoch else None
            if why:
                raise CircuitdynError(f"{self.path}: epoch {first.epoch} and epoch {e} have {why}")
        self._consistent = checked

    def tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        dirs = [self.checkpoint(e).model_dir for e in self.epochs]
        path = next((d for d in dirs if _has_tokenizer(d)), dirs[0])
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:
            raise CircuitdynError(f"{path}: cannot load the tokenizer ({err})") from None

    def hf_model(self, epoch: int) -> PreTrainedModel:
        """The epoch as a transformers model on `self.device` in `self.dtype`: for generation and training."""
        from transformers import AutoModelForCausalLM

        ck = self.checkpoint(epoch)
        check_weight_headers(ck.weight_files)
        if ck.kind == "adapter":
            import copy

            # transformers types `to` through a decorator that drops its signature
            return copy.deepcopy(self._adapter_merged(ck)).to(self.device, self.dtype)  # type: ignore[arg-type]
        try:
            model = AutoModelForCausalLM.from_pretrained(
                ck.path, dtype=self.dtype, local_files_only=True, use_safetensors=not ck.allow_pickle
            )
        except Exception as err:
            raise CircuitdynError(f"{ck.path}: cannot load the model ({err})") from None
        return model.to(self.device)  # type: ignore[arg-type]  # as above

    def load_model(self, epoch: int) -> HookedTransformer:
        """The epoch as a HookedTransformer on `self.device` in `self.dtype` (no LN folding or centering).

        The first call builds the model; later calls return the same object with the epoch's weights
        copied into its parameters, which costs about as much as reading the weight file.
        """
        ck = self.checkpoint(epoch)
        if self._model is None:
            self._model = self._build_model(ck)
        elif self._model_epoch != epoch:
            self._swap_weights(self._model, ck)
        self._model_epoch = epoch
        return self._model

    def _build_model(self, ck: Checkpoint) -> HookedTransformer:
        from transformer_lens import HookedTransformer
        from transformers import AutoConfig, AutoModelForCausalLM

        self.check_consistent()
        cfg = tl_config(ck.model_dir, device=self.device, dtype=self.dtype)
        hf_config = AutoConfig.from_pretrained(ck.model_dir, local_files_only=True)
        with torch.device("meta"):
            self._hf_skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        model = HookedTransformer(cfg, tokenizer=self.tokenizer(), move_to_device=True)
        model.eval()
        self._swap_weights(model, ck)
        return model

    def _swap_weights(self, model: HookedTransformer, ck: Checkpoint) -> None:
        from transformer_lens import loading_from_pretrained as lfp

        files = ck.weight_files
        check_weight_headers(files)
        if ck.kind == "adapter":
            hf = self._adapter_merged(ck)
        else:
            skeleton = self._hf_skeleton
            assert skeleton is not None
            hf = skeleton
            raw = read_weights(files)
            missing, unexpected = hf.load_state_dict(raw, strict=False, assign=True)
            missing = [k for k in missing if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)]
            if missing or unexpected:
                raise CircuitdynError(
                    f"{ck.path}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
            if "lm_head.weight" not in raw:
                hf.tie_weights()
        with _neutral_config_dir(ck.model_dir) as neutral:
            state = lfp.get_pretrained_state_dict(str(neutral), model.cfg, hf)
        state = model.fill_missing_keys(state)
        with torch.no_grad():
            missing_tl, _ = model.load_state_dict(state, strict=False)
        if missing_tl:
            raise CircuitdynError(f"{ck.path}: weights lack TransformerLens parameters {missing_tl[:3]}")

    def _adapter_merged(self, ck: Checkpoint) -> PreTrainedModel:
        """The base model (CPU, in the run's dtype, as training loads it) with `ck`'s adapter merged into its
        weights by peft.

        The base is read from disk once per run; each call restores its pristine weights from memory and
        merges the next adapter, so the returned model is only valid until the next call.
        """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        assert ck.base is not None
        check_adapter_fits(ck)
        if self._base_model is None or self._base_model.name_or_path != str(ck.base):
            check_weight_headers(weight_files(ck.base, allow_pickle=ck.allow_pickle))
            try:
                loaded = AutoModelForCausalLM.from_pretrained(
                    ck.base, dtype=self.dtype, local_files_only=True, use_safetensors=not ck.allow_pickle
                )
            except Exception as err:
                raise CircuitdynError(f"{ck.base}: cannot load the adapter's base model ({err})") from None
            self._base_model = loaded.eval()
            self._base_state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
        base, pristine = self._base_model, self._base_state
        assert pristine is not None
        with torch.no_grad():
            base.load_state_dict(pristine)
        try:
            merged = PeftModel.from_pretrained(base, ck.path, is_trainable=False).merge_and_unload()
        except Exception as err:  # peft raises many kinds on an adapter that does not fit
            base.load_state_dict(pristine)
            raise CircuitdynError(f"{ck.path}: cannot apply this adapter to its base {ck.base} ({err})") from None
        return merged.eval()


@contextlib.contextmanager
def _neutral_config_dir(hf_dir: Path):
    """A folder named `model` holding only config.json.

    TransformerLens 3.9 guesses the architecture from the *path string*: a path containing "llama" or
    "gemma" crashes, and one containing a known model name takes TL's built-in config instead of the
    local one. Giving it a neutral path makes loading independent of how users name their folders.
    """
    with tempfile.TemporaryDirectory(prefix="circuitdyn-") as tmp:
        neutral = Path(tmp) / "model"
        neutral.mkdir()
        config = _read_config(hf_dir)
        if config.get("model_type") == "gpt2":
            config.setdefault("n_ctx", config.get("n_positions", 1024))  # TL reads n_ctx; newer HF omits it
        (neutral / "config.json").write_text(json.dumps(config))
        yield neutral


def tl_config(hf_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """TransformerLens config for a local HF folder, read from its config.json alone (offline)."""
    from transformer_lens import loading_from_pretrained as lfp

    with _neutral_config_dir(hf_dir) as neutral:
        try:
            cfg = lfp.get_pretrained_model_config(str(neutral), fold_ln=False, device=str(device), dtype=dtype)
        except Exception as err:
            arch = _read_config(hf_dir).get("architectures")
            raise CircuitdynError(f"{hf_dir}: TransformerLens cannot build architecture {arch} ({err})") from None
    cfg.model_name = hf_dir.name
    return cfg


def _checkpoint_in(epoch: int, folder: Path, allow_pickle: bool, base: str | Path | None, **fields: Any) -> Checkpoint:
    """The checkpoint a folder holds: an HF folder (itself or `merged_model/`) or a PEFT adapter (itself or
    `adapter/`, applied to `base` or to the adapter's own local base)."""
    for candidate in (folder, folder / "merged_model"):
        if (candidate / "config.json").is_file():
            return Checkpoint(epoch, candidate, allow_pickle=allow_pickle, **fields)
    for candidate in (folder, folder / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            return Checkpoint(
                epoch,
                candidate,
                allow_pickle=allow_pickle,
                kind="adapter",
                base=adapter_base(candidate, base),
                **fields,
            )
    raise CircuitdynError(
        f"{folder}: no config.json (nor merged_model/config.json) and no PEFT adapter "
        f"({ADAPTER_CONFIG}, nor adapter/{ADAPTER_CONFIG}): this checkpoint folder holds neither "
        "model weights nor an adapter"
    )


def _warn_stray_epochs(run: Run) -> None:
    """Warn of `epoch_*` folders beside a run's epochs that are not among them (`epoch_x`, `epoch_-1`, or a
    folder run.json does not list); a CPT epoch still being written (`.partial`) is not warned of."""
    from circuitdyn import messages

    used = {p for ck in run.checkpoints.values() for p in (ck.path, ck.path.parent)}
    used |= {run.path / f"epoch_{e}" for e in run.epochs}  # an epoch whose model is a reference keeps its results here
    for child in sorted(run.path.glob("epoch_*")):
        if child.is_dir() and child not in used and not child.name.endswith(".partial"):
            why = "not an epoch_N name" if not _EPOCH_DIR.match(child.name) else f"not listed in {MANIFEST}"
            messages.warn(f"{child}: ignored ({why}); the run's epochs are {run.epochs}")


def _discover_epochs(root: Path, allow_pickle: bool, base: str | Path | None = None) -> dict[int, Checkpoint]:
    found = {}
    for child in root.iterdir():
        m = _EPOCH_DIR.match(child.name)
        if m and child.is_dir():
            epoch = int(m.group(1))
            found[epoch] = _checkpoint_in(epoch, child, allow_pickle, base)
    return found


def _discover_trainer(root: Path, allow_pickle: bool, base: str | Path | None) -> dict[int, Checkpoint]:
    """The checkpoints of a Trainer output folder (`trainer_checkpoints`); epoch 0 is the base model when it is
    known (`base`, or the local base of the run's adapters)."""
    checkpoints = {
        c.epoch: _checkpoint_in(
            c.epoch, c.folder, allow_pickle, base, step=c.step, train_loss=c.loss, trained_epochs=c.trained_epochs
        )
        for c in trainer_checkpoints(root)
    }
    if not checkpoints:
        return {}
    base_dir = (
        Path(base) if base is not None else next((ck.base for ck in checkpoints.values() if ck.kind == "adapter"), None)
    )
    if base_dir is not None:
        checkpoints[0] = _checkpoint_in(0, base_dir, allow_pickle, None, step=0, trained_epochs=0.0)
    return dict(sorted(checkpoints.items()))


def open_run(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    base: str | Path | None = None,
) -> Run:
    """Open a run folder (with or without run.json), a Trainer output folder, a single HF or PEFT adapter
    folder, or a GGUF file.

    `device` / `dtype`: where and in which precision `Run.load_model` puts the models (`resolve_device`).
    `base`: the base model folder of adapter-only checkpoints (default: each adapter's own
    `base_model_name_or_path` when it is a local folder), and the run's epoch 0 when it has none of its own.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    root = Path(path).expanduser()
    if not root.exists():
        raise CircuitdynError(
            f"{root}: no such file or folder (circuitdyn opens local folders only; nothing is "
            "downloaded from a model hub)"
        )
    if root.is_file():
        if root.suffix != ".gguf":
            raise CircuitdynError(f"{root}: expected a run folder, an HF model folder or a .gguf file")
        target = gguf_cache_dir(root)
        if not (target / "config.json").exists():
            gguf_to_hf(root, target)
        root = target
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise CircuitdynError(f"{manifest_path}: invalid JSON ({err})") from None
        validate_manifest(manifest, manifest_path)
        checkpoints = {}
        for entry in manifest["epochs"]:
            epoch_dir = root / entry["path"]
            if entry.get("model"):  # a reference to the base model's folder instead of a copy
                epoch_dir = Path(base).expanduser() if base is not None else root / entry["model"]
                if not (epoch_dir / "config.json").is_file():
                    raise CircuitdynError(
                        f"{manifest_path}: epoch {entry['epoch']} is the base model "
                        f"{entry['model']}, which is not a model folder here; "
                        "pass it with --base DIR"
                    )
            if not epoch_dir.is_dir():
                raise CircuitdynError(f"{manifest_path}: epoch {entry['epoch']} path '{entry['path']}' does not exist")
            checkpoints[entry["epoch"]] = _checkpoint_in(
                entry["epoch"],
                epoch_dir,
                allow_pickle,
                base,
                step=entry.get("step"),
                train_loss=entry.get("train_loss"),
                recorded_hash=entry.get("content_hash"),
            )
        run = Run(root, checkpoints, manifest, device=dev, dtype=dt)
    elif (root / "config.json").exists():
        run = Run(root, {0: Checkpoint(0, root, 0, None, None, allow_pickle)}, device=dev, dtype=dt)
    elif is_adapter_dir(root):
        adapter = _checkpoint_in(1, root, allow_pickle, base)
        assert adapter.base is not None
        run = Run(root, {0: _checkpoint_in(0, adapter.base, allow_pickle, None), 1: adapter}, device=dev, dtype=dt)
    elif checkpoints := _discover_trainer(root, allow_pickle, base):
        run = Run(root, checkpoints, device=dev, dtype=dt)
    else:
        checkpoints = _discover_epochs(root, allow_pickle, base)
        if not checkpoints:
            raise CircuitdynError(
                f"{root}: not a run (no run.json, no epoch_N/ or checkpoint-STEP/ folders) and not a model folder "
                "(no config.json, no adapter_config.json)"
            )
        run = Run(root, checkpoints, device=dev, dtype=dt)
    for ck in run.checkpoints.values():
        check_config(ck.model_dir)
        check_weight_headers(ck.weight_files)
    if not (root / "config.json").exists():
        _warn_stray_epochs(run)
    return run


_SPEC = re.compile(r"(.+):(?:(\d+)|step=(\d+))")


def _pick(run: Run, epoch: str | None, step: str | None) -> int:
    if step is not None:
        return run.epoch_at_step(int(step))
    run.checkpoint(int(epoch or 0))
    return int(epoch or 0)


def resolve(
    spec: str,
    *,
    allow_pickle: bool = False,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    base: str | Path | None = None,
) -> tuple[Run, int]:
    """`DIR` (its last epoch), `RUN_DIR:EPOCH` or `RUN_DIR:step=STEP` -> the run and the epoch meant."""
    m = _SPEC.fullmatch(spec)
    if m and not Path(spec).exists():
        run = open_run(m.group(1), allow_pickle=allow_pickle, device=device, dtype=dtype, base=base)
        return run, _pick(run, m.group(2), m.group(3))
    run = open_run(spec, allow_pickle=allow_pickle, device=device, dtype=dtype, base=base)
    return run, run.epochs[-1]


def resolve_epochs(
    spec: str,
    epochs: str | Sequence[int] | None = None,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    base: str | Path | None = None,
) -> tuple[Run, list[int]]:
    """A run and the epochs meant: `RUN:EPOCH` or `RUN:step=STEP` (that checkpoint), a run or model folder (all
    its epochs), narrowed by `epochs` (a list, or comma-separated text such as `--epochs 0,3`); unknown epochs
    are errors."""
    m = _SPEC.fullmatch(spec)
    if m and not Path(spec).exists():
        run, epoch = resolve(spec, device=device, dtype=dtype, base=base)
        chosen = [epoch]
    else:
        run = open_run(spec, device=device, dtype=dtype, base=base)
        chosen = run.epochs
    if isinstance(epochs, str):
        try:
            epochs = [int(e) for e in epochs.split(",") if e.strip()]
        except ValueError:
            raise CircuitdynError(f"epochs must be comma-separated integers, got {epochs!r}") from None
    if epochs is not None:
        chosen = list(epochs)
        for e in chosen:
            run.checkpoint(e)
    return run, chosen


def write_manifest(
    run_dir: str | Path,
    base_model: str,
    epochs: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """Write (atomically) and return a schema-valid `run.json` for the epochs given.

    Each epoch dict needs `epoch` and `path` (relative to the run folder); `step`, `train_loss` and
    `content_hash` are filled in when missing (an adapter epoch must bring its `content_hash`). `model`, when
    given, refers to the folder holding the epoch's model instead of a copy in `path` (the base model of epoch 0).
    """
    run_dir = Path(run_dir)
    rows = []
    for entry in sorted(epochs, key=lambda e: e["epoch"]):
        folder = run_dir / str(entry.get("model") or entry["path"])
        rows.append(
            {
                "epoch": int(entry["epoch"]),
                "path": str(entry["path"]),
                **({"model": str(entry["model"])} if entry.get("model") else {}),
                "step": entry.get("step"),
                "train_loss": entry.get("train_loss"),
                "content_hash": entry.get("content_hash") or content_hash(_hf_dir_of(folder)),
            }
        )
    first = _read_config(_hf_dir_of(run_dir / str(rows[0].get("model") or rows[0]["path"])))
    manifest = {
        "format": MANIFEST_FORMAT,
        "base_model": str(base_model),
        "architecture": (first.get("architectures") or [first.get("model_type", "unknown")])[0],
        "tokenizer": str(extra.pop("tokenizer", base_model)),
        "created_by": f"circuitdyn {__import__('circuitdyn').__version__}",
        "epochs": rows,
        **extra,
    }
    validate_manifest(manifest, run_dir / MANIFEST)
    write_json_atomic(run_dir / MANIFEST, manifest)
    return manifest


def describe(run: Run) -> dict[str, Any]:
    """What `circuitdyn info` prints: epochs, architecture, tokenizer, weight files and hashes."""
    run.check_consistent()
    first = run.checkpoint(run.epochs[0])
    cfg = tl_config(first.model_dir)
    tok = run.tokenizer()
    return {
        "path": str(run.path),
        "base_model": run.base_model,
        "architecture": cfg.original_architecture,
        "epochs": [
            {
                "epoch": ck.epoch,
                "step": ck.step,
                "trained_epochs": ck.trained_epochs,
                "loss": ck.train_loss,
                "kind": ck.kind,
            }
            for ck in (run.checkpoint(e) for e in run.epochs)
        ],
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "normalization": cfg.normalization_type,
        "positional_embedding": cfg.positional_embedding_type,
        "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok), "chat_template": bool(tok.chat_template)},
        "checkpoints": [
            {
                "epoch": ck.epoch,
                "path": str(ck.path),
                "kind": ck.kind,
                "base": None if ck.base is None else str(ck.base),
                "step": ck.step,
                "train_loss": ck.train_loss,
                "weight_files": [f.name for f in ck.weight_files],
                "bytes": sum(f.stat().st_size for f in ck.weight_files),
                "content_hash": ck.content_hash,
            }
            for ck in (run.checkpoint(e) for e in run.epochs)
        ],
    }


def info_text(info: dict[str, Any]) -> str:
    """`describe`'s answer as `circuitdyn info` prints it: the run, its architecture and tokenizer, and one line
    per checkpoint (step, loss, kind, size, content hash, weight files)."""
    kv = info["n_key_value_heads"]
    tok = info["tokenizer"]
    lines = [
        f"run          {info['path']}",
        f"architecture {info['architecture']}: {info['n_layers']} layers, {info['n_heads']} heads "
        f"({kv} KV heads), d_model {info['d_model']}, d_head {info['d_head']}, d_mlp {info['d_mlp']}, "
        f"vocab {info['d_vocab']}, {info['normalization']} norm, {info['positional_embedding']} positions",
        f"tokenizer    {tok['class']} ({tok['vocab_size']} tokens, chat template: "
        f"{'yes' if tok['chat_template'] else 'no'})",
        f"epochs       {[e['epoch'] for e in info['epochs']]}",
    ]
    for ck in info["checkpoints"]:
        loss = "-" if ck["train_loss"] is None else f"{ck['train_loss']:.4f}"
        lines.append(
            f"  epoch {ck['epoch']:>3}  step {ck['step'] if ck['step'] is not None else '-':>6}  "
            f"loss {loss:>8}  {ck['kind']:>7}  {ck['bytes'] / 2**20:8.1f} MiB  {ck['content_hash'][:19]}  "
            f"{', '.join(ck['weight_files'])}"
        )
    return "\n".join(lines)


def circuits_dir(run: Run) -> Path:
    """Where a run's circuits are cached by default: `RUN/circuits` for a run folder; for a plain model folder
    (which may be read-only or shared), `$CIRCUITDYN_CACHE/circuits/<its weight hash>`."""
    if (Path(run.path) / "config.json").is_file():
        return cache_dir() / "circuits" / run.checkpoint(run.epochs[0]).content_hash.split(":")[-1][:16]
    return Path(run.path) / "circuits"

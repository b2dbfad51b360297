"""circuitdyn: what did continual pre-training change inside my model?

The package's folders follow the data, and imports flow one way down this list (`tests/test_layout.py`):

- `runs/`: runs on disk (checkpoints, GGUF and the embedded default model, Trainer output folders);
- `probes/`: probe sets, the facts attribution studies, control probes;
- `engine/`: settings, the graph, the functional forward, attribution, patching, selection, circuit files;
- `analysis/`: results in, tables and verdicts out (diffs, timelines, method noise, the change test,
  dynamics, stopping rules, calibration results, text); it never opens a model;
- `pipeline/`: what opens runs and extracts (circuits of every checkpoint, replicates, comparisons of
  checkpoints, the paper's task circuits, calibration, Ray);
- `training/`: continual pre-training, sweeps, the transformers Trainer callback;
- `viz`: the HTML viewers; `api` and `demo`: the front door and the whole pipeline in one call; `cli`.

`errors`, `io` and `messages` serve them all.
"""

import importlib as _importlib
import warnings

# TransformerLens 3.9 announces HookedTransformer's removal in 4.0 on every construction; we pin <4.
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
# peft asks transformers 5 a deprecated question on every LoRA wrap; it is not the user's to act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"

# --------------------------------------------------------------------------- the front door (for notebooks)
# `import circuitdyn as cd` stays fast (torch, transformers and pandas load on first use): every name below is
# imported lazily by the module-level `__getattr__`.

__all__ = [
    "open_run",
    "Run",
    "load_facts",
    "FactSet",
    "AttributionSettings",
    "Comparison",
    "Selection",
    "extract",
    "load_circuits",
    "CircuitSet",
    "diff",
    "diff_circuits",
    "timeline",
    "calibrate",
    "view",
    "export",
    "to_graph_json",
]

_LAZY = {
    "open_run": ("circuitdyn.runs.checkpoints", "open_run"),
    "Run": ("circuitdyn.runs.checkpoints", "Run"),
    "load_facts": ("circuitdyn.api", "load_facts"),
    "FactSet": ("circuitdyn.probes.facts", "FactSet"),
    "extract": ("circuitdyn.api", "extract"),
    "load_circuits": ("circuitdyn.api", "load_circuits"),
    "CircuitSet": ("circuitdyn.engine.circuits", "CircuitSet"),
    "Selection": ("circuitdyn.engine.selection", "Selection"),
    "AttributionSettings": ("circuitdyn.engine.settings", "AttributionSettings"),
    "Comparison": ("circuitdyn.engine.settings", "Comparison"),
    "diff_circuits": ("circuitdyn.api", "diff_circuits"),
    "calibrate": ("circuitdyn.pipeline.calibrate", "calibrate"),
    "view": ("circuitdyn.api", "view"),
    "to_graph_json": ("circuitdyn.engine.export", "to_graph_json"),
    "diff": ("circuitdyn.api", "diff"),
    "timeline": ("circuitdyn.api", "timeline"),
    "export": ("circuitdyn.engine.export", "export"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(_importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

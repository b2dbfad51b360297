"""circuitdyn: what did continual pre-training change inside my model?

Data flows one way: checkpoints -> model -> probes -> attribution -> circuits -> diff/timeline -> viz/cli.
"""

import importlib as _importlib
import sys as _sys
import types as _types
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
    "open_run", "Run", "load_facts", "FactSet", "AttributionSettings", "Comparison", "Selection", "extract",
    "load_circuits", "CircuitSet", "diff", "diff_circuits", "timeline", "calibrate", "view", "export", "to_graph_json",
]

_LAZY = {
    "open_run": ("circuitdyn.checkpoints", "open_run"),
    "Run": ("circuitdyn.checkpoints", "Run"),
    "load_facts": ("circuitdyn.api", "load_facts"),
    "FactSet": ("circuitdyn.facts", "FactSet"),
    "extract": ("circuitdyn.api", "extract"),
    "load_circuits": ("circuitdyn.api", "load_circuits"),
    "CircuitSet": ("circuitdyn.circuits", "CircuitSet"),
    "Selection": ("circuitdyn.selection", "Selection"),
    "AttributionSettings": ("circuitdyn.settings", "AttributionSettings"),
    "Comparison": ("circuitdyn.settings", "Comparison"),
    "diff_circuits": ("circuitdyn.api", "diff_circuits"),
    "calibrate": ("circuitdyn.calibrate", "calibrate"),
    "view": ("circuitdyn.api", "view"),
    "to_graph_json": ("circuitdyn.export", "to_graph_json"),
}

_CALLABLE_SUBMODULES = {"diff": ("circuitdyn.api", "diff"), "timeline": ("circuitdyn.api", "timeline"),
                        "export": ("circuitdyn.export", "export")}
"""`cd.diff`, `cd.timeline` and `cd.export` are also the names of submodules, which Python binds on the package
when they are imported; so these submodules are made callable: `cd.diff(a, b, probes)` is
`circuitdyn.api.diff(...)`, `cd.timeline(run, facts)` is `circuitdyn.api.timeline`, `cd.export(cs, path,
format)` is `circuitdyn.export.export`, and `cd.diff.diff_circuits` still reaches the module."""


class _CallableModule(_types.ModuleType):
    """A submodule that is also its main function (see `_CALLABLE_SUBMODULES`)."""

    def __call__(self, *args, **kwargs):
        module, name = _CALLABLE_SUBMODULES[self.__name__.rpartition(".")[2]]
        return getattr(_importlib.import_module(module), name)(*args, **kwargs)


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        if name in _CALLABLE_SUBMODULES and isinstance(value, _types.ModuleType) and type(value) is _types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _CALLABLE_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # binds it here, made callable by _Package
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(_importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

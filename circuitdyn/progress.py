"""Progress bars that work wherever circuitdyn runs: a shell, a log file, and Jupyter with or without ipywidgets.

`tqdm.auto` picks the notebook widget inside a Jupyter kernel and, where ipywidgets is missing, warns
("IProgress not found") before falling back; `progress_bar` asks first and gives the widget only where it can
draw, the plain text bar everywhere else. Every long stage names itself in `desc` (attribution, selection,
method-noise replicates, transfer), so a user can tell which one is running.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.std import tqdm

T = TypeVar("T")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython with a kernel app; IPython is not imported where nothing has)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress_bar(iterable: Iterable[T] | None = None, **options: Any) -> tqdm:
    """A tqdm bar (same arguments): the notebook widget in Jupyter when ipywidgets is installed, plain text
    otherwise (never the 'IProgress not found' warning)."""
    if in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm(iterable, **options)
    return tqdm(iterable, **options)

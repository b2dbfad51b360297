"""Progress bars: plain text outside Jupyter and where ipywidgets is missing, never tqdm's IProgress warning."""

from __future__ import annotations

import warnings

import pytest
from tqdm.std import tqdm

from circuitdyn import progress


def test_plain_text_bar_outside_a_notebook(capsys: pytest.CaptureFixture) -> None:
    with progress.progress_bar(range(3), desc="selection", unit="round") as bar:
        assert type(bar) is tqdm
        list(bar)
    assert "selection" in capsys.readouterr().err


def test_notebook_without_ipywidgets_falls_back_to_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress.importlib.util, "find_spec", lambda name: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm.auto would warn "IProgress not found" here
        bar = progress.progress_bar(total=2, desc="method-noise replicates", disable=True)
    assert type(bar) is tqdm

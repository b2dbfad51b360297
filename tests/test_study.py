"""examples/study: the power curve's script runs on circuitdyn's own tests, and its README quotes the stored curve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from conftest import load_script

STUDY = Path(__file__).resolve().parents[1] / "examples" / "study"


def _power():
    return load_script(STUDY / "power.py", "study_power")


def test_readme_quotes_the_stored_power_curve():
    stored = json.loads((STUDY / "power.json").read_text())
    table = _power().markdown(stored["curve"])
    assert table in (STUDY / "README.md").read_text()
    assert {r["entities"] for r in stored["curve"]} == set(stored["settings"]["entities"])


def test_power_curve_runs_and_a_null_claims_rarely(monkeypatch, capsys, tmp_path):
    """A small curve end to end: no effect (AUC 0.5) is rarely claimed, a large one (0.9) at 30 entities
    nearly always, and the JSON it writes renders to the same table as its rows."""
    power = _power()
    out = tmp_path / "curve.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "power.py",
            "--studies",
            "20",
            "--entities",
            "30",
            "--aucs",
            "0.5",
            "0.9",
            "--n-perm",
            "99",
            "--out",
            str(out),
        ],
    )
    power.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("entities_for_width_0.3=")
    rows = json.loads(out.read_text())["curve"]
    null, strong = rows
    assert null["claims"] <= 0.15 and strong["claims"] >= 0.9
    assert np.isfinite(strong["median_width"]) and strong["median_width"] < 0.3

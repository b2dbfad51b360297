"""examples/results: make_tables.py regenerates the committed tables.md (and, under the same plotly.js, the
committed reproduction.html) byte for byte from the committed CSVs, writing only under tmp_path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import load_script

RESULTS = Path(__file__).resolve().parents[1] / "examples" / "results"


def _make_tables():
    return load_script(RESULTS / "make_tables.py", "reproduction_make_tables")


def test_committed_tables_md_is_what_make_tables_prints():
    text, _ = _make_tables().tables(RESULTS)
    assert text == (RESULTS / "tables.md").read_text()


def test_make_tables_out_writes_the_committed_files_under_tmp_path(tmp_path, capsys):
    from plotly.offline import get_plotlyjs_version

    _make_tables().main(["--out", str(tmp_path)])
    assert (tmp_path / "tables.md").read_bytes() == (RESULTS / "tables.md").read_bytes()
    assert capsys.readouterr().out == (RESULTS / "tables.md").read_text()
    committed = (RESULTS / "reproduction.html").read_bytes()
    js = re.search(rb"cdn\.plot\.ly/plotly-([0-9.]+)\.min\.js", committed)
    assert js is not None
    if js.group(1).decode() != get_plotlyjs_version():
        pytest.skip(f"the committed HTML loads plotly.js {js.group(1).decode()}, this plotly {get_plotlyjs_version()}")
    assert (tmp_path / "reproduction.html").read_bytes() == committed

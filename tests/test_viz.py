"""Viewers: figure contents, offline and escaped HTML, and a real headless-Chromium render of each page."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_timeline import circuits_over_epochs, outcomes

from circuitdyn import viz
from circuitdyn.analysis.diff import MEAN, diff_circuits
from circuitdyn.analysis.noise import noise_from_replicates
from circuitdyn.analysis.timeline import build_timeline
from circuitdyn.analysis.transfer import transfer_matrix
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.graph import Graph
from circuitdyn.engine.selection import Selection
from circuitdyn.errors import CircuitdynError

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CIRCUITDYN_ARTIFACTS") or tempfile.gettempdir()) / "circuitdyn-browser"
"""Where the browser tests leave their screenshots: outside the repository (the suite writes nothing there)."""
GRAPH = Graph(4, 4)
EVIL = "fl<script>alert('x')</script>&"


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """The three viewer pages built from synthetic circuits, with a fact id that is an HTML injection."""
    out = tmp_path_factory.mktemp("viewers")
    circuits = circuits_over_epochs(GRAPH, facts=["stable", EVIL], n_epochs=4)
    oc = outcomes()
    oc["fact_id"] = oc["fact_id"].replace("flaky", EVIL)
    epochs = pd.DataFrame({"epoch": range(4), "train_loss": [None, 3.0, 2.0, 1.5], "math": [0.5, 0.4, 0.3, 0.35]})
    tl = build_timeline(circuits, Selection.parse("top:10"), outcomes=oc, epochs=epochs)
    d = diff_circuits(circuits[0], circuits[3], Selection.parse("top:10"), labels=("epoch 0", "epoch 3"))
    labels = {"stable": "Who <b>founded</b> X & Y?"}

    def evaluate(model_epoch, cs, masks):  # share of the model epoch's own |score| the circuit covers
        own = circuits[model_epoch].subset(cs.fact_ids).scores.abs()
        return (own * masks).sum(1) / own.sum(1)

    transfer = transfer_matrix(circuits, evaluate, Selection.parse("top:10"))
    return {
        "circuit": (
            viz.write_circuit_html(circuits[0], out / "circuit.html", labels=labels, sizes=(5, 10, 40)),
            circuits[0],
        ),
        "diff": (viz.write_diff_html(d, out / "diff.html", labels=labels), d),
        "timeline": (viz.write_timeline_html(tl, out / "timeline.html", labels=labels, transfer=transfer), tl),
    }


def test_circuit_figure():
    cs = circuits_over_epochs(GRAPH, facts=["stable", EVIL])[0]
    fig = viz.circuit_figure(cs, "stable", n=10)
    nodes = fig.data[-1]
    assert len(nodes.x) == len(GRAPH.nodes)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert lines and {t.line.color for t in lines} <= set(viz.SIGN_COLOURS.values())
    hover = fig.data[-2].hovertext
    assert sum(text.count("-&gt;") for text in hover) == 10  # every selected port-level edge is listed (escaped)
    assert "top 10 edges" in fig.layout.title.text
    evil = viz.circuit_figure(cs, EVIL, n=5)
    assert "<script>" not in evil.layout.title.text and "&lt;script&gt;" in evil.layout.title.text
    with pytest.raises(CircuitdynError, match="unknown fact id"):
        viz.circuit_figure(cs, "nope")
    # the mean circuit's top edges are neither fact's: edges 0, 1, 3 (means 2.5, 3, 2)
    two = torch.zeros(2, GRAPH.n_edges)
    two[0, [0, 1, 2]] = torch.tensor([5.0, 3.0, 0.1])
    two[1, [1, 3, 4]] = torch.tensor([3.0, 4.0, 0.2])
    mean_hover = "".join(viz.circuit_figure(CircuitSet(two, GRAPH.edges, ["a", "b"]), MEAN, n=3).data[-2].hovertext)
    assert all(html.escape(GRAPH.edges[i]) in mean_hover for i in (0, 1, 3)) and mean_hover.count("-&gt;") == 3


def test_circuit_figure_colours_edges_by_sign():
    """An edge whose score is negative (it supports recall) is drawn in the negative colour, and vice versa."""
    scores = torch.zeros(1, GRAPH.n_edges)
    scores[0, GRAPH.edge_index["input->a0.h0<q>"]] = -3.0
    scores[0, GRAPH.edge_index["m3->logits"]] = 2.0
    fig = viz.circuit_figure(CircuitSet(scores, GRAPH.edges, ["f"]), "f", n=2)
    pos = viz.node_positions(GRAPH)
    drawn = {t.line.color: [x for x in t.x if x is not None] for t in fig.data if t.mode == "lines"}
    assert drawn == {
        viz.SIGN_COLOURS["negative"]: [pos["input"][0], pos["a0.h0"][0]],
        viz.SIGN_COLOURS["positive"]: [pos["m3"][0], pos["logits"][0]],
    }


def test_diff_and_timeline_figures():
    cs = circuits_over_epochs(GRAPH)
    d = diff_circuits(cs[0], cs[3], Selection.parse("top:10"))
    fig = viz.diff_figure(d, "flaky")
    colours = {t.line.color for t in fig.data if t.mode == "lines"}
    assert colours == {viz.STATUS_COLOURS["added"], viz.STATUS_COLOURS["removed"]}
    sankey = viz.sankey_figure(d, "flaky").data[0]
    assert set(sankey.link.label) == {"added", "removed"}
    edges = d.edges("flaky")
    for status in ("added", "removed"):  # link widths: max(|score A|, |score B|) summed over the edges
        flow = sum(v for v, label in zip(sankey.link.value, sankey.link.label) if label == status)
        want = edges.loc[edges.status == status, ["score_a", "score_b"]].abs().max(axis=1).sum()
        assert flow == pytest.approx(want, rel=1e-5)
    bars = viz.layer_shift_figure(d, "flaky").data
    shares = d.layers[d.layers["fact_id"] == "flaky"]
    assert len(bars) == 2 and list(bars[0].y) == pytest.approx(shares["share_a"].tolist())
    assert list(bars[1].y) == pytest.approx(shares["share_b"].tolist())
    tl = build_timeline(
        cs,
        Selection.parse("top:10"),
        outcomes=outcomes(),
        epochs=pd.DataFrame({"epoch": range(4), "train_loss": [None, 3.0, 2.0, 1.0], "math": [1, 0.5, 0.5, 0.4]}),
    )
    names = {t.name for t in viz.timeline_figure(tl, "flaky").data}
    assert {
        "train loss",
        "facts recalled",
        "math",
        "replaced vs previous epoch (mean, 95 % CI)",
        "flaky: replaced",
    } <= names
    assert not any(str(n).startswith("method noise") for n in names)  # no noise measured: no band drawn
    sel = Selection.parse("top:10")
    reps = [(f"r{i}", c, sel.select(c.scores, c.graph)[0], None) for i, c in enumerate([cs[0], cs[1]])]
    noisy = build_timeline(cs, sel, outcomes=outcomes(), noise=noise_from_replicates({0: reps}, sel))
    band = [t for t in viz.timeline_figure(noisy).data if str(t.name).startswith("method noise")]
    assert len(band) == 1 and band[0].fill == "tonexty"
    heat = viz.heatmap_figure(tl).data[0]
    assert heat.type == "heatmap" and [list(r) for r in heat.z] == tl.layer_epoch.to_numpy().tolist()
    assert list(heat.y) == [f"L{i}" for i in range(GRAPH.n_layers)]
    # a fake faithfulness that grows with the model epoch: rows are circuit epochs, columns model epochs
    table = transfer_matrix(cs, lambda j, c, m: torch.full((m.shape[0],), (j + 1) / 5), Selection.parse("top:10"))
    z = viz.transfer_figure(table).data[0].z
    assert len(z) == 4 and all(row[j] == pytest.approx((j + 1) / 5) for row in z for j in range(4))


def test_pages_are_offline_and_escaped(pages):
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    for name, (path, _) in pages.items():
        text = path.read_text()
        assert bundle in text, f"{name} does not embed plotly.js"
        ours = text.replace(bundle, "")
        assert "<script>alert" not in ours, name
        # the injected fact id and the label are in the page, escaped
        assert "fl\\u003cscript\\u003ealert" in ours and "Who \\u003cb\\u003efounded" in ours, name
        assert not re.search(r"<script[^>]+src=", ours), f"{name} loads an external script"
        assert not re.search(r"https?://", ours), f"{name} refers to the network"
        assert "Who <b>founded" not in ours
    with pytest.raises(CircuitdynError, match="unknown fact id"):
        viz.write_circuit_html(pages["circuit"][1], pages["circuit"][0].parent / "x.html", facts=["nope"])


def _chromium() -> str | None:
    """The headless browser; CI (CI=true) installs it, so there a missing one is a failure, not a skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed, and CI must run the browser tests (Debian package `chromium`)")
    return found


def _run_chromium(binary: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--hide-scrollbars",
        "--window-size=1400,2400",
    ]
    return subprocess.run([binary, *flags, *extra, url], capture_output=True, text=True, timeout=180)


def _attr(dom: str, name: str) -> int | None:
    m = re.search(rf'<html[^>]*\s{name}="(\d+)"', dom)
    return int(m.group(1)) if m else None


@pytest.mark.browser
def test_pages_render_in_headless_chromium(pages, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian package `chromium`); the browser test needs it")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expected_plots = {"circuit": 1, "diff": 3, "timeline": 4}
    for name, (path, _obj) in pages.items():
        run = _run_chromium(binary, path.as_uri(), tmp_path / f"profile-{name}", "--dump-dom")
        dom = run.stdout
        assert run.returncode == 0 and "<html" in dom, run.stderr[-2000:]
        assert _attr(dom, "data-js-errors") == 0, re.search(r'<pre id="js-errors">([^<]*)', dom)
        assert _attr(dom, "data-rendered") == expected_plots[name]
        drawn_traces = len(re.findall(r'class="trace (?:scatter|bars)', dom))
        assert drawn_traces >= 3, f"{name}: only {drawn_traces} traces drawn"
        if name == "circuit":
            points = len(re.findall(r'class="point"', dom))
            assert points >= len(GRAPH.nodes), f"{name}: {points} markers for {len(GRAPH.nodes)} components"
        if name == "diff":
            assert len(re.findall(r'class="sankey-link"', dom)) >= 2
        if name == "timeline":
            assert _attr(dom, "data-traces") >= 6
        shot = ARTIFACTS / f"{name}.png"
        shot.unlink(missing_ok=True)
        run = _run_chromium(binary, path.as_uri(), tmp_path / f"profile-shot-{name}", f"--screenshot={shot}")
        assert shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]


@pytest.mark.browser
def test_browser_check_catches_javascript_errors(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian package `chromium`); the browser test needs it")
    page = viz._write_page(tmp_path / "broken.html", "broken", "", '<div id="x"></div>', {}, "undefinedFunction();")
    dom = _run_chromium(binary, page.as_uri(), tmp_path / "profile", "--dump-dom").stdout
    assert _attr(dom, "data-js-errors") == 1 and _attr(dom, "data-rendered") is None


def test_cli_view(tmp_path, capsys):
    from circuitdyn.cli import main

    path = circuits_over_epochs(GRAPH)[0].save(tmp_path / "c.safetensors")
    assert main(["view", str(path), "--fact", "flaky"]) == 0
    assert "viewer:" in capsys.readouterr().out
    assert (tmp_path / "c.html").is_file()
    assert main(["view", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["view", str(path), "--fact", "nope", "--out", str(tmp_path / "x.html")]) == 2
    assert "unknown fact id 'nope'" in capsys.readouterr().err


def test_walkthrough_runs_on_a_tiny_run(make_run, tmp_path, monkeypatch, capsys):
    """examples/walkthrough.py end to end on a tiny run with per-probe results (keeps the example honest)."""
    import json
    import runpy

    from circuitdyn.probes.probes import load_probes, write_probes_jsonl

    run = make_run("llama", 2, name="walkthrough-run")
    probes = load_probes()[:3]
    write_probes_jsonl(probes, tmp_path / "probes.jsonl")
    for e in range(3):
        rows = [
            {"probe_id": p.id, "entity": p.entity, "recall": float((i + e) % 2), "f1": 0.5}
            for i, p in enumerate(probes)
        ]
        (run / f"epoch_{e}" / "probe_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("CIRCUITDYN_RUN", str(run))
    monkeypatch.setenv("CIRCUITDYN_PROBES", str(tmp_path / "probes.jsonl"))
    monkeypatch.setenv("CIRCUITDYN_OUT", str(tmp_path / "out"))
    runpy.run_path(str(REPO / "examples" / "walkthrough.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert "reconfiguration:" in text and "stay put while recalled?" in text and "method noise" in text
    for name in ("circuit", "diff", "timeline"):
        assert (tmp_path / "out" / f"{name}.html").is_file()


def test_large_circuits_are_drawn_capped(monkeypatch):
    monkeypatch.setattr(viz, "MAX_EDGES", 50)
    cs = circuits_over_epochs(GRAPH)
    d = diff_circuits(cs[0], cs[3], Selection.parse("abs:0.0"))  # every edge selected
    title = viz.diff_figure(d, "flaky").layout.title.text
    assert f"strongest {viz.MAX_EDGES} of {GRAPH.n_edges} drawn" in title
    hover = viz.diff_figure(d, "flaky").data[-2].hovertext
    assert sum(t.count("-&gt;") for t in hover) == viz.MAX_EDGES

"""Viewers: figure contents, offline and escaped HTML, and a real headless-Chromium render of each page."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_timeline import META, circuits_over_epochs, outcomes

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
    lines = _edge_lines(fig)
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
    drawn = {t.line.color: [x for x in t.x if x is not None] for t in _edge_lines(fig)}
    assert drawn == {
        viz.SIGN_COLOURS["negative"]: [pos["input"][0], pos["a0.h0"][0]],
        viz.SIGN_COLOURS["positive"]: [pos["m3"][0], pos["logits"][0]],
    }


def test_diff_and_timeline_figures():
    cs = circuits_over_epochs(GRAPH)
    d = diff_circuits(cs[0], cs[3], Selection.parse("top:10"))
    fig = viz.diff_figure(d, "flaky")
    colours = {t.line.color for t in _edge_lines(fig)}
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


def _kept_and_removed(reached: tuple[float, float] | None = None, n_kept: int = 200, n_removed: int = 5):
    """A diff of one fact "f" whose circuit keeps `n_kept` strong edges (the same score at A and B) and loses
    `n_removed` weak ones (score 0.5 at A, 0 at B); `reached`: the faithfulness each side's circuit reached."""
    a = torch.rand(1, GRAPH.n_edges, generator=torch.Generator().manual_seed(1)) * 0.01
    a[0, :n_kept] = torch.linspace(5, 1, n_kept)
    gone = slice(n_kept, n_kept + n_removed)
    a[0, gone] = 0.5
    b = a.clone()
    b[0, gone] = 0.0
    mask_a = torch.zeros(1, GRAPH.n_edges, dtype=torch.bool)
    mask_a[0, : n_kept + n_removed] = True
    mask_b = mask_a.clone()
    mask_b[0, gone] = False
    fa, fb = (None, None) if reached is None else (torch.tensor([reached[0]]), torch.tensor([reached[1]]))
    sets = [CircuitSet(x, GRAPH.edges, ["f"], META) for x in (a, b)]
    return diff_circuits(*sets, Selection.parse("faith:0.8"), selected=((mask_a, fa), (mask_b, fb)))


def _edge_lines(fig) -> list:
    """The line traces that draw edges (not the legend-only entries of the edge-width scale)."""
    return [t for t in fig.data if t.mode == "lines" and t.legend != "legend2"]


def _drawn_counts(title: str) -> dict[str, tuple[int, int]]:
    """status -> (drawn, existing) from a diff title's "drawn: 12 of 2,890 kept · ..." line."""
    found = re.findall(r"([\d,]+) of ([\d,]+) (\w+)", title.split("drawn:")[1])
    return {s: (int(n.replace(",", "")), int(m.replace(",", ""))) for n, m, s in found}


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
    drawn = _drawn_counts(title)
    assert sum(n for n, _ in drawn.values()) == viz.MAX_EDGES
    assert sum(m for _, m in drawn.values()) == GRAPH.n_edges
    hover = viz.diff_figure(d, "flaky").data[-2].hovertext
    assert sum(t.count("-&gt;") for t in hover) == viz.MAX_EDGES


def test_status_shares():
    """Equal shares of the cap for the statuses present; a small status is drawn whole, its leftover shared."""
    assert viz.status_shares({"added": 556, "removed": 488, "kept": 16742}, 600) == {
        "added": 200,
        "removed": 200,
        "kept": 200,
    }
    few = viz.status_shares({"added": 0, "removed": 5, "changed": 30, "kept": 9000, "noise": 700}, 600)
    assert few == {"added": 0, "removed": 5, "changed": 30, "kept": 282, "noise": 283}
    assert viz.status_shares({"kept": 3, "removed": 2}, 600) == {"kept": 3, "removed": 2}
    assert sum(viz.status_shares({"kept": 10, "removed": 10}, 5).values()) == 5


def test_diff_draws_removed_edges_among_many_strong_kept_ones(monkeypatch):
    """Ranked by |score| alone, the 50 drawn edges would all be kept ones; each status now has a share."""
    monkeypatch.setattr(viz, "MAX_EDGES", 50)
    fig = viz.diff_figure(_kept_and_removed(), "f")
    assert viz.STATUS_COLOURS["removed"] in {t.line.color for t in _edge_lines(fig)}
    removed = [t for t in fig.data[-2].hovertext if t.startswith("<b>removed</b>")]
    assert sum(t.count("-&gt;") for t in removed) == 5
    assert _drawn_counts(fig.layout.title.text) == {"removed": (5, 5), "kept": (45, 200)}
    assert "circuits of 205 (A) and 200 (B) edges" in fig.layout.title.text
    on_top = [t.name for t in _edge_lines(fig)]
    assert on_top.index("removed") > on_top.index("kept")  # drawn over the kept edges, not hidden under them


def _tables_wrapped(text: str) -> list[bool]:
    """For each table of a page (its HTML and the HTML fragments in its embedded JSON): is it in a box that
    scrolls sideways?"""
    data = re.search(r'<script id="circuitdyn-data" type="application/json">(.*?)</script>', text, re.S)
    fragments = [text.replace(data.group(0), "")]

    def strings(obj) -> None:
        if isinstance(obj, str):
            fragments.append(obj)
        for value in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []:
            strings(value)

    strings(json.loads(data.group(1)))
    box = '<div class="table-scroll" style="overflow-x:auto">'
    return [frag[: m.start()].endswith(box) for frag in fragments for m in re.finditer("<table", frag)]


def test_tables_scroll_instead_of_clipping(pages):
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    for name in ("diff", "timeline"):
        wrapped = _tables_wrapped(pages[name][0].read_text().replace(bundle, ""))
        assert len(wrapped) >= 2 and all(wrapped), name


def test_titles_sit_below_the_mode_bar(pages):
    d, tl = pages["diff"][1], pages["timeline"][1]
    cs = circuits_over_epochs(GRAPH)
    table = transfer_matrix(cs, lambda j, c, m: torch.full((m.shape[0],), 0.5), Selection.parse("top:10"))
    specs = {
        "circuit": viz.circuit_spec(cs[0], "flaky", 10),
        "diff": viz.diff_spec(d, "stable"),
        "sankey": viz.sankey_spec(d, "stable"),
        "layers": viz.layer_shift_spec(d, "stable"),
        "heatmap": viz.heatmap_spec(tl),
        "transfer": viz.transfer_spec(table),
        "timeline circuit": viz.timeline_circuit_spec(tl, "stable", 1),
    }
    for name, spec in specs.items():
        layout = spec["layout"]
        title = layout["title"]
        assert (title["yref"], title["yanchor"], title["xanchor"], title["x"]) == ("container", "top", "left", 0), name
        assert title["pad"]["t"] >= viz.MODEBAR_PX, name
        lines = title["text"].count("<br>") + 1
        assert layout["margin"]["t"] >= viz.MODEBAR_PX + lines * viz.TITLE_LINE_PX, name
    assert viz.timeline_spec(tl)["layout"]["margin"]["t"] >= viz.MODEBAR_PX + viz.TITLE_LINE_PX


def test_faithfulness_above_one_is_explained(pages, tmp_path):
    note = html.escape(viz.FAITH_NOTE)
    shown = viz.write_diff_html(_kept_and_removed(reached=(1.22, 1.07)), tmp_path / "faith.html").read_text()
    assert shown.count(note) == 1 and "1.220" in shown
    plain = viz.write_diff_html(_kept_and_removed(), tmp_path / "plain.html").read_text()
    assert note not in plain  # no faithfulness on the page: no note
    assert pages["timeline"][0].read_text().count(note) == 1  # the transfer heatmap shows faithfulness


def test_circuit_caption_says_what_is_drawn(tmp_path):
    cs = circuits_over_epochs(GRAPH, facts=["stable", "flaky"])[0]
    title = viz.circuit_figure(cs, "stable", n=10).layout.title.text
    assert (
        f"drawn: the 10 edges with the largest |score|, of all {GRAPH.n_edges:,} scored edges of the graph "
        "(not a selected circuit)" in title
    )
    assert (
        "the 10 edges with the largest |mean score| (mean over the 2 facts)"
        in viz.circuit_figure(cs, n=10).layout.title.text
    )
    mask = torch.zeros(GRAPH.n_edges, dtype=torch.bool)
    mask[[0, 5, 7, 9, 11, 40]] = True  # the top 4 by |score| are 0, 5, 7, 9
    spec = viz.circuit_spec(cs, "stable", 4, mask=mask, selection="faith:0.8")
    caption = "drawn: the 4 edges of the faith:0.8 circuit with the largest |score|, of 6 in the circuit"
    assert caption in spec["layout"]["title"]["text"]
    hover = "".join(spec["data"][-2]["hovertext"])
    assert hover.count("-&gt;") == 4 and all(html.escape(GRAPH.edges[i]) in hover for i in (0, 5, 7, 9))
    whole = viz.circuit_spec(cs, "stable", 100, mask=mask, selection="faith:0.8")["layout"]["title"]["text"]
    assert "drawn: all 6 edges of the faith:0.8 circuit" in whole
    masks = torch.stack([mask, mask])
    page = viz.write_circuit_html(cs, tmp_path / "c.html", masks=masks, selection="faith:0.8", sizes=(4,))
    text = page.read_text()
    assert caption in text and "Line width = |sum of their scores|" in text
    with pytest.raises(CircuitdynError, match="masks have shape"):
        viz.write_circuit_html(cs, tmp_path / "x.html", masks=mask[None])


def test_edge_width_scale():
    """The second legend maps each line width to its |score| range (bins of the largest drawn magnitude)."""
    cs = circuits_over_epochs(GRAPH, facts=["stable", "flaky"])[0]
    fig = viz.circuit_figure(cs, "stable", n=10)
    scale = [t for t in fig.data if t.legend == "legend2"]
    assert [t.line.width for t in scale] == list(viz.WIDTHS)
    assert fig.layout.legend2.title.text.startswith("line width = |sum of the port scores|")
    idx = cs.fact("stable").abs().topk(10).indices.tolist()
    wmax = max(abs(sum(v for _, v in ports)) for ports in viz._fold(GRAPH, cs.fact("stable"), idx).values())
    assert scale[0].name.startswith("0–") and scale[-1].name.endswith(f"{wmax:.2g}")
    drawn = {t.line.width for t in _edge_lines(fig)}
    assert drawn <= set(viz.WIDTHS) and max(drawn) == viz.WIDTHS[-1]
    diff_scale = viz.diff_figure(_kept_and_removed(), "f").layout.legend2.title.text
    assert "max(|score A|, |score B|)" in diff_scale


def test_sankey_labels_are_short():
    d = diff_circuits(*[c for c in circuits_over_epochs(Graph(16, 2), n_epochs=2).values()], Selection.parse("top:40"))
    node = viz.sankey_figure(d, "flaky").data[0].node
    assert all(len(label) <= 6 for label in node.label)  # "input", "L0–1", "logits": no "writes"/"reads"
    assert any(c.endswith("writes") for c in node.customdata) and any(c.endswith("reads") for c in node.customdata)


def _sankey_nodes(dom: str) -> dict[float, list[tuple[float, float, float]]]:
    """Rendered Sankey nodes by column x: (top y, height, label centre y) in pixels."""
    found = re.findall(
        r'<g class="sankey-node" transform="translate\(([-\d.]+),([-\d.]+)\)"[^>]*><rect class="node-rect" '
        r'width="[\d.]+" height="([\d.]+)".*?<text class="node-label"[^>]*?transform="translate\([-\d.]+,([-\d.]+)\)"',
        dom,
    )
    columns: dict[float, list[tuple[float, float, float]]] = {}
    for x, y, h, ly in found:
        columns.setdefault(round(float(x)), []).append((float(y), float(h), float(y) + float(ly)))
    return columns


@pytest.mark.browser
def test_sankey_and_titles_do_not_collide_in_headless_chromium(tmp_path):
    """On a dense diff, rendered Sankey nodes of a column do not overlap and their labels sit a line apart;
    every plot title starts below the mode bar."""
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian package `chromium`); the browser test needs it")
    g = Graph(16, 4)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, g.n_edges, generator=gen) ** 3
    b = a * (1 + 0.5 * torch.randn(2, g.n_edges, generator=gen))
    sets = [CircuitSet(x, g.edges, ["x", "y"], META) for x in (a, b)]
    page = viz.write_diff_html(diff_circuits(*sets, Selection.parse("top:600")), tmp_path / "dense.html")
    dom = _run_chromium(binary, page.as_uri(), tmp_path / "profile", "--dump-dom").stdout
    assert _attr(dom, "data-js-errors") == 0 and _attr(dom, "data-rendered") == 3
    columns = _sankey_nodes(dom)
    assert len(columns) == 2 and all(len(nodes) >= 8 for nodes in columns.values()), columns
    for nodes in columns.values():
        nodes.sort()
        for (y0, h0, label0), (y1, _, label1) in zip(nodes, nodes[1:]):
            assert y1 >= y0 + h0 - 0.5, f"nodes overlap: {nodes}"
            assert label1 - label0 >= 12, f"labels collide: {nodes}"
    tops = [float(y) for y in re.findall(r'<text class="gtitle" x="[\d.]+" y="([\d.]+)"', dom)]
    assert len(tops) == 3 and min(tops) >= viz.MODEBAR_PX - 1, tops
    shot = ARTIFACTS / "dense-diff.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    _run_chromium(binary, page.as_uri(), tmp_path / "profile-shot", f"--screenshot={shot}")
    assert shot.is_file()

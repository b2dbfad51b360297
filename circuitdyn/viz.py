"""Interactive plotly viewers: figures for notebooks (`fig.show()`) and standalone offline HTML pages.

Figures (each returns a `plotly.graph_objects.Figure`):
- `circuit_figure(circuits, fact_id, n)`: a circuit in a layered layout (layer on x, component on y;
  `input` left, `logits` right), edge width by |score| (a second legend maps widths to |score|), colour by
  sign, hover with names and scores; the title's second line says exactly which edges are drawn.
- `diff_figure(diff, fact_id)`: both circuits of a `CircuitDiff` on one canvas, edges coloured
  added / removed / changed / kept / noise; each status present gets a share of the `MAX_EDGES` cap
  (`status_shares`) and the title says how many of each are drawn out of how many exist;
  `sankey_figure(diff, fact_id)`: layer-to-layer flow of |score| by status, nodes stacked so that labels
  never collide; `layer_shift_figure(diff, fact_id)`: importance share per layer, A vs B.
- `timeline_figure(timeline, fact_id)`: training loss, knowledge accuracy, OOD accuracy and circuit
  similarity over epochs; `heatmap_figure(timeline)`: layer x epoch importance.

Pages (`write_circuit_html`, `write_diff_html`, `write_timeline_html`) embed plotly.js (no network
needed), carry the precomputed figure variants as JSON, and switch between them with plain controls:
fact and edge count for circuits, fact for diffs, fact and an epoch slider for timelines (the slider
also moves a marker across the line charts; clicking a chart point moves the slider). Tables scroll sideways
instead of being cut off, every title starts below plotly's mode bar (`MODEBAR_PX`), and a page showing
faithfulness values says once what a value above 1 means (`FAITH_NOTE`). All probe text
(fact ids, labels) is HTML-escaped, and the JSON is embedded with `<`, `>`, `&` escaped. Each page
records JavaScript errors in `data-js-errors` and the number of drawn plots in `data-rendered` on
`<html>`, which the headless-browser test reads.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from circuitdyn.analysis.diff import MEAN, STATUSES, CircuitDiff
from circuitdyn.engine.circuits import CircuitSet
from circuitdyn.engine.graph import Graph
from circuitdyn.errors import CircuitdynError
from circuitdyn.io import write_text_atomic

STATUS_COLOURS = {"added": "#2ca02c", "removed": "#d62728", "changed": "#ff7f0e", "kept": "#7f7f7f", "noise": "#d9d9d9"}
DRAW_ORDER = ("noise", "kept", "changed", "added", "removed")
"""Order in which a diff graph draws its statuses: the many kept and noise edges underneath, the few added and
removed ones on top where they stay visible."""
SIGN_COLOURS = {"negative": "#1f77b4", "positive": "#d62728"}
"""Negative score = patching the edge lowers the metric, i.e. the edge supports recall (see attribution)."""
KIND_COLOURS = {"input": "#444444", "attn": "#9467bd", "mlp": "#17becf", "logits": "#444444"}
WIDTHS = (1.0, 2.0, 3.5, 6.0)
DEFAULT_SIZES = (25, 50, 100, 200)
MAX_EDGES = 200
"""Drawn port-level edges per circuit at most (the strongest; more than ~200 lines over 30 layers is a hairball,
as headless-Chromium screenshots showed at 600); larger circuits say how many are shown. A diff
splits this cap between the statuses present (`status_shares`), so that no status is crowded out."""
WIDTH_COLOUR = "#555555"
"""Colour of the edge-width scale's legend entries (width, not colour, is what they explain)."""
MODEBAR_PX = 36
"""Pixels kept free at the top of every figure for plotly's mode bar (toolbar); titles start below it."""
TITLE_LINE_PX = 20
"""Height of one title line (15 px font): the top margin grows with the title's lines."""
FAITH_NOTE = (
    "faithfulness = share of the full model's clean-vs-corrupted metric gap that the circuit alone recovers. "
    "Values above 1 mean the circuit recovers more than the full model's gap: edges outside it work against "
    "the answer."
)
"""Shown once wherever a viewer shows faithfulness values (a value above 1 is otherwise puzzling)."""
SANKEY_PAD = 18
"""Pixels between the Sankey's nodes in a column: more than a label's height, so labels cannot collide."""
MAX_FACTS = 40
"""Pages carry at most this many facts (plus the mean circuit) to stay small; pass `facts=` to choose."""


# --------------------------------------------------------------------------- layout and traces

Spec = dict[str, Any]
"""A figure as plain data: {"data": [trace dicts], "layout": dict} (what Plotly.js and go.Figure take)."""


def node_positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """Layered layout: x = 0 for input, 2L+1 for block L's heads, 2L+2 for its MLP, 2n+1 for logits;
    y = head index for heads, a row above the heads for MLPs, input and logits centred."""
    mid = (graph.n_heads - 1) / 2
    pos = {"input": (0.0, mid), "logits": (2.0 * graph.n_layers + 1, mid)}
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            pos[f"a{layer}.h{h}"] = (2.0 * layer + 1, float(h))
        if graph.has_mlp:
            pos[f"m{layer}"] = (2.0 * layer + 2, graph.n_heads + 0.5)
    return pos


def _segment(p0: tuple[float, float], p1: tuple[float, float]) -> tuple[list[float], list[float]]:
    """Points of one edge: a straight line, or an arc bowed upwards between nodes of the same row (so
    that MLP -> MLP edges do not hide each other)."""
    (x0, y0), (x1, y1) = p0, p1
    if abs(y0 - y1) > 1e-9:
        return [x0, x1], [y0, y1]
    bow = min(2.0, 0.15 * abs(x1 - x0))
    ts = [i / 8 for i in range(9)]
    return ([x0 + (x1 - x0) * t for t in ts], [y0 + 4 * bow * t * (1 - t) for t in ts])


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fold(graph: Graph, scores: torch.Tensor, idx: list[int]) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """Port-level edges `idx` grouped into component-level edges: (src, dst) -> [(name, score)]."""
    out: dict[tuple[str, str], list[tuple[str, float]]] = {}
    values = scores[idx].tolist()
    for i, v in zip(idx, values):
        name = graph.edges[i]
        src, dst = name.split("->")
        out.setdefault((src, graph.component(dst)), []).append((name, float(v)))
    return out


def _importance(graph: Graph, weights: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Node importance (half of in- plus out-edge |weight|) from the edges `idx` only."""
    src, dst = graph.edge_node_ids
    sel = torch.tensor(idx, dtype=torch.long)
    w = weights[sel].abs().float() / 2
    out = torch.zeros(len(graph.nodes))
    return out.index_add_(0, src[sel], w).index_add_(0, dst[sel], w)


def _strongest(idx: list[int], weight: torch.Tensor, limit: int | None = None) -> list[int]:
    """At most `limit` (default `MAX_EDGES`) of the edges `idx`, largest |weight| first."""
    limit = MAX_EDGES if limit is None else limit
    if len(idx) <= limit:
        return idx
    sel = torch.tensor(idx)
    return sel[weight[sel].abs().topk(limit).indices].tolist()


def status_shares(counts: dict[str, int], limit: int) -> dict[str, int]:
    """How many edges of each status a diff graph draws under a cap of `limit`: equal shares of the cap for the
    statuses present; a status with fewer edges than its share is drawn whole and the rest of its share goes to
    the others. Ranking all edges by |score| alone lets thousands of strong kept edges crowd out the few removed
    ones; with shares every status present is drawn (given `limit` >= the number of statuses present)."""
    out = dict.fromkeys(counts, 0)
    pending = sorted((s for s, c in counts.items() if c > 0), key=lambda s: counts[s])
    left = limit
    while pending:
        share, extra = divmod(left, len(pending))
        if counts[pending[0]] <= share:
            status = pending.pop(0)
            out[status] = counts[status]
            left -= counts[status]
            continue
        for i, status in enumerate(pending):
            out[status] = share + int(i < extra)
        break
    return out


def _strongest_by_status(
    code: torch.Tensor, weight: torch.Tensor, limit: int | None = None
) -> tuple[list[int], dict[str, int], dict[str, int]]:
    """The edges a diff graph draws: per status (`code` indexes `STATUSES`, -1 = in neither circuit) its share
    of the cap (`status_shares`, cap default `MAX_EDGES`), largest |weight| first. Returns the edge indices and
    the drawn and existing counts per status."""
    limit = MAX_EDGES if limit is None else limit
    pools = {s: (code == i).nonzero().flatten() for i, s in enumerate(STATUSES)}
    counts = {s: len(pool) for s, pool in pools.items()}
    drawn = status_shares(counts, limit)
    idx: list[int] = []
    for status, pool in pools.items():
        k = drawn[status]
        idx += pool.tolist() if k >= len(pool) else pool[weight[pool].abs().topk(k).indices].tolist()
    return sorted(idx), drawn, counts


def _drawn_note(drawn: dict[str, int], counts: dict[str, int]) -> str:
    """The title line "drawn: 120 of 2,890 kept · 60 of 60 removed ..." for the statuses present."""
    parts = [f"{drawn[s]:,} of {counts[s]:,} {s}" for s in STATUSES if counts.get(s)]
    return "drawn: " + " · ".join(parts) if parts else "drawn: nothing (no edge in either circuit)"


def _width(w: float, wmax: float) -> float:
    frac = w / wmax if wmax > 0 else 0.0
    return WIDTHS[min(len(WIDTHS) - 1, int(frac * len(WIDTHS)))]


def _width_scale(wmax: float) -> list[dict[str, Any]]:
    """Entries of the second legend (`legend2`, titled by the layout) mapping line width to |score|, one per
    bin of `_width`: bin k spans k/n to (k+1)/n of the largest drawn magnitude `wmax`."""
    n = len(WIDTHS)
    return [
        {
            "type": "scatter",
            "x": [None],
            "y": [None],
            "mode": "lines",
            "line": {"color": WIDTH_COLOUR, "width": width},
            "name": f"{wmax * k / n:.2g}–{wmax * (k + 1) / n:.2g}",
            "legend": "legend2",
            "hoverinfo": "skip",
        }
        for k, width in enumerate(WIDTHS)
    ]


def _edge_traces(
    pos: dict[str, tuple[float, float]],
    items: list[tuple[str, str, float, str, str]],
    colours: dict[str, str],
    draw_order: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Line traces for edges (src, dst, magnitude, colour key, hover text), one per colour x width bin, the
    edge-width scale (`_width_scale`), and last one invisible-marker trace at the midpoints carrying the hover
    text. Colours are drawn in `draw_order` (later on top; default the order of `colours`), listed in the
    legend in the order of `colours`."""
    wmax = max((abs(w) for _, _, w, _, _ in items), default=0.0)
    groups: dict[tuple[str, float], tuple[list, list]] = {}
    mids: list[tuple[float, float]] = []
    for src, dst, w, key, _ in items:
        sx, sy = _segment(pos[src], pos[dst])
        xs, ys = groups.setdefault((key, _width(abs(w), wmax)), ([], []))
        xs += [*sx, None]
        ys += [*sy, None]
        k = len(sx) // 2
        mids.append(((sx[0] + sx[-1]) / 2, sy[k] if len(sx) > 2 else (sy[0] + sy[-1]) / 2))
    traces: list[dict[str, Any]] = []
    rank = {key: i for i, key in enumerate(colours)}
    for key in draw_order or colours:
        shown = False
        for (kind, width), (xs, ys) in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if kind != key:
                continue
            traces.append(
                {
                    "type": "scatter",
                    "x": xs,
                    "y": ys,
                    "mode": "lines",
                    "opacity": 0.75,
                    "line": {"color": colours[key], "width": width},
                    "hoverinfo": "skip",
                    "name": key,
                    "legendgroup": key,
                    "legendrank": rank[key],
                    "showlegend": not shown,
                }
            )
            shown = True
    if items:
        traces += _width_scale(wmax)
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "edges",
                "showlegend": False,
                "hoverinfo": "text",
                "x": [x for x, _ in mids],
                "y": [y for _, y in mids],
                "marker": {"size": 7, "color": "rgba(0,0,0,0)"},
                "hovertext": [t for *_, t in items],
            }
        )
    return traces


def _node_trace(
    graph: Graph, pos: dict[str, tuple[float, float]], importance: torch.Tensor, active: set[str]
) -> dict[str, Any]:
    imax = float(importance.max()) or 1.0
    imp = importance.tolist()
    names = graph.nodes
    kinds = [
        "input" if n == "input" else "logits" if n == "logits" else "attn" if n[0] == "a" else "mlp" for n in names
    ]
    return {
        "type": "scatter",
        "mode": "markers",
        "name": "components",
        "showlegend": False,
        "hoverinfo": "text",
        "x": [pos[n][0] for n in names],
        "y": [pos[n][1] for n in names],
        "marker": {
            "size": [round(6 + 14 * imp[i] / imax, 2) if n in active else 5 for i, n in enumerate(names)],
            "color": [KIND_COLOURS[k] if n in active else "#e5e5e5" for n, k in zip(names, kinds)],
            "line": {"width": 0.5, "color": "#333"},
            "symbol": ["square" if k == "mlp" else "circle" for k in kinds],
        },
        "hovertext": [f"{_esc(n)}<br>importance {imp[i]:.4g}" for i, n in enumerate(names)],
    }


def _titled(text: str, margin: dict[str, int]) -> dict[str, Any]:
    """Layout entries for a title clear of the mode bar (plotly's toolbar, top right): left-aligned with the plot
    area, starting `MODEBAR_PX` below the figure's top, in a top margin that fits all its lines (`<br>`)."""
    title = {
        "text": text,
        "font": {"size": 15},
        "x": 0,
        "xref": "paper",
        "xanchor": "left",
        "y": 1,
        "yref": "container",
        "yanchor": "top",
        "pad": {"t": MODEBAR_PX},
    }
    lines = text.count("<br>") + 1
    return {"title": title, "margin": {**margin, "t": MODEBAR_PX + lines * TITLE_LINE_PX + 10}}


def _small(text: str) -> str:
    """A title's second line: smaller and grey (plotly titles take this much HTML)."""
    return f'<br><span style="font-size:12px;color:#555">{text}</span>'


def _circuit_layout(graph: Graph, title: str, scale_title: str) -> dict[str, Any]:
    """Layout of a circuit graph: the colour legend below the layer axis, and under it the edge-width scale
    (`legend2`, titled `scale_title`), each on its own row so that they never overlap."""
    ticks = [0.0] + [2.0 * L + 1.5 for L in range(graph.n_layers)] + [2.0 * graph.n_layers + 1]
    labels = ["input"] + [f"L{L}" for L in range(graph.n_layers)] + ["logits"]
    height, head = 640, _titled(title, {"l": 50, "r": 20, "b": 110})
    plot_px = height - head["margin"]["t"] - head["margin"]["b"]
    return {
        **head,
        "hovermode": "closest",
        "height": height,
        "plot_bgcolor": "white",
        "xaxis": {
            "tickvals": ticks,
            "ticktext": labels,
            "title": {"text": "layer"},
            "zeroline": False,
            "gridcolor": "#eee",
        },
        "yaxis": {
            "tickvals": [*range(graph.n_heads), graph.n_heads + 0.5],
            "ticktext": [*(f"h{h}" for h in range(graph.n_heads)), "MLP"],
            "zeroline": False,
            "showgrid": False,
            "range": [-0.7, graph.n_heads + 2.8],
        },
        "legend": {"orientation": "h", "x": 0, "y": -48 / plot_px, "yanchor": "top"},
        "legend2": {
            "orientation": "h",
            "x": 0,
            "y": -78 / plot_px,
            "yanchor": "top",
            "title": {"text": scale_title, "side": "left"},
        },
    }


def _hover(names_scores: list[tuple[str, float]], fmt: str = "{:.4g}") -> str:
    return "<br>".join(f"{_esc(n)}: {fmt.format(s)}" for n, s in names_scores)


def _signed_circuit(graph: Graph, scores: torch.Tensor, idx: list[int], title: str) -> Spec:
    """The edges `idx` of one score vector, coloured by sign, widths by |summed port score|."""
    pos = node_positions(graph)
    folded = _fold(graph, scores, idx)
    items = []
    for (src, dst), ports in folded.items():
        total = sum(s for _, s in ports)
        items.append(
            (
                src,
                dst,
                total,
                "negative" if total < 0 else "positive",
                f"{_esc(src)} → {_esc(dst)}: {total:.4g}<br>{_hover(ports)}",
            )
        )
    active = {s for s, _ in folded} | {d for _, d in folded}
    data = _edge_traces(pos, items, SIGN_COLOURS) + [_node_trace(graph, pos, _importance(graph, scores, idx), active)]
    return {"data": data, "layout": _circuit_layout(graph, title, "line width = |sum of the port scores|:")}


# --------------------------------------------------------------------------- figure specs


def circuit_spec(
    circuits: CircuitSet,
    fact_id: str = MEAN,
    n: int = 100,
    label: str | None = None,
    *,
    mask: torch.Tensor | None = None,
    selection: str | None = None,
) -> Spec:
    """`circuit_figure` as plain data; the title's second line says exactly which edges are drawn."""
    scores = circuits.mean() if fact_id == MEAN else circuits.fact(fact_id).float()
    n_graph = scores.shape[0]
    if mask is None:
        n = max(1, min(int(n), n_graph))
        idx = scores.abs().topk(n).indices.tolist()
        ranked = f"|mean score| (mean over the {len(circuits.fact_ids):,} facts)" if fact_id == MEAN else "|score|"
        caption = (
            f"drawn: the {n:,} edges with the largest {ranked}, of all {n_graph:,} scored edges of the graph "
            "(not a selected circuit)"
        )
    else:
        pool = mask.bool().nonzero().flatten()
        circuit = f"the {_esc(selection)} circuit" if selection else "the selected circuit"
        n = min(max(1, int(n)), len(pool))
        idx = pool[scores[pool].abs().topk(n).indices].tolist()
        if not len(pool):
            caption = f"drawn: nothing, {circuit} of this fact is empty"
        elif n == len(pool):
            caption = f"drawn: all {n:,} edges of {circuit}"
        else:
            caption = f"drawn: the {n:,} edges of {circuit} with the largest |score|, of {len(pool):,} in the circuit"
    title = f"{_esc(label or fact_id)}: top {n} edges" + _small(caption)
    return _signed_circuit(circuits.graph, scores, idx, title)


def diff_spec(diff: CircuitDiff, fact_id: str = MEAN) -> Spec:
    """`diff_figure` as plain data: every status present gets its share of the edge cap (`status_shares`), and
    the title says how many edges of each status are drawn out of how many there are."""
    r = diff.row(fact_id)
    graph = diff.graph
    code = diff.status_codes[r]
    strength = torch.maximum(diff.scores_a[r].abs(), diff.scores_b[r].abs())
    idx, drawn, counts = _strongest_by_status(code, strength)
    sa, sb, codes = diff.scores_a[r, idx].tolist(), diff.scores_b[r, idx].tolist(), code[idx].tolist()
    groups: dict[tuple[str, str, str], list[tuple[str, float, float]]] = {}
    for i, a, b, c in zip(idx, sa, sb, codes):
        name = graph.edges[i]
        src, dst = name.split("->")
        groups.setdefault((src, graph.component(dst), STATUSES[c]), []).append((name, a, b))
    items = []
    for (src, dst, status), ports in groups.items():
        mag = max(max(abs(a), abs(b)) for _, a, b in ports)
        text = "<br>".join(f"{_esc(n)}: {a:.4g} → {b:.4g}" for n, a, b in ports)
        items.append((src, dst, mag, status, f"<b>{status}</b> {_esc(src)} → {_esc(dst)}<br>{text}"))
    pos = node_positions(graph)
    active = {s for s, _, _ in groups} | {d for _, d, _ in groups}
    imp = _importance(graph, strength, idx)
    row = diff.facts.loc[fact_id]
    la, lb = _esc(diff.label_a), _esc(diff.label_b)
    title = (
        f"{_esc(fact_id)}: {la} → {lb} · circuits of {int(row['n_a']):,} ({la}) and {int(row['n_b']):,} ({lb}) "
        f"edges · edge Jaccard {row['edge_jaccard']:.2f}" + _small(f"{_drawn_note(drawn, counts)} (strongest first)")
    )
    return {
        "data": _edge_traces(pos, items, STATUS_COLOURS, DRAW_ORDER) + [_node_trace(graph, pos, imp, active)],
        "layout": _circuit_layout(graph, title, "line width = largest max(|score A|, |score B|) of the ports:"),
    }


def layer_bands(n_layers: int, max_bands: int = 8) -> list[tuple[int, int]]:
    """Contiguous layer ranges (first, last) for the Sankey: one per layer up to `max_bands` layers."""
    size = max(1, math.ceil(n_layers / max_bands))
    return [(lo, min(lo + size, n_layers) - 1) for lo in range(0, n_layers, size)]


def _stack(values: list[float], pad: float, scale: float) -> list[float]:
    """Centres (fractions of the plot height, from the top) of nodes stacked in one column: heights
    value x `scale`, `pad` between neighbours, the stack centred vertically."""
    y = (1 - scale * sum(values) - pad * (len(values) - 1)) / 2
    centres = []
    for v in values:
        centres.append(y + scale * v / 2)
        y += scale * v + pad
    return centres


def sankey_spec(diff: CircuitDiff, fact_id: str = MEAN) -> Spec:
    """`sankey_figure` as plain data: writers (left: input and layer bands) to readers (right: layer bands
    and logits), link width = summed max(|score A|, |score B|), colour = status.

    Nodes keep layer order and are stacked as plotly sizes them (height = flow x the scale that fits the fuller
    column, `SANKEY_PAD` px apart), so neither nodes nor their labels overlap; nodes without flow are left out.
    Labels are short ("L0–3"); the columns are named once above them and hovering a node says what it is."""
    r = diff.row(fact_id)
    graph = diff.graph
    code = diff.status_codes[r]
    idx = (code >= 0).nonzero().flatten().tolist()
    mag = torch.maximum(diff.scores_a[r, idx].abs(), diff.scores_b[r, idx].abs()).tolist()
    bands = layer_bands(graph.n_layers)
    band_of = {L: i for i, (lo, hi) in enumerate(bands) for L in range(lo, hi + 1)}
    names = [f"L{lo}" if lo == hi else f"L{lo}–{hi}" for lo, hi in bands]
    left = ["input", *names]
    right = [*names, "logits"]
    src_node, dst_node = graph.edge_node_ids
    layer_of = [graph.layer_of(n) for n in graph.nodes]
    flows: dict[tuple[int, int, str], float] = {}
    for i, m, c in zip(idx, mag, code[idx].tolist()):
        ls, ld = layer_of[int(src_node[i])], layer_of[int(dst_node[i])]
        s_ = 0 if ls < 0 else 1 + band_of[ls]
        d_ = len(bands) if ld >= graph.n_layers else band_of[ld]
        key = (s_, d_, STATUSES[c])
        flows[key] = flows.get(key, 0.0) + m
    out_of, into = [0.0] * len(left), [0.0] * len(right)
    for (s_, d_, _), v in flows.items():
        out_of[s_] += v
        into[d_] += v
    shown_left = [i for i, v in enumerate(out_of) if v > 0]
    shown_right = [i for i, v in enumerate(into) if v > 0]
    node_of = {("L", i): k for k, i in enumerate(shown_left)}
    node_of |= {("R", i): len(shown_left) + k for k, i in enumerate(shown_right)}
    layout = _titled(f"{_esc(fact_id)}: flow of |score| from writer to reader layers, by status", {"l": 10, "r": 10})
    layout["margin"] |= {"t": layout["margin"]["t"] + 28, "b": 10}
    height = 440
    pad = SANKEY_PAD / (height - layout["margin"]["t"] - layout["margin"]["b"])
    columns = ([out_of[i] for i in shown_left], [into[i] for i in shown_right])
    scale = min(((1 - pad * (len(c) - 1)) / sum(c) for c in columns if c), default=1.0)
    keys = sorted(flows)
    data = [
        {
            "type": "sankey",
            "arrangement": "fixed",
            "node": {
                "label": [left[i] for i in shown_left] + [right[i] for i in shown_right],
                "customdata": [f"{left[i]} writes" for i in shown_left] + [f"{right[i]} reads" for i in shown_right],
                "hovertemplate": "%{customdata}: |score| %{value:.3g}<extra></extra>",
                "pad": SANKEY_PAD,
                "thickness": 14,
                "color": "#888",
                "x": [0.01] * len(shown_left) + [0.99] * len(shown_right),
                "y": _stack(columns[0], pad, scale) + _stack(columns[1], pad, scale),
            },
            "link": {
                "source": [node_of["L", k[0]] for k in keys],
                "target": [node_of["R", k[1]] for k in keys],
                "value": [flows[k] for k in keys],
                "color": [STATUS_COLOURS[k[2]] for k in keys],
                "label": [k[2] for k in keys],
            },
        }
    ]
    header = {"xref": "paper", "yref": "paper", "y": 1, "yanchor": "bottom", "yshift": 8, "showarrow": False}
    layout |= {
        "height": height,
        "annotations": [
            {**header, "text": "writer layers (edge source)", "x": 0, "xanchor": "left"},
            {**header, "text": "reader layers (edge destination)", "x": 1, "xanchor": "right"},
        ],
    }
    return {"data": data, "layout": layout}


def layer_shift_spec(diff: CircuitDiff, fact_id: str = MEAN) -> Spec:
    """`layer_shift_figure` as plain data."""
    diff.row(fact_id)
    df = diff.layers[diff.layers["fact_id"] == fact_id]
    data = [
        {
            "type": "bar",
            "x": df["layer"].tolist(),
            "y": df["share_a"].tolist(),
            "name": _esc(diff.label_a),
            "marker": {"color": "#9ecae1"},
        },
        {
            "type": "bar",
            "x": df["layer"].tolist(),
            "y": df["share_b"].tolist(),
            "name": _esc(diff.label_b),
            "marker": {"color": "#3182bd"},
        },
    ]
    layout = {
        **_titled(f"{_esc(fact_id)}: importance share per layer", {"l": 50, "r": 20, "b": 40}),
        "barmode": "group",
        "height": 320,
        "plot_bgcolor": "white",
        "xaxis": {"title": {"text": "layer"}, "dtick": 1 if diff.graph.n_layers <= 16 else 2},
        "yaxis": {"title": {"text": "share of |score|"}, "gridcolor": "#eee"},
    }
    return {"data": data, "layout": layout}


def _ood_columns(per_epoch: Any) -> list[str]:
    known = {
        "epoch",
        "step",
        "train_loss",
        "learned",
        "acquired",
        "retained",
        "forgotten",
        "mean_recall",
        "mean_f1",
        "knowledge_accuracy",
        "fact_accuracy",
        "n_edges",
        "jaccard_first",
        "jaccard_prev",
        "weighted_jaccard_prev",
        "changed_frac_prev",
    }
    return [c for c in per_epoch.columns if c not in known and per_epoch[c].dtype.kind in "fi"]


def _series(values: Any) -> list[Any]:
    return [None if v is None or pd.isna(v) else float(v) for v in values]


def _fact_similarity_trace(timeline: Any, fact_id: str) -> dict[str, Any]:
    f = timeline.fact(fact_id)
    return {
        "type": "scatter",
        "mode": "lines+markers",
        "x": f["epoch"].tolist(),
        "y": _series(1 - f["jaccard_prev"]),
        "name": f"{_esc(fact_id)}: replaced",
        "line": {"dash": "dot"},
        "xaxis": "x4",
        "yaxis": "y4",
    }


def _change_traces(timeline: Any) -> list[dict[str, Any]]:
    """Panel 4: share of the circuit replaced vs the previous epoch (mean over facts, 95 % interval as error
    bars) above a shaded band up to the method-noise level: the mean over facts of their median edge-set
    distance between replicates of one checkpoint (the same number as the per-transition table's "noise")."""
    rec = timeline.reconfiguration
    if not len(rec):
        return []
    x = rec["epoch"].tolist()
    traces: list[dict[str, Any]] = []
    if timeline.noise is not None:
        med = float(timeline.noise.per_fact("edge_jaccard")["median"].mean())
        xs = [timeline.epochs[0], timeline.epochs[-1]]
        traces += [
            {
                "type": "scatter",
                "mode": "lines",
                "x": xs,
                "y": [0, 0],
                "line": {"width": 0},
                "showlegend": False,
                "hoverinfo": "skip",
                "xaxis": "x4",
                "yaxis": "y4",
            },
            {
                "type": "scatter",
                "mode": "lines",
                "x": xs,
                "y": [med, med],
                "fill": "tonexty",
                "fillcolor": "rgba(150,150,150,0.25)",
                "line": {"color": "rgba(120,120,120,0.6)", "dash": "dash"},
                "name": f"method noise: median distance between replicates of one epoch ({med:.2f})",
                "xaxis": "x4",
                "yaxis": "y4",
            },
        ]
    lo = (rec["replaced"] - rec["replaced_lo"]).tolist()
    hi = (rec["replaced_hi"] - rec["replaced"]).tolist()
    traces.append(
        {
            "type": "scatter",
            "mode": "lines+markers",
            "x": x,
            "y": _series(rec["replaced"]),
            "error_y": {"type": "data", "symmetric": False, "array": _series(hi), "arrayminus": _series(lo)},
            "name": "replaced vs previous epoch (mean, 95 % CI)",
            "xaxis": "x4",
            "yaxis": "y4",
        }
    )
    return traces


def timeline_spec(timeline: Any, fact_id: str | None = None) -> Spec:
    """`timeline_figure` as plain data (four stacked panels sharing the epoch axis)."""
    pe = timeline.per_epoch
    x = pe["epoch"].tolist()
    panels = (
        "training loss",
        "knowledge accuracy",
        "OOD accuracy",
        "share of the circuit replaced vs the previous epoch (1 - edge Jaccard)",
    )
    data: list[dict[str, Any]] = []

    def line(col: str, row: int, name: str) -> None:
        if col in pe and pe[col].notna().any():
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "x": x,
                    "y": _series(pe[col]),
                    "name": name,
                    "xaxis": f"x{row}",
                    "yaxis": f"y{row}",
                }
            )

    line("train_loss", 1, "train loss")
    line("knowledge_accuracy", 2, "entities learned")
    line("fact_accuracy", 2, "facts recalled")
    for col in _ood_columns(pe):
        line(col, 3, _esc(col))
    data += _change_traces(timeline)
    if fact_id is not None and fact_id != MEAN:
        data.append(_fact_similarity_trace(timeline, fact_id))
    gap, h = 0.05, (1 - 3 * 0.05) / 4
    layout: dict[str, Any] = {
        "height": 760,
        "hovermode": "x unified",
        "plot_bgcolor": "white",
        "margin": {"l": 50, "r": 20, "t": MODEBAR_PX + TITLE_LINE_PX + 10, "b": 40},
        "legend": {"orientation": "h", "y": -0.1},
        "annotations": [],
    }
    for i, title in enumerate(panels, 1):
        top = round(1 - (i - 1) * (h + gap), 4)
        layout[f"yaxis{i}"] = {"domain": [max(0.0, round(top - h, 4)), top], "anchor": f"x{i}", "gridcolor": "#eee"}
        layout[f"xaxis{i}"] = {
            "anchor": f"y{i}",
            "showticklabels": i == 4,
            "dtick": 1,
            "gridcolor": "#eee",
            **({"matches": "x4"} if i < 4 else {"title": {"text": "epoch"}}),
        }
        layout["annotations"].append(
            {
                "text": title,
                "xref": "paper",
                "yref": "paper",
                "x": 0.5,
                "y": top,
                "xanchor": "center",
                "yanchor": "bottom",
                "showarrow": False,
            }
        )
    return {"data": data, "layout": layout}


def heatmap_spec(timeline: Any) -> Spec:
    """`heatmap_figure` as plain data."""
    le = timeline.layer_epoch
    data = [
        {
            "type": "heatmap",
            "z": le.to_numpy().tolist(),
            "x": [str(c) for c in le.columns],
            "y": [f"L{i}" for i in le.index],
            "colorscale": "Viridis",
            "colorbar": {"title": {"text": "share"}},
            "hovertemplate": "epoch %{x}, %{y}: %{z:.3f}<extra></extra>",
        }
    ]
    layout = {
        **_titled("importance share per layer and epoch", {"l": 50, "r": 20, "b": 40}),
        "height": 380,
        "xaxis": {"title": {"text": "epoch"}, "type": "category"},
        "yaxis": {"title": {"text": "layer"}},
    }
    return {"data": data, "layout": layout}


def transfer_spec(table: pd.DataFrame, fact_id: str | None = None) -> Spec:
    """`transfer_figure` as plain data: circuit epoch x model epoch faithfulness (median over facts, or one fact)."""
    from circuitdyn.analysis.transfer import transfer_pivot

    pivot = transfer_pivot(table, fact_id)
    z = [[None if pd.isna(v) else float(v) for v in row] for row in pivot.to_numpy()]
    data = [
        {
            "type": "heatmap",
            "z": z,
            "x": [str(c) for c in pivot.columns],
            "y": [str(i) for i in pivot.index],
            "colorscale": "Viridis",
            "zmin": 0,
            "zmax": 1,
            "colorbar": {"title": {"text": "gap recovered"}},
            "text": [["" if v is None else f"{v:.2f}" for v in row] for row in z],
            "texttemplate": "%{text}",
            "hovertemplate": "circuit of epoch %{y} on the model of epoch %{x}: %{z:.3f}<extra></extra>",
        }
    ]
    who = "median over facts" if fact_id is None else _esc(fact_id)
    layout = {
        **_titled(
            f"circuit transfer, {who}: share of the fact's gap epoch i's circuit recovers on epoch j's model"
            + _small("faithfulness clipped to [0, 1]"),
            {"l": 60, "r": 20, "b": 40},
        ),
        "height": 400,
        "xaxis": {"title": {"text": "model epoch j"}, "type": "category"},
        "yaxis": {"title": {"text": "circuit epoch i"}, "type": "category", "autorange": "reversed"},
    }
    return {"data": data, "layout": layout}


def timeline_circuit_spec(timeline: Any, fact_id: str, epoch: int, label: str | None = None) -> Spec:
    """One fact's circuit at one epoch of a timeline (the timeline's selection), with its recall state."""
    if fact_id not in timeline.rows:
        raise CircuitdynError(f"unknown fact id {fact_id!r}; the timeline has e.g. {timeline.fact_ids[:3]}")
    r = timeline.rows.index(fact_id)
    scores = timeline.scores(epoch)[r]
    idx = timeline.masks[epoch][r].nonzero().flatten().tolist()
    n_edges = len(idx)
    idx = _strongest(idx, scores)
    state = ""
    if timeline.outcomes is not None and fact_id != MEAN:
        row = timeline.fact(fact_id).set_index("epoch")
        correct = row.loc[epoch, "correct"] if epoch in row.index else None
        if correct is not None and not pd.isna(correct):
            state = " — recalled" if bool(correct) else " — not recalled"
    circuit = f"its {_esc(timeline.selection)} circuit"
    if len(idx) < n_edges:
        caption = f"drawn: the {len(idx):,} edges of {circuit} with the largest |score|, of {n_edges:,}"
    else:
        caption = f"drawn: all {n_edges:,} edges of {circuit}"
    title = f"{_esc(label or fact_id)} at epoch {epoch}: {n_edges:,} edges{state}" + _small(caption)
    return _signed_circuit(timeline.graph, scores, idx, title)


# --------------------------------------------------------------------------- figures (notebooks)


def circuit_figure(
    circuits: CircuitSet,
    fact_id: str = MEAN,
    n: int = 100,
    label: str | None = None,
    *,
    mask: torch.Tensor | None = None,
    selection: str | None = None,
) -> go.Figure:
    """One fact's circuit (or the mean circuit, `MEAN`): the n edges with the largest |score|, among the edges of
    `mask` (the fact's selected circuit, chosen by the rule `selection`) when given, else among all edges."""
    return go.Figure(circuit_spec(circuits, fact_id, n, label, mask=mask, selection=selection))


def diff_figure(diff: CircuitDiff, fact_id: str = MEAN) -> go.Figure:
    """Both circuits of one fact on one canvas: edges coloured by status (added, removed, changed, kept, noise)."""
    return go.Figure(diff_spec(diff, fact_id))


def sankey_figure(diff: CircuitDiff, fact_id: str = MEAN) -> go.Figure:
    """Layer-to-layer flow of |score| in the union of both circuits, links coloured by status."""
    return go.Figure(sankey_spec(diff, fact_id))


def layer_shift_figure(diff: CircuitDiff, fact_id: str = MEAN) -> go.Figure:
    """Share of importance per layer in A and in B for one fact."""
    return go.Figure(layer_shift_spec(diff, fact_id))


def timeline_figure(timeline: Any, fact_id: str | None = None) -> go.Figure:
    """Line charts over epochs: training loss, knowledge accuracy, OOD accuracy, circuit similarity."""
    return go.Figure(timeline_spec(timeline, fact_id))


def heatmap_figure(timeline: Any) -> go.Figure:
    """layer x epoch heatmap of the share of importance (mean over facts)."""
    return go.Figure(heatmap_spec(timeline))


def transfer_figure(table: pd.DataFrame, fact_id: str | None = None) -> go.Figure:
    """Heatmap of a `diff.transfer_matrix` table: rows = circuit epoch, columns = model epoch."""
    return go.Figure(transfer_spec(table, fact_id))


def timeline_circuit_figure(timeline: Any, fact_id: str = MEAN, epoch: int | None = None) -> go.Figure:
    """One fact's circuit at one epoch of a timeline (default: the last epoch)."""
    return go.Figure(timeline_circuit_spec(timeline, fact_id, timeline.epochs[-1] if epoch is None else epoch))


# --------------------------------------------------------------------------- pages


def _safe_json(obj: Any) -> str:
    """JSON safe to embed in a <script> element."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script>
document.documentElement.setAttribute("data-js-errors", "0");
window.__cdErrors = [];
function __cdError(msg) {{
  window.__cdErrors.push(String(msg));
  document.documentElement.setAttribute("data-js-errors", String(window.__cdErrors.length));
  var el = document.getElementById("js-errors"); if (el) {{ el.textContent = window.__cdErrors.join("\\n"); }}
}}
window.addEventListener("error", function (e) {{ __cdError(e.message); }});
window.addEventListener("unhandledrejection", function (e) {{ __cdError(e.reason); }});
</script>
<script>{plotly}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px 24px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 6px; }} .sub {{ color: #666; margin-bottom: 12px; }}
.controls {{ margin: 8px 0; display: flex; gap: 18px; align-items: center; flex-wrap: wrap; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 8px 0; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; }} th {{ background: #f4f4f4; }}
td:first-child, th:first-child {{ text-align: left; }}
.row {{ display: flex; gap: 12px; flex-wrap: wrap; }} .row > div {{ flex: 1 1 480px; min-width: 420px; }}
.table-scroll {{ overflow-x: auto; max-width: 100%; margin: 8px 0; }} .table-scroll table {{ margin: 0; }}
.note {{ color: #555; font-size: 13px; max-width: 1100px; }}
#js-errors {{ color: #b00; }}
</style></head><body>
"""

_COMMON_JS = """
var DATA = JSON.parse(document.getElementById("circuitdyn-data").textContent);
var CONFIG = {responsive: true, displaylogo: false};
function draw(id, fig) {
  return Plotly.react(id, fig.data, fig.layout, CONFIG);
}
function markRendered() {
  var n = 0, traces = 0;
  document.querySelectorAll(".js-plotly-plot").forEach(function (gd) { n += 1; traces += (gd.data || []).length; });
  document.documentElement.setAttribute("data-rendered", String(n));
  document.documentElement.setAttribute("data-traces", String(traces));
}
function fillSelect(id, options) {
  var sel = document.getElementById(id);
  options.forEach(function (o) {
    var opt = document.createElement("option"); opt.value = o.value; opt.textContent = o.label; sel.appendChild(opt);
  });
  return sel;
}
"""


_VIEWER_MARK = b"window.__cdErrors = [];"
"""Found near the top of every viewer page circuitdyn writes: what tells a viewer from any other file."""


def check_viewer_target(path: str | Path, *, flag: str = "") -> None:
    """A viewer may replace only an earlier circuitdyn viewer (it is regenerated from cached results); any other
    existing file at `path` is refused unless overwriting was asked for (`overwrite=True`, `--overwrite`)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as err:
        raise CircuitdynError(f"{flag + ' ' if flag else ''}{path}: cannot read ({err.strerror or err})") from None
    if _VIEWER_MARK not in head:
        raise CircuitdynError(
            f"{flag + ' ' if flag else ''}{path}: exists and is not a circuitdyn viewer; choose "
            "another output file, or pass --overwrite (overwrite=True) to replace it"
        )


def _write_page(
    path: str | Path, title: str, subtitle: str, body: str, data: Any, script: str, overwrite: bool = False
) -> Path:
    from plotly.offline import get_plotlyjs

    path = Path(path)
    if not overwrite:
        check_viewer_target(path)
    page = (
        _HEAD.format(title=_esc(title), plotly=get_plotlyjs())
        + f'<h1>{_esc(title)}</h1><div class="sub">{_esc(subtitle)}</div>\n'
        + body
        + '\n<pre id="js-errors"></pre>\n'
        + f'<script id="circuitdyn-data" type="application/json">{_safe_json(_nan_to_none(data))}</script>\n'
        + f"<script>{_COMMON_JS}\n{script}</script>\n</body></html>\n"
    )
    return write_text_atomic(path, page)


def _table_html(df: Any, float_fmt: str = "{:.3f}") -> str:
    """An escaped HTML table of a DataFrame (index included), in a box that scrolls sideways when the table is
    wider than the page (instead of being cut off)."""

    def cell(v: Any) -> str:
        if v is None or v is pd.NA:
            return "–"
        if isinstance(v, float):
            return "" if math.isnan(v) else float_fmt.format(v)
        return _esc(v)

    head = "".join(f"<th>{_esc(c)}</th>" for c in [df.index.name or "", *df.columns])
    rows = "".join(
        "<tr>" + f"<td>{_esc(i)}</td>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>"
        for i, r in zip(df.index, df.itertuples(index=False))
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    return f'<div class="table-scroll" style="overflow-x:auto">{table}</div>'


def _mentions_faith(lines: Sequence[str]) -> bool:
    """Whether findings lines quote faithfulness values (they then need `FAITH_NOTE`)."""
    return any("faithfulness" in line for line in lines)


def _faith_note(shown: bool) -> str:
    """`FAITH_NOTE` as a page paragraph where faithfulness values are `shown`, else nothing."""
    return f'<p class="note faith-note">{_esc(FAITH_NOTE)}</p>' if shown else ""


def _pick_facts(all_facts: Sequence[str], facts: Sequence[str] | None, max_facts: int) -> list[str]:
    if facts is None:
        return [MEAN, *list(all_facts)[:max_facts]]
    unknown = [f for f in facts if f != MEAN and f not in all_facts]
    if unknown:
        raise CircuitdynError(f"unknown fact id {unknown[0]!r}; known e.g. {list(all_facts)[:3]}")
    return list(facts)


def _options(facts: Sequence[str], labels: dict[str, str] | None) -> list[dict[str, str]]:
    labels = labels or {}
    return [{"value": f, "label": f if f not in labels else f"{f} — {labels[f]}"} for f in facts]


_CIRCUIT_NOTE = (
    "Each line joins two components (attention heads as circles, MLPs as squares); it stands for one or more "
    "port-level edges (e.g. into a head's q, k and v), listed with their scores on hover. Line width = |sum of "
    "their scores|, binned as the legend's width entries show; blue = negative score (patching the edge lowers "
    "the metric: it supports recall), red = positive. Node size = the |score| of the drawn edges at that component."
)
"""The circuit viewer's key, under the plot: what a line, its width and colour, and a node's size stand for."""


def write_circuit_html(
    circuits: CircuitSet,
    path: str | Path,
    *,
    facts: Sequence[str] | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    labels: dict[str, str] | None = None,
    max_facts: int = MAX_FACTS,
    title: str | None = None,
    overwrite: bool = False,
    masks: torch.Tensor | None = None,
    selection: str | None = None,
) -> Path:
    """Circuit viewer page: choose the fact (or mean circuit) and the number of edges.

    `labels`: optional fact id -> text (e.g. the probe question), shown escaped in the selector. `masks`: the
    selected circuits ([fact, edge] bool, in `circuits.fact_ids` order, e.g. a timeline's `fact_masks[epoch]`)
    and `selection` the rule that chose them (e.g. "faith:0.8"): each fact then shows the strongest edges of
    its circuit; without them (and always for the mean circuit) the strongest edges of all scores. Each plot's
    caption says which.
    """
    chosen = _pick_facts(circuits.fact_ids, facts, max_facts)
    sizes = sorted({min(int(n), len(circuits.edges)) for n in sizes if int(n) >= 1})
    if not sizes:
        raise CircuitdynError("the circuit viewer needs at least one edge count >= 1")
    if masks is not None and tuple(masks.shape) != tuple(circuits.scores.shape):
        raise CircuitdynError(
            f"masks have shape {tuple(masks.shape)}; expected {tuple(circuits.scores.shape)} (fact, edge)"
        )

    def spec(f: str, n: int) -> Spec:
        mask = None if masks is None or f == MEAN else masks[circuits.index(f)]
        return circuit_spec(circuits, f, n, (labels or {}).get(f), mask=mask, selection=selection)

    variants = {f"{f}|{n}": spec(f, n) for f in chosen for n in sizes}
    meta = circuits.meta
    subtitle = " · ".join(f"{k} {meta[k]}" for k in ("model", "epoch", "method", "metric") if k in meta)
    body = (
        '<div class="controls"><label>fact <select id="fact"></select></label>'
        '<label>edges <select id="size"></select></label></div><div id="circuit"></div>'
        f'<p class="note">{_CIRCUIT_NOTE}</p>'
    )
    data = {
        "variants": variants,
        "facts": _options(chosen, labels),
        "sizes": [{"value": str(n), "label": str(n)} for n in sizes],
        "default_size": str(sizes[min(2, len(sizes) - 1)]),
    }
    script = """
var fact = fillSelect("fact", DATA.facts), size = fillSelect("size", DATA.sizes);
size.value = DATA.default_size;
function update() { return draw("circuit", DATA.variants[fact.value + "|" + size.value]).then(markRendered); }
fact.addEventListener("change", update); size.addEventListener("change", update);
update();
"""
    return _write_page(
        path, title or f"circuit viewer ({len(circuits.fact_ids)} facts)", subtitle, body, data, script, overwrite
    )


def write_diff_html(
    diff: CircuitDiff,
    path: str | Path,
    *,
    facts: Sequence[str] | None = None,
    labels: dict[str, str] | None = None,
    max_facts: int = MAX_FACTS,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Diff viewer page: summary numbers, per-fact table, and for the chosen fact the two circuits
    coloured by status, the layer Sankey, the layer shift and the strongest paths."""
    chosen = _pick_facts(diff.a.fact_ids, facts, max_facts)
    variants = {}
    for f in chosen:
        paths = diff.paths(f).set_index("path")
        variants[f] = {
            "circuit": diff_spec(diff, f),
            "sankey": sankey_spec(diff, f),
            "layers": layer_shift_spec(diff, f),
            "paths": _table_html(paths),
        }
    from circuitdyn.analysis.report import describe_diff

    cols = [
        "n_a",
        "n_b",
        "faith_a",
        "faith_b",
        "gap_a",
        "gap_b",
        "included",
        "added",
        "removed",
        "changed",
        "kept",
        "sign_flips",
        "edge_jaccard",
        "noise_distance",
        "p_value",
        "q_value",
        "changed_beyond_noise",
        "effect",
        "weighted_jaccard",
        "spearman",
        "rbo",
        "attn_shift",
        "deep_shift",
        "paths_lost",
    ]
    facts_df = diff.facts[[c for c in cols if c in diff.facts]]
    found = describe_diff(diff)
    findings = "".join(f"<li>{_esc(line)}</li>" for line in found)
    faith_cols = [c for c in ("faith_a", "faith_b") if c in facts_df]
    shows_faith = bool(faith_cols and facts_df[faith_cols].notna().any().any()) or _mentions_faith(found)
    body = (
        '<div class="row"><div><h3>findings</h3><ul>' + findings + "</ul></div>"
        "<div><h3>legend</h3><p>"
        + " ".join(f'<span style="color:{c}">■ {s}</span>' for s, c in STATUS_COLOURS.items())
        + f"</p><p>selection {_esc(diff.selection)}; an edge counts as added/removed/changed only when its score moved "
        "by more than its method-noise band (the largest difference between re-attributions of one checkpoint; "
        "else: noise).</p></div></div>"
        '<div class="controls"><label>fact <select id="fact"></select></label></div>'
        '<div id="circuit"></div><div class="row"><div id="sankey"></div><div id="layers"></div></div>'
        '<h3>strongest input→logits paths</h3><div id="paths"></div>'
        "<h3>per fact</h3>" + _faith_note(shows_faith) + _table_html(facts_df)
    )
    data = {"variants": variants, "facts": _options(chosen, labels)}
    script = """
var fact = fillSelect("fact", DATA.facts);
function update() {
  var v = DATA.variants[fact.value];
  document.getElementById("paths").innerHTML = v.paths;  // built server-side from escaped text
  return Promise.all([draw("circuit", v.circuit), draw("sankey", v.sankey), draw("layers", v.layers)])
    .then(markRendered);
}
fact.addEventListener("change", update);
update();
"""
    sub = f"{diff.label_a} → {diff.label_b} · {len(diff.a.fact_ids)} facts · selection {diff.selection}"
    return _write_page(
        path, title or f"circuit diff: {diff.label_a} → {diff.label_b}", sub, body, data, script, overwrite
    )


def write_timeline_html(
    timeline: Any,
    path: str | Path,
    *,
    facts: Sequence[str] | None = None,
    labels: dict[str, str] | None = None,
    max_facts: int = 20,
    title: str | None = None,
    transfer: pd.DataFrame | None = None,
    overwrite: bool = False,
) -> Path:
    """Timeline viewer page: epoch slider over the chosen fact's circuit, linked with the line charts
    (a marker follows the slider; clicking a chart point moves it) and the layer x epoch heatmap;
    with `transfer` (a `diff.transfer_matrix` table) also the cross-epoch faithfulness heatmap."""
    chosen = _pick_facts(timeline.fact_ids, facts, max_facts)
    epochs = timeline.epochs
    circuits = {
        f"{f}|{e}": timeline_circuit_spec(timeline, f, e, (labels or {}).get(f)) for f in chosen for e in epochs
    }
    lines = timeline_spec(timeline)
    fact_lines = {f: _fact_similarity_trace(timeline, f) for f in chosen if f != MEAN}
    life = timeline.lifetimes
    lifetimes = {}
    for f in chosen:
        rows = life[life["fact_id"] == f].drop(columns="fact_id")
        rows = rows.sort_values(["persistence", "epochs_present"], ascending=False, kind="stable")
        head = pd.concat([rows.head(8), rows.tail(8)]).drop_duplicates("edge").set_index("edge")
        lifetimes[f] = (
            f"<p>{len(rows)} edges were ever in this circuit; {int((rows['segments'] > 1).sum())} "
            f"left and came back. Most and least persistent:</p>" + _table_html(head)
        )
    from circuitdyn.analysis.report import describe_timeline

    found = describe_timeline(timeline)
    findings = "".join(f"<li>{_esc(line)}</li>" for line in found)
    rec = timeline.reconfiguration.set_index("epoch") if len(timeline.reconfiguration) else pd.DataFrame()
    body = (
        '<div class="row"><div><h3>findings</h3><ul>'
        + findings
        + "</ul>"
        + _faith_note(_mentions_faith(found) or transfer is not None)
        + "</div><div><h3>per transition</h3>"
        + _table_html(rec, "{:.4g}")
        + "<p>replaced = share of a fact's circuit "
        "not in the previous epoch's (1 - edge Jaccard), mean over included facts with its 95 % interval "
        "(entities resampled); noise = the same statistic between re-attributions of one checkpoint.</p></div></div>"
        '<div class="controls"><label>fact <select id="fact"></select></label>'
        f'<label>epoch <input type="range" id="epoch" min="0" max="{len(epochs) - 1}" step="1" value="0">'
        '</label><span id="epoch-label"></span></div>'
        '<div class="row"><div id="circuit"></div><div id="lines"></div></div>'
        '<div class="row"><div id="heatmap"></div>'
        + ('<div id="transfer"></div>' if transfer is not None else "")
        + '</div><h3>edge lifetimes</h3><div id="lifetimes"></div>'
    )
    data = {
        "circuits": circuits,
        "lines": lines,
        "fact_lines": fact_lines,
        "heatmap": heatmap_spec(timeline),
        "epochs": epochs,
        "facts": _options(chosen, labels),
        "lifetimes": lifetimes,
        "transfer": None if transfer is None else transfer_spec(transfer),
    }
    script = """
var fact = fillSelect("fact", DATA.facts), slider = document.getElementById("epoch");
function epoch() { return DATA.epochs[Number(slider.value)]; }
function lines() {
  var layout = Object.assign({}, DATA.lines.layout);
  layout.shapes = [{type: "line", xref: "x4", yref: "paper", x0: epoch(), x1: epoch(), y0: 0, y1: 1,
                    line: {color: "#d62728", width: 2, dash: "dot"}}];
  var extra = DATA.fact_lines[fact.value];
  return {data: extra ? DATA.lines.data.concat([extra]) : DATA.lines.data, layout: layout};
}
function update() {
  document.getElementById("epoch-label").textContent = "epoch " + epoch();
  document.getElementById("lifetimes").innerHTML = DATA.lifetimes[fact.value];  // escaped server-side
  return Promise.all([draw("circuit", DATA.circuits[fact.value + "|" + epoch()]),
                      draw("lines", lines())]).then(markRendered);
}
fact.addEventListener("change", update); slider.addEventListener("input", update);
var first = DATA.transfer ? draw("transfer", DATA.transfer) : Promise.resolve();
first.then(function () { return draw("heatmap", DATA.heatmap); }).then(update).then(function () {
  document.getElementById("lines").on("plotly_click", function (ev) {
    var i = DATA.epochs.indexOf(ev.points[0].x);
    if (i >= 0) { slider.value = String(i); update(); }
  });
});
"""
    sub = f"{len(timeline.fact_ids)} facts · epochs {epochs[0]}–{epochs[-1]} · selection {timeline.selection}"
    return _write_page(path, title or "circuit timeline", sub, body, data, script, overwrite)

"""Interactive plotly viewers: figures for notebooks (`fig.show()`) and standalone offline HTML pages.

Figures (each returns a `plotly.graph_objects.Figure`):
- `circuit_figure(circuits, fact_id, n)`: a circuit in a layered layout (layer on x, component on y;
  `input` left, `logits` right), edge width by |score|, colour by sign, hover with names and scores.
- `diff_figure(diff, fact_id)`: both circuits of a `CircuitDiff` on one canvas, edges coloured
  added / removed / changed / kept / noise; `sankey_figure(diff, fact_id)`: layer-to-layer flow of
  |score| by status; `layer_shift_figure(diff, fact_id)`: importance share per layer, A vs B.
- `timeline_figure(timeline, fact_id)`: training loss, knowledge accuracy, OOD accuracy and circuit
  similarity over epochs; `heatmap_figure(timeline)`: layer x epoch importance.

Pages (`write_circuit_html`, `write_diff_html`, `write_timeline_html`) embed plotly.js (no network
needed), carry the precomputed figure variants as JSON, and switch between them with plain controls:
fact and edge count for circuits, fact for diffs, fact and an epoch slider for timelines (the slider
also moves a marker across the line charts; clicking a chart point moves the slider). All probe text
(fact ids, labels) is HTML-escaped, and the JSON is embedded with `<`, `>`, `&` escaped. Each page
records JavaScript errors in `data-js-errors` and the number of drawn plots in `data-rendered` on
`<html>`, which the headless-browser test reads.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.subplots import make_subplots

from circuitdyn.circuits import CircuitSet, select_top_n
from circuitdyn.diff import MEAN, STATUSES, CircuitDiff, node_importance
from circuitdyn.errors import CircuitdynError
from circuitdyn.graph import Graph

STATUS_COLOURS = {"added": "#2ca02c", "removed": "#d62728", "changed": "#ff7f0e", "kept": "#7f7f7f",
                  "noise": "#d9d9d9"}
SIGN_COLOURS = {"negative": "#1f77b4", "positive": "#d62728"}
"""Negative score = patching the edge lowers the metric, i.e. the edge supports recall (see attribution)."""
KIND_COLOURS = {"input": "#444444", "attn": "#9467bd", "mlp": "#17becf", "logits": "#444444"}
WIDTHS = (1.0, 2.0, 3.5, 6.0)
DEFAULT_SIZES = (25, 50, 100, 200, 500)
MAX_FACTS = 40
"""Pages carry at most this many facts (plus the mean circuit) to stay small; pass `facts=` to choose."""


# --------------------------------------------------------------------------- layout and traces


def node_positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """Layered layout: x = 0 for input, 2L+1 for block L's heads, 2L+2 for its MLP, 2n+1 for logits;
    y = head index (MLP, input and logits centred)."""
    mid = (graph.n_heads - 1) / 2
    pos = {"input": (0.0, mid), "logits": (2.0 * graph.n_layers + 1, mid)}
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            pos[f"a{layer}.h{h}"] = (2.0 * layer + 1, float(h))
        if graph.has_mlp:
            pos[f"m{layer}"] = (2.0 * layer + 2, mid)
    return pos


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fold(graph: Graph, scores: torch.Tensor, mask: torch.Tensor) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """Selected port-level edges grouped into component-level edges: (src, dst) -> [(name, score)]."""
    out: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for i in mask.nonzero().flatten().tolist():
        name = graph.edges[i]
        src, dst = name.split("->")
        out.setdefault((src, graph.component(dst)), []).append((name, float(scores[i])))
    return out


def _width(w: float, wmax: float) -> float:
    frac = w / wmax if wmax > 0 else 0.0
    return WIDTHS[min(len(WIDTHS) - 1, int(frac * len(WIDTHS)))]


def _edge_traces(
    pos: dict[str, tuple[float, float]], items: list[tuple[str, str, float, str, str]], colours: dict[str, str],
) -> list[go.Scatter]:
    """Line traces for edges (src, dst, magnitude, colour key, hover text), one per colour x width bin,
    plus one invisible-marker trace at the midpoints carrying the hover text."""
    wmax = max((abs(w) for _, _, w, _, _ in items), default=0.0)
    groups: dict[tuple[str, float], tuple[list, list]] = {}
    for src, dst, w, key, _ in items:
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        xs, ys = groups.setdefault((key, _width(abs(w), wmax)), ([], []))
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    traces: list[go.Scatter] = []
    shown: set[str] = set()
    for key in colours:
        for (k, width), (xs, ys) in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if k != key:
                continue
            traces.append(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colours[key], "width": width},
                                     opacity=0.75, hoverinfo="skip", name=key, legendgroup=key,
                                     showlegend=key not in shown))
            shown.add(key)
    if items:
        traces.append(go.Scatter(
            x=[(pos[s][0] + pos[d][0]) / 2 for s, d, *_ in items], y=[(pos[s][1] + pos[d][1]) / 2 for s, d, *_ in items],
            mode="markers", marker={"size": 7, "color": "rgba(0,0,0,0)"}, hovertext=[t for *_, t in items],
            hoverinfo="text", showlegend=False, name="edges"))
    return traces


def _node_trace(graph: Graph, pos: dict[str, tuple[float, float]], importance: torch.Tensor,
                active: set[str]) -> go.Scatter:
    imax = float(importance.max()) or 1.0
    names = graph.nodes
    kinds = ["input" if n == "input" else "logits" if n == "logits" else "attn" if n[0] == "a" else "mlp" for n in names]
    return go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers", name="components",
        marker={"size": [6 + 14 * float(importance[i]) / imax if n in active else 5 for i, n in enumerate(names)],
                "color": [KIND_COLOURS[k] if n in active else "#e5e5e5" for n, k in zip(names, kinds)],
                "line": {"width": 0.5, "color": "#333"}, "symbol": ["square" if k == "mlp" else "circle" for k in kinds]},
        hovertext=[f"{_esc(n)}<br>importance {float(importance[i]):.4g}" for i, n in enumerate(names)],
        hoverinfo="text", showlegend=False)


def _circuit_layout(graph: Graph, title: str) -> dict[str, Any]:
    ticks = [0.0] + [2.0 * L + 1.5 for L in range(graph.n_layers)] + [2.0 * graph.n_layers + 1]
    labels = ["input"] + [f"L{L}" for L in range(graph.n_layers)] + ["logits"]
    return {
        "title": {"text": title}, "template": "plotly_white", "hovermode": "closest", "height": 560,
        "xaxis": {"tickvals": ticks, "ticktext": labels, "title": {"text": "layer"}, "zeroline": False},
        "yaxis": {"title": {"text": "head (MLP centred)"}, "zeroline": False, "showgrid": False},
        "legend": {"orientation": "h", "y": -0.15}, "margin": {"l": 50, "r": 20, "t": 60, "b": 60},
    }


def _hover(names_scores: list[tuple[str, float]], fmt: str = "{:.4g}") -> str:
    return "<br>".join(f"{_esc(n)}: {fmt.format(s)}" for n, s in names_scores)


# --------------------------------------------------------------------------- figures


def circuit_figure(circuits: CircuitSet, fact_id: str = MEAN, n: int = 100, label: str | None = None) -> go.Figure:
    """One fact's circuit (or the mean circuit, `MEAN`): the n edges with the largest |score|."""
    graph = circuits.graph
    scores = circuits.mean() if fact_id == MEAN else circuits.fact(fact_id).float()
    mask = select_top_n(scores, n)
    pos = node_positions(graph)
    folded = _fold(graph, scores, mask)
    items = []
    for (src, dst), ports in folded.items():
        total = sum(s for _, s in ports)
        items.append((src, dst, total, "negative" if total < 0 else "positive",
                      f"{_esc(src)} → {_esc(dst)}: {total:.4g}<br>{_hover(ports)}"))
    active = {s for s, _ in folded} | {d for _, d in folded}
    fig = go.Figure(_edge_traces(pos, items, SIGN_COLOURS) + [_node_trace(graph, pos, node_importance(graph, scores * mask), active)])
    title = f"{_esc(label or fact_id)}: top {int(mask.sum())} edges"
    fig.update_layout(_circuit_layout(graph, title))
    return fig


def diff_figure(diff: CircuitDiff, fact_id: str = MEAN) -> go.Figure:
    """Both circuits of one fact on one canvas: edges coloured by status (added, removed, changed, kept, noise)."""
    r = diff.row(fact_id)
    graph = diff.graph
    code = diff.status_codes[r]
    sa, sb = diff.scores_a[r], diff.scores_b[r]
    groups: dict[tuple[str, str, str], list[tuple[str, float, float]]] = {}
    for i in (code >= 0).nonzero().flatten().tolist():
        name = graph.edges[i]
        src, dst = name.split("->")
        groups.setdefault((src, graph.component(dst), STATUSES[int(code[i])]), []).append((name, float(sa[i]), float(sb[i])))
    items = []
    for (src, dst, status), ports in groups.items():
        mag = max(max(abs(a), abs(b)) for _, a, b in ports)
        text = "<br>".join(f"{_esc(n)}: {a:.4g} → {b:.4g}" for n, a, b in ports)
        items.append((src, dst, mag, status, f"<b>{status}</b> {_esc(src)} → {_esc(dst)}<br>{text}"))
    pos = node_positions(graph)
    active = {s for s, _, _ in groups} | {d for _, d, _ in groups}
    union = (code >= 0).float()
    imp = node_importance(graph, torch.maximum(sa.abs(), sb.abs()) * union)
    fig = go.Figure(_edge_traces(pos, items, STATUS_COLOURS) + [_node_trace(graph, pos, imp, active)])
    row = diff.facts.loc[fact_id]
    title = (f"{_esc(fact_id)}: {_esc(diff.label_a)} → {_esc(diff.label_b)} — +{int(row['added'])} / "
             f"−{int(row['removed'])} / kept {int(row['kept'])} (changed {int(row['changed'])}), "
             f"Jaccard {row['edge_jaccard']:.2f}")
    fig.update_layout(_circuit_layout(graph, title))
    return fig


def sankey_figure(diff: CircuitDiff, fact_id: str = MEAN) -> go.Figure:
    """Layer-to-layer flow of |score| in the union of both circuits, links coloured by status."""
    r = diff.row(fact_id)
    graph = diff.graph
    code = diff.status_codes[r]
    mag = torch.maximum(diff.scores_a[r].abs(), diff.scores_b[r].abs())
    labels = ["input"] + [f"L{L}" for L in range(graph.n_layers)] + ["logits"]
    flows: dict[tuple[int, int, str], float] = {}
    for i in (code >= 0).nonzero().flatten().tolist():
        src, dst = graph.edges[i].split("->")
        key = (graph.layer_of(src) + 1, graph.layer_of(dst) + 1, STATUSES[int(code[i])])
        flows[key] = flows.get(key, 0.0) + float(mag[i])
    keys = sorted(flows)
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node={"label": labels, "pad": 12, "thickness": 14, "color": "#888"},
        link={"source": [k[0] for k in keys], "target": [k[1] for k in keys], "value": [flows[k] for k in keys],
              "color": [STATUS_COLOURS[k[2]] for k in keys], "label": [k[2] for k in keys]},
    ))
    fig.update_layout(title={"text": f"{_esc(fact_id)}: layer-to-layer flow of |score| by status"},
                      template="plotly_white", height=380, margin={"l": 20, "r": 20, "t": 50, "b": 20})
    return fig


def layer_shift_figure(diff: CircuitDiff, fact_id: str = MEAN) -> go.Figure:
    """Share of importance per layer in A and in B for one fact."""
    diff.row(fact_id)
    df = diff.layers[diff.layers["fact_id"] == fact_id]
    fig = go.Figure([go.Bar(x=df["layer"], y=df["share_a"], name=_esc(diff.label_a), marker_color="#9ecae1"),
                     go.Bar(x=df["layer"], y=df["share_b"], name=_esc(diff.label_b), marker_color="#3182bd")])
    fig.update_layout(title={"text": f"{_esc(fact_id)}: importance share per layer"}, barmode="group",
                      template="plotly_white", height=320, xaxis={"title": {"text": "layer"}, "dtick": 1},
                      yaxis={"title": {"text": "share of |score|"}}, margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


def _ood_columns(per_epoch: Any) -> list[str]:
    known = {"epoch", "step", "train_loss", "learned", "acquired", "retained", "forgotten", "mean_recall", "mean_f1",
             "knowledge_accuracy", "fact_accuracy", "n_edges", "jaccard_first", "jaccard_prev",
             "weighted_jaccard_prev", "changed_frac_prev"}
    return [c for c in per_epoch.columns if c not in known and per_epoch[c].dtype.kind in "fi"]


def timeline_figure(timeline: Any, fact_id: str | None = None) -> go.Figure:
    """Line charts over epochs: training loss, knowledge accuracy, OOD accuracy, circuit similarity."""
    pe = timeline.per_epoch
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        subplot_titles=("training loss", "knowledge accuracy", "OOD accuracy", "circuit similarity"))
    x = pe["epoch"].tolist()

    def line(col: str, row: int, name: str, **kw: Any) -> None:
        if col in pe and pe[col].notna().any():
            fig.add_trace(go.Scatter(x=x, y=pe[col].tolist(), mode="lines+markers", name=name, **kw), row=row, col=1)

    line("train_loss", 1, "train loss")
    line("knowledge_accuracy", 2, "entities learned")
    line("fact_accuracy", 2, "facts recalled")
    for col in _ood_columns(pe):
        line(col, 3, _esc(col))
    line("jaccard_prev", 4, "Jaccard to previous")
    line("jaccard_first", 4, "Jaccard to first")
    line("weighted_jaccard_prev", 4, "weighted Jaccard to previous")
    if fact_id is not None and fact_id != MEAN:
        f = timeline.fact(fact_id)
        fig.add_trace(go.Scatter(x=f["epoch"].tolist(), y=f["jaccard_prev"].tolist(), mode="lines+markers",
                                 name=f"{_esc(fact_id)}: Jaccard to previous", line={"dash": "dot"}), row=4, col=1)
    fig.update_layout(template="plotly_white", height=760, hovermode="x unified",
                      margin={"l": 50, "r": 20, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.06})
    fig.update_xaxes(title_text="epoch", dtick=1, row=4, col=1)
    return fig


def heatmap_figure(timeline: Any) -> go.Figure:
    """layer x epoch heatmap of the share of importance (mean over facts)."""
    le = timeline.layer_epoch
    fig = go.Figure(go.Heatmap(z=le.to_numpy().tolist(), x=[str(c) for c in le.columns], y=[f"L{i}" for i in le.index],
                               colorscale="Viridis", colorbar={"title": {"text": "share"}},
                               hovertemplate="epoch %{x}, %{y}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title={"text": "importance share per layer and epoch"}, template="plotly_white", height=360,
                      xaxis={"title": {"text": "epoch"}}, yaxis={"title": {"text": "layer"}},
                      margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


# --------------------------------------------------------------------------- pages


def _fig_json(fig: go.Figure) -> dict[str, Any]:
    return json.loads(pio.to_json(fig, validate=False))


def _safe_json(obj: Any) -> str:
    """JSON safe to embed in a <script> element."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


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


def _write_page(path: str | Path, title: str, subtitle: str, body: str, data: Any, script: str) -> Path:
    from plotly.offline import get_plotlyjs

    path = Path(path)
    page = (
        _HEAD.format(title=_esc(title), plotly=get_plotlyjs())
        + f"<h1>{_esc(title)}</h1><div class=\"sub\">{_esc(subtitle)}</div>\n"
        + body
        + "\n<pre id=\"js-errors\"></pre>\n"
        + f"<script id=\"circuitdyn-data\" type=\"application/json\">{_safe_json(_nan_to_none(data))}</script>\n"
        + f"<script>{_COMMON_JS}\n{script}</script>\n</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _table_html(df: Any, float_fmt: str = "{:.3f}") -> str:
    """An escaped HTML table of a DataFrame (index included)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else float_fmt.format(v)
        return _esc(v)
    head = "".join(f"<th>{_esc(c)}</th>" for c in [df.index.name or "", *df.columns])
    rows = "".join("<tr>" + f"<td>{_esc(i)}</td>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>"
                   for i, r in zip(df.index, df.itertuples(index=False)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


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


def write_circuit_html(
    circuits: CircuitSet, path: str | Path, *, facts: Sequence[str] | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES, labels: dict[str, str] | None = None, max_facts: int = MAX_FACTS,
    title: str | None = None,
) -> Path:
    """Circuit viewer page: choose the fact (or mean circuit) and the number of edges.

    `labels`: optional fact id -> text (e.g. the probe question), shown escaped in the selector.
    """
    chosen = _pick_facts(circuits.fact_ids, facts, max_facts)
    sizes = sorted({min(int(n), len(circuits.edges)) for n in sizes if int(n) >= 1})
    if not sizes:
        raise CircuitdynError("the circuit viewer needs at least one edge count >= 1")
    variants = {f"{f}|{n}": _fig_json(circuit_figure(circuits, f, n, (labels or {}).get(f))) for f in chosen for n in sizes}
    meta = circuits.meta
    subtitle = " · ".join(f"{k} {meta[k]}" for k in ("model", "epoch", "method", "metric") if k in meta)
    body = ("<div class=\"controls\"><label>fact <select id=\"fact\"></select></label>"
            "<label>edges <select id=\"size\"></select></label></div><div id=\"circuit\"></div>")
    data = {"variants": variants, "facts": _options(chosen, labels),
            "sizes": [{"value": str(n), "label": str(n)} for n in sizes], "default_size": str(sizes[min(2, len(sizes) - 1)])}
    script = """
var fact = fillSelect("fact", DATA.facts), size = fillSelect("size", DATA.sizes);
size.value = DATA.default_size;
function update() { return draw("circuit", DATA.variants[fact.value + "|" + size.value]).then(markRendered); }
fact.addEventListener("change", update); size.addEventListener("change", update);
update();
"""
    return _write_page(path, title or f"circuit viewer ({len(circuits.fact_ids)} facts)", subtitle, body, data, script)


def write_diff_html(
    diff: CircuitDiff, path: str | Path, *, facts: Sequence[str] | None = None, labels: dict[str, str] | None = None,
    max_facts: int = MAX_FACTS, title: str | None = None,
) -> Path:
    """Diff viewer page: summary numbers, per-fact table, and for the chosen fact the two circuits
    coloured by status, the layer Sankey, the layer shift and the strongest paths."""
    chosen = _pick_facts(diff.a.fact_ids, facts, max_facts)
    variants = {}
    for f in chosen:
        paths = diff.paths(f).set_index("path")
        variants[f] = {"circuit": _fig_json(diff_figure(diff, f)), "sankey": _fig_json(sankey_figure(diff, f)),
                       "layers": _fig_json(layer_shift_figure(diff, f)), "paths": _table_html(paths)}
    summary = diff.summary.to_frame("mean over facts")
    cols = ["n_a", "n_b", "added", "removed", "changed", "kept", "sign_flips", "edge_jaccard", "node_jaccard",
            "weighted_jaccard", "spearman", "rbo", "attn_shift", "deep_shift", "paths_lost"]
    facts_df = diff.facts[[c for c in cols if c in diff.facts]]
    body = (
        "<div class=\"row\"><div><h3>summary</h3>" + _table_html(summary, "{:.4g}") + "</div>"
        "<div><h3>legend</h3><p>" + " ".join(f"<span style=\"color:{c}\">■ {s}</span>" for s, c in STATUS_COLOURS.items())
        + f"</p><p>selection {_esc(diff.selection)}; an edge counts as added/removed/changed only when its score moved "
        "by more than the fact's noise floor (else: noise).</p></div></div>"
        "<div class=\"controls\"><label>fact <select id=\"fact\"></select></label></div>"
        "<div id=\"circuit\"></div><div class=\"row\"><div id=\"sankey\"></div><div id=\"layers\"></div></div>"
        "<h3>strongest input→logits paths</h3><div id=\"paths\"></div>"
        "<h3>per fact</h3>" + _table_html(facts_df)
    )
    data = {"variants": variants, "facts": _options(chosen, labels)}
    script = """
var fact = fillSelect("fact", DATA.facts);
function update() {
  var v = DATA.variants[fact.value];
  document.getElementById("paths").innerHTML = v.paths;  // built server-side from escaped text
  return Promise.all([draw("circuit", v.circuit), draw("sankey", v.sankey), draw("layers", v.layers)]).then(markRendered);
}
fact.addEventListener("change", update);
update();
"""
    sub = f"{diff.label_a} → {diff.label_b} · {len(diff.a.fact_ids)} facts · selection {diff.selection}"
    return _write_page(path, title or f"circuit diff: {diff.label_a} → {diff.label_b}", sub, body, data, script)


def _timeline_circuit(timeline: Any, fact_id: str, epoch: int, label: str | None) -> dict[str, Any]:
    graph = timeline.graph
    r = timeline.rows.index(fact_id)
    scores, mask = timeline.scores(epoch)[r], timeline.masks[epoch][r]
    pos = node_positions(graph)
    folded = _fold(graph, scores, mask)
    items = []
    for (src, dst), ports in folded.items():
        total = sum(s for _, s in ports)
        items.append((src, dst, total, "negative" if total < 0 else "positive",
                      f"{_esc(src)} → {_esc(dst)}: {total:.4g}<br>{_hover(ports)}"))
    active = {s for s, _ in folded} | {d for _, d in folded}
    fig = go.Figure(_edge_traces(pos, items, SIGN_COLOURS) + [_node_trace(graph, pos, node_importance(graph, scores * mask), active)])
    state = ""
    if timeline.outcomes is not None and fact_id != MEAN:
        row = timeline.fact(fact_id).set_index("epoch")
        correct = row.loc[epoch, "correct"] if epoch in row.index else None
        if correct is not None and not pd.isna(correct):
            state = " — recalled" if bool(correct) else " — not recalled"
    fig.update_layout(_circuit_layout(graph, f"{_esc(label or fact_id)} at epoch {epoch}: {int(mask.sum())} edges{state}"))
    return _fig_json(fig)


def write_timeline_html(
    timeline: Any, path: str | Path, *, facts: Sequence[str] | None = None, labels: dict[str, str] | None = None,
    max_facts: int = 20, title: str | None = None,
) -> Path:
    """Timeline viewer page: epoch slider over the chosen fact's circuit, linked with the line charts
    (a marker follows the slider; clicking a chart point moves it) and the layer x epoch heatmap."""
    chosen = _pick_facts(timeline.fact_ids, facts, max_facts)
    epochs = timeline.epochs
    circuits = {f"{f}|{e}": _timeline_circuit(timeline, f, e, (labels or {}).get(f)) for f in chosen for e in epochs}
    lines = {f: _fig_json(timeline_figure(timeline, f)) for f in chosen}
    summary = timeline.summary()
    stab = summary.pop("stability", None)
    rows = {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in summary.items()}
    if stab:
        rows.update({f"stability {k}": v for k, v in stab.items()})
    summary_df = pd.DataFrame({"value": list(rows.values())}, index=list(rows.keys()))
    body = (
        "<div class=\"row\"><div><h3>summary</h3>" + _table_html(summary_df, "{:.4g}") + "</div>"
        "<div><h3>does a fact's circuit stay put while recalled and change when forgotten?</h3>"
        "<p><b>gap</b> = mean Jaccard to the previous epoch when the fact stayed recalled minus when its recall "
        "flipped; <b>auc</b> = chance a retained transition's circuit moved less than a flipped one's "
        "(0.5 = no relation).</p></div></div>"
        "<div class=\"controls\"><label>fact <select id=\"fact\"></select></label>"
        f"<label>epoch <input type=\"range\" id=\"epoch\" min=\"0\" max=\"{len(epochs) - 1}\" step=\"1\" value=\"0\">"
        "</label><span id=\"epoch-label\"></span></div>"
        "<div class=\"row\"><div id=\"circuit\"></div><div id=\"lines\"></div></div><div id=\"heatmap\"></div>"
    )
    data = {"circuits": circuits, "lines": lines, "heatmap": _fig_json(heatmap_figure(timeline)),
            "epochs": epochs, "facts": _options(chosen, labels)}
    script = """
var fact = fillSelect("fact", DATA.facts), slider = document.getElementById("epoch");
function epoch() { return DATA.epochs[Number(slider.value)]; }
function marker(fig) {
  var layout = Object.assign({}, fig.layout);
  layout.shapes = [{type: "line", xref: "x", yref: "paper", x0: epoch(), x1: epoch(), y0: 0, y1: 1,
                    line: {color: "#d62728", width: 2, dash: "dot"}}];
  return {data: fig.data, layout: layout};
}
function update() {
  document.getElementById("epoch-label").textContent = "epoch " + epoch();
  return Promise.all([draw("circuit", DATA.circuits[fact.value + "|" + epoch()]),
                      draw("lines", marker(DATA.lines[fact.value]))]).then(markRendered);
}
fact.addEventListener("change", update); slider.addEventListener("input", update);
draw("heatmap", DATA.heatmap).then(update).then(function () {
  document.getElementById("lines").on("plotly_click", function (ev) {
    var i = DATA.epochs.indexOf(ev.points[0].x);
    if (i >= 0) { slider.value = String(i); update(); }
  });
});
"""
    sub = f"{len(timeline.fact_ids)} facts · epochs {epochs[0]}–{epochs[-1]} · selection {timeline.selection}"
    return _write_page(path, title or "circuit timeline", sub, body, data, script)

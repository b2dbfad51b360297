"""Circuits out of circuitdyn: one fact's circuit as a networkx graph, graph JSON, GraphML, or CSV edge rows.

The exported graph is `Graph.to_networkx` filled with one fact's scores: nodes are components (`input`,
heads `a{L}.h{H}`, MLPs `m{L}`, `logits`) and an edge joins a source component to a destination component,
the q/k/v ports of a head folded into one edge (`a0.h2->a3.h5<q>`, `<k>`, `<v>` become `a0.h2 -> a3.h5`).

Node attributes: `layer` (`input` -1, `logits` n_layers), `kind` (input/attn/mlp/logits), `head` (heads only).
Edge attributes: `score` (the sum of the edge's port scores; a port-level score is the attribution score of
one graph edge, see `circuitdyn.engine.circuits`), `score_q`, `score_k`, `score_v` (per port, for edges into a head)
and, when a selection or mask is given, `in_circuit` (some port of the edge is selected) and, for edges into a
head, `circuit_ports` (the selected ports, e.g. "qv"). Graph attributes: the metadata (`graph_metadata`).

Graph JSON (`to_graph_json`, schema `circuitdyn/schemas/graph.schema.json`) is networkx's node-link form:

    {"format": "circuitdyn-graph", "version": 1, "directed": true, "multigraph": false,
     "metadata": {"fact_id", "selection", "method", "ig_steps", "ig_grid", "metric", "epoch", ...},
     "nodes": [{"id": "a0.h1", "layer": 0, "kind": "attn", "head": 1}, ...],
     "links": [{"source": "input", "target": "a0.h1", "score": -0.12, "score_q": ..., "in_circuit": true}, ...]}

`networkx.node_link_graph(d, edges="links")` reads its nodes and links; `from_graph_json` also restores the
metadata as graph attributes. GraphML (`to_graphml`) holds the same graph with attribute values made
GraphML-typed (None dropped, lists and dicts as JSON strings). CSV (`to_csv`) has one row per graph edge
(port level, so the exact scores of the circuit file), for one fact or all facts of a file: `fact_id,
source, target, port, score` and, with a selection, `in_circuit`.

Selections: a `Selection` or spec that works on scores alone (`top:N`, `paths:N`, `abs:T`), or a bool mask
[edge]. `faith:` / `pruned:` circuits need a model: compute their masks with `Selection.select(...,
faithfulness=...)` and pass the fact's mask. With a selection, the exports keep only the circuit's edges
(`circuit_only=True`, the default) or every edge flagged by `in_circuit` (`circuit_only=False`); without
one they hold every edge. The CLI (`circuitdyn export`) defaults to `top:1000` for json and graphml (a full
SmolLM2-135M graph has 123,211 port edges) and to every edge for csv.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch import Tensor

from circuitdyn.engine.graph import PORTS, Graph
from circuitdyn.engine.selection import Selection
from circuitdyn.errors import CircuitdynError
from circuitdyn.io import atomic_path

if TYPE_CHECKING:
    from circuitdyn.engine.circuits import CircuitSet

FORMAT = "circuitdyn-graph"
VERSION = 1
SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "graph.schema.json"
FORMATS = ("json", "graphml", "csv")
DEFAULT_SELECTION = "top:1000"
"""The CLI's selection for json and graphml (csv: every edge)."""
MODEL_FREE_RULES = ("top", "paths", "abs")

Mask = Tensor | Selection | str | None


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the file, its format, how many nodes and links (CSV: edge rows) and facts."""

    path: Path
    format: str
    n_nodes: int | None
    n_links: int
    n_facts: int
    selection: str | None

    def text(self) -> str:
        """`wrote 12 nodes, 30 links (top:1000) to FILE`, or the edge rows of a csv."""
        what = (
            f"{self.n_nodes} nodes, {self.n_links} links"
            if self.n_nodes is not None
            else f"{self.n_links} edge rows of {self.n_facts} fact{'s' if self.n_facts != 1 else ''}"
        )
        return f"wrote {what} ({self.selection or 'all edges'}) to {self.path}"


# --------------------------------------------------------------------------- selection
def parse_selection(selection: Selection | str) -> Selection:
    """A selection rule that needs no model (`top:N`, `paths:N`, `abs:T`); `faith:`/`pruned:` are refused."""
    sel = Selection.parse(selection)
    if sel.needs_model:
        raise CircuitdynError(
            f"selection {sel} needs a model to evaluate faithfulness, which export does not load; use top:N, "
            "paths:N or abs:T, or compute the masks in Python (Selection.select(..., faithfulness=...)) and pass "
            "a fact's mask to CircuitSet.to_networkx / to_graph_json"
        )
    return sel


def fact_masks(cs: CircuitSet, mask: Mask, fact_ids: list[str]) -> tuple[Tensor | None, str | None]:
    """Bool masks [len(fact_ids), edge] of the given facts under `mask` (a Selection, a spec or a bool tensor
    [edge] for one fact or [fact, edge] for all facts of `cs`), and the selection's spec (`mask` for a tensor)."""
    rows = [cs.index(f) for f in fact_ids]
    if mask is None:
        return None, None
    if isinstance(mask, (Selection, str)):
        sel = parse_selection(mask)
        masks, _ = sel.select(cs.scores[rows], cs.graph)
        return masks.bool().cpu(), str(sel)
    if not isinstance(mask, Tensor):
        raise CircuitdynError(
            f"mask must be a bool tensor, a Selection or a spec such as top:100, got {type(mask).__name__}"
        )
    n_edges = len(cs.edges)
    if mask.ndim == 1 and mask.shape[0] == n_edges and len(rows) == 1:
        out = mask[None]
    elif mask.ndim == 2 and tuple(mask.shape) == (len(cs.fact_ids), n_edges):
        out = mask[rows]
    else:
        raise CircuitdynError(
            f"mask has shape {tuple(mask.shape)}; expected [{n_edges}] (one fact's edges) or "
            f"[{len(cs.fact_ids)}, {n_edges}] (every fact's)"
        )
    if out.dtype != torch.bool and not ((out == 0) | (out == 1)).all():
        raise CircuitdynError(f"mask of dtype {out.dtype} holds values other than 0 and 1")
    return out.bool().cpu(), "mask"


# --------------------------------------------------------------------------- networkx
def _plain(value: Any) -> Any:
    """A JSON-ready metadata value: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def graph_metadata(
    cs: CircuitSet, fact_id: str, selection: str | None = None, n_selected: int | None = None
) -> dict[str, Any]:
    """The metadata of one fact's exported circuit: the fact, the circuit file's metadata (per-fact lists
    reduced to this fact's value; settings that predate a field get their default, e.g. `ig_grid`), the
    graph's shape, the selection, the circuitdyn version and the file the circuits came from."""
    from circuitdyn import __version__
    from circuitdyn.engine.circuits import PER_FACT_META, SETTINGS, setting

    i = cs.index(fact_id)
    meta: dict[str, Any] = {"fact_id": fact_id}
    for key, value in cs.meta.items():
        if (
            (key in PER_FACT_META or key == "sparse_mass_kept")
            and isinstance(value, list)
            and len(value) == len(cs.fact_ids)
        ):
            value = value[i]
        meta[key] = value
    for key in SETTINGS:
        meta[key] = setting(cs.meta, key)
    g = cs.graph
    meta.update(
        n_layers=g.n_layers,
        n_heads=g.n_heads,
        has_mlp=g.has_mlp,
        n_edges=g.n_edges,
        selection=selection,
        n_circuit_edges=n_selected,
        circuitdyn_version=__version__,
        source_file=None if getattr(cs, "path", None) is None else str(cs.path),
    )
    return _plain(meta)


def circuit_graph(cs: CircuitSet, fact_id: str, mask: Mask = None, *, circuit_only: bool = False) -> nx.DiGraph:
    """One fact's circuit as a networkx DiGraph (see the module docstring; `CircuitSet.to_networkx`).

    `mask`: None (every edge, no `in_circuit`), a model-free Selection or spec, or a bool tensor. With
    `circuit_only`, only edges with a selected port (and the nodes they join) are kept; their `score` still
    sums all ports."""
    masks, spec = fact_masks(cs, mask, [fact_id])
    sel = None if masks is None else masks[0]
    scores = cs.fact(fact_id).float()
    if not bool(torch.isfinite(scores).all()):
        raise CircuitdynError(f"fact {fact_id!r}: its scores hold NaN or infinity; they cannot be exported")
    graph = cs.graph
    keep = None
    if circuit_only and sel is not None:
        # every port of each component edge that has a selected port (so an edge's score sums all its ports)
        src, dst = graph.edge_node_ids
        pair = src * len(graph.nodes) + dst
        keep = torch.isin(pair, pair[sel].unique())
    g = graph.to_networkx(scores, keep)
    for _, data in g.nodes(data=True):
        if data.get("head") is None:
            data.pop("head", None)
    for _, v, data in g.edges(data=True):
        ports, port_scores = data.pop("ports"), data.pop("scores")
        into_head = g.nodes[v]["kind"] == "attn"
        if into_head:
            for name in ports:
                data[f"score_{name[-2]}"] = port_scores[name]
        if sel is not None:
            chosen = [name for name in ports if bool(sel[graph.edge_index[name]])]
            data["in_circuit"] = bool(chosen)
            if into_head:
                data["circuit_ports"] = "".join(p for p in PORTS if any(n.endswith(f"<{p}>") for n in chosen))
    if circuit_only and sel is not None:
        g.remove_nodes_from([n for n in list(g.nodes) if g.degree(n) == 0])
    g.graph.update(graph_metadata(cs, fact_id, spec, None if sel is None else int(sel.sum())))
    return g


# --------------------------------------------------------------------------- graph JSON
def to_graph_json(cs: CircuitSet, fact_id: str, selection: Mask = None, *, circuit_only: bool = True) -> dict[str, Any]:
    """One fact's circuit as graph JSON (format `circuitdyn-graph`, version 1; module docstring): every edge
    without `selection`, else the circuit's edges (`circuit_only`) or every edge with `in_circuit`."""
    g = circuit_graph(cs, fact_id, selection, circuit_only=circuit_only)
    return graph_to_json(g)


def graph_to_json(g: nx.DiGraph) -> dict[str, Any]:
    """Graph JSON of a graph made by `circuit_graph` / `CircuitSet.to_networkx`."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "directed": True,
        "multigraph": False,
        "metadata": _plain(dict(g.graph)),
        "nodes": [{"id": n, **data} for n, data in g.nodes(data=True)],
        "links": [{"source": u, "target": v, **data} for u, v, data in g.edges(data=True)],
    }


def graph_schema() -> dict[str, Any]:
    """The JSON Schema of graph JSON (shipped as `circuitdyn/schemas/graph.schema.json`)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_graph_json(d: Any, source: str = "graph JSON") -> None:
    """Raise CircuitdynError naming the first field of `d` that breaks the schema."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(graph_schema()).iter_errors(d), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.path) or "(top level)"
        raise CircuitdynError(f"{source}: field {where}: {err.message}")


def from_graph_json(d: dict[str, Any]) -> nx.DiGraph:
    """The networkx DiGraph of graph JSON (validated first): nodes, links and the metadata as graph attributes."""
    validate_graph_json(d)
    g = nx.node_link_graph({**d, "directed": True, "multigraph": False}, edges="links")
    g.graph = dict(d["metadata"])
    return g


# --------------------------------------------------------------------------- files
def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise CircuitdynError(f"{path}: is a folder; a file is expected here")
    if path.exists() and not overwrite:
        raise CircuitdynError(
            f"{path}: exists; choose another output file, or pass --overwrite (overwrite=True) to replace it"
        )


def write_graph_json(
    cs: CircuitSet,
    fact_id: str,
    path: str | Path,
    selection: Mask = None,
    *,
    circuit_only: bool = True,
    overwrite: bool = False,
) -> Exported:
    """Write `to_graph_json` to `path` atomically (an existing file only with `overwrite`)."""
    path = Path(path)
    _check_target(path, overwrite)
    d = to_graph_json(cs, fact_id, selection, circuit_only=circuit_only)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(d, allow_nan=False) + "\n", encoding="utf-8")
    return Exported(path, "json", len(d["nodes"]), len(d["links"]), 1, d["metadata"]["selection"])


def graphml_ready(g: nx.DiGraph) -> nx.DiGraph:
    """A copy of `g` whose attribute values GraphML can hold: None dropped, lists and dicts as JSON strings."""

    def fix(attrs: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in attrs.items():
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                continue
            out[k] = json.dumps(v) if isinstance(v, (list, dict, tuple)) else v
        return out

    h = nx.DiGraph()
    h.graph.update(fix(g.graph))
    h.add_nodes_from((n, fix(d)) for n, d in g.nodes(data=True))
    h.add_edges_from((u, v, fix(d)) for u, v, d in g.edges(data=True))
    return h


def to_graphml(
    cs: CircuitSet,
    fact_id: str,
    path: str | Path,
    selection: Mask = None,
    *,
    circuit_only: bool = True,
    overwrite: bool = False,
) -> Exported:
    """Write one fact's circuit as GraphML (`networkx.write_graphml`; `networkx.read_graphml` reads it)."""
    path = Path(path)
    _check_target(path, overwrite)
    g = graphml_ready(circuit_graph(cs, fact_id, selection, circuit_only=circuit_only))
    with atomic_path(path) as tmp:
        nx.write_graphml(g, tmp)
    return Exported(path, "graphml", g.number_of_nodes(), g.number_of_edges(), 1, g.graph.get("selection"))


def to_csv(
    cs: CircuitSet,
    path: str | Path,
    fact_ids: list[str] | None = None,
    selection: Mask = None,
    *,
    circuit_only: bool = True,
    overwrite: bool = False,
) -> Exported:
    """Write edge rows `fact_id,source,target,port,score[,in_circuit]` for `fact_ids` (default: every fact):
    one row per graph edge (`port` q/k/v for edges into a head, else empty); with `selection`, only the
    circuit's edges (`circuit_only`) or every edge with `in_circuit` (true/false)."""
    path = Path(path)
    _check_target(path, overwrite)
    fact_ids = list(cs.fact_ids if fact_ids is None else fact_ids)
    masks, spec = fact_masks(cs, selection, fact_ids)
    parts = []
    for name in cs.edges:
        src, dst = name.split("->")
        parts.append((src, Graph.component(dst), dst[-2] if dst.endswith(">") else ""))
    n_rows = 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["fact_id", "source", "target", "port", "score"] + (["in_circuit"] if masks is not None else []))
        for j, fact in enumerate(fact_ids):
            scores = cs.fact(fact).float().tolist()
            sel = None if masks is None else masks[j].tolist()
            for i, (src, dst, port) in enumerate(parts):
                if sel is None:
                    w.writerow((fact, src, dst, port, scores[i]))
                elif sel[i] or not circuit_only:
                    w.writerow((fact, src, dst, port, scores[i], "true" if sel[i] else "false"))
                else:
                    continue
                n_rows += 1
    return Exported(path, "csv", None, n_rows, len(fact_ids), spec)


def export(
    cs: CircuitSet,
    path: str | Path,
    format: str,
    fact_id: str | None = None,
    selection: Mask = None,
    *,
    circuit_only: bool = True,
    overwrite: bool = False,
) -> Exported:
    """Write `cs` as `format` (json, graphml: one fact, `fact_id` or the file's only fact; csv: `fact_id` or
    every fact). What `circuitdyn export` calls."""
    if format not in FORMATS:
        raise CircuitdynError(f"export format {format!r} is unknown; use one of {', '.join(FORMATS)}")
    if format == "csv":
        return to_csv(
            cs, path, None if fact_id is None else [fact_id], selection, circuit_only=circuit_only, overwrite=overwrite
        )
    if fact_id is None:
        if len(cs.fact_ids) != 1:
            raise CircuitdynError(
                f"{format} export holds one fact and this circuit set has {len(cs.fact_ids)} "
                f"(e.g. {cs.fact_ids[:3]}); choose one (--fact), or export all as csv"
            )
        fact_id = cs.fact_ids[0]
    write = write_graph_json if format == "json" else to_graphml
    return write(cs, fact_id, path, selection, circuit_only=circuit_only, overwrite=overwrite)


def export_file(
    file: str | Path,
    out: str | Path,
    format: str | None = None,
    *,
    fact_id: str | None = None,
    all_facts: bool = False,
    selection: str | None = None,
    circuit_only: bool = True,
    overwrite: bool = False,
) -> Exported:
    """`export` of a circuit file, checked before anything is read: the format (default: from `out`'s suffix),
    one fact for json and graphml (`fact_id`, or the file's only fact; `all_facts` asks for csv), `out` another
    file than `file`, writable, and new unless `overwrite`. `selection`: a rule needing no model, or "all"
    (default `DEFAULT_SELECTION` for json and graphml, every edge for csv). What `circuitdyn export` calls."""
    from circuitdyn.engine.circuits import CircuitSet
    from circuitdyn.io import check_writable

    out = Path(out)
    fmt = format or {".json": "json", ".graphml": "graphml", ".csv": "csv"}.get(out.suffix.lower())
    if fmt is None:
        raise CircuitdynError(f"--out {out}: cannot tell the format from its suffix; pass --format {'|'.join(FORMATS)}")
    if all_facts and fmt != "csv":
        raise CircuitdynError(f"--all: a {fmt} file holds one fact; choose one with --fact, or use --format csv")
    if out.resolve() == Path(file).resolve():
        raise CircuitdynError(f"--out {out}: is the circuit file itself; choose another output file")
    check_writable(out, "file", flag="--out")
    if out.exists() and not overwrite:
        raise CircuitdynError(f"--out {out}: exists; choose another output file, or pass --overwrite to replace it")
    select = selection or ("all" if fmt == "csv" else DEFAULT_SELECTION)
    cs = CircuitSet.load(file)
    if fact_id is None and fmt != "csv" and len(cs.fact_ids) != 1:
        raise CircuitdynError(
            f"{file}: holds {len(cs.fact_ids)} facts (e.g. {cs.fact_ids[:3]}) and a {fmt} "
            "file holds one; choose it with --fact, or export every fact with --format csv"
        )
    if fact_id is not None and fact_id not in cs.fact_ids:
        raise CircuitdynError(
            f"{file}: --fact {fact_id!r} is not one of its {len(cs.fact_ids)} fact ids (e.g. {cs.fact_ids[:3]})"
        )
    return export(
        cs, out, fmt, fact_id, None if select == "all" else select, circuit_only=circuit_only, overwrite=overwrite
    )

"""The computational graph that circuits live in: components as nodes, residual-stream reads as edges.

Nodes are `input` (token + positional embeddings), every attention head `a{L}.h{H}`, every MLP `m{L}`
and `logits`. An edge runs from each upstream node's output to each later node's input. A head's input is
split into its query, key and value inputs, so head destinations carry a port suffix (`a3.h5<q>`) and one
edge name is `SRC->DST`, e.g. `a0.h2->a3.h5<q>` or `m1->logits`. GQA models are ungrouped: every query
head has its own `<k>`/`<v>` ports.

Edge order is fixed and shared by every score tensor: sources in forward order (outer), destinations in
forward order (inner), keeping only pairs where the source is upstream of the destination. That is the
row-major order of a `[source, destination]` matrix masked by `Graph.valid`, which the engine relies on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from circuitdyn.errors import CircuitdynError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

PORTS = ("q", "k", "v")
_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_PORT = re.compile(r"^a(\d+)\.h(\d+)<([qkv])>$")
_MLP = re.compile(r"^m(\d+)$")


@dataclass(frozen=True)
class Graph:
    """The attribution graph of a transformer with `n_layers` blocks of `n_heads` heads (+ an MLP each)."""

    n_layers: int
    n_heads: int
    has_mlp: bool = True

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise CircuitdynError(f"graph needs n_layers >= 1 and n_heads >= 1, got {self.n_layers}, {self.n_heads}")

    @classmethod
    def of(cls, n_layers: int, n_heads: int, has_mlp: bool = True) -> Graph:
        """The graph of this shape, one instance per process: its edge names (10^5 strings for a 135M model)
        and tables are built once, however many circuit files, patched runs and viewers ask."""
        return _shared_graph(int(n_layers), int(n_heads), bool(has_mlp))

    @classmethod
    def from_config(cls, cfg: Any) -> Graph:
        """The graph of a `HookedTransformerConfig` (sequential attention then MLP per block)."""
        if getattr(cfg, "parallel_attn_mlp", False):
            raise CircuitdynError("config field parallel_attn_mlp=True is not supported by the attribution graph")
        return cls.of(cfg.n_layers, cfg.n_heads, not getattr(cfg, "attn_only", False))

    @classmethod
    def from_model(cls, model: HookedTransformer) -> Graph:
        """The graph of a `HookedTransformer`."""
        return cls.from_config(model.cfg)

    @classmethod
    def from_edge_names(cls, edges: list[str]) -> Graph:
        """Rebuild the graph from a stored edge list alone (e.g. to lay out a circuit without the model)."""
        n_layers, n_heads, has_mlp = 0, 0, False
        for name in edges:
            src, sep, dst = name.partition("->")
            if not sep:
                raise CircuitdynError(f"edge name {name!r} is not of the form SRC->DST")
            for node in (src, dst):
                if m := _HEAD.match(node) or _PORT.match(node):
                    n_layers, n_heads = max(n_layers, int(m[1]) + 1), max(n_heads, int(m[2]) + 1)
                elif m := _MLP.match(node):
                    n_layers, has_mlp = max(n_layers, int(m[1]) + 1), True
                elif node not in ("input", "logits"):
                    raise CircuitdynError(f"edge name {name!r} has an unknown node {node!r}")
        if n_layers == 0 or n_heads == 0:
            raise CircuitdynError("edge list names no attention heads; cannot rebuild the graph")
        graph = cls.of(n_layers, n_heads, has_mlp)
        if list(edges) != graph.edges:
            missing = sorted(set(graph.edges) - set(edges))[:3]
            extra = sorted(set(edges) - set(graph.edges))[:3]
            raise CircuitdynError(
                f"edge list is not the canonical graph of {n_layers} layers x {n_heads} heads "
                f"(missing e.g. {missing}, unexpected e.g. {extra}, or a different order)"
            )
        return graph

    # --- nodes -------------------------------------------------------------------------------------
    @cached_property
    def sources(self) -> list[str]:
        """Nodes that write to the residual stream, in forward order."""
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            if self.has_mlp:
                out.append(f"m{layer}")
        return out

    @cached_property
    def destinations(self) -> list[str]:
        """Node inputs that read the residual stream, in forward order (head ports head-major, q/k/v)."""
        out: list[str] = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}<{p}>" for h in range(self.n_heads) for p in PORTS]
            if self.has_mlp:
                out.append(f"m{layer}")
        out.append("logits")
        return out

    @cached_property
    def nodes(self) -> list[str]:
        """All components in forward order: `input`, heads and MLPs layer by layer, `logits`."""
        return [*self.sources, "logits"]

    def layer_of(self, node: str) -> int:
        """Block index of a node (ports included); `input` is -1 and `logits` is n_layers."""
        if node == "input":
            return -1
        if node == "logits":
            return self.n_layers
        m = _HEAD.match(node) or _PORT.match(node) or _MLP.match(node)
        if not m:
            raise CircuitdynError(f"unknown node {node!r}")
        return int(m[1])

    @staticmethod
    def component(node: str) -> str:
        """The component a destination port belongs to (`a3.h5<q>` -> `a3.h5`)."""
        return node.split("<", 1)[0]

    # --- edges -------------------------------------------------------------------------------------
    @cached_property
    def valid(self) -> Bool[Tensor, "src dst"]:
        """Which (source, destination) pairs are edges: the source is computed before the destination reads."""
        # Stages: input 0, heads of block L write at 2L+1, its MLP at 2L+2; a destination at stage s
        # reads everything written strictly before s.
        src_stage = [0]
        for layer in range(self.n_layers):
            src_stage += [2 * layer + 1] * self.n_heads + ([2 * layer + 2] if self.has_mlp else [])
        dst_stage: list[int] = []
        for layer in range(self.n_layers):
            dst_stage += [2 * layer + 1] * (3 * self.n_heads) + ([2 * layer + 2] if self.has_mlp else [])
        dst_stage.append(2 * self.n_layers + 2)
        return torch.tensor(src_stage, device="cpu")[:, None] < torch.tensor(dst_stage, device="cpu")[None, :]

    @cached_property
    def edges(self) -> list[str]:
        """Ordered edge names `SRC->DST` (the order of every score tensor's edge axis)."""
        idx = self.valid.nonzero().tolist()
        return [f"{self.sources[s]}->{self.destinations[d]}" for s, d in idx]

    @cached_property
    def n_edges(self) -> int:
        """The number of edges (counted without naming them: a circuit check must not build 10^5 strings)."""
        return int(self.valid.sum())

    @cached_property
    def edge_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edges)}

    @cached_property
    def edge_src_dst(self) -> tuple[Tensor, Tensor]:
        """For every edge, its source index (into `sources`) and destination index (into `destinations`)."""
        idx = self.valid.nonzero()
        return idx[:, 0], idx[:, 1]

    @cached_property
    def edge_node_ids(self) -> tuple[Tensor, Tensor]:
        """For every edge, the index into `nodes` of its source and of its destination component."""
        node_id = {n: i for i, n in enumerate(self.nodes)}
        dst_node = torch.tensor([node_id[self.component(d)] for d in self.destinations], device="cpu")
        src, dst = self.edge_src_dst
        return src.clone(), dst_node[dst]

    def to_networkx(self, scores: Tensor | None = None, mask: Tensor | None = None) -> nx.DiGraph:
        """The graph as a networkx DiGraph over components (ports folded into their head).

        Node attributes: `layer`, `kind` (input/attn/mlp/logits), `head`. Each graph edge carries
        `ports` (the edge names it stands for, e.g. q/k/v into one head) and, when `scores` [edge] is
        given, `score` (their sum) and `scores` (per name). With `mask` [edge], only selected edges appear.
        """
        g = nx.DiGraph()
        for node in self.nodes:
            kind = "input" if node == "input" else "logits" if node == "logits" else "attn" if node[0] == "a" else "mlp"
            m = _HEAD.match(node)
            g.add_node(node, layer=self.layer_of(node), kind=kind, head=int(m[2]) if m else None)
        keep = range(self.n_edges) if mask is None else mask.nonzero().flatten().tolist()
        for i in keep:
            name = self.edges[i]
            src, dst = name.split("->")
            comp = self.component(dst)
            if not g.has_edge(src, comp):
                g.add_edge(src, comp, ports=[], scores={}, score=0.0)
            data = g.edges[src, comp]
            data["ports"].append(name)
            if scores is not None:
                value = float(scores[i])
                data["scores"][name] = value
                data["score"] += value
        return g

    def on_path(self, mask: Bool[Tensor, " edge"]) -> Bool[Tensor, " edge"]:
        """Keep only selected edges that lie on some input -> logits path of selected edges."""
        return torch.from_numpy(self.on_path_np(mask.cpu().numpy().astype(bool)))

    def on_path_np(self, sel: np.ndarray) -> np.ndarray:
        """`on_path` on a numpy bool mask (no torch overhead; used in selection loops)."""
        src_node, dst_node = self.edge_node_ids_np
        n = len(self.nodes)
        adj = np.zeros((n, n), dtype=bool)
        adj[src_node[sel], dst_node[sel]] = True
        fwd = np.zeros(n, dtype=bool)
        fwd[0] = True
        for j in range(1, n):  # nodes are in topological order
            fwd[j] = adj[fwd, j].any()
        bwd = np.zeros(n, dtype=bool)
        bwd[n - 1] = True
        for j in range(n - 2, -1, -1):
            bwd[j] = adj[j, bwd].any()
        return sel & fwd[src_node] & bwd[dst_node]

    @cached_property
    def edge_node_ids_np(self) -> tuple[np.ndarray, np.ndarray]:
        src, dst = self.edge_node_ids
        return src.numpy(), dst.numpy()


@lru_cache(maxsize=16)
def _shared_graph(n_layers: int, n_heads: int, has_mlp: bool) -> Graph:
    return Graph(n_layers, n_heads, has_mlp)

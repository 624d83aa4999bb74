"""Chains of conv (or linear) layers with nothing nonlinear between them, and which parts of a
chain are worth merging into one layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from easier_ext.surgery.macs import segment_macs

__all__ = ["Chain", "find_chains", "plan_segments", "intermediate_padding_is_zero"]

Layer = nn.Module  # an nn.Conv1d/2d/3d or an nn.Linear
Segments = list[tuple[int, int]]  # [start, stop) index ranges covering a chain


@dataclass
class Chain:
    """Layers applied one after another; between two of them only nodes that ``find_chains`` was
    told are transparent, each used once."""

    nodes: list[fx.Node]
    layers: list[Layer]

    def __len__(self) -> int:
        return len(self.layers)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _ConvNd) and not m.transposed


def _kind(m: Optional[nn.Module]) -> Optional[str]:
    if m is None:
        return None
    if _is_conv(m):
        return f"conv{len(m.kernel_size)}d"
    return "linear" if isinstance(m, nn.Linear) else None


def find_chains(graph: fx.Graph, root: nn.Module, transparent: Callable[[fx.Node], bool]) -> list[Chain]:
    """Maximal chains of two or more convs of one dimensionality (or of linears).

    Args:
        graph: a graph whose ``call_module`` targets name submodules of ``root``.
        root: the module the graph runs on.
        transparent: which nodes between two layers may be looked through (each must take the
            previous node as its only input besides attributes, and have one user).

    Returns:
        the chains, in graph order. A layer module called at several nodes is never part of one.
    """
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    def layer(n: fx.Node) -> Optional[Layer]:
        if n.op != "call_module" or calls[n.target] != 1:
            return None
        m = root.get_submodule(n.target)
        return m if _kind(m) else None

    def next_layer(n: fx.Node) -> Optional[fx.Node]:
        """The layer that alone consumes ``n``'s output, through transparent nodes."""
        while len(n.users) == 1:
            (user,) = n.users
            if len([i for i in user.all_input_nodes if i.op != "get_attr"]) != 1:
                return None
            if layer(user) is not None:
                return user
            if not transparent(user):
                return None
            n = user
        return None

    followers = {}
    for n in graph.nodes:
        if layer(n) is not None:
            nxt = next_layer(n)
            if nxt is not None and _kind(layer(nxt)) == _kind(layer(n)):
                followers[n] = nxt
    starts = [n for n in followers if n not in set(followers.values())]
    chains = []
    for start in starts:
        nodes = [start]
        while nodes[-1] in followers:
            nodes.append(followers[nodes[-1]])
        chains.append(Chain(nodes, [layer(n) for n in nodes]))
    return chains


def intermediate_padding_is_zero(convs: Sequence[_ConvNd]) -> bool:
    """Whether merging the convs is exact as they are: only the first may pad its input."""
    return all(isinstance(c.padding, tuple) and not any(c.padding) for c in convs[1:]) and all(
        c.padding_mode == "zeros" for c in convs
    )


def plan_segments(
    layers: Sequence[Layer],
    *,
    exact_only: bool = True,
    segment_cost: Optional[Callable[[Sequence[Layer]], float]] = None,
) -> tuple[Segments, float, float]:
    """The cheapest way to cut a chain into runs that are each merged into one layer.

    Costs are :func:`easier_ext.surgery.macs.segment_macs`, per output position of the chain's
    last layer (border effects ignored), so no input size is needed; pass ``segment_cost`` to use
    another measure (e.g. measured time), which must then already be per whole chain output.

    Args:
        layers: the chain.
        exact_only: only allow runs whose merge is exact as the layers are now (intermediate
            convs without padding); otherwise any run (padding can be moved first).
        segment_cost: cost of layers[i:j] merged, overriding the MACs model.

    Returns:
        ``(segments, cost, unmerged_cost)``: the runs ([start, stop) pairs covering the chain),
        the plan's cost, and the cost of merging nothing.
    """
    n = len(layers)

    def cost(i: int, j: int) -> float:
        if segment_cost is not None:
            return segment_cost(layers[i:j])
        return segment_macs(layers, i, j)

    def allowed(i: int, j: int) -> bool:
        if j - i == 1 or isinstance(layers[0], nn.Linear):
            return True
        return not exact_only or intermediate_padding_is_zero(layers[i:j])

    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            if allowed(i, j) and best[i] + cost(i, j) < best[j]:
                best[j], cut[j] = best[i] + cost(i, j), i
    segments, j = [], n
    while j > 0:
        segments.append((cut[j], j))
        j = cut[j]
    unmerged = sum(cost(i, i + 1) for i in range(n))
    return segments[::-1], best[n], unmerged

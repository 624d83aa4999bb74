"""Layers merged into one, for :func:`easier_ext.fold`: runs of a chain of convs (or
linears), and the sums ``a(x) + x`` and ``a(x) + b(x)`` of aligned convs."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from easier_ext.surgery.chains import Chain, find_chains, plan_segments
from easier_ext.surgery.fold_graph import ADD, FoldGraph
from easier_ext.surgery.macs import own_macs
from easier_ext.surgery.merge import add_convs, compose_convs, compose_linears

__all__ = ["merge_chains", "merge_sums"]


def merge_chains(fg: FoldGraph) -> bool:
    """Cuts each chain of convs (or linears) into the runs of least cost (``fg.cost``) and merges
    each run into its first layer; warns about chains that padding keeps from merging.

    Args:
        fg: the graph; changed in place.

    Returns:
        whether the graph changed.
    """
    changed = False
    for chain in find_chains(fg.graph, fg.gm, lambda n: False):
        segment_cost = _timed_cost(chain) if fg.cost == "latency" else None
        segments, _, _ = plan_segments(chain.layers, segment_cost=segment_cost)
        # Whether padding kept a merge from paying is told by the MACs model: a run that is not
        # exact cannot be built, so cannot be timed.
        _, exact, _ = plan_segments(chain.layers)
        _, loose, _ = plan_segments(chain.layers, exact_only=False)
        if loose < exact and tuple(chain.nodes) not in fg.warned_chains:
            fg.warned_chains.add(tuple(chain.nodes))
            warnings.warn(
                f"not merging {' -> '.join(n.target for n in chain.nodes)}: it would pay, but its inner convs pad their "
                "input, so merging would change the outputs at the borders; linearize with prepare_fold=True (or call "
                "easier_ext.move_padding) before finetuning to make it exact",
                stacklevel=4,  # fold's caller (fold, then its pass driver, call this)
            )
        for start, stop in segments:
            if stop - start < 2:
                continue
            nodes, layers = chain.nodes[start:stop], chain.layers[start:stop]
            fg.set_module(nodes[0].target, _compose(layers))
            _bypass_chain(fg.graph, nodes)
            fg.log.append(f"merged {' -> '.join(n.target for n in nodes)} into {nodes[0].target}")
            changed = True
    return changed


def _compose(layers: Sequence[nn.Module]) -> nn.Module:
    """The one layer that computes a run of linears, or of convs."""
    return compose_linears(layers) if isinstance(layers[0], nn.Linear) else compose_convs(layers)


def _bypass_chain(graph: fx.Graph, nodes: Sequence[fx.Node]) -> None:
    """nodes[0] now computes the whole run: the rest go, the run's users read nodes[0]."""
    nodes[0].meta = dict(nodes[-1].meta)
    nodes[-1].replace_all_uses_with(nodes[0])
    for n in reversed(nodes[1:]):
        graph.erase_node(n)


def _timed_cost(chain: Chain) -> Callable[[Sequence[nn.Module]], float]:
    """A run's cost for :func:`plan_segments`: the median time of its merged layer on the run's
    input shape, on the chain's device."""
    shapes = {id(layer): node.args[0].meta["tensor_meta"].shape for node, layer in zip(chain.nodes, chain.layers)}
    device = next(chain.layers[0].parameters()).device

    def seconds(layers) -> float:
        # Imported here: torch.utils.benchmark imports cpp_extension, which warns on import without CUDA.
        from torch.utils.benchmark import Timer

        module = layers[0] if len(layers) == 1 else _compose(layers)
        x = torch.randn(shapes[id(layers[0])], device=device)
        with torch.no_grad():
            return Timer("m(x)", globals={"m": module, "x": x}).blocked_autorange(min_run_time=0.05).median

    return seconds


def merge_sums(fg: FoldGraph) -> bool:
    """``a(x) + x`` and ``a(x) + b(x)`` with aligned convs (each read by the sum only) become one
    conv, when that costs no more MACs than the two.

    Args:
        fg: the graph; changed in place.

    Returns:
        whether the graph changed.
    """
    changed = False
    for node in list(fg.graph.nodes):
        if node.op != "call_function" or node.target not in ADD or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        merged = _sum_of_convs(fg, a, b) or _sum_of_convs(fg, b, a)
        if merged is None:
            continue
        conv_node, other, module = merged
        fg.set_module(conv_node.target, module)
        if other.op == "call_module" and other is not conv_node.args[0]:
            other.replace_all_uses_with(conv_node)  # the other conv's only user is this sum
            fg.graph.erase_node(other)
        fg.bypass(node, conv_node)
        fg.log.append(f"folded the sum {node.name} into {conv_node.target}")
        changed = True
    return changed


def _sum_of_convs(fg: FoldGraph, a: fx.Node, b: fx.Node):
    """(conv node, other node, merged conv) when ``a + b`` is one conv of a's input."""
    conv = fg.module(a)
    if not isinstance(conv, _ConvNd) or conv.transposed or len(a.users) != 1 or fg.uses(a.target) != 1:
        return None
    x = a.args[0]
    other = None if b is x else fg.module(b)
    if other is not None:
        if not isinstance(other, _ConvNd) or b.args[0] is not x or len(b.users) != 1 or fg.uses(b.target) != 1:
            return None
    elif b is not x:
        return None
    if a.meta["tensor_meta"].shape != b.meta["tensor_meta"].shape:
        return None
    try:
        merged = add_convs(conv, other)
    except ValueError:
        return None
    if other is not None and own_macs([merged]) > own_macs([conv]) + own_macs([other]):
        return None
    return a, b, merged

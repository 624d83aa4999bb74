"""The first of :func:`easier_ext.fold`'s passes: easier_ext sites become torch.nn modules,
a per-neuron multiplier or nothing, and Dropout and Identity go."""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from easier_ext.core.modules import EntropyActivation
from easier_ext.core.shapes import channel_view
from easier_ext.surgery.fold_graph import FoldGraph

__all__ = ["drop_identities", "replace_sites"]


def replace_sites(fg: FoldGraph) -> None:
    """Linearized sites go (or, with a per-neuron multiplier, become ``x * buffer``); the others
    become their torch.nn modules.

    Args:
        fg: the graph; changed in place.
    """
    for node in list(fg.graph.nodes):
        m = fg.module(node)
        if not isinstance(m, EntropyActivation):
            continue
        if not m.linearized:  # a new module is in training mode: this one's is the model's
            fg.set_module(node.target, m.to_torch().train(m.training))
        elif m.linear_scale is None:
            fg.bypass(node, node.args[0])
        else:
            _replace_with_mul(fg, node, m)


def _replace_with_mul(fg: FoldGraph, node: fx.Node, m: EntropyActivation) -> None:
    """A per-neuron multiplier as ``x * buffer``, the buffer shaped to broadcast."""
    dims = len(node.args[0].meta["tensor_meta"].shape)
    scale = channel_view(m.linear_scale.detach(), dims, m.channel_dim).clone()
    buf = fg.add_buffer(node.target.replace(".", "_") + "_scale", scale, before=node)
    with fg.graph.inserting_before(node):
        mul = fg.graph.call_function(operator.mul, (node.args[0], buf))
    mul.meta = dict(node.meta)
    fg.bypass(node, mul)
    fg.log.append(f"{node.target}: per-neuron multiplier")


def drop_identities(fg: FoldGraph) -> None:
    """Dropout and Identity modules go (the model runs in eval mode).

    Args:
        fg: the graph; changed in place.
    """
    for node in list(fg.graph.nodes):
        if isinstance(fg.module(node), (nn.Dropout, nn.Identity)) and node.args:
            fg.bypass(node, node.args[0])

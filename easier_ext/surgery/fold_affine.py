"""Per-channel affine maps folded into the conv or linear next to them, for
:func:`easier_ext.fold`: BatchNorm (running statistics) into the layer before it, and a
constant per-channel scale (LayerScale's gamma, a site's per-neuron multiplier) into the layer
before or after it."""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from easier_ext.core.shapes import channel_view
from easier_ext.surgery.fold_graph import FoldGraph, in_place, is_layer, meta_shape

__all__ = ["fold_batchnorms", "fold_scales", "report_unfolded_batchnorms"]


def fold_batchnorms(fg: FoldGraph) -> bool:
    """Each BatchNorm module whose input is a conv or linear that nothing else reads folds into it.

    Args:
        fg: the graph; changed in place.

    Returns:
        whether the graph changed.
    """
    changed = False
    for node in list(fg.graph.nodes):
        bn = fg.module(node)
        if not isinstance(bn, _BatchNorm):
            continue
        prev, layer = node.args[0], _batchnorm_layer(fg, node, bn)
        if isinstance(layer, str):
            continue
        fg.set_module(prev.target, _fuse_batchnorm(layer, bn))
        fg.bypass(node, prev)
        fg.log.append(f"{node.target} folded into {prev.target}")
        changed = True
    return changed


def _batchnorm_layer(fg: FoldGraph, node: fx.Node, bn: _BatchNorm) -> Any:
    """The conv or linear a BatchNorm node folds into, or why it does not (a str)."""
    if not bn.track_running_stats:
        return "it has no running statistics (it normalizes each batch by its own)"
    prev = node.args[0] if node.args else None
    layer = fg.module(prev) if isinstance(prev, fx.Node) else None
    if isinstance(layer, _ConvNd) and layer.transposed:
        return f"its input comes from {prev.target}, a transposed conv, which fold does not fold into"
    if not is_layer(layer):
        return f"its input comes from {_describe(prev, layer)}, not from a conv or linear"
    if fg.uses(prev.target) != 1:
        return f"{prev.target} is called at several places"
    others = [u for u in prev.users if u is not node and not _reads_metadata(u, prev)]  # shapes do not change
    if others:
        return f"{prev.target}'s output is also read by {', '.join(u.name for u in others)}"
    if isinstance(layer, nn.Linear) and not _channel_dim_is_last(prev):
        return f"it normalizes dim 1 of {prev.target}'s output, whose features are the last dim"
    return layer


def report_unfolded_batchnorms(fg: FoldGraph) -> None:
    """Says which BatchNorms are left and why: in the log, and in one warning.

    Args:
        fg: the folded graph.
    """
    reasons: dict[str, list[str]] = {}
    for node in fg.graph.nodes:
        bn = fg.module(node)
        if isinstance(bn, _BatchNorm):
            why, name = _batchnorm_layer(fg, node, bn), node.target
        elif node.op == "call_function" and node.target is F.batch_norm:
            why = "a functional batch_norm with batch statistics, or with weights computed in forward"
            attrs = [n.target for n in node.all_input_nodes if n.op == "get_attr"]
            name = f"{node.name} (of {attrs[0].rpartition('.')[0] or attrs[0]})" if attrs else node.name
        else:
            continue
        if isinstance(why, str):
            reasons.setdefault(why, []).append(name)
            fg.log.append(f"{name} left unfolded: {why}")
    if reasons:
        count = sum(len(names) for names in reasons.values())
        lines = [f"{', '.join(names[:6])}{f' and {len(names) - 6} more' if len(names) > 6 else ''}: {why}" for why, names in reasons.items()]
        # stacklevel=4: fold's caller (fold, then its pass driver, call this)
        warnings.warn(f"fold left {count} BatchNorm layer(s) unfolded (they stay, exact; all named in fold_log):\n  " + "\n  ".join(lines), stacklevel=4)


def fold_scales(fg: FoldGraph) -> bool:
    """``layer(x) * s`` and ``layer(x * s)`` with a per-channel constant s (a buffer or a
    parameter: a LayerScale's gamma) become one layer.

    Args:
        fg: the graph; changed in place.

    Returns:
        whether the graph changed.
    """
    changed = False
    for node in list(fg.graph.nodes):
        found = _constant_scale(fg, node)
        if found is None:
            continue
        source, scale = found
        before = fg.module(source)
        writes = in_place(node, None)
        per_channel = _channelwise(node, scale, before, out=True) if is_layer(before) else None
        if per_channel is not None and all(u is node or _reads_metadata(u, source) for u in source.users) and fg.uses(source.target) == 1:
            fg.set_module(source.target, _scale_outputs(before, per_channel))
            fg.bypass(node, source)
            changed = True
            continue
        if len(node.users) == 1 and not (writes and len(source.users) != 1):  # others would see x * s
            (user,) = node.users
            after = fg.module(user)
            per_channel = _channelwise(node, scale, after, out=False) if is_layer(after) else None
            if per_channel is not None and fg.uses(user.target) == 1:
                fg.set_module(user.target, _scale_inputs(after, per_channel))
                fg.bypass(node, source)
                changed = True
    return changed


def _constant_scale(fg: FoldGraph, node: fx.Node) -> Optional[tuple[fx.Node, torch.Tensor]]:
    """``(x, s)`` for ``x * s``, ``s * x``, ``x.mul(s)`` or ``x *= s`` with s an attribute."""
    if node.op == "call_function" and node.target in (operator.mul, torch.mul, operator.imul):
        pass
    elif node.op != "call_method" or node.target not in ("mul", "mul_"):
        return None
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    x, s = node.args
    if s.op != "get_attr" and not in_place(node, None):
        x, s = s, x
    if s.op != "get_attr" or x.op == "get_attr":
        return None
    value = fg.attr_tensor(s)
    return (x, value) if value is not None and value.is_floating_point() else None


def _channelwise(node: fx.Node, scale: torch.Tensor, layer: nn.Module, out: bool) -> Optional[torch.Tensor]:
    """The scale as one factor per channel of ``layer``'s output (``out``) or input, when it
    broadcasts to ``node``'s output along that dim only; else None."""
    shape = meta_shape(node)
    if shape is None:
        return None
    dims = len(shape)
    if isinstance(layer, nn.Linear):
        channels, dim = (layer.out_features if out else layer.in_features), dims - 1
    else:  # the channels come before the spatial dims, with or without a batch dim
        channels, dim = (layer.out_channels if out else layer.in_channels), dims - len(layer.kernel_size) - 1
    if scale.dim() > dims or dim < 0 or shape[dim] != channels:
        return None
    full = [1] * (dims - scale.dim()) + list(scale.shape)
    if any(size != 1 for i, size in enumerate(full) if i != dim) or full[dim] not in (1, channels):
        return None
    return scale.flatten().expand(channels)


def _reads_metadata(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads only ``node``'s shape, rank, dtype or device (which folding keeps)."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in ("shape", "ndim", "dtype", "device")
    if user.op == "call_method" and user.target in ("size", "dim", "ndimension"):
        return user.args[0] is node and node not in user.args[1:] and not user.kwargs
    return False


def _describe(node: Any, module: Optional[nn.Module]) -> str:
    """Where a node's value comes from, for messages: ``the model's input``, ``pool (a
    MaxPool2d)``, ``a call of cat``."""
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "placeholder":
        return "the model's input"
    if module is not None:
        return f"{node.target} ({type(module).__name__})"
    if node.op == "call_function":
        return f"a call of {getattr(node.target, '__name__', node.target)}"
    return f"a call of .{node.target}()" if node.op == "call_method" else str(node.target)


def _channel_dim_is_last(node: fx.Node) -> bool:
    """BatchNorm1d normalizes dim 1; a Linear's features are the last dim: same only for 2-d."""
    meta = node.meta.get("tensor_meta")
    return meta is not None and len(meta.shape) == 2


def _fuse_batchnorm(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """The layer with ``bn`` folded in, computed in float64 and cast back (one rounding, as for
    merges: the roundings of each step add up over a deep model)."""
    fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
    return fuse(copy.deepcopy(layer).double(), copy.deepcopy(bn).double()).to(layer.weight.dtype)


def _scale_outputs(layer: nn.Module, s: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(layer)
    with torch.no_grad():
        new.weight.mul_(channel_view(s.to(new.weight), new.weight.dim(), 0))
        if new.bias is not None:
            new.bias.mul_(s.to(new.bias))
    return new


def _scale_inputs(layer: nn.Module, s: torch.Tensor) -> nn.Module:
    """Scaling input channel i scales the weights that read it (zero padding stays zero)."""
    new = copy.deepcopy(layer)
    w = new.weight
    groups = getattr(new, "groups", 1)
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    # weight[o, j] reads input channel (o // cout_g) * cin_g + j
    index = (torch.arange(w.shape[0]) // cout_g * cin_g).unsqueeze(1) + torch.arange(cin_g).unsqueeze(0)
    factor = s.to(w)[index.to(w.device)]
    with torch.no_grad():
        w.mul_(factor.reshape(*factor.shape, *[1] * (w.dim() - 2)))
    return new

"""Residual branches that pruning made constant, for :func:`easier_ext.fold`: a conv or
linear whose weights are all zero outputs its bias; that constant is carried through the layers
after it that keep it one, and the residual addition it meets adds a buffer instead."""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from easier_ext.surgery.fold_graph import ADD, FoldGraph, in_place, is_layer, meta_shape
from easier_ext.surgery.tracing import is_stochastic_depth

__all__ = ["fold_constants"]

#: torch.nn modules that, in eval mode, map each element alone: a constant goes through them.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity, nn.modules.dropout._DropoutNd,
)  # fmt: skip
#: call_function targets that map each element alone (their tensors broadcast against each other).
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.clamp, torch.relu, torch.sigmoid, torch.tanh,
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish, F.hardsigmoid, F.elu,
    F.sigmoid, F.tanh,
}  # fmt: skip
#: call_method targets (``x.relu()``) that map each element alone, none in place.
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "clamp", "relu", "sigmoid", "tanh"}


@dataclass(frozen=True)
class _Constant:
    """A node's output that is the same for every input: ``value`` (float64) broadcasts to it."""

    value: torch.Tensor
    sources: tuple[str, ...]  # the emptied layers it comes from


def fold_constants(fg: FoldGraph) -> bool:
    """Residual branches made constant by an emptied layer become the constant they add.

    A conv or linear whose weights are all zero outputs its bias (or zeros) at every position.
    That constant is carried through the nodes after it that keep it a constant of a shape
    broadcasting to theirs (see :func:`_carried_constant`). An addition of such a constant to
    a tensor of the addition's own shape adds a new buffer instead (or is bypassed when the
    constant is zero), and the branch that computed the constant is dropped as dead code.
    Only constants coming from an emptied layer are replaced, so a second call finds nothing
    more to do unless another layer was emptied since.

    Args:
        fg: the graph; changed in place.

    Returns:
        whether the graph changed.
    """
    constants: dict[fx.Node, _Constant] = {}
    changed = False
    for node in list(fg.graph.nodes):
        found = _emptied_layer_output(fg, node) or _carried_constant(fg, node, constants)
        if found is not None:
            constants[node] = found
        elif _add_constant(fg, node, constants):
            changed = True
    if changed:
        fg.graph.eliminate_dead_code()
    return changed


def _emptied_layer_output(fg: FoldGraph, node: fx.Node) -> Optional[_Constant]:
    """The output of a conv or linear whose weights are all zero: its bias, broadcast.

    Args:
        fg: the graph.
        node: any node.

    Returns:
        the constant, in float64 (shaped like the node's output with 1 on every dim but the
        channels'), or None when ``node`` is not such a layer.
    """
    layer = fg.module(node)
    shape = meta_shape(node)
    if not is_layer(layer) or shape is None or len(shape) == 0 or layer.weight.any():
        return None
    if isinstance(layer, nn.Linear):
        channels, dim = layer.out_features, len(shape) - 1
    else:  # the channels come before the spatial dims, with or without a batch dim
        channels, dim = layer.out_channels, len(shape) - len(layer.kernel_size) - 1
    if dim < 0:
        return None
    if layer.bias is not None:
        value = layer.bias.detach().double()
    else:
        value = torch.zeros(channels, dtype=torch.float64, device=layer.weight.device)
    broadcast = [1] * len(shape)
    broadcast[dim] = channels
    return _Constant(value.reshape(broadcast), (node.target,))


def _carried_constant(fg: FoldGraph, node: fx.Node, constants: dict[fx.Node, _Constant]) -> Optional[_Constant]:
    """The node's output when it is a constant because its inputs are.

    Carried through: elementwise modules, functions and methods (torchvision's
    ``stochastic_depth`` outside training among them); BatchNorm with running statistics;
    LayerNorm over dims the constant spans; linears; convs that do not pad (at every position
    they see the same window of a constant). Each is run on the constant itself, expanded
    along the dims it mixes, so the value is computed by torch's own code.

    Args:
        fg: the graph.
        node: any node.
        constants: the constants found so far, by node.

    Returns:
        the constant (float64, broadcasting to the node's output shape), or None when one of
        its inputs is not a constant, an attribute or a Python value, or its op may not keep
        a constant a constant.
    """
    inputs = node.all_input_nodes
    if not any(n in constants for n in inputs) or not all(n in constants or fg.attr_tensor(n) is not None for n in inputs):
        return None
    shape = meta_shape(node)
    op = _constant_op(fg, node)
    if shape is None or op is None:
        return None
    if in_place(node, fg.module(node)) and len(inputs[0].users) != 1:
        # what it writes into would be seen by the other users, and it may be dropped
        return None

    def value(n: fx.Node) -> torch.Tensor:
        t = constants[n].value if n in constants else fg.attr_tensor(n)
        return t.clone().double() if t.is_floating_point() else t.clone()

    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    try:
        with torch.no_grad():
            out = op(*args, **kwargs)
    except Exception:  # an op may refuse the constant's shape in many ways: then it is not carried
        return None
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or not _broadcasts(out.shape, shape):
        return None
    sources = tuple(dict.fromkeys(s for n in inputs if n in constants for s in constants[n].sources))
    return _Constant(out.reshape([1] * (len(shape) - out.dim()) + list(out.shape)), sources)


def _constant_op(fg: FoldGraph, node: fx.Node) -> Optional[Callable[..., torch.Tensor]]:
    """What computes ``node`` from constant inputs (float64) without changing its result,
    or None when the node's op may not keep a constant a constant."""
    if node.op == "call_function":
        return node.target if node.target in _ELEMENTWISE_FUNCTIONS or _is_stochastic_depth_in_eval(node) else None
    if node.op == "call_method":
        return (lambda x, *a, **k: getattr(x, node.target)(*a, **k)) if node.target in _ELEMENTWISE_METHODS else None
    m = fg.module(node)
    carriers = (_ELEMENTWISE_MODULES, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.Linear, _ConvNd)
    if not isinstance(m, carriers) or len(node.args) != 1 or node.kwargs or m.training:
        return None
    m = copy.deepcopy(m).double()
    if isinstance(m, nn.PReLU) and m.num_parameters == 1:
        return m
    if isinstance(m, nn.PReLU):  # one slope per channel of dim 1
        return lambda x: m(x.expand(x.shape[0], m.num_parameters, *x.shape[2:]) if x.dim() > 1 else x)
    if isinstance(m, _ELEMENTWISE_MODULES):
        return m
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        # batch statistics would normalize the constant over positions it does not vary along
        return (lambda x: m(x.expand(x.shape[0], m.num_features, *x.shape[2:]))) if m.track_running_stats else None
    if isinstance(m, nn.LayerNorm):
        dims = len(m.normalized_shape)
        return lambda x: m(x.expand(*x.shape[: x.dim() - dims], *m.normalized_shape))
    if isinstance(m, nn.Linear):
        return lambda x: m(x.expand(*x.shape[:-1], m.in_features))
    if isinstance(m, _ConvNd) and not m.transposed and m.padding_mode == "zeros" and not _pads(m):
        # one window of the constant: the output is 1 wide on each spatial dim, the same everywhere
        extent = [d * (k - 1) + 1 for k, d in zip(m.kernel_size, m.dilation)]

        def conv(x: torch.Tensor) -> torch.Tensor:
            if x.dim() != len(extent) + 2 or any(s != 1 for s in x.shape[2:]):
                raise ValueError("the constant varies along a spatial dim")
            return m(x.expand(x.shape[0], m.in_channels, *extent))

        return conv
    return None


def _add_constant(fg: FoldGraph, node: fx.Node, constants: dict[fx.Node, _Constant]) -> bool:
    """``x + constant`` (an addition, the constant from an emptied layer, x of the sum's shape)
    adds a buffer holding the constant, or is bypassed when the constant is zero.

    Args:
        fg: the graph; changed in place.
        node: any node.
        constants: the constants found so far, by node.

    Returns:
        whether the graph changed.
    """
    if node.op != "call_function" or node.target not in ADD or len(node.args) != 2 or node.kwargs:
        return False
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or (a in constants) == (b in constants):
        return False
    const, other = (a, b) if a in constants else (b, a)
    shape = meta_shape(node)
    if shape is None or meta_shape(other) != shape:
        return False
    writes_constant = node.target is operator.iadd and const is a
    if writes_constant and len(const.users) != 1:
        return False  # the others would see it hold the sum: it stays computed
    constant = constants[const]
    what = f"{', '.join(constant.sources)} {'is' if len(constant.sources) == 1 else 'are'} empty: its branch"
    if not constant.value.any() and _may_return_instead(fg.graph, other, node):
        fg.bypass(node, other)
        fg.log.append(f"{what} was zero, so {node.name} went")
        return True
    value = constant.value.reshape([1] * (len(shape) - constant.value.dim()) + list(constant.value.shape))
    buffer = fg.add_buffer(node.name + "_constant", value.to(node.meta["tensor_meta"].dtype), before=node)
    with fg.graph.inserting_before(node):
        if writes_constant:  # a buffer must not be written into, nor grow to the sum's shape
            new = fg.graph.call_function(operator.add, (other, buffer))
            new.meta = dict(node.meta)
            fg.bypass(node, new)
        else:
            node.replace_input_with(const, buffer)
    fg.log.append(f"{what} became a constant added at {node.name}")
    return True


def _may_return_instead(graph: fx.Graph, other: fx.Node, node: fx.Node) -> bool:
    """Whether ``node``'s users may get ``other`` itself: an in-place op after them may write
    into it, so nothing may read it later, and it must not be an input or attribute."""
    if other.op in ("placeholder", "get_attr"):
        return False
    order = {n: i for i, n in enumerate(graph.nodes)}
    return all(order[u] < order[node] for u in other.users if u is not node)


def _broadcasts(shape: Sequence[int], to: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``to`` without growing it."""
    return len(shape) <= len(to) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(to)))


def _pads(conv: _ConvNd) -> bool:
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation))
    return any(conv.padding)


def _is_stochastic_depth_in_eval(node: fx.Node) -> bool:
    """A call of torchvision's ``stochastic_depth`` with ``training=False``: it returns its input."""
    return is_stochastic_depth(node) and node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True) is False

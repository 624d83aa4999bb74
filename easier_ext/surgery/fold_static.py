"""Before :func:`easier_ext.fold` folds: what is fixed once the model is gets computed once,
and functional conv, linear and batch_norm calls with fixed weights become their torch.nn modules."""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from easier_ext.surgery.fold_graph import FoldGraph, in_place, meta_shape

__all__ = ["compute_static", "functional_layers", "is_batch_norm_in_eval"]

#: Functional layers that become their torch.nn module when their weights are fixed, with their
#: parameters in order and defaults.
_FUNCTIONAL_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_LINEAR_PARAMS = ("input", "weight", "bias")
_BATCH_NORM_PARAMS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by input rank
#: Ops whose result is not a function of their inputs (random, or uninitialized memory): never
#: computed ahead of time. Names, and parts of names.
_RANDOM_OPS = {"normal", "bernoulli", "multinomial", "poisson", "binomial", "gumbel_softmax", "rrelu"}
_NOT_STATIC_PARTS = ("rand", "dropout", "empty")
#: Ops whose result may share its input's memory.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "flatten", "unflatten", "narrow", "select", "as_strided", "contiguous", "split", "chunk", "unbind", "movedim", "detach",
}  # fmt: skip
#: Python values that a computed-once result may be written into a graph's arguments as (not a
#: dtype or device read from a weight: they must follow the folded model's ``.double()``, ``.to``).
_LITERALS = (int, float, bool, str, type(None))


def is_batch_norm_in_eval(node: fx.Node) -> bool:
    """Whether a node is a functional ``batch_norm`` call with running statistics (attributes),
    not training: a per-channel affine map, which fold turns into a BatchNorm module and folds.

    Args:
        node: any node.

    Returns:
        whether it is such a call.
    """
    if node.op != "call_function" or node.target is not F.batch_norm:
        return False
    bound = _bind(node, _BATCH_NORM_PARAMS, _BATCH_NORM_DEFAULTS)
    if bound is None or bound["training"] is not False:
        return False
    stats = (bound["running_mean"], bound["running_var"])
    return all(isinstance(n, fx.Node) and n.op == "get_attr" for n in stats)


def compute_static(fg: FoldGraph) -> None:
    """Computes once what is fixed once the model is (see :func:`easier_ext.fold`): the
    nodes whose inputs are all parameters, buffers or such nodes, and the ranks of tensors. Those
    read by other nodes become buffers (or Python values), the rest go as dead code;
    ``torch._assert`` calls that hold go.

    Args:
        fg: the graph, its shapes propagated; changed in place.
    """
    graph = fg.graph
    written = _written_attributes(graph, fg.module)
    values: dict[fx.Node, Any] = {}
    sources: dict[fx.Node, tuple[str, ...]] = {}  # the attributes each value is computed from
    for node in list(graph.nodes):
        if node.op == "get_attr":
            if node not in written:  # an attribute written in forward is not fixed
                values[node], sources[node] = fg.attr(node), (node.target,)
            continue
        rank = _rank_read(node)
        if rank is not None:
            values[node], sources[node] = rank, ()
            continue
        inputs = node.all_input_nodes
        if not inputs or not all(n in values for n in inputs) or not _is_static_op(node):
            continue
        try:
            with torch.no_grad():
                value = _evaluate(node, values)
        except Exception:  # then it stays computed, as it was
            continue
        if node.op == "call_function" and node.target is torch._assert:
            graph.erase_node(node)  # it held
            continue
        values[node] = value
        sources[node] = tuple(dict.fromkeys(s for n in inputs for s in sources[n]))
    for node, value in values.items():
        if node.op == "get_attr" or all(u in values for u in node.users):
            continue
        if isinstance(value, torch.Tensor):
            origin = sources[node][0].replace(".", "_") + "_" if sources[node] else ""
            attr = fg.add_buffer(origin + node.name, value.detach().clone(), before=node)
            fg.origins[attr.target] = sources[node][0].rpartition(".")[0] if sources[node] else ""
            node.replace_all_uses_with(attr)
            fg.log.append(f"{attr.target}: computed once from {', '.join(sources[node])}")
        elif _is_literal(value):
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
    graph.eliminate_dead_code()


def functional_layers(fg: FoldGraph) -> None:
    """Functional conv, linear and batch_norm calls whose weights (and statistics) are fixed
    become their torch.nn modules, which the passes fold.

    Args:
        fg: the graph, after :func:`compute_static`; changed in place.
    """
    graph = fg.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        try:
            made = _layer_of_call(fg, node)
        except (TypeError, ValueError, RuntimeError):  # a call no module reproduces
            made = None
        if made is None:
            continue
        module, attrs, x = made
        name = _name_module(fg, node, attrs, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        fg.bypass(node, new)
        for a in attrs:
            if not a.users:
                graph.erase_node(a)


def _layer_of_call(fg: FoldGraph, node: fx.Node) -> Optional[tuple[nn.Module, list[fx.Node], fx.Node]]:
    """The torch.nn module that computes a functional layer call, the get_attr nodes it takes
    its tensors from (weight or running mean first) and the call's input; None when it is not
    such a call or its tensors are not fixed."""
    target = node.target
    if target in _FUNCTIONAL_CONVS:
        bound, names = _bind(node, _CONV_PARAMS, _CONV_DEFAULTS), ("weight", "bias")
    elif target is F.linear:
        bound, names = _bind(node, _LINEAR_PARAMS, {"bias": None}), ("weight", "bias")
    elif target is F.batch_norm:
        bound, names = _bind(node, _BATCH_NORM_PARAMS, _BATCH_NORM_DEFAULTS), ("running_mean", "running_var", "weight", "bias")
        if bound is None or bound["training"] is not False:
            return None  # batch statistics
    else:
        return None
    if bound is None or not isinstance(bound["input"], fx.Node):
        return None
    tensors = {k: bound[k] for k in names if bound[k] is not None}
    if any(not isinstance(n, fx.Node) or n.op != "get_attr" or not isinstance(fg.attr(n), torch.Tensor) for n in tensors.values()):
        return None  # computed from the input
    if any(isinstance(v, fx.Node) for k, v in bound.items() if k not in names and k != "input"):
        return None  # a stride, padding, eps... computed in forward
    value = {k: fg.attr(n).detach() for k, n in tensors.items()}
    first = names[0]
    if first not in value:
        return None
    w = value[first]
    if target is F.batch_norm:
        rank = len(meta_shape(bound["input"]) or ())
        if rank not in _BATCH_NORMS or "running_var" not in value:
            return None
        module = _BATCH_NORMS[rank](w.numel(), eps=bound["eps"], device=w.device, dtype=w.dtype)
        state = {"running_mean": w, "running_var": value["running_var"]}
        state["weight"] = value.get("weight", torch.ones_like(w))
        state["bias"] = value.get("bias", torch.zeros_like(w))
    elif target is F.linear:
        module = nn.Linear(w.shape[1], w.shape[0], bias="bias" in value, device=w.device, dtype=w.dtype)
        state = value
    else:
        conv, groups = _FUNCTIONAL_CONVS[target], bound["groups"]
        module = conv(
            w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=bound["stride"], padding=bound["padding"],
            dilation=bound["dilation"], groups=groups, bias="bias" in value, device=w.device, dtype=w.dtype,
        )  # fmt: skip
        state = value
    module.load_state_dict(state, strict=False)  # shapes checked; num_batches_tracked is not used in eval
    return module.eval(), [tensors[first]] + [n for k, n in tensors.items() if k != first], bound["input"]


def _name_module(fg: FoldGraph, call: fx.Node, attrs: list[fx.Node], module: nn.Module) -> str:
    """Registers a module made from a functional call: under the name of the module its
    tensors come from when nothing but the call reads that module, else as a child of it
    named after the call. Returns its name."""
    owner = fg.origins.get(attrs[0].target, attrs[0].target.rpartition(".")[0])
    gone = {call} | {a for a in attrs if set(a.users) == {call}}
    read = any(
        n.op in ("get_attr", "call_module") and n not in gone and (n.target == owner or n.target.startswith(owner + "."))
        for n in fg.graph.nodes
    )
    if owner and not read:
        fg.set_module(owner, module)
        return owner
    parent = fg.gm.get_submodule(owner) if owner else fg.gm
    name = call.target.__name__
    while hasattr(parent, name):
        name += "_"
    parent.add_module(name, module)
    return f"{owner}.{name}" if owner else name


def _rank_read(node: fx.Node) -> Optional[int]:
    """The rank of a tensor that ``x.ndim`` or ``x.dim()`` reads, from the node's meta."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "ndim":
        x = node.args[0]
    elif node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1 and not node.kwargs:
        x = node.args[0]
    else:
        return None
    shape = meta_shape(x) if isinstance(x, fx.Node) else None
    return None if shape is None else len(shape)


def _is_static_op(node: fx.Node) -> bool:
    """Whether a call gives the same result on the same inputs, changing none of them (so it may
    be computed once, ahead of time)."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is F.batch_norm:  # in training, it updates the running statistics it is given
        bound = _bind(node, _BATCH_NORM_PARAMS, _BATCH_NORM_DEFAULTS)
        return bound is not None and (bound["training"] is False or (bound["running_mean"] is None and bound["running_var"] is None))
    name = (node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))).lower()
    return not (in_place(node, None) or name in _RANDOM_OPS or any(part in name for part in _NOT_STATIC_PARTS))


def _written_attributes(graph: fx.Graph, module_of: Callable[[fx.Node], Optional[nn.Module]]) -> set[fx.Node]:
    """The get_attr nodes whose tensors an in-place op writes into, directly or through views:
    their values are not fixed."""
    written = set()
    for node in graph.nodes:
        if node.op == "placeholder" or not node.args or not in_place(node, module_of(node)):
            continue
        target = node.args[0]
        while isinstance(target, fx.Node) and target.op != "get_attr" and _is_view(target) and target.args:
            target = target.args[0]
        if isinstance(target, fx.Node) and target.op == "get_attr":
            written.add(target)
    return written


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and (node.target is operator.getitem or getattr(node.target, "__name__", None) in _VIEW_METHODS)


def _evaluate(node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, values.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _is_literal(value: Any) -> bool:
    """Whether ``value`` may be written into a node's arguments as it is."""
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    return isinstance(value, _LITERALS)


def _bind(node: fx.Node, params: Sequence[str], defaults: dict) -> Optional[dict[str, Any]]:
    """A call's arguments by name, defaults filled in; None when they do not fit ``params``."""
    if len(node.args) > len(params) or not set(node.kwargs) <= set(params):
        return None
    bound = dict(defaults)
    bound.update(zip(params, node.args))
    bound.update(node.kwargs)
    return bound if set(params) <= set(bound) else None

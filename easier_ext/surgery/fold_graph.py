"""The graph that :func:`easier_ext.fold` works on: how a model is traced for it, the state
its passes share, and what they ask of a node."""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from easier_ext.surgery.tracing import FoldTracer, trace

__all__ = ["ADD", "FoldGraph", "LayerTracer", "in_place", "is_layer", "meta_shape", "planning_graph"]

#: call_function targets of a residual addition ``x + y``.
ADD = (operator.add, operator.iadd, torch.add)


class LayerTracer(FoldTracer):
    """:class:`FoldTracer`, and subclasses of BatchNorm, convs and Linear that keep torch's
    ``forward`` are leaves: they compute what the torch layer does (and BatchNorm's forward
    branches on the input's rank, so it cannot be traced through)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _keeps_torch_forward(m) or super().is_leaf_module(m, module_qualified_name)


def _keeps_torch_forward(m: nn.Module) -> bool:
    if not isinstance(m, (_BatchNorm, _ConvNd, nn.Linear)):
        return False
    # a conv's forward calls _conv_forward, which some subclasses replace
    methods = [getattr(type(m), name, None) for name in ("forward", "_conv_forward")]
    return all(f is None or str(getattr(f, "__module__", "")).startswith("torch.nn.") for f in methods)


def planning_graph(model: nn.Module) -> fx.Graph:
    """The model's graph as :func:`easier_ext.fold` traces it (in eval mode, whatever the
    model's), for planning merges without running it: the ``torch._assert`` calls (rank checks,
    as in timm's ``BatchNormAct2d``) are left out, so that they do not count as readers of the
    tensors they check.

    Args:
        model: any model torch.fx can trace.

    Returns:
        the graph (its call_module targets name submodules of ``model``).

    Raises:
        TraceError: when torch.fx cannot trace the model.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        graph = trace(model.eval(), LayerTracer())
    finally:
        for m, training in modes.items():
            m.training = training
    for node in reversed(graph.nodes):  # users come after: what only an assert read goes too
        dead = not node.users and node.op in ("call_function", "call_method") and not in_place(node, None)
        if (dead and not node.is_impure()) or (node.op == "call_function" and node.target is torch._assert):
            graph.erase_node(node)
    return graph


class FoldGraph:
    """A traced model being folded, and what the passes record about it.

    Attributes:
        gm: the GraphModule, changed in place.
        graph: its graph.
        cost: one of ``FOLD_COSTS``: how chain merges are priced.
        log: what was merged, dropped, computed once or left (becomes ``fold_log``).
        buffers: the buffers the passes registered (those left unused go at the end).
        origins: buffers computed once, by name: the module their values come from.
        warned_chains: the chains already warned about (their nodes), so each warns once.
    """

    def __init__(self, gm: fx.GraphModule, cost: str) -> None:
        self.gm, self.graph, self.cost = gm, gm.graph, cost
        self.log: list[str] = []
        self.buffers: list[str] = []
        self.origins: dict[str, str] = {}
        self.warned_chains: set[tuple[fx.Node, ...]] = set()

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        """The module a call_module node calls; None for other nodes."""
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def set_module(self, target: str, module: nn.Module) -> None:
        """Puts ``module`` at the (dotted) submodule path ``target``, replacing what is there."""
        parent, _, name = target.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, name, module)

    def uses(self, target: str) -> int:
        """How many nodes call the submodule ``target``."""
        return sum(1 for n in self.graph.nodes if n.op == "call_module" and n.target == target)

    def bypass(self, node: fx.Node, replacement: fx.Node) -> None:
        """``node``'s users read ``replacement`` instead, and ``node`` goes."""
        node.replace_all_uses_with(replacement)
        self.graph.erase_node(node)

    def attr(self, node: fx.Node) -> Any:
        """The value a get_attr node reads (its target may be nested: ``stages.3.ls1.gamma``)."""
        return operator.attrgetter(node.target)(self.gm)

    def attr_tensor(self, node: fx.Node) -> Optional[torch.Tensor]:
        """The tensor a get_attr node reads, detached; None for other nodes and other values."""
        if node.op != "get_attr":
            return None
        value = self.attr(node)
        return value.detach() if isinstance(value, torch.Tensor) else None

    def add_buffer(self, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """Registers ``value`` as a new top-level buffer and reads it where it is needed.

        Args:
            name: the buffer's name, made unique by appending ``_``.
            value: its value.
            before: the node the new get_attr node goes before.

        Returns:
            the get_attr node, with its meta.
        """
        while hasattr(self.gm, name):
            name += "_"
        self.gm.register_buffer(name, value)
        self.buffers.append(name)
        with self.graph.inserting_before(before):
            attr = self.graph.get_attr(name)
        attr.meta["tensor_meta"] = _extract_tensor_metadata(value)
        return attr


def meta_shape(node: fx.Node) -> Optional[torch.Size]:
    """The shape of a node's output recorded by shape propagation; None when it has none."""
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def in_place(node: fx.Node, module: Optional[nn.Module]) -> bool:
    """Whether the node may write into its first input.

    Args:
        node: any node.
        module: the module it calls, or None when it calls none.

    Returns:
        whether it may: an ``inplace`` module, a ``x.op_()`` method, an augmented assignment or a
        call given ``inplace=True`` (or ``True`` after its input).
    """
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    in_place_ops = (operator.iadd, operator.isub, operator.imul, operator.itruediv)
    return node.target in in_place_ops or node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:])


def is_layer(m: Optional[nn.Module]) -> bool:
    """Whether ``m`` is a layer fold merges and folds into: a Linear or a conv, not transposed."""
    return isinstance(m, nn.Linear) or (isinstance(m, _ConvNd) and not m.transposed)

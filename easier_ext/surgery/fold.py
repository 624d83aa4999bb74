"""Fold a linearized model into fewer standard torch layers, exactly, where it pays."""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from easier_ext.surgery.tracing import FoldTracer, is_stochastic_depth, trace_model
from easier_ext.surgery.chains import find_chains, own_macs, plan_segments
from easier_ext.surgery.merge import add_convs, compose_convs, compose_linears
from easier_ext.core.modules import EntropyActivation
from easier_ext.surgery.masks import bake_pruning

__all__ = ["FOLD_COSTS", "fold"]

#: What decides whether a merge pays: ``"macs"`` (an estimate, no timing) or ``"latency"``
#: (each candidate timed on the example input's shapes, on its device).
FOLD_COSTS = ("macs", "latency")

_ADD = (operator.add, operator.iadd, torch.add)

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


def fold(model: nn.Module, example_input: Any, *, cost: str = "macs", verify: bool = True, rtol: float = 1e-5) -> fx.GraphModule:
    """Merges the linear layers that linearization left next to each other, exactly.

    The model runs in eval mode, so this is for inference (BatchNorm uses its running
    statistics). The model is traced down to torch.nn layers: other modules are traced through,
    except subclasses of BatchNorm, convs and Linear that keep torch's ``forward`` (they are
    those layers). First:

    - values fixed once the model is are computed once, in eval, into buffers: expressions of
      parameters and buffers only (a weight standardised in ``forward``, ``gamma.view(...)``,
      an attention bias gathered by index). A tensor's rank read in ``forward`` (``x.ndim``,
      ``x.dim()``) is taken from ``example_input``, and asserts that then hold go.
    - functional ``conv1d/2d/3d``, ``linear`` and ``batch_norm`` (running statistics, not
      training) calls with such fixed weights become their torch.nn modules, so a BatchNorm
      subclass whose ``forward`` calls ``F.batch_norm`` (timm's ``BatchNormAct2d``, its
      activation then a separate op) and weight-standardised convs fold like the torch layers.

    Then, repeated until nothing changes:

    - sites: linearized ones are removed (or, with a per-neuron multiplier, folded into the conv
      or linear before or after them); the others become their torch.nn modules. Dropout and
      Identity are removed.
    - BatchNorm folds into the conv or linear before it (its own eps). A warning names the
      BatchNorms left (each with why; also in ``fold_log``).
    - ``layer(x) * s`` and ``layer(x * s)`` with a per-channel buffer or parameter ``s``
      (LayerScale) become one layer.
    - chains of convs (or linears) with nothing between them are cut into runs, each merged into
      one layer, choosing the runs with the least cost (``cost``). Runs whose inner convs pad
      their input are not merged, since that is not exact: :func:`easier_ext.surgery.linearize` moves
      padding to the chain's first conv for that; a warning names the chains left unmerged
      because of it.
    - a conv or linear whose weights are all zero (emptied by pruning) outputs its bias, a constant
      per channel. The constant is carried through the layers after it that keep it one
      (activations, BatchNorm, Dropout, elementwise arithmetic, linears, convs that do not pad);
      where it then meets a residual addition ``x + branch``, the addition adds a buffer holding
      it instead (or goes, when it is zero), and the branch that computed it is dropped. A
      constant that reaches anything else (the output, a padded conv, pooling, ...) stays computed.
    - ``a(x) + x`` and ``a(x) + b(x)`` with aligned convs become one conv (identity on the centre
      tap, or the smaller kernel embedded in the larger).

    Args:
        model: a converted model with linearized sites (any model traceable by torch.fx); layers
            pruned with ``torch.nn.utils.prune`` fold with their masks applied.
        example_input: a tensor (or tuple of args) used for shapes, ``"latency"`` timing and the
            check.
        cost: one of :data:`FOLD_COSTS`.
        verify: run the folded and the original model on ``example_input`` in float64 and raise
            if they differ by more than ``rtol`` (relative to the output's largest magnitude).
        rtol: see ``verify``.

    Returns:
        a ``torch.fx.GraphModule`` of standard torch layers in eval mode (no easier_ext module
        left; ``torch.save`` of it loads without easier_ext), with ``fold_log`` (what was merged,
        dropped, computed once or left).

    Raises:
        ValueError: (``verify``) the model's outputs on ``example_input`` are not all finite, so
            there is nothing to check the folded model against.
        RuntimeError: the model cannot be traced, or (``verify``) the folded model's outputs differ.
    """
    if cost not in FOLD_COSTS:
        raise ValueError(f"unknown fold cost {cost!r}; expected one of {FOLD_COSTS}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    # Before folding: NaN/inf outputs would fail the check below, as if folding had changed them.
    expected = _finite_outputs(model, args) if verify else None
    gm = trace_model(bake_pruning(copy.deepcopy(model)).eval(), _LayerTracer)
    folder = _Folder(gm, args, cost)
    folder.run()
    gm.fold_log = folder.log
    # The tracer class is pickled with a GraphModule; ours would make loading need easier_ext.
    gm._tracer_cls = gm.graph._tracer_cls = None
    if verify:
        _verify(expected, gm, args, rtol)
    return gm


class _LayerTracer(FoldTracer):
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
    """The model's graph as :func:`fold` traces it (in eval mode, whatever the model's), for
    planning merges without running it: the ``torch._assert`` calls (rank checks, as in timm's
    ``BatchNormAct2d``) are left out, so that they do not count as readers of the tensors they
    check.

    Args:
        model: any model torch.fx can trace.

    Returns:
        the graph (its call_module targets name submodules of ``model``).

    Raises:
        Exception: what torch.fx raises when it cannot trace the model.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        graph = _LayerTracer().trace(model.eval())
    finally:
        for m, training in modes.items():
            m.training = training
    for node in reversed(graph.nodes):  # users come after: what only an assert read goes too
        dead = not node.users and node.op in ("call_function", "call_method") and not _in_place(node, None)
        if (dead and not node.is_impure()) or (node.op == "call_function" and node.target is torch._assert):
            graph.erase_node(node)
    return graph


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


class _Folder:
    def __init__(self, gm: fx.GraphModule, args: tuple, cost: str) -> None:
        self.gm, self.graph, self.args, self.cost = gm, gm.graph, args, cost
        self.log: list[str] = []
        self.buffers: list[str] = []  # registered by the passes: the unused ones go at the end
        self.origins: dict[str, str] = {}  # buffers computed once: the module they come from
        self._warned: set = set()

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> None:
        # The one forward: the passes keep node.meta current instead (a folded layer's output keeps
        # its shape, a merged run's first node takes its last's, a new node gets its own).
        self._propagate_shapes()
        self._compute_static()
        self._functional_layers()
        self._replace_sites()
        self._drop_identities()
        passes = (self._fold_batchnorms, self._fold_constants, self._fold_scales, self._merge_chains, self._merge_sums)
        changed = True
        while changed:
            changed = False
            for fold_pass in passes:
                changed |= fold_pass()
        self.graph.eliminate_dead_code()
        self._report_unfolded_batchnorms()
        self.graph.lint()
        self.gm.delete_all_unused_submodules()
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for name in [b for b in self.buffers if b not in used]:
            delattr(self.gm, name)
        self.gm.recompile()

    def _module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _set_module(self, target: str, module: nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, name, module)

    def _uses(self, target: str) -> int:
        return sum(1 for n in self.graph.nodes if n.op == "call_module" and n.target == target)

    def _propagate_shapes(self) -> None:
        self.gm.recompile()
        with torch.no_grad():
            ShapeProp(self.gm).propagate(*self.args)

    def _bypass(self, node: fx.Node, replacement: fx.Node) -> None:
        node.replace_all_uses_with(replacement)
        self.graph.erase_node(node)

    def _attr(self, node: fx.Node) -> Any:
        """The value a get_attr node reads (its target may be nested: ``stages.3.ls1.gamma``)."""
        return operator.attrgetter(node.target)(self.gm)

    def _add_buffer(self, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """Registers ``value`` as a new top-level buffer (named ``name``, made unique) and reads it
        in a get_attr node before ``before``, with its meta."""
        while hasattr(self.gm, name):
            name += "_"
        self.gm.register_buffer(name, value)
        self.buffers.append(name)
        with self.graph.inserting_before(before):
            attr = self.graph.get_attr(name)
        attr.meta["tensor_meta"] = _extract_tensor_metadata(value)
        return attr

    def _compute_static(self) -> None:
        """Computes once what is fixed once the model is (see :func:`fold`): the nodes whose inputs
        are all parameters, buffers or such nodes, and the ranks of tensors. Those read by other
        nodes become buffers (or Python values), the rest go as dead code; ``torch._assert`` calls
        that hold go."""
        written = _written_attributes(self.graph, self._module)
        values: dict[fx.Node, Any] = {}
        sources: dict[fx.Node, tuple[str, ...]] = {}  # the attributes each value is computed from
        for node in list(self.graph.nodes):
            if node.op == "get_attr":
                if node not in written:  # an attribute written in forward is not fixed
                    values[node], sources[node] = self._attr(node), (node.target,)
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
                self.graph.erase_node(node)  # it held
                continue
            values[node] = value
            sources[node] = tuple(dict.fromkeys(s for n in inputs for s in sources[n]))
        for node, value in values.items():
            if node.op == "get_attr" or all(u in values for u in node.users):
                continue
            if isinstance(value, torch.Tensor):
                origin = sources[node][0].replace(".", "_") + "_" if sources[node] else ""
                attr = self._add_buffer(origin + node.name, value.detach().clone(), before=node)
                self.origins[attr.target] = sources[node][0].rpartition(".")[0] if sources[node] else ""
                node.replace_all_uses_with(attr)
                self.log.append(f"{attr.target}: computed once from {', '.join(sources[node])}")
            elif _is_literal(value):
                for user in list(node.users):
                    user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
                    user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
        self.graph.eliminate_dead_code()

    def _functional_layers(self) -> None:
        """Functional conv, linear and batch_norm calls whose weights (and statistics) are fixed
        become their torch.nn modules, which the passes fold."""
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            try:
                made = self._layer_of_call(node)
            except (TypeError, ValueError, RuntimeError):  # a call no module reproduces
                made = None
            if made is None:
                continue
            module, attrs, x = made
            name = self._name_module(node, attrs, module)
            with self.graph.inserting_before(node):
                new = self.graph.call_module(name, (x,))
            new.meta = dict(node.meta)
            self._bypass(node, new)
            for a in attrs:
                if not a.users:
                    self.graph.erase_node(a)

    def _layer_of_call(self, node: fx.Node) -> Optional[tuple[nn.Module, list[fx.Node], fx.Node]]:
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
        if any(not isinstance(n, fx.Node) or n.op != "get_attr" or not isinstance(self._attr(n), torch.Tensor) for n in tensors.values()):
            return None  # computed from the input
        if any(isinstance(v, fx.Node) for k, v in bound.items() if k not in names and k != "input"):
            return None  # a stride, padding, eps... computed in forward
        value = {k: self._attr(n).detach() for k, n in tensors.items()}
        first = names[0]
        if first not in value:
            return None
        w = value[first]
        if target is F.batch_norm:
            rank = len(_meta_shape(bound["input"]) or ())
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

    def _name_module(self, call: fx.Node, attrs: list[fx.Node], module: nn.Module) -> str:
        """Registers a module made from a functional call: under the name of the module its
        tensors come from when nothing but the call reads that module, else as a child of it
        named after the call. Returns its name."""
        owner = self.origins.get(attrs[0].target, attrs[0].target.rpartition(".")[0])
        gone = {call} | {a for a in attrs if set(a.users) == {call}}
        read = any(
            n.op in ("get_attr", "call_module") and n not in gone and (n.target == owner or n.target.startswith(owner + "."))
            for n in self.graph.nodes
        )
        if owner and not read:
            self._set_module(owner, module)
            return owner
        parent = self.gm.get_submodule(owner) if owner else self.gm
        name = call.target.__name__
        while hasattr(parent, name):
            name += "_"
        parent.add_module(name, module)
        return f"{owner}.{name}" if owner else name

    # -- passes ----------------------------------------------------------------------------
    def _replace_sites(self) -> None:
        for node in list(self.graph.nodes):
            m = self._module(node)
            if not isinstance(m, EntropyActivation):
                continue
            if not m.linearized:  # a new module is in training mode: this one's is the model's
                self._set_module(node.target, m.to_torch().train(m.training))
            elif m.linear_scale is None:
                self._bypass(node, node.args[0])
            else:
                self._replace_with_mul(node, m)

    def _replace_with_mul(self, node: fx.Node, m: EntropyActivation) -> None:
        """A per-neuron multiplier as ``x * buffer``, the buffer shaped to broadcast."""
        dims = len(node.args[0].meta["tensor_meta"].shape)
        shape = [1] * dims
        shape[m.channel_dim % dims] = -1
        buf = self._add_buffer(node.target.replace(".", "_") + "_scale", m.linear_scale.detach().reshape(shape).clone(), before=node)
        with self.graph.inserting_before(node):
            mul = self.graph.call_function(operator.mul, (node.args[0], buf))
        mul.meta = dict(node.meta)
        self._bypass(node, mul)
        self.log.append(f"{node.target}: per-neuron multiplier")

    def _drop_identities(self) -> None:
        for node in list(self.graph.nodes):
            if isinstance(self._module(node), (nn.Dropout, nn.Identity)) and node.args:
                self._bypass(node, node.args[0])

    def _fold_batchnorms(self) -> bool:
        changed = False
        for node in list(self.graph.nodes):
            bn = self._module(node)
            if not isinstance(bn, _BatchNorm):
                continue
            prev, layer = node.args[0], self._batchnorm_layer(node, bn)
            if isinstance(layer, str):
                continue
            self._set_module(prev.target, _fuse_batchnorm(layer, bn))
            self._bypass(node, prev)
            self.log.append(f"{node.target} folded into {prev.target}")
            changed = True
        return changed

    def _batchnorm_layer(self, node: fx.Node, bn: _BatchNorm) -> Any:
        """The conv or linear a BatchNorm node folds into, or why it does not (a str)."""
        if not bn.track_running_stats:
            return "it has no running statistics (it normalizes each batch by its own)"
        prev = node.args[0] if node.args else None
        layer = self._module(prev) if isinstance(prev, fx.Node) else None
        if isinstance(layer, _ConvNd) and layer.transposed:
            return f"its input comes from {prev.target}, a transposed conv, which fold does not fold into"
        if not _is_layer(layer):
            return f"its input comes from {_describe(prev, layer)}, not from a conv or linear"
        if self._uses(prev.target) != 1:
            return f"{prev.target} is called at several places"
        others = [u for u in prev.users if u is not node and not _reads_metadata(u, prev)]  # shapes do not change
        if others:
            return f"{prev.target}'s output is also read by {', '.join(u.name for u in others)}"
        if isinstance(layer, nn.Linear) and not _channel_dim_is_last(prev):
            return f"it normalizes dim 1 of {prev.target}'s output, whose features are the last dim"
        return layer

    def _report_unfolded_batchnorms(self) -> None:
        """Says which BatchNorms are left and why: in the log, and in one warning."""
        reasons: dict[str, list[str]] = {}
        for node in self.graph.nodes:
            bn = self._module(node)
            if isinstance(bn, _BatchNorm):
                why, name = self._batchnorm_layer(node, bn), node.target
            elif node.op == "call_function" and node.target is F.batch_norm:
                why = "a functional batch_norm with batch statistics, or with weights computed in forward"
                attrs = [n.target for n in node.all_input_nodes if n.op == "get_attr"]
                name = f"{node.name} (of {attrs[0].rpartition('.')[0] or attrs[0]})" if attrs else node.name
            else:
                continue
            if isinstance(why, str):
                reasons.setdefault(why, []).append(name)
                self.log.append(f"{name} left unfolded: {why}")
        if reasons:
            count = sum(len(names) for names in reasons.values())
            lines = [f"{', '.join(names[:6])}{f' and {len(names) - 6} more' if len(names) > 6 else ''}: {why}" for why, names in reasons.items()]
            warnings.warn(f"fold left {count} BatchNorm layer(s) unfolded (they stay, exact; all named in fold_log):\n  " + "\n  ".join(lines), stacklevel=4)

    def _fold_constants(self) -> bool:
        """Residual branches made constant by an emptied layer become the constant they add.

        A conv or linear whose weights are all zero outputs its bias (or zeros) at every position.
        That constant is carried through the nodes after it that keep it a constant of a shape
        broadcasting to theirs (see :meth:`_carried_constant`). An addition of such a constant to
        a tensor of the addition's own shape adds a new buffer instead (or is bypassed when the
        constant is zero), and the branch that computed the constant is dropped as dead code.
        Only constants coming from an emptied layer are replaced, so a second call finds nothing
        more to do unless another layer was emptied since.

        Returns:
            whether the graph changed.
        """
        constants: dict[fx.Node, _Constant] = {}
        changed = False
        for node in list(self.graph.nodes):
            found = self._emptied_layer_output(node) or self._carried_constant(node, constants)
            if found is not None:
                constants[node] = found
            elif self._add_constant(node, constants):
                changed = True
        if changed:
            self.graph.eliminate_dead_code()
        return changed

    def _emptied_layer_output(self, node: fx.Node) -> Optional[_Constant]:
        """The output of a conv or linear whose weights are all zero: its bias, broadcast.

        Args:
            node: any node.

        Returns:
            the constant, in float64 (shaped like the node's output with 1 on every dim but the
            channels'), or None when ``node`` is not such a layer.
        """
        layer = self._module(node)
        shape = _meta_shape(node)
        if not _is_layer(layer) or shape is None or len(shape) == 0 or layer.weight.any():
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

    def _carried_constant(self, node: fx.Node, constants: dict[fx.Node, _Constant]) -> Optional[_Constant]:
        """The node's output when it is a constant because its inputs are.

        Carried through: elementwise modules, functions and methods (torchvision's
        ``stochastic_depth`` outside training among them); BatchNorm with running statistics;
        LayerNorm over dims the constant spans; linears; convs that do not pad (at every position
        they see the same window of a constant). Each is run on the constant itself, expanded
        along the dims it mixes, so the value is computed by torch's own code.

        Args:
            node: any node.
            constants: the constants found so far, by node.

        Returns:
            the constant (float64, broadcasting to the node's output shape), or None when one of
            its inputs is not a constant, an attribute or a Python value, or its op may not keep
            a constant a constant.
        """
        inputs = node.all_input_nodes
        if not any(n in constants for n in inputs) or not all(n in constants or self._attr_tensor(n) is not None for n in inputs):
            return None
        shape = _meta_shape(node)
        op = self._constant_op(node)
        if shape is None or op is None:
            return None
        if _in_place(node, self._module(node)) and len(inputs[0].users) != 1:
            # what it writes into would be seen by the other users, and it may be dropped
            return None

        def value(n: fx.Node) -> torch.Tensor:
            t = constants[n].value if n in constants else self._attr_tensor(n)
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

    def _constant_op(self, node: fx.Node) -> Optional[Callable[..., torch.Tensor]]:
        """What computes ``node`` from constant inputs (float64) without changing its result,
        or None when the node's op may not keep a constant a constant."""
        if node.op == "call_function":
            return node.target if node.target in _ELEMENTWISE_FUNCTIONS or _is_stochastic_depth_in_eval(node) else None
        if node.op == "call_method":
            return (lambda x, *a, **k: getattr(x, node.target)(*a, **k)) if node.target in _ELEMENTWISE_METHODS else None
        m = self._module(node)
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

    def _attr_tensor(self, node: fx.Node) -> Optional[torch.Tensor]:
        if node.op != "get_attr":
            return None
        value = self._attr(node)
        return value.detach() if isinstance(value, torch.Tensor) else None

    def _add_constant(self, node: fx.Node, constants: dict[fx.Node, _Constant]) -> bool:
        """``x + constant`` (an addition, the constant from an emptied layer, x of the sum's shape)
        adds a buffer holding the constant, or is bypassed when the constant is zero.

        Args:
            node: any node.
            constants: the constants found so far, by node.

        Returns:
            whether the graph changed.
        """
        if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2 or node.kwargs:
            return False
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or (a in constants) == (b in constants):
            return False
        const, other = (a, b) if a in constants else (b, a)
        shape = _meta_shape(node)
        if shape is None or _meta_shape(other) != shape:
            return False
        writes_constant = node.target is operator.iadd and const is a
        if writes_constant and len(const.users) != 1:
            return False  # the others would see it hold the sum: it stays computed
        constant = constants[const]
        what = f"{', '.join(constant.sources)} {'is' if len(constant.sources) == 1 else 'are'} empty: its branch"
        if not constant.value.any() and self._may_return_instead(other, node):
            self._bypass(node, other)
            self.log.append(f"{what} was zero, so {node.name} went")
            return True
        value = constant.value.reshape([1] * (len(shape) - constant.value.dim()) + list(constant.value.shape))
        buffer = self._add_buffer(node.name + "_constant", value.to(node.meta["tensor_meta"].dtype), before=node)
        with self.graph.inserting_before(node):
            if writes_constant:  # a buffer must not be written into, nor grow to the sum's shape
                new = self.graph.call_function(operator.add, (other, buffer))
                new.meta = dict(node.meta)
                self._bypass(node, new)
            else:
                node.replace_input_with(const, buffer)
        self.log.append(f"{what} became a constant added at {node.name}")
        return True

    def _may_return_instead(self, other: fx.Node, node: fx.Node) -> bool:
        """Whether ``node``'s users may get ``other`` itself: an in-place op after them may write
        into it, so nothing may read it later, and it must not be an input or attribute."""
        if other.op in ("placeholder", "get_attr"):
            return False
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return all(order[u] < order[node] for u in other.users if u is not node)

    def _fold_scales(self) -> bool:
        """``layer(x) * s`` and ``layer(x * s)`` with a per-channel constant s (a buffer or a
        parameter: a LayerScale's gamma) become one layer."""
        changed = False
        for node in list(self.graph.nodes):
            found = self._constant_scale(node)
            if found is None:
                continue
            source, scale = found
            before = self._module(source)
            in_place = _in_place(node, None)
            per_channel = self._channelwise(node, scale, before, out=True) if _is_layer(before) else None
            if per_channel is not None and all(u is node or _reads_metadata(u, source) for u in source.users) and self._uses(source.target) == 1:
                self._set_module(source.target, _scale_outputs(before, per_channel))
                self._bypass(node, source)
                changed = True
                continue
            if len(node.users) == 1 and not (in_place and len(source.users) != 1):  # others would see x * s
                (user,) = node.users
                after = self._module(user)
                per_channel = self._channelwise(node, scale, after, out=False) if _is_layer(after) else None
                if per_channel is not None and self._uses(user.target) == 1:
                    self._set_module(user.target, _scale_inputs(after, per_channel))
                    self._bypass(node, source)
                    changed = True
        return changed

    def _constant_scale(self, node: fx.Node) -> Optional[tuple[fx.Node, torch.Tensor]]:
        """``(x, s)`` for ``x * s``, ``s * x``, ``x.mul(s)`` or ``x *= s`` with s an attribute."""
        if node.op == "call_function" and node.target in (operator.mul, torch.mul, operator.imul):
            pass
        elif node.op != "call_method" or node.target not in ("mul", "mul_"):
            return None
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            return None
        x, s = node.args
        if s.op != "get_attr" and not _in_place(node, None):
            x, s = s, x
        if s.op != "get_attr" or x.op == "get_attr":
            return None
        value = self._attr_tensor(s)
        return (x, value) if value is not None and value.is_floating_point() else None

    def _channelwise(self, node: fx.Node, scale: torch.Tensor, layer: nn.Module, out: bool) -> Optional[torch.Tensor]:
        """The scale as one factor per channel of ``layer``'s output (``out``) or input, when it
        broadcasts to ``node``'s output along that dim only; else None."""
        shape = _meta_shape(node)
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

    def _merge_chains(self) -> bool:
        changed = False
        for chain in find_chains(self.graph, self.gm, lambda n: False):
            segment_cost = self._timed_cost(chain) if self.cost == "latency" else None
            segments, _, _ = plan_segments(chain.layers, segment_cost=segment_cost)
            # Whether padding kept a merge from paying is told by the MACs model: a run that is not
            # exact cannot be built, so cannot be timed.
            _, exact, _ = plan_segments(chain.layers)
            _, loose, _ = plan_segments(chain.layers, exact_only=False)
            if loose < exact and tuple(chain.nodes) not in self._warned:
                self._warned.add(tuple(chain.nodes))
                warnings.warn(
                    f"not merging {' -> '.join(n.target for n in chain.nodes)}: it would pay, but its inner convs pad their "
                    "input, so merging would change the outputs at the borders; linearize with prepare_fold=True (or call "
                    "easier_ext.move_padding) before finetuning to make it exact",
                    stacklevel=4,
                )
            for start, stop in segments:
                if stop - start < 2:
                    continue
                nodes, layers = chain.nodes[start:stop], chain.layers[start:stop]
                merged = compose_linears(layers) if isinstance(layers[0], nn.Linear) else compose_convs(layers)
                self._set_module(nodes[0].target, merged)
                self._bypass_chain(nodes)
                self.log.append(f"merged {' -> '.join(n.target for n in nodes)} into {nodes[0].target}")
                changed = True
        return changed

    def _bypass_chain(self, nodes: Sequence[fx.Node]) -> None:
        """nodes[0] now computes the whole run: the rest go, the run's users read nodes[0]."""
        nodes[0].meta = dict(nodes[-1].meta)
        nodes[-1].replace_all_uses_with(nodes[0])
        for n in reversed(nodes[1:]):
            self.graph.erase_node(n)

    def _timed_cost(self, chain) -> Any:
        shapes = {id(layer): node.args[0].meta["tensor_meta"].shape for node, layer in zip(chain.nodes, chain.layers)}
        device = next(chain.layers[0].parameters()).device

        def seconds(layers) -> float:
            # Imported here: torch.utils.benchmark imports cpp_extension, which warns on import without CUDA.
            from torch.utils.benchmark import Timer

            module = layers[0] if len(layers) == 1 else (compose_linears(layers) if isinstance(layers[0], nn.Linear) else compose_convs(layers))
            x = torch.randn(shapes[id(layers[0])], device=device)
            with torch.no_grad():
                return Timer("m(x)", globals={"m": module, "x": x}).blocked_autorange(min_run_time=0.05).median

        return seconds

    def _merge_sums(self) -> bool:
        changed = False
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2 or node.kwargs:
                continue
            a, b = node.args
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            merged = self._sum_of_convs(a, b) or self._sum_of_convs(b, a)
            if merged is None:
                continue
            conv_node, other, module = merged
            self._set_module(conv_node.target, module)
            if other.op == "call_module" and other is not conv_node.args[0]:
                other.replace_all_uses_with(conv_node)  # the other conv's only user is this sum
                self.graph.erase_node(other)
            self._bypass(node, conv_node)
            self.log.append(f"folded the sum {node.name} into {conv_node.target}")
            changed = True
        return changed

    def _sum_of_convs(self, a: fx.Node, b: fx.Node):
        """(conv node, other node, merged conv) when ``a + b`` is one conv of a's input."""
        conv = self._module(a)
        if not isinstance(conv, _ConvNd) or conv.transposed or len(a.users) != 1 or self._uses(a.target) != 1:
            return None
        x = a.args[0]
        other = None if b is x else self._module(b)
        if other is not None:
            if not isinstance(other, _ConvNd) or b.args[0] is not x or len(b.users) != 1 or self._uses(b.target) != 1:
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


@dataclass(frozen=True)
class _Constant:
    """A node's output that is the same for every input: ``value`` (float64) broadcasts to it."""

    value: torch.Tensor
    sources: tuple[str, ...]  # the emptied layers it comes from


def _meta_shape(node: fx.Node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


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


def _in_place(node: fx.Node, module: Optional[nn.Module]) -> bool:
    """Whether the node may write into its first input."""
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    in_place_ops = (operator.iadd, operator.isub, operator.imul, operator.itruediv)
    return node.target in in_place_ops or node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:])


def _rank_read(node: fx.Node) -> Optional[int]:
    """The rank of a tensor that ``x.ndim`` or ``x.dim()`` reads, from the node's meta."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "ndim":
        x = node.args[0]
    elif node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1 and not node.kwargs:
        x = node.args[0]
    else:
        return None
    shape = _meta_shape(x) if isinstance(x, fx.Node) else None
    return None if shape is None else len(shape)


def _reads_metadata(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads only ``node``'s shape, rank, dtype or device (which folding keeps)."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in ("shape", "ndim", "dtype", "device")
    if user.op == "call_method" and user.target in ("size", "dim", "ndimension"):
        return user.args[0] is node and node not in user.args[1:] and not user.kwargs
    return False


def _is_static_op(node: fx.Node) -> bool:
    """Whether a call gives the same result on the same inputs, changing none of them (so it may
    be computed once, ahead of time)."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is F.batch_norm:  # in training, it updates the running statistics it is given
        bound = _bind(node, _BATCH_NORM_PARAMS, _BATCH_NORM_DEFAULTS)
        return bound is not None and (bound["training"] is False or (bound["running_mean"] is None and bound["running_var"] is None))
    name = (node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))).lower()
    return not (_in_place(node, None) or name in _RANDOM_OPS or any(part in name for part in _NOT_STATIC_PARTS))


def _written_attributes(graph: fx.Graph, module_of: Callable[[fx.Node], Optional[nn.Module]]) -> set[fx.Node]:
    """The get_attr nodes whose tensors an in-place op writes into, directly or through views:
    their values are not fixed."""
    written = set()
    for node in graph.nodes:
        if node.op == "placeholder" or not node.args or not _in_place(node, module_of(node)):
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


def _is_layer(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, _ConvNd) and not m.transposed)


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
        new.weight.mul_(s.to(new.weight).reshape(-1, *[1] * (new.weight.dim() - 1)))
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


def _run_float64(m: nn.Module, args: tuple) -> torch.Tensor:
    """A copy of ``m`` in eval mode and float64 on ``args``: its outputs, flattened into one tensor."""
    m = copy.deepcopy(m).eval().double()
    with torch.no_grad():
        out = m(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    tensors = _tensors(out)
    return torch.cat([t.flatten() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def _finite_outputs(model: nn.Module, args: tuple) -> torch.Tensor:
    """The model's outputs that :func:`_verify` compares against, refused when any is NaN or inf."""
    expected = _run_float64(model, args)
    bad = int((~torch.isfinite(expected)).sum().item()) if expected.is_floating_point() else 0
    if bad:
        raise ValueError(
            f"the model's outputs are not finite on the example input ({bad} of {expected.numel()} values are "
            "NaN/inf); fold checks its result against them, so it needs a model whose outputs are finite: check "
            "the model's weights and the example input, or pass verify=False to fold without the check"
        )
    return expected


def _verify(flat_e: torch.Tensor, folded: fx.GraphModule, args: tuple, rtol: float) -> None:
    flat_a = _run_float64(folded, args)
    err = (flat_a - flat_e).abs().max().item() if flat_e.numel() else 0.0
    scale = max(flat_e.abs().max().item() if flat_e.numel() else 0.0, 1e-30)
    if not err <= rtol * scale:
        raise RuntimeError(f"folding changed the outputs (max error {err:.3g}, {err / scale:.3g} of the output's scale); this is a bug, please report it")


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []

"""Fold a linearized model into fewer standard torch layers, exactly, where it pays."""

from __future__ import annotations

import copy
import functools
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from easier_ext._tracing import is_stochastic_depth, trace_model
from easier_ext.chains import find_chains, own_macs, plan_segments
from easier_ext.merge import add_convs, compose_convs, compose_linears
from easier_ext.modules import EntropyActivation
from easier_ext.pruning import bake_pruning

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


def fold(model: nn.Module, example_input: Any, *, cost: str = "macs", verify: bool = True, rtol: float = 1e-5) -> fx.GraphModule:
    """Merges the linear layers that linearization left next to each other, exactly.

    The model runs in eval mode, so this is for inference (BatchNorm uses its running
    statistics). Steps, repeated until nothing changes:

    - sites: linearized ones are removed (or, with a per-neuron multiplier, folded into the conv
      or linear before or after them); the others become their torch.nn modules. Dropout and
      Identity are removed.
    - BatchNorm folds into the conv or linear before it (its own eps).
    - chains of convs (or linears) with nothing between them are cut into runs, each merged into
      one layer, choosing the runs with the least cost (``cost``). Runs whose inner convs pad
      their input are not merged, since that is not exact: :func:`easier_ext.linearize` moves
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
        left; ``torch.save`` of it loads without easier_ext), with ``fold_log`` (what was merged
        or dropped).

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
    gm = trace_model(bake_pruning(copy.deepcopy(model)).eval())
    folder = _Folder(gm, args, cost)
    folder.run()
    gm.fold_log = folder.log
    # The tracer class is pickled with a GraphModule; ours would make loading need easier_ext.
    gm._tracer_cls = gm.graph._tracer_cls = None
    if verify:
        _verify(expected, gm, args, rtol)
    return gm


class _Folder:
    def __init__(self, gm: fx.GraphModule, args: tuple, cost: str) -> None:
        self.gm, self.graph, self.args, self.cost = gm, gm.graph, args, cost
        self.log: list[str] = []
        self.buffers: list[str] = []  # registered by the passes: the unused ones go at the end
        self._warned: set = set()

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> None:
        self._replace_sites()
        self._drop_identities()
        passes = (self._fold_batchnorms, self._fold_constants, self._fold_scales, self._merge_chains, self._merge_sums)
        changed = True
        while changed:
            changed = False
            for fold_pass in passes:  # shapes are read by the passes: refresh them after each
                self._propagate_shapes()
                changed |= fold_pass()
        self.graph.eliminate_dead_code()
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
        self._propagate_shapes()
        dims = len(node.args[0].meta["tensor_meta"].shape)
        shape = [1] * dims
        shape[m.channel_dim % dims] = -1
        name = node.target.replace(".", "_") + "_scale"
        self.gm.register_buffer(name, m.linear_scale.detach().reshape(shape).clone())
        self.buffers.append(name)
        with self.graph.inserting_before(node):
            buf = self.graph.get_attr(name)
            mul = self.graph.call_function(operator.mul, (node.args[0], buf))
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
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
                continue
            prev = node.args[0]
            if not isinstance(prev, fx.Node) or len(prev.users) != 1 or prev.op != "call_module" or self._uses(prev.target) != 1:
                continue
            layer = self._module(prev)
            if isinstance(layer, _ConvNd) and not layer.transposed:
                fused = fuse_conv_bn_eval(layer, bn)
            elif isinstance(layer, nn.Linear) and _channel_dim_is_last(prev):
                fused = fuse_linear_bn_eval(layer, bn)
            else:
                continue
            self._set_module(prev.target, fused)
            self._bypass(node, prev)
            self.log.append(f"{node.target} folded into {prev.target}")
            changed = True
        return changed

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
        value = functools.reduce(getattr, node.target.split("."), self.gm)
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
        name = node.name + "_constant"
        while hasattr(self.gm, name):
            name += "_"
        value = constant.value.reshape([1] * (len(shape) - constant.value.dim()) + list(constant.value.shape))
        self.gm.register_buffer(name, value.to(node.meta["tensor_meta"].dtype))
        self.buffers.append(name)
        with self.graph.inserting_before(node):
            buffer = self.graph.get_attr(name)
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
        """``layer(x) * s`` and ``layer(x * s)`` with a per-channel constant s become one layer."""
        changed = False
        for node in list(self.graph.nodes):
            scale = self._constant_scale(node)
            if scale is None:
                continue
            source = node.args[0]
            before = self._module(source)
            if _is_layer(before) and len(source.users) == 1 and self._uses(source.target) == 1 and self._scale_is_channelwise(node, scale, before, out=True):
                self._set_module(source.target, _scale_outputs(before, scale.flatten()))
                self._bypass(node, source)
                changed = True
                continue
            if len(node.users) == 1:
                (user,) = node.users
                after = self._module(user)
                if _is_layer(after) and self._uses(user.target) == 1 and self._scale_is_channelwise(node, scale, after, out=False):
                    self._set_module(user.target, _scale_inputs(after, scale.flatten()))
                    self._bypass(node, source)
                    changed = True
        return changed

    def _constant_scale(self, node: fx.Node) -> Optional[torch.Tensor]:
        if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
            return None
        x, s = node.args
        if not (isinstance(x, fx.Node) and isinstance(s, fx.Node) and s.op == "get_attr"):
            return None
        return getattr(self.gm, s.target)

    def _scale_is_channelwise(self, node: fx.Node, scale: torch.Tensor, layer: nn.Module, out: bool) -> bool:
        dims = len(node.meta["tensor_meta"].shape)
        channels = (layer.out_features if out else layer.in_features) if isinstance(layer, nn.Linear) else (layer.out_channels if out else layer.in_channels)
        want = [1] * dims
        want[-1 if isinstance(layer, nn.Linear) else 1] = channels
        return list(scale.shape) == want

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


def _is_layer(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, _ConvNd) and not m.transposed)


def _channel_dim_is_last(node: fx.Node) -> bool:
    """BatchNorm1d normalizes dim 1; a Linear's features are the last dim: same only for 2-d."""
    meta = node.meta.get("tensor_meta")
    return meta is not None and len(meta.shape) == 2


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

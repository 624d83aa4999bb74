"""Fold a linearized model into fewer standard torch layers, exactly, where it pays."""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.utils.benchmark import Timer

from easier_ext._tracing import trace_model
from easier_ext.chains import find_chains, own_macs, plan_segments
from easier_ext.merge import add_convs, compose_convs, compose_linears
from easier_ext.modules import EntropyActivation
from easier_ext.pruning import bake_pruning

__all__ = ["FOLD_COSTS", "fold"]

#: What decides whether a merge pays: ``"macs"`` (an estimate, no timing) or ``"latency"``
#: (each candidate timed on the example input's shapes, on its device).
FOLD_COSTS = ("macs", "latency")

_ADD = (operator.add, operator.iadd, torch.add)


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
        left; ``torch.save`` of it loads without easier_ext), with ``fold_log`` (what was merged).

    Raises:
        RuntimeError: the model cannot be traced, or (``verify``) the folded model's outputs differ.
    """
    if cost not in FOLD_COSTS:
        raise ValueError(f"unknown fold cost {cost!r}; expected one of {FOLD_COSTS}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    original = copy.deepcopy(model).eval()
    gm = trace_model(bake_pruning(copy.deepcopy(model)).eval())
    folder = _Folder(gm, args, cost)
    folder.run()
    gm.fold_log = folder.log
    # The tracer class is pickled with a GraphModule; ours would make loading need easier_ext.
    gm._tracer_cls = gm.graph._tracer_cls = None
    if verify:
        _verify(original, gm, args, rtol)
    return gm


class _Folder:
    def __init__(self, gm: fx.GraphModule, args: tuple, cost: str) -> None:
        self.gm, self.graph, self.args, self.cost = gm, gm.graph, args, cost
        self.log: list[str] = []
        self.scale_buffers: list[str] = []
        self._warned: set = set()

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> None:
        self._replace_sites()
        self._drop_identities()
        passes = (self._fold_batchnorms, self._fold_scales, self._merge_chains, self._merge_sums)
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
        for name in [b for b in self.scale_buffers if b not in used]:
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
            if not m.linearized:
                self._set_module(node.target, m.to_torch())
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
        self.scale_buffers.append(name)
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


def _verify(original: nn.Module, folded: fx.GraphModule, args: tuple, rtol: float) -> None:
    def run(m: nn.Module):
        m = copy.deepcopy(m).double()
        with torch.no_grad():
            return m(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])

    expected, actual = run(original), run(folded)
    flat_e = torch.cat([t.flatten() for t in _tensors(expected)])
    flat_a = torch.cat([t.flatten() for t in _tensors(actual)])
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

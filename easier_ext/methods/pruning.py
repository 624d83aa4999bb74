"""NEPENTHE's pruning: which layers feed each site, each site's irrelevance, the split of a pruning
budget among sites, and magnitude pruning whose masks persist (``torch.nn.utils.prune``)."""

from __future__ import annotations

import math
import operator
from typing import Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from easier_ext.surgery.tracing import is_stochastic_depth, trace_model
from easier_ext.core.modules import EntropyActivation
from easier_ext.surgery.masks import DetachMaskedWeight, bake_pruning

__all__ = [
    "ALLOCATIONS",
    "PRUNABLE",
    "Paths",
    "bake_pruning",
    "bypassed_sites",
    "feeding_layers",
    "guarded_capacity",
    "irrelevance",
    "prune_magnitude",
    "sparsity",
    "split_budget",
    "weight",
]

#: How NEPENTHE shares an iteration's pruning among sites. ``"reference"``: as the reference code
#: does, capped only at empty, so a layer on the only path through the network may be emptied and
#: the output made constant. ``"guarded"``: the same softmax split, but only the layers of
#: bypassed sites (see :func:`bypassed_sites`) may be emptied; any other site loses at most a
#: fraction of its remaining weights per iteration and every output neuron keeps its largest one.
ALLOCATIONS = ("guarded", "reference")

#: layers whose weights NEPENTHE prunes (those that feed a site)
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def feeding_layers(model: nn.Module) -> dict[str, list[str]]:
    """The conv/linear layers whose outputs reach each site with no other layer or site between.

    Walks back from each site through everything that is not a layer (normalization, pooling,
    residual additions, reshapes, dropout) until it meets a conv/linear layer, a site, another
    module with weights or a functional conv/linear/matmul (not taken: NEPENTHE prunes conv and
    linear modules only), or the model's input. Of the layers met, those on the longest path
    feed the site: after a residual sum that is the branch's last conv, not the shortcut's
    projection (a ResNet block's second site is fed by its second conv, not by its downsample
    conv, whose pruning would cut the block's skip path). A layer feeding several sites is given
    to the first in execution order, so every layer belongs to one site at most.

    Args:
        model: a converted model (see :func:`easier_ext.convert`), traceable by torch.fx.

    Returns:
        ``{site name: [layer qualified names]}`` in execution order, every site present (an empty
        list where no layer feeds it).

    Raises:
        RuntimeError: the model cannot be traced.
    """
    gm = trace_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    depth = _layer_depths(gm)
    taken: set[str] = set()
    found: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(m, EntropyActivation):
            feeders = _feeders(gm, node)
            deepest = max((depth[n] for n in feeders), default=0)
            feeders = sorted((n for n in feeders if depth[n] == deepest), key=order.__getitem__)
            layers = [names[id(gm.get_submodule(n.target))] for n in feeders]
            found[names[id(m)]] = [n for n in layers if n not in taken]
            taken.update(layers)
    return found


# normalization layers have weights but only rescale: the walk looks through them
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
# what maps a per-channel constant to a per-channel constant (see Paths.collapses)
_ADD = {operator.add, operator.iadd, torch.add}
_ELEMENTWISE = _ADD | {
    operator.mul, operator.imul, operator.sub, operator.truediv, operator.neg, torch.mul, torch.sub, torch.relu, F.relu, F.relu6,
    F.leaky_relu, F.gelu, F.silu, F.hardtanh, torch.sigmoid, torch.tanh, F.hardswish, F.elu, F.mish,
}
_CHANNELWISE_MODULES = (
    nn.modules.batchnorm._BatchNorm, EntropyActivation, nn.Dropout, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU,
    nn.GELU, nn.SiLU, nn.Hardtanh, nn.Hardswish, nn.ELU, nn.Mish, nn.Sigmoid, nn.Tanh,
)
# functional layers: their weights are not a module's, so the walk stops there without taking them
_FUNCTIONAL_LAYERS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.bilinear, torch.matmul, torch.bmm, torch.mm, operator.matmul}


def _layer_depths(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """For every node, the most conv/linear layers on a path from the input to it (included)."""
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:  # fx graphs are in topological order
        is_layer = node.op == "call_module" and isinstance(gm.get_submodule(node.target), PRUNABLE)
        depth[node] = max((depth[n] for n in node.all_input_nodes), default=0) + int(is_layer)
    return depth


def _feeders(gm: fx.GraphModule, site: fx.Node) -> set[fx.Node]:
    found, seen, stack = set(), set(), list(site.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, PRUNABLE):
                found.add(node)
                continue
            if isinstance(m, EntropyActivation) or (not isinstance(m, _NORMS) and any(True for _ in m.parameters())):
                continue  # another site, or a layer we do not prune (attention, transposed conv)
        if node.op in ("placeholder", "get_attr") or (node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS):
            continue
        stack.extend(node.all_input_nodes)
    return found


class Paths:
    """Which layers the model's output needs: a model's torch.fx graph, asked whether the output
    still depends on the input once some conv/linear layers are emptied (their output is then a
    constant), and whether emptying a site's layers turns its whole branch into a constant.

    Args:
        model: a converted model, traceable by torch.fx. Layers whose weights are all zero now
            count as emptied in every question.

    Raises:
        RuntimeError: the model cannot be traced.
    """

    def __init__(self, model: nn.Module) -> None:
        self.gm = trace_model(model)
        names = {id(m): n for n, m in model.named_modules()}
        self._nodes: dict[str, list[fx.Node]] = {}
        self._empty: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            m = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(m, PRUNABLE):
                self._nodes.setdefault(names[id(m)], []).append(node)
                if not bool(weight(m).any()):
                    self._empty.add(node)

    def _cut(self, layers) -> set[fx.Node]:
        return self._empty | {node for name in layers for node in self._nodes.get(name, ())}

    def input_dependent(self, emptied: Sequence[str] = ()) -> set[fx.Node]:
        """The nodes whose value depends on the model's input once ``emptied`` layers are empty."""
        cut, reached = self._cut(emptied), set()
        for node in self.gm.graph.nodes:  # topological order
            if node.op == "placeholder" or (node not in cut and any(n in reached for n in node.all_input_nodes)):
                reached.add(node)
        return reached

    def connected(self, emptied: Sequence[str] = ()) -> bool:
        """Whether the output still depends on the input with the ``emptied`` layers empty."""
        output = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        return output in self.input_dependent(emptied)

    def collapses(self, layers: Sequence[str]) -> bool:
        """Whether emptying ``layers`` makes their branch a constant that a residual sum adds to
        an input-dependent value: then nothing else reads the branch and fold removes it whole.

        The constant is followed through what keeps a per-channel constant one (normalizations
        in eval mode, sites and activations, dropout, linears and convs that do not pad, and
        elementwise functions); a padded conv, a pooling or a reshape stops it.
        """
        if not layers or not self.connected(layers):
            return False
        start = {node for name in layers for node in self._nodes.get(name, ())}
        dependent = self.input_dependent(layers)
        constant: set[fx.Node] = set(start)
        for node in self.gm.graph.nodes:
            if node in constant or not any(n in constant for n in node.all_input_nodes):
                continue
            others = [n for n in node.all_input_nodes if n not in constant and n.op != "get_attr"]
            if node.op == "call_function" and node.target in _ADD and len(others) == 1 and others[0] in dependent:
                if all(u in constant or u is node for u in self._readers(constant)):
                    return True
            if not others and self._keeps_constant(node):
                constant.add(node)
        return False

    def unused(self) -> set[str]:
        """The modules (qualified names) whose outputs the model's output does not need: every
        path from them to the output goes through an emptied layer, which ignores its input."""
        needed = {n for n in self.gm.graph.nodes if n.op == "output"}
        for node in reversed(self.gm.graph.nodes):
            if node in needed and node not in self._empty:
                needed.update(node.all_input_nodes)
        return {n.target for n in self.gm.graph.nodes if n.op == "call_module"} - {n.target for n in needed if n.op == "call_module"}

    def _readers(self, constant: set[fx.Node]) -> set[fx.Node]:
        return {u for n in constant for u in n.users}

    def _keeps_constant(self, node: fx.Node) -> bool:
        if node.op == "call_function":  # stochastic depth: the identity in eval, where fold runs
            return node.target in _ELEMENTWISE or is_stochastic_depth(node)
        if node.op != "call_module":
            return False
        m = self.gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            return True
        if isinstance(m, nn.modules.conv._ConvNd):
            return not m.transposed and m.padding_mode == "zeros" and isinstance(m.padding, tuple) and not any(m.padding)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # batch statistics would not keep it a constant
            return m.track_running_stats
        return isinstance(m, _CHANNELWISE_MODULES)


def bypassed_sites(model: nn.Module, feeds: Mapping[str, Sequence[str]] | None = None, *, paths: Paths | None = None) -> dict[str, bool]:
    """Which sites' feeding layers are bypassed: emptying them leaves the model's output
    depending on its input (a residual sum after them has another input that does not pass
    through them), and turns their branch into a constant added to that sum, which
    :func:`easier_ext.fold` removes whole (see :meth:`Paths.collapses`).

    A ResNet block's second site (fed by its second conv) and a MobileNetV2 or Swin residual
    block's depthwise / MLP sites are bypassed; a plain chain's (VGG) are not, nor a ResNet
    block's first conv (its constant would still pass through the padded second conv). Layers
    already empty count as emptied, so a site's layers are not bypassed once the other path
    around them has been emptied.

    Args:
        model: a converted model, traceable by torch.fx.
        feeds: ``{site: feeding layers}`` (default: :func:`feeding_layers` of ``model``).
        paths: a :class:`Paths` of ``model`` to reuse.

    Returns:
        ``{site: bypassed}``, False for a site with no feeding layer.
    """
    feeds = feeding_layers(model) if feeds is None else feeds
    paths = paths or Paths(model)
    return {site: paths.collapses(layers) for site, layers in feeds.items()}


def weight(layer: nn.Module) -> torch.Tensor:
    """A layer's effective weight: with its pruning mask applied when it is pruned.

    Read from ``weight_orig`` and ``weight_mask`` rather than the ``weight`` attribute, which
    ``torch.nn.utils.prune`` refreshes only on a forward call (stale after an optimizer step).
    """
    if hasattr(layer, "weight_mask"):
        return layer.weight_orig.detach() * layer.weight_mask
    return layer.weight.detach()


def irrelevance(entropy: float, weights: Sequence[torch.Tensor]) -> float:
    """NEPENTHE's irrelevance of a site: its entropy times the mean magnitude of the nonzero
    weights of the layers feeding it.

    Args:
        entropy: the site's layer entropy (NEPENTHE's aggregate), in bits.
        weights: the feeding layers' effective weights (see :func:`weight`).

    Returns:
        ``entropy * mean|w|`` over the nonzero weights; 0 when there are none.
    """
    total = sum(int(w.count_nonzero()) for w in weights)
    if total == 0:
        return 0.0
    return float(entropy) * sum(float(w.abs().sum(dtype=torch.float64)) for w in weights) / total


def split_budget(total: int, irrelevances: Mapping[str, float], capacity: Mapping[str, int], *, temperature: float = 1.0) -> dict[str, int]:
    """Shares ``total`` weights to prune among sites, the least relevant losing the most.

    ``n_l = total * softmax_l(S / (T I_l))`` with ``S`` the sum of the irrelevances ``I_k`` and
    ``T`` the temperature (1 in the reference code: with many sites the split is then close to an
    argmax; a larger ``T`` spreads it). A site
    whose share exceeds its capacity (its nonzero weights) gets exactly its capacity; the rest is
    shared again among the others in the same way, ``S`` now summing their irrelevances only (as
    the reference code does), until no share exceeds a capacity. Shares are rounded down and the units left are given to the largest remainders, so
    the result sums to ``total``.

    Args:
        total: weights to prune, ``0 <= total <= sum(capacity)`` over sites with ``I > 0``.
        irrelevances: ``{site: I_l}``; sites with ``I_l <= 0`` (zero entropy or no weights) get 0.
        capacity: ``{site: weights it may lose}`` (its nonzero weights in the reference).
        temperature: ``T > 0``, dividing the softmax logits.

    Returns:
        ``{site: weights to prune}`` for every site of ``irrelevances``.

    Raises:
        ValueError: ``total`` is negative or exceeds what the eligible sites hold, or
            ``temperature`` is not positive.
    """
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    shares = {name: 0 for name in irrelevances}
    eligible = [n for n, i in irrelevances.items() if i > 0 and capacity[n] > 0]
    room = sum(capacity[n] for n in eligible)
    if not 0 <= total <= room:
        raise ValueError(f"cannot prune {total} weights: the eligible sites hold {room}")
    left, active = total, list(eligible)
    while left and active:
        s = sum(irrelevances[n] for n in active)
        logits = {n: s / (temperature * irrelevances[n]) for n in active}
        top = max(logits.values())
        w = {n: math.exp(logits[n] - top) for n in active}
        norm = sum(w.values())
        wanted = {n: left * w[n] / norm for n in active}
        capped = [n for n in active if wanted[n] > capacity[n]]
        if not capped:
            floors = {n: int(math.floor(wanted[n])) for n in active}
            rest = left - sum(floors.values())
            for n in sorted(active, key=lambda n: (floors[n] - wanted[n], active.index(n)))[:rest]:
                floors[n] += 1
            shares.update(floors)
            break
        for n in capped:
            shares[n] = capacity[n]
            left -= capacity[n]
        active = [n for n in active if n not in capped]
    return shares


def prune_magnitude(model: nn.Module, layers: Sequence[str], amount: int, *, keep_neurons: bool = False) -> None:
    """Zeroes the ``amount`` smallest-magnitude nonzero weights across ``layers``, in place.

    Masks are kept with ``torch.nn.utils.prune`` (``weight_orig`` and ``weight_mask``), so pruned
    weights stay zero through finetuning, ``state_dict``, ``torch.save`` and ``copy.deepcopy``;
    later calls prune among the weights still unpruned.

    Args:
        model: the model holding the layers.
        layers: qualified names of conv/linear layers, pruned together (one global ranking).
        amount: how many more weights to zero; ``0 <= amount <=`` their nonzero weights (less the
            kept ones with ``keep_neurons``).
        keep_neurons: never zero the largest-magnitude weight of an output neuron (a row of the
            weight) that still has one, so no neuron, and so no layer, is emptied.

    Raises:
        ValueError: ``amount`` is out of range.
    """
    if amount == 0:
        return
    modules = [model.get_submodule(n) for n in layers]
    weights = [weight(m) for m in modules]
    # Weights already zero but not masked would rank first and use up the amount: mask them.
    for m, w in zip(modules, weights):
        mask = getattr(m, "weight_mask", None)
        if bool(((w == 0) if mask is None else (w == 0) & (mask != 0)).any()):
            prune.custom_from_mask(m, "weight", (w != 0).to(w.dtype))
    scores = [w.abs() for w in weights]
    if keep_neurons:
        scores = [_keep_largest_per_row(s) for s in scores]
    left = sum(int((s.isfinite() & (s != 0)).sum()) for s in scores)
    if not 0 <= amount <= left:
        kept = " that are not a neuron's largest" if keep_neurons else ""
        raise ValueError(f"cannot prune {amount} weights from {list(layers)}: {left} are nonzero{kept}")
    prune.global_unstructured(
        [(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=amount,
        importance_scores={(m, "weight"): s for m, s in zip(modules, scores)},
    )
    for m in modules:
        if not any(isinstance(h, DetachMaskedWeight) for h in m._forward_hooks.values()):
            m.register_forward_hook(DetachMaskedWeight())
        m.weight = m.weight.detach()


def _keep_largest_per_row(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with each row's largest nonzero entry made infinite (never pruned first)."""
    rows = scores.reshape(scores.shape[0], -1).clone()
    top = rows.argmax(dim=1)
    live = rows.gather(1, top[:, None]).squeeze(1) > 0
    rows[live.nonzero().squeeze(1), top[live]] = math.inf
    return rows.reshape(scores.shape)


def guarded_capacity(weights: Sequence[torch.Tensor], fraction: float) -> int:
    """How many weights the guarded allocation may take from a site that is not bypassed in one
    iteration: ``fraction`` of its nonzero weights, never the largest weight of a neuron.

    Args:
        weights: the effective weights of the layers feeding the site (see :func:`weight`).
        fraction: the per-iteration cap, in ``(0, 1]``.

    Returns:
        ``min(floor(fraction * nonzero), nonzero - neurons that still have a weight)``.
    """
    nonzero = sum(int(w.count_nonzero()) for w in weights)
    live = sum(int((w.reshape(w.shape[0], -1) != 0).any(dim=1).sum()) for w in weights)
    return min(math.floor(fraction * nonzero), nonzero - live)


def sparsity(model: nn.Module, layers: Sequence[str]) -> tuple[float, dict[str, float]]:
    """The fraction of zero weights over ``layers`` together, and in each.

    Returns:
        ``(overall, {layer: fraction})``; overall is 0 when ``layers`` is empty.
    """
    per_layer, zeros, size = {}, 0, 0
    for name in layers:
        w = weight(model.get_submodule(name))
        z = w.numel() - int(w.count_nonzero())
        per_layer[name] = z / w.numel() if w.numel() else 0.0
        zeros, size = zeros + z, size + w.numel()
    return (zeros / size if size else 0.0), per_layer

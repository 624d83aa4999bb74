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

from easier_ext._tracing import trace_model
from easier_ext.modules import EntropyActivation

__all__ = [
    "PRUNABLE",
    "bake_pruning",
    "feeding_layers",
    "irrelevance",
    "prune_magnitude",
    "sparsity",
    "split_budget",
    "weight",
]

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


def split_budget(total: int, irrelevances: Mapping[str, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """Shares ``total`` weights to prune among sites, the least relevant losing the most.

    ``n_l = total * softmax_l(S / I_l)`` with ``S`` the sum of the irrelevances ``I_k``. A site
    whose share exceeds its capacity (its nonzero weights) gets exactly its capacity; the rest is
    shared again among the others in the same way, ``S`` now summing their irrelevances only (as
    the reference code does), until no share exceeds a capacity. Shares are rounded down and the units left are given to the largest remainders, so
    the result sums to ``total``.

    Args:
        total: weights to prune, ``0 <= total <= sum(capacity)`` over sites with ``I > 0``.
        irrelevances: ``{site: I_l}``; sites with ``I_l <= 0`` (zero entropy or no weights) get 0.
        capacity: ``{site: nonzero weights left}``.

    Returns:
        ``{site: weights to prune}`` for every site of ``irrelevances``.

    Raises:
        ValueError: ``total`` is negative or exceeds what the eligible sites hold.
    """
    shares = {name: 0 for name in irrelevances}
    eligible = [n for n, i in irrelevances.items() if i > 0 and capacity[n] > 0]
    room = sum(capacity[n] for n in eligible)
    if not 0 <= total <= room:
        raise ValueError(f"cannot prune {total} weights: the eligible sites hold {room}")
    left, active = total, list(eligible)
    while left and active:
        s = sum(irrelevances[n] for n in active)
        logits = {n: s / irrelevances[n] for n in active}
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


def prune_magnitude(model: nn.Module, layers: Sequence[str], amount: int) -> None:
    """Zeroes the ``amount`` smallest-magnitude nonzero weights across ``layers``, in place.

    Masks are kept with ``torch.nn.utils.prune`` (``weight_orig`` and ``weight_mask``), so pruned
    weights stay zero through finetuning, ``state_dict``, ``torch.save`` and ``copy.deepcopy``;
    later calls prune among the weights still unpruned.

    Args:
        model: the model holding the layers.
        layers: qualified names of conv/linear layers, pruned together (one global ranking).
        amount: how many more weights to zero; ``0 <= amount <=`` their nonzero weights.

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
    left = sum(int(w.count_nonzero()) for w in weights)
    if not 0 <= amount <= left:
        raise ValueError(f"cannot prune {amount} weights from {list(layers)}: {left} are nonzero")
    prune.global_unstructured(
        [(m, "weight") for m in modules], pruning_method=prune.L1Unstructured, amount=amount,
        importance_scores={(m, "weight"): w for m, w in zip(modules, weights)},
    )
    for m in modules:
        if not any(isinstance(h, _DetachMaskedWeight) for h in m._forward_hooks.values()):
            m.register_forward_hook(_DetachMaskedWeight())
        m.weight = m.weight.detach()


class _DetachMaskedWeight:
    """Forward hook of a pruned layer: leaves a detached ``weight`` after each call.

    ``torch.nn.utils.prune`` recomputes ``weight = weight_orig * weight_mask`` before each forward
    and leaves it on the module, with its autograd history after a training step: such a
    non-leaf tensor makes ``copy.deepcopy`` and ``torch.save`` of the model fail. The forward's
    graph keeps its own reference, so backward is unaffected.
    """

    def __call__(self, module: nn.Module, inputs, output) -> None:
        module.weight = module.weight.detach()


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


def bake_pruning(model: nn.Module) -> nn.Module:
    """Makes the pruning of every pruned layer permanent, in place: ``weight`` becomes a plain
    parameter holding the masked values (zeros stay), and the mask and hook go.

    Returns:
        ``model``.
    """
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
        for key, hook in list(m._forward_hooks.items()):
            if isinstance(hook, _DetachMaskedWeight):
                del m._forward_hooks[key]
    return model

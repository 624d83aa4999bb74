"""Pruning masks made permanent: ``torch.nn.utils.prune`` leaves a mask, a hook and a recomputed
``weight`` on each pruned layer; folding and deployment want plain parameters."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

__all__ = ["DetachMaskedWeight", "bake_pruning"]


class DetachMaskedWeight:
    """Forward hook of a pruned layer: leaves a detached ``weight`` after each call.

    ``torch.nn.utils.prune`` recomputes ``weight = weight_orig * weight_mask`` before each forward
    and leaves it on the module, with its autograd history after a training step: such a
    non-leaf tensor makes ``copy.deepcopy`` and ``torch.save`` of the model fail. The forward's
    graph keeps its own reference, so backward is unaffected.
    """

    def __call__(self, module: nn.Module, inputs, output) -> None:
        module.weight = module.weight.detach()


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
            if isinstance(hook, DetachMaskedWeight):
                del m._forward_hooks[key]
    return model

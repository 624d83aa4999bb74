"""The geometry of a conv and of a chain of convs, which the merges (``merge``) and the MAC model
(``macs``) share: a conv's spatial dims and numeric padding, and the receptive field, stride and
groups of the one conv a chain composes to."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["common_groups", "numeric_padding", "receptive_field", "spatial_dims", "total_stride"]


def spatial_dims(conv: nn.Module, name: str) -> int:
    """The conv's number of spatial dimensions (1, 2 or 3), refusing what is not a plain conv.

    Args:
        conv: the module to check.
        name: how error messages call it (``"convs[2]"``, ``"a"``).

    Returns:
        1, 2 or 3.
    """
    if not isinstance(conv, _ConvNd):
        raise TypeError(f"{name} is a {type(conv).__name__}; expected an nn.Conv1d, nn.Conv2d or nn.Conv3d")
    if conv.transposed:
        raise ValueError(
            f"{name} ({conv!r}) is a transposed conv; expected a regular nn.Conv1d/2d/3d "
            "(transposed convs are not supported)"
        )
    if conv.padding_mode != "zeros":
        # Reflect/replicate/circular padding copies input values: the padded border is still linear
        # in the input, but not a conv of it, so no single zero-padded conv reproduces it.
        raise ValueError(f"{name} ({conv!r}) has padding_mode={conv.padding_mode!r}; expected padding_mode='zeros'")
    return len(conv.kernel_size)


def numeric_padding(conv: _ConvNd, name: str) -> tuple[int, ...]:
    """The conv's padding as one int per spatial dim, resolving ``'valid'`` and ``'same'``.

    Args:
        conv: a conv that passed :func:`spatial_dims`.
        name: how error messages call it.

    Returns:
        the symmetric padding on each side, per spatial dim.
    """
    if not isinstance(conv.padding, str):
        return tuple(int(p) for p in conv.padding)
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if any(s != 1 for s in conv.stride):
        raise ValueError(f"{name} ({conv!r}) has padding='same' with stride {tuple(conv.stride)}; expected stride 1 or int padding")
    totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    if any(t % 2 for t in totals):
        # torch puts the odd extra pixel on one side only; a symmetric int padding cannot say that.
        raise ValueError(
            f"{name} ({conv!r}) has padding='same' with kernel_size {tuple(conv.kernel_size)} and dilation "
            f"{tuple(conv.dilation)}, which pads asymmetrically (total {tuple(totals)}); expected an odd effective "
            "kernel (dilation * (kernel_size - 1) even) or an explicit int padding"
        )
    return tuple(t // 2 for t in totals)


def receptive_field(convs: Sequence[_ConvNd]) -> tuple[int, ...]:
    """Input extent, per spatial dim, that one output position of the chain reads: the kernel
    size of the conv the chain composes to.

    Args:
        convs: the chain, first applied first.

    Returns:
        ``R_d = 1 + sum_j dil_j,d * (k_j,d - 1) * prod_{i<j} s_i,d`` per spatial dim.
    """
    dims = len(convs[0].kernel_size)
    field, jump = [1] * dims, [1] * dims
    for conv in convs:
        for d in range(dims):
            # One tap step of conv j moves dil_j input positions of conv j, i.e. dil_j * jump chain inputs.
            field[d] += conv.dilation[d] * (conv.kernel_size[d] - 1) * jump[d]
            jump[d] *= conv.stride[d]
    return tuple(field)


def total_stride(convs: Sequence[_ConvNd]) -> tuple[int, ...]:
    """Product of the strides of the chain, per spatial dim.

    Args:
        convs: the chain.

    Returns:
        the merged conv's stride.
    """
    return tuple(math.prod(c.stride[d] for c in convs) for d in range(len(convs[0].kernel_size)))


def common_groups(convs: Sequence[_ConvNd]) -> int:
    """Groups of the merged conv: kept when all agree, since equal groups compose block-diagonally.

    Args:
        convs: the chain.

    Returns:
        the shared ``groups``, or 1 (dense) when they differ.
    """
    groups = {c.groups for c in convs}
    return groups.pop() if len(groups) == 1 else 1

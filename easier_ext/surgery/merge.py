"""Exact weight math for folding linear layers that nothing nonlinear separates any more.

Once the rectifier between two layers has been removed, the two layers compose to one affine
map. This module builds that one layer, as a standard ``nn.Conv1d/2d/3d`` or ``nn.Linear``:

- :func:`compose_convs`: a chain of convs (``conv_1`` first) as one conv,
- :func:`compose_linears`: a chain of linears as one linear,
- :func:`add_convs`: ``a(x) + b(x)`` (or ``a(x) + x``) as one conv.

What the result costs is :func:`easier_ext.surgery.macs.own_macs`, since a merged layer is not
always cheaper than the layers it replaces.

Every function is pure: it reads its input modules and returns new ones. The arithmetic is done
in float64, so that merging adds no rounding error of its own beyond the final cast to the
dtype of the first module's weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from easier_ext.surgery.conv_geometry import common_groups, numeric_padding, receptive_field, spatial_dims, total_stride
from easier_ext.surgery.impulses import merged_bias, merged_kernel

__all__ = ["add_convs", "compose_convs", "compose_linears"]

_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# --------------------------------------------------------------------------------------------
# compose_convs
# --------------------------------------------------------------------------------------------


def _check_chain(convs: Sequence[_ConvNd]) -> tuple[int, tuple[int, ...]]:
    """Refuses chains whose composition is not one exact conv.

    Args:
        convs: the chain, first applied first.

    Returns:
        ``(spatial dims, numeric padding of the first conv)``.
    """
    if len(convs) == 0:
        raise ValueError("compose_convs needs at least 1 conv; got an empty sequence")
    dims = spatial_dims(convs[0], "convs[0]")
    first_padding = numeric_padding(convs[0], "convs[0]")
    for i in range(1, len(convs)):
        conv, prev = convs[i], convs[i - 1]
        name = f"convs[{i}]"
        d = spatial_dims(conv, name)
        if d != dims:
            raise ValueError(f"{name} ({conv!r}) is a {d}d conv; expected a {dims}d conv like convs[0]")
        if conv.in_channels != prev.out_channels:
            raise ValueError(
                f"{name} ({conv!r}) has in_channels={conv.in_channels}; expected {prev.out_channels}, "
                f"the out_channels of convs[{i - 1}]"
            )
        padding = numeric_padding(conv, name)
        if any(padding):
            raise ValueError(
                f"{name} ({conv!r}) has padding {padding}; expected {(0,) * dims} for every conv after the first: "
                "the zeros it pads are not a linear function of the chain's input (the map before it adds a bias "
                "and is computed up to the border), so the composition would not be exact. Move the padding to the "
                "chain's first conv (easier_ext.move_padding does this) before merging"
            )
    return dims, first_padding


def _float64_params(modules: Sequence[nn.Module], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each module's weight and bias, detached, as float64 on ``device``.

    Args:
        modules: convs or linears.
        device: where the arithmetic runs.

    Returns:
        ``(weight, bias or None)`` per module.
    """
    out = []
    for m in modules:
        bias = None if m.bias is None else m.bias.detach().to(device=device, dtype=torch.float64)
        out.append((m.weight.detach().to(device=device, dtype=torch.float64), bias))
    return out


def compose_convs(convs: Sequence[_ConvNd]) -> _ConvNd:
    """The single conv equal to applying ``convs`` one after another, with nothing in between.

    The chain without its biases is linear and shift-equivariant with stride ``prod(s)``, so it
    is one conv whose kernel covers the chain's receptive field ``R``. On an input of size ``R``
    the unpadded chain has one output position, whose Jacobian is that kernel: it is read off
    by pushing impulses through the chain in float64 (see :mod:`easier_ext.surgery.impulses`), one
    per input channel and tap, or, when there are fewer output channels, one per output
    channel pulled back through the transposed chain (exact for any strides, dilations and
    groups; with common groups only one group's worth of impulses is needed). The
    biases add a constant per channel, the chain's output on a zero input, because no conv
    after the first pads (the first conv's zero padding is kept as the merged conv's padding).

    The merged conv gives the chain's output size for every input size: per dim, the chain's
    nested ``floor((n - a_j) / s_j) + 1`` equals ``floor((n - R) / prod(s)) + 1``, since
    ``floor(floor(x / a) / b) == floor(x / (a * b))`` and the ``a_j`` telescope to ``R``. An
    input too small for the merged kernel is also too small for some conv of the chain.

    Args:
        convs: ``nn.Conv1d/2d/3d`` of one dimensionality, first applied first, whose channels
            chain, with ``padding_mode='zeros'``, int (or resolvable ``'same'``/``'valid'``)
            padding, and no padding after the first conv.

    Returns:
        a new ``nn.ConvNd`` with kernel ``R``, stride ``prod(s)``, the first conv's padding,
        dilation 1, a bias, and the chain's common ``groups`` (else 1); dtype and device of
        ``convs[0].weight``.

    Raises:
        ValueError: naming the conv (by index) that makes the composition inexact or ill-formed.
        TypeError: for a module that is not a conv.
    """
    convs = list(convs)
    dims, padding = _check_chain(convs)
    ref = convs[0].weight
    field, groups = receptive_field(convs), common_groups(convs)
    with torch.no_grad():
        params = _float64_params(convs, ref.device)
        weight = merged_kernel(convs, params, field, groups)
        bias = merged_bias(convs, params, field)
    merged = _CONV_CLASSES[dims](
        convs[0].in_channels, convs[-1].out_channels, field, stride=total_stride(convs), padding=padding, groups=groups,
        bias=True, device=ref.device, dtype=ref.dtype,
    )
    with torch.no_grad():
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
    return merged.train(convs[0].training)


# --------------------------------------------------------------------------------------------
# compose_linears
# --------------------------------------------------------------------------------------------


def compose_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    """The single linear equal to applying ``linears`` one after another.

    Args:
        linears: ``nn.Linear`` layers, first applied first, each with ``in_features`` equal to
            the previous one's ``out_features``.

    Returns:
        a new ``nn.Linear`` with ``W = W_n @ ... @ W_1`` and ``b = W_n(...(W_2 b_1 + b_2)...) + b_n``
        (missing biases count as 0; the result always has one), dtype and device of
        ``linears[0].weight``.

    Raises:
        ValueError: for an empty sequence or features that do not chain (naming the linear).
    """
    linears = list(linears)
    if len(linears) == 0:
        raise ValueError("compose_linears needs at least 1 linear; got an empty sequence")
    for i, lin in enumerate(linears):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"linears[{i}] is a {type(lin).__name__}; expected an nn.Linear")
        if i and lin.in_features != linears[i - 1].out_features:
            raise ValueError(
                f"linears[{i}] ({lin!r}) has in_features={lin.in_features}; expected {linears[i - 1].out_features}, "
                f"the out_features of linears[{i - 1}]"
            )
    ref = linears[0].weight
    with torch.no_grad():
        params = _float64_params(linears, ref.device)
        weight = params[0][0]
        bias = params[0][1] if params[0][1] is not None else weight.new_zeros(weight.shape[0])
        for w, b in params[1:]:
            weight, bias = w @ weight, w @ bias
            if b is not None:
                bias = bias + b
    merged = nn.Linear(linears[0].in_features, linears[-1].out_features, bias=True, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
    return merged.train(linears[0].training)


# --------------------------------------------------------------------------------------------
# add_convs
# --------------------------------------------------------------------------------------------


def _identity_weight(channels: int, groups: int, dims: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 1x1 kernel of ``x -> x`` for a conv with ``groups``.

    Args:
        channels: in and out channels.
        groups: the conv's groups.
        dims: spatial dims.
        dtype: the weight's dtype.
        device: the weight's device.

    Returns:
        weight of shape ``(channels, channels / groups, 1, ...)``: output channel ``o`` reads its own
        channel, which is input ``o % (channels / groups)`` of its group.
    """
    per_group = channels // groups
    weight = torch.zeros(channels, per_group, *([1] * dims), dtype=dtype, device=device)
    out = torch.arange(channels, device=device)
    weight[(out, out % per_group) + (0,) * dims] = 1.0
    return weight


def _densify(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight as the equivalent dense (``groups=1``) weight.

    Args:
        weight: shape ``(Cout, Cin / groups, *k)``.
        groups: its groups.

    Returns:
        shape ``(Cout, Cin, *k)``, zero outside the diagonal blocks.
    """
    if groups == 1:
        return weight
    cout, per_in = weight.shape[:2]
    dense = weight.new_zeros(cout, groups, per_in, *weight.shape[2:])
    out = torch.arange(cout, device=weight.device)
    dense[out, out // (cout // groups)] = weight
    return dense.reshape(cout, groups * per_in, *weight.shape[2:])


def _centre_offsets(kernel, dilation, padding) -> tuple[int, ...]:
    """Twice the centre offset ``(k - 1) * dil / 2 - padding`` per dim (twice: stays an int).

    Args:
        kernel: kernel size per dim.
        dilation: dilation per dim.
        padding: padding per dim.

    Returns:
        ``(k - 1) * dil - 2 * padding`` per dim.
    """
    return tuple(d * (k - 1) - 2 * p for k, d, p in zip(kernel, dilation, padding))


def add_convs(a: _ConvNd, b: _ConvNd | None) -> _ConvNd:
    """One conv equal to ``a(x) + b(x)`` for the same input ``x``; ``b=None`` means ``a(x) + x``.

    The sum is one conv when both read the same input window per output position: same stride,
    channels and dimensionality, zero padding mode, and the same centre offset
    ``(k - 1) * dil / 2 - padding`` per dim (which also makes their output sizes equal). The
    identity is a 1x1 kernel with stride 1 and padding 0, so it needs ``a`` to keep its input's
    size and channels. The smaller kernel is embedded at the centre of the larger; a dilation
    is kept where both kernels' taps fall on the larger one's grid, else expanded to dilation 1.

    Args:
        a: an ``nn.Conv1d/2d/3d``.
        b: a conv of the same input as ``a``, or ``None`` for the input itself.

    Returns:
        a new conv with the larger kernel, ``a``'s stride, the matching padding, a bias (the sum of
        the biases; missing ones count as 0) and ``a``'s groups when ``b`` has the same groups or is
        the identity (else 1); dtype and device of ``a.weight``.

    Raises:
        ValueError: when the sum is not exactly one conv, saying which condition fails.
    """
    dims = spatial_dims(a, "a")
    pad_a = numeric_padding(a, "a")
    ref = a.weight
    with torch.no_grad():
        (w_a, bias_a), = _float64_params([a], ref.device)
    if b is None:
        if a.in_channels != a.out_channels:
            raise ValueError(
                f"a ({a!r}) maps {a.in_channels} to {a.out_channels} channels; expected in_channels == out_channels "
                "to add the identity (b=None)"
            )
        if any(s != 1 for s in a.stride):
            raise ValueError(f"a ({a!r}) has stride {tuple(a.stride)}; expected stride {(1,) * dims} to add the identity (b=None)")
        name_b = "b (the identity)"
        w_b = _identity_weight(a.out_channels, a.groups, dims, torch.float64, ref.device)
        # Give the identity a's dilation: its single tap sits on any grid, so it never forces a
        # dilated kernel to be expanded.
        kernel_b, dil_b, pad_b, groups_b, bias_b = (1,) * dims, tuple(a.dilation), (0,) * dims, a.groups, None
    else:
        name_b = "b"
        dims_b = spatial_dims(b, "b")
        if dims_b != dims:
            raise ValueError(f"b ({b!r}) is a {dims_b}d conv; expected a {dims}d conv like a")
        if (b.in_channels, b.out_channels) != (a.in_channels, a.out_channels):
            raise ValueError(
                f"b ({b!r}) maps {b.in_channels} to {b.out_channels} channels; expected {a.in_channels} to "
                f"{a.out_channels} like a"
            )
        if tuple(b.stride) != tuple(a.stride):
            raise ValueError(f"b ({b!r}) has stride {tuple(b.stride)}; expected {tuple(a.stride)} like a")
        pad_b = numeric_padding(b, "b")
        with torch.no_grad():
            (w_b, bias_b), = _float64_params([b], ref.device)
        kernel_b, dil_b, groups_b = tuple(b.kernel_size), tuple(b.dilation), b.groups

    kernel_a, dil_a = tuple(a.kernel_size), tuple(a.dilation)
    offset_a, offset_b = _centre_offsets(kernel_a, dil_a, pad_a), _centre_offsets(kernel_b, dil_b, pad_b)
    if offset_a != offset_b:
        raise ValueError(
            f"a ({a!r}) has centre offset (k-1)*dil/2 - padding = {tuple(o / 2 for o in offset_a)} but {name_b} has "
            f"{tuple(o / 2 for o in offset_b)}; expected equal offsets, otherwise their outputs are shifted against "
            "each other and the sum is not one conv"
        )

    extent_a = [d * (k - 1) for k, d in zip(kernel_a, dil_a)]
    extent_b = [d * (k - 1) for k, d in zip(kernel_b, dil_b)]
    extent = [max(ea, eb) for ea, eb in zip(extent_a, extent_b)]
    # Keep a common dilation only if the smaller kernel, centred, lands on the larger one's taps.
    dilation = [
        da if da == db and (ea - eb) % (2 * da) == 0 else 1
        for da, db, ea, eb in zip(dil_a, dil_b, extent_a, extent_b)
    ]
    kernel = [e // d + 1 for e, d in zip(extent, dilation)]
    # Same offsets give (extent - offset) even for both kernels: the padding is an int.
    padding = [(e - o) // 2 for e, o in zip(extent, offset_a)]
    groups = a.groups if groups_b == a.groups else 1

    with torch.no_grad():
        weight = torch.zeros(a.out_channels, a.in_channels // groups, *kernel, dtype=torch.float64, device=ref.device)
        for w, k, dil, ext, g in ((w_a, kernel_a, dil_a, extent_a, a.groups), (w_b, kernel_b, dil_b, extent_b, groups_b)):
            if g != groups:
                w = _densify(w, g)
            taps = tuple(
                slice((e_max - e) // 2 // d_out, (e_max - e) // 2 // d_out + (kk - 1) * (d // d_out) + 1, d // d_out)
                for kk, d, e, e_max, d_out in zip(k, dil, ext, extent, dilation)
            )
            weight[(slice(None), slice(None)) + taps] += w
        bias = torch.zeros(a.out_channels, dtype=torch.float64, device=ref.device)
        for b_ in (bias_a, bias_b):
            if b_ is not None:
                bias += b_
    merged = _CONV_CLASSES[dims](
        a.in_channels, a.out_channels, tuple(kernel), stride=tuple(a.stride), padding=tuple(padding),
        dilation=tuple(dilation), groups=groups, bias=True, device=ref.device, dtype=ref.dtype,
    )
    with torch.no_grad():
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
    return merged.train(a.training)

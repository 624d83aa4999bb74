"""Exact weight math for folding linear layers that nothing nonlinear separates any more.

Once the rectifier between two layers has been removed, the two layers compose to one affine
map. This module builds that one layer, as a standard ``nn.Conv1d/2d/3d`` or ``nn.Linear``:

- :func:`compose_convs`: a chain of convs (``conv_1`` first) as one conv,
- :func:`compose_linears`: a chain of linears as one linear,
- :func:`add_convs`: ``a(x) + b(x)`` (or ``a(x) + x``) as one conv,

and says what the result costs (:func:`conv_chain_macs`, :func:`composed_macs`,
:func:`linear_chain_macs`, :func:`composed_linear_macs`), since a merged layer is not always
cheaper than the layers it replaces.

Every function is pure: it reads its input modules and returns new ones. The arithmetic is done
in float64, so that merging adds no rounding error of its own beyond the final cast to the
dtype of the first module's weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = [
    "add_convs",
    "compose_convs",
    "compose_linears",
    "composed_linear_macs",
    "composed_macs",
    "conv_chain_macs",
    "linear_chain_macs",
]

_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

#: Impulses pushed through a chain at once by :func:`compose_convs`. Memory grows with this
#: times the receptive field times the widest channel count of the chain, not with the square
#: of the merged kernel's size.
IMPULSE_CHUNK = 256


# --------------------------------------------------------------------------------------------
# Checks shared by the conv functions
# --------------------------------------------------------------------------------------------


def _spatial_dims(conv: nn.Module, name: str) -> int:
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


def _numeric_padding(conv: _ConvNd, name: str) -> tuple[int, ...]:
    """The conv's padding as one int per spatial dim, resolving ``'valid'`` and ``'same'``.

    Args:
        conv: a conv that passed :func:`_spatial_dims`.
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


def _check_chain(convs: Sequence[_ConvNd]) -> tuple[int, tuple[int, ...]]:
    """Refuses chains whose composition is not one exact conv.

    Args:
        convs: the chain, first applied first.

    Returns:
        ``(spatial dims, numeric padding of the first conv)``.
    """
    if len(convs) == 0:
        raise ValueError("compose_convs needs at least 1 conv; got an empty sequence")
    dims = _spatial_dims(convs[0], "convs[0]")
    first_padding = _numeric_padding(convs[0], "convs[0]")
    for i in range(1, len(convs)):
        conv, prev = convs[i], convs[i - 1]
        name = f"convs[{i}]"
        d = _spatial_dims(conv, name)
        if d != dims:
            raise ValueError(f"{name} ({conv!r}) is a {d}d conv; expected a {dims}d conv like convs[0]")
        if conv.in_channels != prev.out_channels:
            raise ValueError(
                f"{name} ({conv!r}) has in_channels={conv.in_channels}; expected {prev.out_channels}, "
                f"the out_channels of convs[{i - 1}]"
            )
        padding = _numeric_padding(conv, name)
        if any(padding):
            raise ValueError(
                f"{name} ({conv!r}) has padding {padding}; expected {(0,) * dims} for every conv after the first: "
                "the zeros it pads are not a linear function of the chain's input (the map before it adds a bias "
                "and is computed up to the border), so the composition would not be exact. Move the padding to the "
                "chain's first conv (easier_ext.move_padding does this) before merging"
            )
    return dims, first_padding


# --------------------------------------------------------------------------------------------
# compose_convs
# --------------------------------------------------------------------------------------------


def _receptive_field(convs: Sequence[_ConvNd]) -> tuple[int, ...]:
    """Input extent, per spatial dim, that one output position of the chain reads.

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


def _total_stride(convs: Sequence[_ConvNd]) -> tuple[int, ...]:
    """Product of the strides of the chain, per spatial dim.

    Args:
        convs: the chain.

    Returns:
        the merged conv's stride.
    """
    return tuple(math.prod(c.stride[d] for c in convs) for d in range(len(convs[0].kernel_size)))


def _common_groups(convs: Sequence[_ConvNd]) -> int:
    """Groups of the merged conv: kept when all agree, since equal groups compose block-diagonally.

    Args:
        convs: the chain.

    Returns:
        the shared ``groups``, or 1 (dense) when they differ.
    """
    groups = {c.groups for c in convs}
    return groups.pop() if len(groups) == 1 else 1


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


def _run_chain(convs: Sequence[_ConvNd], params, x: torch.Tensor, *, with_bias: bool) -> torch.Tensor:
    """The chain on ``x`` without any padding (the first conv's padding is the merged conv's).

    Args:
        convs: the chain (for strides, dilations, groups).
        params: their float64 ``(weight, bias)``.
        x: float64 input, already of the receptive field's size.
        with_bias: whether to add the biases (False: the chain's linear part).

    Returns:
        the chain's output.
    """
    conv_fn = _CONV_FNS[len(convs[0].kernel_size)]
    for conv, (weight, bias) in zip(convs, params):
        x = conv_fn(x, weight, bias if with_bias else None, conv.stride, 0, conv.dilation, conv.groups)
    return x


def _run_adjoint(convs: Sequence[_ConvNd], params, y: torch.Tensor) -> torch.Tensor:
    """The transpose of the chain's linear part (no padding), applied to ``y``, last conv first.

    Args:
        convs: the chain (for strides, dilations, groups).
        params: their float64 ``(weight, bias)``.
        y: float64 cotangents of the chain's output, of spatial size 1.

    Returns:
        the cotangents of the chain's input, of the receptive field's size. No ``output_padding``
        is needed: on that input every conv's window fits its input exactly, with nothing left over.
    """
    transpose_fn = _CONV_TRANSPOSE_FNS[len(convs[0].kernel_size)]
    for conv, (weight, _) in zip(reversed(convs), reversed(params)):
        y = transpose_fn(y, weight, None, conv.stride, 0, 0, conv.groups, conv.dilation)
    return y


def _identity_rows(start: int, stop: int, n: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of the ``n x n`` float64 identity, without building the whole of it.

    Args:
        start: first row.
        stop: one past the last row.
        n: size of the identity.
        device: where to put the rows.

    Returns:
        shape ``(stop - start, n)``.
    """
    rows = torch.zeros(stop - start, n, dtype=torch.float64, device=device)
    rows[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = 1.0
    return rows


def _input_impulses(convs: Sequence[_ConvNd], params, field: tuple[int, ...], groups: int) -> torch.Tensor:
    """The merged kernel, one input tap at a time: impulses pushed forward through the chain.

    On an input of exactly the receptive field's size, the unpadded chain has a single output
    position, and its response to the impulse at (channel c, position p) is column (c, p) of
    the merged kernel.

    Args:
        convs: the chain.
        params: their float64 ``(weight, bias)``.
        field: the receptive field (merged kernel size).
        groups: the merged conv's groups (the chain's common groups, or 1).

    Returns:
        the float64 weight, shape ``(Cout, Cin / groups, *field)``.
    """
    device = params[0][0].device
    cout, dims = convs[-1].out_channels, len(field)
    per_in = convs[0].in_channels // groups
    n = per_in * math.prod(field)
    responses = []
    for start in range(0, n, IMPULSE_CHUNK):
        impulses = _identity_rows(start, min(start + IMPULSE_CHUNK, n), n, device)
        # Groups never mix, so one impulse per in-group channel and position, repeated in every
        # group, probes all groups at once: each output channel only sees its own group's copy.
        x = impulses.reshape(len(impulses), per_in, *field).repeat(1, groups, *([1] * dims))
        responses.append(_run_chain(convs, params, x, with_bias=False).reshape(len(impulses), cout))
    return torch.cat(responses).T.reshape(cout, per_in, *field)


def _output_impulses(convs: Sequence[_ConvNd], params, field: tuple[int, ...], groups: int) -> torch.Tensor:
    """The merged kernel, one output channel at a time: impulses pulled back through the chain.

    The transposed chain maps the impulse on output channel o to row o of the merged kernel
    (the Jacobian read by rows instead of columns), in ``Cout / groups`` impulses rather than
    ``Cin / groups * prod(R)``.

    Args:
        convs: the chain.
        params: their float64 ``(weight, bias)``.
        field: the receptive field (merged kernel size).
        groups: the merged conv's groups (the chain's common groups, or 1).

    Returns:
        the float64 weight, shape ``(Cout, Cin / groups, *field)``.
    """
    device = params[0][0].device
    cout, dims = convs[-1].out_channels, len(field)
    per_in, per_out = convs[0].in_channels // groups, cout // groups
    rows = []
    for start in range(0, per_out, IMPULSE_CHUNK):
        impulses = _identity_rows(start, min(start + IMPULSE_CHUNK, per_out), per_out, device)
        # As in _input_impulses, one impulse per in-group output channel serves every group:
        # row j comes back holding output channel j of each group, in that group's input block.
        y = impulses.repeat(1, groups).reshape(len(impulses), cout, *([1] * dims))
        rows.append(_run_adjoint(convs, params, y))
    pulled = torch.cat(rows).reshape(per_out, groups, per_in, *field)
    return pulled.transpose(0, 1).reshape(cout, per_in, *field)


def _merged_kernel(convs: Sequence[_ConvNd], params, field: tuple[int, ...], groups: int) -> torch.Tensor:
    """The Jacobian of the chain's single output position on a receptive-field-sized input.

    Both ways of reading it are exact; the one with fewer impulses is taken (a 3-d chain's
    receptive field easily holds thousands of input taps per channel).

    Args:
        convs: the chain.
        params: their float64 ``(weight, bias)``.
        field: the receptive field (merged kernel size).
        groups: the merged conv's groups.

    Returns:
        the float64 weight, shape ``(Cout, Cin / groups, *field)``.
    """
    inputs = convs[0].in_channels // groups * math.prod(field)
    outputs = convs[-1].out_channels // groups
    extract = _input_impulses if inputs <= outputs else _output_impulses
    return extract(convs, params, field, groups)


def compose_convs(convs: Sequence[_ConvNd]) -> _ConvNd:
    """The single conv equal to applying ``convs`` one after another, with nothing in between.

    The chain without its biases is linear and shift-equivariant with stride ``prod(s)``, so it
    is one conv whose kernel covers the chain's receptive field ``R``. On an input of size ``R``
    the unpadded chain has one output position, whose Jacobian is that kernel: it is read off
    by pushing impulses through the chain in float64, in chunks of :data:`IMPULSE_CHUNK`, one
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
    field, groups = _receptive_field(convs), _common_groups(convs)
    cin, cout = convs[0].in_channels, convs[-1].out_channels
    with torch.no_grad():
        params = _float64_params(convs, ref.device)
        weight = _merged_kernel(convs, params, field, groups)
        zeros = torch.zeros(1, cin, *field, dtype=torch.float64, device=ref.device)
        bias = _run_chain(convs, params, zeros, with_bias=True).reshape(cout)
    merged = _CONV_CLASSES[dims](
        cin, cout, field, stride=_total_stride(convs), padding=padding, groups=groups, bias=True,
        device=ref.device, dtype=ref.dtype,
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
    dims = _spatial_dims(a, "a")
    pad_a = _numeric_padding(a, "a")
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
        dims_b = _spatial_dims(b, "b")
        if dims_b != dims:
            raise ValueError(f"b ({b!r}) is a {dims_b}d conv; expected a {dims}d conv like a")
        if (b.in_channels, b.out_channels) != (a.in_channels, a.out_channels):
            raise ValueError(
                f"b ({b!r}) maps {b.in_channels} to {b.out_channels} channels; expected {a.in_channels} to "
                f"{a.out_channels} like a"
            )
        if tuple(b.stride) != tuple(a.stride):
            raise ValueError(f"b ({b!r}) has stride {tuple(b.stride)}; expected {tuple(a.stride)} like a")
        pad_b = _numeric_padding(b, "b")
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


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


def _nonempty(layers: Sequence[nn.Module], what: str) -> list[nn.Module]:
    """``layers`` as a list, refusing an empty one (a cost of nothing would hide a bug)."""
    layers = list(layers)
    if not layers:
        raise ValueError(f"{what} needs at least 1 layer; got an empty sequence")
    return layers


def conv_chain_macs(convs: Sequence[_ConvNd]) -> int:
    """Multiply-accumulates of the chain, per output position of its last conv.

    Per position (all channels) rather than per input size, so that a chain and its merged conv
    compare without knowing the input; border effects are ignored. Conv ``j`` runs once for
    each of its output positions that feed one final position: the product of the later convs'
    strides over all spatial dims.

    Args:
        convs: the chain, first applied first (not checked for exactness).

    Returns:
        ``sum_j prod_{i>j} prod(s_i) * Cin_j / g_j * Cout_j * prod(k_j)``.
    """
    convs = _nonempty(convs, "conv_chain_macs")
    total, positions = 0, 1
    for conv in reversed(convs):
        total += positions * conv.in_channels // conv.groups * conv.out_channels * math.prod(conv.kernel_size)
        positions *= math.prod(conv.stride)
    return total


def composed_macs(convs: Sequence[_ConvNd]) -> int:
    """Multiply-accumulates of :func:`compose_convs` ``(convs)``, per output position.

    Args:
        convs: the chain, first applied first (not checked for exactness, so that a planner can
            price chains that would first need their padding moved).

    Returns:
        ``Cin_1 / g * Cout_n * prod(R)``, with ``g`` the merged groups and ``R`` the receptive field.
    """
    convs = _nonempty(convs, "composed_macs")
    return convs[0].in_channels // _common_groups(convs) * convs[-1].out_channels * math.prod(_receptive_field(convs))


def linear_chain_macs(linears: Sequence[nn.Linear]) -> int:
    """Multiply-accumulates of the chain of linears, per output row.

    Args:
        linears: the chain, first applied first.

    Returns:
        ``sum_j in_j * out_j``.
    """
    return sum(lin.in_features * lin.out_features for lin in _nonempty(linears, "linear_chain_macs"))


def composed_linear_macs(linears: Sequence[nn.Linear]) -> int:
    """Multiply-accumulates of :func:`compose_linears` ``(linears)``, per output row.

    Args:
        linears: the chain, first applied first.

    Returns:
        ``in_1 * out_n``.
    """
    linears = _nonempty(linears, "composed_linear_macs")
    return linears[0].in_features * linears[-1].out_features

"""The weights of the one conv a chain of convs composes to, read off the chain by pushing
impulses through it in float64 (see :func:`easier_ext.surgery.merge.compose_convs`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

__all__ = ["IMPULSE_CHUNK", "merged_bias", "merged_kernel"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

#: Impulses pushed through a chain at once by :func:`merged_kernel`. Memory grows with this
#: times the receptive field times the widest channel count of the chain, not with the square
#: of the merged kernel's size.
IMPULSE_CHUNK = 256


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


def merged_kernel(convs: Sequence[_ConvNd], params, field: tuple[int, ...], groups: int) -> torch.Tensor:
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


def merged_bias(convs: Sequence[_ConvNd], params, field: tuple[int, ...]) -> torch.Tensor:
    """The merged conv's bias: the chain's output on a zero input of the receptive field's size.

    The biases add one constant per channel only because no conv after the first pads.

    Args:
        convs: the chain, no conv after the first padding.
        params: their float64 ``(weight, bias)``.
        field: the receptive field (merged kernel size).

    Returns:
        the float64 bias, shape ``(Cout,)``.
    """
    zeros = torch.zeros(1, convs[0].in_channels, *field, dtype=torch.float64, device=params[0][0].device)
    return _run_chain(convs, params, zeros, with_bias=True).reshape(convs[-1].out_channels)

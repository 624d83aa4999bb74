"""The gradient of each activation the fused op implements, as torch computes it: one entry per
activation name, in the C++ table's order (``csrc/rectify_args.cpp``), so that
:data:`easier_ext.ops.ACTIVATIONS` is this table's keys; and the gradient of the entropy proxy that
``rectify_count_entropy`` sums."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from easier_ext.core.shapes import channel_view

__all__ = ["GRADIENTS", "entropy_proxy_gradient", "prelu_weight_gradient"]

aten = torch.ops.aten


def _silu(grad: Tensor, x: Tensor) -> Tensor:
    # As torch does: aten's kernel has no derivative, so where a double backward may follow
    # (grad mode on) the formula runs instead.
    if torch.is_grad_enabled():
        sig = torch.sigmoid(x)
        return grad * sig * (1.0 + x * (1.0 - sig))
    return aten.silu_backward(grad, x)


def _mish(grad: Tensor, x: Tensor) -> Tensor:
    if torch.is_grad_enabled():  # as torch does, for the same reason as silu
        tanh_softplus = torch.tanh(F.softplus(x))
        return grad * (tanh_softplus + x * torch.sigmoid(x) * (1.0 - tanh_softplus * tanh_softplus))
    return aten.mish_backward(grad, x)


def _prelu(grad: Tensor, x: Tensor, alpha: float, weight: Optional[Tensor], channel_dim: int) -> Tensor:
    return torch.where(x > 0, grad, channel_view(weight, x.dim(), channel_dim) * grad)


#: activation name -> ``(grad, saved, alpha, weight, channel_dim) -> grad_input``. ``saved`` is the
#: output for relu (what torch keeps) and the input for the others. torch's own backward kernels,
#: so gradients equal torch's and can be differentiated again.
GRADIENTS: dict[str, Callable[[Tensor, Tensor, float, Optional[Tensor], int], Tensor]] = {
    "relu": lambda g, y, alpha, w, dim: aten.threshold_backward(g, y, 0),
    "relu6": lambda g, x, alpha, w, dim: aten.hardtanh_backward(g, x, 0.0, 6.0),
    "leaky_relu": lambda g, x, alpha, w, dim: aten.leaky_relu_backward(g, x, alpha, False),
    "prelu": _prelu,
    "gelu": lambda g, x, alpha, w, dim: aten.gelu_backward(g, x, approximate="none"),
    "gelu_tanh": lambda g, x, alpha, w, dim: aten.gelu_backward(g, x, approximate="tanh"),
    "silu": lambda g, x, alpha, w, dim: _silu(g, x),
    "hardswish": lambda g, x, alpha, w, dim: aten.hardswish_backward(g, x),
    "elu": lambda g, x, alpha, w, dim: aten.elu_backward(g, alpha, 1, 1, False, x),
    "mish": lambda g, x, alpha, w, dim: _mish(g, x),
}


def prelu_weight_gradient(grad: Tensor, x: Tensor, weight: Tensor, channel_dim: int) -> Tensor:
    """dL/dw of prelu: the sum of ``grad * x`` over the OFF elements (``x <= 0``) of each channel.

    Args:
        grad: the output's gradient.
        x: the input.
        weight: the slopes, one or one per channel.
        channel_dim: the channels' dim of ``x``.

    Returns:
        a tensor of ``weight``'s shape.
    """
    per_element = torch.where(x > 0, torch.zeros_like(x), x * grad)
    if weight.numel() == 1:
        return per_element.sum().reshape(weight.shape)
    dim = channel_dim % x.dim()
    return per_element.sum(dim=[d for d in range(x.dim()) if d != dim]).reshape(weight.shape)


# |u| beyond which the entropy proxy's gradient is exactly 0 in float64 too (sigmoid(-u) is 0 there);
# kEntropyULimit in csrc/entropy_proxy_math.h.
_U_LIMIT = 1e4


def entropy_proxy_gradient(
    grad_sums: Tensor, x: Tensor, tau: float, channel_dim: int, grad_input: Optional[Tensor] = None
) -> Tensor:
    """dL/dx through the entropy proxy of :func:`easier_ext.ops.rectify_count_entropy`.

    Each element's proxy is ``H(p)`` bits with ``p = sigmoid(u)``, ``u = x / tau``, and
    ``dH/dx = -u * p * (1 - p) / (tau * ln 2)``: 0 at ``x = 0`` (where ``H`` is at its maximum of
    1 bit) and towards 0 again once ``|u|`` is past a few units. ``p * (1 - p)`` is computed as
    ``q * (1 - q)`` with ``q = sigmoid(-|u|) <= 1/2`` (the same value), so that no ``1 - p`` loses
    its digits as ``p`` nears 1. ``u`` is ``x * (1 / tau)`` with ``1 / tau`` saturated at the
    accumulation type's largest value, as the kernels compute it.

    Args:
        grad_sums: the gradient of each channel's sum, shape ``(C,)`` (float32, or float64 for a
            float64 ``x``: the sums' dtype).
        x: the op's input.
        tau: the sigmoid's temperature, > 0.
        channel_dim: the channels' dim of ``x``.
        grad_input: another gradient of ``x`` (the activation's) to add the term to. When no graph
            is being recorded (grad mode off, as in a plain backward) it is updated in place by the
            fused op ``easier_ext::entropy_proxy_grad_``, one pass with no temporary.

    Returns:
        ``grad_sums[c] * dH/dx`` at every element of channel ``c`` (plus ``grad_input``), with
        ``x``'s shape and dtype; computed in ``grad_sums``' dtype (float32 for float16/bfloat16
        inputs). NaN where ``x`` is NaN, 0 where it is +-inf (``H`` is 0 on both sides of it).
    """
    if torch.is_grad_enabled():  # a graph is being recorded (double backward): torch ops, no in-place ones
        inv_tau = min(1.0 / tau, torch.finfo(grad_sums.dtype).max)
        scale = channel_view(grad_sums * (-1 / math.log(2)), x.dim(), channel_dim)
        # Clamped so that +-inf gives (finite) * 0 = 0 rather than inf * 0 = NaN; inv_tau comes
        # last, where u * q * (1 - q) is 0 if it saturated (tiny tau).
        u = (x.to(grad_sums.dtype) * inv_tau).clamp(-_U_LIMIT, _U_LIMIT)
        q = torch.sigmoid(-u.abs())
        term = (u * q * (1 - q) * inv_tau * scale).to(x.dtype)
        return term if grad_input is None else grad_input + term
    # A plain backward: the fused kernel adds the term in one pass (csrc/entropy_proxy_math.h, the
    # same steps), with no temporary of x's size.
    if grad_input is None:
        grad_input = torch.zeros_like(x)
    torch.ops.easier_ext.entropy_proxy_grad_.default(grad_input, x, grad_sums, tau, channel_dim)
    return grad_input

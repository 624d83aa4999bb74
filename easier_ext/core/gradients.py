"""The gradient of each activation the fused op implements, as torch computes it: one entry per
activation name, in the C++ table's order (``csrc/rectify_args.cpp``), so that
:data:`easier_ext.ops.ACTIVATIONS` is this table's keys."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from easier_ext.core.shapes import channel_view

__all__ = ["GRADIENTS", "prelu_weight_gradient"]

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

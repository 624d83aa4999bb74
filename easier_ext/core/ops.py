"""The easier_ext torch ops: typed Python wrappers, fake kernels and autograd formulas.

The kernels themselves are C++/CUDA (``csrc/``); this module makes them work with autograd,
``torch.compile(fullgraph=True)`` and ``torch.export``. In eager mode, a call to :func:`rectify_count`
or :func:`rectify_count_` that autograd has nothing to record (plain tensors, no gradient needed)
goes to the kernel from C++ (``csrc/no_grad_call.cpp``), skipping ``torch.ops``' Python layers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from easier_ext import _extension  # loads the library that defines the ops
from easier_ext.core.gradients import GRADIENTS, entropy_proxy_gradient, prelu_weight_gradient

__all__ = ["ACTIVATIONS", "rectify_count", "rectify_count_", "rectify_count_entropy"]

#: Activation names accepted by :func:`rectify_count`: the keys of the gradient table, which a test
#: checks against the C++ table (``kActivations`` in ``csrc/rectify_args.cpp``).
ACTIVATIONS = tuple(GRADIENTS)


def rectify_count(
    input: Tensor,
    activation: str = "relu",
    *,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    weight: Optional[Tensor] = None,
    channel_dim: int = 1,
) -> tuple[Tensor, Tensor]:
    """Applies a rectifier and counts each channel's ON elements in the same pass.

    An element is ON when its pre-activation is ``> 0`` (the rectifier's open region; ``0``, ``-0.0``
    and NaN are OFF). The EASIER reference code counts ``>= 0`` instead; the two differ only on
    exact zeros. For the smooth rectifier-shaped activations (GELU, SiLU, Hardswish, ELU, Mish)
    ``> 0`` is the side on which they approach the identity.

    Args:
        input: floating-point tensor (float32, float64, float16, bfloat16), any layout.
        activation: one of :data:`ACTIVATIONS`. ``"gelu"`` is the exact GELU and ``"gelu_tanh"``
            its tanh approximation; ``"elu"`` is ``F.elu`` (``x`` for ``x >= 0``, else
            ``alpha * (exp(x) - 1)``).
        negative_slope: slope for ``x <= 0`` of ``"leaky_relu"``; ignored otherwise.
        alpha: ``"elu"``'s ``alpha``; ignored otherwise.
        weight: ``"prelu"``'s learnable slope, one value or one per channel, same dtype and device
            as ``input``; must be ``None`` for the other activations.
        channel_dim: the dim whose indices are the neurons (1 for ``(N, C, ...)`` conv outputs,
            ``-1`` for ``(..., C)`` Linear outputs). Counts run over every other dim.

    Returns:
        ``(output, on_counts)``: the activation's output, equal to torch's functional, with the
        same sizes and memory format as ``input``; and an int64 tensor of shape ``(C,)`` with
        each channel's number of ON elements. Each channel was observed
        ``input.numel() // C`` times.
    """
    args = (input, activation, _scalar(activation, negative_slope, alpha), weight, channel_dim)
    if not torch.compiler.is_compiling():
        result = _extension._C.rectify_count_no_grad(*args)
        if result is not None:
            return result
    return torch.ops.easier_ext.rectify_count.default(*args)


def rectify_count_(
    input: Tensor,
    activation: str = "relu",
    *,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    weight: Optional[Tensor] = None,
    channel_dim: int = 1,
) -> Tensor:
    """In-place :func:`rectify_count`: writes the activation into ``input`` and returns the counts.

    For inference: it has no autograd formula (like any in-place activation, it would destroy the
    input its backward needs). It saves allocating a new output, which for large tensors costs
    page faults as well as memory.

    Args:
        input: as in :func:`rectify_count`; overwritten with the output.
        activation, negative_slope, alpha, weight, channel_dim: as in :func:`rectify_count`.

    Returns:
        int64 tensor of shape ``(C,)``: each channel's number of ON elements (counted before
        ``input`` was overwritten).
    """
    args = (input, activation, _scalar(activation, negative_slope, alpha), weight, channel_dim)
    if not torch.compiler.is_compiling():
        counts = _extension._C.rectify_count_no_grad_(*args)
        if counts is not None:
            return counts
    return torch.ops.easier_ext.rectify_count_.default(*args)


def rectify_count_entropy(
    input: Tensor,
    activation: str = "relu",
    *,
    tau: float,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    weight: Optional[Tensor] = None,
    channel_dim: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rectify_count` plus a differentiable proxy of each channel's ON/OFF entropy, in the
    same pass over ``input``.

    Each element ``z`` gets ``p = sigmoid(z / tau)``, a soft ON state, and its binary entropy
    ``H(p) = -p log2 p - (1 - p) log2(1 - p)`` bits: 1 at ``z = 0``, towards 0 once ``|z|`` is a few
    ``tau`` away from it. A loss term on the sums pushes pre-activations away from zero, where the
    ON/OFF state is undecided, and is differentiable where the counts are not. It costs no memory
    beyond what the activation's backward keeps (the input).

    Args:
        input, activation, negative_slope, alpha, weight, channel_dim: as in :func:`rectify_count`.
        tau: the sigmoid's temperature, positive and finite (else ``ValueError``, before any
            output is made): the scale of ``z`` over which ``H`` falls from 1 bit towards 0.

    Returns:
        ``(output, on_counts, entropy_sums)``: the first two exactly as :func:`rectify_count`
        returns them; ``entropy_sums`` of shape ``(C,)`` holds each channel's sum of ``H`` over its
        ``input.numel() // C`` elements, float64 for a float64 input and float32 otherwise
        (summed in float32 lanes and double partial sums). A NaN element makes its channel's sum
        NaN; +-inf elements add 0. Its gradient flows back to ``input`` along with the output's.
    """
    args = (input, activation, _scalar(activation, negative_slope, alpha), weight, channel_dim, tau)
    return torch.ops.easier_ext.rectify_count_entropy.default(*args)


def _scalar(activation: str, negative_slope: float, alpha: float) -> float:
    """The op's one scalar argument (``alpha`` in the schema): ELU's alpha or LeakyReLU's slope."""
    return alpha if activation == "elu" else negative_slope


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_args(input, activation, weight, channel_dim, tau=None) -> None:
    """The C++ kernels' argument checks (csrc/rectify_args.cpp), with the same messages and types,
    in the same order; ``tau`` (rectify_count_entropy's) is checked last, as there.

    The fake kernel is also the Meta kernel, which the dispatcher picks whenever any tensor
    argument is on the meta device: a meta weight with a CPU input lands here, not in the CPU
    kernel, so without these checks the call would return uninitialized CPU tensors.
    """
    if weight is not None:
        torch._check(
            weight.device == input.device,
            lambda: f"easier_ext.rectify_count: expected weight on {input.device} (the input's device), "
            f"got {weight.device}",
        )
    torch._check_value(
        activation in ACTIVATIONS,
        lambda: f"easier_ext.rectify_count: unknown activation '{activation}'; expected one of {', '.join(ACTIVATIONS)}",
    )
    torch._check_type(
        input.dtype in _FLOAT_DTYPES,
        lambda: "easier_ext.rectify_count: expected a floating-point input (float32, float64, float16 or "
        f"bfloat16), got {input.dtype}",
    )
    torch._check_value(
        input.dim() >= 1,
        lambda: "easier_ext.rectify_count: expected an input with at least 1 dimension (a channel dim to count "
        "over), got a 0-d tensor",
    )
    ndim = input.dim()
    torch._check_index(
        -ndim <= channel_dim < ndim,
        lambda: f"easier_ext.rectify_count: channel_dim {channel_dim} is out of range for a {ndim}-d input of "
        f"shape {list(input.shape)} (expected a value in [{-ndim}, {ndim - 1}])",
    )
    _check_weight(input, activation, weight, channel_dim)
    if tau is not None:
        # `< inf` also refuses NaN; :g prints the value as C++ streams a double.
        torch._check_value(
            tau > 0 and tau < math.inf,
            lambda: f"easier_ext.rectify_count_entropy: tau must be a positive, finite temperature, got {tau:g}",
        )


def _check_weight(input, activation, weight, channel_dim) -> None:
    """The prelu weight's checks, the last of :func:`_check_args`' shared ones."""
    if activation != "prelu":
        torch._check_value(
            weight is None,
            lambda: "easier_ext.rectify_count: a weight is only used by 'prelu'; got one for another activation",
        )
        return
    channels = input.shape[channel_dim]
    torch._check_value(
        weight is not None, lambda: f"easier_ext.rectify_count: 'prelu' needs a weight tensor of 1 or {channels} values"
    )
    # `|`, not `or`: with symbolic shapes this stays a SymBool instead of specializing.
    torch._check_value(
        weight.dim() <= 1 and ((weight.numel() == 1) | (weight.numel() == channels)),
        lambda: f"easier_ext.rectify_count: prelu weight of shape {list(weight.shape)} does not match the input: "
        f"expected 1 value or one per channel ({channels} along the channel dim)",
    )
    torch._check_type(
        weight.dtype == input.dtype,
        lambda: f"easier_ext.rectify_count: prelu weight has dtype {weight.dtype} but the input has {input.dtype}; "
        "expected the same dtype",
    )


@torch.library.register_fake("easier_ext::rectify_count")
def _rectify_count_fake(input, activation, alpha, weight, channel_dim):
    _check_args(input, activation, weight, channel_dim)
    channels = input.shape[channel_dim]
    return torch.empty_like(input), input.new_empty((channels,), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    input, activation, alpha, weight, channel_dim = inputs
    out, _ = output
    ctx.activation = activation
    ctx.alpha = alpha
    ctx.channel_dim = channel_dim
    # Keep what torch keeps for the same activation: relu's output (which the next layer holds
    # anyway), the input for the others.
    ctx.save_for_backward(out if activation == "relu" else input, weight)


def _activation_gradients(ctx, grad_out, saved, weight):
    """(grad_input, grad_weight) of the activation alone; ``saved`` as GRADIENTS takes it."""
    grad_input = GRADIENTS[ctx.activation](grad_out, saved, ctx.alpha, weight, ctx.channel_dim)
    grad_weight = prelu_weight_gradient(grad_out, saved, weight, ctx.channel_dim) if ctx.activation == "prelu" else None
    return grad_input, grad_weight


def _backward(ctx, grad_out, _grad_counts):
    saved, weight = ctx.saved_tensors
    grad_input, grad_weight = _activation_gradients(ctx, grad_out, saved, weight)
    return grad_input, None, None, grad_weight, None


torch.library.register_autograd("easier_ext::rectify_count", _backward, setup_context=_setup_context)


@torch.library.register_fake("easier_ext::rectify_count_")
def _rectify_count_inplace_fake(input, activation, alpha, weight, channel_dim):
    _, counts = _rectify_count_fake(input, activation, alpha, weight, channel_dim)
    return counts


def _sums_dtype(dtype: torch.dtype) -> torch.dtype:
    # entropy_sums_dtype in C++: the kernels accumulate float32, float16 and bfloat16 in float32
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("easier_ext::rectify_count_entropy")
def _rectify_count_entropy_fake(input, activation, alpha, weight, channel_dim, tau):
    _check_args(input, activation, weight, channel_dim, tau)
    channels = input.shape[channel_dim]
    sums_dtype = _sums_dtype(input.dtype)
    return (
        torch.empty_like(input),
        input.new_empty((channels,), dtype=torch.int64),
        input.new_empty((channels,), dtype=sums_dtype),
    )


@torch.library.register_fake("easier_ext::entropy_proxy_grad_")
def _entropy_proxy_grad_fake(grad_input, input, grad_sums, tau, channel_dim):
    # updates grad_input in place and returns nothing: the same under fake tensors (torch.compile's
    # traced backward), where only the arguments' agreement can be checked
    sums_dtype = _sums_dtype(input.dtype)
    torch._check(-input.dim() <= channel_dim < input.dim(), lambda: f"channel_dim {channel_dim} is out of range")
    torch._check(grad_input.shape == input.shape and grad_input.dtype == input.dtype
                 and grad_sums.shape == (input.shape[channel_dim],) and grad_sums.dtype == sums_dtype,
                 lambda: f"easier_ext.entropy_proxy_grad_: grad_input {tuple(grad_input.shape)} {grad_input.dtype} and "
                         f"grad_sums {tuple(grad_sums.shape)} {grad_sums.dtype} do not match the input "
                         f"{tuple(input.shape)} {input.dtype} (channel_dim {channel_dim})")


def _setup_entropy_context(ctx, inputs, output):
    input, activation, alpha, weight, channel_dim, tau = inputs
    ctx.activation = activation
    ctx.alpha = alpha
    ctx.channel_dim = channel_dim
    ctx.tau = tau
    # The entropy term's gradient needs the input, so it is what every activation keeps here (relu's
    # gradient is the same computed from its input as from its output: both are > 0 at once).
    ctx.save_for_backward(input, weight)


def _entropy_backward(ctx, grad_out, _grad_counts, grad_sums):
    x, weight = ctx.saved_tensors
    grad_input, grad_weight = _activation_gradients(ctx, grad_out, x, weight)
    # GRADIENTS' entries return a new tensor, which entropy_proxy_gradient may add to in place.
    if grad_sums is not None:
        grad_input = entropy_proxy_gradient(grad_sums, x, ctx.tau, ctx.channel_dim, grad_input=grad_input)
    return grad_input, None, None, grad_weight, None, None


torch.library.register_autograd(
    "easier_ext::rectify_count_entropy", _entropy_backward, setup_context=_setup_entropy_context
)

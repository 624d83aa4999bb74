"""Multiply-accumulates: the one MAC model of the package.

- :func:`own_macs` and :func:`segment_macs` price conv and linear layers, alone or merged into
  one (what :func:`easier_ext.surgery.merge.compose_convs` and ``compose_linears`` build), per
  output position and without an input, so that planning a merge needs no forward;
- :func:`count_macs` counts the MACs of one whole forward of a model on an input, as
  :func:`easier_ext.surgery.costs.cost` reports them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from easier_ext.surgery.conv_geometry import common_groups, receptive_field

__all__ = ["count_macs", "own_macs", "segment_macs"]

aten = torch.ops.aten


# -- layers, per output position -------------------------------------------------------------


def _conv_macs(in_channels: int, out_channels: int, groups: int, kernel: Sequence[int]) -> int:
    # every output channel reads in_channels / groups input channels over the whole kernel
    return in_channels // groups * out_channels * math.prod(kernel)


def own_macs(layers: Sequence[nn.Module]) -> int:
    """MACs per output position (all output channels of it) of the layers merged into one, or of
    the single layer as it is.

    Border effects are ignored, so that layers and their merged layer compare without knowing
    the input. The layers are not checked for a merge being exact, so that a planner can price
    chains that would first need their padding moved.

    Args:
        layers: a chain of convs or of linears, first applied first (at least one).

    Returns:
        a linear chain ``in_1 * out_n``; one conv ``Cin / g * Cout * prod(k)``; a conv chain
        ``Cin_1 / g * Cout_n * prod(R)``, with ``g`` the merged groups and ``R`` the receptive
        field (the merged kernel).
    """
    first, last = layers[0], layers[-1]
    if isinstance(first, nn.Linear):
        return first.in_features * last.out_features
    if len(layers) == 1:
        # priced as it is: a dilated conv reads its kernel's taps, not the receptive field merging expands it to
        return _conv_macs(first.in_channels, first.out_channels, first.groups, first.kernel_size)
    return _conv_macs(first.in_channels, last.out_channels, common_groups(layers), receptive_field(layers))


def segment_macs(layers: Sequence[nn.Module], start: int, stop: int) -> int:
    """MACs of ``layers[start:stop]`` merged into one, per output position of the whole chain.

    Args:
        layers: a chain of convs or of linears, first applied first.
        start: first layer of the run.
        stop: one past its last layer.

    Returns:
        :func:`own_macs` of the run, times how many of its output positions feed one output
        position of the chain: the product of the later convs' strides (1 for linears). The sum
        over the runs of a chain is the chain's cost when each run is merged.
    """
    return own_macs(layers[start:stop]) * math.prod(
        math.prod(layer.stride) for layer in layers[stop:] if isinstance(layer, _ConvNd)
    )


# -- a whole forward ---------------------------------------------------------------------------


# FlopCounterMode has no formula for these, and an op without one counts zero flops: the fused CPU
# attention kernel (what scaled_dot_product_attention runs on CPU when it can), and matrix-vector
# products (what a torch.nn.Linear runs on an unbatched, 1-d input).
def _attention_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # q @ k^T, then softmax(.) @ v; leading dims of q are the batch (and heads, which grouped-query
    # attention broadcasts k and v to)
    batch = math.prod(q_shape[:-2])
    (length, e), source, ev = q_shape[-2:], k_shape[-2], v_shape[-1]
    return 2 * batch * length * source * (e + ev)


def _native_mha_flop(q_shape, k_shape, v_shape, embed_dim, *args, out_shape=None, **kwargs) -> int:
    # what nn.MultiheadAttention's fast path (eval, no grad) runs in one op: the q, k and v
    # projections, q @ k^T and softmax(.) @ v over all heads, and the output projection
    batch, (length, e), source = math.prod(q_shape[:-2]), q_shape[-2:], k_shape[-2]
    macs = batch * (length * e * e + 2 * source * e * e + 2 * length * source * e + length * e * e)
    return 2 * macs


def _mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _addmv_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _mv_flop(a_shape, b_shape)


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


_EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flop,
    aten._scaled_dot_product_fused_attention_overrideable: _attention_flop,
    aten._native_multi_head_attention: _native_mha_flop,
    aten.mv: _mv_flop,
    aten.addmv: _addmv_flop,
    aten.dot: _dot_flop,
    aten.vdot: _dot_flop,
}


def count_macs(model: nn.Module, args: tuple) -> int:
    """Multiply-accumulates of one forward, as FlopCounterMode counts them (a MAC is two of its
    flops). An op that multiplies and accumulates but has no formula would count zero: it is
    named in a warning.

    Args:
        model: the model, already in the state to measure (eval, ``no_grad``).
        args: its positional arguments.

    Returns:
        the MACs of ``model(*args)``.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    ran = _OpsRun()
    with counter, ran:
        model(*args)
    uncounted = sorted({str(op) for op in ran.ops if op not in counter.flop_registry and _MAC_OP.search(str(op))})
    if uncounted:
        warnings.warn(f"easier_ext.cost: no MAC count for {', '.join(uncounted)}; the MACs reported leave them out", stacklevel=3)
    return counter.get_total_flops() // 2


# names of aten ops that multiply and accumulate (a matmul, a convolution, attention, ...)
_MAC_OP = re.compile(r"conv|mm\b|mm_|matmul|linear|attention|einsum|bmm|addmv|\bdot|baddbmm|addbmm|mkldnn|quantized")


class _OpsRun(TorchDispatchMode):
    """Records the op packets a forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))

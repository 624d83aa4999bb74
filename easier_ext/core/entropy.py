"""Binary entropy of rectifier ON/OFF states, from ON counts and observation totals."""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

__all__ = ["AGGREGATES", "binary_entropy", "layer_entropy"]

#: Layer aggregates: ``"easier"`` is the mean over all neurons (EASIER); ``"nepenthe"`` is the
#: mean over the neurons that are neither always ON nor always OFF, 0 when there are none
#: (NEPENTHE / EGP).
AGGREGATES = ("easier", "nepenthe")


def _check_counts(on_counts: Tensor, observations: Union[Tensor, int]) -> Tensor:
    if not isinstance(on_counts, Tensor) or on_counts.dtype != torch.int64 or on_counts.dim() != 1:
        got = f"{on_counts.dtype} tensor of shape {tuple(on_counts.shape)}" if isinstance(on_counts, Tensor) else type(on_counts).__name__
        raise TypeError(f"on_counts must be a 1-d int64 tensor (one count per neuron), got a {got}")
    obs = torch.as_tensor(observations, device=on_counts.device)
    if obs.dim() != 0 or obs.is_floating_point() or obs.is_complex():
        raise TypeError(f"observations must be an integer or a 0-d integer tensor, got {observations!r}")
    return obs.to(torch.int64)


def binary_entropy(on_counts: Tensor, observations: Union[Tensor, int]) -> Tensor:
    """Per-neuron binary entropy of the ON/OFF state, in bits.

    With ``p = on_counts / observations``, ``H = -p log2 p - (1 - p) log2 (1 - p)``. ``H`` is in
    ``[0, 1]``, exactly 0 for a neuron that was always ON or always OFF, and 0 (never NaN) when
    nothing was observed.

    Args:
        on_counts: int64 tensor of shape ``(C,)``: how often each neuron was ON.
        observations: how often each neuron was observed (an int or a 0-d integer tensor).

    Returns:
        float64 tensor of shape ``(C,)`` on ``on_counts``' device.
    """
    obs = _check_counts(on_counts, observations)
    p = on_counts.to(torch.float64) / obs.clamp_min(1).to(torch.float64)
    p = p.clamp(0.0, 1.0)
    h = (torch.special.entr(p) + torch.special.entr(1.0 - p)) / math.log(2.0)
    return h.clamp(0.0, 1.0)


def layer_entropy(on_counts: Tensor, observations: Union[Tensor, int], aggregate: str = "easier") -> Tensor:
    """One entropy for a whole activation layer.

    Args:
        on_counts: int64 tensor of shape ``(C,)``: how often each neuron was ON.
        observations: how often each neuron was observed.
        aggregate: ``"easier"``, the mean over all neurons; or ``"nepenthe"``, the mean over the
            neurons that are neither always ON nor always OFF (0 when there are none).

    Returns:
        0-d float64 tensor in ``[0, 1]`` (0 for a layer with no neurons).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown entropy aggregate {aggregate!r}; expected one of {AGGREGATES}")
    h = binary_entropy(on_counts, observations)
    if aggregate == "easier":
        keep = torch.ones_like(h, dtype=torch.bool)
    else:
        obs = _check_counts(on_counts, observations)
        keep = (on_counts > 0) & (on_counts < obs)
    # Masked mean without a host sync: 0 / 1 when nothing is kept.
    return (h * keep).sum() / keep.sum().clamp_min(1)

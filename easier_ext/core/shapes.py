"""Per-channel values shaped to broadcast against a tensor: one helper for the op's prelu weight,
a linearized site's multiplier and fold's per-channel scales."""

from __future__ import annotations

from torch import Tensor

__all__ = ["channel_view"]


def channel_view(values: Tensor, ndim: int, dim: int) -> Tensor:
    """``values`` (one per channel, or a single one) shaped to broadcast along ``dim``.

    Args:
        values: a tensor of ``C`` values, or of one value (shared by every channel).
        ndim: the rank of the tensor it will broadcast against.
        dim: the channel dim of that tensor (negative counts from the end).

    Returns:
        a view of ``values``: 0-d for a single value, else ``C`` along ``dim`` and 1 elsewhere.
    """
    if values.numel() == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[dim % ndim] = values.numel()
    return values.reshape(shape)

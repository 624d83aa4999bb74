"""What finetuning and evaluation do across ``torch.distributed`` ranks: the DDP wrapper a
finetune trains through, and the reductions that make every rank see the same numbers. Alone (one
process) each is a no-op."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from easier_ext.core.modules import EntropyActivation
from easier_ext.core.runtime import world_size

__all__ = ["collective_device", "has_unused_parameters", "max_over_ranks", "min_over_ranks", "sum_over_ranks",
           "training_module"]


@contextlib.contextmanager
def training_module(model: nn.Module, net: nn.Module, device: torch.device):
    """Yields the module to train: ``model`` itself, or a DDP wrapper of it made for this call.

    A wrapper made here has its autograd hooks removed on exit, so that the bare module trains
    normally afterwards and a later call can wrap it again.

    Args:
        model: what the caller was given (a DDP wrapper is used as is).
        net: the bare module (``model`` unwrapped).
        device: where the batches go (a CUDA device's index for DDP's ``device_ids``).
    """
    if isinstance(model, DistributedDataParallel) or world_size() == 1:
        yield model
        return
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    ddp = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=has_unused_parameters(net))
    try:
        yield ddp
    finally:
        remove = getattr(ddp, "_remove_autograd_hooks", None)  # private, hence guarded
        if remove is not None:
            remove()
        del ddp


def has_unused_parameters(net: nn.Module) -> bool:
    """Whether a site of ``net`` keeps a trainable parameter it no longer uses (DDP's
    ``find_unused_parameters``)."""
    # A linearized PReLU keeps its slope parameter but no longer uses it; DDP would wait for its
    # gradient forever unless told to look for unused parameters (which costs a graph traversal
    # per step, so only when needed).
    return any(
        isinstance(m, EntropyActivation) and m.linearized and any(p.requires_grad for p in m.parameters())
        for m in net.modules()
    )


def collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensor must be: nccl only moves CUDA tensors; gloo takes either."""
    if dist.get_backend() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def sum_over_ranks(values: list[Tensor], device: torch.device) -> list[float]:
    """Sums scalars over the ranks in one collective; one host sync."""
    stacked = torch.stack([v.to(device, torch.float64) for v in values])
    if world_size() > 1:
        stacked = stacked.to(collective_device(device))
        dist.all_reduce(stacked)
    return stacked.tolist()


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest of the ranks' values (``value`` itself in one process)."""
    return _reduce_over_ranks(value, device, "MAX")


def min_over_ranks(value: float, device: torch.device) -> float:
    """The smallest of the ranks' values (``value`` itself in one process)."""
    return _reduce_over_ranks(value, device, "MIN")


def _reduce_over_ranks(value: float, device: torch.device, op: str) -> float:
    # the op by name, looked up only when distributed: a torch built without torch.distributed
    # has no dist.ReduceOp, and single-process callers must not need it
    if world_size() == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return float(t)

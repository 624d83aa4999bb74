"""What a pass over a loader needs around the model: the model's device, an autocast context, the
number of batches to expect and a progress bar that only rank 0 shows.

Shared by measurement (``surgery.measure``) and finetuning (``methods.train``), which run the same
kind of loop and must agree on these. Works alone or under ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import ContextManager, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

__all__ = ["autocast", "batch_count", "is_main_process", "model_device", "progress", "unwrap_ddp", "world_size"]


def model_device(module: nn.Module) -> torch.device:
    """Where the module's tensors are, judged by its first parameter, else its first buffer.

    Args:
        module: any module (a DDP wrapper too: its parameters are the wrapped module's).

    Returns:
        the device of the first parameter, else of the first buffer; the CPU for a module with
        neither, since that is where its (tensor-free) forward would run.
    """
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def autocast(device: Union[str, torch.device], amp: Union[bool, torch.dtype]) -> ContextManager:
    """An autocast context for ``device``, or a context that does nothing.

    One behaviour for both callers: :func:`easier_ext.measure_entropy` passes its ``amp`` as is
    (so ``True`` on the CPU means bfloat16), while :func:`easier_ext.finetune` and
    :func:`easier_ext.evaluate` want float16 on CUDA only and pass ``amp and device.type ==
    "cuda"``, which gets them float16 on CUDA and nothing elsewhere.

    Args:
        device: where the forward runs; its type (``"cuda"``, ``"cpu"``) is autocast's device.
        amp: a dtype to autocast to; or ``True`` for the device's usual low precision (float16 on
            CUDA, bfloat16 elsewhere, where float16 matmuls are slow or missing); or a false
            value (``False``, ``None``, ``0``) for no autocast.

    Returns:
        ``torch.autocast(device.type, dtype=...)``, or ``contextlib.nullcontext()`` when ``amp``
        is false.
    """
    device = torch.device(device)
    if isinstance(amp, torch.dtype):
        return torch.autocast(device.type, dtype=amp)
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def batch_count(loader: Iterable, max_batches: Optional[int] = None) -> Optional[int]:
    """How many batches a pass over ``loader`` stopped after ``max_batches`` will see.

    Args:
        loader: any iterable; its ``len`` is used when it has one.
        max_batches: the cap on the pass, or ``None`` for none.

    Returns:
        ``min(len(loader), max_batches)``, or whichever of the two is known; ``None`` when neither
        is (an iterable without ``len`` and no cap).
    """
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def world_size() -> int:
    """The number of processes of the default ``torch.distributed`` group (1 when not distributed).

    Returns:
        the world size.
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps, or ``model`` itself.

    Args:
        model: any module.

    Returns:
        the module whose parameters and submodules are the model's.
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_main_process() -> bool:
    """Rank 0 of an initialized ``torch.distributed`` process group, or the only process.

    Returns:
        ``True`` when not distributed or on rank 0, else ``False``.
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "", enabled: bool = True) -> tqdm:
    """A progress bar over batches, shown on rank 0 only and removed when it closes.

    Every rank gets a bar, so the loop's code is the same everywhere, but only one prints: ranks
    share a terminal and their bars would overwrite each other.

    Args:
        iterable: what to iterate over, or ``None`` for a bar advanced by ``update()``.
        total: the expected number of batches (see :func:`batch_count`), or ``None`` if unknown.
        desc: the bar's label.
        enabled: ``False`` hides the bar on every rank.

    Returns:
        a ``tqdm`` bar, disabled unless ``enabled`` and :func:`is_main_process`; a disabled bar
        still iterates and accepts ``update``, ``set_postfix`` and ``close``.
    """
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not (enabled and is_main_process()), leave=False)

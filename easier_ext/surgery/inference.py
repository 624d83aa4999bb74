"""How the cost measurements (``costs``, ``latency``) run a model: on its positional arguments,
as inference runs it, leaving it as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from easier_ext.core.modules import EntropyActivation

__all__ = ["as_args", "measuring"]


def as_args(example_input: Any) -> tuple:
    """The model's positional arguments.

    Args:
        example_input: a tensor, or a tuple of the model's positional arguments.

    Returns:
        the tuple of arguments.

    Raises:
        TypeError: for anything else, or a tuple without a tensor.
    """
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    # A list is refused rather than guessed at: it could be one argument or several.
    if isinstance(example_input, tuple) and any(isinstance(a, torch.Tensor) for a in example_input):
        return example_input
    raise TypeError(
        "example_input must be a tensor or a tuple of the model's positional arguments holding at least one tensor, "
        f"got {_describe(example_input)}"
    )


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode, easier_ext sites not counting, for the duration; then every module's flags and
    buffers as they were.

    Flags are restored module by module, since a model may mix training and eval submodules on
    purpose (a frozen BatchNorm). Buffers are restored because a forward may write them (a
    counter), and the measurement runs many forwards.

    Args:
        model: the model to measure.

    Yields:
        nothing; the model is set up for measuring until the block ends.
    """
    training = {m: m.training for m in model.modules()}
    tracking = {m: m.track for m in model.modules() if isinstance(m, EntropyActivation)}
    buffers = [(m, name, b, b.clone()) for m in model.modules() for name, b in m.named_buffers(recurse=False)]
    try:
        model.eval()
        for m in tracking:
            # a counting site would run its counting kernel (not what inference runs) and count
            m.track = False
        yield
    finally:
        for m, flag in training.items():
            m.training = flag
        for m, flag in tracking.items():
            m.track = flag
        with torch.no_grad():
            for m, name, original, value in buffers:
                setattr(m, name, original)  # a forward may have rebound it to a new tensor
                if not torch.equal(original, value):
                    original.copy_(value)

"""Argument checks shared by the public entry points."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["is_int", "is_real"]


def is_real(value: Any) -> bool:
    """A finite real number that is not a bool (``True`` is an int to Python, not a learning rate)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """An int that is not a bool (``epochs=True`` is a mistake, not 1 epoch)."""
    return isinstance(value, int) and not isinstance(value, bool)

"""A run's costs as text, the same in the report's tables and on the plots' bar labels, written
with :mod:`easier_ext.surgery.costs`'s formats; :func:`cost_ratio` also reads the run's paired
latency rounds, and says so when the latency change is within noise.
"""

from __future__ import annotations

import math

from easier_ext.app.runlog import Run
from easier_ext.surgery import costs
from easier_ext.surgery.costs import LatencyComparison, format_seconds

__all__ = ["cost_ratio", "format_cost", "format_count", "is_positive"]


def format_count(n: float | None) -> str:
    """A count with an SI prefix: ``11173962`` is ``"11.17 M"``, ``557`` is ``"557"``.

    Args:
        n: the count, or ``None`` when not measured.

    Returns:
        the text; ``"-"`` for ``None``.
    """
    return "-" if n is None else costs.format_count(n)


def is_positive(x: float | None) -> bool:
    """Whether ``x`` can be the denominator of a ratio: finite and above 0.

    Args:
        x: the number, or ``None`` when not measured.

    Returns:
        True for a finite ``x > 0``.
    """
    return x is not None and math.isfinite(x) and x > 0


def cost_ratio(before: float | None, after: float | None, run: Run | None = None, key: str = "") -> str:
    """``after / before`` as text, e.g. ``"0.75x"``.

    Args:
        before: the dense model's cost.
        after: the reported model's cost.
        run: what :func:`easier_ext.app.runlog.load_run` returns; with ``key="latency_s"`` its
            summary's paired latency rounds decide whether the change is measurable.
        key: the cost's key in the logs (see :data:`easier_ext.app.runlog.COSTS`).

    Returns:
        the ratio; ``"-"`` when either cost is missing or ``before`` is not positive, and
        ``"no measurable change"`` for a latency whose paired rounds disagree on the direction.
    """
    if not is_positive(before) or after is None:
        return "-"
    paired = (run["summary"] or {}).get("latency") if run is not None and key == "latency_s" else None
    if paired and not LatencyComparison(**paired).measurable:  # the two medians differ by noise only
        return "no measurable change"
    return costs.format_ratio(before, after)


def format_cost(key: str, value: float | None) -> str:
    """One cost as the tables and the plots show it.

    Args:
        key: the cost's key in the logs: ``"latency_s"``, ``"depth"``, ``"macs"`` or ``"params"``.
        value: the cost, or ``None`` when not measured.

    Returns:
        seconds in a readable unit for latency, the plain number for depth, a count with an SI
        prefix otherwise; ``"-"`` for ``None``.
    """
    if key == "latency_s":
        return format_seconds(value)
    if key == "depth":
        return "-" if value is None else str(value)
    return format_count(value)

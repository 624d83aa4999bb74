"""How long a model's forward takes: timed alone (:func:`best_latency`, what
:func:`easier_ext.surgery.costs.cost` reports) or against another model in paired rounds
(:func:`compare_latency`), in eager PyTorch or in ONNX Runtime."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from easier_ext.core.checks import is_int
from easier_ext.surgery.inference import as_args, measuring

__all__ = [
    "BACKENDS",
    "LatencyComparison",
    "backend_forward",
    "best_latency",
    "check_backend",
    "check_threads",
    "compare_latency",
    "format_seconds",
    "timed_rounds",
]

#: what a latency can be timed in: ``"eager"`` (the PyTorch model as it is) or ``"onnxruntime"``
#: (the model exported to ONNX, run by an ONNX Runtime CPU session; needs ``easier_ext[onnx]``)
BACKENDS = ("eager", "onnxruntime")


def check_backend(backend: str) -> None:
    """Refuses a backend that is not one of :data:`BACKENDS`.

    Args:
        backend: the backend asked for.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def check_threads(threads: int | None) -> None:
    """Refuses a thread count that is neither a positive int nor None.

    Args:
        threads: the CPU threads asked for.
    """
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")


def backend_forward(model: nn.Module, args: tuple, backend: str, threads: int) -> Callable[[], Any]:
    """One forward of ``model`` on ``args`` in ``backend``, as a call of no arguments: what the
    timing loops run (the ONNX export happens here, once, before any timing).

    Args:
        model: the model, set up for measuring.
        args: its positional arguments.
        backend: one of :data:`BACKENDS`.
        threads: the ONNX Runtime session's intra-op threads (eager runs with torch's).

    Returns:
        the forward, taking no arguments.
    """
    if backend == "onnxruntime":
        from easier_ext.surgery.export import onnxruntime_runner

        return onnxruntime_runner(model, args, threads=threads)
    return lambda: model(*args)


def best_latency(forward: Callable[[], Any], threads: int, min_run_time: float) -> float:
    """Seconds of one ``forward()`` in the fastest of the timed blocks (Timer synchronizes CUDA
    around each block): other load on the machine only ever slows a block down, so the fastest is
    the model's own time, where a median or a single block can be any of them.

    Args:
        forward: what to time, taking no arguments.
        threads: CPU threads to time with.
        min_run_time: seconds to spend timing, at least.

    Returns:
        the seconds of one call.
    """
    # Imported here: torch.utils.benchmark imports cpp_extension, which warns on import without CUDA.
    from torch.utils.benchmark import Timer

    timer = Timer("forward()", globals={"forward": forward}, num_threads=threads)
    return min(timer.blocked_autorange(min_run_time=min_run_time).times)


def timed_rounds(calls: dict[str, Callable[..., Any]], args: tuple = (), *, rounds: int, min_time: float = 0.0,
                 sync: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, measured in rounds of one call of each in a
    shuffled order, so that every call sees the same machine state (other load, and the state the
    previous call leaves: caches, and the allocator's, which decides whether a large output is
    fresh, page-faulting memory or reused memory).

    Args:
        calls: what to time, by name; each is called once untimed first (a warm-up, and a compile).
        args: the positional arguments of every call.
        rounds: how many rounds to time, at least.
        min_time: seconds to keep timing rounds, at least, counted after the warm-up.
        sync: called right before and after each timed call (``torch.cuda.synchronize``, so that
            the time covers the device's work); ``None`` on the CPU.

    Returns:
        the seconds of each call, by name; index i of every list is round i.
    """
    sync = sync or (lambda: None)
    for call in calls.values():
        call(*args)  # warm-up (and compile)
    times = {k: [] for k in calls}
    order = list(calls)
    rng = random.Random(0)
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times[order[0]]) < rounds:
        rng.shuffle(order)
        for k in order:
            call = calls[k]
            sync()
            t0 = time.perf_counter()
            call(*args)
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


@dataclass
class LatencyComparison:
    """Two models timed against each other in paired rounds (see :func:`compare_latency`).

    Attributes:
        before_s, after_s: median seconds of one forward of each model.
        speedup: the median over rounds of before / after in the same round.
        low, high: the quartiles of those per-round ratios.
        rounds: how many rounds were timed.
    """

    before_s: float
    after_s: float
    speedup: float
    low: float
    high: float
    rounds: int

    @property
    def measurable(self) -> bool:
        """Whether the middle half of the rounds agree on the direction (1 is not inside it)."""
        return not self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        spread = f"{self.low:.2f}-{self.high:.2f}x over the middle half of {self.rounds} paired rounds"
        if not self.measurable:
            return f"no measurable change ({spread})"
        return f"{self.speedup:.2f}x {'faster' if self.speedup > 1 else 'slower'} ({spread})"

    def as_dict(self) -> dict:
        """The fields as a plain dict, for JSON logs.

        Returns:
            dict with keys ``before_s``, ``after_s``, ``speedup``, ``low``, ``high`` and ``rounds``.
        """
        return dataclasses.asdict(self)


def compare_latency(before: nn.Module, after: nn.Module, example_input: Any, *, rounds: int = 30,
                    threads: int | None = None, backend: str = "eager") -> LatencyComparison:
    """Times two models' forwards against each other: each round runs one forward of each, in a
    random order, so that both see the same machine (other load, caches, the allocator's state) and
    slow drifts of the load cancel out in the per-round ratio, where two separate timings can each
    be anything. Eval mode and ``no_grad`` as in :func:`easier_ext.surgery.costs.cost`; sites do
    not count.

    Args:
        before: the original model.
        after: the reduced model.
        example_input: a tensor, or a tuple of the models' positional arguments.
        rounds: the rounds to time (after one warm-up forward of each), at least 4.
        threads: CPU threads; ``None`` keeps ``torch.get_num_threads()``.
        backend: what runs each forward: ``"eager"`` or ``"onnxruntime"`` (each model exported
            to ONNX once, before the rounds, as in :func:`easier_ext.surgery.costs.cost`).

    Returns:
        :class:`LatencyComparison`.

    Raises:
        ValueError: ``rounds`` below 4, ``threads`` not positive, or ``backend`` not one of
            :data:`BACKENDS`.
        easier_ext.surgery.export.MissingDependencyError, easier_ext.surgery.export.ExportError: as
            :func:`easier_ext.surgery.costs.cost` with ``backend="onnxruntime"``.
    """
    if not is_int(rounds) or rounds < 4:
        raise ValueError(f"rounds must be an int >= 4 (the ratio's quartiles need them), got {rounds!r}")
    check_threads(threads)
    check_backend(backend)
    args = as_args(example_input)
    cuda = backend == "eager" and any(a.is_cuda for a in args if isinstance(a, torch.Tensor))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        with measuring(before), measuring(after), torch.no_grad():
            forwards = {k: backend_forward(m, args, backend, threads or previous)
                        for k, m in (("before", before), ("after", after))}
            times = timed_rounds(forwards, rounds=rounds, sync=torch.cuda.synchronize if cuda else None)
    finally:
        torch.set_num_threads(previous)
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    low, _, high = statistics.quantiles(ratios, n=4)
    return LatencyComparison(statistics.median(times["before"]), statistics.median(times["after"]),
                             statistics.median(ratios), low, high, rounds)


def format_seconds(s: float | None) -> str:
    """``0.00421`` is ``"4.21 ms"``; ``"-"`` for None or a non-finite value (not measured).

    Args:
        s: seconds, or None.

    Returns:
        ``s`` with two decimals in the largest of s, ms and us it reaches, else in whole ns.
    """
    if s is None or not math.isfinite(s):
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.2f} {unit}"
    return f"{s * 1e9:.0f} ns"

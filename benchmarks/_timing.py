"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from easier_ext.surgery.latency import timed_rounds


def sample_calls(variants, x, device, min_run_time, min_rounds=10):
    """Seconds per call of each variant, one list per variant, measured in rounds of one call of
    each in a shuffled order (:func:`easier_ext.surgery.latency.timed_rounds`, the loop
    ``compare_latency`` times with), for ``min_run_time`` seconds per variant and ``min_rounds``
    rounds at least. Index i of every list is round i."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    return timed_rounds(variants, (x,), rounds=min_rounds, min_time=min_run_time * len(variants), sync=sync)


def time_calls(variants, x, device, min_run_time, min_rounds=10):
    """Median seconds per call of each variant (see :func:`sample_calls`)."""
    return {k: statistics.median(v) for k, v in sample_calls(variants, x, device, min_run_time, min_rounds).items()}


def paired_ratio(samples, variant, baseline):
    """Median over rounds of variant time / baseline time in the same round: slow drifts of the
    machine's load cancel out, which medians of each variant alone do not."""
    return statistics.median(a / b for a, b in zip(samples[variant], samples[baseline]))


def peak_extra_bytes(fn, x, device):
    """Peak memory the call allocates beyond its output tensor(s), from the allocator's own
    records (CUDA caching allocator stats; on the CPU, the profiler's allocation events)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(x)
        live = peak = 0
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
    outs = out if isinstance(out, tuple) else (out,)
    out_bytes = sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
    return max(0, peak - out_bytes)


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side logs start/stop lines to fd 2; keep them out of the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"

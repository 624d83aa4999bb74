"""What a model costs (parameters, MACs, depth, latency), to compare it before and after depth
reduction (rectifiers removed, linear layers merged). The MACs are counted by ``macs``, the
latency timed by ``latency``; the parameters and the depth are counted here.

Example::

    from easier_ext import compare, cost

    before = cost(model, x)
    after = cost(reduced, x)
    print(compare(before, after))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from easier_ext.surgery.inference import as_args, measuring
from easier_ext.surgery.latency import (
    BACKENDS,
    LatencyComparison,
    backend_forward,
    best_latency,
    check_backend,
    check_threads,
    compare_latency,
    format_seconds,
)
from easier_ext.surgery.macs import count_macs

# BACKENDS, LatencyComparison and compare_latency live in ``latency``; they stay importable from
# here, where the package and its users have always imported them.
__all__ = ["BACKENDS", "Cost", "LatencyComparison", "compare", "compare_latency", "cost", "format_count", "format_ratio"]

#: aten ops that are one conv / linear / matmul layer on the path they lie on. make_fx records
#: ``convolution``, ``mm``, ``addmm``, ``bmm`` and ``baddbmm`` for the torch.nn layers; the
#: composite names are here in case a backend keeps them undecomposed.
_LAYER_OPS = frozenset(
    f"aten::{name}"
    for name in (
        # convolutions
        "convolution",
        "_convolution",
        "convolution_overrideable",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "conv_tbc",
        "cudnn_convolution",
        "cudnn_convolution_transpose",
        "mkldnn_convolution",
        "miopen_convolution",
        "miopen_convolution_transpose",
        "miopen_depthwise_convolution",
        "_conv_depthwise2d",
        "_slow_conv2d_forward",
        "slow_conv3d_forward",
        "slow_conv_transpose2d",
        "slow_conv_transpose3d",
        # matrix products
        "linear",
        "mkldnn_linear",
        "matmul",
        "mm",
        "addmm",
        "_addmm_activation",
        "bmm",
        "baddbmm",
        "addbmm",
        "mv",
        "addmv",
        "dot",
        "vdot",
        "_int_mm",
        "_scaled_mm",
    )
)

#: Prefixes of the fused attention ops (``scaled_dot_product_attention`` and the backend kernels
#: it dispatches to, e.g. ``_scaled_dot_product_flash_attention_for_cpu``).
_ATTENTION_PREFIXES = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product",
    "aten::_flash_attention",
    "aten::_efficient_attention",
)

#: Ops whose tensor argument only gives a shape, dtype or device: their output does not depend on
#: the input's values, so no path runs through them.
_SHAPE_ONLY_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "new_zeros",
        "new_ones",
        "new_empty",
        "new_empty_strided",
        "new_full",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "rand_like",
        "randn_like",
        "randint_like",
        "sym_size",
        "sym_numel",
        "sym_stride",
    )
)


@dataclass(frozen=True)
class Cost:
    """What one model costs on one example input.

    Attributes:
        params: number of unique parameters (a parameter shared by several modules counts once).
        macs: multiply-accumulates of one forward on the example input (bias additions,
            normalizations and activations are not counted).
        depth: the longest chain of conv / linear / matmul layers on any path from the input to
            the output (scaled dot-product attention counts as its two matmuls).
        latency_s: seconds of one forward (the fastest of several timed blocks, robust to other
            load on the machine) in the backend :func:`cost` was given, or ``None`` when not
            measured.
    """

    params: int
    macs: int
    depth: int
    latency_s: float | None = None

    def __str__(self) -> str:
        parts = [format_count(self.params, " params"), format_count(self.macs, "MACs"), f"depth {self.depth}"]
        if self.latency_s is not None:
            parts.append(format_seconds(self.latency_s))
        return ", ".join(parts)

    def as_dict(self) -> dict:
        """The fields as a plain dict, for JSON logs.

        Returns:
            dict with keys ``params``, ``macs``, ``depth`` and ``latency_s``.
        """
        return dataclasses.asdict(self)


def cost(
    model: nn.Module,
    example_input: Any,
    *,
    latency: bool = True,
    threads: int | None = None,
    min_run_time: float = 0.5,
    backend: str = "eager",
) -> Cost:
    """Measures what ``model`` costs on ``example_input``.

    The model runs in eval mode under ``torch.no_grad()``, with easier_ext sites
    (:class:`easier_ext.EntropyActivation`) not counting, as in inference. Afterwards every
    module's training flag, ``track`` flag and buffers (e.g. the sites' counts) are what they were.

    The depth comes from tracing the model to aten ops with ``make_fx`` (real tensors, one
    forward), so functional calls inside helper functions count like modules do. Matmuls that
    only combine parameters (no path from the input reaches them) are not part of any chain.

    Args:
        model: the model to measure.
        example_input: a tensor, or a tuple of the model's positional arguments.
        latency: time the forward; when False ``latency_s`` is ``None``.
        threads: CPU threads to time with; ``None`` uses ``torch.get_num_threads()``. The model
            is timed on the example input's device (on CUDA, the timer synchronizes).
        min_run_time: seconds to spend timing, at least (see
            ``torch.utils.benchmark.Timer.blocked_autorange``).
        backend: what the latency times (params, MACs and depth are the PyTorch model's either
            way): ``"eager"``, the model's forward; ``"onnxruntime"``, the model exported to ONNX
            once at the example's shapes (checked against PyTorch) and run by an ONNX Runtime
            session on CPU with ``threads`` intra-op threads, the latency a deployment sees.

    Returns:
        :class:`Cost`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` is not a tensor or a
            tuple holding a tensor.
        ValueError: ``threads`` or ``min_run_time`` is not positive, ``backend`` is not one of
            :data:`BACKENDS`, or the model has parameters that are not initialized yet (lazy
            modules).
        RuntimeError: the model cannot be traced with ``make_fx``.
        easier_ext.surgery.export.MissingDependencyError: ``backend="onnxruntime"`` without onnx,
            onnxscript or onnxruntime installed.
        easier_ext.surgery.export.ExportError: ``backend="onnxruntime"`` and the model cannot be
            exported to ONNX, or its ONNX outputs differ from PyTorch's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = as_args(example_input)
    check_threads(threads)
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be positive, got {min_run_time!r}")
    check_backend(backend)

    with measuring(model), torch.no_grad():
        params = _count_params(model)
        macs = count_macs(model, args)
        depth = _longest_chain(_trace(model, args).graph)
        latency_s = None
        if latency:
            threads = threads or torch.get_num_threads()
            latency_s = best_latency(backend_forward(model, args, backend, threads), threads, min_run_time)
    return Cost(params=params, macs=macs, depth=depth, latency_s=latency_s)


def compare(before: Cost, after: Cost) -> str:
    """A plain-text table of two costs, side by side, with the ratio after / before.

    Args:
        before: the original model's cost.
        after: the reduced model's cost.

    Returns:
        the table, one line per quantity (params, MACs, depth, and latency when either is
        measured), no trailing newline.

    Raises:
        TypeError: ``before`` or ``after`` is not a :class:`Cost`.
    """
    if not isinstance(before, Cost) or not isinstance(after, Cost):
        raise TypeError(f"compare expects two Cost, got {type(before).__name__} and {type(after).__name__}")
    rows = [
        ("", "before", "after", "after/before"),
        ("params", format_count(before.params), format_count(after.params), format_ratio(before.params, after.params)),
        ("MACs", format_count(before.macs), format_count(after.macs), format_ratio(before.macs, after.macs)),
        ("depth", str(before.depth), str(after.depth), format_ratio(before.depth, after.depth)),
    ]
    if before.latency_s is not None or after.latency_s is not None:
        rows.append(("latency", format_seconds(before.latency_s), format_seconds(after.latency_s), format_ratio(before.latency_s, after.latency_s)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [row[0].ljust(widths[0]) + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:])) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# -- params and depth ------------------------------------------------------------------------


def _count_params(model: nn.Module) -> int:
    """Unique parameters: ``parameters()`` yields a shared parameter once."""
    total = 0
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"parameter {name!r} is not initialized yet (a lazy module): run the model once before measuring it"
            )
        total += p.numel()
    return total


def _trace(model: nn.Module, args: tuple) -> fx.GraphModule:
    """The forward as a graph of aten ops.

    Functionalized, so that a write into a tensor (``out[:, :c] = conv(x)``) becomes an edge of
    the graph instead of a mutation the graph does not show.
    """
    try:
        return make_fx(torch.func.functionalize(model, remove="mutations"))(*args)
    except Exception:
        pass  # some in-place ops (relu6_) cannot be functionalized: trace them as they are
    try:
        return make_fx(model)(*args)
    except Exception as e:
        raise RuntimeError(
            f"easier_ext.cost could not trace {type(model).__name__} with make_fx to measure its depth: "
            f"{type(e).__name__}: {e}"
        ) from e


def _longest_chain(graph: fx.Graph) -> int:
    """The most conv / linear / matmul layers on one path from a placeholder to the output.

    Args:
        graph: an aten-level graph (nodes in topological order, as fx keeps them).

    Returns:
        the depth; 0 when the output does not depend on the inputs.
    """
    # Only nodes some input reaches get a depth: the others (parameters, constants, weights
    # computed from parameters) are not on any path from the input.
    depth: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            depth[node] = 0
        elif node.op == "output":
            return max((depth[n] for n in node.all_input_nodes if n in depth), default=0)
        elif node.op == "call_function":
            d = _depth_after(node, depth)
            if d is not None:
                depth[node] = d
    return 0


def _depth_after(node: fx.Node, depth: dict[fx.Node, int]) -> int | None:
    """The depth at ``node``'s output, or None when no input reaches it."""
    name = _op_name(node.target)
    if name in _SHAPE_ONLY_OPS:
        return None
    if name is not None and name.startswith(_ATTENTION_PREFIXES):
        # softmax(q @ k^T + mask) @ v: q and k go through both matmuls, v (and the mask) one.
        q_and_k = set(node.args[:2])
        steps = {n: 2 if n in q_and_k else 1 for n in node.all_input_nodes}
    elif name == "aten::_native_multi_head_attention":
        # the same between the input and output projections
        q_and_k = set(node.args[:2])
        steps = {n: 4 if n in q_and_k else 3 for n in node.all_input_nodes}
    else:
        step = 1 if name in _LAYER_OPS else 0
        steps = {n: step for n in node.all_input_nodes}
    reached = [depth[n] + s for n, s in steps.items() if n in depth]
    return max(reached) if reached else None


def _op_name(target: Any) -> str | None:
    """``"aten::addmm"`` for ``aten.addmm.default``; None for Python callables (getitem)."""
    return target.name() if isinstance(target, torch._ops.OpOverload) else None


# -- formatting ------------------------------------------------------------------------------


def format_count(n: float, unit: str = "") -> str:
    """A count with an SI prefix, the one way every table writes it.

    Args:
        n: the count.
        unit: appended: ``format_count(11173962, " params")`` is ``"11.17 M params"``,
            ``format_count(557, "MACs")`` is ``"557 MACs"``.

    Returns:
        the text.
    """
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit.lstrip()}".rstrip()


def format_ratio(before: float | None, after: float | None) -> str:
    """``after / before`` as text (``"0.75x"``); ``"-"`` when either is missing or ``before`` is
    not a finite number above 0.

    Args:
        before, after: the two costs.

    Returns:
        the text.
    """
    if before is None or after is None or not math.isfinite(before) or before <= 0:
        return "-"
    return f"{after / before:.2f}x"

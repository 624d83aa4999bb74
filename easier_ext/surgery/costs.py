"""What a model costs (parameters, MACs, depth, latency), to compare it before and after depth
reduction (rectifiers removed, linear layers merged).

Example::

    from easier_ext.cost import compare, cost

    before = cost(model, x)
    after = cost(reduced, x)
    print(compare(before, after))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from easier_ext.core.modules import EntropyActivation

__all__ = ["BACKENDS", "Cost", "LatencyComparison", "compare", "compare_latency", "cost"]

#: what a latency can be timed in: ``"eager"`` (the PyTorch model as it is) or ``"onnxruntime"``
#: (the model exported to ONNX, run by an ONNX Runtime CPU session; needs ``easier_ext[onnx]``)
BACKENDS = ("eager", "onnxruntime")

aten = torch.ops.aten

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


# FlopCounterMode has no formula for these, and an op without one counts zero flops: the fused CPU
# attention kernel (what scaled_dot_product_attention runs on CPU when it can), and matrix-vector
# products (what a torch.nn.Linear runs on an unbatched, 1-d input).
def _attention_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # q @ k^T, then softmax(.) @ v; leading dims of q are the batch (and heads, which grouped-query
    # attention broadcasts k and v to)
    batch = math.prod(q_shape[:-2])
    (length, e), source, ev = q_shape[-2:], k_shape[-2], v_shape[-1]
    return 2 * batch * length * source * (e + ev)


def _native_mha_flop(q_shape, k_shape, v_shape, embed_dim, *args, out_shape=None, **kwargs) -> int:
    # what nn.MultiheadAttention's fast path (eval, no grad) runs in one op: the q, k and v
    # projections, q @ k^T and softmax(.) @ v over all heads, and the output projection
    batch, (length, e), source = math.prod(q_shape[:-2]), q_shape[-2:], k_shape[-2]
    macs = batch * (length * e * e + 2 * source * e * e + 2 * length * source * e + length * e * e)
    return 2 * macs


def _mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _addmv_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _mv_flop(a_shape, b_shape)


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


_EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flop,
    aten._scaled_dot_product_fused_attention_overrideable: _attention_flop,
    aten._native_multi_head_attention: _native_mha_flop,
    aten.mv: _mv_flop,
    aten.addmv: _addmv_flop,
    aten.dot: _dot_flop,
    aten.vdot: _dot_flop,
}


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
        parts = [_si(self.params, " params"), _si(self.macs, "MACs"), f"depth {self.depth}"]
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
    args = _as_args(example_input)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be positive, got {min_run_time!r}")
    _check_backend(backend)

    with _measuring(model), torch.no_grad():
        params = _count_params(model)
        macs = _count_macs(model, args)
        depth = _longest_chain(_trace(model, args).graph)
        latency_s = None
        if latency:
            threads = threads or torch.get_num_threads()
            latency_s = _best_latency(_forward(model, args, backend, threads), threads, min_run_time)
    return Cost(params=params, macs=macs, depth=depth, latency_s=latency_s)


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
        """The fields as a plain dict, for JSON logs."""
        return dataclasses.asdict(self)


def compare_latency(before: nn.Module, after: nn.Module, example_input: Any, *, rounds: int = 30,
                    threads: int | None = None, backend: str = "eager") -> LatencyComparison:
    """Times two models' forwards against each other: each round runs one forward of each, in a
    random order, so that both see the same machine (other load, caches, the allocator's state) and
    slow drifts of the load cancel out in the per-round ratio, where two separate timings can each
    be anything. Eval mode and ``no_grad`` as in :func:`cost`; sites do not count.

    Args:
        before: the original model.
        after: the reduced model.
        example_input: a tensor, or a tuple of the models' positional arguments.
        rounds: the rounds to time (after one warm-up forward of each), at least 4.
        threads: CPU threads; ``None`` keeps ``torch.get_num_threads()``.
        backend: what runs each forward: ``"eager"`` or ``"onnxruntime"`` (each model exported
            to ONNX once, before the rounds, as in :func:`cost`).

    Returns:
        :class:`LatencyComparison`.

    Raises:
        ValueError: ``rounds`` below 4, ``threads`` not positive, or ``backend`` not one of
            :data:`BACKENDS`.
        easier_ext.surgery.export.MissingDependencyError, easier_ext.surgery.export.ExportError: as :func:`cost`
            with ``backend="onnxruntime"``.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 4:
        raise ValueError(f"rounds must be an int >= 4 (the ratio's quartiles need them), got {rounds!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    _check_backend(backend)
    args = _as_args(example_input)
    cuda = backend == "eager" and any(a.is_cuda for a in args if isinstance(a, torch.Tensor))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {"before": [], "after": []}
    order = list(times)
    rng = random.Random(0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        with _measuring(before), _measuring(after), torch.no_grad():
            forwards = {k: _forward(m, args, backend, threads or previous) for k, m in zip(order, (before, after))}
            for forward in forwards.values():
                forward()  # warm-up
            for _ in range(rounds):
                rng.shuffle(order)
                for k in order:
                    sync()
                    t0 = time.perf_counter()
                    forwards[k]()
                    sync()
                    times[k].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    low, _, high = statistics.quantiles(ratios, n=4)
    return LatencyComparison(statistics.median(times["before"]), statistics.median(times["after"]),
                             statistics.median(ratios), low, high, rounds)


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
        ("params", _si(before.params), _si(after.params), _ratio(before.params, after.params)),
        ("MACs", _si(before.macs), _si(after.macs), _ratio(before.macs, after.macs)),
        ("depth", str(before.depth), str(after.depth), _ratio(before.depth, after.depth)),
    ]
    if before.latency_s is not None or after.latency_s is not None:
        rows.append(("latency", format_seconds(before.latency_s), format_seconds(after.latency_s), _ratio(before.latency_s, after.latency_s)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [row[0].ljust(widths[0]) + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:])) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# -- measurements ----------------------------------------------------------------------------


def _as_args(example_input: Any) -> tuple:
    """The model's positional arguments."""
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
def _measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode, easier_ext sites not counting, for the duration; then every module's flags and
    buffers as they were.

    Flags are restored module by module, since a model may mix training and eval submodules on
    purpose (a frozen BatchNorm). Buffers are restored because a forward may write them (a
    counter), and the measurement runs many forwards.
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


def _count_macs(model: nn.Module, args: tuple) -> int:
    """Multiply-accumulates of one forward: FlopCounterMode counts a MAC as two flops. An op that
    multiplies and accumulates but has no formula would count zero: it is named in a warning."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    ran = _OpsRun()
    with counter, ran:
        model(*args)
    uncounted = sorted({str(op) for op in ran.ops if op not in counter.flop_registry and _MAC_OP.search(str(op))})
    if uncounted:
        warnings.warn(f"easier_ext.cost: no MAC count for {', '.join(uncounted)}; the MACs reported leave them out", stacklevel=3)
    return counter.get_total_flops() // 2


# names of aten ops that multiply and accumulate (a matmul, a convolution, attention, ...)
_MAC_OP = re.compile(r"conv|mm\b|mm_|matmul|linear|attention|einsum|bmm|addmv|\bdot|baddbmm|addbmm|mkldnn|quantized")


class _OpsRun(TorchDispatchMode):
    """Records the op packets a forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


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


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def _forward(model: nn.Module, args: tuple, backend: str, threads: int) -> Callable[[], Any]:
    """One forward of ``model`` on ``args`` in ``backend``, as a call of no arguments: what the
    timing loops run (the ONNX export happens here, once, before any timing)."""
    if backend == "onnxruntime":
        from easier_ext.surgery.export import onnxruntime_runner

        return onnxruntime_runner(model, args, threads=threads)
    return lambda: model(*args)


def _best_latency(forward: Callable[[], Any], threads: int, min_run_time: float) -> float:
    """Seconds of one ``forward()`` in the fastest of the timed blocks (Timer synchronizes CUDA
    around each block): other load on the machine only ever slows a block down, so the fastest is
    the model's own time, where a median or a single block can be any of them."""
    # Imported here: torch.utils.benchmark imports cpp_extension, which warns on import without CUDA.
    from torch.utils.benchmark import Timer

    timer = Timer("forward()", globals={"forward": forward}, num_threads=threads)
    return min(timer.blocked_autorange(min_run_time=min_run_time).times)


# -- formatting ------------------------------------------------------------------------------


def _si(n: int, unit: str = "") -> str:
    """``_si(11173962, " params")`` is ``"11.17 M params"``, ``_si(557, "MACs")`` is ``"557 MACs"``."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n} {unit.lstrip()}".rstrip()


def format_seconds(s: float | None) -> str:
    """``0.00421`` is ``"4.21 ms"``; ``"-"`` for None or a non-finite value (not measured)."""
    if s is None or not math.isfinite(s):
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.2f} {unit}"
    return f"{s * 1e9:.0f} ns"


def _ratio(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0 or not math.isfinite(before):
        return "-"
    return f"{after / before:.2f}x"

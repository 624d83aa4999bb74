"""Shared test helpers: devices, dtypes, sample inputs and the plain-PyTorch / NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import easier_ext  # noqa: F401  (registers the ops)

OP = torch.ops.easier_ext.rectify_count.default
INPLACE_OP = torch.ops.easier_ext.rectify_count_.default

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ACTIVATIONS = ["relu", "relu6", "leaky_relu", "prelu", "gelu", "gelu_tanh", "silu", "hardswish", "elu", "mish"]
PIECEWISE_LINEAR = {"relu", "relu6", "leaky_relu", "prelu"}
# bit for bit equal to torch's CPU kernel too (torch's CUDA hardswish multiplies by 1/6 instead)
BIT_EXACT_ON_CPU = PIECEWISE_LINEAR | {"hardswish"}


def has_kernel(device: str) -> bool:
    """Whether the dispatcher has a kernel of ours for this device (i.e. it was built)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return torch._C._dispatch_has_kernel_for_dispatch_key("easier_ext::rectify_count", key)


def device_param(device: str):
    """A pytest param for a device that skips, visibly, where the device or our kernel is missing."""
    marks = []
    if device == "cuda":
        if not has_kernel("cuda"):
            marks.append(pytest.mark.skip(reason="CUDA kernels were not built"))
        elif not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="no CUDA GPU on this machine"))
    return pytest.param(device, marks=marks, id=device)


DEVICES = [device_param("cpu"), device_param("cuda")]


def reference_activation(x: torch.Tensor, activation: str, alpha: float = 0.01, weight=None, channel_dim: int = 1):
    """torch's own functional for the activation (what the fused op must equal); ``alpha`` is the
    op's scalar argument: leaky_relu's negative slope, elu's alpha."""
    if activation == "relu":
        return F.relu(x)
    if activation == "relu6":
        return F.relu6(x)
    if activation == "leaky_relu":
        return F.leaky_relu(x, alpha)
    if activation == "prelu":
        # F.prelu puts one weight per channel on dim 1; elsewhere, the same formula by hand.
        d = channel_dim % x.dim()
        if weight.numel() == 1 or (d == 1 and x.dim() >= 2):
            return F.prelu(x, weight)
        shape = [1] * x.dim()
        shape[d] = weight.numel()
        return torch.where(x > 0, x, weight.reshape(shape) * x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "silu":
        return F.silu(x)
    if activation == "hardswish":
        return F.hardswish(x)
    if activation == "elu":
        return F.elu(x, alpha)
    if activation == "mish":
        return F.mish(x)
    raise ValueError(activation)


def reference_counts(x: torch.Tensor, channel_dim: int) -> np.ndarray:
    """NumPy: per channel, how many elements are > 0 (NaN is not)."""
    a = x.detach().cpu().float().numpy()
    a = np.moveaxis(a, channel_dim % x.dim(), 0).reshape(x.shape[channel_dim], -1)
    return (a > 0).sum(axis=1).astype(np.int64)


def reference_entropy(counts: np.ndarray, observations: int) -> np.ndarray:
    """NumPy binary entropy in bits, 0 for constant neurons and for no observations."""
    p = counts.astype(np.float64) / max(observations, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p)) - ((1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (tells -0.0 from 0.0)."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(as_int)


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Same bits everywhere, except that any NaN matches any NaN: torch's own kernels return
    different NaN payloads for bfloat16 depending on the code path (vector or scalar)."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{msg}: NaN positions differ"
    a, e = bits(actual), bits(expected)
    assert torch.equal(a[~nan.contiguous()], e[~nan.contiguous()]), f"{msg}: not bit-exact"


def assert_within_rounding(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, msg: str = "") -> None:
    """For the smooth activations (gelu, silu): a couple of ulps of the result, plus the rounding
    that 1 + erf(x) (or 1 + exp(-x)) suffers for negative x, which scales with |x|. GELU(+inf) is
    +inf here and NaN in torch's CPU kernel, so +inf inputs are not compared."""
    eps = torch.finfo(actual.dtype).eps
    a, e, xd = actual.double().cpu(), expected.double().cpu(), x.double().cpu()
    compared = xd != float("inf")
    nan = torch.isnan(e)
    assert torch.equal(torch.isnan(a)[compared], nan[compared]), f"{msg}: NaN positions differ"
    finite = compared & ~nan
    err = (a - e).abs()[finite]
    bound = (2 * eps * e.abs() + 4 * eps * xd.abs().clamp_min(1))[finite]
    worst = (err - bound).max() if err.numel() else torch.tensor(-1.0)
    assert worst <= 0, f"{msg}: off by more than rounding (worst excess {worst.item():.3g})"


def make_input(shape, dtype, device, layout="contiguous", seed=0, special=True):
    """A random input in the given layout: contiguous, channels_last, a non-dense strided view, or
    a dense permutation. With `special`, it holds exact zeros, -0.0, NaN and +-inf."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        big = torch.randn(*shape[:-1], shape[-1] * 2 + 1, generator=g, dtype=torch.float64)
        x = big[..., 1::2]
    else:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if special and x.numel() >= 8:
        for i, v in enumerate([0.0, -0.0, float("nan"), float("inf"), -float("inf")]):
            x[np.unravel_index((i * 7919) % x.numel(), x.shape)] = v
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "permuted":
        x = x.permute(*reversed(range(x.dim()))).contiguous().permute(*reversed(range(x.dim())))
    return x.to(device)


def make_weight(activation: str, channels: int, dtype, device, per_channel=True, seed=1):
    if activation != "prelu":
        return None
    g = torch.Generator().manual_seed(seed)
    n = channels if per_channel else 1
    return (torch.rand(n, generator=g, dtype=torch.float64) * 0.5 - 0.1).to(dtype).to(device)


# (shape, channel_dim, layout): NCHW and channels_last convs, Linear-shaped and (..., C) tensors,
# odd sizes whose rows/planes are not a multiple of any vector width, and sizes big enough to
# run on several threads.
CASES = [
    ((3, 5, 7, 9), 1, "contiguous"),
    ((3, 5, 7, 9), 1, "channels_last"),
    ((3, 5, 7, 9), 1, "strided"),
    ((3, 5, 7, 9), 1, "permuted"),
    ((2, 6, 3, 4, 5), 1, "channels_last"),
    ((4, 16, 40, 40), 1, "contiguous"),
    ((4, 16, 40, 40), 1, "channels_last"),
    ((300, 64), -1, "contiguous"),  # rows of 1, 2, 4 or 8 whole vectors, depending on dtype and ISA
    ((2, 64, 3, 5), 1, "channels_last"),
    ((7, 33), 1, "contiguous"),
    ((7, 33), -1, "strided"),
    ((2000, 37), -1, "contiguous"),
    ((41, 100), -1, "contiguous"),  # rows of several blocks of vectors, a partial one, odd row count
    ((2, 3, 5, 37), -1, "contiguous"),
    ((2, 3, 5, 37), 2, "contiguous"),
    ((5, 1, 11), 1, "contiguous"),
    ((129,), 0, "contiguous"),
    ((64, 3), 0, "contiguous"),
]


def sample_inputs(device, dtype, activation, special=True):
    """(args, case id) for every case, with a per-channel and a shared prelu weight."""
    for shape, dim, layout in CASES:
        x = make_input(shape, dtype, device, layout, special=special)
        for per_channel in ([True, False] if activation == "prelu" else [True]):
            w = make_weight(activation, shape[dim], dtype, device, per_channel)
            yield (x, activation, 0.2, w, dim), f"{shape}-{dim}-{layout}-{'w' if per_channel else 'w1'}"


def gradcheck_inputs(activation: str):
    """``(inputs, channel_dim)`` for ``gradcheck`` in float64 on the CPU, a conv-shaped and a
    Linear-shaped case: the input, and prelu's weight after it."""
    for shape, dim in [((2, 3, 4, 5), 1), ((4, 6), -1)]:
        x = make_input(shape, torch.float64, "cpu", special=False).requires_grad_()
        w = make_weight(activation, shape[dim], torch.float64, "cpu")
        yield ((x,) if w is None else (x, w.requires_grad_())), dim


def _gloo_rank(rank: int, init_file: str, out_dir: str, fn) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save(fn(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_two_gloo_ranks(fn, tmp_path) -> list:
    """Runs ``fn()`` (a picklable, module-level callable) in 2 processes of one gloo group on the
    CPU and returns what each rank returned, rank 0 first."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(str(tmp_path / "init"), str(tmp_path), fn), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

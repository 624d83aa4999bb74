"""easier_ext::rectify_count_entropy: its entropy proxy against a plain-PyTorch reference of the
formula (values, gradients, gradcheck), its output and counts against rectify_count's, and the
op's contracts (tau's check, fake kernel, autograd, torch.compile, CUDA against the CPU)."""

import itertools
import math
import re

import numpy as np
import pytest
import torch

from easier_ext import ops
from easier_ext.core.gradients import entropy_proxy_gradient
from testing import (
    ACTIVATIONS,
    BIT_EXACT_ON_CPU,
    DEVICES,
    DTYPES,
    OP,
    PIECEWISE_LINEAR,
    assert_bit_exact,
    assert_within_rounding,
    gradcheck_inputs,
    has_kernel,
    make_input,
    make_weight,
    reference_activation,
    reference_counts,
    sample_inputs,
)

ENTROPY_OP = torch.ops.easier_ext.rectify_count_entropy.default
TAU = 0.5
BAD_TAUS = [0.0, -0.0, -1.0, float("nan"), float("inf"), -float("inf")]


def reference_entropy_sums(x: torch.Tensor, tau: float, channel_dim: int) -> torch.Tensor:
    """Plain PyTorch in float64, from the definition: per channel, the sum over its elements of
    -p log2 p - (1 - p) log2(1 - p) with p = sigmoid(x / tau). torch.special.entr is -p ln p with
    entr(0) = 0, so an element whose p is exactly 0 or 1 (+-inf) adds 0, and NaN adds NaN."""
    p = torch.sigmoid(x.double() / tau)
    h = (torch.special.entr(p) + torch.special.entr(1 - p)) / math.log(2)
    d = channel_dim % x.dim()
    channels = x.shape[d]
    return h.movedim(d, 0).reshape(channels, x.numel() // max(channels, 1)).sum(dim=1)


def sums_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_sums_close(actual, expected, msg=""):
    """Float32 lanes merged in double (CPU) or float atomics (CUDA): a few float32 ulps of the sum."""
    tol = 1e-12 if actual.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{msg}: {m}")


def assert_output_matches_torch(y, x, act, slope, w, dim, device, case):
    ref = reference_activation(x, act, slope, w, dim)
    if act in PIECEWISE_LINEAR or (act in BIT_EXACT_ON_CPU and device == "cpu"):
        assert_bit_exact(y, ref, case)
    else:
        assert_within_rounding(y, ref, x, case)


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_rectify_count_and_the_reference(device, dtype, activation):
    """Every layout of sample_inputs (contiguous, channels_last, strided, permuted, (..., C)), with
    zeros, -0.0, NaN and +-inf among the values."""
    for (x, act, slope, w, dim), case in sample_inputs(device, dtype, activation):
        y, counts, sums = ENTROPY_OP(x, act, slope, w, dim, TAU)
        y0, counts0 = OP(x, act, slope, w, dim)
        assert_bit_exact(y, y0, case)  # the same kernels, with the entropy proxy compiled in
        assert y.stride() == y0.stride() and y.dtype == x.dtype, case
        assert_output_matches_torch(y, x, act, slope, w, dim, device, case)
        assert torch.equal(counts, counts0), case
        np.testing.assert_array_equal(counts.cpu().numpy(), reference_counts(x, dim), err_msg=case)
        assert sums.shape == (x.shape[dim],) and sums.dtype == sums_dtype(dtype) and sums.device == x.device, case
        assert_sums_close(sums, reference_entropy_sums(x, TAU, dim), case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_temperatures_from_tiny_to_huge(device, dtype):
    """1 / tau past float's range saturates: 0 still gives 1 bit and everything else ~0; a huge tau
    gives ~1 bit per element."""
    for tau in [1e-40, 1e-3, 0.1, 3.0, 1e30]:
        for shape, dim, layout in [((3, 5, 7, 9), 1, "contiguous"), ((41, 100), -1, "contiguous")]:
            x = make_input(shape, dtype, device, layout)
            _, _, sums = ENTROPY_OP(x, "relu", 0.0, None, dim, tau)
            assert_sums_close(sums, reference_entropy_sums(x, tau, dim), f"tau={tau} {shape}")


@pytest.mark.parametrize("device", DEVICES)
def test_long_channels_keep_float32_sums_accurate(device):
    """A million elements per channel, as planes (NCHW) and as rows (channels last): the float32
    lanes are merged into double often enough that the sums stay within a few ulps."""
    g = torch.Generator().manual_seed(3)
    for shape, dim in [((4, 3, 250000), 1), ((1000000, 3), -1)]:
        x = (torch.randn(shape, generator=g) * 0.3).to(device)
        _, _, sums = ENTROPY_OP(x, "relu", 0.0, None, dim, TAU)
        assert_sums_close(sums, reference_entropy_sums(x, TAU, dim), str(shape))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_makes_its_channel_nan_and_inf_adds_zero(device):
    # channels: [NaN, 2.0], [+inf, -inf], [0.0, -0.0]
    x = torch.tensor([[float("nan"), float("inf"), 0.0], [2.0, -float("inf"), -0.0]], device=device)
    y, counts, sums = ENTROPY_OP(x, "relu", 0.0, None, 1, 1.0)
    assert torch.isnan(sums[0]) and sums[1].item() == 0.0
    assert sums[2].item() == pytest.approx(2.0, rel=1e-6)  # H(1/2) = 1 bit each
    assert counts.tolist() == [1, 1, 0]  # 2.0 and +inf are ON; NaN, zeros and -inf are not
    assert torch.isnan(y[0, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "prelu", "gelu"])
def test_empty_inputs(device, activation):
    for shape, dim in [((0, 4, 3, 3), 1), ((2, 0, 3), 1), ((5, 0), -1), ((0,), 0)]:
        x = torch.empty(shape, device=device)
        w = make_weight(activation, max(shape[dim], 1), torch.float32, device, per_channel=shape[dim] > 0)
        y, counts, sums = ENTROPY_OP(x, activation, 0.1, w, dim, TAU)
        assert y.shape == x.shape and counts.shape == sums.shape == (shape[dim],)
        assert counts.sum().item() == 0 and sums.sum().item() == 0 and sums.dtype == torch.float32
    x = torch.empty(0, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    y, _, sums = ENTROPY_OP(x, "silu", 0.0, None, 1, TAU)
    (g,) = torch.autograd.grad((y, sums), x, (torch.ones_like(y), torch.ones_like(sums)))
    assert g.shape == x.shape and sums.dtype == torch.float64


# -- gradients -------------------------------------------------------------------------------

GRAD_CASES = [((3, 4, 5, 5), 1, "contiguous"), ((3, 4, 5, 5), 1, "channels_last"), ((6, 7), -1, "contiguous"),
              ((2, 3, 4, 6), -1, "strided")]
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def random_like(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_autograd_of_the_reference(device, dtype, activation):
    """Random upstream gradients for the output and for the sums; the reference is torch's
    activation plus reference_entropy_sums, differentiated by autograd in float64."""
    for shape, dim, layout in GRAD_CASES:
        x = make_input(shape, dtype, device, layout, special=False).requires_grad_()
        w = make_weight(activation, shape[dim], dtype, device)
        leaves = [x] if w is None else [x, w.requires_grad_()]
        g, gs = random_like(shape, dtype, device, 5), random_like(shape[dim], sums_dtype(dtype), device, 6)
        y, _, sums = ENTROPY_OP(x, activation, 0.2, w, dim, TAU)
        grads = torch.autograd.grad((y, sums), leaves, (g, gs))

        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        xr, wr = ref_leaves[0], (ref_leaves[1] if w is not None else None)
        yr, sr = reference_activation(xr, activation, 0.2, wr, dim), reference_entropy_sums(xr, TAU, dim)
        ref = torch.autograd.grad((yr, sr), ref_leaves, (g.double(), gs.double()))
        tol = GRAD_TOL[dtype]
        for name, a, r in zip(["input", "weight"], grads, ref):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol, msg=lambda m: f"{shape} {layout} {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "prelu", "gelu", "elu"])
def test_gradient_parts(device, activation):
    """With the sums unused, the input's gradient is exactly rectify_count's (torch's); with only the
    sums used, it is the entropy term alone."""
    shape, dim = (3, 4, 5, 5), 1
    x = make_input(shape, torch.float32, device, special=False).requires_grad_()
    w = make_weight(activation, shape[dim], torch.float32, device)
    g = random_like(shape, torch.float32, device, 5)
    y, _, _ = ENTROPY_OP(x, activation, 0.2, w, dim, TAU)
    y0, _ = OP(x, activation, 0.2, w, dim)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y0, x, g)[0])

    gs = random_like(shape[dim], torch.float32, device, 6)
    _, _, sums = ENTROPY_OP(x, activation, 0.2, w, dim, TAU)
    (grad,) = torch.autograd.grad(sums, x, gs)
    xr = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(reference_entropy_sums(xr, TAU, dim), xr, gs.double())
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation):
    for inputs, dim in gradcheck_inputs(activation):
        def f(x, w=None):
            y, _, sums = ENTROPY_OP(x, activation, 0.2, w, dim, TAU)
            return y, sums

        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)


def test_gradient_at_infinities_is_zero_and_at_nan_is_nan():
    # relu, whose own gradient is finite at +-inf (torch's gelu gradient there is NaN: inf * 0).
    x = torch.tensor([[float("inf"), -float("inf"), float("nan"), 1.0]], dtype=torch.float64).T.requires_grad_()
    _, _, sums = ENTROPY_OP(x, "relu", 0.0, None, 1, TAU)
    (g,) = torch.autograd.grad(sums, x, torch.ones_like(sums))
    assert g[0].item() == 0 and g[1].item() == 0 and torch.isnan(g[2]) and g[3].item() < 0


# -- the gradient kernel: entropy_proxy_grad_ ------------------------------------------------

GRAD_OP = torch.ops.easier_ext.entropy_proxy_grad_.default


def reference_entropy_gradient(x: torch.Tensor, tau: float, channel_dim: int, grad_sums: torch.Tensor) -> torch.Tensor:
    """grad_sums[c] * dH/dx in float64, by autograd of reference_entropy_sums: 0 at +-inf (H is 0
    on both sides), NaN at NaN."""
    finite = x.detach().double().nan_to_num(0.0, 0.0, 0.0).requires_grad_()
    (g,) = torch.autograd.grad(reference_entropy_sums(finite, tau, channel_dim), finite, grad_sums.double())
    return g.masked_fill(x.isinf(), 0.0).masked_fill(x.isnan(), float("nan"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_proxy_grad_matches_the_reference(device, dtype):
    """In place into grad_input (dense, or a view with gaps), every layout, NaN and +-inf included,
    sizes past every vector width (the vector loop and the scalar tail)."""
    cases = GRAD_CASES + [((64, 33), 1, "contiguous"), ((0, 3, 4), 1, "contiguous")]
    for (shape, dim, layout), grad_layout in itertools.product(cases, ["contiguous", "strided"]):
        x = make_input(shape, dtype, device, layout, special=True)
        grad_input = make_input(shape, dtype, device, grad_layout, seed=3, special=False)
        before = grad_input.clone()
        grad_sums = random_like(shape[dim], sums_dtype(dtype), device, 4)
        assert GRAD_OP(grad_input, x, grad_sums, TAU, dim) is None
        want = before.double() + reference_entropy_gradient(x.cpu(), TAU, dim, grad_sums.cpu()).to(device)
        tol = GRAD_TOL[dtype]
        torch.testing.assert_close(grad_input.double(), want, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{shape} {layout}, grad {grad_layout}: {m}")


def dH_dx(x: float, tau: float) -> float:
    """dH/dx = -u p (1 - p) / (tau ln 2), u = x / tau, p = sigmoid(u), one float64 at a time (p (1 - p)
    as q (1 - q), q = sigmoid(-|u|), which autograd of the reference cannot do where p rounds to 1)."""
    u = x / tau
    q = 1.0 / (1.0 + math.exp(abs(u))) if abs(u) < 700 else 0.0
    return -u * q * (1 - q) / (tau * math.log(2))


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_proxy_grad_at_extreme_temperatures(device):
    values = [-3.0, -1e-30, 0.0, 1e-30, 2.0] * 13  # 65 values: vector loops (16 floats wide at most) and a tail
    for tau, dtype in itertools.product([1e-300, 1e-30, 1.0, 1e30], [torch.float32, torch.float64]):
        x = torch.tensor(values, dtype=dtype)[:, None]
        grad_input = torch.zeros(len(values), 1, dtype=dtype, device=device)
        GRAD_OP(grad_input, x.to(device), torch.ones(1, dtype=dtype, device=device), tau, 1)
        grad_input = grad_input.cpu()
        # tiny tau: every nonzero |u| here is huge (1 / tau saturated in float32, the clamp keeps 0 * inf out): 0
        want = torch.tensor([dH_dx(v, tau) for v in x.double().flatten().tolist()], dtype=torch.float64)[:, None]
        torch.testing.assert_close(grad_input.double(), want, rtol=1e-5, atol=1e-30, msg=lambda m: f"tau {tau} {dtype}: {m}")
        with torch.enable_grad():  # the torch-ops form a double backward differentiates: the same values
            recorded = entropy_proxy_gradient(torch.ones(1, dtype=dtype), x, tau, 1)
        torch.testing.assert_close(recorded.double(), want, rtol=1e-5, atol=1e-30, msg=lambda m: f"tau {tau} {dtype}: {m}")


def test_entropy_proxy_grad_refuses_bad_arguments_and_writes_nothing():
    x = torch.randn(2, 3, 4)
    sums = torch.ones(3)
    cases = [
        ((torch.zeros(2, 3, 5), x, sums, TAU, 1), ValueError, r"grad_input of shape \[2, 3, 5\] does not match the input's \[2, 3, 4\]"),
        ((torch.zeros(2, 3, 4, dtype=torch.float64), x, sums, TAU, 1), TypeError, "grad_input has dtype Double but the input has Float"),
        ((torch.zeros(2, 3, 4), x, torch.ones(4), TAU, 1), ValueError, r"grad_sums of shape \[4\] does not match the input: expected \(3,\)"),
        ((torch.zeros(2, 3, 4), x, torch.ones(3, dtype=torch.float64), TAU, 1), TypeError,
         "grad_sums has dtype Double; expected Float"),
        ((torch.zeros(2, 3, 4), x, sums, 0.0, 1), ValueError, "tau must be a positive, finite temperature"),
        ((torch.zeros(2, 3, 4), x, sums, TAU, 3), IndexError, "channel_dim 3 is out of range"),
        ((torch.zeros(2, 3, 4, dtype=torch.int64), x.long(), sums, TAU, 1), TypeError, "expected a floating-point input"),
    ]
    for (grad_input, *rest), error, message in cases:
        with pytest.raises(error, match=message):
            GRAD_OP(grad_input, *rest)
        assert not grad_input.any()
    overlapping = torch.zeros(1, 3, 1).expand(2, 3, 4)  # one element written through several indices
    with pytest.raises(RuntimeError, match="internal overlap|single memory location"):
        GRAD_OP(overlapping, x, sums, TAU, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_proxy_grad_opcheck(device):
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = make_input((3, 4, 5), dtype, device, special=False)
        grad_sums = random_like(4, sums_dtype(dtype), device, 4)
        torch.library.opcheck(GRAD_OP, (random_like((3, 4, 5), dtype, device, 3), x, grad_sums, TAU, 1))


# -- op contracts ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck(device, activation):
    # opcheck compares outputs without equal_nan, so no NaN in these samples.
    samples = sample_inputs(device, torch.float32, activation, special=False)
    for (x, act, slope, w, dim), case in itertools.islice(samples, 0, 12, 6):
        torch.library.opcheck(ENTROPY_OP, (x.detach().requires_grad_(), act, slope, w, dim, TAU))


def tau_message(tau):
    return f"easier_ext.rectify_count_entropy: tau must be a positive, finite temperature, got {tau:g}"


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_bad_tau_is_a_clear_error(device):
    x = torch.randn(2, 3, 4, device=device)
    for tau in BAD_TAUS:
        with pytest.raises(ValueError, match=re.escape(tau_message(tau))):
            ENTROPY_OP(x, "relu", 0.0, None, 1, tau)
        with pytest.raises(ValueError, match=re.escape(tau_message(tau))):
            ops.rectify_count_entropy(x.requires_grad_(device != "meta"), "relu", tau=tau)


def test_cpp_and_meta_checks_give_the_same_messages_in_the_same_order():
    for args in [(0.0, None, 1, tau) for tau in BAD_TAUS] + [(0.0, None, 3, -1.0), (0.0, None, 1, 0.5)]:
        for activation in ["relu", "prelu", "tanh"]:
            messages = []
            for device in ["cpu", "meta"]:
                try:
                    ENTROPY_OP(torch.randn(2, 3, 4, device=device), activation, *args)
                    messages.append(None)
                except (ValueError, IndexError) as e:
                    messages.append((type(e), str(e).split("\n")[0]))
            assert messages[0] == messages[1], (activation, args)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):  # the shared checks come first
        ENTROPY_OP(torch.randn(2, 3), "tanh", 0.0, None, 1, -1.0)


def test_meta_and_fake_shapes():
    y, counts, sums = ENTROPY_OP(torch.empty(2, 3, 4, device="meta", dtype=torch.float16), "prelu", 0.0,
                                 torch.empty(3, device="meta", dtype=torch.float16), 1, TAU)
    assert y.device.type == "meta" and y.shape == (2, 3, 4) and counts.dtype == torch.int64
    assert sums.shape == (3,) and sums.dtype == torch.float32
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
        y, counts, sums = ops.rectify_count_entropy(x, "relu", tau=TAU)
    assert y.stride() == x.stride() and counts.shape == sums.shape == (5,) and sums.dtype == torch.float64


def test_wrapper_passes_each_activation_its_own_scalar_and_needs_tau():
    x = make_input((3, 4, 5), torch.float64, "cpu", special=False)
    y, _, sums = ops.rectify_count_entropy(x, "elu", tau=0.3, negative_slope=0.3, alpha=0.6)
    torch.testing.assert_close(y, torch.nn.functional.elu(x, 0.6))
    assert_sums_close(sums, reference_entropy_sums(x, 0.3, 1))
    y, _, _ = ops.rectify_count_entropy(x, "leaky_relu", tau=0.3, negative_slope=0.3, alpha=0.6, channel_dim=-1)
    torch.testing.assert_close(y, torch.nn.functional.leaky_relu(x, 0.3), rtol=0, atol=0)
    with pytest.raises(TypeError, match="tau"):
        ops.rectify_count_entropy(x, "relu")


def test_torch_compile_fullgraph_matches_eager():
    """A regularized loss as finetuning would write it, compiled whole: values and gradients."""

    def f(x, w):
        y, c, s = ops.rectify_count_entropy(x, "prelu", tau=0.5, weight=w)
        z, c2, s2 = ops.rectify_count_entropy(y * 2 - 1, "gelu", tau=0.25, channel_dim=-1)
        return z.square().mean() + 0.1 * (s.mean() + s2.mean()), c, c2

    x = make_input((2, 4, 6, 6), torch.float32, "cpu", special=False)
    w = make_weight("prelu", 4, torch.float32, "cpu")
    results = []
    for fn in (torch.compile(f, fullgraph=True), f):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, c, c2 = fn(xs, ws)
        results.append((loss, c, c2, *torch.autograd.grad(loss, (xs, ws))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- CUDA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_matches_cpu(activation):
    if not (has_kernel("cuda") and torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and the CUDA kernels")
    for dtype in DTYPES:
        for (x, act, slope, w, dim), case in sample_inputs("cpu", dtype, activation):
            y_cpu, c_cpu, s_cpu = ENTROPY_OP(x, act, slope, w, dim, TAU)
            y_gpu, c_gpu, s_gpu = ENTROPY_OP(x.cuda(), act, slope, None if w is None else w.cuda(), dim, TAU)
            assert torch.equal(c_gpu.cpu(), c_cpu), case
            if act in PIECEWISE_LINEAR:
                assert_bit_exact(y_gpu.cpu(), y_cpu, case)
            else:
                assert_within_rounding(y_gpu.cpu(), y_cpu, x, case)
            assert s_gpu.dtype == s_cpu.dtype, case
            assert_sums_close(s_gpu, s_cpu, case)

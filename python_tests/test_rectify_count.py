"""easier_ext::rectify_count against torch's functionals and a NumPy count."""

import itertools

import numpy as np
import pytest
import torch

from easier_ext import ops
from testing import (
    ACTIVATIONS,
    BIT_EXACT_ON_CPU,
    DEVICES,
    DTYPES,
    INPLACE_OP,
    OP,
    PIECEWISE_LINEAR,
    assert_bit_exact,
    assert_within_rounding,
    bits,
    gradcheck_inputs,
    has_kernel,
    make_input,
    make_weight,
    reference_activation,
    reference_counts,
    sample_inputs,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_torch_and_numpy(device, dtype, activation):
    for (x, act, slope, w, dim), case in sample_inputs(device, dtype, activation):
        y, counts = OP(x, act, slope, w, dim)
        ref = reference_activation(x, act, slope, w, dim)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device, case
        assert y.stride() == torch.empty_like(x).stride(), case
        if act in PIECEWISE_LINEAR or (act in BIT_EXACT_ON_CPU and device == "cpu"):
            assert_bit_exact(y, ref, case)
        else:
            assert_within_rounding(y, ref, x, case)
        assert counts.dtype == torch.int64 and counts.device == x.device, case
        np.testing.assert_array_equal(counts.cpu().numpy(), reference_counts(x, dim), err_msg=case)
        assert x.data_ptr() != y.data_ptr(), case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inplace_matches_out_of_place(device, dtype, activation):
    """rectify_count_ writes exactly what rectify_count returns into its input (also a non-dense
    view, whose untouched gaps must stay untouched) and returns the same counts."""
    for (x, act, slope, w, dim), case in sample_inputs(device, dtype, activation):
        base = x._base if x._base is not None else x
        before = base.clone()
        y, counts = OP(x, act, slope, w, dim)
        counts_ = INPLACE_OP(x, act, slope, w, dim)
        assert torch.equal(counts_, counts), case
        assert_bit_exact(x, y, case)
        if x._base is not None:
            inside = torch.zeros_like(base, dtype=torch.bool)
            inside.as_strided(x.shape, x.stride(), x.storage_offset()).fill_(True)
            assert_bit_exact(base[~inside], before[~inside], case + " (gaps of the view)")


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_bad_input_leaves_input_untouched(device):
    x = torch.randn(2, 3, 4, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match="needs a weight tensor"):
        INPLACE_OP(x, "prelu", 0.0, None, 1)
    assert torch.equal(x, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "prelu", "gelu"])
def test_inplace_opcheck(device, activation):
    samples = sample_inputs(device, torch.float32, activation, special=False)
    for (x, act, slope, w, dim), case in itertools.islice(samples, 0, 12, 4):
        torch.library.opcheck(INPLACE_OP, (x.clone(), act, slope, w, dim), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("device", DEVICES)
def test_input_is_not_modified(device):
    x = make_input((4, 6, 5, 5), torch.float32, device)
    before = x.clone()
    OP(x, "relu", 0.0, None, 1)
    assert torch.equal(bits(x), bits(before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_empty_inputs(device, activation):
    for shape, dim in [((0, 4, 3, 3), 1), ((2, 0, 3), 1), ((5, 0), -1), ((0,), 0)]:
        x = torch.empty(shape, device=device)
        w = make_weight(activation, max(shape[dim], 1), torch.float32, device, per_channel=shape[dim] > 0)
        y, counts = OP(x, activation, 0.1, w, dim)
        assert y.shape == x.shape
        assert counts.shape == (shape[dim],) and counts.sum().item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_nan_counts_as_off_and_zero_as_off(device):
    x = torch.tensor([[float("nan"), 0.0, -0.0, 1e-30, -1e-30, float("inf")]], device=device).T.contiguous()
    y, counts = OP(x, "relu", 0.0, None, 1)
    assert counts.tolist() == [2]  # 1e-30 and inf
    assert torch.isnan(y[0, 0])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_matches_cpu_exactly(activation):
    if not (has_kernel("cuda") and torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and the CUDA kernels")
    for dtype in DTYPES:
        for (x, act, slope, w, dim), case in sample_inputs("cpu", dtype, activation):
            y_cpu, c_cpu = OP(x, act, slope, w, dim)
            y_gpu, c_gpu = OP(x.cuda(), act, slope, None if w is None else w.cuda(), dim)
            assert torch.equal(c_gpu.cpu(), c_cpu), case
            if act in PIECEWISE_LINEAR:
                assert_bit_exact(y_gpu.cpu(), y_cpu, case)
            else:
                assert_within_rounding(y_gpu.cpu(), y_cpu, x, case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_torch(device, activation):
    for shape, dim in [((3, 4, 5, 5), 1), ((6, 7), -1), ((2, 3, 4, 6), -1)]:
        x = make_input(shape, torch.float32, device, special=False).requires_grad_()
        w = make_weight(activation, shape[dim], torch.float32, device)
        if w is not None:
            w.requires_grad_()
        g = torch.randn(shape, device=device)
        y, _ = OP(x, activation, 0.2, w, dim)
        grads = torch.autograd.grad(y, [x] + ([w] if w is not None else []), g)
        xr = x.detach().clone().requires_grad_()
        wr = None if w is None else w.detach().clone().requires_grad_()
        yr = reference_activation(xr, activation, 0.2, wr, dim)
        ref = torch.autograd.grad(yr, [xr] + ([wr] if wr is not None else []), g)
        torch.testing.assert_close(grads[0], ref[0], rtol=0, atol=0)
        if w is not None:
            torch.testing.assert_close(grads[1], ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation):
    for inputs, dim in gradcheck_inputs(activation):
        def f(x, w=None):
            return OP(x, activation, 0.2, w, dim)[0]

        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_gradient(device):
    x = torch.empty(0, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    y, _ = OP(x, "silu", 0.0, None, 1)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck(device, activation):
    # opcheck compares outputs without equal_nan, so no NaN in these samples.
    samples = sample_inputs(device, torch.float32, activation, special=False)
    for (x, act, slope, w, dim), case in itertools.islice(samples, 0, 12, 3):
        x = x.detach().requires_grad_()
        torch.library.opcheck(OP, (x, act, slope, w, dim))


def test_torch_compile_fullgraph_matches_eager():
    def f(x, w):
        y, c = OP(x, "prelu", 0.0, w, 1)
        z, c2 = OP(y * 2 - 1, "relu", 0.0, None, 1)
        return z.sum(), c + c2

    x = make_input((2, 4, 6, 6), torch.float32, "cpu", special=False)
    w = make_weight("prelu", 4, torch.float32, "cpu")
    compiled = torch.compile(f, fullgraph=True)
    out, counts = compiled(x, w)
    ref_out, ref_counts = f(x, w)
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(counts, ref_counts)


def test_torch_export():
    class M(torch.nn.Module):
        def forward(self, x):
            return OP(x, "gelu", 0.0, None, -1)

    x = make_input((3, 5, 8), torch.float32, "cpu", special=False)
    ep = torch.export.export(M(), (x,))
    y, c = ep.module()(x)
    ry, rc = M()(x)
    assert torch.equal(y, ry) and torch.equal(c, rc)


# -- bad input -------------------------------------------------------------------------------

def bad_inputs(device):
    x = torch.randn(2, 3, 4, device=device)
    return [
        ((torch.ones(2, 3, dtype=torch.int64, device=device), "relu", 0.0, None, 1), TypeError, "floating-point input"),
        # "Bool" from C++, "torch.bool" from the fake (meta) kernel
        ((torch.ones(2, 3, dtype=torch.bool, device=device), "relu", 0.0, None, 1), TypeError, "got (torch.)?[Bb]ool"),
        ((torch.tensor(1.0, device=device), "relu", 0.0, None, 0), ValueError, "at least 1 dimension"),
        ((x, "relu", 0.0, None, 3), IndexError, r"channel_dim 3 is out of range .* \[-3, 2\]"),
        ((x, "relu", 0.0, None, -4), IndexError, "channel_dim -4 is out of range"),
        ((x, "tanh", 0.0, None, 1), ValueError, "unknown activation 'tanh'; expected one of relu"),
        ((x, "prelu", 0.0, None, 1), ValueError, "needs a weight tensor of 1 or 3 values"),
        ((x, "prelu", 0.0, torch.ones(4, device=device), 1), ValueError, r"shape \[4\] does not match .*3 along"),
        ((x, "prelu", 0.0, torch.ones(3, 1, device=device), 1), ValueError, "does not match"),
        ((x, "prelu", 0.0, torch.ones(3, dtype=torch.float64, device=device), 1), TypeError, "same dtype"),
        ((x, "relu", 0.0, torch.ones(3, device=device), 1), ValueError, "only used by 'prelu'"),
    ]


def test_python_and_cpp_list_the_same_activations():
    """ops.ACTIVATIONS (the fake kernel's check, the modules, the docs) is the C++ table's list,
    which the kernel's error message spells out."""
    with pytest.raises(ValueError, match="expected one of") as info:
        OP(torch.ones(2), "no_such_activation", 0.0, None, 0)
    cpp = str(info.value).split("expected one of ")[1].split("\n")[0].strip()
    assert cpp.split(", ") == list(ops.ACTIVATIONS) == ACTIVATIONS


def test_wrapper_passes_each_activation_its_own_scalar():
    """The op has one scalar: the wrapper sends elu its alpha and leaky_relu its negative_slope."""
    x = make_input((3, 4, 5), torch.float64, "cpu", special=False)
    y, _ = ops.rectify_count(x, "elu", negative_slope=0.3, alpha=0.6)
    torch.testing.assert_close(y, torch.nn.functional.elu(x, 0.6))
    y, _ = ops.rectify_count(x, "leaky_relu", negative_slope=0.3, alpha=0.6)
    torch.testing.assert_close(y, torch.nn.functional.leaky_relu(x, 0.3), rtol=0, atol=0)
    x2 = x.clone()
    ops.rectify_count_(x2, "elu", alpha=0.6)
    torch.testing.assert_close(x2, torch.nn.functional.elu(x, 0.6))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_clear_errors(device):
    for args, exc, pattern in bad_inputs(device):
        with pytest.raises(exc, match=pattern):
            OP(*args)


def test_bad_meta_inputs_give_the_kernels_errors():
    # The fake kernel is also the Meta kernel: it refuses what the C++ kernels refuse.
    for args, exc, pattern in bad_inputs("meta"):
        with pytest.raises(exc, match=pattern):
            OP(*args)
    y, counts = OP(torch.empty(2, 3, 4, device="meta"), "prelu", 0.0, torch.empty(3, device="meta"), 1)
    assert y.device.type == "meta" and y.shape == (2, 3, 4) and counts.shape == (3,)


def weight_device_calls(x, w):
    """Every way to call the op with input x and prelu weight w: torch.ops, the wrappers (from C++
    and, with a weight needing a gradient, through the autograd layer), in place and not."""
    yield lambda: OP(x, "prelu", 0.0, w, 1)
    yield lambda: INPLACE_OP(x.clone(), "prelu", 0.0, w, 1)
    yield lambda: ops.rectify_count(x, "prelu", weight=w)
    yield lambda: ops.rectify_count(x, "prelu", weight=w.detach().requires_grad_())
    yield lambda: ops.rectify_count_(x.clone(), "prelu", weight=w)


def test_meta_weight_with_a_cpu_input_is_an_error():
    # Any meta tensor sends the call to the Meta (fake) kernel, which returned uninitialized
    # CPU tensors as if they were the results.
    x = torch.randn(2, 3, 4)
    for call in weight_device_calls(x, torch.ones(3, device="meta")):
        with pytest.raises(RuntimeError, match=r"rectify_count: expected weight on cpu \(the input's device\), got meta"):
            call()
    x = x.to("meta")
    for call in weight_device_calls(x, torch.ones(3)):
        with pytest.raises(RuntimeError, match=r"expected weight on meta \(the input's device\), got cpu"):
            call()


def test_inplace_with_a_meta_weight_leaves_the_input_untouched():
    x = torch.randn(2, 3, 4)
    before = x.clone()
    for call in (lambda: INPLACE_OP(x, "prelu", 0.0, torch.ones(3, device="meta"), 1),
                 lambda: ops.rectify_count_(x, "prelu", weight=torch.ones(3, device="meta"))):
        with pytest.raises(RuntimeError, match="expected weight on cpu"):
            call()
        assert torch.equal(x, before)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not has_kernel("cuda"), reason="CUDA kernels were not built"))],
)
def test_kernels_check_the_weights_device_first(device):
    # A CUDA weight with a CPU input reaches the CUDA kernel; redispatch sends a call to a chosen
    # kernel, so this runs that kernel's C++ check (before its assert and device guard, which need
    # a CUDA input) without a GPU.
    keys = torch._C.DispatchKeySet({"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}[device])
    x, w = torch.randn(2, 3, 4), torch.ones(3, device="meta")
    for op, x_ in ((OP, x), (INPLACE_OP, x.clone())):
        with pytest.raises(RuntimeError, match=r"expected weight on cpu \(the input's device\), got meta"):
            op.redispatch(keys, x_, "prelu", 0.0, w, 1)
    assert torch.equal(x_, x)


def test_cuda_weight_with_a_cpu_input_is_an_error():
    # The dispatcher picks the CUDA kernel here: it must refuse the CPU input, not assert.
    if not (has_kernel("cuda") and torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and the CUDA kernels")
    for call in weight_device_calls(torch.randn(2, 3, 4), torch.ones(3, device="cuda")):
        with pytest.raises(RuntimeError, match=r"expected weight on cpu \(the input's device\), got cuda:0"):
            call()


def test_cpu_weight_with_a_cuda_input_is_an_error():
    if not (has_kernel("cuda") and torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and the CUDA kernels")
    for call in weight_device_calls(torch.randn(2, 3, 4, device="cuda"), torch.ones(3)):
        with pytest.raises(RuntimeError, match=r"expected weight on cuda:0 \(the input's device\), got cpu"):
            call()


# -- the public wrappers (ops.rectify_count / ops.rectify_count_) -----------------------------
# In eager mode they reach the kernel from C++ when autograd has nothing to record, and go through
# torch.ops otherwise; both ways must give the op's results, errors and autograd behaviour.


def wrapper_args(args):
    x, act, scalar, w, dim = args
    return (x, act), {"alpha" if act == "elu" else "negative_slope": scalar, "weight": w, "channel_dim": dim}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_wrapper_matches_torch_and_numpy(device, activation):
    for args, case in sample_inputs(device, torch.float32, activation):
        x, act, slope, w, dim = args
        a, kw = wrapper_args(args)
        y, counts = ops.rectify_count(*a, **kw)
        ref = reference_activation(x, act, slope, w, dim)
        if act in PIECEWISE_LINEAR:
            assert_bit_exact(y, ref, case)
        else:
            assert_within_rounding(y, ref, x, case)
        np.testing.assert_array_equal(counts.cpu().numpy(), reference_counts(x, dim), err_msg=case)
        assert not y.requires_grad and y.grad_fn is None, case
        x_ = x.clone()
        counts_ = ops.rectify_count_(x_, *a[1:], **kw)
        assert_bit_exact(x_, y, case)
        assert torch.equal(counts_, counts), case


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_bad_inputs_give_the_op_errors(device):
    for args, exc, pattern in bad_inputs(device):
        a, kw = wrapper_args(args)
        with pytest.raises(exc, match=pattern):
            ops.rectify_count(*a, **kw)
        x = a[0].clone()
        with pytest.raises(exc, match=pattern):
            ops.rectify_count_(x, *a[1:], **kw)
        assert torch.equal(x, a[0])


def test_wrapper_records_gradients_only_when_needed():
    x = make_input((3, 4, 5), torch.float64, "cpu", special=False)
    w = make_weight("prelu", 4, torch.float64, "cpu").requires_grad_()
    y, _ = ops.rectify_count(x.requires_grad_(), "prelu", weight=w)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    yr = reference_activation(x, "prelu", 0.0, w, 1)
    rx, rw = torch.autograd.grad(yr.sum(), (x, w))
    assert torch.equal(gx, rx) and torch.allclose(gw, rw)
    with torch.no_grad():
        y, _ = ops.rectify_count(x, "prelu", weight=w)
    assert not y.requires_grad
    y, _ = ops.rectify_count(x.detach(), "prelu", weight=w.detach())
    assert not y.requires_grad


class _Recorder(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs)


def test_wrapper_leaves_overrides_to_torch_ops():
    """A torch-function mode or a tensor subclass sees the op, as with any torch.ops call."""
    x = make_input((2, 3, 4), torch.float32, "cpu", special=False)
    with _Recorder() as mode:
        y, counts = ops.rectify_count(x, "relu")
        ops.rectify_count_(x.clone(), "relu")
    assert OP in mode.seen and INPLACE_OP in mode.seen
    assert torch.equal(y, torch.relu(x)) and np.array_equal(counts.numpy(), reference_counts(x, 1))
    _Subclass.seen.clear()
    y, counts = ops.rectify_count(x.as_subclass(_Subclass), "relu")
    assert OP in _Subclass.seen
    assert np.array_equal(counts.numpy(), reference_counts(x, 1))


def test_wrapper_works_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 3, 3).to(memory_format=torch.channels_last)
        y, counts = ops.rectify_count(x, "relu")
    assert y.shape == x.shape and y.stride() == x.stride() and counts.shape == (5,)


def test_inplace_wrapper_bumps_the_version_counter():
    """As torch's in-place ops do, so autograd catches a saved tensor overwritten later."""
    x = make_input((2, 3, 4), torch.float32, "cpu", special=False)
    v = x._version
    ops.rectify_count_(x, "relu")  # plain tensor: the direct call
    assert x._version == v + 1
    with _Recorder():
        ops.rectify_count_(x, "relu")  # through torch.ops
    assert x._version == v + 2
    a = make_input((2, 3, 4), torch.float32, "cpu", special=False).requires_grad_()
    b = a * 2
    c = b * b  # saves b
    with torch.no_grad():
        ops.rectify_count_(b, "relu")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.sum().backward()


def test_inplace_wrapper_refuses_inference_tensors_outside_inference_mode():
    with torch.inference_mode():
        x = make_input((2, 3, 4), torch.float32, "cpu", special=False)
    before = x.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        ops.rectify_count_(x, "relu")
    assert torch.equal(x, before)
    with torch.inference_mode():
        counts = ops.rectify_count_(x, "relu")
    assert torch.equal(x, torch.relu(before)) and np.array_equal(counts.numpy(), reference_counts(before, 1))

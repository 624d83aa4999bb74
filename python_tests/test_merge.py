"""merge: merged layers against the original layers run one after another (plain torch, float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from easier_ext import merge
from easier_ext.surgery import impulses
from easier_ext.surgery.chains import plan_segments
from easier_ext.surgery.macs import own_macs
from easier_ext.surgery.merge import add_convs, compose_convs, compose_linears

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
F64 = torch.float64


def conv(dims: int, cin: int, cout: int, k=3, dtype=F64, **kw) -> nn.Module:
    """A conv with random weights and bias (the bias drawn larger than the default init)."""
    m = CONV[dims](cin, cout, k, dtype=dtype, **kw)
    if m.bias is not None:
        with torch.no_grad():
            m.bias.normal_()
    return m


def chain_reference(layers, x: torch.Tensor) -> torch.Tensor:
    """The independent reference: the original layers, one after another, in float64."""
    with torch.no_grad():
        for m in layers:
            x = copy.deepcopy(m).double()(x.double())
    return x


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Equal shapes, and differences within ``rtol`` of the output's largest magnitude."""
    assert out.shape == ref.shape
    scale = max(ref.abs().max().item(), 1e-30)
    err = (out.double() - ref).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def input_sizes(merged: nn.Module, dims: int) -> list[tuple[int, ...]]:
    """Spatial sizes from the smallest the merged conv accepts up, off the stride's multiples.

    Per dim the sizes differ (non-square inputs), and ``m + 1``, ``m + 2``, ``m + 5`` hit every
    residue of a stride up to 4 around the smallest size ``m``."""
    smallest = [max(1, k - 2 * p) for k, p in zip(merged.kernel_size, merged.padding)]
    offsets = [(0, 1, 2), (1, 2, 5), (2, 5, 3)] if dims < 3 else [(0, 1, 2), (3, 2, 1)]
    return [tuple(m + o[d % len(o)] for d, m in enumerate(smallest)) for o in offsets]


def check_merged(merged: nn.Module, reference, cin: int, dims: int, rtol: float = 1e-10, dtype=F64) -> None:
    """``merged`` against ``reference`` (a function of a float64 input) on inputs of several sizes."""
    gen = torch.Generator().manual_seed(0)
    for size in input_sizes(merged, dims):
        x = torch.randn(2, cin, *size, dtype=F64, generator=gen)
        with torch.no_grad():
            out = merged(x.to(dtype))
        assert out.dtype == dtype
        assert_close(out, reference(x), rtol)


def snapshot(modules) -> list[dict]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def assert_unchanged(modules, before) -> None:
    for m, state in zip(modules, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), f"{m} changed its {k}"


# --------------------------------------------------------------------------------------------
# compose_convs
# --------------------------------------------------------------------------------------------

# name -> (convs as (cin, cout, kwargs), expected merged groups)
CHAINS = {
    "1x1-1x1": ([(3, 4, dict(k=1)), (4, 5, dict(k=1))], 1),
    "3x3-3x3": ([(3, 4, dict(padding=1)), (4, 5, dict())], 1),
    "5x5s2-3x3": ([(3, 4, dict(k=5, stride=2, padding=2)), (4, 4, dict())], 1),
    "3 strided": ([(2, 3, dict(stride=2, padding=1)), (3, 3, dict(stride=2)), (3, 4, dict(k=1, stride=2))], 1),
    "dilation 2": ([(2, 3, dict(dilation=2, padding=2)), (3, 3, dict(dilation=2))], 1),
    "stride then dilation": ([(2, 3, dict(stride=2, padding=1)), (3, 3, dict(dilation=2)), (3, 2, dict(k=5))], 1),
    "even kernels": ([(2, 3, dict(k=2, stride=2)), (3, 2, dict(k=4, padding=0))], 1),
    "grouped": ([(4, 6, dict(groups=2, padding=1)), (6, 4, dict(groups=2, stride=2))], 2),
    "depthwise-depthwise": ([(4, 4, dict(groups=4, padding=1)), (4, 4, dict(groups=4, stride=2))], 4),
    "depthwise-dense": ([(4, 4, dict(groups=4, padding=1)), (4, 5, dict(k=1))], 1),
    "dense-grouped": ([(2, 4, dict(k=1)), (4, 4, dict(groups=2))], 1),
    "mobilenet": ([(2, 12, dict(k=1, padding=1)), (12, 12, dict(groups=12, stride=2)), (12, 3, dict(k=1))], 1),
    "no bias": ([(3, 4, dict(padding=1, bias=False)), (4, 4, dict(bias=False))], 1),
    "some bias": ([(3, 4, dict(bias=False, padding=1)), (4, 4, dict()), (4, 2, dict(k=1, bias=False))], 1),
    "same then valid": ([(2, 3, dict(k=5, dilation=2, padding="same")), (3, 3, dict(padding="valid"))], 1),
}


def build_chain(dims: int, specs, dtype=F64) -> list[nn.Module]:
    torch.manual_seed(0)
    return [conv(dims, cin, cout, dtype=dtype, **kw) for cin, cout, kw in specs]


def expected_field(convs) -> tuple[int, ...]:
    """The receptive field the brief specifies, computed on its own here."""
    dims = len(convs[0].kernel_size)
    return tuple(
        1 + sum(c.dilation[d] * (c.kernel_size[d] - 1) * math.prod(p.stride[d] for p in convs[:j]) for j, c in enumerate(convs))
        for d in range(dims)
    )


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", list(CHAINS))
def test_compose_convs_matches_chain(dims, name):
    specs, groups = CHAINS[name]
    convs = build_chain(dims, specs)
    before = snapshot(convs)
    merged = compose_convs(convs)
    assert isinstance(merged, CONV[dims])
    assert merged.groups == groups
    assert merged.kernel_size == expected_field(convs)
    assert merged.stride == tuple(math.prod(c.stride[d] for c in convs) for d in range(dims))
    assert merged.dilation == (1,) * dims and merged.bias is not None
    check_merged(merged, lambda x: chain_reference(convs, x), specs[0][0], dims)
    assert_unchanged(convs, before)


def test_compose_convs_anisotropic_2d():
    torch.manual_seed(0)
    convs = [
        conv(2, 3, 4, k=(3, 1), stride=(2, 1), padding=(1, 0)),
        conv(2, 4, 4, k=(1, 5), dilation=(1, 2)),
        conv(2, 4, 2, k=(2, 3), stride=(1, 3)),
    ]
    merged = compose_convs(convs)
    assert merged.kernel_size == expected_field(convs) == (5, 11)
    assert merged.stride == (2, 3) and merged.padding == (1, 0)
    check_merged(merged, lambda x: chain_reference(convs, x), 3, 2)


def test_compose_convs_single_dilated_conv():
    torch.manual_seed(0)
    (c,) = convs = [conv(2, 3, 4, k=3, dilation=3, padding=2, stride=2)]
    merged = compose_convs(convs)
    assert merged.kernel_size == (7, 7) and merged.dilation == (1, 1) and merged is not c
    check_merged(merged, lambda x: chain_reference(convs, x), 3, 2)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("name", ["3 strided", "stride then dilation", "grouped", "depthwise-depthwise", "mobilenet"])
def test_kernel_read_by_inputs_and_by_outputs_agree(monkeypatch, dims, name):
    """Both ways of reading the merged kernel, in many small chunks (the public API takes the
    cheaper one; each of them is also checked end to end through it)."""
    monkeypatch.setattr(impulses, "IMPULSE_CHUNK", 5)
    convs = build_chain(dims, CHAINS[name][0])
    params = merge._float64_params(convs, torch.device("cpu"))
    field, groups = expected_field(convs), CHAINS[name][1]
    by_inputs = impulses._input_impulses(convs, params, field, groups)
    by_outputs = impulses._output_impulses(convs, params, field, groups)
    assert by_inputs.shape == by_outputs.shape == (convs[-1].out_channels, convs[0].in_channels // groups, *field)
    assert_close(by_outputs, by_inputs, 1e-12)
    merged = compose_convs(convs)
    check_merged(merged, lambda x: chain_reference(convs, x), convs[0].in_channels, dims)


def test_compose_convs_reads_kernel_by_inputs_when_cheaper(monkeypatch):
    """Few input taps, many output channels: the impulses go forward, in several chunks."""
    monkeypatch.setattr(impulses, "IMPULSE_CHUNK", 4)
    torch.manual_seed(0)
    convs = [conv(2, 2, 8, k=1), conv(2, 8, 40, k=(1, 2))]
    calls = []
    monkeypatch.setattr(impulses, "_output_impulses", lambda *a: calls.append(a))
    merged = compose_convs(convs)
    assert not calls
    check_merged(merged, lambda x: chain_reference(convs, x), 2, 2)


def test_compose_convs_float32():
    torch.manual_seed(0)
    specs, _ = CHAINS["mobilenet"]
    convs = build_chain(2, specs, dtype=torch.float32)
    merged = compose_convs(convs)
    assert merged.weight.dtype == torch.float32 and merged.bias.dtype == torch.float32
    check_merged(merged, lambda x: chain_reference(convs, x), 2, 2, rtol=1e-5, dtype=torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compose_convs_keeps_device():
    torch.manual_seed(0)
    convs = [m.cuda() for m in build_chain(2, CHAINS["mobilenet"][0], dtype=torch.float32)]
    merged = compose_convs(convs)
    assert merged.weight.device == convs[0].weight.device
    x = torch.randn(2, 2, 9, 11, dtype=F64)
    with torch.no_grad():
        out = merged(x.float().cuda()).cpu()
    assert_close(out, chain_reference([c.cpu() for c in convs], x), 1e-5)


# --------------------------------------------------------------------------------------------
# compose_linears
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features, bias", [([5, 3], [True]), ([5, 7, 3], [True, False]), ([4, 6, 6, 2], [False, True, False])])
def test_compose_linears_matches_chain(features, bias):
    torch.manual_seed(0)
    linears = [nn.Linear(i, o, bias=b, dtype=F64) for i, o, b in zip(features, features[1:], bias)]
    before = snapshot(linears)
    merged = compose_linears(linears)
    assert (merged.in_features, merged.out_features) == (features[0], features[-1])
    for shape in [(features[0],), (3, features[0]), (2, 4, features[0])]:
        x = torch.randn(*shape, dtype=F64)
        with torch.no_grad():
            assert_close(merged(x), chain_reference(linears, x), 1e-10)
    assert_unchanged(linears, before)


def test_compose_linears_float32():
    torch.manual_seed(0)
    linears = [nn.Linear(8, 16), nn.Linear(16, 4)]
    merged = compose_linears(linears)
    assert merged.weight.dtype == torch.float32
    x = torch.randn(5, 8, dtype=F64)
    with torch.no_grad():
        assert_close(merged(x.float()), chain_reference(linears, x), 1e-5)


def test_compose_linears_refusals():
    with pytest.raises(ValueError, match=r"linears\[1\].*in_features=4.*expected 3"):
        compose_linears([nn.Linear(2, 3), nn.Linear(4, 5)])
    with pytest.raises(ValueError, match="at least 1"):
        compose_linears([])


# --------------------------------------------------------------------------------------------
# add_convs
# --------------------------------------------------------------------------------------------


def add_reference(a, b, x):
    with torch.no_grad():
        return chain_reference([a], x) + (x.double() if b is None else chain_reference([b], x))


# name -> (a kwargs, b kwargs or None for the identity, channels (in, out), expected (kernel, dilation, groups))
SUMS = {
    "identity dense": (dict(padding=1), None, (4, 4), (3, 1, 1)),
    "identity grouped": (dict(padding=1, groups=2), None, (4, 4), (3, 1, 2)),
    "identity depthwise": (dict(padding=1, groups=4), None, (4, 4), (3, 1, 4)),
    "identity 1x1": (dict(k=1), None, (4, 4), (1, 1, 1)),
    "identity dilated": (dict(dilation=2, padding=2), None, (4, 4), (3, 2, 1)),
    "identity even dilated": (dict(k=2, dilation=2, padding=1), None, (4, 4), (3, 1, 1)),
    "identity same": (dict(k=5, padding="same", groups=2), None, (4, 4), (5, 1, 2)),
    "downsample": (dict(stride=2, padding=1), dict(k=1, stride=2), (4, 6), (3, 1, 1)),
    "5x5 + 3x3": (dict(k=5, padding=2), dict(padding=1), (3, 5), (5, 1, 1)),
    "off-centre 5x5 + 3x3": (dict(k=5, padding=1, stride=2), dict(padding=0, stride=2), (3, 5), (5, 1, 1)),
    "even 4 + 2": (dict(k=4, padding=1), dict(k=2), (3, 2), (4, 1, 1)),
    "grouped + grouped": (dict(padding=1, groups=2), dict(k=1, groups=2), (4, 6), (3, 1, 2)),
    "grouped + dense": (dict(padding=1, groups=2), dict(k=1), (4, 6), (3, 1, 1)),
    "depthwise + dense": (dict(padding=1, groups=4), dict(k=1, bias=False), (4, 4), (3, 1, 1)),
    "dilated + plain": (dict(dilation=2, padding=2), dict(padding=1), (3, 4), (5, 1, 1)),
    "dilated + dilated": (dict(k=5, dilation=2, padding=4), dict(dilation=2, padding=2), (3, 4), (5, 2, 1)),
    "no biases": (dict(padding=1, bias=False), dict(k=1, bias=False), (3, 4), (3, 1, 1)),
}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", list(SUMS))
def test_add_convs_matches_sum(dims, name):
    kw_a, kw_b, (cin, cout), (k, dil, groups) = SUMS[name]
    torch.manual_seed(0)
    a = conv(dims, cin, cout, **kw_a)
    b = None if kw_b is None else conv(dims, cin, cout, **kw_b)
    modules = [a] if b is None else [a, b]
    before = snapshot(modules)
    merged = add_convs(a, b)
    assert isinstance(merged, CONV[dims])
    assert (merged.kernel_size, merged.dilation, merged.groups) == ((k,) * dims, (dil,) * dims, groups)
    check_merged(merged, lambda x: add_reference(a, b, x), cin, dims)
    assert_unchanged(modules, before)


def test_add_convs_float32():
    torch.manual_seed(0)
    a = conv(2, 4, 4, padding=1, groups=4, dtype=torch.float32)
    merged = add_convs(a, None)
    assert merged.weight.dtype == torch.float32
    check_merged(merged, lambda x: add_reference(a, None, x), 4, 2, rtol=1e-5, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "convs, match",
    [
        ([], r"at least 1 conv"),
        (
            [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)],
            r"convs\[1\].*padding \(1, 1\); expected \(0, 0\).*not be exact.*first conv",
        ),
        ([nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 5, padding="same")], r"convs\[2\].*padding \(2, 2\).*first conv"),
        ([nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 3)], r"convs\[1\].*in_channels=5; expected 4.*out_channels of convs\[0\]"),
        ([nn.Conv2d(3, 4, 1), nn.Conv1d(4, 4, 3)], r"convs\[1\].*1d conv; expected a 2d conv"),
        ([nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1)], r"convs\[0\].*padding_mode='reflect'; expected.*'zeros'"),
        ([nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, padding_mode="circular")], r"convs\[1\].*'circular'"),
        ([nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 4, 3)], r"convs\[1\].*transposed"),
        ([nn.Conv2d(3, 4, 4, padding="same")], r"convs\[0\].*padding='same'.*asymmetrically.*expected"),
    ],
    ids=["empty", "intermediate padding", "intermediate same", "channels", "mixed dims", "reflect", "circular", "transposed", "even same"],
)
def test_compose_convs_refusals(convs, match):
    with pytest.raises(ValueError, match=match):
        compose_convs(convs)


def test_compose_convs_refuses_non_convs():
    with pytest.raises(TypeError, match=r"convs\[1\] is a Linear"):
        compose_convs([nn.Conv1d(3, 4, 1), nn.Linear(4, 4)])


@pytest.mark.parametrize(
    "a, b, match",
    [
        (nn.Conv2d(4, 4, 3), None, r"centre offset.*\(1\.0, 1\.0\).*\(0\.0, 0\.0\).*shifted"),
        (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, padding=1), r"centre offset.*\(0\.0, 0\.0\).*\(-1\.0, -1\.0\)"),
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 1), r"b .*stride \(1, 1\); expected \(2, 2\)"),
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), None, r"stride \(2, 2\); expected stride \(1, 1\).*identity"),
        (nn.Conv2d(3, 4, 3, padding=1), None, r"3 to 4 channels; expected in_channels == out_channels.*identity"),
        (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 6, 1), r"b .*4 to 6 channels; expected 4 to 4"),
        (nn.Conv2d(4, 4, 3, padding=1), nn.Conv1d(4, 4, 1), r"b .*1d conv; expected a 2d"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), None, r"a .*padding_mode='reflect'"),
        (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, padding_mode="replicate"), r"b .*padding_mode='replicate'"),
    ],
    ids=["identity misaligned", "misaligned", "stride mismatch", "identity stride", "identity channels", "channels", "mixed dims", "reflect a", "replicate b"],
)
def test_add_convs_refusals(a, b, match):
    with pytest.raises(ValueError, match=match):
        add_convs(a, b)


# --------------------------------------------------------------------------------------------
# Cost model (easier_ext.surgery.macs), against MACs counted by hand per output position
# --------------------------------------------------------------------------------------------


def test_macs_two_3x3_convs_do_not_pay():
    c = 8
    convs = [nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3)]
    assert own_macs(convs[:1]) == own_macs(convs[1:]) == 9 * c * c
    assert own_macs(convs) == 25 * c * c  # one 5x5 conv
    # merging nothing (2 * 9 * c * c) beats merging both (25 * c * c)
    assert plan_segments(convs, exact_only=False) == ([(0, 1), (1, 2)], 18 * c * c, 18 * c * c)


@pytest.mark.parametrize("stride", [1, 2])
def test_macs_mobilenet_block_pays(stride):
    c, c_out = 8, 16
    convs = [nn.Conv2d(c, 6 * c, 1), nn.Conv2d(6 * c, 6 * c, 3, stride=stride, padding=1, groups=6 * c), nn.Conv2d(6 * c, c_out, 1)]
    # The expand conv runs at stride * stride positions per final one; merged, one dense 3x3 conv.
    unmerged = 6 * c * c * stride**2 + 54 * c + 6 * c * c_out
    assert own_macs(convs) == 9 * c * c_out
    assert plan_segments(convs, exact_only=False) == ([(0, 3)], 9 * c * c_out, unmerged)


def test_macs_strides_and_groups():
    convs = [nn.Conv1d(4, 4, 3, stride=2, groups=4), nn.Conv1d(4, 4, 3, stride=3, groups=4)]
    # The first conv runs 3 times per final position; the merged kernel is 1 + 2 + 2*2 = 7 taps.
    assert plan_segments(convs) == ([(0, 2)], 1 * 4 * 7, 3 * 1 * 4 * 3 + 1 * 4 * 3)
    merged = compose_convs(convs)
    assert (merged.kernel_size, merged.stride, merged.groups) == ((7,), (6,), 4)
    assert own_macs(convs) == own_macs([merged]) == 1 * 4 * 7


def test_macs_single_dilated_conv_counts_its_taps():
    # 3x3 taps, spread over a 5x5 field: the conv as it is reads 9 inputs per channel, merged alone 25
    conv = nn.Conv2d(3, 4, 3, dilation=2)
    assert own_macs([conv]) == 3 * 4 * 9
    assert own_macs([compose_convs([conv])]) == 3 * 4 * 25


def test_linear_macs():
    linears = [nn.Linear(8, 32), nn.Linear(32, 4)]
    assert own_macs(linears) == own_macs([compose_linears(linears)]) == 8 * 4
    assert plan_segments(linears) == ([(0, 2)], 8 * 4, 8 * 32 + 32 * 4)

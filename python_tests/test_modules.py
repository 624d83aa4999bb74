"""The drop-in Entropy* modules against the torch.nn modules they replace."""

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import easier_ext as ee
from testing import DEVICES, assert_within_rounding, make_input, reference_counts, reference_entropy

PAIRS = [
    (nn.ReLU(), ee.EntropyReLU),
    (nn.ReLU6(), ee.EntropyReLU6),
    (nn.LeakyReLU(0.3), ee.EntropyLeakyReLU),
    (nn.PReLU(6, init=0.1), ee.EntropyPReLU),
    (nn.GELU(), ee.EntropyGELU),
    (nn.GELU("tanh"), ee.EntropyGELU),
    (nn.SiLU(), ee.EntropySiLU),
    (nn.Hardswish(), ee.EntropyHardswish),
    (nn.ELU(0.7), ee.EntropyELU),
    (nn.Mish(), ee.EntropyMish),
]
IDS = ["relu", "relu6", "leaky", "prelu", "gelu", "gelu_tanh", "silu", "hardswish", "elu", "mish"]


def _randomize(torch_module):
    if isinstance(torch_module, nn.PReLU):
        with torch.no_grad():
            torch_module.weight.uniform_(-0.2, 0.4)
    return torch_module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("torch_module,cls", PAIRS, ids=IDS)
def test_same_outputs_and_counts_over_batches(device, torch_module, cls):
    ref = _randomize(copy.deepcopy(torch_module)).to(device)
    m = ee.EntropyActivation.from_module(ref)
    assert type(m) is cls
    batches = [make_input((4, 6, 5, 5), torch.float32, device, seed=s, special=False) for s in range(3)]
    for x in batches:
        assert_within_rounding(m(x), ref(x), x)
    expected = sum(reference_counts(x, 1) for x in batches)
    np.testing.assert_array_equal(m.on_counts.cpu().numpy(), expected)
    assert m.observations.item() == 3 * 4 * 25
    # Entropy from the counts of the whole pass, not an average of per-batch entropies.
    h = reference_entropy(expected, 300)
    np.testing.assert_allclose(m.entropy().cpu().numpy(), h, rtol=1e-12)
    np.testing.assert_allclose(m.layer_entropy("easier").item(), h.mean(), rtol=1e-12)
    keep = (expected > 0) & (expected < 300)
    np.testing.assert_allclose(m.layer_entropy("nepenthe").item(), h[keep].mean() if keep.any() else 0.0, rtol=1e-12)


@pytest.mark.parametrize("torch_module,cls", PAIRS, ids=IDS)
def test_tracking_off_runs_torch_and_counts_nothing(torch_module, cls):
    ref = _randomize(copy.deepcopy(torch_module))
    m = cls.from_module(ref, track=False)
    x = torch.randn(3, 6, 4, 4)
    assert torch.equal(m(x), ref(x))
    assert m.on_counts.numel() == 0 and m.observations.item() == 0


def test_linear_shaped_and_channels_last_inputs():
    m = ee.EntropyGELU(channel_dim=-1)
    x = torch.randn(2, 3, 3, 20)  # Swin-T's (B, H, W, 4C) MLP hidden state
    assert_within_rounding(m(x), nn.functional.gelu(x), x)
    np.testing.assert_array_equal(m.on_counts.numpy(), reference_counts(x, -1))
    m2 = ee.EntropyReLU()
    xc = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    y = m2(xc)
    assert y.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(m2.on_counts.numpy(), reference_counts(xc, 1))


SMOOTH = (ee.EntropySiLU, ee.EntropyHardswish, ee.EntropyELU, ee.EntropyMish)


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("cls,fn", [(ee.EntropyReLU, torch.relu), (ee.EntropyReLU6, nn.functional.relu6),
                                    (ee.EntropySiLU, nn.functional.silu), (ee.EntropyLeakyReLU, nn.functional.leaky_relu),
                                    (ee.EntropyHardswish, nn.functional.hardswish), (ee.EntropyELU, nn.functional.elu),
                                    (ee.EntropyMish, nn.functional.mish)])
def test_inplace_semantics(cls, fn, track):
    x = torch.randn(4, 3, 5, 5)
    xc = x.clone()
    m = cls(inplace=True, track=track)
    y = m(xc)  # like torch: the input is overwritten
    assert y.data_ptr() == xc.data_ptr()
    tol = 1e-6 if cls in SMOOTH else 0
    torch.testing.assert_close(xc, fn(x), rtol=tol, atol=tol)
    if track:
        np.testing.assert_array_equal(m.on_counts.numpy(), reference_counts(x, 1))
    # where autograd needs the input, tracking gives a new output and leaves the input alone
    leaf = x.clone().requires_grad_()
    z = leaf * 1.0
    before = z.detach().clone()
    out = cls(inplace=True, track=True)(z)
    assert torch.equal(z.detach(), before) and out.data_ptr() != z.data_ptr()
    out.sum().backward()
    ref_leaf = x.clone().requires_grad_()
    fn(ref_leaf * 1.0).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)


def test_gradients_flow_like_torch():
    ref = _randomize(nn.PReLU(6))
    m = ee.EntropyPReLU.from_module(ref)
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    m(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_sizes_counts():
    m = ee.EntropyReLU()
    m(torch.randn(5, 7, 3))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = ee.EntropyReLU()
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.on_counts, m.on_counts) and fresh.observations == m.observations
    fresh(torch.randn(2, 7, 3))  # keeps counting on top of the loaded counts
    assert fresh.observations.item() == m.observations.item() + 6


def test_reset_linearize_copy_and_convert_back():
    m = ee.EntropyLeakyReLU(0.2)
    m(torch.randn(4, 5))
    m.reset_stats()
    assert m.on_counts.numel() == 0 and m.observations.item() == 0
    m(torch.randn(4, 3))  # another width is fine after a reset
    assert m.on_counts.shape == (3,)
    clone = copy.deepcopy(m)
    assert torch.equal(clone.on_counts, m.on_counts)
    assert isinstance(m.to_torch(), nn.LeakyReLU) and m.to_torch().negative_slope == 0.2
    m.linearized = True
    x = torch.randn(4, 3)
    assert m(x) is x
    assert isinstance(m.to_torch(), nn.Identity)
    assert "linearized=True" in repr(m)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tracking_under_no_grad_modes_and_autocast(mode):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ee.EntropyReLU(), nn.Conv2d(8, 4, 1))
    getattr(model, mode)()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    z = model[0](x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = model[0](x)
    np.testing.assert_array_equal(model[1].on_counts.numpy(), reference_counts(z, 1) + reference_counts(zb, 1))


def test_torch_compile_fullgraph():
    model = nn.Sequential(nn.Linear(6, 16), ee.EntropySiLU(), nn.Linear(16, 3), ee.EntropyReLU())
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for seed in range(2):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(model[1].on_counts, eager[1].on_counts)
    assert torch.equal(model[3].observations, eager[3].observations)


def test_bad_input():
    m = ee.EntropyReLU()
    m(torch.randn(2, 4))
    counts, observations = m.on_counts.clone(), m.observations.clone()
    with pytest.raises(ValueError, match=r"has counted 4 neurons along dim 1, but got an input of shape \(2, 5\)"):
        m(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point input"):
        m(torch.ones(2, 4, dtype=torch.int64))
    assert torch.equal(m.on_counts, counts) and torch.equal(m.observations, observations)  # untouched
    # in place: a refused call leaves the input as it was too (the op would have written it)
    inplace = ee.EntropyReLU(inplace=True)
    inplace(torch.randn(2, 4))
    for bad, error, message in [(torch.randn(2, 5), ValueError, "has counted 4 neurons"),
                                (torch.randn(2, 4), RuntimeError, "counts are on meta but its input is on cpu")]:
        if error is RuntimeError:
            inplace = ee.EntropyReLU(inplace=True).to("meta")
        before = bad.clone()
        with pytest.raises(error, match=message):
            inplace(bad)
        assert torch.equal(bad, before)
    with pytest.raises(TypeError, match="expected one of nn.ReLU"):
        ee.EntropyActivation.from_module(nn.Tanh())
    with pytest.raises(TypeError, match="EntropyReLU.from_module expects nn.ReLU, got GELU"):
        ee.EntropyReLU.from_module(nn.GELU())
    with pytest.raises(ValueError, match="approximate"):
        ee.EntropyGELU("fast")
    with pytest.raises(ValueError, match="use channel_dim=1"):
        ee.EntropyPReLU(4, channel_dim=-1)(torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="floating-point input"):
        ee.EntropyReLU()(torch.ones(3, 3, dtype=torch.int32))


def test_counts_on_another_device_is_a_clear_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m = ee.EntropyReLU()
    m(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="move the module with"):
        m(torch.randn(2, 3, device="cuda"))


def test_one_activation_table():
    """The op's activations (checked against C++ in test_rectify_count), the module classes and
    convert's functional forms describe the same activations."""
    from easier_ext.core.modules import TRACKED_MODULES
    from easier_ext.surgery.tracing import FUNCTIONAL_RECTIFIERS

    names = {cls.activation for cls in TRACKED_MODULES.values()} | {ee.EntropyGELU("tanh").activation}
    assert names == set(ee.ops.ACTIVATIONS)
    assert all(TRACKED_MODULES[t].replaces is t for t in TRACKED_MODULES)
    with_functional = {spec.module for spec in FUNCTIONAL_RECTIFIERS.values()}
    assert set(TRACKED_MODULES) - with_functional == {nn.PReLU}  # F.prelu takes a weight: no fixed module
    # each module round-trips through torch with its arguments
    for torch_module, _ in PAIRS:
        back = ee.EntropyActivation.from_module(torch_module).to_torch()
        assert type(back) is type(torch_module) and repr(back) == repr(torch_module)

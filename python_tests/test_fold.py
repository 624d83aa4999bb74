"""linearize + fold: folded models equal the linearized ones, are shallower where it pays, and are
made of standard torch layers."""

import operator
import os
import random
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

import easier_ext as ee
from easier_ext.costs import cost
from easier_ext.models import build_model


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so that folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def linearized_model(name: str, seed: int, fraction: float = 0.5):
    torch.manual_seed(seed)
    model = ee.convert(randomize_batchnorm(build_model(name, 10, small_input=True), seed)).eval()
    names = list(ee.sites(model))
    chosen = random.Random(seed).sample(names, k=int(len(names) * fraction))
    ee.linearize(model, chosen, mode="identity")
    return model, chosen


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def reference_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "mobilenet_v2"])
def test_folded_equals_linearized(name, seed):
    model, _ = linearized_model(name, seed)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prepared chains fold without complaint
        folded = ee.fold(model, x)
    assert not any(isinstance(m, ee.EntropyActivation) for m in folded.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert relative_error(reference_forward(folded, x), reference_forward(model, x)) <= 1e-4
    before, after = cost(model, x, latency=False), cost(folded, x, latency=False)
    assert after.depth <= before.depth
    assert after.macs <= before.macs * 1.0001  # folding never adds work under the MACs model


def test_mobilenet_v2_all_sites_linearized_gets_shallower_and_cheaper(capsys):
    torch.manual_seed(0)
    model = ee.convert(randomize_batchnorm(build_model("mobilenet_v2", 10, small_input=True), 0)).eval()
    ee.linearize(model, list(ee.sites(model)), mode="identity")
    x = torch.randn(1, 3, 32, 32)
    folded = ee.fold(model, x)
    assert relative_error(reference_forward(folded, x), reference_forward(model, x)) <= 1e-4
    before, after = cost(model, x, latency=False), cost(folded, x, latency=False)
    with capsys.disabled():
        print(f"\nMobileNetV2, all 35 sites linearized: depth {before.depth} -> {after.depth}, MACs {before.macs / 1e6:.1f}M -> {after.macs / 1e6:.1f}M")
    assert after.depth < before.depth and after.macs < before.macs
    # every residual block with both sites gone lost its addition into the merged conv's centre tap
    adds = [n for n in folded.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert adds == []


def two_convs(padding_moved: bool):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 24, 1), nn.BatchNorm2d(24), nn.ReLU(),  # 1x1 expand ...
        nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU(),  # ... depthwise ...
        nn.Conv2d(24, 4, 1),  # ... project: 408 MACs per pixel as a chain, 144 merged
    )
    model = ee.convert(randomize_batchnorm(net, 0)).eval()
    ee.linearize(model, ["2", "5"], mode="identity", prepare_fold=padding_moved)
    return model


def test_padding_moved_to_the_chain_input():
    model = two_convs(padding_moved=True)
    assert model[0].padding == (1, 1) and model[3].padding == (0, 0)
    x = torch.randn(2, 4, 9, 7)
    folded = ee.fold(model, x)
    convs = [m for m in folded.modules() if isinstance(m, _ConvNd)]
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3) and convs[0].padding == (1, 1)
    assert relative_error(reference_forward(folded, x), reference_forward(model, x)) <= 1e-5


def test_unprepared_chain_is_not_merged_and_warns():
    model = two_convs(padding_moved=False)
    x = torch.randn(2, 4, 9, 7)
    with pytest.warns(UserWarning, match="inner convs pad their input"):
        folded = ee.fold(model, x)
    assert relative_error(reference_forward(folded, x), reference_forward(model, x)) <= 1e-5
    assert sum(isinstance(m, _ConvNd) for m in folded.modules()) >= 2


def test_two_equal_3x3_convs_stay_unmerged():
    torch.manual_seed(0)
    model = ee.convert(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))).eval()
    assert ee.linearize(model, "1") == []  # a 5x5 would cost 25 C^2 > 18 C^2: nothing prepared
    folded = ee.fold(model, torch.randn(1, 8, 8, 8))
    assert [m.kernel_size for m in folded.modules() if isinstance(m, _ConvNd)] == [(3, 3), (3, 3)]


def test_linear_chain_merges():
    torch.manual_seed(0)
    model = ee.convert(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))).eval()
    ee.linearize(model, ["1", "4"])
    x = torch.randn(3, 64)
    folded = ee.fold(model, x)
    assert [(m.in_features, m.out_features) for m in folded.modules() if isinstance(m, nn.Linear)] == [(64, 4)]
    assert relative_error(reference_forward(folded, x), reference_forward(model, x)) <= 1e-5


def constant_site_model():
    """conv -> BN whose shifts put every channel far on one side of zero -> ReLU -> conv."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1)).eval()
    with torch.no_grad():
        net[0].weight.mul_(0.01)
        net[1].bias.copy_(torch.tensor([50.0, -50.0, 50.0, -50.0, -50.0, 50.0]))
    return ee.convert(net)


def test_constant_site_becomes_an_exact_mask_and_folds():
    model = constant_site_model()
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    r = ee.measure_entropy(model, data, progress=False)
    assert r["2"].constant and r["2"].entropy == 0.0
    expected = [reference_forward(model, x) for x in data]
    ee.linearize(model, "2")  # auto: every neuron constant -> exact 0/1 mask
    s = ee.site(model, "2")
    assert torch.equal(s.linear_scale, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]))
    for x, e in zip(data, expected):
        assert torch.equal(reference_forward(model, x), e)
    folded = ee.fold(model, data[0])
    for x, e in zip(data, expected):
        assert relative_error(reference_forward(folded, x), e) <= 1e-5
    # the 0/1 mask folds into the first conv, then 3x3 (3->6) + 1x1 (6->5) = 192 MACs per pixel merge into one 3x3 (135)
    assert [m.kernel_size for m in folded.modules() if isinstance(m, _ConvNd)] == [(3, 3)]
    assert list(dict(folded.named_buffers())) == []  # the mask's buffer went with it


def test_mask_refused_for_non_constant_site():
    model = ee.convert(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU())).eval()
    ee.measure_entropy(model, [torch.randn(4, 3, 8, 8)], progress=False)
    with pytest.raises(ValueError, match="neither always ON nor always OFF"):
        ee.linearize(model, "1", mode="mask")
    assert not ee.site(model, "1").linearized  # nothing changed
    with pytest.raises(KeyError, match="unknown site"):
        ee.linearize(model, ["1", "nope"])
    assert not ee.site(model, "1").linearized
    with pytest.raises(ValueError, match="unknown linearize mode"):
        ee.linearize(model, "1", mode="zero")


def test_fold_bad_input():
    model = ee.convert(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(ValueError, match="unknown fold cost"):
        ee.fold(model, torch.randn(1, 2), cost="flops")

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x) if x.sum() > 0 else x

    with pytest.raises(RuntimeError, match="torch.fx could not trace Untraceable"):
        ee.fold(Untraceable(), torch.randn(1, 2))


def test_folded_model_loads_without_easier_ext_and_exports():
    model, _ = linearized_model("resnet18", 0)
    x = torch.randn(1, 3, 32, 32)
    folded = ee.fold(model, x)
    expected = reference_forward(folded, x)
    exported = torch.export.export(folded, (x,))
    assert torch.allclose(exported.module()(x), expected, rtol=1e-5, atol=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(folded, os.path.join(tmp, "m.pt"))
        torch.save(x, os.path.join(tmp, "x.pt"))
        torch.save(expected, os.path.join(tmp, "y.pt"))
        code = (
            "import sys, torch; sys.modules['easier_ext'] = None\n"  # any import of easier_ext fails
            f"m = torch.load({tmp + '/m.pt'!r}, weights_only=False); x = torch.load({tmp + '/x.pt'!r}); y = torch.load({tmp + '/y.pt'!r})\n"
            "assert torch.equal(m(x), y); print('ok')\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_latency_cost_folds_exactly():
    model = two_convs(padding_moved=True)
    x = torch.randn(2, 4, 16, 16)
    folded = ee.fold(model, x, cost="latency")
    assert relative_error(reference_forward(folded, x), reference_forward(model, x)) <= 1e-5

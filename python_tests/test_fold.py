"""linearize + fold: folded models equal the linearized ones, are shallower where it pays, and are
made of standard torch layers."""

import copy
import operator
import os
import random
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

import easier_ext as ee
from easier_ext.surgery.costs import cost
from easier_ext.app.models import build_model


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


def test_fold_refuses_a_model_whose_outputs_are_not_finite():
    # Checked before folding: the check against the model would call its NaNs a folding bug.
    torch.manual_seed(0)
    model = ee.convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))).eval()
    ee.linearize(model, "1")
    x = torch.randn(5, 4)
    x_inf = x.clone()
    x_inf[0, 0] = float("inf")  # row 0's outputs become inf or NaN (inf - inf)
    with pytest.raises(ValueError, match=r"outputs are not finite on the example input \(2 of 10 values are NaN/inf\)"):
        ee.fold(model, x_inf)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # output column 0 is NaN for every row
    with pytest.raises(ValueError, match=r"\(5 of 10 values are NaN/inf\); fold checks its result against them, .*finite"):
        ee.fold(model, x)
    # Without the check there is nothing to compare against: it folds.
    folded = ee.fold(model, x, verify=False)
    assert [(m.in_features, m.out_features) for m in folded.modules() if isinstance(m, nn.Linear)] == [(4, 2)]
    assert torch.equal(folded(x).isnan(), model(x).isnan())


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


# -- layers emptied by pruning: their residual branches become constants ---------------------------


class ResidualBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x), as torchvision's BasicBlock."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x
        return self.relu(out)


def empty(layer: nn.Module) -> None:
    """What NEPENTHE does to a layer it prunes completely (its weight detached, as it leaves it)."""
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=1.0)
    layer.weight = layer.weight.detach()
    assert not layer.weight.any()


def called_modules(gm, kind) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)]


def assert_folds_exactly(model: nn.Module, folded: nn.Module, *inputs: torch.Tensor) -> None:
    """Folded and unfolded agree on the example input and on inputs of other shapes."""
    for x in inputs:
        assert relative_error(reference_forward(folded, x), reference_forward(model, x)) <= 1e-5


def test_emptied_conv_turns_its_residual_branch_into_a_constant():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResidualBlock(), 0).eval()
    empty(model.conv2)
    x = torch.randn(2, 8, 6, 6)
    folded = ee.fold(model, x)
    # the bias bn2 gives the emptied conv is all the branch adds: the block is relu(x + shift)
    shift = (model.bn2.bias - model.bn2.running_mean * model.bn2.weight / (model.bn2.running_var + model.bn2.eps).sqrt()).reshape(1, -1, 1, 1)
    for z in (x, torch.randn(3, 8, 11, 5)):
        expected = torch.relu(z + shift).detach()
        assert relative_error(reference_forward(folded, z), expected) <= 1e-5
        assert relative_error(reference_forward(model, z), expected) <= 1e-5
    assert called_modules(folded, _ConvNd) == [] and not any(isinstance(m, _ConvNd) for m in folded.modules())
    assert "conv2 is empty: its branch became a constant added at add" in folded.fold_log
    before, after = cost(model, x, latency=False), cost(folded, x, latency=False)
    assert after.depth < before.depth and after.macs < before.macs


@pytest.mark.parametrize("stem", [True, False])
def test_emptied_conv_with_zero_shift_drops_its_branch_and_the_addition(stem):
    torch.manual_seed(0)
    block = randomize_batchnorm(ResidualBlock(), 5).eval()
    with torch.no_grad():  # bn2 adds nothing: the emptied branch is zero
        block.bn2.running_mean.zero_()
        block.bn2.bias.zero_()
    empty(block.conv2)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), block).eval() if stem else block
    x = torch.randn(2, 8, 6, 6)
    folded = ee.fold(model, x)
    assert_folds_exactly(model, folded, x, torch.randn(3, 8, 4, 7))
    given = x.clone()
    reference_forward(folded, x)
    assert torch.equal(x, given)
    assert called_modules(folded, _ConvNd) == (["0"] if stem else [])
    adds = [n for n in folded.graph.nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)]
    # the block's in-place ReLU may write into the stem's output, which nothing reads after it,
    # not into the caller's input: that one gets a buffer of zeros added instead
    assert len(adds) == (0 if stem else 1)
    assert len(dict(folded.named_buffers())) == (0 if stem else 1)


def test_constant_stops_at_a_padded_conv():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResidualBlock(), 1).eval()
    empty(model.conv1)  # conv2 sees the constant with zeros around it: its output is not constant
    x = torch.randn(2, 8, 3, 3)  # as small as conv2's kernel: one window of the constant is the whole map
    folded = ee.fold(model, x)
    assert_folds_exactly(model, folded, x, torch.randn(1, 8, 9, 4))
    assert called_modules(folded, _ConvNd) == ["conv1", "conv2"]
    assert not any("is empty" in line for line in folded.fold_log)


class InvertedResidual(nn.Module):
    """MobileNetV2's x + bn(project(relu6(bn(dw(relu6(bn(expand(x)))))))), ReLU6 in place."""

    def __init__(self, channels: int = 4, hidden: int = 12, project_groups: int = 1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, groups=project_groups, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip

    def forward(self, x):
        return x + self.conv(x)


@pytest.mark.parametrize("project_groups", [1, 2])
def test_emptied_depthwise_conv_folds_an_inverted_residual_to_a_constant(project_groups):
    torch.manual_seed(0)
    model = randomize_batchnorm(InvertedResidual(project_groups=project_groups), 2).eval()
    with torch.no_grad():  # the depthwise BN's shifts on both sides of ReLU6's kinks
        model.conv[4].running_mean.zero_()
        model.conv[4].bias.copy_(torch.linspace(-3.0, 9.0, 12))
    empty(model.conv[3])
    x = torch.randn(2, 4, 7, 7)
    folded = ee.fold(model, x)
    assert_folds_exactly(model, folded, x, torch.randn(1, 4, 3, 10))
    assert called_modules(folded, nn.Module) == []
    # the constant the block adds, worked out by hand from the layers' parameters
    bn4, conv6, bn7 = model.conv[4], model.conv[6], model.conv[7]
    hidden = (bn4.bias - bn4.running_mean * bn4.weight / (bn4.running_var + bn4.eps).sqrt()).clamp(0, 6)
    w = conv6.weight[:, :, 0, 0]  # (4, 12 / groups): output o reads inputs of its group only
    group_in = hidden.reshape(project_groups, -1)[torch.arange(4) // (4 // project_groups)]
    projected = (w * group_in).sum(1)
    added = (projected - bn7.running_mean) * bn7.weight / (bn7.running_var + bn7.eps).sqrt() + bn7.bias
    (buffer,) = dict(folded.named_buffers()).values()
    assert buffer.shape == (1, 4, 1, 1)
    assert torch.allclose(buffer.flatten(), added.detach(), rtol=1e-5, atol=1e-6)


class MlpResidual(nn.Module):
    """Swin's x + Linear2(Dropout(GELU(Linear1(norm(x))))) on channel-last (N, H, W, C) tensors,
    after a positional embedding that is added, not computed."""

    def __init__(self, channels: int = 6, hidden: int = 16):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 1, 5, channels))
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        self.act, self.drop = nn.GELU(), nn.Dropout(0.1)

    def forward(self, x):
        x = x + self.pos
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


def test_emptied_linear_folds_a_channel_last_mlp_residual():
    torch.manual_seed(0)
    model = MlpResidual().eval()
    empty(model.fc1)
    x = torch.randn(2, 3, 5, 6)
    folded = ee.fold(model, x)
    assert_folds_exactly(model, folded, x, torch.randn(4, 7, 5, 6))
    assert called_modules(folded, nn.Module) == []
    expected = model.fc2(torch.nn.functional.gelu(model.fc1.bias)).detach()
    buffers = dict(folded.named_buffers())
    assert len(buffers) == 1 and torch.allclose(next(iter(buffers.values())), expected.reshape(1, 1, 1, 6), rtol=1e-5, atol=1e-6)
    assert "pos" in dict(folded.named_parameters())  # an attribute added to x is no emptied layer's constant


def test_emptied_layer_on_the_only_path_stays_exact():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16, 5), nn.ReLU(), nn.Linear(5, 2),
    )  # fmt: skip
    model = randomize_batchnorm(net, 3).eval()
    empty(model[3])
    empty(model[7])
    x = torch.randn(2, 3, 4, 4)
    folded = ee.fold(model, x)
    assert_folds_exactly(model, folded, x, torch.randn(5, 3, 4, 4))
    assert not any("is empty" in line for line in folded.fold_log)  # no addition to take the constant


def test_emptied_conv_behind_a_linearized_mask_site():
    """conv (emptied) -> BN -> ReLU linearized to its exact 0/1 mask (x * buffer) -> 1x1 conv, + x."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn, self.relu, self.conv2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return x + self.conv2(self.relu(self.bn(self.conv1(x))))

    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():
        block.bn.bias.copy_(torch.tensor([2.0, -2.0, 1.0, -1.0, 3.0, -3.0]))
    empty(block.conv1)
    model = ee.convert(block)
    data = [torch.randn(2, 4, 5, 5) for _ in range(2)]
    ee.measure_entropy(model, data, progress=False)
    ee.linearize(model, "relu")
    assert torch.equal(ee.site(model, "relu").linear_scale, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    folded = ee.fold(model, data[0])
    assert_folds_exactly(model, folded, *data, torch.randn(1, 4, 8, 3))
    assert called_modules(folded, nn.Module) == []
    assert list(dict(folded.named_buffers())) == ["add_constant"]  # the mask's buffer went


def test_resnet18_with_two_emptied_convs_loses_their_blocks_branches():
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model("resnet18", num_classes=10, small_input=True), 4).eval()
    empty(model.layer1[0].conv2)
    empty(model.layer3[1].conv2)
    x = torch.randn(2, 3, 16, 16)
    folded = ee.fold(model, x)
    assert_folds_exactly(model, folded, x, torch.randn(1, 3, 8, 8))
    convs = called_modules(folded, nn.Conv2d)
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) - 4
    assert not {"layer1.0.conv1", "layer1.0.conv2", "layer3.1.conv1", "layer3.1.conv2"} & set(convs)
    before, after = cost(model, x, latency=False), cost(folded, x, latency=False)
    assert after.depth < before.depth and after.macs < before.macs


def test_swin_t_with_an_emptied_mlp_loses_it():
    """torchvision's Swin ends each MLP branch in stochastic_depth, the identity in eval mode."""
    torch.manual_seed(0)
    model = build_model("swin_t", num_classes=10, small_input=True).eval()
    with torch.no_grad():  # torchvision starts the MLPs' biases at zero: the constant would be too
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_()
    empty(model.features[1][1].mlp[0])
    model = ee.convert(model)  # its GELU sites go back to nn.GELU in fold, in eval mode
    x = torch.randn(1, 3, 16, 16)
    folded = ee.fold(model, x)
    assert_folds_exactly(model, folded, x, torch.randn(1, 3, 32, 32))
    linears = called_modules(folded, nn.Linear)
    assert "features.1.0.mlp.3" in linears and not {"features.1.1.mlp.0", "features.1.1.mlp.3"} & set(linears)
    assert "features.1.1.mlp.0 is empty: its branch became a constant added at add_3" in folded.fold_log


# -- layers that are torch layers in other clothes: nested scales, BatchNorm subclasses, standardised convs


def float64_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfolded model's output in float64: what fold must reproduce."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def assert_equals_reference(model: nn.Module, folded: nn.Module, *inputs: torch.Tensor, rtol: float = 1e-6) -> None:
    """The folded model, in float64 (its float32 weights: only their rounding differs) and as it
    is, against the unfolded model in float64."""
    for x in inputs:
        expected = float64_reference(model, x)
        assert relative_error(reference_forward(copy.deepcopy(folded).double(), x.double()), expected) <= rtol
        assert relative_error(reference_forward(folded, x).double(), expected) <= 1e-5


def functional_calls(gm, *targets) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def batchnorms_left(gm) -> int:
    """BatchNorm modules called, and functional batch_norm calls, in a folded model's graph."""
    return len(called_modules(gm, nn.modules.batchnorm._BatchNorm)) + len(functional_calls(gm, F.batch_norm))


class LayerScale(nn.Module):
    """timm's LayerScale and LayerScale2d: ``x * gamma``, the gamma a parameter of this module."""

    def __init__(self, channels: int, form: str):
        super().__init__()
        self.gamma, self.form = nn.Parameter(torch.rand(channels) + 0.5), form

    def forward(self, x):
        if self.form == "conv":  # LayerScale2d
            return x * self.gamma.view(1, -1, 1, 1)
        if self.form == "in_place":
            return x.mul_(self.gamma)
        if self.form == "method":
            return x.mul(self.gamma)
        return self.gamma * x if self.form == "left" else x * self.gamma


class ScaledBlock(nn.Module):
    """x + ls(fc(x)), in (N, tokens, C) with a Linear, or in (N, C, H, W) with a 1x1 conv."""

    def __init__(self, channels: int, form: str):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1) if form == "conv" else nn.Linear(channels, channels)
        self.ls = LayerScale(channels, form)

    def forward(self, x):
        return x + self.ls(self.fc(x))


class Stages(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.stages = nn.ModuleList([ScaledBlock(6, form), nn.Sequential(ScaledBlock(6, form), ScaledBlock(6, form))])

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


@pytest.mark.parametrize("form", ["right", "left", "method", "in_place", "conv"])
def test_layer_scale_with_a_nested_gamma_folds_into_its_layer(form):
    # fold used to look up stages.1.0.ls.gamma as one attribute name
    torch.manual_seed(0)
    model = Stages(form).eval()
    x = torch.randn(2, 6, 5, 4) if form == "conv" else torch.randn(2, 5, 6)
    folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x, torch.randn(3, 6, 2, 3) if form == "conv" else torch.randn(1, 7, 6))
    muls = functional_calls(folded, operator.mul, operator.imul, torch.mul) + [n for n in folded.graph.nodes if n.op == "call_method"]
    assert muls == []  # each gamma went into the layer before it
    # conv: each x + conv(x) is one conv too, and the three then merge into one
    assert len(called_modules(folded, (nn.Linear, nn.Conv2d))) == (1 if form == "conv" else 3)
    assert not any("gamma" in name for name, _ in [*folded.named_parameters(), *folded.named_buffers()])


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d whose forward calls F.batch_norm itself, then dropout
    and an activation (both modules of its own), after checking the input's rank."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), (nn.ReLU() if act else nn.Identity())

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


def batchnorm_act_net() -> nn.Module:
    """expand 1x1 -> BNAct -> depthwise 3x3 -> BNAct -> project 1x1 -> BNAct (no activation)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 12, 1, bias=False), BatchNormAct(12),
        nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), BatchNormAct(12),
        nn.Conv2d(12, 4, 1, bias=False), BatchNormAct(4, act=False),
    )  # fmt: skip
    return randomize_batchnorm(net, 7).eval()


def test_batchnorm_subclass_calling_f_batch_norm_folds_and_keeps_its_activation():
    model = batchnorm_act_net()
    x = torch.randn(2, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x, torch.randn(1, 4, 9, 5))
    assert batchnorms_left(folded) == 0
    assert called_modules(folded, nn.Conv2d) == ["0", "2", "4"]
    assert called_modules(folded, nn.ReLU) == ["1.act", "3.act"]  # after their (folded) convs, as they were
    assert {"1.batch_norm folded into 0", "3.batch_norm folded into 2", "5.batch_norm folded into 4"} <= set(folded.fold_log)


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_subclass_activations_are_sites_and_linearized_chains_merge(training):
    model = ee.convert(batchnorm_act_net())
    assert list(ee.sites(model)) == ["1.act", "3.act"]  # the activations inside the BatchNorms
    model.train(training)  # as between finetuning epochs: the chain is planned as fold will see it, in eval
    assert ee.linearize(model, ["1.act", "3.act"]) == ["2", "0"]  # the chain is seen through them: padding moved
    assert model.training == training and model[1].training == training
    model.eval()
    x = torch.randn(2, 4, 6, 6)
    folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x, torch.randn(1, 4, 5, 8))
    assert batchnorms_left(folded) == 0
    convs = [folded.get_submodule(t) for t in called_modules(folded, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(4, 4, (3, 3))]


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight standardised per output channel in every forward."""

    def __init__(self, cin: int, cout: int, k: int, **kwargs):
        super().__init__(cin, cout, k, **kwargs)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = (cin * k * k) ** -0.5

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, weight=(self.gain * self.scale).reshape(-1),
            training=True, momentum=0.0, eps=1e-6,
        ).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_weight_standardised_convs_become_convs_computed_once_and_fold():
    torch.manual_seed(0)
    net = nn.Sequential(StdConv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), StdConv(8, 8, 1), nn.ReLU(), StdConv(8, 4, 1, bias=False))
    model = ee.convert(randomize_batchnorm(net, 8).eval())
    x = torch.randn(2, 3, 7, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x, torch.randn(1, 3, 4, 4))
    assert functional_calls(folded, F.conv2d, F.batch_norm) == [] and batchnorms_left(folded) == 0
    assert called_modules(folded, nn.Conv2d) == ["0", "3", "5"]
    assert all(type(m) is nn.Conv2d for m in folded.modules() if isinstance(m, nn.Conv2d))
    assert "1 folded into 0" in folded.fold_log and any(line.endswith("computed once from 0.weight, 0.gain") for line in folded.fold_log)
    # linearized, the standardised 1x1 convs around the site merge like any convs
    ee.linearize(model, "4")
    folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x)
    assert [(m.in_channels, m.out_channels) for m in folded.modules() if isinstance(m, nn.Conv2d)] == [(3, 8), (8, 4)]


def test_values_computed_once_follow_the_folded_models_dtype():
    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.shift = nn.Conv2d(3, 4, 1), nn.Parameter(torch.randn(4))

        def forward(self, x):  # the dtype is read from a weight: it must not be frozen as float32
            return self.conv(x.to(self.conv.weight.dtype)) + self.shift.view(1, -1, 1, 1)

    torch.manual_seed(0)
    model = Casting().eval()
    x = torch.randn(2, 3, 4, 4)
    folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x)  # runs the folded model in float64 too
    assert [name for name, _ in folded.named_buffers()] == ["shift_view"]


def test_batchnorm_subclass_keeping_torch_forward_folds():
    # BatchNorm's own forward cannot be traced through (it branches on the input's rank)
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    class MyConv(nn.Conv2d):
        pass

    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(MyConv(3, 5, 3), MyBatchNorm(5), nn.ReLU()), 9).eval()
    x = torch.randn(2, 3, 6, 6)
    folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x)
    assert batchnorms_left(folded) == 0 and folded.fold_log == ["1 folded into 0"]


def test_batchnorms_left_unfolded_are_named_with_why():
    class PreActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool, self.norm = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), BatchNormAct(4)
            self.shared, self.norm2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.shared(self.norm(self.pool(self.conv(x))))
            return self.norm2(y) + y

    torch.manual_seed(0)
    model = randomize_batchnorm(PreActivation(), 10).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="fold left 2 BatchNorm layer") as record:
        folded = ee.fold(model, x)
    message = str(record[0].message)
    assert "norm.batch_norm: its input comes from pool (MaxPool2d), not from a conv or linear" in message
    assert "norm2: shared's output is also read by add" in message
    assert "norm2 left unfolded: shared's output is also read by add" in folded.fold_log
    assert_equals_reference(model, folded, x)


def test_batchnorm_folds_into_a_conv_whose_shape_is_also_read():
    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            n, c, h, w = y.shape  # reads the conv's output, but only its shape
            return self.bn(y).reshape(n, c * h * w)

    torch.manual_seed(0)
    model = randomize_batchnorm(Flattening(), 12).eval()
    x = torch.randn(2, 3, 6, 6)
    folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x, torch.randn(1, 3, 5, 7))
    assert batchnorms_left(folded) == 0


@pytest.mark.filterwarnings("ignore:not merging")
def test_fold_runs_three_forwards_whatever_it_merges():
    """The model's output in float64, the shapes once, the check in float64: each pass keeps the
    shapes it changes current instead of running the model again."""
    model, _ = linearized_model("mobilenet_v2", 0, fraction=1.0)
    calls = []
    model.classifier[1].register_forward_hook(lambda *_: calls.append(1))  # a layer every forward runs, kept
    x = torch.randn(1, 3, 32, 32)
    folded = ee.fold(model, x)
    assert sum("merged" in line for line in folded.fold_log) >= 10  # several rounds of passes
    assert len(calls) == 3
    calls.clear()
    ee.fold(model, x, verify=False)
    assert len(calls) == 1


@pytest.mark.filterwarnings("ignore:not merging")
@pytest.mark.parametrize("case", ["merges", "constants", "masks"])
def test_shapes_fold_keeps_are_those_of_the_folded_model(case):
    from torch.fx.passes.shape_prop import ShapeProp

    if case == "merges":
        model, _ = linearized_model("mobilenet_v2", 1, fraction=1.0)
        x = torch.randn(1, 3, 16, 16)
    elif case == "constants":
        torch.manual_seed(0)
        model = randomize_batchnorm(build_model("resnet18", num_classes=10, small_input=True), 4).eval()
        empty(model.layer1[0].conv2)
        x = torch.randn(1, 3, 16, 16)
    else:
        model = constant_site_model()
        ee.measure_entropy(model, [torch.randn(4, 3, 8, 8)], progress=False)
        ee.linearize(model, "2")
        x = torch.randn(2, 3, 8, 8)
    folded = ee.fold(model, x)
    kept = {n.name: n.meta["tensor_meta"].shape for n in folded.graph.nodes if "tensor_meta" in n.meta}
    ShapeProp(folded).propagate(x)
    actual = {n.name: n.meta["tensor_meta"].shape for n in folded.graph.nodes if "tensor_meta" in n.meta}
    assert kept == {name: actual[name] for name in kept} and len(kept) >= len(actual) - 1  # the output node has none


TIMM_MODELS = {  # name: (input size, BatchNorms in the model)
    "efficientnet_b0": (64, 49),  # BatchNormAct2d
    "mobilenetv2_100": (64, 52),
    "regnety_002": (64, 44),
    "nf_resnet26": (64, 0),  # ScaledStdConv2d, no BatchNorm
    "fastvit_t8": (64, 70),  # LayerScale with nested gammas; its BatchNorm identity branches stay
    "efficientformer_l1": (224, 33),  # nested gammas; attention biases for 7x7 tokens
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models_fold_exactly_with_their_batchnorms(name):
    timm = pytest.importorskip("timm")
    size, batchnorms = TIMM_MODELS[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False, num_classes=10), 11).eval()
    with torch.no_grad():  # timm starts gammas at 1e-5, and some gains at zero: whole branches would vanish
        for p_name, p in model.named_parameters():
            if p_name.endswith("gamma") or (p_name.endswith("gain") and not p.any()):
                p.copy_(torch.rand_like(p) + 0.5)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == batchnorms
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastvit's unfoldable BatchNorms are named in a warning
        folded = ee.fold(model, x)
    assert_equals_reference(model, folded, x, rtol=1e-5)  # fold's own check: deep models amplify the weights' rounding
    assert functional_calls(folded, F.conv2d, F.linear) == []
    left = [line for line in folded.fold_log if "left unfolded" in line]
    assert batchnorms_left(folded) == len(left) == (24 if name == "fastvit_t8" else 0)
    assert not any("is empty" in line for line in folded.fold_log)


@pytest.mark.parametrize("act", [nn.Hardswish, lambda: nn.ELU(0.5), nn.Mish], ids=["hardswish", "elu", "mish"])
def test_smooth_rectifier_sites_fold_exactly(act):
    """Hardswish/ELU/Mish sites: the linearized one merges its convs (one conv fewer), the others
    go back to torch's module, and the folded model computes what the linearized one does."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), act(),
        nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 16), act(), nn.Linear(16, 3),
    )
    model = ee.convert(randomize_batchnorm(model, 0)).eval()
    kinds = {type(m).__name__ for m in ee.sites(model).values()}
    assert len(ee.sites(model)) == 3 and len(kinds) == 1 and kinds != {"EntropyActivation"}
    ee.linearize(model, ["5"], mode="identity")
    x = torch.randn(2, 3, 6, 6)
    folded = ee.fold(model, x)
    assert relative_error(reference_forward(folded, x), reference_forward(model, x)) <= 1e-5
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 2
    kept = [m for m in folded.modules() if isinstance(m, type(act()))]
    assert len(kept) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())

"""convert / sites: every rectifier call site becomes its own tracked module, outputs unchanged."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import easier_ext as ee
from easier_ext import EntropyActivation

TORCHVISION_SITES = {"resnet18": 17, "vgg16_bn": 15, "mobilenet_v2": 35, "swin_t": 12}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10).eval()


def reference_site_calls(model: nn.Module, x: torch.Tensor) -> int:
    """Independent count: how many rectifier calls one forward makes, seen at the aten level."""
    ops = {"relu", "relu_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "gelu", "silu", "silu_", "prelu", "_prelu_kernel"}
    seen = []

    class Mode(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ops:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Mode():
        model(x)
    return len(seen)


@pytest.mark.parametrize("name", list(TORCHVISION_SITES))
def test_torchvision_models_site_counts_and_outputs(name):
    model = build(name)
    x = torch.randn(2, 3, 64, 64)
    converted = ee.convert(model)
    found = ee.sites(converted)
    assert len(found) == TORCHVISION_SITES[name] == reference_site_calls(model, x)
    assert all(isinstance(m, EntropyActivation) for m in found.values())
    with torch.no_grad():
        expected = model(x)
        got = converted(x)
        for s in found.values():
            s.track = False
        untracked = converted(x)
    if name == "swin_t":  # GELU is within rounding of torch's, not bit-exact (see the ops' docs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)
    assert torch.equal(untracked, expected)
    # every site saw data: each was called in the forward
    assert all(s.observations > 0 for s in found.values())


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_small"])
def test_other_torchvision_families(name):
    """Deeper ResNets, EfficientNet's SiLU, ConvNeXt's GELU on (..., C) tensors, and a model
    whose Hardswish sites are not rectifiers (left alone) beside its ReLUs."""
    model = build(name)
    x = torch.randn(1, 3, 64, 64)
    converted = ee.convert(model)
    assert len(ee.sites(converted)) == reference_site_calls(model, x)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


def test_shared_module_becomes_one_site_per_call_in_execution_order():
    model = ee.convert(torchvision.models.resnet18())
    names = list(ee.sites(model))
    assert names[:5] == ["relu", "layer1.0.relu", "layer1.0.relu_1", "layer1.1.relu", "layer1.1.relu_1"]
    block = model.layer1[0]
    assert isinstance(block, torch.fx.GraphModule) and type(block).__name__ == "BasicBlock"
    assert block.relu is not block.relu_1
    # the model's own structure is kept where no rewrite was needed
    assert type(model).__name__ == "ResNet" and isinstance(model.conv1, nn.Conv2d)
    assert [k for k in model.state_dict() if not k.endswith(("on_counts", "observations", "_extra_state"))] == list(
        torchvision.models.resnet18().state_dict()
    )


def test_execution_order_differs_from_registration_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.act_late = nn.ReLU()
            self.act_early = nn.GELU()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.act_late(self.fc(self.act_early(x)))

    assert list(ee.sites(ee.convert(Net()))) == ["act_early", "act_late"]


def test_execution_order_across_nested_blocks_registered_in_another_order():
    def block():
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    class Net(nn.Module):  # its own forward calls no rectifier: only its children do
        def __init__(self):
            super().__init__()
            self.second, self.first = block(), block()

        def forward(self, x):
            return self.second(self.first(x))

    net = Net()
    model = ee.convert(net)
    assert list(ee.sites(model)) == ["first.1", "second.1"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, img):
        h = F.relu(self.fc1(x))
        h = torch.relu(h) + F.gelu(self.fc2(h), approximate="tanh")
        h = F.leaky_relu(h, 0.2) + F.silu(h) + F.relu6(h)
        h = h.relu()
        c = self.conv(img)
        F.relu(c, inplace=True)  # result used through c, in place
        c.relu_()
        return h, c.sum() + h.sum()


def test_functional_and_inplace_calls():
    torch.manual_seed(0)
    model = Functional()
    args = (torch.randn(5, 8), torch.randn(2, 3, 6, 6))
    converted = ee.convert(model)
    found = ee.sites(converted)
    assert len(found) == 9
    kinds = [type(m).__name__ for m in found.values()]
    assert kinds == ["EntropyReLU", "EntropyReLU", "EntropyGELU", "EntropyLeakyReLU", "EntropySiLU", "EntropyReLU6", "EntropyReLU", "EntropyReLU", "EntropyReLU"]
    assert found["gelu"].approximate == "tanh" and found["leaky_relu"].negative_slope == 0.2
    with torch.no_grad():
        expected = model(*[a.clone() for a in args])
        got = converted(*[a.clone() for a in args])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # the in-place relu on the conv output: counted on the conv's (N, C, H, W) channels
    assert found["relu_3"].on_counts.shape == (4,) and found["relu_"].on_counts.shape == (4,)


def test_channel_dim_inferred_and_overridden():
    swin = ee.convert(torchvision.models.swin_t())
    assert {s.channel_dim for s in ee.sites(swin).values()} == {-1}
    vgg = ee.sites(ee.convert(torchvision.models.vgg16_bn()))
    assert [s.channel_dim for s in vgg.values()] == [1] * 13 + [-1] * 2
    over = ee.sites(ee.convert(torchvision.models.vgg16_bn(), channel_dim={"classifier.1": 1}))
    assert over["classifier.1"].channel_dim == 1 and over["classifier.4"].channel_dim == -1
    assert {s.channel_dim for s in ee.sites(ee.convert(torchvision.models.vgg16_bn(), channel_dim=1)).values()} == {1}


def test_shared_prelu_keeps_one_weight():
    act = nn.PReLU(4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.act = act

        def forward(self, x):
            return self.act(self.conv(self.act(x)))

    model = Net()
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    converted = ee.convert(model)
    a, b = ee.sites(converted).values()
    assert a.weight is b.weight
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_converted_model_is_a_normal_module():
    model = ee.convert(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    model(x)
    clone = copy.deepcopy(model)
    assert torch.equal(clone.layer1[0].relu_1.on_counts, model.layer1[0].relu_1.on_counts)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = ee.convert(torchvision.models.resnet18(num_classes=10))
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.layer4[1].relu_1.on_counts, model.layer4[1].relu_1.on_counts)
    buf = io.BytesIO()
    torch.save(model, buf)  # whole-model pickling, GraphModule children included
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_compile_converted_model():
    model = ee.convert(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, expected)


def test_convert_is_idempotent_and_not_inplace():
    model = torchvision.models.mobilenet_v2()
    once = ee.convert(model)
    assert not any(isinstance(m, EntropyActivation) for m in model.modules())
    twice = ee.convert(once)
    assert list(ee.sites(twice)) == list(ee.sites(once))


def test_no_rectifier_is_an_error():
    with pytest.raises(ValueError, match="no rectifier call site"):
        ee.convert(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.act(self.fc(x))
        return F.relu(x)


def test_untraceable_model_names_the_sites():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), DataDependent())
    with pytest.raises(ee.UntraceableSiteError, match=r"2 \(DataDependent\): its rectifier modules 2.act"):
        ee.convert(model)
    with pytest.warns(UserWarning, match="2.act"):
        partial = ee.convert(model, strict=False)
    assert list(ee.sites(partial)) == ["1"]


def test_site_lookup_errors():
    model = ee.convert(torchvision.models.resnet18())
    assert ee.site(model, "layer2.0.relu_1") is model.layer2[0].relu_1
    with pytest.raises(KeyError, match="did you mean 'layer2.0.relu_1'"):
        ee.site(model, "layer2.0.relu1")

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
    ops = {"relu", "relu_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "gelu", "silu", "silu_", "prelu", "_prelu_kernel",
           "hardswish", "hardswish_", "elu", "elu_", "mish", "mish_"}
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
    """Deeper ResNets, EfficientNet's SiLU, ConvNeXt's GELU on (..., C) tensors, and MobileNetV3's
    Hardswish sites beside its ReLUs (its Hardsigmoid gates are left alone)."""
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
        h = F.hardswish(h) + F.elu(h, 0.5) + F.mish(h)
        h = F.elu_(h * 1.0)
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
    assert len(found) == 13
    kinds = [type(m).__name__ for m in found.values()]
    assert kinds == ["EntropyReLU", "EntropyReLU", "EntropyGELU", "EntropyLeakyReLU", "EntropySiLU", "EntropyReLU6", "EntropyReLU",
                     "EntropyHardswish", "EntropyELU", "EntropyMish", "EntropyELU", "EntropyReLU", "EntropyReLU"]
    assert found["gelu"].approximate == "tanh" and found["leaky_relu"].negative_slope == 0.2
    assert found["elu"].alpha == 0.5 and found["elu_"].alpha == 1.0
    with torch.no_grad():
        expected = model(*[a.clone() for a in args])
        got = converted(*[a.clone() for a in args])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # the in-place relu on the conv output: counted on the conv's (N, C, H, W) channels
    assert found["relu_3"].on_counts.shape == (4,) and found["relu_"].on_counts.shape == (4,)


class _Blocks(nn.Module):
    """A BasicBlock-like module (one ReLU called twice: its forward is rewritten) and a
    functional call, inside a Sequential with a plain ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.relu = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()

    def forward(self, x):
        return F.relu(self.relu(self.bn(self.relu(self.fc(x)))))


@pytest.mark.parametrize("mode", [True, False])
def test_convert_keeps_every_modules_training_mode(mode):
    model = nn.Sequential(_Blocks(), nn.ReLU(), _Blocks())
    model.train(mode)
    model[0].train(not mode)  # a mixed model stays mixed: its first block's sites too
    model[2].bn.train(not mode)
    before = {name: m.training for name, m in model.named_modules()}
    converted = ee.convert(model)
    after = dict(converted.named_modules())
    assert {name: after[name].training for name in before} == before
    found = ee.sites(converted)
    assert len(found) == 7
    assert {name: s.training for name, s in found.items()} == {name: mode != name.startswith("0.") for name in found}


class _SharedFrozen(nn.Module):
    """One Sequential with a frozen BatchNorm under two paths, the second called first (the
    functional call makes convert rewrite this forward and order the children by use), and an
    eval ReLU registered twice."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.p1, self.p2 = nn.Sequential(shared), nn.Sequential(shared)
        self.act = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU())
        self.act[2] = self.act[1]

    def forward(self, x):
        return self.act(F.relu(self.p1(self.p2(x))))


def test_convert_keeps_the_mode_of_shared_modules():
    model = _SharedFrozen()
    model.p1[0][1].eval()
    model.act[1].eval()
    converted = ee.convert(model)
    assert converted.p1[0][1] is converted.p2[0][1] and not converted.p1[0][1].training
    assert converted.p1[0][0].training and converted.training
    assert {name: s.training for name, s in ee.sites(converted).items()} == {"relu": True, "act.1": False, "act.2": False}


@pytest.mark.parametrize("kind", [nn.ReLU, nn.PReLU])
def test_a_rectifier_at_two_places_of_a_sequential_is_a_site_at_each(kind):
    torch.manual_seed(0)
    act = kind()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)
    converted = ee.convert(model)
    found = ee.sites(converted)
    assert list(found) == ["1", "3"] and found["1"] is not found["3"]
    if kind is nn.PReLU:  # one weight, as the model had
        assert found["1"].weight is found["3"].weight and len(list(converted.parameters())) == 5
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))
    # each counted its own call: the ON states of what it was given
    hidden = model[0](x)
    second = model[2](act(hidden))
    with torch.no_grad():
        assert found["1"].on_counts.tolist() == (hidden > 0).sum(0).tolist()
        assert found["3"].on_counts.tolist() == (second > 0).sum(0).tolist()


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


# -- forwards a trace of the module alone would change (issue 13) ------------------------------


class ShortcutBlock(nn.Module):
    """DLA's blocks: an optional argument the forward branches on, and one ReLU called twice."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x, shortcut=None):
        if shortcut is None:  # a trace of the block alone takes the other way: x + None
            shortcut = x
        return self.relu(self.conv2(self.relu(self.conv1(x))) + shortcut)


class SwapOnlyBlock(nn.Module):
    """The same branch, with each rectifier module called once: swapping them keeps its forward."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act, self.act_shortcut = nn.ReLU(), nn.LeakyReLU(0.1)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = self.act_shortcut(x)
        return self.act(self.conv(x) + shortcut)


class ShortcutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a, self.b = ShortcutBlock(), ShortcutBlock()
        self.c, self.d = SwapOnlyBlock(), SwapOnlyBlock()

    def forward(self, x):
        x = self.stem(x)
        y = self.a(x)  # without the argument
        y = self.b(y, shortcut=x)  # with it
        return self.d(self.c(y), x)


def _equal_outputs(converted, original, *args):
    with torch.no_grad():
        for mode in (False, True):
            torch.manual_seed(0)
            expected = original.train(mode)(*[a.clone() for a in args])
            torch.manual_seed(0)
            got = converted.train(mode)(*[a.clone() for a in args])
            assert torch.equal(got, expected), f"outputs differ in {'train' if mode else 'eval'} mode"


def test_optional_argument_the_forward_branches_on_keeps_both_ways():
    torch.manual_seed(0)
    model = ShortcutNet()
    x = torch.randn(2, 3, 6, 6)
    converted = ee.convert(model)
    _equal_outputs(converted, model, x)
    assert list(ee.sites(converted)) == [
        "a.relu", "a.relu_1", "b.relu", "b.relu_1", "c.act_shortcut", "c.act", "d.act",
    ] and len(ee.sites(converted)) == reference_site_calls(model, x)
    # a and b were traced with the arguments the model gives them; torch.fx checks the fixed one
    assert isinstance(converted.a, torch.fx.GraphModule) and type(converted.a).__name__ == "ShortcutBlock"
    assert "_assert_is_none" in converted.a.code and "_assert_is_none" not in converted.b.code
    with pytest.raises(AssertionError, match="shortcut has been specialized to have value None"):
        converted.a(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3))  # never a silently different result
    # the blocks that only needed their modules swapped keep their own forward
    assert type(converted.c) is SwapOnlyBlock and isinstance(converted.c.act_shortcut, ee.EntropyActivation)
    # every site saw data; the branch the model never takes (d's own shortcut) has no site
    converted(x)
    assert all(s.observations > 0 for s in ee.sites(converted).values())
    assert type(converted.d.act_shortcut) is nn.LeakyReLU
    # whole-model pickling (a checkpoint) loads back, and torch.fx still traces afterwards
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _equal_outputs(loaded, model, x)
    assert list(ee.sites(ee.convert(loaded))) == list(ee.sites(converted))
    ee.fold(loaded.eval(), x)


def test_a_block_called_with_and_without_its_argument_is_refused_not_changed():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ShortcutBlock()

        def forward(self, x):
            return self.block(self.block(x), x)  # one block, called both ways

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), Twice())
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ee.UntraceableSiteError, match=r"2.block \(ShortcutBlock\): its rectifier modules 2.block.relu; its forward depends on whether the optional argument 'shortcut' is given.*called with different kinds of arguments"):
        ee.convert(model)
    with pytest.warns(UserWarning, match="2.block"):
        partial = ee.convert(model, strict=False)
    assert list(ee.sites(partial)) == ["1"]
    assert type(partial[2].block) is ShortcutBlock and isinstance(partial[2].block.relu, nn.ReLU)
    _equal_outputs(partial, model, x)


class Fuse(nn.Module):
    """HRNet's multi-resolution module: writes into the list it is given (a proxy has no item
    assignment, so it cannot be traced alone) and calls one ReLU per output."""

    def __init__(self, c=4):
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)])
        self.fuse_act = nn.ReLU()

    def forward(self, x: list):
        for i, branch in enumerate(self.branches):
            x[i] = branch(x[i])
        return [self.fuse_act(x[0] + x[1]), self.fuse_act(x[0] - x[1])]


class SequentialList(nn.Sequential):
    """HRNet's stage container: its own forward, which cannot trace Fuse either (x is a proxy)."""

    def forward(self, x):
        for module in self:
            x = module(x)
        return x


class MultiResolution(nn.Module):
    def __init__(self, reads_after=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.stage = SequentialList(Fuse(), Fuse())
        self.reads_after = reads_after

    def forward(self, x):
        x = self.stem(x)
        xs = [x, x * 2]
        ys = self.stage(xs)
        out = ys[0] + ys[1]
        return out + xs[0] if self.reads_after else out  # xs[0] as the first Fuse left it


def test_module_untraceable_alone_is_converted_from_the_whole_model_trace():
    torch.manual_seed(0)
    model = MultiResolution()
    x = torch.randn(2, 3, 5, 5)
    converted = ee.convert(model)
    _equal_outputs(converted, model, x)
    assert list(ee.sites(converted)) == ["stem.1", "stage.0.fuse_act", "stage.0.fuse_act_1", "stage.1.fuse_act", "stage.1.fuse_act_1"]
    assert len(ee.sites(converted)) == reference_site_calls(model, x)
    # only the modules that needed it are rewritten; the model and its containers keep their classes
    assert type(converted) is MultiResolution and type(converted.stage) is SequentialList
    assert isinstance(converted.stage[0], torch.fx.GraphModule) and type(converted.stage[0]).__name__ == "Fuse"
    folded = ee.fold(converted.eval(), x[:1])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_module_whose_writes_its_caller_reads_is_refused():
    torch.manual_seed(0)
    model = MultiResolution(reads_after=True)  # the caller reads the list the first Fuse wrote into
    with pytest.raises(ee.UntraceableSiteError, match=r"stage.0 \(Fuse\): its rectifier modules stage.0.fuse_act; torch.fx: TypeError: 'Proxy' object does not support item assignment.*writes into the containers it is given"):
        ee.convert(model)
    with pytest.warns(UserWarning, match="stage.0"):
        partial = ee.convert(model, strict=False)
    _equal_outputs(partial, model, torch.randn(2, 3, 5, 5))
    assert "stage.0.fuse_act" not in ee.sites(partial) and "stage.1.fuse_act_1" in ee.sites(partial)


def test_optional_argument_passed_through_is_not_specialized():
    class Masked(nn.Module):
        def forward(self, x, mask=None):
            return x if mask is None else x * mask

    class Block(nn.Module):  # mask only goes to a submodule: one graph serves both ways
        def __init__(self):
            super().__init__()
            self.fc, self.masked = nn.Linear(4, 4), Masked()

        def forward(self, x, mask=None):
            return F.gelu(self.masked(F.relu(self.fc(x)), mask))

    torch.manual_seed(0)
    block = Block()
    converted = ee.convert(block)
    assert list(ee.sites(converted)) == ["relu", "gelu"] and "_assert" not in converted.code
    x, mask = torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), block(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(converted(x, mask), block(x, mask), rtol=1e-6, atol=1e-6)


class TrainingOnly(nn.Module):
    """A forward that reads self.training: a traced graph would keep the mode it was traced in."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(F.dropout(F.relu(self.fc(x)), 0.5, self.training))


def test_forward_that_depends_on_the_training_mode_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), TrainingOnly())
    with pytest.raises(ee.UntraceableSiteError, match=r"2 \(TrainingOnly\): the rectifier calls in its forward; its forward depends on the training mode"):
        ee.convert(model)
    with pytest.warns(UserWarning, match="training mode"):
        partial = ee.convert(model, strict=False)
    assert list(ee.sites(partial)) == ["1"]
    _equal_outputs(partial, model, torch.randn(8, 4))


def test_rectifier_modules_of_a_forward_that_reads_the_mode_are_still_swapped():
    class Aux(nn.Module):  # Inception-like: a head that runs only in training, each ReLU called once
        def __init__(self):
            super().__init__()
            self.fc, self.aux = nn.Linear(4, 4), nn.Linear(4, 4)
            self.act, self.aux_act = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            y = self.act(self.fc(x))
            if self.training:
                y = y + self.aux_act(self.aux(y))
            return y

    torch.manual_seed(0)
    model = Aux()
    converted = ee.convert(model)  # the whole model reads the mode: no caller to trace, but a swap is safe
    assert type(converted) is Aux and list(ee.sites(converted)) == ["act", "aux_act"]
    _equal_outputs(converted, model, torch.randn(5, 4))


def test_root_forward_branching_on_its_optional_argument_is_refused():
    torch.manual_seed(0)
    block = ShortcutBlock()
    with pytest.raises(ee.UntraceableSiteError, match=r"<model> \(ShortcutBlock\): its rectifier modules relu; its forward depends on whether the optional argument 'shortcut'"):
        ee.convert(block)


def test_untraceable_module_the_model_never_calls_is_left_as_it_is():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()
            self.spare = Fuse()  # registered, never called

        def forward(self, x):
            return self.act(self.fc(x))

    model = Net()
    with pytest.warns(UserWarning, match="never calls them: spare"):
        converted = ee.convert(model)
    assert list(ee.sites(converted)) == ["act"] and isinstance(converted.spare.fuse_act, nn.ReLU)


@pytest.mark.parametrize("name", ["dla34", "hrnet_w18_small"])
def test_timm_models_convert_from_the_whole_model_trace(name):
    """Issue 13: dla34 converted and then failed at every forward; hrnet_w18_small was refused."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    converted = ee.convert(model)
    assert type(converted) is type(model)
    assert len(ee.sites(converted)) == reference_site_calls(model, x)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    assert all(s.observations > 0 for s in ee.sites(converted).values())


def test_activations_without_a_site_are_named_not_passed_over_silently():
    # MobileNetV3-style: ReLUs and Hardswish become sites, Hardsigmoid (a gate) and SELU have none
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Hardswish(), nn.Conv2d(4, 4, 1), nn.SELU(),
                          nn.Conv2d(4, 4, 1), nn.SELU(), nn.Hardsigmoid())
    with pytest.warns(UserWarning, match=r"convert passed over 2 SELU modules \(5, 7\) and 1 Hardsigmoid module \(8\), "
                                         r"which easier_ext has no site for"):
        converted = ee.convert(model)
    assert list(ee.sites(converted)) == ["1", "3"]
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(converted(x), model(x))
    # no site at all (LeViT-style): the error says what was found
    with pytest.raises(ValueError, match=r"nothing to convert \(1 CELU module \(1\), which easier_ext has no site for\)"):
        ee.convert(nn.Sequential(nn.Linear(3, 3), nn.CELU()))

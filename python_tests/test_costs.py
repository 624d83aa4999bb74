"""easier_ext.surgery.costs against hand-computed MACs, parameter counts and depths."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from easier_ext import EntropyReLU
from easier_ext.surgery import macs
from easier_ext.surgery.costs import Cost, LatencyComparison, compare, compare_latency, cost
from easier_ext.surgery.latency import timed_rounds


def measure(model: nn.Module, example_input) -> Cost:
    return cost(model, example_input, latency=False)


def conv_macs(cout: int, cin: int, groups: int, k: int, hout: int, wout: int, n: int) -> int:
    return cout * (cin // groups) * k * k * hout * wout * n


def hooked_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of every Conv2d and Linear, from the shapes their forward hooks see (no flop counter)."""
    total = 0

    def hook(module, inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            # out.numel() is N * Cout * Hout * Wout; each output reads Cin/g * kh * kw inputs
            total += out.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        else:
            total += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total


def unique_numel(model: nn.Module) -> int:
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())


# -- MACs and parameters ---------------------------------------------------------------------


def test_conv():
    model = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    c = measure(model, torch.randn(2, 3, 32, 32))
    assert c.macs == conv_macs(8, 3, 1, 3, 16, 16, 2) == 110_592
    assert c.params == 8 * 3 * 3 * 3 + 8
    assert c.depth == 1
    assert c.latency_s is None


@pytest.mark.parametrize("cin, cout, groups", [(8, 16, 4), (8, 8, 8)], ids=["grouped", "depthwise"])
def test_grouped_conv(cin, cout, groups):
    model = nn.Conv2d(cin, cout, 3, groups=groups, bias=False)
    c = measure(model, torch.randn(1, cin, 10, 10))
    assert c.macs == conv_macs(cout, cin, groups, 3, 8, 8, 1)
    assert c.params == cout * (cin // groups) * 9


@pytest.mark.parametrize("shape, rows", [((4, 20), 4), ((4, 5, 20), 20), ((20,), 1)], ids=["2d", "3d", "unbatched"])
def test_linear(shape, rows):
    c = measure(nn.Linear(20, 10), torch.randn(shape))
    assert c.macs == 20 * 10 * rows
    assert c.params == 20 * 10 + 10
    assert c.depth == 1


class Residual(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)


def test_residual_block():
    c = measure(Residual(), torch.randn(1, 8, 16, 16))
    assert c.macs == 2 * conv_macs(8, 8, 1, 3, 16, 16, 1)  # BatchNorm, ReLU and the add are not MACs
    assert c.params == 2 * 8 * 8 * 9 + 2 * (8 + 8)
    assert c.depth == 2  # the skip is the shorter path


def attend(q, k, v, heads):
    """Attention in a helper function, the way torchvision's swin_t calls it."""

    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(attend(*self.qkv(x).chunk(3, dim=-1), self.heads))


def test_attention():
    b, seq, dim, heads = 2, 6, 16, 2
    c = measure(SelfAttention(dim, heads), torch.randn(b, seq, dim))
    attention = 2 * (b * heads * seq * seq * (dim // heads))  # q @ k^T and softmax(.) @ v
    assert c.macs == b * seq * dim * 3 * dim + attention + b * seq * dim * dim
    assert c.depth == 1 + 2 + 1  # qkv, the two matmuls inside attention, proj


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


# CPU runs equal q/v head dims with its fused kernel (which FlopCounterMode alone counts as zero),
# different ones with the math fallback (two bmm)
@pytest.mark.parametrize("e, ev", [(8, 8), (8, 4)], ids=["fused", "math"])
def test_attention_macs(e, ev):
    b, h, length, source = 2, 3, 5, 7
    q, k, v = torch.randn(b, h, length, e), torch.randn(b, h, source, e), torch.randn(b, h, source, ev)
    c = measure(Attention(), (q, k, v))
    assert c.macs == b * h * length * source * e + b * h * length * source * ev
    assert c.depth == 2


def test_torchvision_vit_fast_path_attention_is_counted():
    # in eval without grad, nn.MultiheadAttention runs aten._native_multi_head_attention: the q/k/v
    # and output projections and both attention matmuls in one op (FlopCounterMode counts it as 0)
    from torchvision.models.vision_transformer import VisionTransformer

    b, size, patch, e, mlp, layers, classes = 2, 32, 8, 32, 64, 2, 10
    model = VisionTransformer(image_size=size, patch_size=patch, num_layers=layers, num_heads=2, hidden_dim=e, mlp_dim=mlp,
                              num_classes=classes).eval()
    tokens = (size // patch) ** 2 + 1  # and the class token
    per_layer = 3 * b * tokens * e * e + 2 * b * tokens * tokens * e + b * tokens * e * e + 2 * b * tokens * e * mlp
    hand = b * (tokens - 1) * 3 * patch * patch * e + layers * per_layer + b * e * classes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left uncounted
        c = cost(model, torch.randn(b, 3, size, size), latency=False)
    assert c.macs == hand
    assert c.depth == 1 + layers * (4 + 2) + 1  # patch conv; q/k/v projection, 2 matmuls, output projection, MLP; head


def test_an_op_without_a_mac_count_is_named(monkeypatch):
    monkeypatch.delitem(macs._EXTRA_FLOP_FORMULAS, torch.ops.aten._native_multi_head_attention)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class SelfAttend(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    with pytest.warns(UserWarning, match=r"no MAC count for aten._native_multi_head_attention; the MACs reported leave them out"):
        cost(SelfAttend(), torch.randn(2, 5, 8), latency=False)


class DeepValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, self.v(x))


def test_attention_value_goes_through_one_matmul():
    # q and k pass through q @ k^T and the product with v (2), v only through the latter (1):
    # max(0 + 2, 2 + 1) = 3
    assert measure(DeepValue(), torch.randn(1, 4, 8)).depth == 3


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_shared_parameters_count_once():
    model = Tied()
    c = measure(model, torch.randn(3, 16))
    assert c.params == 16 * 16 + 16 + 16 == unique_numel(model)
    assert c.macs == 2 * 16 * 16 * 3  # the shared weight is still applied twice
    assert c.depth == 2


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 6))

    def forward(self, x, y, scale):
        return self.a(x) * scale + self.b(y)


def test_tuple_of_args():
    c = measure(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 5), 0.5))
    assert c.macs == 2 * (4 * 6 + 5 * 6 + 6 * 6)
    assert c.depth == 2


# -- depth -----------------------------------------------------------------------------------


def test_depth_of_a_chain():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    assert measure(model, torch.randn(1, 3, 16, 16)).depth == 3


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.short = nn.Conv2d(3, 4, 1)
        self.long = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return self.short(x) + self.long(x)


def test_depth_is_the_longest_branch():
    assert measure(Branches(), torch.randn(1, 3, 8, 8)).depth == 3


def project(x, w):
    return F.linear(x, w)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.w2 = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return torch.relu(project(x, self.w)) @ self.w2


def test_functional_calls_count():
    c = measure(Functional(), torch.randn(3, 8))
    assert c.depth == 2
    assert c.macs == 3 * 8 * 8 + 3 * 8 * 4


class WeightProduct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(16, 4))
        self.b = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return F.linear(x, self.a @ self.b)


def test_matmul_of_parameters_is_not_on_the_path():
    c = measure(WeightProduct(), torch.randn(2, 16))
    assert c.depth == 1  # a @ b does not depend on the input
    assert c.macs == 16 * 4 * 16 + 2 * 16 * 16  # but it is computed every forward


class WritesIntoSlices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        out = x.new_zeros(x.shape[0], 16)
        out[:, :8] = self.l2(self.l1(x))
        out[:, 8:].add_(self.l3(x))
        return out


def test_depth_through_inplace_writes():
    assert measure(WritesIntoSlices(), torch.randn(2, 8)).depth == 2


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))

    def forward(self, x):
        return {"shallow": self.a(x), "deep": self.b(x)}


def test_depth_is_the_deepest_output():
    assert measure(TwoOutputs(), torch.randn(1, 4)).depth == 3


def test_resnet18():
    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(1, 3, 32, 32)
    c = measure(model, x)
    # conv1, then 4 stages x 2 BasicBlocks x 2 convs = 17 convs on the main path (a downsample
    # shortcut is one 1x1 conv beside two, so never longer), then fc
    assert c.depth == 1 + 4 * 2 * 2 + 1 == 18
    assert c.params == 11_689_512 == unique_numel(model)
    assert c.macs == hooked_macs(model, x)


def test_mobilenet_v2():
    model = torchvision.models.mobilenet_v2(weights=None)
    x = torch.randn(1, 3, 32, 32)
    c = measure(model, x)
    # features[0] conv; the first InvertedResidual (expand ratio 1) is depthwise + project (2);
    # the other 16 are expand + depthwise + project (3 each); features[18] is a 1x1 conv: 52
    # convs (the residual skips only bypass blocks), then the classifier's Linear
    assert c.depth == 1 + 2 + 16 * 3 + 1 + 1 == 53
    assert c.params == 3_504_872 == unique_numel(model)
    assert c.macs == hooked_macs(model, x)


# -- latency ---------------------------------------------------------------------------------


def test_latency():
    threads = torch.get_num_threads()
    c = cost(Residual(), torch.randn(1, 8, 8, 8), threads=1, min_run_time=0.01)
    assert isinstance(c.latency_s, float) and c.latency_s > 0
    assert torch.get_num_threads() == threads
    assert cost(Residual(), torch.randn(1, 8, 8, 8), min_run_time=0.01).latency_s > 0


class Sleeps(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_compare_latency_pairs_rounds_and_says_when_there_is_no_change():
    x = torch.randn(2, 4)
    # sleeps: a slow machine can only lengthen them, and 20 ms against 1 ms stays far apart
    timed = compare_latency(Sleeps(0.02), Sleeps(0.001), x, rounds=8)
    assert timed.measurable and timed.speedup > 2 and timed.low <= timed.speedup <= timed.high and timed.rounds == 8
    assert timed.before_s >= 0.02 and timed.after_s >= 0.001 and timed.before_s > 2 * timed.after_s
    assert str(timed).startswith(f"{timed.speedup:.2f}x faster (")
    assert str(compare_latency(Sleeps(0.001), Sleeps(0.02), x, rounds=8)).split(" (")[0].endswith("x slower")
    # the middle half of the rounds on both sides of 1: noise, not a speedup
    assert str(LatencyComparison(1.0, 0.98, 1.02, 0.97, 1.05, 30)) == "no measurable change (0.97-1.05x over the middle half of 30 paired rounds)"
    with pytest.raises(ValueError, match="rounds must be an int >= 4"):
        compare_latency(Sleeps(0), Sleeps(0), x, rounds=3)


def test_timed_rounds_warm_up_then_time_one_call_of_each_per_round():
    log = []
    calls = {k: (lambda k=k: log.append(k)) for k in "abc"}
    times = timed_rounds(calls, rounds=5)
    assert log[:3] == ["a", "b", "c"]  # the warm-up, untimed
    assert len(log) == 3 + 5 * 3 and all(sorted(log[i:i + 3]) == ["a", "b", "c"] for i in range(3, len(log), 3))
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5, "c": 5}
    # min_time keeps timing rounds after the last one asked for
    start = time.perf_counter()
    slept = timed_rounds({"sleep": time.sleep}, (0.002,), rounds=1, min_time=0.05)["sleep"]
    assert time.perf_counter() - start >= 0.05 and all(s >= 0.002 for s in slept)


# -- the model is left as it was -------------------------------------------------------------


def test_training_flags_and_state_are_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model.train()
    model[4].eval()  # a frozen BatchNorm inside a training model stays frozen
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cost(model, torch.randn(2, 3, 8, 8), min_run_time=0.01)
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval mode: no running statistics were updated


def test_sites_do_not_count_during_measurement():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), EntropyReLU(), nn.Conv2d(4, 4, 3), EntropyReLU(track=False))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model(x)
    counts, observations = model[1].on_counts.clone(), model[1].observations.clone()
    c = cost(model, x, min_run_time=0.01)
    assert c.depth == 2
    assert torch.equal(model[1].on_counts, counts) and torch.equal(model[1].observations, observations)
    assert model[1].track and not model[3].track


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        self.calls += 1  # in place
        self.last = x.detach().sum(0)  # rebound
        return self.lin(x)


def test_buffers_written_by_forward_are_restored():
    model = Counter()
    calls, last = model.calls, model.last
    cost(model, torch.randn(2, 4), min_run_time=0.01)
    assert model.calls is calls and model.calls.item() == 0
    assert model.last is last and torch.equal(model.last, torch.zeros(4))


# -- errors ----------------------------------------------------------------------------------


class UsesItem(nn.Module):
    def forward(self, x):
        return x * x.sum().item()


def test_bad_arguments():
    x = torch.randn(1, 4)
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got function"):
        cost(lambda t: t, x)
    with pytest.raises(TypeError, match="tensor or a tuple.*got list"):
        cost(model, [x])
    with pytest.raises(TypeError, match=r"got a tuple of \(int, float\)"):
        cost(model, (1, 2.0))
    with pytest.raises(ValueError, match="threads must be a positive int"):
        cost(model, x, threads=0)
    with pytest.raises(ValueError, match="min_run_time must be positive"):
        cost(model, x, min_run_time=0)
    with pytest.raises(ValueError, match="not initialized yet"):
        cost(nn.LazyLinear(4), x)
    with pytest.raises(TypeError, match="two Cost"):
        compare(Cost(1, 1, 1), {"params": 1})


def test_untraceable_model():
    with pytest.raises(RuntimeError, match="could not trace UsesItem with make_fx.*aten._local_scalar_dense"):
        measure(UsesItem(), torch.randn(3))


# -- reporting -------------------------------------------------------------------------------


def test_str_and_as_dict():
    c = Cost(params=11_173_962, macs=1_818_558_976, depth=18, latency_s=0.00421)
    assert str(c) == "11.17 M params, 1.82 GMACs, depth 18, 4.21 ms"
    assert str(Cost(params=123, macs=456, depth=2)) == "123 params, 456 MACs, depth 2"
    assert json.loads(json.dumps(c.as_dict())) == {"params": 11_173_962, "macs": 1_818_558_976, "depth": 18, "latency_s": 0.00421}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.depth = 3


def test_compare():
    before = Cost(params=11_173_962, macs=1_818_558_976, depth=18, latency_s=0.004)
    after = Cost(params=5_586_981, macs=909_279_488, depth=9, latency_s=None)
    table = compare(before, after).splitlines()
    assert table[0].split() == ["before", "after", "after/before"]
    assert table[1].split() == ["params", "11.17", "M", "5.59", "M", "0.50x"]
    assert table[2].split() == ["MACs", "1.82", "G", "909.28", "M", "0.50x"]
    assert table[3].split() == ["depth", "18", "9", "0.50x"]
    assert table[4].split() == ["latency", "4.00", "ms", "-", "-"]
    assert len({len(line) for line in table[1:]}) == 1  # columns line up

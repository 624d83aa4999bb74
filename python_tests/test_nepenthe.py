"""NEPENTHE: the budget split, irrelevance, magnitude pruning whose masks persist, exact
linearization of zero-entropy sites, the schedule end to end (resume, DDP) and its CLI."""

import copy
import functools
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import easier_ext as ee
from testing import on_two_gloo_ranks
from easier_ext.app.cli import main
from easier_ext.methods.nepenthe import NEPENTHE
from easier_ext.methods.pruning import (
    Paths, bake_pruning, bypassed_sites, feeding_layers, guarded_capacity, irrelevance, prune_magnitude, sparsity, split_budget, weight,
)
from easier_ext.methods.train import Recipe, finetune
from test_easier import bn_free_cnn, count_calls, loaders, schedule, tiny_cnn, tiny_data


# -- the budget split ---------------------------------------------------------------------------
def test_split_budget_matches_a_hand_computed_example():
    # I = (1, 2, 4): S = 7, logits S / I = (7, 3.5, 1.75),
    # softmax = (0.965761, 0.029163, 0.005068): 100 weights -> 96.58, 2.92, 0.51 -> floors 96, 2, 0,
    # the 2 units left go to the largest remainders (b .92, a .58): 97, 3, 0.
    irr = {"a": 1.0, "b": 2.0, "c": 4.0}
    assert split_budget(100, irr, {"a": 1000, "b": 1000, "c": 1000}) == {"a": 97, "b": 3, "c": 0}
    # a holds only 50: capped; the other 50 shared by b, c with S = 2 + 4 = 6 now, logits (3, 1.5),
    # e^3 : e^1.5 = 0.817574 : 0.182426: 40.88 and 9.12 -> 40, 9, the unit left to b.
    assert split_budget(100, irr, {"a": 50, "b": 1000, "c": 1000}) == {"a": 50, "b": 41, "c": 9}
    # b's share after a is capped exceeds its 40: capped too, c takes the rest
    assert split_budget(100, irr, {"a": 50, "b": 40, "c": 1000}) == {"a": 50, "b": 40, "c": 10}


def test_split_budget_temperature_divides_the_logits():
    # T = 2: logits S / (T I) = (3.5, 1.75, 0.875), softmax = (0.802430, 0.139441, 0.058129):
    # 80.24, 13.94, 5.81 -> floors 80, 13, 5; the 2 units left to b (.94) and c (.81)
    irr = {"a": 1.0, "b": 2.0, "c": 4.0}
    assert split_budget(100, irr, {"a": 1000, "b": 1000, "c": 1000}, temperature=2.0) == {"a": 80, "b": 14, "c": 6}
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            split_budget(10, irr, {"a": 10, "b": 10, "c": 10}, temperature=bad)


def test_feeding_layers_take_every_branch_of_equal_depth():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.act(self.a(x) + self.b(x))

    assert feeding_layers(ee.convert(TwoBranches())) == {"act": ["a", "b"]}


def test_split_budget_against_the_formula_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 8))
        irr = {f"s{i}": float(v) for i, v in enumerate(rng.uniform(0.05, 1.0, n))}
        cap = {k: int(rng.integers(1, 500)) for k in irr}
        total = int(rng.integers(0, sum(cap.values()) + 1))
        shares = split_budget(total, irr, cap)
        assert sum(shares.values()) == total and all(0 <= shares[k] <= cap[k] for k in irr)
        # where nothing is capped, each share is the softmax share rounded down or up
        logits = np.array([sum(irr.values()) / irr[k] for k in irr])
        soft = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        if all(total * p < cap[k] for k, p in zip(irr, soft)):
            for k, p in zip(irr, soft):
                assert abs(shares[k] - total * p) < 1.0


def test_split_budget_gives_nothing_to_irrelevant_sites_and_refuses_too_much():
    assert split_budget(10, {"a": 0.0, "b": 0.5}, {"a": 100, "b": 100}) == {"a": 0, "b": 10}
    with pytest.raises(ValueError, match="cannot prune 101 weights: the eligible sites hold 100"):
        split_budget(101, {"a": 0.0, "b": 0.5}, {"a": 100, "b": 100})


def test_irrelevance_is_entropy_times_the_mean_magnitude_of_nonzero_weights():
    w = [torch.tensor([0.0, 1.0, -3.0, 0.0]), torch.tensor([[2.0]])]
    assert irrelevance(0.5, w) == pytest.approx(0.5 * (1 + 3 + 2) / 3)
    assert irrelevance(0.5, [torch.zeros(3)]) == 0.0


# -- which layers feed a site -------------------------------------------------------------------
def test_feeding_layers_follow_the_graph_through_batchnorm_and_residual_sums():
    model = ee.convert(ee.build_model("resnet18", num_classes=10, small_input=True))
    feeds = feeding_layers(model)
    assert list(feeds) == list(ee.sites(model))
    assert feeds["relu"] == ["conv1"]
    # BasicBlock calls self.relu twice: two sites, fed by conv1 and by conv2 (not the downsample
    # shortcut, which is on a shorter path)
    assert feeds["layer1.0.relu"] == ["layer1.0.conv1"] and feeds["layer1.0.relu_1"] == ["layer1.0.conv2"]
    assert feeds["layer2.0.relu_1"] == ["layer2.0.conv2"]
    taken = [layer for layers in feeds.values() for layer in layers]
    assert len(taken) == len(set(taken)) and "fc" not in taken


# -- which sites are bypassed ------------------------------------------------------------------
class SkipBlock(nn.Module):
    """stem -> a -> (fc1 -> b -> fc2) + skip -> c -> head: b's and c's layers are bypassed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.fc1, self.fc2, self.head = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.a, self.b, self.c = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        h = self.a(self.stem(x))
        return self.head(self.c(h + self.fc2(self.b(self.fc1(h)))))


def test_bypassed_sites_on_hand_built_models():
    model = ee.convert(SkipBlock())
    assert feeding_layers(model) == {"a": ["stem"], "b": ["fc1"], "c": ["fc2"]}
    # emptying fc1 makes b constant, and fc2 of a constant is one: the whole branch is a constant
    assert bypassed_sites(model) == {"a": False, "b": True, "c": True}
    assert bypassed_sites(ee.convert(mlp())) == {"1": False, "3": False}  # a plain chain
    paths = Paths(model)
    assert paths.connected() and paths.connected(["fc1", "fc2"]) and not paths.connected(["stem"])


def _torchvision_bypassed(name: str) -> list:
    model = ee.convert(ee.build_model(name, num_classes=10, small_input=True))
    return [site for site, b in bypassed_sites(model).items() if b]


def test_bypassed_sites_on_torchvision_models():
    # ResNet: each block's second site (fed by conv2, right before the residual sum); not the first,
    # whose constant would still go through the padded conv2
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert _torchvision_bypassed("resnet18") == [f"{b}.relu_1" for b in blocks]
    assert _torchvision_bypassed("vgg16_bn") == []  # a plain chain
    # MobileNetV2: the depthwise site of each block with a residual sum (stride 1, same width);
    # its constant goes through the unpadded 1x1 projection into the sum
    residual = [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    assert _torchvision_bypassed("mobilenet_v2") == [f"features.{i}.conv.1.2" for i in residual]
    # Swin: every block's MLP GELU (its first Linear's constant goes through the second Linear and
    # stochastic depth into the residual sum)
    stages = [(1, 2), (3, 2), (5, 6), (7, 2)]
    assert _torchvision_bypassed("swin_t") == [f"features.{s}.{b}.mlp.1" for s, n in stages for b in range(n)]


# -- magnitude pruning and its masks -----------------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def mlp_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g)
    x[torch.arange(n), y] += 2.0
    return DataLoader(TensorDataset(x, y), batch_size=32)


def test_prune_magnitude_zeroes_the_smallest_weights_across_layers():
    model = mlp()
    before = [model[i].weight.detach().clone() for i in (0, 2)]
    prune_magnitude(model, ["0", "2"], 100)
    # reference: the 100 smallest magnitudes over both layers together
    flat = torch.cat([w.flatten() for w in before]).abs()
    threshold = flat.sort().values[99]
    for i, w0 in zip((0, 2), before):
        expected = torch.where(w0.abs() <= threshold, torch.zeros_like(w0), w0)
        torch.testing.assert_close(weight(model[i]), expected, rtol=0, atol=0)
    assert sum(int((weight(model[i]) == 0).sum()) for i in (0, 2)) == 100
    # a second call prunes among the weights left
    prune_magnitude(model, ["0", "2"], 50)
    assert sum(int((weight(model[i]) == 0).sum()) for i in (0, 2)) == 150
    with pytest.raises(ValueError, match="cannot prune 1000 weights"):
        prune_magnitude(model, ["0"], 1000)


def test_prune_magnitude_can_keep_each_neurons_largest_weight():
    model = mlp()
    w0 = model[0].weight.detach().clone()  # (16, 4)
    assert guarded_capacity([w0], 1.0) == 64 - 16 and guarded_capacity([w0], 0.5) == 32
    prune_magnitude(model, ["0"], 48, keep_neurons=True)
    w = weight(model[0])
    # each row keeps exactly its largest-magnitude weight
    expected = torch.zeros_like(w0)
    top = w0.abs().argmax(dim=1)
    expected[torch.arange(16), top] = w0[torch.arange(16), top]
    torch.testing.assert_close(w, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="that are not a neuron's largest"):
        prune_magnitude(model, ["0"], 1, keep_neurons=True)


def test_masks_persist_through_finetuning_deepcopy_and_save_load(tmp_path):
    model = mlp()
    prune_magnitude(model, ["2"], 128)
    pruned = weight(model[2]) == 0
    kept_before = weight(model[2])[~pruned].clone()
    finetune(model, mlp_data(), Recipe(epochs=2, lr=0.1, amp=False), progress=False)
    w = weight(model[2])
    assert bool((w[pruned] == 0).all()) and not torch.equal(w[~pruned], kept_before)  # trained, zeros kept
    torch.save(model, tmp_path / "m.pt")
    for restored in (copy.deepcopy(model), torch.load(tmp_path / "m.pt", weights_only=False)):
        finetune(restored, mlp_data(), Recipe(epochs=1, lr=0.1, amp=False), progress=False)
        assert bool((weight(restored[2])[pruned] == 0).all())
    # a state_dict loads into a model pruned the same way
    fresh = mlp()
    prune_magnitude(fresh, ["2"], 128)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(weight(fresh[2]), weight(model[2]))
    # baked: a plain parameter with the zeros, same outputs
    x = torch.randn(5, 4)
    baked = bake_pruning(copy.deepcopy(model))
    assert not hasattr(baked[2], "weight_mask") and isinstance(baked[2].weight, nn.Parameter)
    torch.testing.assert_close(baked(x), model(x))
    assert sparsity(model, ["0", "2"])[1] == {"0": 0.0, "2": 0.5}


# -- a site at zero entropy is replaced exactly -------------------------------------------------
def constant_first_site_mlp() -> nn.Module:
    """The first ReLU sees 8 always-ON and 8 always-OFF neurons on mlp_data."""
    model = mlp()
    with torch.no_grad():  # |w x| < 8 on this data: the bias decides each neuron's sign
        model[0].bias.copy_(torch.tensor([8.0, -8.0] * 8))
    return model


def constant_first_site_cnn() -> nn.Module:
    """conv1x1 -> BN -> ReLU (each channel always ON or always OFF) -> padded 3x3 conv -> ..."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    with torch.no_grad():
        model[1].weight.fill_(0.01)
        model[1].bias.copy_(torch.tensor([8.0, -8.0] * 4))
    return model.eval()


@pytest.mark.parametrize("build, data", [(constant_first_site_mlp, mlp_data), (constant_first_site_cnn, lambda: loaders()[0])])
def test_a_site_at_zero_entropy_is_replaced_exactly_and_no_longer_pruned(build, data):
    data = data()
    model = ee.convert(build()).eval()
    x = torch.cat([b[0] for b in data])
    nep = NEPENTHE(model, data, data, example_input=x[:2], latency=False, progress=False)
    work = copy.deepcopy(nep.model).eval()
    with torch.no_grad():
        before = work(x)
    step = nep._after_finetune(work, {"removed": []}, 1)  # measure (eval mode), replace constant sites
    assert step["removed"] == ["2" if isinstance(work[0], nn.Conv2d) else "1"]
    site = ee.sites(work)[step["removed"][0]]
    assert site.linearized and sorted(set(site.linear_scale.tolist())) == [0.0, 1.0]  # a 0/1 mask
    assert all(h > 0 for n, h in step["entropies"].items() if n not in step["removed"])
    with torch.no_grad():
        if isinstance(work[0], nn.Linear):
            torch.testing.assert_close(work(x), before, rtol=0, atol=0)  # exact on the measured data
        else:
            # conv1x1 -> mask -> padded 3x3 now pays to merge: the padding moved to the chain's
            # first conv, so the reference is the original with that padding and a 0/1 mask
            assert step["padding_moved"] == ["3", "0"]
            ref = build()
            on = (ref[:2](x) > 0).transpose(0, 1).flatten(1).all(dim=1)  # the always-ON channels
            ref[0].padding, ref[3].padding = (1, 1), (0, 0)
            head = ref[:2](x) * on.to(x.dtype)[:, None, None]
            torch.testing.assert_close(work(x), ref[3:](head))
    # the next step prunes only the live sites' layers
    first = weight(work[0]).clone()
    pruned = nep._step(work, step["entropies"])["pruned"]
    assert pruned and step["removed"][0] not in pruned
    torch.testing.assert_close(weight(work[0]), first, rtol=0, atol=0)


# -- the guarded allocation --------------------------------------------------------------------
def _nonzero_rows(w: torch.Tensor) -> int:
    return int((w.reshape(w.shape[0], -1) != 0).any(dim=1).sum())


def test_guarded_allocation_never_empties_a_layer_of_a_plain_chain():
    data = mlp_data()
    x = torch.cat([b[0] for b in data])
    for allocation in ("guarded", "reference"):
        options = {"layer_cap": 0.5} if allocation == "guarded" else {}
        nep = NEPENTHE(ee.convert(mlp()), data, data, example_input=x[:2], zeta=1.0, allocation=allocation, latency=False, progress=False, **options)
        work = copy.deepcopy(nep.model)
        for _ in range(12):
            before = [int(weight(work[i]).count_nonzero()) for i in (0, 2)]
            if nep._step(work, {"1": 0.5, "3": 0.9}) is None:
                break
            if allocation == "guarded":  # every neuron keeps a weight, no layer loses more than half per step
                assert _nonzero_rows(weight(work[0])) == 16 and _nonzero_rows(weight(work[2])) == 16
                assert all(int(weight(work[i]).count_nonzero()) >= n - n // 2 for i, n in zip((0, 2), before))
        if allocation == "guarded":
            assert int(weight(work[0]).count_nonzero()) == 16 and int(weight(work[2]).count_nonzero()) == 16
        else:  # zeta = 1: the reference empties every layer at once, so the output no longer depends on x
            assert not Paths(work).connected()


def test_guarded_allocation_caps_each_non_bypassed_site_per_iteration():
    data = mlp_data()
    x = torch.cat([b[0] for b in data])
    nep = NEPENTHE(ee.convert(mlp()), data, data, example_input=x[:2], zeta=0.8, layer_cap=0.25, latency=False, progress=False)
    work = copy.deepcopy(nep.model)
    step = nep._step(work, {"1": 0.1, "3": 0.9})
    # site 1 has the least irrelevance but may lose only 25% (16 of 64); site 3 takes the rest of
    # its own 25% (64 of 256): 80 of the 256 wanted
    assert step["pruned"] == {"1": 16, "3": 64} and step["bypassed"] == step["emptied"] == []


def test_guarded_allocation_may_empty_bypassed_layers_and_their_sites_go():
    data = mlp_data()
    x = torch.cat([b[0] for b in data])
    nep = NEPENTHE(ee.convert(SkipBlock()), data, data, example_input=x[:2], zeta=1.0, latency=False, progress=False)
    work = copy.deepcopy(nep.model).eval()
    step = nep._step(work, {"a": 0.5, "b": 0.2, "c": 0.9})
    assert step["bypassed"] == ["b", "c"] and step["emptied"] == ["b"]  # one branch per iteration: the least irrelevant
    assert not weight(work.fc1).any()  # emptied: the branch is a constant
    assert _nonzero_rows(weight(work.stem)) == 16 and _nonzero_rows(weight(work.fc2)) == 16  # capped, every neuron kept
    after = nep._after_finetune(work, step, 1)
    assert after["removed"] == ["b"] and after["dead"] == []  # b sees fc1's bias: constant, replaced


def test_a_site_that_only_feeds_an_emptied_layer_is_dead_and_replaced():
    data = mlp_data()
    x = torch.cat([b[0] for b in data])
    nep = NEPENTHE(ee.convert(SkipBlock()), data, data, example_input=x[:2], latency=False, progress=False)
    work = copy.deepcopy(nep.model).eval()
    prune_magnitude(work, ["fc2"], 256)  # b still varies, but nothing reads it any more
    with torch.no_grad():
        h = torch.relu(work.stem(x))
        expected = work.head(torch.relu(h + work.fc2.bias))  # plain torch: the branch is fc2's bias
        torch.testing.assert_close(work(x), expected)
    step = nep._after_finetune(work, {"removed": []}, 1)
    assert step["dead"] == ["b"] and step["removed"] == ["b"] and ee.sites(work)["b"].linearized
    assert step["entropies"]["b"] > 0
    with torch.no_grad():
        torch.testing.assert_close(work(x), expected)


def test_a_combination_that_would_cut_every_path_is_not_emptied():
    class TwoBypassed(nn.Module):
        """x -> (f -> a) + (g -> b) -> c: f and g each bypassed by the other, not both."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.f, self.g, self.h, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.a, self.b, self.c = nn.ReLU(), nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.head(self.c(self.h(self.a(self.f(x)) + self.b(self.g(x)))))

    data = mlp_data()
    x = torch.cat([b[0] for b in data])
    nep = NEPENTHE(ee.convert(TwoBypassed()), data, data, example_input=x[:2], zeta=1.0, latency=False, progress=False)
    work = copy.deepcopy(nep.model)
    step = nep._step(work, {"a": 0.1, "b": 0.5, "c": 0.9})
    # each is bypassed by the other, but together they would cut the output off: one branch goes
    # per iteration, the least irrelevant, and b (more relevant) is capped
    assert step["bypassed"] == ["a", "b"] and step["emptied"] == ["a"] and not weight(work.f).any()
    assert _nonzero_rows(weight(work.g)) == 8 and Paths(work).connected()
    # now g is on the only path: no longer bypassed, never emptied
    step = nep._step(work, {"a": 0.0, "b": 0.1, "c": 0.9})  # a, constant now, is replaced
    assert step["bypassed"] == step["emptied"] == [] and _nonzero_rows(weight(work.g)) == 8 and Paths(work).connected()


def test_only_the_emptied_site_loses_whole_neurons():
    class TwoBypassed(nn.Module):  # f and g bypass each other
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.f, self.g, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)
            self.a, self.b = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.head(self.a(self.f(x)) + self.b(self.g(x)))

    data = mlp_data()
    x = torch.cat([b[0] for b in data])
    nep = NEPENTHE(ee.convert(TwoBypassed()), data, data, example_input=x[:2], zeta=0.5, latency=False, progress=False)
    work = copy.deepcopy(nep.model)
    step = nep._step(work, {"a": 0.1, "b": 0.5})
    # f is emptied; g, the only path now, loses at most half and keeps every neuron
    assert step["emptied"] == ["a"] and not weight(work.f).any()
    assert _nonzero_rows(weight(work.g)) == 8 and int(weight(work.g).count_nonzero()) >= 16 and Paths(work).connected()


@pytest.mark.parametrize("act, shift", [(nn.GELU(), (-1.5, -0.2, 0.0, 0.3, 2.0)), (nn.ReLU6(), (-1.0, 0.0, 3.0, 6.5, 9.0))])
def test_a_site_whose_input_is_an_emptied_layers_constant_is_replaced_exactly(act, shift):
    # GELU's curvature and ReLU6's clamp would change the constant the branch adds under the
    # usual 0/1 rule; the replacement is act(c) / c per neuron instead
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem, self.fc1, self.fc2, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
            self.a, self.act = nn.ReLU(), act

        def forward(self, x):
            h = self.a(self.stem(x))
            return self.head(h + self.fc2(self.act(self.fc1(h))))

    data = mlp_data()
    x = torch.cat([b[0] for b in data])
    nep = NEPENTHE(ee.convert(Branch()), data, data, example_input=x[:2], latency=False, progress=False)
    work = copy.deepcopy(nep.model).eval()
    prune_magnitude(work, ["fc1"], 25)
    with torch.no_grad():
        work.fc1.bias.copy_(torch.tensor(shift))
        h = torch.relu(work.stem(x))
        branch = work.fc2(act(torch.tensor(shift)))  # plain torch: the branch adds fc2(act(bias))
        expected = work.head(h + branch)
    step = nep._after_finetune(work, {"removed": []}, 1)
    assert step["removed"] == ["act"]
    with torch.no_grad():
        torch.testing.assert_close(work(x), expected)
    folded = ee.fold(work, x[:2])
    assert not any(isinstance(m, nn.Linear) and m.in_features == 5 and m.out_features == 5 for m in folded.modules())  # fc1, fc2 gone


def test_bad_allocation_options_fail_before_anything_is_written(tmp_path):
    for kwargs, message in [
        ({"allocation": "greedy"}, "unknown allocation 'greedy'"),
        ({"layer_cap": 0.0}, r"layer_cap must be .* in \(0, 1\]"), ({"layer_cap": 1.5}, r"layer_cap must be .* in \(0, 1\]"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"), ({"temperature": -2.0}, "temperature must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            nepenthe(run_dir=tmp_path / "run", **kwargs)
        assert not (tmp_path / "run").exists()


# -- the schedule ------------------------------------------------------------------------------
def nepenthe(model=None, **kwargs) -> NEPENTHE:
    return schedule(model, NEPENTHE, **kwargs)


def test_each_iteration_prunes_zeta_of_the_eligible_weights_and_masks_hold():
    result = nepenthe(max_iterations=3, allocation="reference").run()
    logs = result.trajectory
    # the reference empties layers of this plain chain: by iteration 2 every site is constant or dead
    assert [log["iteration"] for log in logs] == [0, 1, 2] and result.stopped == "no site left"
    assert logs[0]["sparsity"] == 0.0
    model = ee.convert(tiny_cnn())
    feeds = feeding_layers(model)
    sizes = {n: sum(model.get_submodule(layer).weight.numel() for layer in feeds[n]) for n in feeds}
    zeros = {n: 0 for n in feeds}
    for prev, log in zip(logs, logs[1:]):
        # every site still live before the step, and only those, is weighed
        assert set(log["irrelevance"]) == set(feeds) - set(prev["linearized"])
        eligible = sum(sizes[n] - zeros[n] for n, i in log["irrelevance"].items() if i > 0)
        assert sum(log["pruned"].values()) == eligible // 2
        for n, amount in log["pruned"].items():
            zeros[n] += amount
        # what was pruned stays pruned through the finetune: the logged sparsity counts every zero
        assert log["sparsity"] == pytest.approx(sum(zeros.values()) / sum(sizes.values()))
        assert log["sparsity"] > prev["sparsity"] and 0 < log["model_sparsity"] < log["sparsity"]
    assert result.sparsity == logs[-1]["sparsity"]
    # the returned models: sparse weights baked in, folded equal to it
    assert not any(hasattr(m, "weight_mask") for m in result.linearized.modules())
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.linearized.eval()(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, ee.EntropyActivation) for m in result.model.modules())


def test_sites_driven_to_zero_entropy_are_removed_and_folded():
    # the reference split with aggressive pruning (zeta 0.9): layers of this plain chain empty out,
    # their sites go constant (or dead) and are replaced
    result = nepenthe(zeta=0.9, max_iterations=6, allocation="reference").run()
    logs = result.trajectory
    removed = [n for log in logs[1:] for n in log["removed"]]
    assert removed, [log["entropies"] for log in logs]
    for prev, log in zip(logs, logs[1:]):
        assert set(log["removed"]) == set(log["linearized"]) - set(prev["linearized"])
        assert not set(log["pruned"]) & set(prev["linearized"])  # replaced sites are no longer pruned
    assert result.removed == removed  # budget 100: the last iteration (most removed, sparsest) is returned
    assert result.after.params < result.before.params  # merged (or emptied) layers are gone


def test_run_directory_keeps_the_sparse_and_the_folded_model(tmp_path):
    # (resuming after a crash is tested for both methods in test_easier.py)
    full = nepenthe(max_iterations=2, run_dir=tmp_path).run()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sparsity"] == full.sparsity > 0
    sparse = torch.load(tmp_path / "final_sparse.pt", weights_only=False)
    assert not any(hasattr(m, "weight_mask") for m in sparse.modules())
    layers = [n for names in feeding_layers(sparse).values() for n in names]
    assert sparsity(sparse, layers)[0] == pytest.approx(full.sparsity)
    folded = torch.load(tmp_path / "final_folded.pt", weights_only=False)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), sparse.eval()(x), rtol=1e-4, atol=1e-5)


def test_bad_arguments_and_untraceable_models(tmp_path):
    for zeta in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"zeta must be .* in \(0, 1\]"):
            nepenthe(zeta=zeta)
    with pytest.raises(KeyError, match="cannot protect unknown sites"):
        nepenthe(protect=["nope"])

    class DataDependent(nn.Module):  # converts (its body's activation is swapped), but cannot be traced
        def __init__(self, body: nn.Module):
            super().__init__()
            self.body, self.out = body, nn.Linear(4, 3)

        def forward(self, x):
            h = self.body(x)
            return self.out(h) if h.sum() > 0 else self.out(-h)

    with pytest.raises(RuntimeError, match="NEPENTHE finds the layers that feed each site from the model's torch.fx graph"):
        NEPENTHE(DataDependent(nn.Sequential(nn.Linear(4, 4), nn.ReLU())), [], [], example_input=torch.randn(1, 4), run_dir=tmp_path / "run", latency=False, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written for a model it cannot use


def test_the_model_is_converted_and_baked_once(monkeypatch):
    converts, bakes, folds = (count_calls(monkeypatch, f) for f in (ee.convert, bake_pruning, ee.fold))
    result = nepenthe(max_iterations=2).run()
    # one conversion; each iteration's log folds (and so bakes a copy of) its model, which the
    # result reuses; the returned sparse model is baked once more
    assert len(converts) == 1 and len(folds) == len(result.trajectory) == 3 and len(bakes) == len(folds) + 1
    assert not any(hasattr(m, "weight_mask") for m in result.linearized.modules())


def test_protected_sites_are_neither_pruned_nor_linearized():
    result = nepenthe(protect=["2"], zeta=0.9, max_iterations=3).run()
    feeds = feeding_layers(ee.convert(tiny_cnn()))
    for log in result.trajectory[1:]:
        assert "2" not in log["pruned"] and "2" not in log["linearized"]
        assert all(log["layer_sparsity"][layer] == 0.0 for layer in feeds["2"])


def _nepenthe_sites_chosen(per_rank_batch: int) -> list:
    from easier_ext.app.data import make_loader

    train = make_loader(tiny_data(48, 0), per_rank_batch, train=True, seed=0)
    val = make_loader(tiny_data(24, 1), 12, train=False)
    result = NEPENTHE(bn_free_cnn(), train, val, example_input=torch.randn(2, 3, 6, 6), budget=100.0, max_iterations=2, zeta=0.7,
                      recipe=Recipe(epochs=1, lr=0.05, amp=False), latency=False, progress=False).run()
    return [(log["removed"], log.get("pruned"), round(log["val_accuracy"], 6)) for log in result.trajectory]


def test_ddp_two_ranks_prune_as_one_process(tmp_path):
    ranks = on_two_gloo_ranks(functools.partial(_nepenthe_sites_chosen, 8), tmp_path)
    assert ranks[0] == ranks[1]
    assert ranks[0] == _nepenthe_sites_chosen(16)


# -- the command line --------------------------------------------------------------------------
def test_cli_run_method_nepenthe(tmp_path, capsys):
    from test_cli import TINY_MODEL, run_args

    (tmp_path / "tiny_model.py").write_text(TINY_MODEL)
    run_dir = tmp_path / "run"
    assert main(run_args(f"{tmp_path / 'tiny_model.py'}:tiny", run_dir, "--method", "nepenthe", "--zeta", "0.6", "--temperature", "2")) == 0
    out = capsys.readouterr().out
    assert "sparsity" in out and "final_sparse.pt" in out
    for name in ("final_folded.pt", "final_sparse.pt", "summary.json", "report.md", "plots/sparsity.png"):
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "nepenthe" and config["zeta"] == 0.6 and config["aggregate"] == "nepenthe"
    assert config["allocation"] == "guarded" and config["layer_cap"] == 0.1 and config["temperature"] == 2.0
    assert "Sparsity per iteration" in (run_dir / "report.md").read_text()
    for wrong in (["--method", "nepenthe", "--fold-aware"], ["--method", "nepenthe", "--fold-tolerance", "0.1"], ["--zeta", "0.5"]):
        assert main(["run", *wrong, "--quiet"]) == 2
        assert "applies to --method" in capsys.readouterr().err
    assert main(["run", "--method", "nepenthe", "--zeta", "0", "--quiet"]) == 2
    assert "--zeta must be the fraction of remaining weights pruned per iteration, in (0, 1]" in capsys.readouterr().err
    for wrong, message in [
        (["--layer-cap", "0"], "--layer-cap must be the fraction of a site's remaining weights pruned per iteration, in (0, 1]"),
        (["--layer-cap", "1.5"], "--layer-cap must be the fraction of a site's remaining weights pruned per iteration, in (0, 1]"),
        (["--temperature", "0"], "--temperature must be a finite number > 0"), (["--temperature", "-1"], "--temperature must be"),
    ]:
        assert main(["run", "--method", "nepenthe", *wrong, "--run-dir", str(tmp_path / "bad"), "--quiet"]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["run", "--method", "nepenthe", "--allocation", "greedy", "--quiet"])
    assert "invalid choice: 'greedy'" in capsys.readouterr().err
    assert main(["run", "--method", "nepenthe", "--allocation", "reference", "--layer-cap", "0.3", "--quiet"]) == 2
    assert "--layer-cap applies to --allocation guarded only (the reference split caps a site only at empty)" in capsys.readouterr().err
    for wrong in (["--allocation", "reference"], ["--layer-cap", "0.3"], ["--temperature", "2"]):
        assert main(["run", *wrong, "--quiet"]) == 2
        assert "applies to --method nepenthe only" in capsys.readouterr().err

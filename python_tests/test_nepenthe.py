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
from easier_ext.cli import main
from easier_ext.nepenthe import NEPENTHE
from easier_ext.pruning import bake_pruning, feeding_layers, irrelevance, prune_magnitude, sparsity, split_budget, weight
from easier_ext.train import Recipe, finetune
from test_easier import bn_free_cnn, loaders, schedule, tiny_cnn, tiny_data


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
        torch.testing.assert_close(work(x), before, rtol=0, atol=0)  # exact on the measured data
    # the next step prunes only the live sites' layers
    first = weight(work[0]).clone()
    pruned = nep._step(work, step["entropies"])["pruned"]
    assert pruned and step["removed"][0] not in pruned
    torch.testing.assert_close(weight(work[0]), first, rtol=0, atol=0)


# -- the schedule ------------------------------------------------------------------------------
def nepenthe(model=None, **kwargs) -> NEPENTHE:
    return schedule(model, NEPENTHE, **kwargs)


def test_each_iteration_prunes_zeta_of_the_eligible_weights_and_masks_hold():
    result = nepenthe(max_iterations=3).run()
    logs = result.trajectory
    assert [log["iteration"] for log in logs] == [0, 1, 2, 3] and "max_iterations" in result.stopped
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
    # aggressive pruning (zeta 0.9): layers empty out, their sites go constant and are replaced
    result = nepenthe(zeta=0.9, max_iterations=6).run()
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


def test_protected_sites_are_neither_pruned_nor_linearized():
    result = nepenthe(protect=["2"], zeta=0.9, max_iterations=3).run()
    feeds = feeding_layers(ee.convert(tiny_cnn()))
    for log in result.trajectory[1:]:
        assert "2" not in log["pruned"] and "2" not in log["linearized"]
        assert all(log["layer_sparsity"][layer] == 0.0 for layer in feeds["2"])


def _nepenthe_sites_chosen(per_rank_batch: int) -> list:
    from easier_ext.data import make_loader

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
    assert main(run_args(f"{tmp_path / 'tiny_model.py'}:tiny", run_dir, "--method", "nepenthe", "--zeta", "0.6")) == 0
    out = capsys.readouterr().out
    assert "sparsity" in out and "final_sparse.pt" in out
    for name in ("final_folded.pt", "final_sparse.pt", "summary.json", "report.md", "plots/sparsity.png"):
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "nepenthe" and config["zeta"] == 0.6 and config["aggregate"] == "nepenthe"
    assert "Sparsity per iteration" in (run_dir / "report.md").read_text()
    for wrong in (["--method", "nepenthe", "--fold-aware"], ["--method", "nepenthe", "--fold-tolerance", "0.1"], ["--zeta", "0.5"]):
        assert main(["run", *wrong, "--quiet"]) == 2
        assert "applies to --method" in capsys.readouterr().err
    assert main(["run", "--method", "nepenthe", "--zeta", "0", "--quiet"]) == 2
    assert "--zeta must be in (0, 1]" in capsys.readouterr().err

"""measure_entropy: whole-pass counts against a NumPy reference, the EASIER reference estimator,
state restored, and DDP ranks agreeing with one process."""

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import easier_ext as ee
from testing import on_two_gloo_ranks, reference_entropy


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4),
    )


def dataset(n=24, seed=1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def reference_pre_activations(model: nn.Module, data: TensorDataset, train: bool = False) -> dict[int, np.ndarray]:
    """Plain torch: every rectifier module's input over the whole dataset, as (C, values)."""
    kept = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: kept.setdefault(i, []).append(a[0].detach().clone()))
             for i, m in enumerate(model) if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.GELU))]
    model.train(train)
    with torch.no_grad():
        for x, _ in DataLoader(data, batch_size=len(data)):
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for i, zs in kept.items():
        z = torch.cat(zs)
        out[i] = np.moveaxis(z.numpy(), 1 if z.dim() == 4 else -1, 0).reshape(z.shape[1 if z.dim() == 4 else -1], -1)
    return out


def test_whole_pass_entropy_matches_numpy():
    model, data = small_net(), dataset()
    pre = reference_pre_activations(model, data)
    converted = ee.convert(model)
    result = ee.measure_entropy(converted, DataLoader(data, batch_size=5), progress=False)
    assert list(result) == ["2", "5", "9"]
    for name, z in zip(result, pre.values()):
        r = result[name]
        counts = (z > 0).sum(1)
        assert r.observations == z.shape[1] and np.array_equal(r.on_counts.numpy(), counts)
        h = reference_entropy(counts, z.shape[1])
        np.testing.assert_allclose(r.neurons.numpy(), h, rtol=1e-12)
        assert r.entropy == pytest.approx(h.mean(), rel=1e-12)
        mixed = (counts > 0) & (counts < z.shape[1])
        nep = ee.measure_entropy(converted, DataLoader(data, batch_size=5), progress=False, aggregate="nepenthe")[name]
        assert nep.entropy == pytest.approx(h[mixed].mean() if mixed.any() else 0.0, rel=1e-12)


def test_max_batches_and_state_restored():
    converted = ee.convert(small_net())
    bn = converted[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    s = ee.sites(converted)["2"]
    s.track = False
    converted.train()
    data = dataset()
    r = ee.measure_entropy(converted, DataLoader(data, batch_size=4), max_batches=2, train=True, progress=False)
    assert r["2"].observations == 8 * 8 * 8  # 2 batches of 4 images of 8x8
    assert s.track is False and converted.training
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k  # train-mode pass did not move BN statistics
    for bad in (0, -1, 1.5, True):  # not "everything": a typo must not silently measure the whole split
        with pytest.raises(ValueError, match=r"max_batches must be an int >= 1 \(or None for the whole loader\)"):
            ee.measure_entropy(converted, DataLoader(data, batch_size=4), max_batches=bad, progress=False)


def test_train_mode_uses_batch_statistics():
    model, data = small_net(), dataset()
    model[1].running_mean.fill_(5.0)  # eval would shift everything; train mode ignores it
    pre = reference_pre_activations(model, data, train=True)
    r = ee.measure_entropy(ee.convert(model), DataLoader(data, batch_size=len(data)), train=True, progress=False)
    assert np.array_equal(r["2"].on_counts.numpy(), (pre[2] > 0).sum(1))


@pytest.mark.parametrize("amp", [True, torch.bfloat16], ids=["True", "bfloat16"])
def test_autocast_counts_the_low_precision_pre_activations(amp):
    model, data = small_net(), dataset()
    kept = []
    hook = model[2].register_forward_pre_hook(lambda m, a: kept.append(a[0].detach().clone()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(data.tensors[0])
    hook.remove()
    z = kept[0]
    assert z.dtype == torch.bfloat16
    r = ee.measure_entropy(ee.convert(model), DataLoader(data, batch_size=len(data)), amp=amp, progress=False)
    expected = (z > 0).sum(dim=(0, 2, 3))
    assert torch.equal(r["2"].on_counts, expected)


@pytest.mark.parametrize("amp", [False, None], ids=["False", "None"])
def test_amp_off_counts_the_float32_pre_activations(amp):
    model, data = small_net(), dataset()
    pre = reference_pre_activations(model, data)
    r = ee.measure_entropy(ee.convert(model), DataLoader(data, batch_size=len(data)), amp=amp, progress=False)
    assert np.array_equal(r["2"].on_counts.numpy(), (pre[2] > 0).sum(1))


@pytest.mark.parametrize("rank,shown", [(0, True), (1, False)])
def test_progress_bar_shows_on_rank_0_only(monkeypatch, capsys, rank, shown):
    # one process calling itself `rank`; with a world size of 1 no collective runs
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
    ee.measure_entropy(ee.convert(small_net()), DataLoader(dataset(), batch_size=8), progress=True)
    assert ("measuring entropy" in capsys.readouterr().err) is shown


def test_easier_reference_estimator_is_mean_of_batch_entropies():
    model, data = small_net(), dataset()
    pre = reference_pre_activations(model, data)
    r = ee.measure_entropy(ee.convert(model), DataLoader(data, batch_size=6), estimator="easier_reference", progress=False)
    z = pre[2].reshape(8, 4, -1)  # (C, batches, values per batch): batch-major within the channel
    per_batch = [reference_entropy((z[:, b] >= 0).sum(1), z.shape[2]).mean() for b in range(4)]
    assert r["2"].entropy == pytest.approx(np.mean(per_batch), rel=1e-12)
    whole = reference_entropy((pre[2] > 0).sum(1), pre[2].shape[1]).mean()
    assert r["2"].entropy <= whole + 1e-12  # biased low


def test_linearized_sites_are_skipped_and_errors():
    converted = ee.convert(small_net())
    ee.linearize(converted, "5", mode="identity")
    r = ee.measure_entropy(converted, DataLoader(dataset(), batch_size=8), progress=False)
    assert list(r) == ["2", "9"]
    with pytest.raises(ValueError, match="no sites"):
        ee.measure_entropy(small_net(), [torch.randn(1, 3, 8, 8)], progress=False)
    with pytest.raises(ValueError, match="gave no batches"):
        ee.measure_entropy(converted, [], progress=False)
    with pytest.raises(ValueError, match="unknown entropy aggregate"):
        ee.measure_entropy(converted, [torch.randn(1, 3, 8, 8)], aggregate="max", progress=False)


class AuxNet(nn.Module):
    """A trunk, a head that runs only in training (Inception's auxiliary logits) and a module the
    forward never calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.ReLU())
        self.aux = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.spare = nn.Sequential(nn.Linear(4, 4), nn.GELU())

    def forward(self, x):
        y = self.trunk(x)
        return y + self.aux(y) if self.training else y


def test_sites_that_never_run_are_left_out_not_reported_at_entropy_zero():
    converted = ee.convert(AuxNet())
    assert list(ee.sites(converted)) == ["trunk.1", "trunk.5", "aux.1", "spare.1"]
    loader = DataLoader(dataset(), batch_size=8)
    with pytest.warns(UserWarning, match=r"2 of 4 sites never ran in this measurement \(eval mode\).*: aux.1, spare.1"):
        r = ee.measure_entropy(converted, loader, progress=False)
    assert list(r) == ["trunk.1", "trunk.5"] and all(v.observations > 0 for v in r.values())
    with pytest.warns(UserWarning, match=r"1 of 4 sites never ran in this measurement \(train mode\).*: spare.1"):
        r_train = ee.measure_entropy(converted, loader, train=True, progress=False)
    assert list(r_train) == ["trunk.1", "trunk.5", "aux.1"]
    with pytest.warns(UserWarning, match="aux.1, spare.1"):
        ref = ee.measure_entropy(converted, loader, estimator="easier_reference", progress=False)
    assert list(ref) == ["trunk.1", "trunk.5"]
    with pytest.raises(ValueError, match="no site saw any data.*never reached trunk.1, trunk.5, aux.1, spare.1"):
        ee.measure_entropy(converted, [torch.randn(0, 3, 8, 8)], progress=False)


def test_schedules_never_linearize_a_site_that_never_ran():
    from test_easier import schedule
    from easier_ext.methods.nepenthe import NEPENTHE

    model = ee.convert(AuxNet())
    with pytest.warns(UserWarning, match="never ran"):
        measured = {n: r.entropy for n, r in ee.measure_entropy(model, DataLoader(dataset(), batch_size=8), progress=False).items()}
    easier = schedule(model, protect=["trunk.1", "trunk.5"])
    assert easier._choose(model, measured) == [] and easier._step(copy.deepcopy(model), measured) is None
    assert schedule(model)._choose(model, measured)[0] in ("trunk.1", "trunk.5")
    nepenthe = schedule(model, method=NEPENTHE)
    work = copy.deepcopy(model)
    nepenthe._step(work, measured)
    assert not any(ee.sites(work)[n].linearized for n in ("aux.1", "spare.1"))


# -- DDP: 2 gloo processes on CPU ---------------------------------------------------------------


def _measured_on_this_rank() -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    converted = ee.convert(small_net())
    data = dataset()
    # uneven shards: rank 0 gets 10 samples, rank 1 gets 14
    idx = list(range(10)) if rank == 0 else list(range(10, 24))
    shard = torch.utils.data.Subset(data, idx)
    # a training step through DDP works with a converted model (on a copy: it moves BN statistics)
    trained = nn.parallel.DistributedDataParallel(copy.deepcopy(converted))
    x, y = next(iter(DataLoader(shard, batch_size=4)))
    nn.functional.cross_entropy(trained(x), y).backward()
    assert all(p.grad is not None for p in trained.parameters())
    r = ee.measure_entropy(nn.parallel.DistributedDataParallel(converted), DataLoader(shard, batch_size=3), progress=False)
    return {n: (s.on_counts, s.observations, s.entropy) for n, s in r.items()}


def test_ddp_two_ranks_equal_one_process(tmp_path):
    ranks = on_two_gloo_ranks(_measured_on_this_rank, tmp_path)
    torch.manual_seed(0)
    single = ee.measure_entropy(ee.convert(small_net()), DataLoader(dataset(), batch_size=7), progress=False)
    for name, s in single.items():
        for rank in ranks:
            counts, obs, h = rank[name]
            assert torch.equal(counts, s.on_counts) and obs == s.observations
            assert h == s.entropy

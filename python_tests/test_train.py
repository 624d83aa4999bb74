"""finetune / evaluate / Recipe: against hand computations, plain-PyTorch loops, and 2 gloo ranks."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, Subset, TensorDataset

from easier_ext import train as train_mod
from easier_ext.core.modules import EntropyPReLU
from easier_ext.core.runtime import autocast
from easier_ext.methods.train import NonFiniteLossError, Recipe, evaluate, finetune, make_optimizer, make_scheduler


# -- helpers --------------------------------------------------------------------------------------
def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes split by a hyperplane, pushed apart to leave a margin."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5, 1.5])
    y = (x @ w > 0).long()
    x = x + (2 * y - 1).unsqueeze(1) * 0.5 * w / w.norm()
    return x, y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def _batches(n: int, batch_size: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _separable(n, seed)
    return list(zip(x.split(batch_size), y.split(batch_size)))


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _plain_sgd(model: nn.Module, batches: list, lrs: list[float]) -> None:
    """The default recipe's optimizer (SGD, momentum 0.9, weight decay 5e-4) as a plain loop: one
    step on each of the first ``len(lrs)`` batches at its learning rate, in train mode (batch
    statistics in every step, running ones updated, as finetune's must be)."""
    assert len(lrs) <= len(batches)
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=0.9, weight_decay=5e-4)
    model.train()
    for (x, y), lr in zip(batches, lrs):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


class StoredLogits(nn.Module):
    """Returns stored logits for the sample indices it is given; records its mode at each call."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.logits[index] + 0 * self.dummy


class NonFiniteOnCall(nn.Module):
    """An MLP whose output turns non-finite on one forward call (1-based), or never (None)."""

    def __init__(self, bad_call: int | None, value: float = float("nan")) -> None:
        super().__init__()
        self.net = _mlp()
        self.bad_call = bad_call
        self.value = value
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.net(x)
        return out + self.value if self.calls == self.bad_call else out


# -- evaluate -------------------------------------------------------------------------------------
@pytest.mark.parametrize("start_training", [True, False])
def test_evaluate_matches_numpy_and_restores_mode(start_training):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 5)).astype(np.float32)
    targets = rng.integers(0, 5, 50)
    expected = 100.0 * np.mean(logits.argmax(1) == targets)
    model = StoredLogits(torch.from_numpy(logits))
    model.train(start_training)
    index = torch.arange(50)
    loader = [(i, torch.from_numpy(targets)[i]) for i in index.split(8)]  # uneven last batch

    got = evaluate(model, loader)

    assert got == pytest.approx(expected, abs=1e-9)
    assert model.training is start_training
    assert model.calls and all(mode == (False, False) for mode in model.calls)  # eval mode, no grad


def test_evaluate_empty_loader_raises():
    with pytest.raises(ValueError, match="no targets"):
        evaluate(_mlp(), [])


def test_evaluate_rejects_bare_tensor_batches():
    with pytest.raises(TypeError, match=r"\(input, target\)"):
        evaluate(_mlp(), [torch.randn(2, 4)])


# -- finetune: learning ---------------------------------------------------------------------------
def test_finetune_learns_a_separable_problem():
    torch.manual_seed(0)
    model = _mlp()
    x, y = _separable(256, seed=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    recipe = Recipe(epochs=5, lr=0.1)

    history = finetune(model, loader, recipe, progress=False)

    assert [r["epoch"] for r in history] == list(range(5))
    assert set(history[0]) == {"epoch", "lr", "loss", "accuracy", "samples", "batches", "seconds"}
    assert all(r["samples"] == 256 and r["batches"] == 8 and r["seconds"] >= 0 for r in history)
    assert history[-1]["loss"] < history[0]["loss"]
    tx, ty = _separable(512, seed=2)
    assert evaluate(model, DataLoader(TensorDataset(tx, ty), batch_size=128)) > 95.0


def test_finetune_reports_mean_loss_and_accuracy_of_the_epoch():
    # With lr=0 the model does not change, so the epoch's statistics are those of one fixed model.
    torch.manual_seed(0)
    model = _mlp()
    batches = _batches(40, 16)  # 16, 16, 8: a per-sample mean, not a mean of batch means
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    expected_loss = F.cross_entropy(logits, y).item()
    expected_acc = 100.0 * (logits.argmax(1) == y).double().mean().item()

    # lr > 0 is required, so take one so small that every update rounds away in float32: the
    # model stays fixed and the statistics are those of one forward pass over the data.
    (record,) = finetune(model, batches, Recipe(epochs=1, lr=1e-30, weight_decay=0.0), progress=False)

    assert record["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert record["accuracy"] == pytest.approx(expected_acc)
    assert record["samples"] == 40


def test_finetune_sets_sampler_epoch_caps_batches_and_restores_mode():
    class RecordingSampler(SequentialSampler):
        def __init__(self, data):
            super().__init__(data)
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

    class ModeRecorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()
            self.modes: list[bool] = []

        def forward(self, x):
            self.modes.append(self.training)
            return self.net(x)

    x, y = _separable(64, seed=1)
    ds = TensorDataset(x, y)
    sampler = RecordingSampler(ds)
    model = ModeRecorder().eval()

    history = finetune(model, DataLoader(ds, batch_size=8, sampler=sampler), Recipe(epochs=3, max_batches=2), progress=True)

    assert sampler.epochs == [0, 1, 2]
    assert [r["samples"] for r in history] == [16, 16, 16]
    assert model.modes == [True] * 6
    assert model.training is False
    assert all(p.grad is None for p in model.parameters())


def test_finetune_empty_loader_raises():
    with pytest.raises(ValueError, match="no batches in epoch 0"):
        finetune(_mlp(), [], Recipe(epochs=1), progress=False)


def test_finetune_requires_a_recipe():
    with pytest.raises(TypeError, match="Recipe"):
        finetune(_mlp(), _batches(8, 4), {"epochs": 1}, progress=False)  # type: ignore[arg-type]



class DtypeProbe(nn.Module):
    """An MLP that records the dtype of its logits at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.dtypes.append(out.dtype)
        return out


def test_amp_is_ignored_on_the_cpu():
    model = DtypeProbe()
    finetune(model, _batches(16, 8), Recipe(epochs=1, amp=True), progress=False)
    evaluate(model, _batches(16, 8), amp=True)
    assert model.dtypes == [torch.float32] * 4
    # the probe would see autocast: the shared helper does run the CPU in bfloat16 when asked
    # (as measure_entropy asks), finetune and evaluate just do not ask off CUDA
    with torch.no_grad(), autocast(torch.device("cpu"), True):
        assert model(torch.zeros(2, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize("rank,shown", [(0, True), (1, False)])
def test_progress_bar_shows_on_rank_0_only(monkeypatch, capsys, rank, shown):
    # one process calling itself `rank`; with a world size of 1 no collective runs
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
    finetune(_mlp(), _batches(16, 8), Recipe(epochs=1), desc="probe-finetune")
    assert ("probe-finetune" in capsys.readouterr().err) is shown

# -- schedules ------------------------------------------------------------------------------------
def _reference_lrs(recipe: Recipe, decay_epochs: list[int]) -> list[float]:
    """The recipe's formulas, written out independently of torch's schedulers."""
    out = []
    for e in range(recipe.epochs):
        if recipe.schedule == "constant":
            out.append(recipe.lr)
        elif recipe.schedule == "cosine":
            out.append(recipe.lr * (1 + math.cos(math.pi * e / recipe.epochs)) / 2)
        else:
            out.append(recipe.lr * recipe.gamma ** sum(e >= d for d in decay_epochs))
    return out


SCHEDULE_CASES = [
    (Recipe(epochs=8, lr=0.1, schedule="multistep"), [4, 6]),
    (Recipe(epochs=10, lr=0.1, schedule="multistep", milestones=(0.3, 0.6, 0.9), gamma=0.5), [3, 6, 9]),
    (Recipe(epochs=8, lr=0.1, schedule="cosine"), []),
    (Recipe(epochs=8, lr=0.1, schedule="constant"), []),
]


@pytest.mark.parametrize("recipe,decay_epochs", SCHEDULE_CASES, ids=["multistep", "multistep-3", "cosine", "constant"])
def test_finetune_lr_per_epoch_follows_the_formula(recipe, decay_epochs):
    torch.manual_seed(0)
    history = finetune(_mlp(), _batches(4, 4), recipe, progress=False)
    np.testing.assert_allclose([r["lr"] for r in history], _reference_lrs(recipe, decay_epochs), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("recipe,decay_epochs", SCHEDULE_CASES, ids=["multistep", "multistep-3", "cosine", "constant"])
def test_scheduler_stepped_per_batch_agrees_at_epoch_starts(recipe, decay_epochs):
    steps = 3
    optimizer = make_optimizer(_mlp(), recipe)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch=steps)
    seen = []
    for _ in range(recipe.epochs * steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    starts = seen[::steps]
    np.testing.assert_allclose(starts, _reference_lrs(recipe, decay_epochs), rtol=1e-9, atol=1e-15)
    if recipe.schedule == "cosine":  # smooth within the epoch too
        expected = [recipe.lr * (1 + math.cos(math.pi * k / (recipe.epochs * steps))) / 2 for k in range(len(seen))]
        np.testing.assert_allclose(seen, expected, rtol=1e-9, atol=1e-15)
    else:  # piecewise constant over whole epochs
        assert all(seen[i] == seen[i - i % steps] for i in range(len(seen)))


def test_milestones_survive_float_rounding():
    # 0.29 * 100 == 28.999999999999996 in floating point; the decay still belongs to epoch 29
    recipe = Recipe(epochs=100, lr=1.0, milestones=(0.29,), gamma=0.5)
    optimizer = make_optimizer(_mlp(), recipe)
    scheduler = make_scheduler(optimizer, recipe)
    lrs = []
    for _ in range(31):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[28] == 1.0 and lrs[29] == 0.5


# -- fresh optimizer per call ---------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_finetune_starts_a_fresh_optimizer_and_schedule(optimizer, monkeypatch):
    made = []
    real = train_mod.make_optimizer

    def spy(model, recipe):
        made.append(real(model, recipe))
        return made[-1]

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    recipe = Recipe(epochs=2, lr=0.05, optimizer=optimizer, milestones=(0.5,))  # decays before epoch 1
    batches = _batches(24, 8)
    torch.manual_seed(0)
    model = _mlp()

    h1 = finetune(model, batches, recipe, progress=False)
    snapshot = copy.deepcopy(model)
    h2 = finetune(model, batches, recipe, progress=False)
    h_fresh = finetune(snapshot, batches, recipe, progress=False)  # a new start from the same weights

    assert len(made) == 3 and made[0] is not made[1]
    assert [r["lr"] for r in h2] == [r["lr"] for r in h1] == pytest.approx([0.05, 0.005])
    # the second optimizer's state is its own: no tensor shared with the first, and (AdamW counts
    # them) only the 6 steps of its own call
    first = {id(t) for s in made[0].state.values() for t in s.values() if torch.is_tensor(t)}
    assert made[1].state and not any(id(t) in first for s in made[1].state.values() for t in s.values() if torch.is_tensor(t))
    if optimizer == "adamw":
        assert all(int(s["step"]) == 6 for s in made[1].state.values())
    assert _without_seconds(h2) == _without_seconds(h_fresh)
    for p, q in zip(model.parameters(), snapshot.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# -- non-finite loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("bad_call,epoch,batch", [(3, 0, 2), (7, 1, 1)])
def test_non_finite_loss_stops_before_the_step(value, bad_call, epoch, batch):
    batches = _batches(40, 8)  # 5 batches an epoch
    recipe = Recipe(epochs=3, lr=0.1, schedule="constant")
    torch.manual_seed(0)
    model = NonFiniteOnCall(bad_call, value)
    reference = copy.deepcopy(model.net)

    with pytest.raises(NonFiniteLossError, match=rf"epoch {epoch}, batch {batch} \(0-based\)") as info:
        finetune(model, batches, recipe, progress=False)

    # the good steps, by a plain PyTorch loop
    _plain_sgd(reference, batches * 2, [0.1] * (bad_call - 1))
    for p, q in zip(model.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    err = info.value
    assert (err.epoch, err.batch) == (epoch, batch)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
    assert model.training  # the flag it had before finetune


# -- stopping early -------------------------------------------------------------------------------
def test_stop_when_ends_the_finetune_after_the_batch_it_says_so():
    batches = _batches(40, 8)  # 5 batches an epoch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    reference = copy.deepcopy(model)
    answers, accuracies = iter([False, False, True]), []

    def stop_when():  # as a schedule's: evaluates (eval mode), after which training must go on in train mode
        accuracies.append(evaluate(model, batches[:2]))
        return next(answers)

    history = finetune(model, batches, Recipe(epochs=3, lr=0.1, schedule="constant"), progress=False, stop_when=stop_when,
                       check_every=3)

    # asked after batches 3, 6 and 9, counted over the epochs: 9 steps, the last the second epoch's fourth
    assert len(accuracies) == 3
    assert [r["batches"] for r in history] == [5, 4] and [r["samples"] for r in history] == [40, 32]
    assert "stopped" not in history[0] and history[1]["stopped"] is True and history[1]["fraction"] == pytest.approx(0.8)
    _plain_sgd(reference, batches * 2, [0.1] * 9)
    for p, q in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_stop_when_is_not_asked_after_the_last_batch():
    calls = []
    recipe = Recipe(epochs=2, lr=0.1, max_batches=3)
    history = finetune(_mlp(), _batches(40, 8), recipe, progress=False, stop_when=lambda: calls.append(1), check_every=1)
    assert len(calls) == 5 and [r["batches"] for r in history] == [3, 3]  # 6 batches, the last one not asked about
    assert not any("stopped" in r for r in history)
    ended = finetune(_mlp(), _batches(40, 8), recipe, progress=False, stop_when=lambda: True, check_every=2)
    assert [(r["batches"], r.get("fraction")) for r in ended] == [(2, pytest.approx(2 / 3))]


def test_a_stopped_epoch_of_a_loader_without_length_has_no_fraction():
    history = finetune(_mlp(), iter(_batches(40, 8)), Recipe(epochs=1), progress=False, stop_when=lambda: True, check_every=2)
    assert history[0]["stopped"] is True and history[0]["batches"] == 2 and history[0]["fraction"] is None


@pytest.mark.parametrize("stop_when,check_every", [(lambda: True, None), (None, 2), (lambda: True, 0), (lambda: True, 1.5),
                                                   (lambda: True, True)])
def test_stop_when_and_check_every_go_together(stop_when, check_every):
    model = _mlp()
    before = _params(model)
    with pytest.raises(ValueError, match="stop_when and check_every go together, check_every an int >= 1"):
        finetune(model, _batches(16, 8), Recipe(epochs=1), progress=False, stop_when=stop_when, check_every=check_every)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- a cap on the batches ------------------------------------------------------------------------------
def test_max_steps_ends_the_finetune_after_that_many_batches_in_all():
    batches = _batches(40, 8)  # 5 batches an epoch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    reference = copy.deepcopy(model)
    recipe = Recipe(epochs=3, lr=0.1, milestones=(0.5,), gamma=0.5)  # halved from epoch 1

    history = finetune(model, batches, recipe, progress=False, max_steps=7)

    assert [(r["batches"], r["lr"], r.get("truncated"), r.get("fraction")) for r in history] == [
        (5, 0.1, None, None), (2, 0.05, True, pytest.approx(0.4))]
    assert "stopped" not in history[1]
    # a plain loop of the same 7 steps, the learning rate halved after the first epoch
    _plain_sgd(reference, batches * 2, [0.1] * 5 + [0.05] * 2)
    for p, q in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_max_steps_at_or_past_the_recipes_end_cuts_nothing_and_on_an_epochs_end_cuts_that_epoch():
    recipe = Recipe(epochs=2, lr=0.1, max_batches=3)
    for cap in (6, 7):
        history = finetune(_mlp(), _batches(40, 8), recipe, progress=False, max_steps=cap)
        assert [r["batches"] for r in history] == [3, 3] and not any("truncated" in r for r in history)
    history = finetune(_mlp(), _batches(40, 8), recipe, progress=False, max_steps=3)
    assert [(r["batches"], r["truncated"], r["fraction"]) for r in history] == [(3, True, 1.0)]


def test_max_steps_with_stop_when_asks_nothing_after_its_last_batch_and_without_length_has_no_fraction():
    calls = []
    history = finetune(_mlp(), _batches(40, 8), Recipe(epochs=2), progress=False, max_steps=3,
                       stop_when=lambda: calls.append(1), check_every=1)
    assert len(calls) == 2 and history[0]["truncated"] is True and "stopped" not in history[0]
    ended = finetune(_mlp(), iter(_batches(40, 8)), Recipe(epochs=1), progress=False, max_steps=2)
    assert ended[0]["truncated"] is True and ended[0]["batches"] == 2 and ended[0]["fraction"] is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_steps_must_be_a_positive_int(bad):
    model = _mlp()
    before = _params(model)
    with pytest.raises(ValueError, match=r"max_steps must be None or an int >= 1 \(batches in all\), got"):
        finetune(model, _batches(16, 8), Recipe(epochs=1), progress=False, max_steps=bad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _stopped_by_one_rank_or_by_both() -> list:
    rank = dist.get_rank()
    batches = _batches(32, 4)[rank::2]  # 4 batches each
    model = _mlp()

    def evaluated(answer):  # a collective between the steps' gradient all-reduces, as a schedule's check
        return lambda: evaluate(model, batches[:1 + rank]) >= 0 and answer

    one = finetune(model, batches, Recipe(epochs=1), progress=False, stop_when=evaluated(rank == 0), check_every=1)
    both = finetune(model, batches, Recipe(epochs=1), progress=False, stop_when=evaluated(True), check_every=2)
    cut = finetune(model, batches, Recipe(epochs=2), progress=False, stop_when=evaluated(False), check_every=1, max_steps=6)
    return [[r["batches"] for r in one], [r["batches"] for r in both], [(r["batches"], r["samples"], r.get("truncated")) for r in cut]]


def test_on_two_ranks_the_finetune_stops_only_when_every_rank_says_so_and_is_cut_on_both(tmp_path):
    from testing import on_two_gloo_ranks

    cut = [(4, 32, None), (2, 16, True)]  # samples summed over the ranks
    assert on_two_gloo_ranks(_stopped_by_one_rank_or_by_both, tmp_path) == [[[4], [2], cut], [[4], [2], cut]]


# -- Recipe ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("epochs", 0),
        ("epochs", 2.0),
        ("epochs", True),
        ("lr", 0),
        ("lr", -0.1),
        ("lr", float("nan")),
        ("lr", "0.1"),
        ("optimizer", "adam"),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1e-4),
        ("weight_decay", float("inf")),
        ("schedule", "step"),
        ("milestones", (0.75, 0.5)),
        ("milestones", (0.5, 0.5)),
        ("milestones", (0.0,)),
        ("milestones", (1.5,)),
        ("milestones", 0.5),
        ("gamma", 0),
        ("gamma", 2.0),
        ("label_smoothing", 1.0),
        ("label_smoothing", -0.1),
        ("amp", 1),
        ("max_batches", 0),
        ("max_batches", 1.5),
    ],
)
def test_recipe_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=rf"^Recipe\.{field} must be .*, got ") as info:
        Recipe(**{field: value})
    assert repr(value) in str(info.value)


def test_recipe_as_dict_round_trips_through_json():
    recipe = Recipe(epochs=3, lr=0.1, optimizer="adamw", schedule="cosine", milestones=(0.25, 0.5), max_batches=7)
    data = recipe.as_dict()
    assert data["milestones"] == [0.25, 0.5]
    assert Recipe(**json.loads(json.dumps(data))) == recipe


def test_recipe_unpickles_from_its_old_paths():
    """Runs pickled the recipe as easier_ext.train.Recipe (0.1.0) and easier_ext.methods.train.Recipe."""
    recipe = Recipe(epochs=3, lr=0.1, schedule="cosine")
    for module in ("easier_ext.train", "easier_ext.methods.train"):
        old = pickle.dumps(recipe, protocol=2).replace(Recipe.__module__.encode(), module.encode())
        assert module.encode() in old and pickle.loads(old) == recipe
    assert train_mod.Recipe is Recipe

def test_make_optimizer_uses_the_recipe_and_skips_frozen_parameters():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    sgd = make_optimizer(model, Recipe(lr=0.1, momentum=0.8, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.8, 1e-4)
    assert len(group["params"]) == 3 and all(p is not model[0].weight for p in group["params"])
    adamw = make_optimizer(model, Recipe(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    assert not sgd.state and not adamw.state
    with pytest.raises(ValueError, match="no parameters that require grad"):
        make_optimizer(_mlp().requires_grad_(False), Recipe())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_scheduler(sgd, Recipe(), steps_per_epoch=0)


# -- distributed ----------------------------------------------------------------------------------
DDP_RECIPE = Recipe(epochs=1, lr=0.1)


def _ddp_model() -> nn.Module:
    # The linearized PReLU keeps an unused parameter, which plain DDP would wait for forever.
    prelu = EntropyPReLU(16)
    prelu.linearize()
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), prelu, nn.Linear(16, 2))


def _eval_setup() -> tuple[nn.Module, TensorDataset]:
    """Logits equal the one-hot inputs: the first 10 samples are right, 7 of the next 14 wrong."""
    pred = torch.tensor([0, 1] * 12)
    target = pred.clone()
    target[10::2] = 1 - target[10::2]
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    return model, TensorDataset(F.one_hot(pred, 2).float(), target)


def _assert_state_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:  # sites keep non-tensor extra state (a dict) next to their tensors
        if torch.is_tensor(a[k]):
            torch.testing.assert_close(a[k], b[k], msg=k, **tol)
        else:
            assert a[k] == b[k], k


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(rank)  # ranks start apart: finetune must broadcast rank 0's weights
        model = _ddp_model()
        ds = TensorDataset(*_separable(64, seed=1))
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=False)
        history = finetune(model, DataLoader(ds, batch_size=8, sampler=sampler), DDP_RECIPE, progress=False)
        out = {"state": copy.deepcopy(model.state_dict()), "history": history, "type": type(model).__name__}

        # Left without DDP's hooks: a local backward gives local gradients (a leftover hook would
        # average them with the other rank's), as on a copy that DDP never touched.
        x, y = _separable(8, seed=10 + rank)
        probe = copy.deepcopy(model)
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(probe(x), y).backward()
        out["local_grads"] = all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), probe.parameters()) if p.grad is not None)

        # Only rank 1's loss turns NaN (its 2nd batch); both ranks must stop there, none may hang.
        nan_model = NonFiniteOnCall(2 if rank == 1 else None)
        try:
            finetune(nan_model, DataLoader(ds, batch_size=8, sampler=sampler), DDP_RECIPE, progress=False)
        except NonFiniteLossError as err:
            out["nan"] = (err.epoch, err.batch)

        # Uneven shards, no sampler: 10 and 14 samples, 3 and 4 batches.
        eval_model, eval_ds = _eval_setup()
        shard = Subset(eval_ds, range(0, 10) if rank == 0 else range(10, 24))
        out["accuracy"] = evaluate(eval_model, DataLoader(shard, batch_size=4))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_train_as_one_process_and_evaluate_the_union(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # Both ranks hold the same, unwrapped, trained module and report the same history.
    assert r0["type"] == r1["type"] == "Sequential"
    _assert_state_close(r0["state"], r1["state"], rtol=0, atol=0)
    assert r0["history"] == r1["history"]
    assert r0["history"][0]["samples"] == 64
    assert r0["local_grads"] and r1["local_grads"]

    # Averaged gradients over 2 x 8 samples are one process's gradient over the same 16.
    torch.manual_seed(0)
    reference = _ddp_model()
    ds = TensorDataset(*_separable(64, seed=1))
    ref_history = finetune(reference, DataLoader(ds, batch_size=16), DDP_RECIPE, progress=False)
    _assert_state_close(r0["state"], reference.state_dict(), rtol=1e-5, atol=1e-6)
    assert r0["history"][0]["loss"] == pytest.approx(ref_history[0]["loss"], rel=1e-5)
    assert r0["history"][0]["accuracy"] == pytest.approx(ref_history[0]["accuracy"])

    assert r0["nan"] == r1["nan"] == (0, 1)

    eval_model, eval_ds = _eval_setup()
    single = evaluate(eval_model, DataLoader(eval_ds, batch_size=5))
    assert single == pytest.approx(100.0 * 17 / 24)
    assert r0["accuracy"] == r1["accuracy"] == pytest.approx(single)

"""The EASIER schedule: which sites it removes, the budget, checkpoints that resume to the same
result, refusals, and the CLI end to end on a tiny model."""

import copy
import functools
import json
import shutil
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import easier_ext as ee
from testing import on_two_gloo_ranks
import easier_ext.methods.schedule as schedule_module
from easier_ext.methods.easier import EASIER, EasierOptions
from easier_ext.methods.nepenthe import NEPENTHE, NepentheOptions
from easier_ext.methods.options import ScheduleOptions
from easier_ext.methods.rundir import RunDirError
from easier_ext.methods.train import NonFiniteLossError, Recipe, finetune


def tiny_cnn(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes),
    )


def tiny_data(n: int = 48, seed: int = 0):
    """Three classes told apart by which colour channel is brightest: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 6, 6, generator=g) * 0.5
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, y)


def loaders():
    train = DataLoader(tiny_data(48, 0), batch_size=16, shuffle=False)
    val = DataLoader(tiny_data(24, 1), batch_size=12)
    return train, val


def trained_cnn() -> nn.Module:
    model = tiny_cnn()
    finetune(model, loaders()[0], Recipe(epochs=8, lr=0.05, amp=False), progress=False)
    return model


def schedule(model=None, method=EASIER, **kwargs):
    """A quick schedule (``method``: EASIER or NEPENTHE) of the tiny CNN on the tiny data."""
    train, val = loaders()
    if "options" not in kwargs:
        kwargs = {"recipe": Recipe(epochs=1, lr=0.05, amp=False), "budget": 100.0, "latency": False, "progress": False, **kwargs}
    return method(model or tiny_cnn(), train, val, example_input=torch.randn(2, 3, 6, 6), **kwargs)


def count_calls(monkeypatch, function) -> list:
    """Counts the calls of ``function`` from every easier_ext module that imported it (so also
    from code that calls it under another module's name)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    modules = {id(m): m for name, m in list(sys.modules.items()) if name.startswith("easier_ext") and m is not None}
    for module in modules.values():
        for name in [name for name, value in vars(module).items() if value is function]:
            monkeypatch.setattr(module, name, counted)
    return calls


def test_removes_the_lowest_entropy_site_each_iteration_and_folds():
    result = schedule(max_iterations=3).run()
    logs = result.trajectory
    assert [log["iteration"] for log in logs] == [0, 1, 2, 3] and "max_iterations" in result.stopped
    for log in logs[1:]:
        h = log["entropies"]
        lowest = min(h.values())
        assert log["removed"][0] in h and h[log["removed"][0]] == lowest
        assert all(h[n] == 0.0 for n in log["removed"][1:])  # the others removed with it are at zero
        assert set(log["removed"]).isdisjoint(set(logs[log["iteration"] - 1]["linearized"]))
    assert result.removed == [n for log in logs[1:] for n in log["removed"]]  # budget 100: the last is the best
    assert sorted(result.removed) == sorted(logs[-1]["linearized"])
    # the returned model is the folded linearized one: same outputs, standard layers only
    x = torch.randn(4, 3, 6, 6)
    result.linearized.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.linearized(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, ee.EntropyActivation) for m in result.model.modules())
    assert result.after.depth <= result.before.depth


def test_protected_sites_are_kept():
    result = schedule(protect=["2", "5"], max_iterations=10).run()
    assert not {"2", "5"} & set(result.trajectory[-1]["linearized"])
    assert result.stopped == "no site left"


def test_budget_stops_and_keeps_the_last_model_within_it():
    calls = {"n": 0}

    def ruin_after_first(model, loader):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second finetune destroys the classifier
            with torch.no_grad():
                model[-1].weight.zero_()
                model[-1].bias.copy_(torch.tensor([0.0, 0.0, 10.0]))

    result = schedule(trained_cnn(), train_fn=ruin_after_first, budget=5.0).run()
    dense = result.dense_accuracy
    assert dense > 80
    assert len(result.trajectory) == 3 and "dropped" in result.stopped
    assert dense - result.trajectory[2]["val_accuracy"] > 5.0
    assert result.removed == result.trajectory[1]["removed"] and result.accuracy == result.trajectory[1]["val_accuracy"]


def test_patience_goes_on_past_the_budget_and_keeps_the_best_within_it():
    calls = {"n": 0}

    def ruin_then_recover(model, loader):
        calls["n"] += 1
        with torch.no_grad():
            if calls["n"] == 2:  # iteration 2 ruins the classifier, iteration 3 restores it
                ruin_then_recover.saved = model[-1].bias.clone()
                model[-1].bias.copy_(torch.tensor([0.0, 0.0, 100.0]))
            elif calls["n"] == 3:
                model[-1].bias.copy_(ruin_then_recover.saved)

    result = schedule(trained_cnn(), train_fn=ruin_then_recover, budget=5.0, patience=1, max_iterations=3).run()
    accs = [log["val_accuracy"] for log in result.trajectory]
    assert len(accs) == 4 and accs[0] - accs[2] > 5.0 and accs[0] - accs[3] <= 5.0
    assert "max_iterations" in result.stopped
    assert result.removed == [n for log in result.trajectory[1:] for n in log["removed"]]  # iteration 3 is the best
    calls["n"] = 0
    stopped = schedule(trained_cnn(), train_fn=ruin_then_recover, budget=5.0, patience=0, max_iterations=3).run()
    assert len(stopped.trajectory) == 3 and "dropped" in stopped.stopped


def test_resuming_a_finished_run_adds_no_iteration(tmp_path):
    def ruin(model, loader):
        with torch.no_grad():
            model[-1].weight.zero_()
            model[-1].bias.copy_(torch.tensor([0.0, 0.0, 10.0]))

    model = trained_cnn()
    first = schedule(model, train_fn=ruin, budget=5.0, run_dir=tmp_path).run()
    assert len(first.trajectory) == 2 and "dropped" in first.stopped and first.removed == []
    again = schedule(model, train_fn=ruin, budget=5.0, run_dir=tmp_path, resume=True).run()
    assert len(again.trajectory) == 2 and again.stopped == first.stopped and again.removed == []


@pytest.mark.parametrize("method", [EASIER, NEPENTHE])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, method):
    full = schedule(max_iterations=3, run_dir=tmp_path / "full", method=method).run()

    real = schedule_module.finetune
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed mid-iteration
        return real(*args, **kwargs)

    monkeypatch.setattr(schedule_module, "finetune", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        schedule(max_iterations=3, run_dir=tmp_path / "crashed", method=method).run()
    assert len(list((tmp_path / "crashed" / "iterations").glob("*.json"))) == 3  # dense + 2 complete
    monkeypatch.setattr(schedule_module, "finetune", real)
    with pytest.raises(RunDirError, match="pass resume"):
        schedule(max_iterations=3, run_dir=tmp_path / "crashed", method=method).run()
    resumed = schedule(max_iterations=3, run_dir=tmp_path / "crashed", resume=True, method=method).run()
    for key in ("removed", "val_accuracy", "pruned", "sparsity"):  # the last two: NEPENTHE's
        assert [log.get(key) for log in resumed.trajectory] == [log.get(key) for log in full.trajectory], key
    for (key, a), b in zip(resumed.linearized.state_dict().items(), full.linearized.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    summary = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert summary["removed"] == full.removed and summary.get("sparsity") == full.sparsity


def test_run_dir_of_another_configuration_is_refused(tmp_path, monkeypatch):
    schedule(max_iterations=1, run_dir=tmp_path).run()
    with pytest.raises(RunDirError, match="another configuration .*budget"):
        schedule(max_iterations=1, run_dir=tmp_path, budget=2.0, resume=True)
    # resumed by another number of processes (torchrun), the shards and reductions would differ
    monkeypatch.setattr(schedule_module, "_world_size", lambda: {"world_size": 2})
    with pytest.raises(RunDirError, match="another configuration .*differs in: world_size"):
        schedule(max_iterations=1, run_dir=tmp_path, resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = schedule_module.finetune
    calls = {"n": 0}

    def nan_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise NonFiniteLossError(0, 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(schedule_module, "finetune", nan_on_second)
    result = schedule(max_iterations=5, run_dir=tmp_path).run()
    assert "non-finite" in result.stopped and len(result.trajectory) == 2
    assert (tmp_path / "checkpoints" / "001.pt").exists() and not (tmp_path / "checkpoints" / "002.pt").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"budget must be .* \[0, 100\]"):
        schedule(budget=-1)
    with pytest.raises(KeyError, match="cannot protect unknown sites"):
        schedule(protect=["nope"])
    with pytest.raises(ValueError, match="unknown entropy aggregate"):
        schedule(aggregate="max")


def test_fold_aware_prefers_a_site_whose_removal_lets_a_merge_pay(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1), nn.ReLU(),  # "1": between two 1x1 convs: 3*32 + 32*4 MACs merge into 3*4
        nn.Conv2d(32, 4, 1), nn.ReLU(),  # "3": before the pooling: removing it merges nothing
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    measured = {"1": 0.50, "3": 0.49}
    plain = schedule(model)
    aware = schedule(model, fold_aware=True, fold_tolerance=0.02)
    converted = ee.convert(model)
    assert plain._choose(converted, measured) == ["3"]
    assert aware._choose(converted, measured) == ["1"]
    assert schedule(model, fold_aware=True, fold_tolerance=0.001)._choose(converted, measured) == ["3"]
    # zero-entropy sites go with the chosen one
    assert plain._choose(converted, {"1": 0.0, "3": 0.2}) == ["1"]
    assert plain._choose(converted, {"1": 0.0, "3": 0.0}) == ["1", "3"]


def bn_free_cnn() -> nn.Module:
    """Without BatchNorm, DDP on 2 ranks computes what one process does on the same global batches."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def _distributed_easier(model: nn.Module, per_rank_batch: int, **options):
    """EASIER on the tiny data with a loader that gives each rank its own shard (all of it alone)."""
    from easier_ext.app.data import make_loader

    train = make_loader(tiny_data(48, 0), per_rank_batch, train=True, seed=0)
    val = make_loader(tiny_data(24, 1), 12, train=False)
    return EASIER(model, train, val, example_input=torch.randn(2, 3, 6, 6), budget=100.0,
                  recipe=Recipe(epochs=1, lr=0.05, amp=False), latency=False, progress=False, **options).run()


def _easier_sites_chosen(per_rank_batch: int) -> list:
    result = _distributed_easier(bn_free_cnn(), per_rank_batch, max_iterations=3)
    return [(log["removed"], round(log["val_accuracy"], 6)) for log in result.trajectory]


def test_ddp_two_ranks_choose_the_same_sites_as_one_process(tmp_path):
    ranks = on_two_gloo_ranks(functools.partial(_easier_sites_chosen, 8), tmp_path)
    assert ranks[0] == ranks[1]
    single = _easier_sites_chosen(16)
    assert [removed for removed, _ in ranks[0]] == [removed for removed, _ in single]
    assert [acc for _, acc in ranks[0]] == [acc for _, acc in single]


def test_chains_the_final_fold_leaves_unmerged_are_in_the_result_not_warnings(tmp_path, monkeypatch):
    real = schedule_module.fold
    calls = {"n": 0}

    def fold_that_warns(model, x, **kwargs):
        calls["n"] += 1
        warnings.warn("not merging 0 -> 3: it would pay, but its inner convs pad their input")
        warnings.warn("something else")
        return real(model, x, **kwargs)

    monkeypatch.setattr(schedule_module, "fold", fold_that_warns)
    with pytest.warns(UserWarning, match="something else"):
        result = schedule(max_iterations=1, run_dir=tmp_path).run()
    # each iteration's log folds quietly; the final fold's chain goes into the result and summary
    assert result.unmerged == ["not merging 0 -> 3: it would pay, but its inner convs pad their input"]
    assert json.loads((tmp_path / "summary.json").read_text())["unmerged"] == result.unmerged


@pytest.mark.parametrize("latency", [False, True])
def test_each_model_is_folded_and_priced_once(tmp_path, monkeypatch, latency):
    folds, costs, timings = (count_calls(monkeypatch, f) for f in (ee.fold, ee.cost, ee.compare_latency))
    result = schedule(max_iterations=2, run_dir=tmp_path, latency=latency).run()
    # one fold and one cost per iteration's log; the result reuses iteration 0's and the chosen one's
    assert len(result.trajectory) == 3 and len(folds) == 3 and len(costs) == 3 and len(timings) == int(latency)
    x = torch.randn(2, 3, 6, 6)
    dense = torch.load(tmp_path / "checkpoints" / "000.pt", weights_only=False)["model"]
    for logged, model in ((result.before, dense), (result.after, result.linearized)):
        fresh = ee.cost(ee.fold(model, x), x, latency=False)  # what they would cost if priced again
        assert (logged.params, logged.macs, logged.depth) == (fresh.params, fresh.macs, fresh.depth)
    assert (result.before.latency_s is not None) == latency
    # resumed in another process: the chosen model is folded again, the dense one only to be timed
    for calls in (folds, costs, timings):
        calls.clear()
    again = schedule(max_iterations=2, run_dir=tmp_path, resume=True, latency=latency).run()
    assert len(folds) == 1 + int(latency) and costs == [] and len(timings) == int(latency)
    assert (again.before.macs, again.after.macs, again.removed) == (result.before.macs, result.after.macs, result.removed)


def test_options_object_or_keywords():
    recipe = Recipe(epochs=1, lr=0.05, amp=False)
    options = EasierOptions(budget=100.0, recipe=recipe, max_iterations=1, latency=False, progress=False, fold_aware=True)
    by_keywords = schedule(budget=100.0, recipe=recipe, max_iterations=1, fold_aware=True)
    assert schedule(options=options).options == by_keywords.options == options
    assert schedule(options=options, patience=2).options.patience == 2 and options.patience == 0  # keywords on top, a copy
    # method defaults, and the run directory's configuration, as earlier versions wrote it
    assert NepentheOptions().aggregate == "nepenthe" and not NepentheOptions().measure_train_mode and EasierOptions().measure_train_mode
    common = {"budget", "recipe", "train_fn", "protect", "aggregate", "measure_batches", "measure_train_mode", "max_iterations",
              "patience", "seed"}
    assert set(options.identity()) == common | {"fold_aware", "fold_tolerance"}
    assert set(NepentheOptions().identity()) == common | {"method", "zeta", "allocation", "layer_cap", "temperature"}
    with pytest.raises(TypeError, match="EASIER takes EasierOptions, got NepentheOptions"):
        schedule(options=NepentheOptions())
    with pytest.raises(TypeError, match="zeta"):
        schedule(zeta=0.5)  # NEPENTHE's, not EASIER's
    for bad, message in [({"patience": 1.5}, "patience must be an int >= 0, got 1.5"), ({"protect": "2"}, "protect must be a list"),
                         ({"fold_tolerance": -1}, "fold_tolerance must be a number of bits >= 0"), ({"latency": "no"}, "latency must be a bool")]:
        with pytest.raises(ValueError, match=message):
            EasierOptions(**bad)
    assert "fold_tolerance: how many bits" in EasierOptions.__doc__ and "budget: the largest" in ScheduleOptions.__doc__


# -- several sites per iteration (sites_per_step) ---------------------------------------------

def test_sites_per_step_follows_the_kept_and_undone_iterations():
    from easier_ext.methods.easier import sites_per_step

    def logs(*entries):  # (count used, undone) per iteration after the dense one
        return [{}] + [{"sites_per_step": k, "undone": undone} for k, undone in entries]

    assert sites_per_step("auto", logs()) == 1
    assert sites_per_step("auto", logs((1, False), (2, False))) == 4
    assert sites_per_step("auto", logs((1, False), (2, False), (4, True))) == 2
    assert sites_per_step("auto", logs((1, False), (2, False), (4, True), (2, False))) == 2  # never grows again
    assert sites_per_step(5, logs()) == 5 and sites_per_step(5, logs((5, False))) == 5
    assert sites_per_step(5, logs((5, True), (2, True))) == 1
    assert sites_per_step(1, [{}, {"removed": ["a"]}]) == 1  # logs of runs before the option


def test_several_sites_per_iteration_are_the_lowest_entropies():
    result = schedule(sites_per_step=3, max_iterations=1).run()
    log = result.trajectory[1]
    lowest = sorted(log["entropies"], key=log["entropies"].get)[:3]
    assert log["sites_per_step"] == 3 and log["removed"][:3] == lowest and not log.get("undone")
    assert sorted(result.removed) == sorted(log["linearized"])


def test_auto_doubles_the_sites_while_within_the_budget():
    result = schedule(sites_per_step="auto", max_iterations=10).run()
    counts = [log["sites_per_step"] for log in result.trajectory[1:]]
    assert counts == [1, 2, 4][: len(counts)] and result.stopped == "no site left"
    assert len(result.trajectory) < 1 + len(ee.sites(result.linearized))  # fewer finetunes than sites


def test_an_iteration_over_the_budget_is_undone_and_retried_with_fewer_sites(tmp_path):
    calls = {"n": 0}

    def ruin_first(model, loader):  # the first finetune (3 sites at once) destroys the classifier
        calls["n"] += 1
        if calls["n"] == 1:
            with torch.no_grad():
                model[-1].weight.zero_()
                model[-1].bias.copy_(torch.tensor([0.0, 0.0, 10.0]))

    dense = trained_cnn()
    result = schedule(dense, train_fn=ruin_first, budget=5.0, sites_per_step=3, max_iterations=2, run_dir=tmp_path).run()
    first, second = result.trajectory[1:]
    assert first["undone"] and first["sites_per_step"] == 3 and len(first["removed"]) >= 3
    assert second["sites_per_step"] == 1 and not second.get("undone")
    # the second starts again from the dense model: only its own sites are linear
    assert sorted(second["linearized"]) == sorted(second["removed"])
    assert result.removed == second["removed"] and result.accuracy == second["val_accuracy"]
    # the undone iteration's checkpoint is the model the run went on from (the dense one)
    kept = torch.load(tmp_path / "checkpoints" / "001.pt", weights_only=False)["model"]
    assert not any(s.linearized for s in ee.sites(kept).values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["removed"] == second["removed"] and summary["finetune_epochs"] is None  # train_fn: unknown
    # the report marks the undone iteration and finds the chosen one past it
    from easier_ext.app import runlog
    from easier_ext.app.report import write_report

    assert runlog.chosen_log(runlog.load_run(tmp_path))["iteration"] == 2
    rows = [line for line in write_report(tmp_path).read_text().splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert "undone" in rows[0] and "chosen" in rows[1] and "undone" not in rows[1]


def test_undone_iterations_do_not_count_towards_patience():
    calls = {"n": 0}

    def ruin_multi(model, loader):  # ruins every iteration of more than one site
        calls["n"] += 1
        linear = sum(s.linearized for s in ee.sites(model).values())
        if linear > 1 and calls["n"] <= 2:
            with torch.no_grad():
                model[-1].weight.zero_()
                model[-1].bias.copy_(torch.tensor([0.0, 0.0, 10.0]))

    result = schedule(trained_cnn(), train_fn=ruin_multi, budget=5.0, sites_per_step=4, patience=0, max_iterations=4).run()
    undone = [log["iteration"] for log in result.trajectory if log.get("undone")]
    counts = [log["sites_per_step"] for log in result.trajectory[1:]]
    assert undone == [1, 2] and counts[:3] == [4, 2, 1]  # patience 0 would have stopped at the first
    assert result.removed == [n for log in result.trajectory[1:] if not log.get("undone") for n in log["removed"]]


def test_resume_after_a_crash_with_several_sites_per_iteration(tmp_path, monkeypatch):
    def ruin_first_of(calls):
        def train_fn(model, loader):
            calls["n"] += 1
            if calls["n"] == 1:
                with torch.no_grad():
                    model[-1].weight.zero_()
                    model[-1].bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
            if calls["n"] == calls.get("crash"):
                raise KeyboardInterrupt
        return train_fn

    dense = trained_cnn()
    kwargs = {"budget": 5.0, "sites_per_step": 4, "max_iterations": 4}
    full = schedule(dense, train_fn=ruin_first_of({"n": 0}), run_dir=tmp_path / "full", **kwargs).run()
    with pytest.raises(KeyboardInterrupt):
        schedule(dense, train_fn=ruin_first_of({"n": 0, "crash": 3}), run_dir=tmp_path / "crashed", **kwargs).run()
    resumed = schedule(dense, train_fn=ruin_first_of({"n": 1}), run_dir=tmp_path / "crashed", resume=True, **kwargs).run()
    assert [log.get("undone") for log in full.trajectory] == [None, True, None, None]
    for key in ("removed", "sites_per_step", "undone", "val_accuracy"):
        assert [log.get(key) for log in resumed.trajectory] == [log.get(key) for log in full.trajectory], key
    assert resumed.removed == full.removed and resumed.stopped == full.stopped == "no site left"


def test_sites_per_step_is_checked_before_anything_is_written(tmp_path):
    for bad in (0, -1, 1.5, True, "fast", None):
        with pytest.raises(ValueError, match=r"sites_per_step must be an int >= 1 or 'auto'"):
            schedule(sites_per_step=bad, run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError):
        schedule(method=NEPENTHE, sites_per_step=2)  # NEPENTHE has no such option: it prunes, sites collapse on their own


def test_sites_per_step_in_the_run_identity_only_when_set(tmp_path):
    schedule(max_iterations=1, run_dir=tmp_path / "one").run()
    assert "sites_per_step" not in json.loads((tmp_path / "one" / "config.json").read_text())  # as runs before it
    schedule(max_iterations=1, run_dir=tmp_path / "auto", sites_per_step="auto").run()
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["sites_per_step"] == "auto"
    with pytest.raises(RunDirError, match="sites_per_step"):
        schedule(max_iterations=1, run_dir=tmp_path / "auto", resume=True)


def test_options_take_numpy_ints_and_any_list_of_sites_and_are_copied():
    import numpy as np

    options = EasierOptions(patience=np.int64(2), max_iterations=np.int32(3), seed=np.int64(7), protect={"2"})
    assert (options.patience, options.max_iterations, options.seed) == (2, 3, 7) and type(options.patience) is int
    assert options.protect == ("2",) and json.dumps(options.identity())
    for bad in ("2", (n for n in ["2"]), [2]):
        with pytest.raises(ValueError, match="protect must be a list of site names"):
            EasierOptions(protect=bad)
    with pytest.raises(ValueError, match="patience must be an int >= 0"):
        EasierOptions(patience=True)
    run = schedule(options=options)
    assert run.patience == 2 and run.protect == ("2",)  # read as attributes, as before the options object
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        run.nonsense
    options.budget = -5.0  # changing the caller's object afterwards changes nothing
    assert run.options is not options and run.options.budget == 1.0



# -- the entropy regularizer -------------------------------------------------------------------

def reference_proxy(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Plain PyTorch: the mean over elements of the binary entropy (bits) of sigmoid(z / tau)."""
    p = torch.sigmoid(z.double() / tau)
    return (torch.special.entr(p) + torch.special.entr(1 - p)).mean() / torch.log(torch.tensor(2.0, dtype=torch.float64))


def test_a_regularized_site_leaves_a_differentiable_proxy_and_unchanged_outputs():
    site = ee.EntropyReLU(track=False)
    site.regularize(0.5)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = site(x)
    torch.testing.assert_close(y, torch.relu(x))
    torch.testing.assert_close(site.entropy_proxy.double(), reference_proxy(x, 0.5), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(site.entropy_proxy, x)
    xr = x.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(reference_proxy(xr, 0.5), xr)
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=1e-4, atol=1e-7)
    assert site.on_counts.numel() == 0  # not tracking: nothing counted
    with torch.no_grad():  # only forwards that record gradients compute it
        site.entropy_proxy = None
        site(x)
    assert site.entropy_proxy is None
    site.regularize(None)
    assert site.entropy_tau is None
    with pytest.raises(ValueError, match="tau must be a positive, finite temperature"):
        site.regularize(0.0)


def test_finetune_adds_the_regularizer_to_the_loss():
    def run(regularizer):
        model = tiny_cnn()
        torch.manual_seed(1)
        return finetune(model, loaders()[0], Recipe(epochs=1, lr=0.05, amp=False), progress=False, regularizer=regularizer)

    plain, shifted = run(None), run(lambda: torch.tensor(3.0))  # a constant: same training, loss + 3
    assert shifted[0]["loss"] == pytest.approx(plain[0]["loss"] + 3.0, rel=1e-6)


def test_the_regularizer_pushes_the_sites_it_is_about_to_remove():
    calls = []
    real = schedule_module.finetune

    def recording(model, loader, recipe, **kwargs):
        targets = [s for s in ee.sites(model).values() if s.entropy_tau is not None]
        calls.append(([s.entropy_tau for s in targets], kwargs["regularizer"]))
        return real(model, loader, recipe, **kwargs)

    schedule_module.finetune = recording
    try:
        result = schedule(trained_cnn(), entropy_weight=2.0, entropy_tau=0.25, max_iterations=2).run()
    finally:
        schedule_module.finetune = real
    first = result.trajectory[1]
    left = sorted((h, n) for n, h in first["entropies"].items() if n not in first["removed"])
    assert first["regularized"] == [left[0][1]]  # the next one to go, by this iteration's entropies
    assert calls[0][0] == [0.25] and calls[0][1] is not None
    # after the finetune no proxy (with its graph) stays on the model: it copies and checkpoints
    assert all(s.entropy_tau is None and s.entropy_proxy is None for s in ee.sites(result.linearized).values())
    everything = schedule(trained_cnn(), entropy_weight=1.0, regularize="all", max_iterations=1).run()
    log = everything.trajectory[1]
    assert sorted(log["regularized"]) == sorted(n for n in log["entropies"] if n not in log["removed"])


def test_a_strong_regularizer_lowers_the_entropy_of_its_sites():
    def entropy_after(weight):
        model = ee.convert(trained_cnn())
        site = ee.sites(model)["5"]
        site.regularize(0.5)
        for s in ee.sites(model).values():
            s.track = False
        penalty = (lambda: weight * site.entropy_proxy) if weight else None
        torch.manual_seed(0)
        finetune(model, loaders()[0], Recipe(epochs=4, lr=0.05, amp=False), progress=False, regularizer=penalty)
        site.regularize(None)
        return ee.measure_entropy(model, loaders()[0], progress=False)["5"].entropy

    assert entropy_after(5.0) < entropy_after(0.0)


def test_regularizer_options_are_checked_before_anything_is_written(tmp_path):
    for kwargs, message in [
        ({"entropy_weight": -1.0}, "entropy_weight must be a number >= 0"),
        ({"entropy_tau": 0.0}, "entropy_tau must be a number > 0"),
        ({"regularize": "some"}, "unknown regularized site set 'some'"),
        ({"entropy_weight": 1.0, "protect": ["2", "5", "8", "12"]}, "no unprotected site to regularize"),
        ({"entropy_weight": 1.0, "train_fn": lambda m, l: None}, "needs the built-in finetune"),
    ]:
        with pytest.raises(ValueError, match=message):
            schedule(run_dir=tmp_path / "run", **kwargs)
        assert not (tmp_path / "run").exists()


# -- trying sites without a finetune first (probe) --------------------------------------------

def reference_batch_norm_statistics(features: list) -> tuple:
    """BatchNorm's running statistics with a cumulative average: the mean over the batches of each
    batch's per-channel mean and unbiased variance."""
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    return mean, var


def test_recalibrate_batchnorm_against_the_per_batch_statistics():
    from easier_ext.methods.train import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
        model[1].running_var.fill_(9.0)
    batches = [(torch.randn(8, 3, 6, 6) * 2 + 1, torch.zeros(8)) for _ in range(3)]
    conv = [p.clone() for p in model.parameters()]
    assert recalibrate_batchnorm(model, batches, max_batches=2) == 1
    with torch.no_grad():
        mean, var = reference_batch_norm_statistics([model[0](x) for x, _ in batches[:2]])
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert not model.training and model[1].momentum == 0.1  # flag and momentum restored
    assert all(torch.equal(a, b) for a, b in zip(conv, model.parameters()))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = copy.deepcopy(plain.state_dict())
    assert recalibrate_batchnorm(plain, batches) == 0
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_recalibrate_batchnorm_refuses_bad_input_and_keeps_the_statistics():
    from easier_ext.methods.train import recalibrate_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(8, 3, 6, 6), torch.zeros(8))]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"max_batches must be an int >= 1 \(or None for every batch\), got"):
            recalibrate_batchnorm(model, batches, max_batches=bad)
    with pytest.raises(ValueError, match="the loader gave no batch"):
        recalibrate_batchnorm(model, [])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bn_model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    return model, [(torch.randn(8, 3, 6, 6) + i, torch.zeros(8)) for i in range(4)]


def _recalibrated_on_this_rank() -> list:
    from easier_ext.methods.train import recalibrate_batchnorm

    model, batches = _bn_model_and_batches()
    rank = torch.distributed.get_rank()
    recalibrate_batchnorm(model, batches[2 * rank : 2 * rank + 2])  # each rank its own two batches
    return [model[1].running_mean, model[1].running_var]


def test_recalibrate_batchnorm_on_two_ranks_averages_their_statistics(tmp_path):
    ranks = on_two_gloo_ranks(_recalibrated_on_this_rank, tmp_path)
    model, batches = _bn_model_and_batches()
    with torch.no_grad():
        reference = reference_batch_norm_statistics([model[0](x) for x, _ in batches])
    for stats in ranks:  # both ranks hold the statistics of all four batches
        for got, want in zip(stats, reference):
            torch.testing.assert_close(got, want)


def _probed_on_this_rank() -> list:
    result = _distributed_easier(trained_cnn(), 8, max_iterations=2, probe=True)  # each rank its own half
    stats = [b for name, b in result.linearized.named_buffers() if name.endswith(("running_mean", "running_var"))]
    return [(log["removed"], log.get("finetuned"), log["val_accuracy"]) for log in result.trajectory], stats


def test_probes_on_two_ranks_take_the_same_decisions_and_statistics(tmp_path):
    (logs0, stats0), (logs1, stats1) = on_two_gloo_ranks(_probed_on_this_rank, tmp_path)
    assert logs0 == logs1 and [finetuned for _, finetuned, _ in logs0[1:]] == [False, False]
    for a, b in zip(stats0, stats1):  # re-estimated on different shards, averaged: the same model
        torch.testing.assert_close(a, b)


def _never_finetune(model, loader):
    raise AssertionError("a probed iteration within the budget must not finetune")


def test_probe_keeps_sites_within_the_budget_without_a_finetune(tmp_path):
    from easier_ext.methods.train import evaluate

    dense = trained_cnn()
    result = schedule(dense, probe=True, max_iterations=2, run_dir=tmp_path, train_fn=_never_finetune).run()
    first, second = result.trajectory[1:]
    for log in (first, second):
        assert log["finetuned"] is False and log["finetune"] == [] and len(log["probes"]) == 1
        assert log["probes"][0]["accuracy"] == log["val_accuracy"] and log["probes"][0]["removed"] == log["removed"]
    # the kept model is the probed one: its accuracy, and its first BatchNorm re-estimated on the training batches
    kept = torch.load(tmp_path / "checkpoints" / "001.pt", weights_only=False)["model"]
    assert evaluate(kept, loaders()[1]) == first["val_accuracy"]
    with torch.no_grad():
        mean, var = reference_batch_norm_statistics([kept[0](x) for x, _ in loaders()[0]])
    torch.testing.assert_close(kept[1].running_mean, mean)
    torch.testing.assert_close(kept[1].running_var, var)
    assert not torch.allclose(dense[1].running_mean, mean)  # the finetuned dense model's were not these
    assert json.loads((tmp_path / "summary.json").read_text())["finetune_epochs"] == 0
    assert json.loads((tmp_path / "config.json").read_text())["probe"] is True
    from easier_ext.app.report import write_report

    rows = [line for line in write_report(tmp_path).read_text().splitlines() if line.startswith(("| 1 ", "| 2 "))]
    assert len(rows) == 2 and all("no finetune" in row for row in rows)


def _ten_points_per_linear_site(model, loader, **kwargs):
    return 100.0 - 10.0 * sum(s.linearized for s in ee.sites(model).values())


def test_probe_halves_the_sites_until_one_count_is_within_the_budget(monkeypatch):
    import easier_ext.methods.easier as easier_module

    monkeypatch.setattr(easier_module, "evaluate", _ten_points_per_linear_site)
    monkeypatch.setattr(schedule_module, "evaluate", _ten_points_per_linear_site)  # the dense model: 100
    result = schedule(trained_cnn(), probe=True, budget=15.0, sites_per_step=4, max_iterations=1, train_fn=_never_finetune).run()
    log = result.trajectory[1]
    assert result.trajectory[0]["val_accuracy"] == 100.0
    assert [p["sites_per_step"] for p in log["probes"]] == [4, 2, 1]
    assert [len(p["removed"]) for p in log["probes"]] == [4, 2, 1]  # no site at zero entropy here
    assert log["removed"] == log["probes"][-1]["removed"] and log["val_accuracy"] == 90.0
    assert log["sites_per_step"] == 4 and log["finetuned"] is False
    assert result.removed == log["removed"] and sorted(log["linearized"]) == sorted(log["removed"])


def test_probes_of_the_same_sites_run_once(monkeypatch):
    import easier_ext.methods.easier as easier_module

    monkeypatch.setattr(easier_module, "evaluate", lambda *args, **kwargs: 0.0)
    result = schedule(trained_cnn(), probe=True, budget=15.0, sites_per_step=8, max_iterations=1, train_fn=lambda m, d: None).run()
    probes = result.trajectory[1]["probes"]
    assert len(ee.sites(result.linearized)) == 4  # 8 and 4 ask for the same four sites: tried once
    assert [p["sites_per_step"] for p in probes] == [8, 2, 1] and [len(p["removed"]) for p in probes] == [4, 2, 1]


def test_probe_on_a_model_without_batchnorm_evaluates_the_linearized_copy():
    result = schedule(bn_free_cnn(), probe=True, max_iterations=1, train_fn=_never_finetune).run()
    log = result.trajectory[1]
    assert log["finetuned"] is False and log["val_accuracy"] == log["probes"][0]["accuracy"]


def test_after_failed_probes_the_regularizer_pushes_as_many_sites_as_were_finetuned(monkeypatch):
    import easier_ext.methods.easier as easier_module

    monkeypatch.setattr(easier_module, "evaluate", lambda *args, **kwargs: 0.0)
    result = schedule(trained_cnn(), probe=True, budget=15.0, sites_per_step=2, max_iterations=1, entropy_weight=0.1).run()
    log = result.trajectory[1]
    left = sorted((h, n) for n, h in log["entropies"].items() if n not in log["removed"])
    assert len(log["removed"]) == 1 and log["regularized"] == [left[0][1]]


def test_when_no_probe_is_within_the_budget_the_lowest_site_alone_is_finetuned(monkeypatch):
    import easier_ext.methods.easier as easier_module

    monkeypatch.setattr(easier_module, "evaluate", lambda *args, **kwargs: 0.0)
    finetuned = []

    def ruin(model, loader):  # records what is linear, then ends the iteration over the budget
        finetuned.append(sorted(n for n, s in ee.sites(model).items() if s.linearized))
        with torch.no_grad():
            model[-1].weight.zero_()

    result = schedule(trained_cnn(), probe=True, budget=15.0, sites_per_step=2, max_iterations=2, patience=1, train_fn=ruin).run()
    first, second = result.trajectory[1:]
    lowest = min(first["entropies"], key=first["entropies"].get)
    assert [p["sites_per_step"] for p in first["probes"]] == [2, 1] and "finetuned" not in first
    assert first["removed"] == first["probes"][-1]["removed"] == [lowest] and finetuned[0] == [lowest]
    # over the budget, yet not undone: one site, as plain EASIER (patience decides); the next goes on from it
    assert not first.get("undone") and lowest in second["linearized"] and len(finetuned) == 2


def test_auto_doubles_what_a_probe_kept():
    from easier_ext.methods.easier import sites_per_step

    def probed(tried, kept):
        return {"sites_per_step": tried, "finetuned": False, "probes": [{"sites_per_step": k} for k in (tried, kept) if k]}

    assert sites_per_step("auto", [{}, probed(1, 0)]) == 2
    assert sites_per_step("auto", [{}, probed(1, 0), probed(2, 0), probed(4, 1)]) == 2  # kept 1 of the 4 tried
    assert sites_per_step(4, [{}, probed(4, 1)]) == 4  # a fixed number stays
    finetuned_alone = {"sites_per_step": 4, "probes": [{"sites_per_step": k} for k in (4, 2, 1)]}
    assert sites_per_step("auto", [{}, probed(1, 0), probed(2, 0), finetuned_alone]) == 2


def test_resume_after_a_crash_with_probes(tmp_path, monkeypatch):
    import easier_ext.methods.easier as easier_module

    kwargs = {"probe": True, "sites_per_step": "auto", "max_iterations": 3}
    dense = trained_cnn()
    full = schedule(dense, run_dir=tmp_path / "full", **kwargs).run()
    real, calls = easier_module.recalibrate_batchnorm, {"n": 0}

    def crash_on_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(easier_module, "recalibrate_batchnorm", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        schedule(dense, run_dir=tmp_path / "crashed", **kwargs).run()
    monkeypatch.setattr(easier_module, "recalibrate_batchnorm", real)
    resumed = schedule(dense, run_dir=tmp_path / "crashed", resume=True, **kwargs).run()
    for key in ("removed", "sites_per_step", "probes", "finetuned", "val_accuracy"):
        assert [log.get(key) for log in resumed.trajectory] == [log.get(key) for log in full.trajectory], key
    for (key, a), b in zip(resumed.linearized.state_dict().items(), full.linearized.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key


def test_probe_is_a_bool_checked_before_anything_is_written(tmp_path):
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="probe must be a bool"):
            schedule(probe=bad, run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError):
        schedule(method=NEPENTHE, probe=True)


def test_after_failed_probes_the_finetune_starts_from_the_re_estimated_statistics(monkeypatch):
    import easier_ext.methods.easier as easier_module
    from easier_ext.methods.train import recalibrate_batchnorm

    monkeypatch.setattr(easier_module, "evaluate", lambda *args, **kwargs: 0.0)  # every probe over the budget
    seen = []

    def record(model, loader):
        seen.append({k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))})

    dense = trained_cnn()
    result = schedule(dense, probe=True, budget=15.0, sites_per_step=2, max_iterations=1, train_fn=record).run()
    probes = result.trajectory[1]["probes"]
    assert [len(p["removed"]) for p in probes] == [2, 1]
    # every BatchNorm as re-estimated with the lowest site alone linearized, not the dense model's
    alone = ee.convert(dense)
    ee.linearize(alone, probes[-1]["removed"])
    recalibrate_batchnorm(alone, loaders()[0])
    want = {k: v for k, v in alone.state_dict().items() if k in seen[0]}
    assert want.keys() == seen[0].keys() and len(want) == 6
    for key, value in want.items():
        torch.testing.assert_close(seen[0][key], value)
    assert not any(torch.allclose(v, dense.state_dict()[k]) for k, v in want.items())


# -- early stop --------------------------------------------------------------------------------------
def _accuracies(*values):
    """An evaluate that returns ``values`` in turn (the dense model's first)."""
    left = list(values)
    return lambda *args, **kwargs: left.pop(0)


def test_early_stop_ends_a_finetune_at_the_first_check_within_the_budget(monkeypatch, tmp_path):
    # 3 batches an epoch, 2 epochs, a check every 2 batches: after batch 2 (98.9, over a budget of
    # 1 below 100), after batch 4 (99.0, within): the finetune ends one batch into its second epoch
    monkeypatch.setattr(schedule_module, "evaluate", _accuracies(100.0, 98.9, 99.0, 99.0))
    result = schedule(trained_cnn(), early_stop=2, budget=1.0, max_iterations=1, run_dir=tmp_path,
                      recipe=Recipe(epochs=2, lr=0.05, amp=False)).run()
    records = result.trajectory[1]["finetune"]
    assert [(r["epoch"], r["batches"], r.get("stopped"), r.get("fraction")) for r in records] == [
        (0, 3, None, None), (1, 1, True, pytest.approx(1 / 3))]
    assert result.trajectory[1]["val_accuracy"] == 99.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finetune_epochs"] == pytest.approx(4 / 3)
    assert json.loads((tmp_path / "config.json").read_text())["early_stop"] == 2
    from easier_ext.app.report import write_report

    row = next(line for line in write_report(tmp_path).read_text().splitlines() if line.startswith("| 1 "))
    assert "finetune ended at a check within the budget after 1 batch of epoch 2" in row


@pytest.mark.parametrize("method", [EASIER, NEPENTHE])
@pytest.mark.parametrize("budget", [0.0, 100.0])
def test_early_stop_ends_at_the_first_check_the_real_accuracy_passes(method, budget, monkeypatch):
    from easier_ext.methods.train import evaluate

    asked, real = [], schedule_module.Schedule._within_budget

    def spy(self, model, dense_accuracy):
        asked.append(dense_accuracy - evaluate(model, self.val_loader) <= budget)
        return real(self, model, dense_accuracy)

    monkeypatch.setattr(schedule_module.Schedule, "_within_budget", spy)
    result = schedule(trained_cnn(), method=method, early_stop=1, budget=budget, max_iterations=2, patience=2,
                      recipe=Recipe(epochs=2, lr=0.05, amp=False)).run()
    for log in result.trajectory[1:]:  # 6 batches; a check after each of the first 5 until one is within the budget
        ran = sum(r["batches"] for r in log["finetune"])
        checks = [asked.pop(0) for _ in range(min(ran, 5))]
        stopped = bool(log["finetune"][-1].get("stopped"))
        assert stopped == (True in checks) and (not stopped or checks.index(True) == len(checks) - 1)
    assert not asked
    if budget == 100.0:  # within at the first check: one batch
        assert [sum(r["batches"] for r in log["finetune"]) for log in result.trajectory[1:]] == [1, 1]


def test_early_stop_is_checked_before_anything_is_written(tmp_path):
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"early_stop must be an int >= 0 \(batches between checks; 0: off\)"):
            schedule(early_stop=bad, run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="early_stop must be 0 with a train_fn"):
        schedule(early_stop=2, train_fn=lambda m, d: None, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    schedule(run_dir=tmp_path / "default", max_iterations=1).run()
    assert "early_stop" not in json.loads((tmp_path / "default" / "config.json").read_text())  # older runs still resume


# -- a budget of finetune epochs -----------------------------------------------------------------------
def test_max_finetune_epochs_cuts_the_finetune_that_reaches_it_and_stops_the_run(tmp_path):
    from easier_ext.app.report import write_report

    # 3 batches an epoch, a finetune of 1 epoch: 5/3 epochs are 5 batches, iteration 2's cut after 2
    result = schedule(trained_cnn(), max_finetune_epochs=5 / 3, run_dir=tmp_path).run()
    assert [[(r["batches"], r.get("truncated")) for r in log["finetune"]] for log in result.trajectory[1:]] == [
        [(3, None)], [(2, True)]]
    assert result.stopped == "spent the finetune budget: 1.667 of max_finetune_epochs=1.667 epochs"
    assert json.loads((tmp_path / "summary.json").read_text())["finetune_epochs"] == pytest.approx(5 / 3)
    assert json.loads((tmp_path / "config.json").read_text())["max_finetune_epochs"] == pytest.approx(5 / 3)
    row = next(line for line in write_report(tmp_path).read_text().splitlines() if line.startswith("| 2 "))
    assert "finetune cut after 2 batches: the run's max_finetune_epochs was spent" in row
    # iteration 2's model: iteration 1's with iteration 2's site linearized, after two steps of a plain loop
    reference = torch.load(tmp_path / "checkpoints" / "001.pt", weights_only=False)["model"]
    ee.linearize(reference, result.trajectory[2]["removed"])
    reference.train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)  # the recipe's
    for x, y in list(loaders()[0])[:2]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    kept = torch.load(tmp_path / "checkpoints" / "002.pt", weights_only=False)["model"]
    trained = {k: v for k, v in reference.state_dict().items()  # not the sites' counts, which measuring changed
               if k.rsplit(".", 1)[-1] in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert len(trained) == 25  # 5 weighted layers, 3 BatchNorms
    for name, value in trained.items():
        torch.testing.assert_close(kept.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_run_with_max_finetune_epochs_resumed_after_a_kill_spends_the_same(tmp_path):
    whole = schedule(trained_cnn(), max_finetune_epochs=1.5, run_dir=tmp_path / "whole")
    first = whole.run()
    whole.close()
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole", killed)
    for path in (killed / "iterations" / "002.json", killed / "checkpoints" / "002.pt", killed / "summary.json"):
        path.unlink()  # killed during iteration 2's finetune
    again = schedule(trained_cnn(), max_finetune_epochs=1.5, run_dir=killed, resume=True).run()
    assert [sum(r["batches"] for r in log["finetune"]) for log in again.trajectory[1:]] == [3, 1]
    assert again.stopped == first.stopped and again.removed == first.removed
    for p, q in zip(again.linearized.state_dict().values(), first.linearized.state_dict().values()):
        torch.testing.assert_close(p, q)


def test_nepenthe_spends_no_more_than_max_finetune_epochs():
    result = schedule(trained_cnn(), method=NEPENTHE, max_finetune_epochs=0.5).run()
    assert [[(r["batches"], r.get("truncated")) for r in log["finetune"]] for log in result.trajectory[1:]] == [[(1, True)]]
    assert result.stopped.startswith("spent the finetune budget: 0.3333 of max_finetune_epochs=0.5 epochs")


class _NoLength:
    """A training loader without a length."""

    def __iter__(self):
        return iter(loaders()[0])


def test_max_finetune_epochs_is_checked_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match=r"max_finetune_epochs must be a finite number > 0 or None, got"):
            schedule(max_finetune_epochs=bad, run_dir=run)
    with pytest.raises(ValueError, match="max_finetune_epochs must be None with a train_fn"):
        schedule(max_finetune_epochs=1, train_fn=lambda m, d: None, run_dir=run)
    val = loaders()[1]
    with pytest.raises(ValueError, match="max_finetune_epochs must be None with a training loader without a length and a "
                                         "recipe without max_batches"):
        EASIER(tiny_cnn(), _NoLength(), val, example_input=torch.randn(2, 3, 6, 6), max_finetune_epochs=1, run_dir=run)
    with pytest.raises(ValueError, match=r"max_finetune_epochs must be at least one batch of finetuning: >= 1/3 epochs with 3 "
                                         r"batches an epoch, got 0.3"):
        schedule(max_finetune_epochs=0.3, run_dir=run)
    assert not run.exists()
    # the recipe's max_batches makes an epoch known: 2 batches
    result = EASIER(tiny_cnn(), _NoLength(), val, example_input=torch.randn(2, 3, 6, 6), max_finetune_epochs=1.5,
                    recipe=Recipe(epochs=1, max_batches=2, amp=False), latency=False, progress=False, budget=100.0).run()
    assert [sum(r["batches"] for r in log["finetune"]) for log in result.trajectory[1:]] == [2, 1]
    schedule(run_dir=tmp_path / "default", max_iterations=1).run()
    assert "max_finetune_epochs" not in json.loads((tmp_path / "default" / "config.json").read_text())


def test_once_the_finetune_budget_is_spent_probes_go_on_until_one_needs_a_finetune(monkeypatch):
    import easier_ext.methods.easier as easier_module

    # probes: iteration 1's over the budget (its finetune is cut after the budget's one batch),
    # iteration 2's within it (kept, no finetune), iteration 3's over: the run stops there
    monkeypatch.setattr(easier_module, "evaluate", _accuracies(0.0, 99.5, 0.0))
    monkeypatch.setattr(schedule_module, "evaluate", _accuracies(100.0, 99.5))
    result = schedule(trained_cnn(), probe=True, budget=1.0, max_finetune_epochs=1 / 3).run()
    logs = result.trajectory[1:]
    assert [(sum(r["batches"] for r in log["finetune"]), log.get("finetuned", True)) for log in logs] == [(1, True), (0, False)]
    assert result.stopped == ("spent the finetune budget: 0.3333 of max_finetune_epochs=0.3333 epochs; iteration 3 would need a finetune "
                              "(its probes: 0.00)")
    assert result.removed == logs[0]["removed"] + logs[1]["removed"]


def test_without_probes_a_spent_finetune_budget_stops_the_run_before_it_measures_again(monkeypatch):
    measured = count_calls(monkeypatch, schedule_module.measure_entropy)
    result = schedule(trained_cnn(), max_finetune_epochs=1 / 3).run()
    assert len(result.trajectory) == 2 and len(measured) == 1
    assert result.stopped == "spent the finetune budget: 0.3333 of max_finetune_epochs=0.3333 epochs"

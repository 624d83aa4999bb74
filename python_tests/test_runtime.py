"""core.runtime: model_device, autocast, batch_count and progress against plain PyTorch and tqdm."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from easier_ext.core.runtime import autocast, batch_count, is_main_process, model_device, progress


def _as_rank(monkeypatch, rank: int) -> None:
    """Pretends to be ``rank`` of 2 in an initialized process group, without starting one."""
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)


# -- model_device ---------------------------------------------------------------------------------
def test_model_device_of_a_cpu_model_is_its_parameters_device():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert model_device(model) == next(model.parameters()).device == torch.device("cpu")


def test_model_device_without_parameters_or_buffers_is_the_cpu():
    for module in (nn.ReLU(), nn.Sequential(), nn.Identity()):
        assert list(module.parameters()) == list(module.buffers()) == []
        assert model_device(module) == torch.device("cpu")


def test_model_device_falls_back_to_the_first_buffer():
    # "meta" stands in for a second device, so that the fallback shows without a GPU
    module = nn.Module()
    module.register_buffer("stats", torch.zeros(2, device="meta"))
    assert model_device(module) == next(module.buffers()).device == torch.device("meta")


def test_model_device_prefers_parameters_to_earlier_buffers():
    module = nn.Module()
    module.register_buffer("stats", torch.zeros(2))  # registered first, on the CPU
    module.weight = nn.Parameter(torch.zeros(2, device="meta"))
    assert model_device(module) == torch.device("meta")


def test_model_device_sees_through_a_wrapper():
    inner = nn.Linear(2, 2).to("meta")
    assert model_device(nn.Sequential(nn.Identity(), inner)) == torch.device("meta")


# -- autocast -------------------------------------------------------------------------------------
def _matmul_dtype(ctx) -> torch.dtype:
    with ctx:
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype


@pytest.mark.parametrize("amp", [False, None, 0], ids=["False", "None", "0"])
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cuda"], ids=["cpu-str", "cpu", "cuda"])
def test_autocast_off_is_a_null_context(amp, device):
    ctx = autocast(device, amp)
    assert isinstance(ctx, contextlib.nullcontext)
    assert _matmul_dtype(ctx) == torch.float32
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    "amp,expected",
    [(True, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
    ids=["True", "bfloat16", "float16"],
)
def test_autocast_on_the_cpu_matches_torch_autocast(amp, expected):
    got = autocast(torch.device("cpu"), amp)
    assert isinstance(got, torch.autocast) and (got.device, got.fast_dtype) == ("cpu", expected)
    assert _matmul_dtype(got) == _matmul_dtype(torch.autocast("cpu", dtype=expected)) == expected


@pytest.mark.parametrize(
    "device,amp,expected",
    [
        # what finetune/evaluate pass (amp only on CUDA): float16, as their own helper gave
        (torch.device("cuda"), True, torch.float16),
        (torch.device("cuda", 0), True, torch.float16),
        # what measure_entropy may pass
        ("cuda", torch.bfloat16, torch.bfloat16),
    ],
    ids=["cuda-True", "cuda:0-True", "cuda-bfloat16"],
)
def test_autocast_on_cuda_picks_the_dtype(device, amp, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns, and disables the context, without a GPU
        got = autocast(device, amp)
    assert isinstance(got, torch.autocast) and (got.device, got.fast_dtype) == ("cuda", expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_autocast_on_cuda_runs_in_float16():
    with autocast(torch.device("cuda"), True):
        out = torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")
    assert out.dtype == torch.float16


# -- batch_count ----------------------------------------------------------------------------------
def test_batch_count_follows_len_and_the_cap():
    loader = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=3)  # 4 batches
    assert batch_count(loader) == len(loader) == 4
    assert batch_count(loader, 2) == 2
    assert batch_count(loader, 9) == 4
    assert batch_count([], 3) == 0


def test_batch_count_without_len_is_the_cap_or_unknown():
    assert batch_count(iter(range(5))) is None
    assert batch_count(iter(range(5)), 3) == 3  # what the pass will stop at, at most


# -- rank 0 and progress --------------------------------------------------------------------------
def test_is_main_process_alone_and_under_ranks(monkeypatch):
    assert not dist.is_initialized() and is_main_process()
    _as_rank(monkeypatch, 0)
    assert is_main_process()
    _as_rank(monkeypatch, 1)
    assert not is_main_process()


@pytest.mark.parametrize("rank,enabled,shown", [(None, True, True), (0, True, True), (1, True, False), (0, False, False)])
def test_progress_shows_on_rank_0_only(monkeypatch, capsys, rank, enabled, shown):
    if rank is not None:
        _as_rank(monkeypatch, rank)
    bar = progress([10, 20, 30], total=3, desc="probe", enabled=enabled)
    assert bar.disable is not shown
    assert list(bar) == [10, 20, 30]  # a hidden bar still iterates
    err = capsys.readouterr().err
    assert ("probe" in err) is shown
    if not shown:
        assert err == ""


def test_progress_without_an_iterable_counts_updates(capsys):
    with progress(total=4, desc="steps") as bar:
        bar.update()
        bar.update(2)
        bar.set_postfix(loss="0.5")
        assert (bar.n, bar.total, bar.unit) == (3, 4, "batch")
    assert "steps" in capsys.readouterr().err


def test_progress_hidden_bar_accepts_what_finetune_calls(monkeypatch, capsys):
    _as_rank(monkeypatch, 1)
    with progress(total=None, desc="finetune") as bar:
        bar.update()
        bar.set_postfix(epoch=0)
    assert capsys.readouterr().err == ""

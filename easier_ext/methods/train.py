"""Finetuning and evaluation: the FINETUNE and EVALUATE steps of the EASIER schedule.

EASIER repeats: measure every site's entropy, linearize the lowest-entropy one, finetune, evaluate.
Each finetune starts from a fresh optimizer and learning-rate schedule, as the paper does after
every linearization; what they are is the :class:`~easier_ext.methods.recipe.Recipe`'s to say.

Both :func:`finetune` and :func:`evaluate` work alone or under an initialized
``torch.distributed`` process group, where every rank must call them (they are collective).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from easier_ext.core.checks import is_int
from easier_ext.core.runtime import autocast, batch_count, model_device, progress as progress_bar, unwrap_ddp, world_size
from easier_ext.methods.ranks import collective_device, max_over_ranks, min_over_ranks, sum_over_ranks, training_module
# The recipe lived here before methods.recipe; its names stay importable from this module, and
# pickles naming easier_ext.train.Recipe (this module under its old path) still load.
from easier_ext.methods.recipe import OPTIMIZERS, SCHEDULES, Recipe, constant_lr, make_optimizer, make_scheduler, require_recipe

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "NonFiniteLossError",
    "Recipe",
    "evaluate",
    "finetune",
    "make_optimizer",
    "make_scheduler",
    "recalibrate_batchnorm",
]

Device = Union[str, torch.device, None]


# -- finetuning ----------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; no optimizer step was taken on it.

    Args:
        epoch: the epoch, 0-based.
        batch: the batch within the epoch, 0-based.
        loss: the offending loss on this rank, when known (another rank's may have been the bad one).
    """

    def __init__(self, epoch: int, batch: int, loss: Optional[float] = None) -> None:
        self.epoch = epoch
        self.batch = batch
        self.loss = loss
        seen = "" if loss is None else f" (this rank's loss: {loss})"
        super().__init__(
            f"non-finite training loss at epoch {epoch}, batch {batch} (0-based){seen}; "
            "the parameters are those after the last finite step. Lower the learning rate or check the data."
        )

    def __reduce__(self):
        # the default reduce would call __init__(message), which does not fit this signature
        return (type(self), (self.epoch, self.batch, self.loss))


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    recipe: Recipe,
    *,
    device: Device = None,
    progress: bool = True,
    on_epoch_end: Optional[Callable[[dict[str, Any]], None]] = None,
    desc: str = "finetune",
    regularizer: Optional[Callable[[], Tensor]] = None,
    stop_when: Optional[Callable[[], bool]] = None,
    check_every: Optional[int] = None,
    max_steps: Optional[int] = None,
) -> list[dict[str, Any]]:
    """Trains the model with cross-entropy, from a fresh optimizer and learning-rate schedule.

    The model trains in train mode; its training flag is restored at the end. Loss and accuracy
    accumulate on the device and reach the host once per epoch. The one exception is the finiteness
    check of each batch's loss, which synchronizes with the device once per batch so that no
    optimizer step is ever taken on a NaN/inf loss (under AMP the gradient scaler synchronizes per
    step anyway, so this adds no stall there).

    Under an initialized ``torch.distributed`` process group with more than one rank, the model is
    wrapped in ``DistributedDataParallel`` for the duration (the default group's backend: gloo on
    CPU, nccl on CUDA; rank 0's parameters and buffers are broadcast first), every rank must call
    this with its own shard of the data and the same number of batches (e.g. a
    ``DistributedSampler``), the returned history is the same on every rank (sums over the ranks),
    and the original, unwrapped module is left trained. Parameters of linearized sites, which no
    longer take part in the forward, are handled (``find_unused_parameters``).

    Args:
        model: the module to train, in place (a DDP wrapper is used as is).
        train_loader: iterable of ``(input, target)`` batches, targets being class indices. When it
            has a ``sampler`` with ``set_epoch`` (``DistributedSampler``), that is called with the
            epoch before each one, so that shuffling differs between epochs.
        recipe: the optimizer, schedule, loss and epochs.
        device: where batches go; default: the model's parameters' device. The model is not moved.
        progress: show a progress bar with an ETA over all epochs (rank 0 only).
        on_epoch_end: called with each epoch's record after the epoch, on every rank (so it may call
            collective functions such as :func:`evaluate`).
        desc: the progress bar's label.
        regularizer: called after each batch's forward; what it returns (a scalar tensor) is added
            to the loss (e.g. the entropy proxies of regularized sites, see
            :meth:`easier_ext.EntropyActivation.regularize`). The records' ``loss`` includes it.
        stop_when: called after every ``check_every``-th batch (counted over all epochs; not after
            the last one, which ends the finetune anyway, when the number of batches is known: a
            loader with a length, or the recipe's ``max_batches``), on every rank (so it may call
            collective functions such as :func:`evaluate`); the finetune ends there when it returns
            True on every rank (e.g. the accuracy is back within a budget: a finetune that only has
            to recover need not run its whole recipe). The learning-rate schedule is the recipe's
            as far as it got.
        check_every: how many batches between two calls of ``stop_when``; required with it.
        max_steps: the most batches the finetune runs in all (counted over all epochs), e.g. what
            is left of a run's budget of finetune epochs; fewer than the recipe's batches end it
            early, its learning-rate schedule as far as it got (``stop_when`` is not asked after
            that last batch either). None: the recipe's epochs.

    Returns:
        one record per epoch run: ``epoch`` (0-based), ``lr`` (the epoch's learning rate), ``loss``
        (mean per-sample training loss), ``accuracy`` (training top-1 in percent, measured while the
        model trained), ``samples`` (targets seen, all ranks), ``batches`` (this rank's) and
        ``seconds`` (wall time, the slowest rank's). The epoch ``stop_when`` ended has
        ``"stopped": True`` and ``fraction``, the part of a whole epoch it ran (None when the
        loader has no length and the recipe no ``max_batches``); the epoch ``max_steps`` ended,
        when it came before the recipe's end, has ``"truncated": True`` and ``fraction``.

    Raises:
        TypeError: ``recipe`` is not a :class:`Recipe`, or a batch is not an ``(input, target)``
            pair of tensors.
        ValueError: the model has nothing to train, an epoch gave no batches on any rank, or
            ``stop_when`` came without a ``check_every`` >= 1 (or ``check_every`` without it), or
            ``max_steps`` is not None or an int >= 1.
        NonFiniteLossError: the loss became NaN or infinite (on any rank); the parameters are those
            after the last finite step, but BatchNorm running statistics have seen the failing
            batch's forward.
    """
    require_recipe(recipe)
    if (stop_when is None) != (check_every is None) or not (check_every is None or (is_int(check_every) and check_every >= 1)):
        raise ValueError(f"stop_when and check_every go together, check_every an int >= 1; got stop_when={stop_when!r}, "
                         f"check_every={check_every!r}")
    if not (max_steps is None or (is_int(max_steps) and max_steps >= 1)):
        raise ValueError(f"max_steps must be None or an int >= 1 (batches in all), got {max_steps!r}")
    net = unwrap_ddp(model)
    device = torch.device(device) if device is not None else model_device(net)
    use_amp = recipe.amp and device.type == "cuda"
    # Fresh state on every call: the paper restarts the optimizer and the schedule after each
    # linearization, and momentum from the pre-linearization network would point the wrong way.
    optimizer = make_optimizer(net, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    steps = batch_count(train_loader, recipe.max_batches)

    history: list[dict[str, Any]] = []
    total = None if steps is None else steps * recipe.epochs
    if max_steps is not None and (total is None or max_steps < total):
        total = max_steps
    else:  # the recipe ends first: nothing is cut
        max_steps = None
    done = 0

    def end() -> str:
        # why the finetune ends after this batch ("" to go on); every rank reaches the same batch
        # (same number of batches), so the collectives line up
        nonlocal done
        done += 1
        if done == max_steps:
            return "truncated"
        if stop_when is None or done % check_every or done == total:
            return ""
        return "stopped" if min_over_ranks(float(bool(stop_when())), device) > 0 else ""

    was_training = net.training
    bar = progress_bar(total=total, desc=desc, enabled=progress)
    with training_module(model, net, device) as train_model, bar:
        train_model.train()
        try:
            for epoch in range(recipe.epochs):
                _set_epoch(train_loader, epoch)
                lr = optimizer.param_groups[0]["lr"]
                start = time.perf_counter()
                loss_sum, correct, samples, batches, ended = _train_epoch(
                    train_model, train_loader, optimizer, scaler, criterion, device, use_amp, epoch, recipe.max_batches, bar,
                    regularizer, end,
                )
                loss_sum, correct, samples = sum_over_ranks([loss_sum, correct, samples], device)
                if samples == 0:
                    raise ValueError(f"the loader gave no batches in epoch {epoch}; nothing to train on")
                scheduler.step()
                seconds = max_over_ranks(time.perf_counter() - start, device)
                record = {
                    "epoch": epoch,
                    "lr": lr,
                    "loss": loss_sum / samples,
                    "accuracy": 100.0 * correct / samples,
                    "samples": int(samples),
                    "batches": batches,
                    "seconds": seconds,
                }
                if ended:
                    record.update({ended: True, "fraction": None if steps is None else batches / steps})
                history.append(record)
                bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
                if on_epoch_end is not None:
                    on_epoch_end(record)
                if ended:
                    break
        finally:
            net.train(was_training)
            # gradients of the last step would only hold memory through the measuring pass that follows
            optimizer.zero_grad(set_to_none=True)
    return history


def _train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    device: torch.device,
    use_amp: bool,
    epoch: int,
    max_batches: Optional[int],
    bar: tqdm,
    regularizer: Optional[Callable[[], Tensor]],
    end: Callable[[], str],
) -> tuple[Tensor, Tensor, Tensor, int, str]:
    """One pass, until ``end()`` gives a reason after a batch; returns this rank's summed loss,
    correct count and sample count (on the device), its batch count, and the reason ("" when the
    pass ran out)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    samples = batches = 0  # known on the host without a sync
    for index, batch in enumerate(itertools.islice(loader, max_batches)):
        inputs, targets = _split_batch(batch, device)
        with autocast(device, use_amp):
            logits = model(inputs)
            loss = criterion(logits, targets)
            if regularizer is not None:
                loss = loss + regularizer()
        _check_finite(loss, epoch, index)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = targets.numel()
        loss_sum += loss.detach().double() * n
        correct += _correct(logits.detach(), targets)
        samples += n
        bar.update()
        batches = index + 1
        ended = end()
        if ended:
            return loss_sum, correct, _samples(samples, device), batches, ended
    return loss_sum, correct, _samples(samples, device), batches, ""


def _check_finite(loss: Tensor, epoch: int, batch: int) -> None:
    """Raises :class:`NonFiniteLossError` on every rank when the loss is non-finite on any of them.

    All ranks must agree: a rank that went on to ``backward`` alone would wait forever in DDP's
    gradient all-reduce. That costs one small collective per batch, under distributed only.
    """
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if world_size() > 1:
        finite = finite.to(collective_device(loss.device))
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise NonFiniteLossError(epoch, batch, float(loss.detach()))


def _set_epoch(loader: Iterable, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)


# -- evaluation ----------------------------------------------------------------------------------
def evaluate(model: nn.Module, loader: Iterable, *, device: Device = None, amp: bool = False) -> float:
    """Top-1 accuracy in percent, in eval mode without gradients.

    Correct and total counts accumulate on the device and reach the host once. Under
    ``torch.distributed`` they are summed over the ranks, so every rank returns the accuracy over
    the union of the ranks' data, whatever the shards' sizes (each rank may run a different number
    of batches: the forward runs on the bare module, with no collective per batch).

    Args:
        model: the module (or a DDP wrapper of it); its training flag is restored.
        loader: iterable of ``(input, target)`` batches; targets are class indices, of the logits'
            shape without dim 1 (``(N,)`` for classification, ``(N, H, W)`` for segmentation).
        device: where batches go; default: the model's parameters' device.
        amp: float16 autocast on CUDA; ignored on CPU.

    Returns:
        ``100 * correct / total``.

    Raises:
        TypeError: a batch is not an ``(input, target)`` pair of tensors.
        ValueError: no targets at all (on every rank).
    """
    net = unwrap_ddp(model)
    device = torch.device(device) if device is not None else model_device(net)
    use_amp = amp and device.type == "cuda"
    correct = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), autocast(device, use_amp):
            for batch in loader:
                inputs, targets = _split_batch(batch, device)
                correct += _correct(net(inputs), targets)
                total += targets.numel()
    finally:
        net.train(was_training)
    correct_all, total_all = sum_over_ranks([correct, torch.tensor(float(total), dtype=torch.float64, device=device)], device)
    if total_all == 0:
        raise ValueError("the loader gave no targets; nothing to evaluate")
    return 100.0 * correct_all / total_all


def recalibrate_batchnorm(model: nn.Module, loader: Iterable, *, max_batches: Optional[int] = None,
                          device: Device = None) -> int:
    """Re-estimates every BatchNorm layer's running mean and variance from training batches,
    without gradients and without changing a parameter (:func:`torch.optim.swa_utils.update_bn`).

    Linearizing a site changes what the layers after it see: their running statistics, kept from
    before, then normalize with the wrong mean and variance. Re-estimating them is a forward pass
    over a few batches, and recovers much of what a finetune would (Li et al. 2016, "Revisiting
    batch normalization for practical domain adaptation").

    Under ``torch.distributed`` every rank passes its own batches and the statistics are then
    averaged over the ranks, so that the ranks' models stay identical (with the same number of
    batches on every rank the mean is the pooled one; the variance is the mean of the ranks').

    Args:
        model: the module (or a DDP wrapper of it), changed in place; its training flag is restored.
        loader: iterable of ``(input, target)`` batches (or inputs).
        max_batches: use at most this many batches (default: all).
        device: where batches go; default: the model's parameters' device.

    Returns:
        the number of BatchNorm layers re-estimated (0: the model has none, nothing ran).

    Raises:
        ValueError: ``max_batches`` is not an int >= 1 (or None), or the loader gave no batch (on
            some rank); the statistics are then left as they were.
    """
    if max_batches is not None and not (is_int(max_batches) and max_batches >= 1):
        raise ValueError(f"max_batches must be an int >= 1 (or None for every batch), got {max_batches!r}")
    net = unwrap_ddp(model)
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    device = torch.device(device) if device is not None else model_device(net)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    seen = 0

    def counted(batches):
        nonlocal seen
        for batch in batches:
            seen += 1
            yield batch

    update_bn(counted(loader if max_batches is None else itertools.islice(loader, max_batches)), net, device)
    if min_over_ranks(seen, device) == 0:
        for m, state in zip(layers, before):
            m.load_state_dict(state)
        raise ValueError("recalibrate_batchnorm: the loader gave no batch (on at least one rank); the statistics are unchanged")
    if world_size() > 1:
        stats = torch.cat([t for m in layers for t in (m.running_mean, m.running_var)]).to(collective_device(device))
        dist.all_reduce(stats)
        stats /= world_size()
        parts = stats.split([m.running_mean.numel() for m in layers for _ in range(2)])
        for m, mean, var in zip(layers, parts[0::2], parts[1::2]):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return len(layers)


# -- helpers -------------------------------------------------------------------------------------
def _samples(count: int, device: torch.device) -> Tensor:
    return torch.tensor(float(count), dtype=torch.float64, device=device)


def _correct(logits: Tensor, targets: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == targets).sum().double()


def _split_batch(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"expected each batch to be an (input, target) tuple or list, got {type(batch).__name__}")
    inputs, targets = batch[0], batch[1]
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"expected tensors for input and target, got {type(inputs).__name__} and {type(targets).__name__}")
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


# LambdaLR schedulers pickled by earlier versions name the constant schedule by this path
_constant = constant_lr

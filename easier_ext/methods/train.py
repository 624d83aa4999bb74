"""Finetuning and evaluation: the FINETUNE and EVALUATE steps of the EASIER schedule.

EASIER repeats: measure every site's entropy, linearize the lowest-entropy one, finetune, evaluate.
Each finetune starts from a fresh optimizer and learning-rate schedule, as the paper does after
every linearization. The paper's recipe is SGD with momentum 0.9, weight decay 1e-4 (5e-4 on small
data sets), learning rate 0.1 for ResNet/MobileNet and 0.01 for VGG, decayed x0.1 at 50% and 75%
of the epochs; AdamW and a cosine schedule are offered as alternatives.

Both :func:`finetune` and :func:`evaluate` work alone or under an initialized
``torch.distributed`` process group, where every rank must call them (they are collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from easier_ext.core.checks import is_real
from easier_ext.core.modules import EntropyActivation

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "NonFiniteLossError",
    "Recipe",
    "evaluate",
    "finetune",
    "make_optimizer",
    "make_scheduler",
]

#: optimizers a :class:`Recipe` can name
OPTIMIZERS = ("sgd", "adamw")
#: learning-rate schedules a :class:`Recipe` can name
SCHEDULES = ("multistep", "cosine", "constant")

Device = Union[str, torch.device, None]


# -- the recipe ----------------------------------------------------------------------------------
@dataclass
class Recipe:
    """How to finetune: optimizer, learning-rate schedule and loss.

    The defaults are the paper's small-data recipe with VGG's learning rate; use ``lr=0.1`` and
    ``weight_decay=1e-4`` for ResNet/MobileNet on ImageNet-sized data.

    Args:
        epochs: passes over the training data.
        lr: the initial learning rate.
        optimizer: one of :data:`OPTIMIZERS`.
        momentum: SGD's momentum (AdamW keeps its default betas).
        weight_decay: SGD's L2 penalty, or AdamW's decoupled decay.
        schedule: one of :data:`SCHEDULES`. ``"multistep"`` multiplies the learning rate by
            ``gamma`` at the start of each epoch ``floor(f * epochs)`` (0-based, at least 1) for
            ``f`` in ``milestones``; ``"cosine"`` anneals it to 0 over ``epochs``
            (``lr * (1 + cos(pi * epoch / epochs)) / 2``); ``"constant"`` keeps it.
        milestones: fractions of ``epochs``, strictly increasing, each in ``(0, 1]``
            (``"multistep"`` only).
        gamma: the multistep decay factor, in ``(0, 1]``.
        label_smoothing: cross-entropy label smoothing, in ``[0, 1)``.
        amp: float16 autocast with a gradient scaler on CUDA; ignored on CPU, where float16
            matmuls are slow and bfloat16 would change the numerics of a finetune that must
            recover accuracy.
        max_batches: stop each epoch after this many batches (per rank), for quick runs.

    Raises:
        ValueError: a field out of range or of the wrong type; the message names the field, the
            value and what is expected.
    """

    epochs: int = 10
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: bool = True
    max_batches: Optional[int] = None

    def __post_init__(self) -> None:
        # Milestones read back from a JSON log arrive as a list; a tuple keeps the dataclass
        # comparable and hashable-looking, and a bad element is reported by the check below.
        if isinstance(self.milestones, (list, tuple)):
            self.milestones = tuple(self.milestones)
        _check("epochs", self.epochs, _is_int(self.epochs) and self.epochs >= 1, "an int >= 1")
        _check("lr", self.lr, is_real(self.lr) and self.lr > 0, "a finite number > 0")
        _check("optimizer", self.optimizer, self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
        _check("momentum", self.momentum, is_real(self.momentum) and 0 <= self.momentum < 1, "a number in [0, 1)")
        _check("weight_decay", self.weight_decay, is_real(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0")
        _check("schedule", self.schedule, self.schedule in SCHEDULES, f"one of {SCHEDULES}")
        _check("milestones", self.milestones, _valid_milestones(self.milestones), "a tuple of strictly increasing fractions in (0, 1]")
        _check("gamma", self.gamma, is_real(self.gamma) and 0 < self.gamma <= 1, "a number in (0, 1]")
        smoothing = self.label_smoothing
        _check("label_smoothing", smoothing, is_real(smoothing) and 0 <= smoothing < 1, "a number in [0, 1)")
        _check("amp", self.amp, isinstance(self.amp, bool), "a bool")
        cap = self.max_batches
        _check("max_batches", cap, cap is None or (_is_int(cap) and cap >= 1), "None or an int >= 1")

    def as_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON values; ``Recipe(**recipe.as_dict()) == recipe``.

        Returns:
            ``{field: value}``, with ``milestones`` as a list.
        """
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        return out


def _check(field: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"Recipe.{field} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but epochs=True is a mistake, not 1 epoch
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_milestones(milestones: Any) -> bool:
    if not isinstance(milestones, tuple) or not all(is_real(f) and 0 < f <= 1 for f in milestones):
        return False
    return all(a < b for a, b in zip(milestones, milestones[1:]))


def _milestone_epochs(recipe: Recipe) -> list[int]:
    # The epsilon absorbs float error such as 0.29 * 100 == 28.999999999999996; the floor of 1
    # keeps a decay from firing before the first epoch has trained at the full learning rate.
    return [max(1, math.floor(f * recipe.epochs + 1e-9)) for f in recipe.milestones]


# -- optimizer and schedule ----------------------------------------------------------------------
def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """A new optimizer over the model's trainable parameters.

    Weight decay applies to every parameter, biases and normalization weights included, as in the
    paper's recipe.

    Args:
        model: the module to train (or a DDP wrapper of it).
        recipe: the optimizer, learning rate, momentum and weight decay to use.

    Returns:
        ``torch.optim.SGD`` or ``torch.optim.AdamW`` with empty state.

    Raises:
        TypeError: ``recipe`` is not a :class:`Recipe`.
        ValueError: the model has no parameter that requires grad.
    """
    _require_recipe(recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters that require grad; nothing to finetune")
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """A new learning-rate schedule for ``optimizer``, stepped ``steps_per_epoch`` times an epoch.

    With ``steps_per_epoch=1`` (what :func:`finetune` uses) the learning rate changes between
    epochs; with the number of batches it changes every batch, smoothly for ``"cosine"``. Either
    way the learning rate at the start of each epoch is the one the recipe describes.

    Args:
        optimizer: the optimizer whose learning rate to drive; its current ``lr`` is the base.
        recipe: the schedule, milestones, gamma and epochs to use.
        steps_per_epoch: how often :meth:`step` will be called per epoch.

    Returns:
        ``MultiStepLR``, ``CosineAnnealingLR`` or a constant ``LambdaLR``.

    Raises:
        TypeError: ``recipe`` is not a :class:`Recipe`.
        ValueError: ``steps_per_epoch`` is not an int >= 1.
    """
    _require_recipe(recipe)
    if not _is_int(steps_per_epoch) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    sched = torch.optim.lr_scheduler
    if recipe.schedule == "multistep":
        milestones = [m * steps_per_epoch for m in _milestone_epochs(recipe)]
        return sched.MultiStepLR(optimizer, milestones=milestones, gamma=recipe.gamma)
    if recipe.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch, eta_min=0.0)
    return sched.LambdaLR(optimizer, _constant)


def _constant(step: int) -> float:
    # a module-level function rather than a lambda, so that the scheduler pickles
    return 1.0


def _require_recipe(recipe: Any) -> None:
    if not isinstance(recipe, Recipe):
        raise TypeError(f"expected an easier_ext.methods.train.Recipe, got {type(recipe).__name__}")


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

    Returns:
        one record per epoch: ``epoch`` (0-based), ``lr`` (the epoch's learning rate), ``loss``
        (mean per-sample training loss), ``accuracy`` (training top-1 in percent, measured while the
        model trained), ``samples`` (targets seen, all ranks) and ``seconds`` (wall time, the
        slowest rank's).

    Raises:
        TypeError: ``recipe`` is not a :class:`Recipe`, or a batch is not an ``(input, target)``
            pair of tensors.
        ValueError: the model has nothing to train, or an epoch gave no batches on any rank.
        NonFiniteLossError: the loss became NaN or infinite (on any rank); the parameters are those
            after the last finite step, but BatchNorm running statistics have seen the failing
            batch's forward.
    """
    _require_recipe(recipe)
    net = _unwrap(model)
    device = torch.device(device) if device is not None else _model_device(net)
    use_amp = recipe.amp and device.type == "cuda"
    # Fresh state on every call: the paper restarts the optimizer and the schedule after each
    # linearization, and momentum from the pre-linearization network would point the wrong way.
    optimizer = make_optimizer(net, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    steps = _batches_per_epoch(train_loader, recipe.max_batches)

    history: list[dict[str, Any]] = []
    was_training = net.training
    bar = _progress_bar(None if steps is None else steps * recipe.epochs, desc, progress)
    with _distributed(model, net, device) as train_model, bar:
        train_model.train()
        try:
            for epoch in range(recipe.epochs):
                _set_epoch(train_loader, epoch)
                lr = optimizer.param_groups[0]["lr"]
                start = time.perf_counter()
                loss_sum, correct, samples = _train_epoch(
                    train_model, train_loader, optimizer, scaler, criterion, device, use_amp, epoch, recipe.max_batches, bar
                )
                loss_sum, correct, samples = _sum_over_ranks([loss_sum, correct, samples], device)
                if samples == 0:
                    raise ValueError(f"the loader gave no batches in epoch {epoch}; nothing to train on")
                scheduler.step()
                seconds = _max_over_ranks(time.perf_counter() - start, device)
                record = {
                    "epoch": epoch,
                    "lr": lr,
                    "loss": loss_sum / samples,
                    "accuracy": 100.0 * correct / samples,
                    "samples": int(samples),
                    "seconds": seconds,
                }
                history.append(record)
                bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
                if on_epoch_end is not None:
                    on_epoch_end(record)
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
) -> list[Tensor]:
    """One pass; returns this rank's summed loss, correct count and sample count, on the device."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0  # known on the host without a sync
    for index, batch in enumerate(itertools.islice(loader, max_batches)):
        inputs, targets = _split_batch(batch, device)
        with _autocast(device, use_amp):
            logits = model(inputs)
            loss = criterion(logits, targets)
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
    return [loss_sum, correct, torch.tensor(float(samples), dtype=torch.float64, device=device)]


def _check_finite(loss: Tensor, epoch: int, batch: int) -> None:
    """Raises :class:`NonFiniteLossError` on every rank when the loss is non-finite on any of them.

    All ranks must agree: a rank that went on to ``backward`` alone would wait forever in DDP's
    gradient all-reduce. That costs one small collective per batch, under distributed only.
    """
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if _world_size() > 1:
        finite = finite.to(_collective_device(loss.device))
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise NonFiniteLossError(epoch, batch, float(loss.detach()))


@contextlib.contextmanager
def _distributed(model: nn.Module, net: nn.Module, device: torch.device):
    """Yields the module to train: ``model`` itself, or a DDP wrapper of it made for this call.

    A wrapper made here has its autograd hooks removed on exit, so that the bare module trains
    normally afterwards and a later call can wrap it again.
    """
    if isinstance(model, DistributedDataParallel) or _world_size() == 1:
        yield model
        return
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    ddp = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=_has_unused_parameters(net))
    try:
        yield ddp
    finally:
        remove = getattr(ddp, "_remove_autograd_hooks", None)  # private, hence guarded
        if remove is not None:
            remove()
        del ddp


def _has_unused_parameters(net: nn.Module) -> bool:
    # A linearized PReLU keeps its slope parameter but no longer uses it; DDP would wait for its
    # gradient forever unless told to look for unused parameters (which costs a graph traversal
    # per step, so only when needed).
    return any(
        isinstance(m, EntropyActivation) and m.linearized and any(p.requires_grad for p in m.parameters())
        for m in net.modules()
    )


def _set_epoch(loader: Iterable, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)


def _batches_per_epoch(loader: Iterable, max_batches: Optional[int]) -> Optional[int]:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


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
    net = _unwrap(model)
    device = torch.device(device) if device is not None else _model_device(net)
    use_amp = amp and device.type == "cuda"
    correct = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), _autocast(device, use_amp):
            for batch in loader:
                inputs, targets = _split_batch(batch, device)
                correct += _correct(net(inputs), targets)
                total += targets.numel()
    finally:
        net.train(was_training)
    correct_all, total_all = _sum_over_ranks([correct, torch.tensor(float(total), dtype=torch.float64, device=device)], device)
    if total_all == 0:
        raise ValueError("the loader gave no targets; nothing to evaluate")
    return 100.0 * correct_all / total_all


# -- helpers -------------------------------------------------------------------------------------
def _correct(logits: Tensor, targets: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == targets).sum().double()


def _split_batch(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"expected each batch to be an (input, target) tuple or list, got {type(batch).__name__}")
    inputs, targets = batch[0], batch[1]
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"expected tensors for input and target, got {type(inputs).__name__} and {type(targets).__name__}")
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast("cuda", dtype=torch.float16) if enabled else contextlib.nullcontext()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _model_device(net: nn.Module) -> torch.device:
    for t in itertools.chain(net.parameters(), net.buffers()):
        return t.device
    return torch.device("cpu")


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device(device: torch.device) -> torch.device:
    # nccl only moves CUDA tensors; gloo takes either
    if dist.get_backend() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _sum_over_ranks(values: list[Tensor], device: torch.device) -> list[float]:
    """Sums scalars over the ranks in one collective; one host sync."""
    stacked = torch.stack([v.to(device, torch.float64) for v in values])
    if _world_size() > 1:
        stacked = stacked.to(_collective_device(device))
        dist.all_reduce(stacked)
    return stacked.tolist()


def _max_over_ranks(value: float, device: torch.device) -> float:
    if _world_size() == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _progress_bar(total: Optional[int], desc: str, enabled: bool) -> tqdm:
    rank0 = _world_size() == 1 or dist.get_rank() == 0
    return tqdm(total=total, desc=desc, unit="batch", disable=not (enabled and rank0), leave=False)

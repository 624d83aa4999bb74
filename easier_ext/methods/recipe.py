"""The finetune recipe: its fields and their checks, and the optimizer and learning-rate schedule
it describes.

The paper's recipe is SGD with momentum 0.9, weight decay 1e-4 (5e-4 on small data sets), learning
rate 0.1 for ResNet/MobileNet and 0.01 for VGG, decayed x0.1 at 50% and 75% of the epochs; AdamW and
a cosine schedule are offered as alternatives. :func:`easier_ext.finetune` builds a fresh optimizer
and schedule from a :class:`Recipe` on every call.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from easier_ext.core.checks import is_int, is_real

__all__ = ["OPTIMIZERS", "SCHEDULES", "Recipe", "make_optimizer", "make_scheduler", "require_recipe"]

#: optimizers a :class:`Recipe` can name
OPTIMIZERS = ("sgd", "adamw")
#: learning-rate schedules a :class:`Recipe` can name
SCHEDULES = ("multistep", "cosine", "constant")


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
        _check("epochs", self.epochs, is_int(self.epochs) and self.epochs >= 1, "an int >= 1")
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
        _check("max_batches", cap, cap is None or (is_int(cap) and cap >= 1), "None or an int >= 1")

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
    require_recipe(recipe)
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
    require_recipe(recipe)
    if not is_int(steps_per_epoch) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    sched = torch.optim.lr_scheduler
    if recipe.schedule == "multistep":
        milestones = [m * steps_per_epoch for m in _milestone_epochs(recipe)]
        return sched.MultiStepLR(optimizer, milestones=milestones, gamma=recipe.gamma)
    if recipe.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch, eta_min=0.0)
    return sched.LambdaLR(optimizer, constant_lr)


def constant_lr(step: int) -> float:
    """The ``"constant"`` schedule's factor: a module-level function rather than a lambda, so that
    the scheduler pickles.

    Args:
        step: the step (unused).

    Returns:
        1.0.
    """
    return 1.0


def require_recipe(recipe: Any) -> None:
    """Refuses anything but a :class:`Recipe`, such as a dict of its fields.

    Args:
        recipe: what the caller was given as the recipe.

    Raises:
        TypeError: ``recipe`` is not a :class:`Recipe`.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"expected an easier_ext.Recipe, got {type(recipe).__name__}")

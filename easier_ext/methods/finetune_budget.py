"""A run's budget of finetune epochs (``max_finetune_epochs``): what it holds in batches, what is
left of it after the iterations so far, and what a run that spent it says."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from easier_ext.core.runtime import batch_count
from easier_ext.methods.options import OptionError
from easier_ext.methods.recipe import Recipe
from easier_ext.methods.results import finetune_epochs

__all__ = ["batches_left", "check_finetune_budget", "spent_reason"]


def check_finetune_budget(epochs: Optional[float], train_loader: Iterable, recipe: Recipe) -> None:
    """Refuses a budget whose batches cannot be counted or that holds none (before a run starts).

    Args:
        epochs: ``max_finetune_epochs`` (None: no budget, nothing to check).
        train_loader: the run's training batches.
        recipe: the finetune recipe (its ``max_batches`` caps an epoch).

    Raises:
        OptionError: the loader has no length and the recipe no ``max_batches``, or the budget is
            less than one batch.
    """
    if epochs is None:
        return
    per_epoch = batch_count(train_loader, recipe.max_batches)
    if per_epoch is None:
        raise OptionError("max_finetune_epochs", epochs, "None with a training loader without a length and a recipe "
                                                         "without max_batches (its epochs cannot be counted)")
    if _batches(epochs, per_epoch) < 1:
        raise OptionError("max_finetune_epochs", epochs, f"at least one batch of finetuning: >= 1/{per_epoch} epochs with "
                                                         f"{per_epoch} batches an epoch")


def batches_left(epochs: Optional[float], train_loader: Iterable, recipe: Recipe, trajectory: list[dict]) -> Optional[int]:
    """What is left of the budget after the iterations so far.

    Args:
        epochs: ``max_finetune_epochs`` (None: no budget); checked by :func:`check_finetune_budget`.
        train_loader, recipe: as there.
        trajectory: the run's iteration logs, iteration 0 first.

    Returns:
        the finetune batches the run may still train (>= 0), counted from the epochs
        :func:`~easier_ext.methods.results.finetune_epochs` reports, so that the two never
        disagree; None without a budget.
    """
    if epochs is None:
        return None
    used = finetune_epochs(trajectory)
    if used is None:  # check_finetune_budget refused what would make it unknown (a train_fn, a loader without a length)
        raise RuntimeError("the finetune epochs of the run so far are not known; a budget of them cannot be counted")
    return max(0, _batches(epochs - used, batch_count(train_loader, recipe.max_batches)))


def spent_reason(epochs: float, trajectory: list[dict], iteration: Optional[int] = None, probes: Sequence[dict] = ()) -> str:
    """Why a run stops once its budget is spent.

    Args:
        epochs: ``max_finetune_epochs``.
        trajectory: the run's iteration logs, iteration 0 first.
        iteration: the iteration that stopped it by needing a finetune (None: it stopped before one).
        probes: that iteration's probes (``{"accuracy": ...}`` each), none within the accuracy budget.

    Returns:
        the sentence for ``ScheduleResult.stopped``: the epochs spent, of the budget, and which
        iteration would have needed more.
    """
    reason = f"spent the finetune budget: {finetune_epochs(trajectory):.4g} of max_finetune_epochs={epochs:.4g} epochs"
    if iteration is not None:
        tried = ", ".join(f"{p['accuracy']:.2f}" for p in probes)
        reason += f"; iteration {iteration} would need a finetune" + (f" (its probes: {tried})" if tried else "")
    return reason


def _batches(epochs: float, per_epoch: int) -> int:
    # rounded first, so that 0.29 epochs of 100 batches are 29 batches, not 28.999...
    return math.floor(round(epochs * per_epoch, 9))

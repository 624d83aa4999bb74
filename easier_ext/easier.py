"""The EASIER schedule: measure every site's entropy, linearize the lowest, finetune, evaluate,
repeat while the accuracy stays within a budget; then fold."""

from __future__ import annotations

import copy
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from easier_ext.convert import sites
from easier_ext.linearize import linearize, mergeable_layers
from easier_ext.schedule import Schedule, ScheduleResult, TrainFn
from easier_ext.train import Recipe

__all__ = ["EASIER", "EasierResult"]

#: What :meth:`EASIER.run` returns (see :class:`easier_ext.schedule.ScheduleResult`).
EasierResult = ScheduleResult


class EASIER(Schedule):
    """Iteratively linearizes the lowest-entropy rectifier sites of a trained model.

    Each iteration: measure every remaining site's entropy on the training data (counts over the
    measured batches); linearize the lowest-entropy site and every site at exactly zero entropy
    (an exact 0/1 mask where all neurons were constant); finetune with a fresh optimizer; evaluate.
    It stops when the accuracy drops by more than ``budget`` points below the dense model, when no
    site is left, or after ``max_iterations``; the model with the most sites removed within the
    budget is folded and returned.

    Args:
        model: a trained model (converted here when it has no sites yet; not modified).
        train_loader: batches of ``(input, target)`` for measuring and finetuning.
        val_loader: batches of ``(input, target)`` for the accuracy.
        example_input: one input batch for folding and for costs (a small batch keeps it quick).
        budget: the largest accepted drop in top-1 points, in ``[0, 100]``.
        recipe: the finetune recipe (:class:`easier_ext.train.Recipe`); ignored with ``train_fn``.
        train_fn: your own finetune: ``train_fn(model, train_loader)``, called in place of ours.
        protect: sites never linearized.
        aggregate: the layer entropy, ``"easier"`` or ``"nepenthe"``.
        measure_batches: batches per measurement (default: the whole loader).
        measure_train_mode: measure in train mode, as the paper does (BatchNorm statistics are
            restored afterwards).
        max_iterations: cap on the iterations.
        patience: go on for this many iterations past the budget before stopping, since a later
            finetune can win accuracy back (the paper removes every site and picks the operating
            point afterwards); the returned model is still the best within the budget.
        fold_aware: among sites within ``fold_tolerance`` bits of the lowest entropy, prefer one
            whose removal lets a merge that pays happen.
        fold_tolerance: see ``fold_aware``.
        run_dir: where logs, checkpoints and the final model go (None: nowhere, no resume).
        resume: continue the run ``run_dir`` holds.
        config: extra JSON-able settings that identify the run (e.g. the CLI's model and data).
        latency: measure the CPU latency of each iteration's folded model.
        device: where to run (default: the model's device).
        seed: seeds torch, Python and NumPy at the start.
        progress: progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable,
        *,
        example_input: torch.Tensor,
        budget: float = 1.0,
        recipe: Optional[Recipe] = None,
        train_fn: Optional[TrainFn] = None,
        protect: Sequence[str] = (),
        aggregate: str = "easier",
        measure_batches: Optional[int] = None,
        measure_train_mode: bool = True,
        max_iterations: Optional[int] = None,
        patience: int = 0,
        fold_aware: bool = False,
        fold_tolerance: float = 0.02,
        run_dir=None,
        resume: bool = False,
        config: Optional[dict] = None,
        latency: bool = True,
        device=None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.fold_aware, self.fold_tolerance = fold_aware, fold_tolerance
        super().__init__(
            model, train_loader, val_loader, example_input=example_input, budget=budget, recipe=recipe, train_fn=train_fn,
            protect=protect, aggregate=aggregate, measure_batches=measure_batches, measure_train_mode=measure_train_mode,
            max_iterations=max_iterations, patience=patience, run_dir=run_dir, resume=resume, config=config, latency=latency,
            device=device, seed=seed, progress=progress, settings={"method": "easier", "fold_aware": fold_aware, "fold_tolerance": fold_tolerance},
        )

    def _step(self, model: nn.Module, entropies: dict[str, float]) -> dict:
        chosen = self._choose(model, entropies)
        linearize(model, chosen)
        return {"removed": chosen}

    def _choose(self, model: nn.Module, entropies: dict[str, float]) -> list[str]:
        """The lowest-entropy site (fold-aware: a nearly as low one that lets a merge pay) and
        every site at zero entropy."""
        candidates = sorted((h, n) for n, h in entropies.items() if n not in self.protect)
        lowest = candidates[0][1]
        if self.fold_aware:
            near = [n for h, n in candidates if h <= candidates[0][0] + self.fold_tolerance]
            lowest = next((n for n in near if _enables_merge(model, n)), lowest)
        zero = [n for h, n in candidates if h == 0.0]
        return [lowest] + [n for n in zero if n != lowest]


def _enables_merge(model: nn.Module, name: str) -> bool:
    """Whether linearizing ``name`` would let more layers be merged away."""
    trial = copy.deepcopy(model)
    sites(trial)[name].linearize()
    return mergeable_layers(trial) > mergeable_layers(model)

"""The EASIER schedule: measure every site's entropy, linearize the lowest, finetune, evaluate,
repeat while the accuracy stays within a budget; then fold."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from torch import nn

from easier_ext.core.checks import is_real
from easier_ext.core.sites import sites
from easier_ext.surgery.linearize import linearize, mergeable_layers
from easier_ext.methods.options import ScheduleOptions, documented, option
from easier_ext.methods.schedule import Schedule, ScheduleResult

__all__ = ["EASIER", "EasierOptions", "EasierResult"]

#: What :meth:`EASIER.run` returns (see :class:`easier_ext.ScheduleResult`).
EasierResult = ScheduleResult


@documented
@dataclass
class EasierOptions(ScheduleOptions):
    """EASIER's options: those of every schedule (:class:`~easier_ext.methods.options.ScheduleOptions`),
    and its own."""

    fold_aware: bool = option(False, help="among sites within fold_tolerance bits of the lowest entropy, prefer one whose "
                                          "removal lets a merge that pays happen", cli=True)
    fold_tolerance: float = option(0.02, help="how many bits above the lowest entropy a fold-aware choice may be", cli=True,
                                   check=lambda v: is_real(v) and v >= 0, expected="a number of bits >= 0", convert=float)


class EASIER(Schedule):
    """Iteratively linearizes the lowest-entropy rectifier sites of a trained model.

    Each iteration: measure every remaining site's entropy on the training data (counts over the
    measured batches); linearize the lowest-entropy site and every site at exactly zero entropy
    (an exact 0/1 mask where all neurons were constant); finetune with a fresh optimizer; evaluate.
    It stops when the accuracy drops by more than ``budget`` points below the dense model, when no
    site is left, or after ``max_iterations``; the model with the most sites removed within the
    budget is folded and returned.

    Args:
        model, train_loader, val_loader, example_input, options, keywords: see
            :class:`easier_ext.methods.schedule.Schedule`; the options are :class:`EasierOptions`.
    """

    Options = EasierOptions

    def _step(self, model: nn.Module, entropies: dict[str, float]) -> Optional[dict]:
        chosen = self._choose(model, entropies)
        if not chosen:
            return None
        linearize(model, chosen)
        return {"removed": chosen}

    def _choose(self, model: nn.Module, entropies: dict[str, float]) -> list[str]:
        """The lowest-entropy site (fold-aware: a nearly as low one that lets a merge pay) and
        every site at zero entropy; none when no unprotected site was measured (a site that
        never ran has no entropy, see :func:`easier_ext.measure_entropy`)."""
        candidates = sorted((h, n) for n, h in entropies.items() if n not in self.options.protect)
        if not candidates:
            return []
        lowest = candidates[0][1]
        if self.options.fold_aware:
            near = [n for h, n in candidates if h <= candidates[0][0] + self.options.fold_tolerance]
            lowest = next((n for n in near if _enables_merge(model, n)), lowest)
        zero = [n for h, n in candidates if h == 0.0]
        return [lowest] + [n for n in zero if n != lowest]


def _enables_merge(model: nn.Module, name: str) -> bool:
    """Whether linearizing ``name`` would let more layers be merged away."""
    trial = copy.deepcopy(model)
    sites(trial)[name].linearize()
    return mergeable_layers(trial) > mergeable_layers(model)

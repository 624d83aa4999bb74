"""What a schedule returns (:class:`ScheduleResult`) and its JSON summary (``summary.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from easier_ext.surgery.costs import Cost, LatencyComparison

__all__ = ["ScheduleResult", "finetune_epochs", "summary"]


@dataclass
class ScheduleResult:
    """What an EASIER or NEPENTHE run returns.

    Attributes:
        model: the best model (most sites removed within the budget), folded: standard torch
            layers only.
        linearized: the same model before folding (easier_ext sites, linearized ones marked;
            NEPENTHE: with its sparse weights, the pruning made permanent).
        removed: the sites it linearized, in the order they were removed.
        dense_accuracy: top-1 (%) of the model before any removal.
        accuracy: top-1 (%) of the returned model (before folding; folding is exact).
        before, after: cost of the dense (BatchNorm folded) and of the returned model.
        trajectory: every iteration's log (see the run directory's ``iterations/``).
        stopped: why the loop ended.
        sparsity: NEPENTHE: the fraction of zero weights in the layers that feed sites, in the
            returned model before folding; None for EASIER.
        latency: the dense and the returned model (both folded) timed in paired rounds
            (:func:`easier_ext.compare_latency`), which ``before.latency_s`` and
            ``after.latency_s`` come from; None when latency is not measured.
        unmerged: why chains that would pay were left unmerged by the final fold (fold's
            warnings, e.g. convs whose padding was not moved before the last finetune).
        example_images: the batch size of the example input the costs were measured on (MACs
            and latencies are of that batch), when it has one.
    """

    model: nn.Module
    linearized: nn.Module
    removed: list[str]
    dense_accuracy: float
    accuracy: float
    before: Cost
    after: Cost
    trajectory: list[dict] = field(default_factory=list)
    stopped: str = ""
    sparsity: Optional[float] = None
    latency: Optional[LatencyComparison] = None
    unmerged: list[str] = field(default_factory=list)
    example_images: Optional[int] = None


def summary(result: ScheduleResult) -> dict:
    """The run's outcome as JSON-able data: accuracies, sites removed, costs before and after, why
    it stopped, the finetune epochs all iterations spent, and NEPENTHE's sparsity."""
    out = {
        "dense_accuracy": result.dense_accuracy, "accuracy": result.accuracy, "removed": result.removed,
        "before": result.before.as_dict(), "after": result.after.as_dict(), "stopped": result.stopped,
        # the costs' example input, whose batch MACs and latencies are of
        "example_images": result.example_images,
        # what the whole run cost, past the returned iteration too (unknown with a train_fn)
        "finetune_epochs": finetune_epochs(result.trajectory),
    }
    if result.sparsity is not None:
        out["sparsity"] = result.sparsity
    if result.latency is not None:
        out["latency"] = result.latency.as_dict()
    if result.unmerged:
        out["unmerged"] = result.unmerged
    return out


def finetune_epochs(trajectory: list[dict]) -> Optional[float]:
    """The finetune epochs a run spent, past its returned iteration and on undone ones too.

    Args:
        trajectory: the run's iteration logs, iteration 0 first.

    Returns:
        the epochs every iteration's finetune ran (a probed iteration kept with none ran 0; one
        ended early by ``early_stop`` or ``max_finetune_epochs`` counts the part of its last epoch
        it ran); None when that is not known (a train_fn finetuned, or a loader without a length
        was stopped early).
    """
    finetuned = [log for log in trajectory[1:] if log.get("finetuned", True)]
    if not all(log["finetune"] for log in finetuned):
        return None
    parts = [record.get("fraction", 1) for log in finetuned for record in log["finetune"]]
    return None if None in parts else sum(parts)

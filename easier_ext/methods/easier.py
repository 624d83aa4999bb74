"""The EASIER schedule: measure every site's entropy, linearize the lowest, finetune, evaluate,
repeat while the accuracy stays within a budget; then fold."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from torch import nn

from easier_ext.core.checks import is_int, is_real
from easier_ext.core.sites import sites
from easier_ext.surgery.linearize import linearize, mergeable_layers
from easier_ext.methods.options import ScheduleOptions, documented, option
from easier_ext.methods.schedule import Schedule, ScheduleResult
from easier_ext.methods.train import evaluate, recalibrate_batchnorm

__all__ = ["EASIER", "EasierOptions", "EasierResult", "sites_per_step"]

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
    sites_per_step: Union[int, str] = option(
        1, help="sites linearized per iteration: N, or 'auto' (1, doubled after every iteration within the budget); an "
                "iteration of several sites that ends over the budget is undone and the number halved, never to grow again "
                "(with probe, which finetunes one site at a time, none is undone)",
        cli=True, metavar="N|auto", check=lambda v: v == "auto" or (is_int(v) and v >= 1), expected="an int >= 1 or 'auto'",
        cli_type=lambda text: int(text) if text.isdigit() else text, recorded_if_set=True)
    entropy_weight: float = option(
        0.0, help="lambda: the finetune adds lambda times the mean entropy proxy of the regularized sites to the loss, "
                  "pushing their pre-activations to one side of zero before they are linearized (0: off)",
        cli=True, check=lambda v: is_real(v) and v >= 0, expected="a number >= 0", convert=float, recorded_if_set=True)
    entropy_tau: float = option(
        1.0, help="the proxy's temperature: each value z counts as ON with probability sigmoid(z / tau)",
        cli=True, check=lambda v: is_real(v) and v > 0, expected="a number > 0", convert=float, recorded_if_set=True)
    probe: bool = option(
        False, help="before a finetune, try the iteration's sites, then half as many, down to one, on a copy with its BatchNorm "
                    "statistics re-estimated on the measured batches: the first within the budget is kept with no finetune "
                    "(forward passes over the measured training batches and the validation set instead of an epoch); when "
                    "none is, it finetunes the lowest site alone, from its re-estimated statistics",
        cli=True, recorded_if_set=True)
    regularize: str = option("next", help="which sites the regularizer pushes: the next ones to be linearized (as many "
                                          "as the iteration removed) or all remaining ones",
                             cli=True, choices=("next", "all"), what="regularized site set", recorded_if_set=True)


class EASIER(Schedule):
    """Iteratively linearizes the lowest-entropy rectifier sites of a trained model.

    Each iteration: measure every remaining site's entropy on the training data (counts over the
    measured batches); linearize the lowest-entropy site and every site at exactly zero entropy
    (an exact 0/1 mask where all neurons were constant); finetune with a fresh optimizer; evaluate.
    It stops when the accuracy drops by more than ``budget`` points below the dense model, when no
    site is left, or after ``max_iterations``; the model with the most sites removed within the
    budget is folded and returned.

    With ``sites_per_step`` above 1 (or ``"auto"``), an iteration linearizes that many of the
    lowest-entropy sites at once. One that ends within the budget is kept (``"auto"`` then doubles
    the number); one that ends over it is undone: the next iteration starts again from the last
    model kept, with half as many sites, and the number never grows again. At one site per
    iteration the run goes on as plain EASIER (``patience``, then stop). Iterations that were undone
    are in the trajectory (``"undone": True``) and count towards ``max_iterations``.

    With ``probe``, an iteration first tries its sites without a finetune: on a copy, linearized
    and with its BatchNorm statistics re-estimated (:func:`easier_ext.methods.train.recalibrate_batchnorm`),
    evaluated; then half as many, down to one. The first within the budget is kept as it is
    (``"finetuned": False``; ``"auto"`` then doubles the number it kept); every try is logged
    (``"probes"``). When none is, not even the lowest site alone, the iteration linearizes that
    one site (with any at zero entropy, as always) and finetunes it as plain EASIER does (never
    undone: ``patience`` decides), from that site's trial (its re-estimated BatchNorm
    statistics). Every probe is a look at the validation set, which also picks the returned
    model: the more probes, the more its accuracy there is a selected one (hold out a test set
    to report).

    Args:
        model, train_loader, val_loader, example_input, options, keywords: see
            :class:`easier_ext.methods.schedule.Schedule`; the options are :class:`EasierOptions`.
    """

    Options = EasierOptions

    def _step(self, model: nn.Module, entropies: dict[str, float], trajectory: Sequence[dict] = ()) -> Optional[dict]:
        count = sites_per_step(self.options.sites_per_step, trajectory)
        chosen = self._choose(model, entropies, count)
        if not chosen:
            return None
        if not self.options.probe:
            linearize(model, chosen)
            return {"removed": chosen, "sites_per_step": count}
        probes, trial = self._probe(model, entropies, count, chosen, trajectory[0]["val_accuracy"])
        names = probes[-1]["removed"]
        linearize(model, names)  # the same change as the last trial's, whose BatchNorm statistics are then taken
        model.load_state_dict(trial.state_dict())
        if self._within(trajectory[0]["val_accuracy"], probes[-1]["accuracy"]):
            return {"removed": names, "sites_per_step": count, "probes": probes, "finetuned": False,
                    "accuracy": probes[-1]["accuracy"]}
        # even the lowest site alone (with any at zero entropy) was over the budget: more would not end within it either;
        # its finetune starts from the re-estimated statistics, closer to the budget than the old ones
        return {"removed": names, "sites_per_step": count, "probes": probes}

    def _keeps_without_finetune(self) -> bool:
        return self.options.probe

    def _probe(self, model: nn.Module, entropies: dict[str, float], count: int, chosen: list[str],
               dense_accuracy: float) -> tuple[list[dict], nn.Module]:
        """Tries ``chosen`` (the ``count`` lowest sites), then half as many, down to one, each on
        a copy of ``model`` with re-estimated BatchNorm statistics, until one is within the budget.

        Returns:
            each try's ``{"sites_per_step", "removed", "accuracy"}``, and the last try's model:
            the first within the budget, or else the lowest site's alone.
        """
        o = self.options
        probes, names = [], chosen
        while True:
            if not probes or names != probes[-1]["removed"]:  # fewer sites left than asked: the same set, over already
                trial = copy.deepcopy(model)
                linearize(trial, names)
                recalibrate_batchnorm(trial, self.train_loader, max_batches=o.measure_batches, device=o.device)
                accuracy = evaluate(trial, self.val_loader, device=o.device)
                probes.append({"sites_per_step": count, "removed": names, "accuracy": accuracy})
                if self._within(dense_accuracy, accuracy):
                    return probes, trial
            if count == 1:
                return probes, trial
            count //= 2
            names = self._choose(model, entropies, count)

    def _prepare(self, model: nn.Module) -> None:
        o = self.options
        if o.entropy_weight > 0 and o.train_fn is not None:
            raise ValueError("entropy_weight needs the built-in finetune (a recipe): a train_fn cannot add the regularizer to its loss")
        if o.entropy_weight > 0 and not [n for n in sites(model) if n not in o.protect]:
            raise ValueError("entropy_weight > 0 asks for the entropy regularizer, but the model has no unprotected site to regularize")

    def _regularized(self, model: nn.Module, entropies: dict[str, float], step: dict,
                     trajectory: Sequence[dict]) -> tuple[list[str], float, float]:
        o = self.options
        if o.entropy_weight == 0:
            return [], 0.0, o.entropy_tau
        found = sites(model)
        left = sorted((h, n) for n, h in entropies.items() if n not in o.protect and not found[n].linearized)
        names = [n for _, n in left] if o.regularize == "all" else [n for _, n in left[: _kept(step)]]
        return names, o.entropy_weight, o.entropy_tau

    def _undo(self, log: dict, dense_accuracy: float) -> bool:
        """An iteration of several sites over the budget is undone (one of one site is kept, as
        plain EASIER keeps it: ``patience`` decides)."""
        return _kept(log) > 1 and not self._within(dense_accuracy, log["val_accuracy"])

    def _choose(self, model: nn.Module, entropies: dict[str, float], count: int = 1) -> list[str]:
        """The ``count`` lowest-entropy sites (fold-aware: the first is a nearly as low one that
        lets a merge pay) and every site at zero entropy; none when no unprotected site was
        measured (a site that never ran has no entropy, see :func:`easier_ext.measure_entropy`)."""
        candidates = sorted((h, n) for n, h in entropies.items() if n not in self.options.protect)
        if not candidates:
            return []
        lowest = candidates[0][1]
        if self.options.fold_aware:
            near = [n for h, n in candidates if h <= candidates[0][0] + self.options.fold_tolerance]
            lowest = next((n for n in near if _enables_merge(model, n)), lowest)
        others = [n for h, n in candidates if n != lowest]
        zero = [n for h, n in candidates if h == 0.0 and n != lowest]
        chosen = [lowest] + others[: count - 1]
        return chosen + [n for n in zero if n not in chosen]


def sites_per_step(option: Any, trajectory: Sequence[dict]) -> int:
    """How many sites the next iteration linearizes, from the option and the iterations so far
    (so that a resumed run goes on with the number the interrupted one would have used).

    Args:
        option: ``sites_per_step``: an int >= 1 or ``"auto"``.
        trajectory: the iterations' logs, iteration 0 first.

    Returns:
        the option's number (``"auto"``: 1), doubled after each kept iteration while ``"auto"``
        and no iteration was undone (twice the number of sites it kept, when that was fewer than
        it tried: see ``probe``), halved (at least 1) after each undone one.
    """
    count, grow = (1, True) if option == "auto" else (option, False)
    for log in trajectory[1:]:
        used = log.get("sites_per_step", 1)
        if log.get("undone"):
            count, grow = max(1, used // 2), False
        elif grow:
            count = 2 * _kept(log)
        else:
            count = used
    return count


def _kept(log: dict) -> int:
    """The number of lowest-entropy sites an iteration asked for (sites at zero entropy aside):
    its ``sites_per_step``, or after probes that of the one within the budget (1 when none was:
    see ``probe``)."""
    if "probes" not in log:
        return log.get("sites_per_step", 1)
    return log["probes"][-1]["sites_per_step"] if log.get("finetuned") is False else 1


def _enables_merge(model: nn.Module, name: str) -> bool:
    """Whether linearizing ``name`` would let more layers be merged away."""
    trial = copy.deepcopy(model)
    sites(trial)[name].linearize()
    return mergeable_layers(trial) > mergeable_layers(model)

"""What EASIER and NEPENTHE share: an iterative schedule that measures every remaining site's
entropy, changes the model (a method's step), finetunes, evaluates, and keeps the best model
within an accuracy budget; with a run directory that checkpoints every iteration and resumes."""

from __future__ import annotations

import copy
import functools
import time
import warnings
from dataclasses import fields, replace
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from easier_ext.core.runtime import model_device, world_size
from easier_ext.core.sites import sites
from easier_ext.surgery.convert import convert
from easier_ext.surgery.costs import Cost, compare_latency, cost
from easier_ext.surgery.fold import fold
from easier_ext.surgery.measure import measure_entropy
from easier_ext.methods.rundir import RunDir, rng_state, seed_everything, set_rng_state
from easier_ext.methods.finetune_budget import batches_left, check_finetune_budget, spent_reason
from easier_ext.methods.options import ScheduleOptions
from easier_ext.methods.results import ScheduleResult, summary
from easier_ext.methods.train import NonFiniteLossError, evaluate, finetune

__all__ = ["Schedule", "ScheduleResult", "summary"]


class Schedule:
    """The loop of an entropy-guided depth-reduction method; subclasses say what one step does.

    Each iteration: measure every remaining site's entropy on the training data; :meth:`_step`
    changes a copy of the model (linearizes, prunes); finetune it with a fresh optimizer (with
    ``early_stop``, only until its validation accuracy is within the budget); evaluate; log and
    checkpoint. It stops when the accuracy has been more than ``budget`` points below the
    dense model for ``patience + 1`` iterations in a row, when no site is left, when a step has
    nothing left to do, or after ``max_iterations``; the best model within the budget
    (:meth:`_rank`) is folded and returned.

    Args:
        model: a trained model (converted here when it has no sites yet; not modified).
        train_loader: batches of ``(input, target)`` for measuring and finetuning.
        val_loader: batches of ``(input, target)`` for the accuracy.
        example_input: one input batch for folding and for costs (a small batch keeps it quick).
        options: the schedule's options, an instance of :attr:`Options` (default: its defaults).
            With a ``run_dir``, its ``config.json`` is written and its lock taken here (see
            :class:`easier_ext.methods.rundir.RunDir`); :meth:`close` or the end of the process
            releases the lock.
        **keywords: fields of :attr:`Options` (``budget=2.0``), set on top of ``options``.

    Raises:
        ValueError: a bad option (:class:`~easier_ext.methods.options.OptionError`, which names
            it); a run directory of another configuration (:class:`easier_ext.methods.rundir.RunDirError`).
        TypeError: a keyword that is no field of :attr:`Options`, or ``options`` of another class.
        KeyError: an unknown site in ``protect``.
    """

    #: the options this schedule takes
    Options = ScheduleOptions
    #: the unfolded final model's file name in the run directory
    unfolded_name = "final_linearized.pt"

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable,
        *,
        example_input: torch.Tensor,
        options: Optional[ScheduleOptions] = None,
        **keywords: Any,
    ) -> None:
        if options is None:
            options = self.Options(**keywords)
        elif not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(options).__name__}")
        else:  # a copy, checked again: changing the caller's object later must not change the run
            options = replace(options, **keywords)
        self.options = options
        self.model = model if sites(model) else convert(model)
        unknown = sorted(set(options.protect) - set(sites(self.model)))
        if unknown:
            raise KeyError(f"cannot protect unknown sites {unknown}; the model's sites are {list(sites(self.model))}")
        self._prepare(self.model)
        check_finetune_budget(options.max_finetune_epochs, train_loader, options.recipe)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.example_input = example_input
        identity = {**options.identity(), "sites": list(sites(self.model)), **_world_size(), **(options.config or {})}
        self.run_dir = RunDir(options.run_dir, identity, resume=options.resume) if options.run_dir is not None else None

    def __getattr__(self, name: str) -> Any:
        # the options were attributes of the schedule before they had their own object
        # (schedule.budget, nepenthe.zeta): read them there
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def start_from(self, model: nn.Module) -> None:
        """Makes ``model`` the one the run starts from (e.g. the constructor's model after
        pretraining it, which can then follow every check and the run directory's creation).

        Args:
            model: the model, converted here when it has no sites yet.

        Raises:
            ValueError: ``model`` does not have the sites of the constructor's model.
        """
        converted = model if sites(model) else convert(model)
        if list(sites(converted)) != list(sites(self.model)):
            raise ValueError(f"start_from: the model's sites {list(sites(converted))} are not the run's {list(sites(self.model))}")
        self.model = converted

    def close(self) -> None:
        """Releases the run directory's lock (also released when the process ends)."""
        if self.run_dir is not None:
            self.run_dir.close()

    # -- what a method defines -------------------------------------------------------------
    def _prepare(self, model: nn.Module) -> None:
        """Finds what the method needs in the converted model; called before the run directory
        is written, so that a model the method cannot use leaves nothing behind."""

    def _step(self, model: nn.Module, entropies: dict[str, float], trajectory: Sequence[dict] = ()) -> Optional[dict]:
        """Changes ``model`` (a copy of the last model kept) in place before its finetune;
        ``trajectory``: the iterations so far.

        Returns:
            the iteration's log entries, at least ``"removed"`` (the sites linearized by this
            step); with ``"finetuned": False`` and ``"accuracy"`` (the changed model's, measured
            by the step) the finetune is skipped; ``None`` when there is nothing left to do (the
            loop stops).
        """
        raise NotImplementedError

    def _entropies(self, model: nn.Module, trajectory: list[dict]) -> dict[str, float]:
        """The entropies the next step uses: measured now on ``model``."""
        return self._measure(model, len(trajectory))

    def _undo(self, log: dict, dense_accuracy: float) -> bool:
        """Whether the iteration ``log`` describes is undone: the next one starts again from the
        last model kept (the iteration stays in the trajectory, marked ``"undone"``)."""
        return False

    def _regularized(self, model: nn.Module, entropies: dict[str, float], step: dict,
                     trajectory: Sequence[dict]) -> tuple[list[str], float, float]:
        """The sites whose entropy proxy the finetune after ``step`` adds to the loss, with its
        weight and temperature (none: no regularizer)."""
        return [], 0.0, 1.0

    def _keeps_without_finetune(self) -> bool:
        """Whether a step may keep its change with no finetune (``"finetuned": False``): then a run
        whose ``max_finetune_epochs`` are spent goes on until a step needs one."""
        return False

    def _after_finetune(self, model: nn.Module, step: dict, k: int) -> dict:
        """Changes ``model`` after its finetune, before it is evaluated; returns the step's log
        entries, updated."""
        return step

    def _state(self, model: nn.Module) -> dict:
        """Log entries describing any model of the run (iteration 0 included)."""
        return {}

    def _rank(self, log: dict) -> tuple:
        """Orders the iterations within the budget: the largest is returned."""
        return (len(log["linearized"]), log["val_accuracy"])

    def _deployable(self, model: nn.Module) -> nn.Module:
        """The model as it is saved at the end (a copy when it must change; folding it must give
        what folding ``model`` gives, since the fold of ``model`` is the one returned)."""
        return model

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> ScheduleResult:
        """Runs (or resumes) the schedule.

        Returns:
            a :class:`ScheduleResult`.
        """
        model, trajectory, folded = self._start()
        dense = trajectory[0]["val_accuracy"]
        dense_folded = folded.model if folded is not None and self.options.latency else None
        best = self._best_so_far(trajectory, model, folded)
        while True:
            stopped = self._stop_reason(model, trajectory)
            if stopped:
                break
            k = len(trajectory)
            t0 = time.perf_counter()
            candidate = copy.deepcopy(model)
            entropies = self._entropies(candidate, trajectory)
            step = self._step(candidate, entropies, trajectory)
            if step is None:
                stopped = f"iteration {k}: nothing left to change"
                break
            if step.get("finetuned", True):
                left = self._batches_left(trajectory)
                if left == 0:
                    stopped = spent_reason(self.options.max_finetune_epochs, trajectory, k, step.get("probes", ()))
                    break
                regularized = self._regularized(candidate, entropies, step, trajectory)
                if regularized[0]:
                    step = {**step, "regularized": regularized[0]}
                try:
                    history = self._finetune(candidate, regularized, dense, left)
                except NonFiniteLossError as e:
                    stopped = f"iteration {k}: {e}; kept the last good checkpoint"
                    break
                step = self._after_finetune(candidate, step, k)
                accuracy = evaluate(candidate, self.val_loader, device=self.options.device)
            else:  # the step evaluated its change already, within the budget: no finetune
                history, accuracy = [], step.pop("accuracy")
            log, folded = self._log(k, candidate, step, entropies, history, accuracy, time.perf_counter() - t0)
            trajectory.append(log)
            if self._undo(log, dense):
                log["undone"] = True
                self._checkpoint(log, model)  # what a resumed run goes on from: the last model kept
                continue
            self._checkpoint(log, candidate)
            model = candidate
            if self._within(dense, accuracy) and self._rank(log) >= self._rank(best[0]):
                best = (log, candidate, folded)
        return self._finish(trajectory, best, stopped, dense_folded)

    def _start(self) -> tuple[nn.Module, list[dict], Optional[_Folded]]:
        """The model to go on from, the iterations done, and the last one's fold when it was
        made in this process (not after a resume)."""
        done = self.run_dir.iterations() if self.run_dir is not None else []
        if done:
            last = self.run_dir.load_checkpoint(done[-1]["iteration"])
            set_rng_state(last["rng"])
            return last["model"], done, None
        seed_everything(self.options.seed)
        model = copy.deepcopy(self.model)
        for s in sites(model).values():
            s.track = False  # finetune and evaluate run torch's kernels; measure_entropy counts
        accuracy = evaluate(model, self.val_loader, device=self.options.device)
        log, folded = self._log(0, model, {"removed": []}, {}, [], accuracy, 0.0)
        self._checkpoint(log, model)
        return model, [log], folded

    def _stop_reason(self, model: nn.Module, trajectory: list[dict]) -> str:
        """Why the loop ends before another iteration ("" to go on); also right after a resume."""
        budget, patience, cap = self.options.budget, self.options.patience, self.options.max_iterations
        dense = trajectory[0]["val_accuracy"]
        recent = [log for log in trajectory[1:] if not log.get("undone")][-(patience + 1) :]
        if len(recent) == patience + 1 and not any(self._within(dense, log["val_accuracy"]) for log in recent):
            accuracy = recent[-1]["val_accuracy"]
            after = f" for {len(recent)} iterations" if patience else ""
            return f"accuracy {accuracy:.2f} dropped {dense - accuracy:.2f} points below dense {dense:.2f} (budget {budget}){after}"
        if not self._remaining(model):
            return "no site left"
        if cap is not None and len(trajectory) > cap:
            return f"reached max_iterations={cap}"
        if self._batches_left(trajectory) == 0 and not self._keeps_without_finetune():
            return spent_reason(self.options.max_finetune_epochs, trajectory)
        return ""

    def _batches_left(self, trajectory: list[dict]) -> Optional[int]:
        """The finetune batches ``max_finetune_epochs`` still holds (None: no budget)."""
        return batches_left(self.options.max_finetune_epochs, self.train_loader, self.options.recipe, trajectory)

    def _remaining(self, model: nn.Module) -> list[str]:
        return [n for n, s in sites(model).items() if not s.linearized and n not in self.options.protect]

    def _measure(self, model: nn.Module, k: int) -> dict[str, float]:
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(10_000 + k)  # a fixed order per iteration, so a resumed run measures the same
        o = self.options
        result = measure_entropy(
            model, self.train_loader, max_batches=o.measure_batches, train=o.measure_train_mode,
            aggregate=o.aggregate, device=o.device, progress=o.progress,
        )
        return {name: r.entropy for name, r in result.items()}

    def _finetune(self, model: nn.Module, regularized: tuple[Sequence[str], float, float] = ((), 0.0, 1.0),
                  dense_accuracy: Optional[float] = None, max_steps: Optional[int] = None) -> list[dict]:
        """Finetunes ``model`` in place: ``train_fn``, or the recipe with the regularizer's sites
        pushed, ended after ``max_steps`` batches and, with ``early_stop`` (and ``dense_accuracy``),
        once within the budget.

        Returns:
            the finetune's records (none with a ``train_fn``).
        """
        o = self.options
        if o.train_fn is not None:
            o.train_fn(model, self.train_loader)
            return []
        names, weight, tau = regularized
        found = sites(model)
        targets = [found[n] for n in names] if weight > 0 else []
        for s in targets:
            s.regularize(tau)
        try:
            penalty = functools.partial(_entropy_penalty, targets, weight) if targets else None
            stop = {}
            if o.early_stop and dense_accuracy is not None:
                stop = dict(stop_when=functools.partial(self._within_budget, model, dense_accuracy), check_every=o.early_stop)
            return finetune(model, self.train_loader, o.recipe, device=o.device, progress=o.progress, regularizer=penalty,
                            max_steps=max_steps, **stop)
        finally:
            for s in targets:  # no proxy, with its graph, may stay on the model (copies and checkpoints)
                s.regularize(None)

    def _within(self, dense_accuracy: float, accuracy: float) -> bool:
        """Whether ``accuracy`` is within the budget below the dense model's."""
        return dense_accuracy - accuracy <= self.options.budget

    def _within_budget(self, model: nn.Module, dense_accuracy: float) -> bool:
        # A DataLoader draws its workers' seed from torch's generator each time it is iterated: forked,
        # so that a run with early_stop shuffles and augments as the run without it, up to the stop
        with torch.random.fork_rng(devices=[]):
            return self._within(dense_accuracy, evaluate(model, self.val_loader, device=self.options.device))

    def _fold(self, model: nn.Module) -> _Folded:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            folded = fold(model, self.example_input)
        return _Folded(folded, caught)

    def _log(self, k: int, model: nn.Module, step: dict, entropies: dict, history: list, accuracy: float,
             seconds: float) -> tuple[dict, _Folded]:
        """The iteration's log, and its model folded (kept, should it be the one returned), on the
        CPU: the run keeps up to two folds while it trains (the dense model's and the best's),
        which on a GPU would take memory from training."""
        folded = self._fold(model)
        c = cost(folded.model, self.example_input, latency=self.options.latency)
        linearized = [n for n, s in sites(model).items() if s.linearized]
        log = {
            "iteration": k, "entropies": entropies, **step, "linearized": linearized, **self._state(model),
            "finetune": history, "val_accuracy": accuracy, "params": c.params, "macs": c.macs, "depth": c.depth,
            "latency_s": c.latency_s, "wall_s": seconds,
        }
        return log, _Folded(folded.model.cpu(), folded.warnings)

    def _checkpoint(self, log: dict, model: nn.Module) -> None:
        if self.run_dir is not None:
            self.run_dir.save_iteration(log, {"model": model, "rng": rng_state()})

    def _best_so_far(self, trajectory: list[dict], last: nn.Module,
                     folded: Optional[_Folded]) -> tuple[dict, nn.Module, Optional[_Folded]]:
        """The best iteration within the budget (see :meth:`_rank`), its model, and its fold
        when ``folded``, the last iteration's, is it."""
        dense = trajectory[0]["val_accuracy"]
        within = [log for log in trajectory if self._within(dense, log["val_accuracy"])]
        log = max(reversed(within), key=self._rank)  # the latest of equals, as the loop keeps it
        if log is trajectory[-1]:
            return log, last, folded
        return log, self.run_dir.load_checkpoint(log["iteration"])["model"], None

    def _finish(self, trajectory: list[dict], best: tuple[dict, nn.Module, Optional[_Folded]], stopped: str,
                dense_folded: Optional[nn.Module]) -> ScheduleResult:
        log, chosen, folded = best
        device = model_device(chosen)
        linearized = self._deployable(chosen)
        if folded is None:  # resumed: the process that folded it is gone
            folded = self._fold(chosen)
        folded = _Folded(folded.model.to(device), folded.warnings)
        # chains fold could not merge exactly go into the result; other warnings are passed on
        unmerged = []
        for w in folded.warnings:
            if str(w.message).startswith("not merging"):
                unmerged.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        # the costs iteration 0 and the chosen iteration logged, of these same folded models
        before, after = (Cost(entry["params"], entry["macs"], entry["depth"]) for entry in (trajectory[0], log))
        timed = None
        if self.options.latency:
            # after a resume, iteration 0's fold is gone with the process that made it
            dense = dense_folded.to(device) if dense_folded is not None else self._fold(self.run_dir.load_checkpoint(0)["model"]).model
            timed = compare_latency(dense, folded.model, self.example_input)
            # the paired medians, so that the two latencies are comparable
            before, after = replace(before, latency_s=timed.before_s), replace(after, latency_s=timed.after_s)
        removed = [n for entry in trajectory[1 : log["iteration"] + 1] if not entry.get("undone") for n in entry["removed"]]
        result = ScheduleResult(
            folded.model, linearized, removed, trajectory[0]["val_accuracy"], log["val_accuracy"], before, after, trajectory,
            stopped, log.get("sparsity"), timed, unmerged, _batch(self.example_input),
        )
        if self.run_dir is not None:
            self.run_dir.save_model("final_folded.pt", folded.model)
            self.run_dir.save_model(self.unfolded_name, linearized)
            self.run_dir.write_json("summary.json", summary(result))
        return result


class _Folded(NamedTuple):
    """A model folded, and the warnings folding it gave (those of the returned one reach the
    user; the others would repeat them)."""

    model: nn.Module
    warnings: list


def _entropy_penalty(targets: list, weight: float) -> torch.Tensor:
    """``weight`` times the mean entropy proxy of the regularized sites that ran in the batch's
    forward (each proxy is used once: a site skipped by the next forward adds nothing)."""
    proxies = [s.entropy_proxy for s in targets if s.entropy_proxy is not None]
    for s in targets:
        s.entropy_proxy = None
    if not proxies:
        return torch.zeros(())
    return weight * torch.stack(proxies).mean()


def _batch(example_input) -> Optional[int]:
    first = example_input[0] if isinstance(example_input, tuple) else example_input
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None


def _world_size() -> dict:
    """The number of processes, for the run's identity: a run resumed with another number would
    shard and reduce differently. Left out for one process, as runs of earlier versions were."""
    n = world_size()
    return {"world_size": n} if n > 1 else {}

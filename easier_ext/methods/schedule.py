"""What EASIER and NEPENTHE share: an iterative schedule that measures every remaining site's
entropy, changes the model (a method's step), finetunes, evaluates, and keeps the best model
within an accuracy budget; with a run directory that checkpoints every iteration and resumes."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from easier_ext.core.sites import sites
from easier_ext.surgery.convert import convert
from easier_ext.surgery.costs import Cost, LatencyComparison, compare_latency, cost
from easier_ext.core.entropy import AGGREGATES
from easier_ext.surgery.fold import fold
from easier_ext.surgery.measure import measure_entropy
from easier_ext.methods.rundir import RunDir, rng_state, seed_everything, set_rng_state
from easier_ext.core.checks import is_real
from easier_ext.methods.train import NonFiniteLossError, Recipe, evaluate, finetune

__all__ = ["Schedule", "ScheduleResult", "summary"]

TrainFn = Callable[[nn.Module, Iterable], Any]


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


class Schedule:
    """The loop of an entropy-guided depth-reduction method; subclasses say what one step does.

    Each iteration: measure every remaining site's entropy on the training data; :meth:`_step`
    changes a copy of the model (linearizes, prunes); finetune it with a fresh optimizer; evaluate;
    log and checkpoint. It stops when the accuracy has been more than ``budget`` points below the
    dense model for ``patience + 1`` iterations in a row, when no site is left, when a step has
    nothing left to do, or after ``max_iterations``; the best model within the budget
    (:meth:`_rank`) is folded and returned.

    Args:
        model: a trained model (converted here when it has no sites yet; not modified).
        train_loader: batches of ``(input, target)`` for measuring and finetuning.
        val_loader: batches of ``(input, target)`` for the accuracy.
        example_input: one input batch for folding and for costs (a small batch keeps it quick).
        budget: the largest accepted drop in top-1 points, in ``[0, 100]``.
        recipe: the finetune recipe (:class:`easier_ext.methods.train.Recipe`); ignored with ``train_fn``.
        train_fn: your own finetune: ``train_fn(model, train_loader)``, called in place of ours.
        protect: sites never changed.
        aggregate: the layer entropy, ``"easier"`` or ``"nepenthe"``.
        measure_batches: batches per measurement (default: the whole loader).
        measure_train_mode: measure in train mode, as the papers do (BatchNorm statistics are
            restored afterwards).
        max_iterations: cap on the iterations.
        patience: go on for this many iterations past the budget before stopping, since a later
            finetune can win accuracy back (the papers run to the end and pick the operating point
            afterwards); the returned model is still the best within the budget.
        run_dir: where logs, checkpoints and the final model go (None: nowhere, no resume). Its
            ``config.json`` is written and its lock taken here (see :class:`easier_ext.methods.rundir.RunDir`);
            :meth:`close` or the end of the process releases the lock.
        resume: continue the run ``run_dir`` holds (a new or empty folder starts one).
        config: extra JSON-able settings that identify the run (e.g. the CLI's model and data).
        latency: time each iteration's folded model (the fastest of several blocks), and the
            returned one against the dense one in paired rounds.
        device: where to run (default: the model's device).
        seed: seeds torch, Python and NumPy at the start.
        progress: progress bars.
        settings: the method's own options, recorded in the run directory's configuration.

    Raises:
        ValueError: a bad ``budget``, ``aggregate``, ``max_iterations`` or ``patience``; a run
            directory of another configuration (:class:`easier_ext.methods.rundir.RunDirError`).
        KeyError: an unknown site in ``protect``.
    """

    #: the unfolded final model's file name in the run directory
    unfolded_name = "final_linearized.pt"

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
        run_dir=None,
        resume: bool = False,
        config: Optional[dict] = None,
        latency: bool = True,
        device=None,
        seed: int = 0,
        progress: bool = True,
        settings: Optional[dict] = None,
    ) -> None:
        if not is_real(budget) or not 0 <= budget <= 100:
            raise ValueError(f"budget must be a drop in top-1 points in [0, 100], got {budget!r}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown entropy aggregate {aggregate!r}; expected one of {AGGREGATES}")
        if max_iterations is not None and max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1 or None, got {max_iterations}")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        self.model = model if sites(model) else convert(model)
        unknown = sorted(set(protect) - set(sites(self.model)))
        if unknown:
            raise KeyError(f"cannot protect unknown sites {unknown}; the model's sites are {list(sites(self.model))}")
        self.train_loader, self.val_loader = train_loader, val_loader
        self.example_input = example_input
        self.budget, self.recipe, self.train_fn = float(budget), recipe or Recipe(), train_fn
        self.protect, self.aggregate = tuple(protect), aggregate
        self.measure_batches, self.measure_train_mode = measure_batches, measure_train_mode
        self.max_iterations, self.patience = max_iterations, patience
        self.latency, self.device, self.seed, self.progress = latency, device, seed, progress
        identity = {
            "budget": self.budget, "recipe": None if train_fn else self.recipe.as_dict(), "train_fn": getattr(train_fn, "__qualname__", None),
            "protect": list(self.protect), "aggregate": aggregate, "measure_batches": measure_batches,
            "measure_train_mode": measure_train_mode, "max_iterations": max_iterations, "patience": patience,
            "seed": seed, "sites": list(sites(self.model)), **_world_size(), **(settings or {}), **(config or {}),
        }
        self.run_dir = RunDir(run_dir, identity, resume=resume) if run_dir is not None else None

    def start_from(self, model: nn.Module) -> None:
        """Makes ``model`` the one the run starts from (e.g. the constructor's model after
        pretraining it, which can then follow every check and the run directory's creation).

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
    def _step(self, model: nn.Module, entropies: dict[str, float]) -> Optional[dict]:
        """Changes ``model`` (a copy of the last iteration's) in place before its finetune.

        Returns:
            the iteration's log entries, at least ``"removed"`` (the sites linearized by this
            step); ``None`` when there is nothing left to do (the loop stops).
        """
        raise NotImplementedError

    def _entropies(self, model: nn.Module, trajectory: list[dict]) -> dict[str, float]:
        """The entropies the next step uses: measured now on ``model``."""
        return self._measure(model, len(trajectory))

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
        """The model as it is saved at the end and folded (a copy when it must change)."""
        return model

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> ScheduleResult:
        """Runs (or resumes) the schedule.

        Returns:
            a :class:`ScheduleResult`.
        """
        model, trajectory = self._start()
        dense = trajectory[0]["val_accuracy"]
        best = self._best_so_far(trajectory, model)
        while True:
            stopped = self._stop_reason(model, trajectory)
            if stopped:
                break
            k = len(trajectory)
            t0 = time.perf_counter()
            candidate = copy.deepcopy(model)
            entropies = self._entropies(candidate, trajectory)
            step = self._step(candidate, entropies)
            if step is None:
                stopped = f"iteration {k}: nothing left to change"
                break
            try:
                history = self._finetune(candidate)
            except NonFiniteLossError as e:
                stopped = f"iteration {k}: {e}; kept the last good checkpoint"
                break
            step = self._after_finetune(candidate, step, k)
            accuracy = evaluate(candidate, self.val_loader, device=self.device)
            log = self._log(k, candidate, step, entropies, history, accuracy, time.perf_counter() - t0)
            trajectory.append(log)
            self._checkpoint(log, candidate)
            model = candidate
            if dense - accuracy <= self.budget and self._rank(log) >= self._rank(best[0]):
                best = (log, candidate)
        return self._finish(trajectory, best, stopped)

    def _start(self) -> tuple[nn.Module, list[dict]]:
        done = self.run_dir.iterations() if self.run_dir is not None else []
        if done:
            last = self.run_dir.load_checkpoint(done[-1]["iteration"])
            set_rng_state(last["rng"])
            return last["model"], done
        seed_everything(self.seed)
        model = copy.deepcopy(self.model)
        for s in sites(model).values():
            s.track = False  # finetune and evaluate run torch's kernels; measure_entropy counts
        accuracy = evaluate(model, self.val_loader, device=self.device)
        log = self._log(0, model, {"removed": []}, {}, [], accuracy, 0.0)
        self._checkpoint(log, model)
        return model, [log]

    def _stop_reason(self, model: nn.Module, trajectory: list[dict]) -> str:
        """Why the loop ends before another iteration ("" to go on); also right after a resume."""
        dense, accuracy = trajectory[0]["val_accuracy"], trajectory[-1]["val_accuracy"]
        recent = trajectory[1:][-(self.patience + 1) :]
        if len(recent) == self.patience + 1 and all(dense - log["val_accuracy"] > self.budget for log in recent):
            after = f" for {len(recent)} iterations" if self.patience else ""
            return f"accuracy {accuracy:.2f} dropped {dense - accuracy:.2f} points below dense {dense:.2f} (budget {self.budget}){after}"
        if not self._remaining(model):
            return "no site left"
        if self.max_iterations is not None and len(trajectory) > self.max_iterations:
            return f"reached max_iterations={self.max_iterations}"
        return ""

    def _remaining(self, model: nn.Module) -> list[str]:
        return [n for n, s in sites(model).items() if not s.linearized and n not in self.protect]

    def _measure(self, model: nn.Module, k: int) -> dict[str, float]:
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(10_000 + k)  # a fixed order per iteration, so a resumed run measures the same
        result = measure_entropy(
            model, self.train_loader, max_batches=self.measure_batches, train=self.measure_train_mode,
            aggregate=self.aggregate, device=self.device, progress=self.progress,
        )
        return {name: r.entropy for name, r in result.items()}

    def _finetune(self, model: nn.Module) -> list[dict]:
        if self.train_fn is not None:
            self.train_fn(model, self.train_loader)
            return []
        return finetune(model, self.train_loader, self.recipe, device=self.device, progress=self.progress)

    def _log(self, k: int, model: nn.Module, step: dict, entropies: dict, history: list, accuracy: float, seconds: float) -> dict:
        with warnings.catch_warnings():  # chains left unmerged are reported by the final fold
            warnings.simplefilter("ignore")
            folded = fold(model, self.example_input)
        c = cost(folded, self.example_input, latency=self.latency)
        linearized = [n for n, s in sites(model).items() if s.linearized]
        return {
            "iteration": k, "entropies": entropies, **step, "linearized": linearized, **self._state(model),
            "finetune": history, "val_accuracy": accuracy, "params": c.params, "macs": c.macs, "depth": c.depth,
            "latency_s": c.latency_s, "wall_s": seconds,
        }

    def _checkpoint(self, log: dict, model: nn.Module) -> None:
        if self.run_dir is not None:
            self.run_dir.save_iteration(log, {"model": model, "rng": rng_state()})

    def _best_so_far(self, trajectory: list[dict], last: nn.Module) -> tuple[dict, nn.Module]:
        """The best iteration within the budget (see :meth:`_rank`), and its model."""
        dense = trajectory[0]["val_accuracy"]
        within = [log for log in trajectory if dense - log["val_accuracy"] <= self.budget]
        log = max(reversed(within), key=self._rank)  # the latest of equals, as the loop keeps it
        if log is trajectory[-1]:
            return log, last
        return log, self.run_dir.load_checkpoint(log["iteration"])["model"]

    def _dense_model(self) -> nn.Module:
        return self.run_dir.load_checkpoint(0)["model"] if self.run_dir is not None else self.model

    def _finish(self, trajectory: list[dict], best: tuple[dict, nn.Module], stopped: str) -> ScheduleResult:
        log, linearized = best
        linearized = self._deployable(linearized)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            folded = fold(linearized, self.example_input)
        # chains fold could not merge exactly go into the result; other warnings are passed on
        unmerged = []
        for w in caught:
            if str(w.message).startswith("not merging"):
                unmerged.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        dense = fold(self._dense_model(), self.example_input)
        before, after = cost(dense, self.example_input, latency=False), cost(folded, self.example_input, latency=False)
        timed = compare_latency(dense, folded, self.example_input) if self.latency else None
        if timed is not None:  # the paired medians, so that the two latencies are comparable
            before, after = replace(before, latency_s=timed.before_s), replace(after, latency_s=timed.after_s)
        removed = [n for entry in trajectory[1 : log["iteration"] + 1] for n in entry["removed"]]
        result = ScheduleResult(
            folded, linearized, removed, trajectory[0]["val_accuracy"], log["val_accuracy"], before, after, trajectory, stopped,
            log.get("sparsity"), timed, unmerged, _batch(self.example_input),
        )
        if self.run_dir is not None:
            self.run_dir.save_model("final_folded.pt", folded)
            self.run_dir.save_model(self.unfolded_name, linearized)
            self.run_dir.write_json("summary.json", summary(result))
        return result


def _batch(example_input) -> Optional[int]:
    first = example_input[0] if isinstance(example_input, tuple) else example_input
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None


def _world_size() -> dict:
    """The number of processes, for the run's identity: a run resumed with another number would
    shard and reduce differently. Left out for one process, as runs of earlier versions were."""
    n = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {"world_size": n} if n > 1 else {}


def summary(result: ScheduleResult) -> dict:
    """The run's outcome as JSON-able data: accuracies, sites removed, costs before and after, why
    it stopped, the finetune epochs all iterations spent, and NEPENTHE's sparsity."""
    out = {
        "dense_accuracy": result.dense_accuracy, "accuracy": result.accuracy, "removed": result.removed,
        "before": result.before.as_dict(), "after": result.after.as_dict(), "stopped": result.stopped,
        # the costs' example input, whose batch MACs and latencies are of
        "example_images": result.example_images,
        # what the whole run cost, past the returned iteration too (unknown with a train_fn)
        "finetune_epochs": sum(len(log["finetune"]) for log in result.trajectory[1:]) if all(log["finetune"] for log in result.trajectory[1:]) else None,
    }
    if result.sparsity is not None:
        out["sparsity"] = result.sparsity
    if result.latency is not None:
        out["latency"] = result.latency.as_dict()
    if result.unmerged:
        out["unmerged"] = result.unmerged
    return out

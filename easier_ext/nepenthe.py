"""The NEPENTHE schedule: entropy-weighted unstructured pruning that drives whole layers to zero
entropy; those layers are then linear, replaced by their exact equivalent and folded."""

from __future__ import annotations

import copy
import math
from typing import Iterable, Optional

import torch
from torch import nn

from easier_ext.convert import convert, sites
from easier_ext.linearize import linearize, move_padding
from easier_ext.pruning import PRUNABLE, bake_pruning, feeding_layers, irrelevance, prune_magnitude, sparsity, split_budget, weight
from easier_ext.schedule import Schedule, ScheduleResult
from easier_ext.train import _is_real

__all__ = ["NEPENTHE", "NepentheResult"]

#: What :meth:`NEPENTHE.run` returns (see :class:`easier_ext.schedule.ScheduleResult`;
#: ``sparsity`` is set).
NepentheResult = ScheduleResult


class NEPENTHE(Schedule):
    """Prunes the weights feeding low-entropy sites until whole sites reach zero entropy.

    Each iteration starts from the entropies of the last model (NEPENTHE's aggregate by default:
    the mean over neurons that are neither always ON nor always OFF, measured in eval mode so that
    a constant site is constant where the model is used). Every live site gets its irrelevance
    ``I_l = H_l * mean|w|`` over the nonzero weights of the conv/linear layers feeding it; ``zeta``
    of the nonzero weights of those layers is pruned, ``n_l = total * softmax_l(sum_k I_k / I_l)``
    from each site's layers (capped at what a site holds, the rest shared again), by magnitude
    within a site's layers, with masks that keep pruned weights at zero through finetuning; the
    model is finetuned; then its entropies are measured, and every site at zero entropy is
    replaced by its exact equivalent on the measured data (the identity, or a per-neuron 0/1
    multiplier when some neurons are always OFF; for ReLU6 the upper clamp is dropped, as in the
    paper) and no longer pruned; the model is evaluated. Before the next finetune, the padding of
    conv chains that now pay to merge across replaced sites moves to the chain's first conv (as
    :func:`easier_ext.linearize` does for EASIER), so that folding them is exact. It stops as
    :class:`easier_ext.EASIER` does (budget with patience, no site left, ``max_iterations``), or
    when nothing is left to prune. The best model within the budget (most sites linearized, then
    the highest sparsity) is returned folded; the run directory also gets it with its sparse
    weights, unfolded (``final_sparse.pt``).

    Args:
        model: a trained model (converted here when it has no sites yet; not modified); torch.fx
            must be able to trace it (the layers feeding each site are found from its graph).
        train_loader, val_loader, example_input: see :class:`easier_ext.schedule.Schedule`.
        zeta: the fraction of the remaining nonzero eligible weights pruned per iteration, in
            ``(0, 1]`` (the paper's default 0.5: sparsity ``1 - 0.5^i`` after ``i`` iterations).
        **options: the options every schedule takes (see :class:`easier_ext.schedule.Schedule`):
            ``budget`` (top-1 points, default 1), ``recipe``, ``train_fn``, ``protect`` (sites
            neither pruned nor linearized), ``aggregate`` (default ``"nepenthe"``),
            ``measure_batches``, ``measure_train_mode`` (default False: eval mode),
            ``max_iterations``, ``patience``,
            ``run_dir``, ``resume``, ``config``, ``latency``, ``device``, ``seed``, ``progress``.

    Raises:
        ValueError: a bad ``zeta``, or a bad common option.
        KeyError: an unknown site in ``protect``.
        RuntimeError: torch.fx cannot trace the model.
    """

    unfolded_name = "final_sparse.pt"

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable,
        *,
        example_input: torch.Tensor,
        zeta: float = 0.5,
        **options,
    ) -> None:
        if not _is_real(zeta) or not 0 < zeta <= 1:
            raise ValueError(f"zeta must be the fraction of remaining weights pruned per iteration, in (0, 1], got {zeta!r}")
        self.zeta = float(zeta)
        options.setdefault("aggregate", "nepenthe")
        options.setdefault("measure_train_mode", False)
        model = model if sites(model) else convert(model)
        try:  # before the run directory is written: a model we cannot use leaves nothing behind
            self.feeds = feeding_layers(model)
        except RuntimeError as e:
            raise RuntimeError(f"NEPENTHE finds the layers that feed each site from the model's torch.fx graph: {e}") from e
        self.prunable = [layer for layers in self.feeds.values() for layer in layers]
        settings = {"method": "nepenthe", "zeta": self.zeta}
        super().__init__(model, train_loader, val_loader, example_input=example_input, settings=settings, **options)

    def _entropies(self, model: nn.Module, trajectory: list[dict]) -> dict[str, float]:
        # the last iteration measured its model after finetuning; nothing changed since
        return trajectory[-1]["entropies"] or super()._entropies(model, trajectory)

    def _step(self, model: nn.Module, entropies: dict[str, float]) -> Optional[dict]:
        remaining = self._remaining(model)
        zero = [n for n in remaining if entropies[n] == 0.0]  # only the dense model's, at iteration 1
        linearize(model, zero, mode="auto", prepare_fold=False)
        live = [n for n in remaining if n not in zero]
        weights = {n: [weight(model.get_submodule(layer)) for layer in self.feeds[n]] for n in live}
        irrelevances = {n: irrelevance(entropies[n], weights[n]) for n in live}
        capacity = {n: sum(int(w.count_nonzero()) for w in weights[n]) for n in live}
        eligible = sum(capacity[n] for n in live if irrelevances[n] > 0)
        if not zero and eligible == 0:
            return None
        total = max(1, math.floor(self.zeta * eligible)) if eligible else 0
        shares = split_budget(total, irrelevances, capacity)
        for n, amount in shares.items():
            prune_magnitude(model, self.feeds[n], amount)
        moved = move_padding(model)
        return {"removed": zero, "pruned": {n: a for n, a in shares.items() if a}, "irrelevance": irrelevances, "padding_moved": moved}

    def _after_finetune(self, model: nn.Module, step: dict, k: int) -> dict:
        entropies = self._measure(model, k)
        zero = [n for n in self._remaining(model) if entropies[n] == 0.0]
        linearize(model, zero, mode="auto", prepare_fold=False)  # exact on the measured data
        return {**step, "removed": step["removed"] + zero, "entropies": entropies}

    def _state(self, model: nn.Module) -> dict:
        overall, per_layer = sparsity(model, self.prunable)
        every_layer = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
        return {"sparsity": overall, "layer_sparsity": per_layer, "model_sparsity": sparsity(model, every_layer)[0]}

    def _rank(self, log: dict) -> tuple:
        return (len(log["linearized"]), log["sparsity"], log["val_accuracy"])

    def _deployable(self, model: nn.Module) -> nn.Module:
        return bake_pruning(copy.deepcopy(model))


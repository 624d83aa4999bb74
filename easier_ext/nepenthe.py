"""The NEPENTHE schedule: entropy-weighted unstructured pruning that drives whole layers to zero
entropy; those layers are then linear, replaced by their exact equivalent and folded."""

from __future__ import annotations

import copy
import math
from typing import Iterable, Optional

import torch
from torch import nn

from easier_ext.linearize import linearize
from easier_ext.pruning import bake_pruning, feeding_layers, irrelevance, prune_magnitude, sparsity, split_budget, weight
from easier_ext.schedule import Schedule, ScheduleResult

__all__ = ["NEPENTHE", "NepentheResult"]

#: What :meth:`NEPENTHE.run` returns (see :class:`easier_ext.schedule.ScheduleResult`;
#: ``sparsity`` is set).
NepentheResult = ScheduleResult


class NEPENTHE(Schedule):
    """Prunes the weights feeding low-entropy sites until whole sites reach zero entropy.

    Each iteration: measure every remaining site's entropy (NEPENTHE's aggregate by default: the
    mean over neurons that are neither always ON nor always OFF); linearize every site at zero
    entropy into its exact equivalent on the measured data (the identity, or a per-neuron 0/1
    multiplier when some neurons are always OFF; for ReLU6 the upper clamp is dropped) and stop
    pruning its layers; give every other site its irrelevance ``I_l = H_l * mean|w|`` over the
    nonzero weights of the conv/linear layers feeding it; prune ``zeta`` of the nonzero weights
    of those layers, ``n_l = total * softmax_l(sum_k I_k / I_l)`` from each site's layers
    (capped at what a site holds, the rest shared again), by magnitude within a site's layers,
    with masks that keep pruned weights at zero through finetuning; finetune; evaluate. It stops
    as :class:`easier_ext.EASIER` does (budget with patience, no site left, ``max_iterations``),
    or when nothing is left to prune. The best model within the budget (most sites linearized,
    then the highest sparsity) is returned folded; the run directory also gets it with its
    sparse weights, unfolded (``final_sparse.pt``).

    Args:
        model: a trained model (converted here when it has no sites yet; not modified); torch.fx
            must be able to trace it (the layers feeding each site are found from its graph).
        train_loader, val_loader, example_input: see :class:`easier_ext.schedule.Schedule`.
        zeta: the fraction of the remaining nonzero eligible weights pruned per iteration, in
            ``(0, 1]`` (the paper's default 0.5: sparsity ``1 - 0.5^i`` after ``i`` iterations).
        **options: the options every schedule takes (see :class:`easier_ext.schedule.Schedule`):
            ``budget`` (top-1 points, default 1), ``recipe``, ``train_fn``, ``protect`` (sites
            neither pruned nor linearized), ``aggregate`` (default ``"nepenthe"``),
            ``measure_batches``, ``measure_train_mode``, ``max_iterations``, ``patience``,
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
        if isinstance(zeta, bool) or not isinstance(zeta, (int, float)) or not 0 < zeta <= 1:
            raise ValueError(f"zeta must be the fraction of remaining weights pruned per iteration, in (0, 1], got {zeta!r}")
        self.zeta = float(zeta)
        options.setdefault("aggregate", "nepenthe")
        settings = {"method": "nepenthe", "zeta": self.zeta}
        super().__init__(model, train_loader, val_loader, example_input=example_input, settings=settings, **options)
        self.feeds = feeding_layers(self.model)
        self.prunable = [layer for layers in self.feeds.values() for layer in layers]

    def _step(self, model: nn.Module, entropies: dict[str, float]) -> Optional[dict]:
        remaining = self._remaining(model)
        zero = [n for n in remaining if entropies[n] == 0.0]
        if zero:
            linearize(model, zero, mode="auto")
        live = [n for n in remaining if n not in zero]
        weights = {n: [weight(model.get_submodule(layer)) for layer in self.feeds[n]] for n in live}
        irrelevances = {n: irrelevance(entropies[n], weights[n]) for n in live}
        capacity = {n: sum(int(w.count_nonzero()) for w in weights[n]) for n in live}
        total = math.floor(self.zeta * sum(capacity[n] for n in live if irrelevances[n] > 0))
        if not zero and total == 0:
            return None
        shares = split_budget(total, irrelevances, capacity)
        for n, amount in shares.items():
            prune_magnitude(model, self.feeds[n], amount)
        return {"removed": zero, "pruned": {n: a for n, a in shares.items() if a}, "irrelevance": irrelevances}

    def _state(self, model: nn.Module) -> dict:
        overall, per_layer = sparsity(model, self.prunable)
        return {"sparsity": overall, "layer_sparsity": per_layer}

    def _rank(self, log: dict) -> tuple:
        return (len(log["linearized"]), log["sparsity"], log["val_accuracy"])

    def _deployable(self, model: nn.Module) -> nn.Module:
        return bake_pruning(copy.deepcopy(model))


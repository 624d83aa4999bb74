"""The NEPENTHE schedule: entropy-weighted unstructured pruning that drives whole layers to zero
entropy; those layers are then linear, replaced by their exact equivalent and folded."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from easier_ext.core.checks import is_real
from easier_ext.core.sites import sites
from easier_ext.surgery.linearize import linearize, move_padding
from easier_ext.methods.options import ScheduleOptions, documented, option, with_default
from easier_ext.methods.pruning import (
    ALLOCATIONS, PRUNABLE, Paths, bake_pruning, bypassed_sites, feeding_layers, guarded_capacity, irrelevance, prune_magnitude,
    sparsity, split_budget, weight,
)
from easier_ext.methods.schedule import Schedule, ScheduleResult

__all__ = ["NEPENTHE", "NepentheOptions", "NepentheResult"]

#: What :meth:`NEPENTHE.run` returns (see :class:`easier_ext.ScheduleResult`;
#: ``sparsity`` is set).
NepentheResult = ScheduleResult


@documented
@dataclass
class NepentheOptions(ScheduleOptions):
    """NEPENTHE's options: those of every schedule (:class:`~easier_ext.methods.options.ScheduleOptions`),
    two with other defaults, and its own."""

    aggregate: str = with_default(ScheduleOptions, "aggregate", "nepenthe")
    measure_train_mode: bool = with_default(ScheduleOptions, "measure_train_mode", False)
    zeta: float = option(0.5, help="the fraction of the remaining nonzero eligible weights pruned per iteration (sparsity "
                                   "1 - (1 - zeta)^i after i iterations)", cli=True, convert=float,
                         check=lambda v: is_real(v) and 0 < v <= 1, expected="the fraction of remaining weights pruned per iteration, in (0, 1]")
    allocation: str = option("guarded", help="how an iteration's pruning is shared among sites: guarded empties only layers a "
                                             "residual sum bypasses and caps the others; reference is the paper's split, which can "
                                             "empty a layer on the only path", cli=True, choices=ALLOCATIONS, what="allocation")
    # 0.1, measured on the digits with one finetune epoch per iteration: with 0.5, unstructured
    # pruning of the layers on the only path cost more accuracy than the branches removed
    # (ResNet-18 2 sites and MobileNetV2 none within 1 point; with 0.1, 3 and 2; benchmarks/README.md)
    layer_cap: float = option(0.1, help="the largest fraction of a non-emptied site's remaining weights one iteration prunes",
                              cli=True, requires={"allocation": "guarded"}, why="the reference split caps a site only at empty", convert=float, check=lambda v: is_real(v) and 0 < v <= 1,
                              expected="the fraction of a site's remaining weights pruned per iteration, in (0, 1]")
    temperature: float = option(1.0, help="divides the budget split's softmax logits (1 in the reference code); above 1 spreads "
                                          "the pruning over more sites", cli=True, convert=float,
                                check=lambda v: is_real(v) and 0 < v < math.inf, expected="a finite number > 0")

    def identity(self) -> dict:
        """See :meth:`ScheduleOptions.identity`; with ``"method": "nepenthe"``.

        Returns:
            ``{option: value}``.
        """
        # runs of earlier versions recorded NEPENTHE's name with its options (and not EASIER's)
        return {**super().identity(), "method": "nepenthe"}


class NEPENTHE(Schedule):
    """Prunes the weights feeding low-entropy sites until whole sites reach zero entropy.

    Each iteration starts from the entropies of the last model (NEPENTHE's aggregate by default:
    the mean over neurons that are neither always ON nor always OFF, measured in eval mode so that
    a constant site is constant where the model is used). Every live site gets its irrelevance
    ``I_l = H_l * mean|w|`` over the nonzero weights of the conv/linear layers feeding it; ``zeta``
    of the nonzero weights of those layers is pruned, ``n_l = total * softmax_l(sum_k I_k / (T I_l))``
    from each site's layers, by magnitude within a site's layers, with masks that keep pruned
    weights at zero through finetuning. With ``allocation="reference"`` a site is capped only at
    what it holds (the rest shared again), as in the reference code: on a plain chain (VGG,
    MobileNetV2's non-residual blocks) that empties a layer on the only path and the output
    becomes constant. With ``"guarded"`` (the default) only bypassed sites (see
    :func:`easier_ext.pruning.bypassed_sites`: a residual sum goes around their branch, which
    then folds away whole) may be emptied, one per iteration (the least irrelevant); any other
    site loses at most ``layer_cap`` of its remaining weights per iteration and never the last
    weight of a neuron; what they cannot take is shared among the others (and left unpruned when
    nobody can). The model is finetuned; then
    its entropies are measured, and every site at zero entropy is replaced by its exact
    equivalent on the measured data (the identity, or a per-neuron 0/1 multiplier when some
    neurons are always OFF; for ReLU6 the upper clamp is dropped, as in the paper), as is every
    site whose output no longer reaches the model's (it only fed emptied layers); replaced sites
    are no longer pruned. The padding of conv chains that now pay to merge across replaced sites
    moves to the chain's first conv (as :func:`easier_ext.linearize` does for EASIER), so that
    folding them is exact; the model is evaluated as it is then. It stops as
    :class:`easier_ext.EASIER` does (budget with patience, no site left, ``max_iterations``), or
    when nothing is left to prune. The best model within the budget (most sites linearized, then
    the highest sparsity) is returned folded; the run directory also gets it with its sparse
    weights, unfolded (``final_sparse.pt``).

    Args:
        model: a trained model (converted here when it has no sites yet; not modified); torch.fx
            must be able to trace it (the layers feeding each site are found from its graph).
        train_loader, val_loader, example_input, options, keywords: see
            :class:`easier_ext.methods.schedule.Schedule`; the options are :class:`NepentheOptions`.

    Raises:
        ValueError, TypeError, KeyError: as :class:`easier_ext.methods.schedule.Schedule`.
        RuntimeError: torch.fx cannot trace the model.
    """

    Options = NepentheOptions
    unfolded_name = "final_sparse.pt"

    def _prepare(self, model: nn.Module) -> None:
        try:
            self.feeds = feeding_layers(model)
        except RuntimeError as e:
            raise RuntimeError(f"NEPENTHE finds the layers that feed each site from the model's torch.fx graph: {e}") from e
        self.prunable = [layer for layers in self.feeds.values() for layer in layers]

    def _entropies(self, model: nn.Module, trajectory: list[dict]) -> dict[str, float]:
        # the last iteration measured its model after finetuning; what changed since (replaced
        # sites, padding at the borders) is not pruned again or leaves the entropies as they were
        return trajectory[-1]["entropies"] or super()._entropies(model, trajectory)

    def _step(self, model: nn.Module, entropies: dict[str, float], trajectory: Sequence[dict] = ()) -> Optional[dict]:
        remaining = [n for n in self._remaining(model) if n in entropies]  # a site that never ran has no entropy: left alone
        zero = [n for n in remaining if entropies[n] == 0.0]  # only the dense model's, at iteration 1
        linearize(model, zero, mode="auto", prepare_fold=False)
        live = [n for n in remaining if n not in zero]
        weights = {n: [weight(model.get_submodule(layer)) for layer in self.feeds[n]] for n in live}
        irrelevances = {n: irrelevance(entropies[n], weights[n]) for n in live}
        nonzero = {n: sum(int(w.count_nonzero()) for w in weights[n]) for n in live}
        eligible = sum(nonzero[n] for n in live if irrelevances[n] > 0)
        total = max(1, math.floor(self.options.zeta * eligible)) if eligible else 0
        shares, may_empty, bypassed = self._allocate(model, total, irrelevances, weights, nonzero)
        if not zero and not any(shares.values()):
            return None
        for n, amount in shares.items():
            prune_magnitude(model, self.feeds[n], amount, keep_neurons=not may_empty[n])
        moved = move_padding(model)
        return {
            "removed": zero, "pruned": {n: a for n, a in shares.items() if a}, "irrelevance": irrelevances,
            "bypassed": [n for n, b in bypassed.items() if b], "emptied": [n for n, a in shares.items() if a and a == nonzero[n]],
            "padding_moved": moved,
        }

    def _allocate(self, model: nn.Module, total: int, irrelevances: dict, weights: dict, nonzero: dict) -> tuple[dict, dict, dict]:
        """The weights each live site loses; which sites may lose whole neurons (every one with
        the reference split; with the guarded one, at most the one bypassed site it empties); and
        which are bypassed (guarded only)."""
        if self.options.allocation == "reference":
            return split_budget(total, irrelevances, nonzero, temperature=self.options.temperature), {n: True for n in irrelevances}, {}
        bypassed = bypassed_sites(model, {n: self.feeds[n] for n in irrelevances})
        candidates = dict(bypassed)
        while True:
            shares = self._split(total, irrelevances, weights, nonzero, [n for n, c in candidates.items() if c])
            emptied = [n for n in shares if candidates[n] and 0 < shares[n] == nonzero[n]]
            if len(emptied) <= 1:
                break
            # One branch goes per iteration, as EASIER removes one site per step, so that each
            # finetune has one loss to recover from (two ResNet blocks at once on the digits: -3.9
            # points), and so that branches that bypass each other are not emptied together.
            candidates[max(emptied, key=irrelevances.__getitem__)] = False
        # Every other site is guarded: a bypassed one may be bypassed only through the emptied one.
        # Their capacities only shrink, so the emptied site's share only grows: it is still emptied.
        shares = self._split(total, irrelevances, weights, nonzero, emptied)
        return shares, {n: n in emptied for n in irrelevances}, bypassed

    def _split(self, total: int, irrelevances: dict, weights: dict, nonzero: dict, emptiable: list[str]) -> dict[str, int]:
        """The softmax split, ``emptiable`` sites capped at empty, the others guarded."""
        capacity = {n: nonzero[n] if n in emptiable else guarded_capacity(weights[n], self.options.layer_cap) for n in irrelevances}
        room = sum(c for n, c in capacity.items() if irrelevances[n] > 0)
        return split_budget(min(total, room), irrelevances, capacity, temperature=self.options.temperature)

    def _after_finetune(self, model: nn.Module, step: dict, k: int) -> dict:
        entropies = self._measure(model, k)
        zero = [n for n in self._remaining(model) if entropies.get(n) == 0.0]
        paths = Paths(model)
        exact = _constant_input_scales(model, paths, zero, self.example_input)
        for n in zero:  # exact on the measured data; on every input where the input is a constant
            if n in exact:
                sites(model)[n].linearize(exact[n])
            else:
                linearize(model, [n], mode="auto", prepare_fold=False)
        # sites that only fed emptied layers: the output no longer depends on them
        unused = paths.unused()
        dead = [n for n in self._remaining(model) if n in unused]
        linearize(model, dead, mode="identity", prepare_fold=False)
        moved = move_padding(model)  # so that the final fold merges this iteration's chains too
        padding = list(dict.fromkeys(step.get("padding_moved", []) + moved))
        return {**step, "removed": step["removed"] + zero + dead, "dead": dead, "padding_moved": padding, "entropies": entropies}

    def _state(self, model: nn.Module) -> dict:
        overall, per_layer = sparsity(model, self.prunable)
        every_layer = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
        return {"sparsity": overall, "layer_sparsity": per_layer, "model_sparsity": sparsity(model, every_layer)[0]}

    def _rank(self, log: dict) -> tuple:
        return (len(log["linearized"]), log["sparsity"], log["val_accuracy"])

    def _deployable(self, model: nn.Module) -> nn.Module:
        return bake_pruning(copy.deepcopy(model))



def _constant_input_scales(model: nn.Module, paths: Paths, names: list[str], example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """For the sites among ``names`` whose input does not depend on the model's input (their
    feeding layers were emptied), the per-neuron multiplier that reproduces the activation of that
    constant exactly: ``act(c) / c`` (1 where ``c`` is 0). The constant-scale rule of
    :func:`easier_ext.linearize` would drop GELU's curvature and ReLU6's clamp, and so change what
    an emptied branch adds."""
    modules = dict(model.named_modules())
    dependent = {n.target for n in paths.input_dependent() if n.op == "call_module"}
    constant = [n for n in names if n not in dependent]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: inputs.__setitem__(n, args[0].detach())) for n in constant]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    scales = {}
    for n, x in inputs.items():
        m = modules[n]
        per_neuron = x.movedim(m.channel_dim, 0).reshape(x.shape[m.channel_dim], -1)
        c = per_neuron[:, 0]
        if not bool((per_neuron == c[:, None]).all()):
            continue  # constant, but not one value per neuron: the usual rule applies
        with torch.no_grad():
            y = m.to_torch().eval()(c.reshape(1, -1) if m.channel_dim != -1 else c).reshape(-1)
        scales[n] = torch.where(c != 0, y / torch.where(c != 0, c, 1), torch.ones_like(c)).float()
    return scales

"""Linearize sites: the identity (EASIER) or their exact per-neuron multiplier (NEPENTHE), and
move padding so that the convs around a linearized site can later be merged exactly."""

from __future__ import annotations

import warnings
from typing import Iterable, Union

import torch.fx as fx
from torch import nn

from easier_ext.core.modules import EntropyActivation
from easier_ext.core.sites import site as find_site
from easier_ext.surgery.chains import find_chains, plan_segments
from easier_ext.surgery.fold_graph import planning_graph
from easier_ext.surgery.fold_static import is_batch_norm_in_eval
from easier_ext.surgery.tracing import TraceError

__all__ = ["LINEARIZE_MODES", "linearize", "mergeable_layers", "move_padding"]

#: ``"identity"``: the site passes its input through (EASIER). ``"mask"``: the site multiplies each
#: neuron by its constant slope (1 when always ON, the OFF slope when always OFF), exact on the
#: measured data when every neuron was constant (NEPENTHE); refused otherwise. ``"auto"``: mask
#: when every neuron was constant, else identity.
LINEARIZE_MODES = ("identity", "mask", "auto")


def linearize(model: nn.Module, names: Union[str, Iterable[str]], *, mode: str = "auto", prepare_fold: bool = True) -> list[str]:
    """Linearizes sites of a converted model, in place.

    Args:
        model: a converted model (see :func:`easier_ext.convert`).
        names: a site name or several (see :func:`easier_ext.sites`).
        mode: one of :data:`LINEARIZE_MODES`; ``"mask"`` and ``"auto"`` use the sites' counts from
            the last measurement.
        prepare_fold: also move the padding of every conv chain that now pays to merge to the
            chain's first conv (see :func:`move_padding`), so that finetuning adapts to it and
            :func:`easier_ext.fold` merges it exactly.

    Returns:
        the convs whose padding moved (qualified names), empty when none.

    Raises:
        KeyError: an unknown site name (nothing is changed).
        ValueError: an unknown mode, or ``"mask"`` for a site with non-constant neurons (nothing
            is changed).
    """
    if mode not in LINEARIZE_MODES:
        raise ValueError(f"unknown linearize mode {mode!r}; expected one of {LINEARIZE_MODES}")
    names = [names] if isinstance(names, str) else list(names)
    targets = [find_site(model, n) for n in names]  # every name checked before any change
    scales = [_scale(s, mode) for s in targets]
    for s, scale in zip(targets, scales):
        s.linearize(scale)
    return move_padding(model) if prepare_fold else []


def _scale(s: EntropyActivation, mode: str):
    if mode == "identity":
        return None
    try:
        scale = s.constant_scale()
    except ValueError:
        if mode == "mask":
            raise
        return None
    return None if bool((scale == 1).all()) else scale


def move_padding(model: nn.Module) -> list[str]:
    """Moves padding to the first conv of every conv chain that pays to merge.

    Two "same"-padded convs with a linear map between them merge exactly only if the chain's
    padding is applied once, at its input: the intermediate map is then computed at the border
    rather than zero-padded. This changes the model's function near the borders (finetune after
    it); it is what makes :func:`easier_ext.fold` exact. A conv ``k`` giving its padding ``p`` to
    the conv before it (stride ``s``) makes that conv pad ``s * p`` more, so the chain's output size
    does not change. Only runs that the MACs model says pay to merge are touched.

    Args:
        model: a converted model, traceable by torch.fx, with linearized sites.

    Returns:
        the qualified names of the convs whose padding changed.
    """
    names = {id(m): n for n, m in model.named_modules()}
    moved = []
    for layers in _runs_that_pay(model):
        if isinstance(layers[0], nn.Linear) or not _can_move(layers):
            continue
        for k in range(len(layers) - 1, 0, -1):
            before, after = layers[k - 1], layers[k]
            if any(after.padding):
                before.padding = tuple(p + s * q for p, s, q in zip(before.padding, before.stride, after.padding))
                after.padding = (0,) * len(after.padding)
                moved += [names[id(after)], names[id(before)]]
    return list(dict.fromkeys(moved))


def mergeable_layers(model: nn.Module) -> int:
    """How many layers merging would remove, by the MACs model, were padding where it must be.

    Args:
        model: a converted model, traceable by torch.fx.

    Returns:
        the number of conv/linear layers that runs worth merging would fold away (0 when the
        model cannot be traced).
    """
    return sum(len(layers) - 1 for layers in _runs_that_pay(model))


def _runs_that_pay(model: nn.Module) -> list:
    """The runs of layers (with linearized sites, BatchNorm, dropout between) worth merging."""
    try:
        graph = planning_graph(model)
    except TraceError as e:
        warnings.warn(f"{e}; cannot plan merges, so no padding is moved", stacklevel=3)
        return []
    runs = []
    for chain in find_chains(graph, model, _transparent(model)):
        segments, _, _ = plan_segments(chain.layers, exact_only=False)
        runs += [chain.layers[start:stop] for start, stop in segments if stop - start > 1]
    return runs


def _can_move(convs) -> bool:
    return all(isinstance(c.padding, tuple) and c.padding_mode == "zeros" for c in convs)


def _transparent(model: nn.Module):
    """Between two convs of a chain: BatchNorm (a module, or a functional call that fold turns
    into one), linearized sites, dropout, identity."""

    def transparent(node: fx.Node) -> bool:
        if is_batch_norm_in_eval(node):
            return True
        if node.op != "call_module":
            return False
        m = model.get_submodule(node.target)
        if isinstance(m, EntropyActivation):
            return m.linearized
        return isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Identity))

    return transparent

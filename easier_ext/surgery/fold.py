"""Fold a linearized model into fewer standard torch layers, exactly, where it pays.

The passes live next to this module: ``fold_graph`` (tracing and the state the passes share),
``fold_static`` (values computed once, functional layers made modules), ``fold_sites``,
``fold_affine`` (BatchNorm and per-channel scales), ``fold_constants`` (branches emptied by
pruning) and ``fold_merges`` (chains and sums of layers)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from easier_ext.surgery.fold_affine import fold_batchnorms, fold_scales, report_unfolded_batchnorms
from easier_ext.surgery.fold_constants import fold_constants
from easier_ext.surgery.fold_graph import FoldGraph, LayerTracer
from easier_ext.surgery.fold_merges import merge_chains, merge_sums
from easier_ext.surgery.fold_sites import drop_identities, replace_sites
from easier_ext.surgery.fold_static import compute_static, functional_layers
from easier_ext.surgery.masks import bake_pruning
from easier_ext.surgery.tracing import trace_model

__all__ = ["FOLD_COSTS", "fold"]

#: What decides whether a merge pays: ``"macs"`` (an estimate, no timing) or ``"latency"``
#: (each candidate timed on the example input's shapes, on its device).
FOLD_COSTS = ("macs", "latency")


def fold(model: nn.Module, example_input: Any, *, cost: str = "macs", verify: bool = True, rtol: float = 1e-5) -> fx.GraphModule:
    """Merges the linear layers that linearization left next to each other, exactly.

    The model runs in eval mode, so this is for inference (BatchNorm uses its running
    statistics). The model is traced down to torch.nn layers: other modules are traced through,
    except subclasses of BatchNorm, convs and Linear that keep torch's ``forward`` (they are
    those layers). First:

    - values fixed once the model is are computed once, in eval, into buffers: expressions of
      parameters and buffers only (a weight standardised in ``forward``, ``gamma.view(...)``,
      an attention bias gathered by index). A tensor's rank read in ``forward`` (``x.ndim``,
      ``x.dim()``) is taken from ``example_input``, and asserts that then hold go.
    - functional ``conv1d/2d/3d``, ``linear`` and ``batch_norm`` (running statistics, not
      training) calls with such fixed weights become their torch.nn modules, so a BatchNorm
      subclass whose ``forward`` calls ``F.batch_norm`` (timm's ``BatchNormAct2d``, its
      activation then a separate op) and weight-standardised convs fold like the torch layers.

    Then, repeated until nothing changes:

    - sites: linearized ones are removed (or, with a per-neuron multiplier, folded into the conv
      or linear before or after them); the others become their torch.nn modules. Dropout and
      Identity are removed.
    - BatchNorm folds into the conv or linear before it (its own eps). A warning names the
      BatchNorms left (each with why; also in ``fold_log``).
    - ``layer(x) * s`` and ``layer(x * s)`` with a per-channel buffer or parameter ``s``
      (LayerScale) become one layer.
    - chains of convs (or linears) with nothing between them are cut into runs, each merged into
      one layer, choosing the runs with the least cost (``cost``). Runs whose inner convs pad
      their input are not merged, since that is not exact: :func:`easier_ext.linearize` moves
      padding to the chain's first conv for that; a warning names the chains left unmerged
      because of it.
    - a conv or linear whose weights are all zero (emptied by pruning) outputs its bias, a constant
      per channel. The constant is carried through the layers after it that keep it one
      (activations, BatchNorm, Dropout, elementwise arithmetic, linears, convs that do not pad);
      where it then meets a residual addition ``x + branch``, the addition adds a buffer holding
      it instead (or goes, when it is zero), and the branch that computed it is dropped. A
      constant that reaches anything else (the output, a padded conv, pooling, ...) stays computed.
    - ``a(x) + x`` and ``a(x) + b(x)`` with aligned convs become one conv (identity on the centre
      tap, or the smaller kernel embedded in the larger).

    Args:
        model: a converted model with linearized sites (any model traceable by torch.fx); layers
            pruned with ``torch.nn.utils.prune`` fold with their masks applied.
        example_input: a tensor (or tuple of args) used for shapes, ``"latency"`` timing and the
            check.
        cost: one of :data:`FOLD_COSTS`.
        verify: run the folded and the original model on ``example_input`` in float64 and raise
            if they differ by more than ``rtol`` (relative to the output's largest magnitude).
        rtol: see ``verify``.

    Returns:
        a ``torch.fx.GraphModule`` of standard torch layers in eval mode (no easier_ext module
        left; ``torch.save`` of it loads without easier_ext), with ``fold_log`` (what was merged,
        dropped, computed once or left).

    Raises:
        ValueError: (``verify``) the model's outputs on ``example_input`` are not all finite, so
            there is nothing to check the folded model against.
        RuntimeError: the model cannot be traced, or (``verify``) the folded model's outputs differ.
    """
    if cost not in FOLD_COSTS:
        raise ValueError(f"unknown fold cost {cost!r}; expected one of {FOLD_COSTS}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    # Before folding: NaN/inf outputs would fail the check below, as if folding had changed them.
    expected = _finite_outputs(model, args) if verify else None
    gm = trace_model(bake_pruning(copy.deepcopy(model)).eval(), LayerTracer)
    fg = FoldGraph(gm, cost)
    _run(fg, args)
    gm.fold_log = fg.log
    # The tracer class is pickled with a GraphModule; ours would make loading need easier_ext.
    gm._tracer_cls = gm.graph._tracer_cls = None
    if verify:
        _verify(expected, gm, args, rtol)
    return gm

def _run(fg: FoldGraph, args: tuple) -> None:
    """The passes, in order; the ones that may enable each other repeat until none changes the graph.

    Warnings of the passes name ``fold``'s caller (``stacklevel=4``): keep this called from :func:`fold`.
    """
    # The one forward: the passes keep node.meta current instead (a folded layer's output keeps
    # its shape, a merged run's first node takes its last's, a new node gets its own).
    fg.gm.recompile()
    with torch.no_grad():
        ShapeProp(fg.gm).propagate(*args)
    compute_static(fg)
    functional_layers(fg)
    replace_sites(fg)
    drop_identities(fg)
    passes = (fold_batchnorms, fold_constants, fold_scales, merge_chains, merge_sums)
    changed = True
    while changed:
        changed = False
        for fold_pass in passes:
            changed |= fold_pass(fg)
    fg.graph.eliminate_dead_code()
    report_unfolded_batchnorms(fg)
    fg.graph.lint()
    fg.gm.delete_all_unused_submodules()
    used = {n.target for n in fg.graph.nodes if n.op == "get_attr"}
    for name in [b for b in fg.buffers if b not in used]:
        delattr(fg.gm, name)
    fg.gm.recompile()


def _run_float64(m: nn.Module, args: tuple) -> torch.Tensor:
    """A copy of ``m`` in eval mode and float64 on ``args``: its outputs, flattened into one tensor."""
    m = copy.deepcopy(m).eval().double()
    with torch.no_grad():
        out = m(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    tensors = _tensors(out)
    return torch.cat([t.flatten() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def _finite_outputs(model: nn.Module, args: tuple) -> torch.Tensor:
    """The model's outputs that :func:`_verify` compares against, refused when any is NaN or inf."""
    expected = _run_float64(model, args)
    bad = int((~torch.isfinite(expected)).sum().item()) if expected.is_floating_point() else 0
    if bad:
        raise ValueError(
            f"the model's outputs are not finite on the example input ({bad} of {expected.numel()} values are "
            "NaN/inf); fold checks its result against them, so it needs a model whose outputs are finite: check "
            "the model's weights and the example input, or pass verify=False to fold without the check"
        )
    return expected


def _verify(flat_e: torch.Tensor, folded: fx.GraphModule, args: tuple, rtol: float) -> None:
    flat_a = _run_float64(folded, args)
    err = (flat_a - flat_e).abs().max().item() if flat_e.numel() else 0.0
    scale = max(flat_e.abs().max().item() if flat_e.numel() else 0.0, 1e-30)
    if not err <= rtol * scale:
        raise RuntimeError(f"folding changed the outputs (max error {err:.3g}, {err / scale:.3g} of the output's scale); this is a bug, please report it")


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []

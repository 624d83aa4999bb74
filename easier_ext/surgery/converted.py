"""What :func:`easier_ext.convert` does to a model once its sites are in place: keep the modules'
training modes, name the activations it has no site for, order the modules by execution, keep
DDP off the counts."""

from __future__ import annotations

import math

import torch.fx as fx
from torch import nn

from easier_ext.core.modules import EntropyActivation
from easier_ext.surgery.tracing import TraceError, trace

__all__ = ["keep_training_modes", "passed_over", "order_children_by_use", "order_by_execution", "ignore_counts_in_ddp"]

# activations shaped like a rectifier (nearly linear on one side of a point) that have no easier_ext
# site yet: a model's entropy picture leaves them out, which the user should know
_UNTRACKED_ACTIVATIONS = (nn.Hardsigmoid, nn.SELU, nn.CELU, nn.Softplus, nn.RReLU, nn.Threshold)


def keep_training_modes(model: nn.Module, existing: set, modes: dict[str, bool]) -> None:
    """Gives the modules convert made (sites, rewritten forwards), which start in train mode as
    every new module does, the mode of what they replace, or else of the module they sit in, so
    that an eval model stays one; the others keep theirs.

    Args:
        model: the converted model, changed in place.
        existing: the modules before converting (held, so that no new module reuses an id).
        modes: each path's mode before converting, shared modules under each of their paths.
    """
    for name, m in model.named_modules(remove_duplicate=False):  # a parent before its children
        if m not in existing:
            m.training = modes[name] if name in modes else model.get_submodule(name.rpartition(".")[0]).training


def passed_over(model: nn.Module) -> str:
    """The untracked activation modules of ``model``, in words ("" when none)."""
    found: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, _UNTRACKED_ACTIVATIONS):
            found.setdefault(type(m).__name__, []).append(name)
    parts = [f"{len(names)} {kind} module{'s' * (len(names) > 1)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for kind, names in found.items()]
    return f"{' and '.join(parts)}, which easier_ext has no site for" if parts else ""


def order_children_by_use(root: nn.Module, graph: fx.Graph) -> None:
    """Orders the children of ``root`` and of every module below it by their first use in
    ``graph`` (a trace of ``root``), so that :func:`sites` lists sites in execution order.

    Containers whose order is their meaning (Sequential, ModuleList, ModuleDict: indexing and
    iteration follow it) keep it; children the graph never uses keep their place after the used
    ones."""
    first: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        if node.op in ("call_module", "get_attr"):
            parts = str(node.target).split(".")
            for depth in range(1, len(parts) + 1):
                first.setdefault(".".join(parts[:depth]), i)
    for name, module in list(root.named_modules()):
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or not module._modules:
            continue
        prefix = f"{name}." if name else ""
        order = sorted(module._modules, key=lambda child: first.get(prefix + child, math.inf))
        module._modules = {child: module._modules[child] for child in order}


def order_by_execution(model: nn.Module) -> None:
    """Orders every module by first use in the whole model's forward (see
    :func:`order_children_by_use`), also where a parent that calls no rectifier itself registers
    its children in another order; a model torch.fx cannot trace keeps its order."""
    try:
        graph = trace(model)
    except TraceError:  # the order is a nicety, never worth failing for
        return
    order_children_by_use(model, graph)


def ignore_counts_in_ddp(model: nn.Module, found: dict[str, EntropyActivation]) -> None:
    """DDP must not broadcast rank 0's counts over the other ranks' (measurement all-reduces them)."""
    names = [f"{name}.{buf}" for name in found for buf in ("on_counts", "observations")]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = existing + [n for n in names if n not in existing]

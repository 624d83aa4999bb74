"""Turn every rectifier call site of a model into its own entropy-tracking module."""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from typing import Callable, Mapping, Optional, Union

import torch.fx as fx
from torch import nn

from easier_ext._tracing import (
    RECTIFIER_MODULES,
    FoldTracer,
    ShallowTracer,
    is_sequential,
    module_from_call,
    rectifier_spec,
)
from easier_ext.modules import EntropyActivation

__all__ = ["convert", "sites", "site", "UntraceableSiteError"]

ChannelDim = Union[int, Mapping[str, int], None]

# Layers after which the neurons sit on the last dim: (..., features) tensors.
_CHANNEL_LAST_PRODUCERS = (nn.Linear, nn.LayerNorm, nn.Bilinear)
# Layers that pass their input through unchanged in shape, looked through to find the producer.
_PASS_THROUGH = (nn.Dropout, nn.Identity)
# A forward whose source names one of these may call a rectifier.
_RECTIFIER_NAME = re.compile(r"\b(relu6?_?|leaky_relu_?|gelu|silu)\b|\b(ReLU6?|LeakyReLU|PReLU|GELU|SiLU)\b")


class UntraceableSiteError(RuntimeError):
    """Some rectifier call sites sit in a forward that torch.fx cannot trace."""


def convert(model: nn.Module, *, channel_dim: ChannelDim = None, track: bool = True, inplace: bool = False, strict: bool = True) -> nn.Module:
    """Replaces every rectifier call site of ``model`` with its own tracked module.

    Sites are ``nn.ReLU``, ``ReLU6``, ``LeakyReLU``, ``PReLU``, ``GELU`` and ``SiLU`` modules and the
    functional calls ``F.relu``, ``torch.relu``, ``F.relu6``, ``F.leaky_relu``, ``F.gelu``,
    ``F.silu``, ``x.relu()`` and their in-place variants. A module called once is swapped in
    place, so the model keeps its classes and attribute names. A module called at several places
    (torchvision's BasicBlock calls ``self.relu`` twice) and functional calls need the calling
    module's forward rewritten: that module (only that one) becomes a ``torch.fx.GraphModule``
    with one site per call, named after the call (``relu``, ``relu_1``, ...), its other
    submodules, parameters and buffers kept under their names. A shared ``nn.PReLU`` stays shared:
    its sites use the same weight.

    Outputs do not change. In-place calls become out-of-place and later uses of their input read
    the result, as before.

    Args:
        model: any ``nn.Module``; not modified unless ``inplace``.
        channel_dim: the neurons' dim at each site. ``None`` infers it: the last dim after a
            Linear or LayerNorm (``(..., C)`` tensors, e.g. transformer MLPs), else dim 1
            (``(N, C, ...)``). An int sets every site; a mapping from site name to dim sets those
            sites and infers the rest.
        track: whether the new sites count ON states while running.
        inplace: convert ``model`` itself instead of a deep copy.
        strict: raise :class:`UntraceableSiteError` when a forward that may call rectifiers
            cannot be traced; with ``False``, warn and leave those sites unconverted.

    Returns:
        the converted model (``model`` itself when ``inplace``).

    Raises:
        ValueError: when the model has no rectifier call site.
        UntraceableSiteError: see ``strict``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter(channel_dim, track)
    model = converter.convert(model, "")
    if converter.untraceable:
        message = "could not convert these rectifier call sites, because torch.fx cannot trace the forward that calls them:\n" + "\n".join(
            f"  - {line}" for line in converter.untraceable
        )
        if strict:
            raise UntraceableSiteError(message + "\nrewrite those forwards without data-dependent control flow, or pass strict=False to leave them unconverted")
        warnings.warn(message, stacklevel=2)
    found = sites(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no rectifier call site (nn.ReLU, ReLU6, LeakyReLU, PReLU, GELU, SiLU modules, "
            "or F.relu / F.relu6 / F.leaky_relu / F.gelu / F.silu / Tensor.relu calls); nothing to convert"
        )
    _order_by_execution(model)
    _ignore_counts_in_ddp(model, found)
    return model


def sites(model: nn.Module) -> dict[str, EntropyActivation]:
    """The entropy-tracking sites of a converted model, in forward-execution order.

    Args:
        model: a model returned by :func:`convert` (or any model holding easier_ext sites).

    Returns:
        ``{name: module}``; names are the modules' qualified names (stable across runs and
        processes), e.g. ``"layer1.0.relu"``, ``"layer1.0.relu_1"``.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, EntropyActivation)}


def site(model: nn.Module, name: str) -> EntropyActivation:
    """One site by name.

    Raises:
        KeyError: naming the closest known sites when ``name`` is not one.
    """
    found = sites(model)
    if name in found:
        return found[name]
    import difflib

    close = difflib.get_close_matches(name, list(found), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; the model has {len(found)} sites: {', '.join(found) or 'none (call easier_ext.convert first)'}"
    raise KeyError(f"unknown site {name!r}{hint}")


class _Converter:
    def __init__(self, channel_dim: ChannelDim, track: bool) -> None:
        if channel_dim is not None and not isinstance(channel_dim, (int, Mapping)):
            raise TypeError(f"channel_dim must be None, an int or a mapping from site name to int, got {type(channel_dim).__name__}")
        self.channel_dim = channel_dim
        self.track = track
        self.untraceable: list[str] = []

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        """Converts ``module``'s own calls, then its children; returns what replaces it."""
        if isinstance(module, EntropyActivation) or isinstance(module, RECTIFIER_MODULES):
            return module  # a rectifier is converted by whoever calls it
        if is_sequential(module):
            self._convert_sequential(module, path)
        elif _may_call_rectifiers(module):
            module = self._convert_traced(module, path)
        for name, child in list(module.named_children()):
            new = self.convert(child, _join(path, name))
            if new is not child:
                setattr(module, name, new)
        return module

    def _site(self, torch_module: nn.Module, name: str, producer: Optional[nn.Module]) -> EntropyActivation:
        dim = self.channel_dim
        if isinstance(dim, Mapping):
            dim = dim.get(name)
        if dim is None:
            dim = -1 if isinstance(producer, _CHANNEL_LAST_PRODUCERS) else 1
        return EntropyActivation.from_module(torch_module, channel_dim=dim, track=self.track)

    def _convert_sequential(self, seq: nn.Sequential, path: str) -> None:
        producer = None
        for name, child in list(seq.named_children()):
            if isinstance(child, RECTIFIER_MODULES):
                setattr(seq, name, self._site(child, _join(path, name), producer))
            if not isinstance(child, _PASS_THROUGH):
                producer = child

    def _convert_traced(self, module: nn.Module, path: str) -> nn.Module:
        try:
            graph = ShallowTracer().trace(module)
        except Exception as e:  # fx raises TraceError, TypeError, NameError, ...
            self._record_untraceable(module, path, e)
            return module
        calls = [n for n in graph.nodes if _rectifier_target(module, n) is not None or rectifier_spec(n) is not None]
        if not calls:
            return module
        targets = [n.target for n in calls if n.op == "call_module"]
        shared = any(targets.count(t) > 1 or "." in t for t in targets)
        if shared or len(targets) != len(calls):
            return self._rewrite(module, path, graph, calls)
        for node in calls:
            producer = _producer(module.get_submodule, node)
            setattr(module, node.target, self._site(getattr(module, node.target), _join(path, node.target), producer))
        _order_children_by_use(module, graph)
        return module

    def _rewrite(self, module: nn.Module, path: str, graph: fx.Graph, calls: list[fx.Node]) -> fx.GraphModule:
        """``module`` as a GraphModule with one site per rectifier call."""
        replaced = {n.target for n in calls if n.op == "call_module"}
        taken = set(dict(module.named_children())) - replaced
        new_sites: dict[str, EntropyActivation] = {}
        for node in calls:
            name = _unique(node.name, taken)
            taken.add(name)
            producer = _producer(lambda t: new_sites[t] if t in new_sites else module.get_submodule(t), node)
            if node.op == "call_module":
                torch_module, inplace = _rectifier_target(module, node), False
            else:
                try:
                    torch_module, inplace = module_from_call(node, rectifier_spec(node))
                except ValueError as e:
                    self.untraceable.append(f"{_join(path, node.name)} in {type(module).__name__}: {e}")
                    continue
            new_site = self._site(torch_module, _join(path, name), producer)
            if isinstance(torch_module, nn.PReLU):
                new_site.weight = torch_module.weight  # a shared PReLU keeps one weight
            new_sites[name] = new_site
            source = node.args[0] if node.args else node.kwargs["input"]
            with graph.inserting_after(node):
                call = graph.call_module(name, (source,))
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            if inplace:
                _read_result_after(graph, source, call)
        attrs = {}
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                attrs[node.target] = new_sites[node.target] if node.target in new_sites else _get_path(module, node.target)
        gm = fx.GraphModule(attrs, graph, class_name=type(module).__name__)
        # Keep everything the module held (also what its forward does not touch) under its name.
        gm._parameters.update(module._parameters)
        gm._buffers.update(module._buffers)
        gm._non_persistent_buffers_set |= module._non_persistent_buffers_set
        for name, child in module.named_children():
            if name not in replaced:
                gm._modules[name] = child
        gm._modules.update(new_sites)
        _order_children_by_use(gm, graph)
        gm.recompile()
        return gm

    def _record_untraceable(self, module: nn.Module, path: str, error: Exception) -> None:
        children = [_join(path, n) for n, c in module.named_children() if isinstance(c, RECTIFIER_MODULES)]
        what = f"its rectifier modules {', '.join(children)}" if children else "the rectifier calls in its forward"
        self.untraceable.append(f"{path or '<model>'} ({type(module).__name__}): {what}; torch.fx: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def _may_call_rectifiers(module: nn.Module) -> bool:
    """Whether tracing ``module``'s forward could find a rectifier call.

    torch.nn's own leaf layers never call one; everything else either has rectifier children or
    may call one functionally, which only its source can tell without tracing.
    """
    if any(isinstance(c, RECTIFIER_MODULES) for c in module.children()):
        return True
    if type(module).__module__.startswith("torch.nn.") and not list(module.children()):
        return False
    if isinstance(module, fx.GraphModule):
        return _RECTIFIER_NAME.search(module.code) is not None
    try:
        source = inspect.getsource(type(module))
    except (OSError, TypeError):
        return True  # no source to read: trace to be sure
    return _RECTIFIER_NAME.search(source) is not None


def _rectifier_target(module: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    target = module.get_submodule(node.target)
    return target if isinstance(target, RECTIFIER_MODULES) and not isinstance(target, EntropyActivation) else None


def _producer(get_submodule: Callable[[str], nn.Module], node: fx.Node) -> Optional[nn.Module]:
    """The module whose output a call's input is, looking through Dropout and Identity."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    while isinstance(source, fx.Node) and source.op == "call_module":
        producer = get_submodule(source.target)
        if not isinstance(producer, _PASS_THROUGH):
            return producer
        source = source.args[0] if source.args else None
    return None


def _read_result_after(graph: fx.Graph, source: fx.Node, result: fx.Node) -> None:
    """After an in-place call became out-of-place, later readers of its input read its result."""
    after = False
    for node in graph.nodes:
        if node is result:
            after = True
        elif after and source in node.all_input_nodes:
            node.replace_input_with(source, result)


def _order_children_by_use(root: nn.Module, graph: fx.Graph) -> None:
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


def _order_by_execution(model: nn.Module) -> None:
    """Orders every module by first use in the whole model's forward (see
    :func:`_order_children_by_use`), also where a parent that calls no rectifier itself registers
    its children in another order; a model torch.fx cannot trace keeps its order."""
    try:
        graph = FoldTracer().trace(model)
    except Exception:  # fx raises many types; the order is a nicety, never worth failing for
        return
    _order_children_by_use(model, graph)


def _ignore_counts_in_ddp(model: nn.Module, found: dict[str, EntropyActivation]) -> None:
    """DDP must not broadcast rank 0's counts over the other ranks' (measurement all-reduces them)."""
    names = [f"{name}.{buf}" for name in found for buf in ("on_counts", "observations")]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = existing + [n for n in names if n not in existing]


def _get_path(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _unique(name: str, taken: set) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate

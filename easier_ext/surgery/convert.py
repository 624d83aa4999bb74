"""Turn every rectifier call site of a model into its own entropy-tracking module."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch.fx as fx
from torch import nn

from easier_ext.core.modules import EntropyActivation
from easier_ext.core.sites import sites
from easier_ext.surgery.converted import ignore_counts_in_ddp, keep_training_modes, order_by_execution, order_children_by_use, passed_over
from easier_ext.surgery.faithful import (
    OWNER,
    CallerTracer,
    SpecializingTracer,
    Unfaithful,
    faithful_trace,
    make_loadable,
    optional_parameters,
    specialization,
)
from easier_ext.surgery.tracing import (
    FUNCTIONAL_RECTIFIERS,
    RECTIFIER_MODULES,
    ShallowTracer,
    is_sequential,
    module_from_call,
    may_call_rectifiers,
    rectifier_spec,
)

__all__ = ["convert", "UntraceableSiteError"]

ChannelDim = Union[int, Mapping[str, int], None]

# Layers after which the neurons sit on the last dim: (..., features) tensors.
_CHANNEL_LAST_PRODUCERS = (nn.Linear, nn.LayerNorm, nn.Bilinear)
# Layers that pass their input through unchanged in shape, looked through to find the producer.
_PASS_THROUGH = (nn.Dropout, nn.Identity)


class UntraceableSiteError(RuntimeError):
    """Some rectifier call sites sit in a forward that torch.fx cannot trace faithfully."""


def convert(model: nn.Module, *, channel_dim: ChannelDim = None, track: bool = True, inplace: bool = False, strict: bool = True) -> nn.Module:
    """Replaces every rectifier call site of ``model`` with its own tracked module.

    Sites are ``nn.ReLU``, ``ReLU6``, ``LeakyReLU``, ``PReLU``, ``GELU``, ``SiLU``, ``Hardswish``,
    ``ELU`` and ``Mish`` modules and the functional calls ``F.relu``, ``torch.relu``, ``F.relu6``,
    ``F.leaky_relu``, ``F.gelu``, ``F.silu``, ``F.hardswish``, ``F.elu``, ``F.mish``, ``x.relu()``
    and their in-place variants. Other activations (Hardsigmoid, SELU, CELU, Softplus, ...) are
    left as they are and named in a warning. A module called once is swapped in
    place, so the model keeps its classes and attribute names. A module called at several places
    (torchvision's BasicBlock calls ``self.relu`` twice) and functional calls need the calling
    module's forward rewritten: that module (only that one) becomes a ``torch.fx.GraphModule``
    with one site per call, named after the call (``relu``, ``relu_1``, ...), its other
    submodules, parameters and buffers kept under their names. A shared ``nn.PReLU`` stays shared:
    its sites use the same weight.

    Outputs do not change, nor do training modes (a new module takes the mode of what it replaces,
    or of the module it sits in). In-place calls become out-of-place and later uses of their input
    read the result, as before. A forward is only rewritten from a trace that computes what it does:
    one that does not depend on the training mode nor on whether an optional argument is given
    (``if shortcut is None: shortcut = x``). A module whose forward cannot be traced that way on
    its own (such a branch, or ``x[i] = ...`` into the list it is given) is traced as its caller
    calls it: the closest enclosing module whose trace works (up to the whole model) is traced
    through it, and the module is traced again alone with the arguments it gets there fixed (a
    list of tensors of that length, ``None`` where nothing is passed; torch.fx checks the fixed
    ones at every call); its rectifier modules are just swapped when it calls each once. A
    module that can be converted neither way is refused (see ``strict``), never rewritten.

    Args:
        model: any ``nn.Module``; not modified unless ``inplace``.
        channel_dim: the neurons' dim at each site. ``None`` infers it: the last dim after a
            Linear or LayerNorm (``(..., C)`` tensors, e.g. transformer MLPs), else dim 1
            (``(N, C, ...)``). An int sets every site; a mapping from site name to dim sets those
            sites and infers the rest.
        track: whether the new sites count ON states while running.
        inplace: convert ``model`` itself instead of a deep copy.
        strict: raise :class:`UntraceableSiteError` when a forward that may call rectifiers
            cannot be traced faithfully, alone or as part of its callers; with ``False``, warn
            and leave those sites unconverted (the module computes what it did).

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
    existing = set(model.modules())  # holds them: no id is reused by a new module
    modes = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    converter = _Converter(channel_dim, track)
    model, pending = converter.convert(model, "")
    converter.finish(pending)
    keep_training_modes(model, existing, modes)
    if converter.untraceable:
        message = "could not convert these rectifier call sites, because torch.fx cannot trace the forward that calls them faithfully:\n" + "\n".join(
            f"  - {line}" for line in converter.untraceable
        )
        if strict:
            raise UntraceableSiteError(message + "\nrewrite those forwards without such control flow, or pass strict=False to leave them unconverted")
        warnings.warn(message, stacklevel=2)
    if converter.unused:
        warnings.warn(
            f"left unconverted, since torch.fx cannot trace them on their own and the model's forward never calls them: "
            f"{', '.join(converter.unused)}", stacklevel=2,
        )
    found = sites(model)
    passed = passed_over(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no rectifier call site ({', '.join(m.__name__ for m in RECTIFIER_MODULES)} modules, "
            f"or {' / '.join(sorted({f.__name__ for f in FUNCTIONAL_RECTIFIERS}))} / Tensor.relu calls); "
            f"nothing to convert{passed and f' ({passed})'}"
        )
    if passed:
        warnings.warn(f"convert passed over {passed}", stacklevel=2)
    order_by_execution(model)
    ignore_counts_in_ddp(model, found)
    return model


@dataclass
class _Pending:
    """A module whose rectifier calls its own trace cannot convert; a caller's trace may."""

    module: nn.Module
    path: str
    reason: str  # why its own trace cannot be used
    swap_plan: Optional[dict[str, Optional[nn.Module]]] = None  # see _Converter._swap_plan
    callers: str = ""  # why the traces of its callers could not be used either

    def describe(self) -> str:
        children = [_join(self.path, n) for n, c in self.module.named_children() if isinstance(c, RECTIFIER_MODULES)]
        what = f"its rectifier modules {', '.join(children)}" if children else "the rectifier calls in its forward"
        callers = f"; {self.callers}" if self.callers else ""
        return f"{self.path or '<model>'} ({type(self.module).__name__}): {what}; {self.reason}{callers}"


class _Converter:
    def __init__(self, channel_dim: ChannelDim, track: bool) -> None:
        if channel_dim is not None and not isinstance(channel_dim, (int, Mapping)):
            raise TypeError(f"channel_dim must be None, an int or a mapping from site name to int, got {type(channel_dim).__name__}")
        self.channel_dim = channel_dim
        self.track = track
        self.untraceable: list[str] = []
        self.unused: list[str] = []  # untraceable alone, and never called by the model's forward

    def convert(self, module: nn.Module, path: str) -> tuple[nn.Module, list[_Pending]]:
        """Converts ``module``'s children, then its own calls, then the calls of the modules below
        it that could not be converted on their own but can be from its trace.

        Returns:
            what replaces ``module``, and the modules below it (itself included) still waiting
            for a caller's trace.
        """
        if isinstance(module, EntropyActivation) or isinstance(module, RECTIFIER_MODULES):
            return module, []  # a rectifier is converted by whoever calls it
        pending: list[_Pending] = []
        for name, child in list(module.named_children()):
            new, waiting = self.convert(child, _join(path, name))
            if new is not child:
                setattr(module, name, new)
            pending += waiting
        own = None
        if is_sequential(module):
            self._convert_sequential(module, path)
        elif may_call_rectifiers(module):
            module, own = self._convert_traced(module, path)
        if pending and own is None:
            pending = self._convert_from_caller(module, path, pending)
        return module, pending + ([own] if own is not None else [])

    def _site(self, torch_module: nn.Module, name: str, producer: Optional[nn.Module]) -> EntropyActivation:
        dim = self.channel_dim
        if isinstance(dim, Mapping):
            dim = dim.get(name)
        if dim is None:
            dim = -1 if isinstance(producer, _CHANNEL_LAST_PRODUCERS) else 1
        site = EntropyActivation.from_module(torch_module, channel_dim=dim, track=self.track)
        if isinstance(torch_module, nn.PReLU):
            site.weight = torch_module.weight  # the model's own parameter: a PReLU called at several places keeps one
        return site

    def _convert_sequential(self, seq: nn.Sequential, path: str) -> None:
        producer = None
        for name, child in list(seq._modules.items()):  # a module at two places runs twice: a site at each
            if isinstance(child, RECTIFIER_MODULES):
                setattr(seq, name, self._site(child, _join(path, name), producer))
            if not isinstance(child, _PASS_THROUGH):
                producer = child

    def _convert_traced(self, module: nn.Module, path: str) -> tuple[nn.Module, Optional[_Pending]]:
        try:
            _, graph = faithful_trace(module, ShallowTracer)
        except Unfaithful as e:
            variants = [[n for n in g.nodes if _rectifier_target(module, n) is not None or rectifier_spec(n) is not None] for g in e.graphs]
            if e.graphs and not any(variants):
                return module, None  # no way through its forward that torch.fx can trace calls a rectifier
            return module, _Pending(module, path, str(e), self._swap_plan(module, variants) if e.graphs else None)
        return self._convert_graph(module, path, graph), None

    def _swap_plan(self, module: nn.Module, variants: list[list[fx.Node]]) -> Optional[dict[str, Optional[nn.Module]]]:
        """When every traced variant of ``module``'s forward calls each of its rectifier children
        at most once (and nothing else), those children (name: producer): swapping them in place
        keeps the forward as it is, whatever way through it a call takes (one torch.fx could not
        trace might call a child twice: its one site would then count both calls)."""
        plan: dict[str, Optional[nn.Module]] = {}
        for calls in variants:
            swappable = _swappable(calls, "")
            if swappable is None:
                return None
            for name, node in swappable.items():
                plan.setdefault(name, _producer(module.get_submodule, node))
        return plan

    def finish(self, pending: list[_Pending]) -> None:
        """The modules no caller's trace could convert: swaps the rectifier children of those whose
        every traced variant calls each once; the others stay as they are, reported."""
        for p in pending:
            if p.swap_plan is None:
                self.untraceable.append(p.describe())
                continue
            for name, producer in p.swap_plan.items():
                setattr(p.module, name, self._site(getattr(p.module, name), _join(p.path, name), producer))

    def _convert_graph(self, module: nn.Module, path: str, graph: fx.Graph) -> nn.Module:
        """Converts the rectifier calls of ``graph``, a faithful trace of ``module`` alone."""
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
        order_children_by_use(module, graph)
        return module

    def _convert_from_caller(self, caller: nn.Module, path: str, pending: list[_Pending]) -> list[_Pending]:
        """Converts the ``pending`` modules below ``caller`` from a trace of ``caller`` through
        them (and through the modules between); returns those still pending."""
        relative = {id(p.module): p.path[len(path) + 1 :] if path else p.path for p in pending}
        through = set(relative)
        for rel in relative.values():
            parts = rel.split(".")
            through |= {id(caller.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts))}
        where = f"{path or '<model>'} ({type(caller).__name__})"
        try:
            tracer, graph = faithful_trace(caller, lambda: CallerTracer(through, set(relative)))
        except Unfaithful as e:
            for p in pending:
                p.callers = f"nor as part of {where}: {e}"
            return pending
        optional = {n for n in graph.nodes if n.op == "placeholder" and n.target in optional_parameters(caller)}
        left = []
        for p in sorted(pending, key=lambda p: -p.path.count(".")):  # the deepest first: their callers copy them
            if id(p.module) not in tracer.invocations and not path:
                self.unused.append(p.path)  # the model never calls it: left as it is, nothing changes
                continue
            try:
                self._convert_pending(caller, p, relative[id(p.module)], tracer, graph, optional)
            except Unfaithful as e:
                p.callers = f"nor as part of {where}: {e}"
                left.append(p)
        return left

    def _convert_pending(self, caller: nn.Module, p: _Pending, rel: str, tracer: CallerTracer, graph: fx.Graph, optional: set) -> None:
        module = p.module
        invocations = tracer.invocations.get(id(module))
        if not invocations:
            raise Unfaithful("it does not call it as a module (it may be called from higher up)")
        calls = [
            n for n in graph.nodes
            if n.meta[OWNER][0] == id(module) and (_rectifier_target(caller, n) is not None or rectifier_spec(n) is not None)
        ]
        if not calls:
            return
        swapped = _swappable(calls, rel)
        if swapped is not None:  # its forward stays as it is: swapping its modules cannot change it
            for name, node in swapped.items():
                producer = _producer(caller.get_submodule, node)
                setattr(module, name, self._site(getattr(module, name), _join(p.path, name), producer))
            return
        concrete = specialization(module, invocations, optional)
        try:
            _, alone = faithful_trace(module, lambda: SpecializingTracer(concrete), concrete, check_optional=False)
        except Unfaithful as e:
            raise Unfaithful(f"traced alone with the arguments it gets there: {e}") from e
        make_loadable(alone)
        new = self._convert_graph(module, p.path, alone)
        if new is not module:
            parent, _, name = rel.rpartition(".")
            setattr(caller.get_submodule(parent) if parent else caller, name, new)

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
            new_sites[name] = self._site(torch_module, _join(path, name), producer)
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
        order_children_by_use(gm, graph)
        gm.recompile()
        return gm

def _swappable(calls: list[fx.Node], rel: str) -> Optional[dict[str, fx.Node]]:
    """The rectifier children (name: first call) of the module at ``rel`` when ``calls``, its
    rectifier calls in a caller's trace, are calls of its own rectifier children, each at most
    once per call of the module; else None."""
    prefix = f"{rel}." if rel else ""
    first: dict[str, fx.Node] = {}
    seen: set = set()
    for node in calls:
        if node.op != "call_module" or not node.target.startswith(prefix) or "." in node.target[len(prefix) :]:
            return None
        name = node.target[len(prefix) :]
        call = node.meta.get(OWNER, (None, 0))[1]  # which call of the module (a trace of it alone: one)
        if (call, name) in seen:
            return None
        seen.add((call, name))
        first.setdefault(name, node)
    return first


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

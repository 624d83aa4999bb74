"""Traces that keep what a module computes.

torch.fx runs a forward once, with proxies for its arguments, and records one path through it.
Python that looks at an argument without calling a tensor op is not recorded but decided at
trace time: ``if shortcut is None`` is always False for a proxy, ``self.training`` is read once.
A graph traced that way computes something else when the module is later called otherwise.
:func:`faithful_trace` traces a module and refuses (with :class:`Unfaithful`) when the graph
would depend on what it cannot see; :class:`CallerTracer` traces a caller through the modules
that cannot be traced on their own, so that they are seen with the arguments they really get,
and :func:`specialization` turns those arguments into ``concrete_args`` for a trace of the module
alone that torch.fx checks at every call.

What is assumed, as torch.fx does: a required argument of the traced module is a tensor (the
model's own inputs; for a module, its caller's trace says), a forward does not compare its
arguments' identities, and optional arguments are checked one at a time (a forward whose graph
changes only when two of them are both left out is not caught).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from easier_ext.surgery.tracing import ShallowTracer, TraceError, trace

__all__ = [
    "OWNER", "INDEX", "Unfaithful", "faithful_trace", "optional_parameters", "CallerTracer", "Invocation", "specialization",
    "SpecializingTracer", "make_loadable", "check_none",
]

#: ``node.meta`` key: the (module id, invocation number) whose forward created the node.
OWNER = "easier_ext_owner"
#: ``node.meta`` key: the node's creation number in a :class:`CallerTracer` trace.
INDEX = "easier_ext_index"
# The constants torch.fx checks at every call when a trace is specialized on them.
_GUARDED = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


class Unfaithful(Exception):
    """A trace that would not compute what the module computes; the message says why.

    Attributes:
        graphs: the graphs of the variants torch.fx could trace (the forward as it is, in the
            other training mode, with each optional argument at its default); empty when it
            could not trace the forward as it is.
    """

    def __init__(self, message: str, graphs: Optional[list[fx.Graph]] = None) -> None:
        super().__init__(message)
        self.graphs = graphs or []


def faithful_trace(
    root: nn.Module,
    make_tracer: Callable[[], fx.Tracer],
    concrete_args: Optional[dict[str, Any]] = None,
    check_optional: bool = True,
) -> tuple[fx.Tracer, fx.Graph]:
    """Traces ``root`` and checks that the graph does not depend on what torch.fx cannot see.

    The graph must be the same when traced in the other training mode (every module's
    ``training`` flipped), and, with ``check_optional``, the same when each optional argument
    (one with a default) not in ``concrete_args`` is traced as a proxy and as its default (with
    the proxy read as the default): a forward that branches on ``arg is None`` gives two graphs.

    Args:
        root: the module whose forward is traced.
        make_tracer: makes a fresh tracer (one per trace).
        concrete_args: torch.fx's ``concrete_args`` (constants and ``fx.PH`` pytrees).
        check_optional: check the optional arguments (off when the caller's arguments are known).

    Returns:
        the tracer of the first trace (its state describes the trace) and its graph.

    Raises:
        Unfaithful: torch.fx cannot trace the forward, or the graph depends on the training mode
            or on whether an optional argument is given.
    """
    concrete = dict(concrete_args or {})
    tracer = make_tracer()
    graph = _trace(tracer, root, concrete)
    graphs, problems = [graph], []
    try:
        with _flipped_training(root):
            other = _trace(make_tracer(), root, concrete)
        graphs.append(other)
        if not _same(_graph_key(graph), _graph_key(other)):
            problems.append("its forward depends on the training mode (self.training), which a traced graph would fix")
    except Unfaithful as e:
        problems.append(f"in the other training mode, {e}")
    for name, default in (optional_parameters(root) if check_optional else {}).items():
        if name in concrete:
            continue
        try:
            given = _trace(make_tracer(), root, {**concrete, name: default})
        except Unfaithful as e:
            problems.append(f"with its optional argument {name!r} left out, {e}")
            continue
        graphs.append(given)
        dropped = re.compile(rf"{re.escape(name)}_\d+")  # the placeholders torch.fx makes for a fixed argument
        if not _same(_graph_key(graph, substitute={name: default}), _graph_key(given, drop=dropped)):
            problems.append(
                f"its forward depends on whether the optional argument {name!r} is given (`if {name} is None` or the "
                "like), which a trace of this module alone would fix"
            )
    if problems:
        raise Unfaithful(problems[0], graphs)
    return tracer, graph


@dataclass
class Invocation:
    """One call of a module the :class:`CallerTracer` traced through.

    Attributes:
        number: the invocation's number in the trace (``node.meta[OWNER][1]``).
        args, kwargs: the arguments as they were at the call (proxies, constants, containers).
        mutated: the proxies the call put into its argument containers (``x[i] = ...``).
        restructured: the call changed the structure of its argument containers.
        first, last: the range of node numbers (``node.meta[INDEX]``) created by the call.
    """

    number: int
    args: tuple
    kwargs: dict
    mutated: list = field(default_factory=list)
    restructured: bool = False
    first: int = 0
    last: int = 0



class CallerTracer(fx.Tracer):
    """Traces through the modules in ``through`` (every other submodule is a leaf) and records, for
    every node, the innermost traced-through invocation that created it (``node.meta[OWNER]``),
    and every call of the modules in ``watched`` with its arguments (:attr:`invocations`)."""

    def __init__(self, through: set[int], watched: set[int]) -> None:
        super().__init__()
        self.through, self.watched = through, watched
        self.invocations: dict[int, list[Invocation]] = {}
        self._stack: list[tuple[int, int]] = []
        self._calls = 0
        self._nodes = 0

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self.through

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if id(m) not in self.through:
            return super().call_module(m, forward, args, kwargs)
        self._calls += 1
        leaves, spec = pytree.tree_flatten((args, kwargs))
        inv = Invocation(self._calls, *pytree.tree_unflatten(leaves, spec), first=self._nodes)
        if id(m) in self.watched:
            self.invocations.setdefault(id(m), []).append(inv)
        self._stack.append((id(m), self._calls))
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._stack.pop()
        inv.last = self._nodes
        after, after_spec = pytree.tree_flatten((args, kwargs))
        if after_spec != spec:
            inv.restructured = True
        else:
            inv.mutated = [a for a, b in zip(after, leaves) if a is not b]
        return out

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[OWNER] = self._stack[-1] if self._stack else (None, 0)
        node.meta[INDEX] = self._nodes
        self._nodes += 1
        return node


def specialization(module: nn.Module, invocations: list[Invocation], optional_inputs: set[fx.Node]) -> dict[str, Any]:
    """The ``concrete_args`` that trace ``module`` alone as it is called in ``invocations``: a
    proxy argument stays an argument, a container of proxies becomes a ``fx.PH`` pytree, and a
    constant is fixed (torch.fx then checks it at every call).

    Args:
        module: the module called.
        invocations: its calls in a caller's trace (from :class:`CallerTracer`).
        optional_inputs: the caller's own optional arguments: not known to be tensors.

    Returns:
        the ``concrete_args``.

    Raises:
        Unfaithful: the calls differ in which arguments are tensors or in their constants, an
            argument is a constant torch.fx cannot check, is one of the caller's optional
            arguments, or is passed twice, or a call changes the containers it is given in a way
            its caller sees.
    """
    signature = inspect.signature(module.forward)
    first_key, first_concrete = None, None
    for inv in invocations:
        try:
            bound = signature.bind(*inv.args, **inv.kwargs)
        except TypeError as e:
            raise Unfaithful(f"its arguments do not match its forward ({e})") from e
        concrete, key, seen = {}, [], set()
        for name, param in signature.parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                if bound.arguments.get(name):
                    raise Unfaithful(f"it is called with *{name}, which a trace cannot fix")
                continue
            value = bound.arguments.get(name, param.default)
            leaves, spec = pytree.tree_flatten(value)
            marked = []
            for leaf in leaves:
                if isinstance(leaf, fx.Proxy):
                    if leaf.node in optional_inputs:
                        raise Unfaithful(f"its argument {name!r} is its caller's optional argument {leaf.node.target!r}")
                    if leaf.node in seen:
                        raise Unfaithful("it is given the same value twice")
                    seen.add(leaf.node)
                    marked.append(fx.PH)
                elif type(leaf) in _GUARDED:
                    marked.append(leaf)
                else:
                    raise Unfaithful(f"its argument {name!r} holds a {type(leaf).__name__}, which a trace would fix unchecked")
            key.append((name, spec, tuple("tensor" if m is fx.PH else (type(m), m) for m in marked)))
            if not isinstance(value, fx.Proxy):  # a plain proxy stays an ordinary argument
                concrete[name] = pytree.tree_unflatten(marked, spec)
        if inv.restructured:
            raise Unfaithful("its forward changes the structure of the containers it is given (append, ...)")
        for leaf in inv.mutated:
            if not isinstance(leaf, fx.Proxy) or any(not inv.first <= u.meta.get(INDEX, -1) < inv.last for u in leaf.node.users):
                raise Unfaithful("its forward writes into the containers it is given (x[i] = ...) and its caller reads them")
        if first_key is None:
            first_key, first_concrete = key, concrete
        elif not _same(key, first_key):
            raise Unfaithful("it is called with different kinds of arguments at different places")
    return first_concrete or {}


def check_none(value: Any, message: str) -> None:
    """The check a trace specialized on an argument being None makes at every call."""
    if value is not None:
        raise AssertionError(message)


# Recorded, not run, when a graph calling it is traced again (torch.load of a GraphModule does).
fx.wrap("check_none")


def make_loadable(graph: fx.Graph) -> None:
    """Makes a GraphModule of ``graph``, traced by :class:`SpecializingTracer`, load back with
    ``torch.load`` (which traces its code again): torch.fx's None check is replaced by
    :func:`check_none` (a GraphModule calling torch.fx's own cannot be loaded, and loading it
    breaks every later torch.fx trace in the process), and the code is traced again by a
    :class:`ShallowTracer`."""
    from torch.fx._symbolic_trace import _assert_is_none

    for node in graph.nodes:
        if node.op == "call_function" and node.target is _assert_is_none:
            node.target = check_none
            node.meta["is_wrapped"] = True  # the generated code registers it with torch.fx.wrap
    graph._tracer_cls = ShallowTracer


class SpecializingTracer(ShallowTracer):
    """A :class:`ShallowTracer` for ``concrete_args`` that keeps the names of the fixed
    arguments (torch.fx calls them ``name_1``, and a caller passing them by keyword would fail),
    unless an argument is a container, flattened behind a signature that keeps the names."""

    def __init__(self, concrete_args: dict[str, Any]) -> None:
        super().__init__()
        flat = all(pytree.tree_flatten(v)[1].is_leaf() for v in concrete_args.values())
        self.fixed = set(concrete_args) if flat else set()

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None, *rest, **options) -> fx.Proxy:
        if kind == "placeholder" and isinstance(target, str) and target.endswith("_1") and target[:-2] in self.fixed:
            target = target[:-2]
        return super().create_proxy(kind, target, args, kwargs, name, *rest, **options)


def _trace(tracer: fx.Tracer, root: nn.Module, concrete_args: dict[str, Any]) -> fx.Graph:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.fx warns of fixed constants it cannot check: specialization refuses those
            return trace(root, tracer, concrete_args)
    except TraceError as e:
        raise Unfaithful(f"torch.fx: {e.reason}") from e


@contextlib.contextmanager
def _flipped_training(root: nn.Module):
    saved = [(m, m.training) for m in root.modules()]
    for m, training in saved:
        m.training = not training
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def optional_parameters(module: nn.Module) -> dict[str, Any]:
    """``module.forward``'s arguments that have a default: name to default."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p.default for n, p in signature.parameters.items() if p.kind in kinds and p.default is not inspect.Parameter.empty}


def _graph_key(graph: fx.Graph, substitute: Optional[dict[str, Any]] = None, drop: Optional[re.Pattern] = None) -> list:
    """What ``graph`` computes, comparable with :func:`_same`: each node's op, target and arguments,
    with nodes as their position. Placeholders named in ``substitute`` read as those constants;
    placeholders matching ``drop`` (an argument torch.fx fixed) are left out with the checks
    torch.fx added on them."""
    substitute = substitute or {}
    position: dict[fx.Node, Any] = {}
    gone: set[fx.Node] = set()
    key = []
    for node in graph.nodes:
        if node.op == "placeholder" and node.target in substitute:
            position[node] = substitute[node.target]  # read as the constant itself
            continue
        if (node.op == "placeholder" and drop is not None and drop.fullmatch(str(node.target))) or any(n in gone for n in node.all_input_nodes):
            gone.add(node)
            continue
        position[node] = _Ref(len(key))
        args = fx.node.map_aggregate((node.args, node.kwargs), lambda a: position[a] if isinstance(a, fx.Node) else a)
        key.append((node.op, node.target, args))
    return key


@dataclass(frozen=True)
class _Ref:
    """A node's position in a :func:`_graph_key`."""

    position: int


def _same(a: Any, b: Any) -> bool:
    """Structural equality that never raises (tensors by value, everything else by ``==``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False

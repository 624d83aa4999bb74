"""torch.fx helpers shared by conversion, linearization and folding: which calls are rectifiers,
and tracers that stop at the right modules."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from easier_ext.core.modules import TRACKED_MODULES, EntropyActivation

#: torch.nn rectifier modules that :func:`easier_ext.convert` replaces.
RECTIFIER_MODULES = tuple(TRACKED_MODULES)


@dataclass(frozen=True)
class _FunctionalSpec:
    module: type  # the torch.nn module equivalent to the call
    params: tuple  # the call's parameter names, in order
    defaults: dict
    inplace: bool = False  # the call writes into its input whatever its arguments say
    module_args: tuple = ()  # the parameters that are the module's constructor arguments, in order


_RELU = _FunctionalSpec(nn.ReLU, ("input", "inplace"), {"inplace": False})
_RELU_ = _FunctionalSpec(nn.ReLU, ("input",), {}, inplace=True)
_LEAKY = _FunctionalSpec(nn.LeakyReLU, ("input", "negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False},
                         module_args=("negative_slope",))
_LEAKY_ = _FunctionalSpec(nn.LeakyReLU, ("input", "negative_slope"), {"negative_slope": 0.01}, inplace=True,
                          module_args=("negative_slope",))

#: call_function targets that are rectifiers
FUNCTIONAL_RECTIFIERS: dict[Callable, _FunctionalSpec] = {
    F.relu: _RELU,
    torch.relu: _FunctionalSpec(nn.ReLU, ("input",), {}),
    F.relu_: _RELU_,
    torch.relu_: _RELU_,
    F.relu6: _FunctionalSpec(nn.ReLU6, ("input", "inplace"), {"inplace": False}),
    F.leaky_relu: _LEAKY,
    F.leaky_relu_: _LEAKY_,
    F.gelu: _FunctionalSpec(nn.GELU, ("input", "approximate"), {"approximate": "none"}, module_args=("approximate",)),
    F.silu: _FunctionalSpec(nn.SiLU, ("input", "inplace"), {"inplace": False}),
    F.hardswish: _FunctionalSpec(nn.Hardswish, ("input", "inplace"), {"inplace": False}),
    F.elu: _FunctionalSpec(nn.ELU, ("input", "alpha", "inplace"), {"alpha": 1.0, "inplace": False}, module_args=("alpha",)),
    F.elu_: _FunctionalSpec(nn.ELU, ("input", "alpha"), {"alpha": 1.0}, inplace=True, module_args=("alpha",)),
    F.mish: _FunctionalSpec(nn.Mish, ("input", "inplace"), {"inplace": False}),
}
#: call_method targets (``x.relu()``) that are rectifiers
METHOD_RECTIFIERS: dict[str, _FunctionalSpec] = {
    "relu": _FunctionalSpec(nn.ReLU, ("input",), {}),
    "relu_": _RELU_,
}


# A forward whose source names a rectifier function, method or module may call one.
_RECTIFIER_NAME = re.compile(
    r"\b({})\b".format("|".join(sorted(
        {f.__name__ for f in FUNCTIONAL_RECTIFIERS} | set(METHOD_RECTIFIERS) | {m.__name__ for m in RECTIFIER_MODULES}
    )))
)


def may_call_rectifiers(module: nn.Module) -> bool:
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


def rectifier_spec(node: fx.Node) -> Optional[_FunctionalSpec]:
    """The spec of a functional or method rectifier call, else None."""
    if node.op == "call_function":
        try:
            return FUNCTIONAL_RECTIFIERS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return METHOD_RECTIFIERS.get(node.target)
    return None


def bind_call(node: fx.Node, spec: _FunctionalSpec) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    bound = dict(spec.defaults)
    bound.update(zip(spec.params, node.args))
    bound.update(node.kwargs)
    return bound


def module_from_call(node: fx.Node, spec: _FunctionalSpec) -> tuple[nn.Module, bool]:
    """The torch.nn module equivalent to a functional rectifier call, and whether the call was
    in place.

    Raises:
        ValueError: when an argument other than the input is not a constant (computed in
            ``forward``), so no fixed module reproduces the call.
    """
    args = bind_call(node, spec)
    unknown = set(args) - set(spec.params)
    if unknown:
        raise ValueError(f"{node.format_node()}: unexpected arguments {sorted(unknown)}")
    for name, value in args.items():
        if name != "input" and isinstance(value, fx.Node):
            raise ValueError(f"`{node.name}` passes a computed {name!r}; only constant arguments can be converted")
    inplace = spec.inplace or bool(args.get("inplace", False))
    return spec.module(*(args[name] for name in spec.module_args)), inplace


class ShallowTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a single ``call_module``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class FoldTracer(fx.Tracer):
    """Traces a whole model down to torch.nn layers and easier_ext sites (both kept as leaves);
    user modules, Sequentials and GraphModules are traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, EntropyActivation) or super().is_leaf_module(m, module_qualified_name)


def is_sequential(module: nn.Module) -> bool:
    """An nn.Sequential (or subclass) that runs its children in order, once each."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def is_stochastic_depth(node: fx.Node) -> bool:
    """A call of torchvision's ``stochastic_depth`` (Swin's residual branches end in one; torch.fx
    keeps it a call): per-sample dropping of a residual branch in training, the identity in eval."""
    target = node.target
    return (
        node.op == "call_function" and getattr(target, "__name__", None) == "stochastic_depth"
        and str(getattr(target, "__module__", "")).startswith("torchvision.")
    )


class TraceError(RuntimeError):
    """torch.fx could not trace a module. torch.fx raises many exception types (TraceError,
    TypeError, NameError, AssertionError, ...); every trace of easier_ext raises this one instead.

    Attributes:
        reason: the type and first line of torch.fx's error.
    """

    def __init__(self, module: nn.Module, error: Exception) -> None:
        first_line = str(error).splitlines()[0] if str(error) else ""
        self.reason = f"{type(error).__name__}: {first_line}"
        super().__init__(
            f"torch.fx could not trace {type(module).__name__} ({self.reason}); the forward must have no "
            "data-dependent control flow"
        )


def trace(root: nn.Module, tracer: Optional[fx.Tracer] = None, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
    """Traces ``root``'s forward: the one place easier_ext calls torch.fx.

    Args:
        root: the module.
        tracer: the tracer (default a :class:`FoldTracer`).
        concrete_args: torch.fx's ``concrete_args``.

    Returns:
        the graph.

    Raises:
        TraceError: whatever torch.fx raised, with the module named.
    """
    try:
        return (tracer or FoldTracer()).trace(root, concrete_args or None)
    except Exception as e:  # fx raises many types; see TraceError
        raise TraceError(root, e) from e


def trace_model(model: nn.Module, tracer: type = None) -> fx.GraphModule:
    """The whole model as a GraphModule of torch.nn layers and easier_ext sites.

    Args:
        model: the model.
        tracer: the ``fx.Tracer`` class to trace with (default :class:`FoldTracer`).

    Raises:
        TraceError: naming the model when torch.fx cannot trace it.
    """
    graph = trace(model, (tracer or FoldTracer)())
    return fx.GraphModule(model, graph, class_name=type(model).__name__)

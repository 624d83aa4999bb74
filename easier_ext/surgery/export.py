"""Export a model for deployment: ONNX (run with ONNX Runtime) or a ``torch.export`` program
(``.pt2``), each checked against the PyTorch model before it is written.

Example::

    from easier_ext.surgery.export import export_onnx, export_program

    folded = torch.load("runs/easier/final_folded.pt", weights_only=False)
    x = torch.randn(1, 3, 32, 32)
    print(export_onnx(folded, x, "model.onnx"))   # needs: pip install easier_ext[onnx]
    print(export_program(folded, x, "model.pt2"))  # torch only

Both exports trace the model with :func:`torch.export.export` (ONNX then goes through
``torch.onnx.export(..., dynamo=True)``, the exporter torch recommends), in eval mode, on CPU,
from a copy: the model given is left as it was. A model may still hold easier_ext sites
(:class:`easier_ext.EntropyActivation`): each is exported as its torch module (``to_torch()``:
``nn.ReLU``, ..., ``nn.Identity`` once linearized) and a site linearized with a per-neuron
multiplier as that multiplication, so an exported file never needs easier_ext (nor its custom
ops). Folding first (:func:`easier_ext.fold`, or a run's ``final_folded.pt``) is still what makes
the exported model shallower: export does not merge layers.
"""

from __future__ import annotations

import copy
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from easier_ext.core.modules import EntropyActivation
from easier_ext.core.files import atomic_write

__all__ = ["ExportError", "ExportMismatchError", "Exported", "MissingDependencyError", "export_onnx", "export_program"]

#: what ONNX export and the ONNX Runtime backend need (the ``onnx`` extra of easier_ext)
ONNX_REQUIREMENTS = ("onnx", "onnxscript", "onnxruntime")
_ONNX_RTOL, _ONNX_ATOL = 1e-3, 1e-5  # export_onnx's defaults
_INSTALL_HINT = "pip install easier_ext[onnx] (or: pip install onnx onnxscript onnxruntime)"


class ExportError(RuntimeError):
    """The model could not be exported (the message says why and what to try)."""


class ExportMismatchError(ExportError):
    """The exported model's outputs differ from the PyTorch model's on the example input."""


class MissingDependencyError(ImportError):
    """An optional package (onnx, onnxscript, onnxruntime) is not installed."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote and how closely it matches PyTorch.

    Attributes:
        path: the file written.
        format: ``"onnx"`` or ``"pt2"``.
        max_difference: the largest absolute difference between the exported model's outputs
            and the PyTorch model's on the example input, or ``None`` when not checked.
        dynamic_batch: whether the file takes any batch size (dim 0 of every input).
    """

    path: Path
    format: str
    max_difference: float | None
    dynamic_batch: bool

    def __str__(self) -> str:
        checked = "not checked" if self.max_difference is None else f"outputs within {self.max_difference:.2g} of PyTorch's"
        batch = "any batch size" if self.dynamic_batch else "the example's batch size only"
        return f"{self.path} ({self.format}, {batch}, {checked})"


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-5,
) -> Exported:
    """Exports ``model`` to an ONNX file, checked in ONNX Runtime against PyTorch.

    The model is traced with ``torch.export`` and converted by ``torch.onnx.export(...,
    dynamo=True)``; the file is written atomically (the old file, or the complete new one), and
    only once its outputs on ``example_input`` (in an ONNX Runtime CPU session run on the very
    bytes written) match the model's. Files hold the weights inline, so a model must be under
    protobuf's 2 GB.

    Args:
        model: the model (left unchanged; exported in eval mode, on CPU). Sites are exported as
            their torch modules (see the module's docstring).
        example_input: a tensor, or a tuple of tensors (the model's positional arguments).
        path: the ``.onnx`` file to write.
        dynamic_batch: let dim 0 of every input take any size (an example of batch 1 is traced
            at batch 2, since torch.export fixes sizes of 1); False fixes the example's shapes.
        check: compare the ONNX Runtime outputs with the PyTorch model's on ``example_input``.
        rtol, atol: the check passes when ``|onnx - torch| <= atol + rtol * |torch|`` everywhere
            (ONNX Runtime's kernels round differently from PyTorch's; a wrong export is off by far
            more).

    Returns:
        :class:`Exported`.

    Raises:
        MissingDependencyError: onnx, onnxscript or onnxruntime is not installed.
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` not a tensor or a tuple
            of tensors.
        ValueError: ``rtol`` or ``atol`` is negative.
        ExportError: torch.export or the ONNX conversion failed (the message names the cause).
        ExportMismatchError: the outputs differ beyond the tolerance (the message gives the
            largest difference); nothing is written then.
    """
    require_onnx()
    _check_tolerances(rtol, atol)
    plain, args = _prepare(model, example_input)
    data = _onnx_bytes(plain, args, dynamic_batch)
    run = (lambda: _run_session(_session(data), args)) if check else None
    return _write_checked(path, data, "onnx", "ONNX Runtime", run, plain, args, rtol, atol, dynamic_batch)


def export_program(
    model: nn.Module,
    example_input: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Exported:
    """Exports ``model`` with ``torch.export.export`` and saves the program (``torch.export.save``),
    checked against PyTorch.

    Load it with ``torch.export.load(path).module()`` (torch only, no easier_ext). The file is
    written atomically, and only once the program loaded back from the very bytes written gives
    the model's outputs on ``example_input``.

    Args:
        model: the model (left unchanged; exported in eval mode, on CPU). Sites are exported as
            their torch modules (see the module's docstring).
        example_input: a tensor, or a tuple of tensors (the model's positional arguments).
        path: the file to write (``.pt2`` by convention).
        dynamic_batch: let dim 0 of every input take any size (an example of batch 1 is traced
            at batch 2, since torch.export fixes sizes of 1); False fixes the example's shapes.
        check: compare the loaded program's outputs with the PyTorch model's on ``example_input``.
        rtol, atol: the check passes when ``|program - torch| <= atol + rtol * |torch|`` everywhere.

    Returns:
        :class:`Exported`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` not a tensor or a tuple
            of tensors.
        ValueError: ``rtol`` or ``atol`` is negative.
        ExportError: torch.export failed (the message names the cause).
        ExportMismatchError: the outputs differ beyond the tolerance (the message gives the
            largest difference); nothing is written then.
    """
    _check_tolerances(rtol, atol)
    plain, args = _prepare(model, example_input)
    program = _exported_program(plain, args, dynamic_batch)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            return _tensors(torch.export.load(io.BytesIO(data)).module()(*args))

    return _write_checked(path, data, "pt2", "the torch.export program", run if check else None, plain, args, rtol, atol,
                          dynamic_batch)


def _write_checked(path, data: bytes, format: str, what: str, run: Callable[[], list] | None, plain: nn.Module, args: tuple,
                   rtol: float, atol: float, dynamic_batch: bool) -> Exported:
    """Compares what ``run`` gives (the exported file's outputs, read back from ``data``) with the
    model's, when there is a ``run``; then, and only then, writes ``data`` atomically."""
    difference = None if run is None else _compare(what, run(), _reference(plain, args), rtol, atol)
    path = Path(path)
    atomic_write(path, lambda f: f.write(data))
    return Exported(path, format, difference, dynamic_batch)


# -- the ONNX Runtime backend of easier_ext.surgery.latency ---------------------------------------------


def onnxruntime_runner(model: nn.Module, example_input: Any, *, threads: int | None = None) -> Callable[[], Any]:
    """A call that runs ``model`` on ``example_input`` in ONNX Runtime: what
    ``easier_ext.cost(..., backend="onnxruntime")`` times.

    The model is exported to ONNX in memory at the example's shapes (no file) and checked
    against PyTorch as :func:`export_onnx` does; the session runs on ONNX Runtime's CPU
    execution provider, the inputs already converted, so a call times the session alone.

    Args:
        model: the model (left unchanged).
        example_input: a tensor, or a tuple of tensors.
        threads: ONNX Runtime's intra-op threads; ``None`` uses ``torch.get_num_threads()``.

    Returns:
        a function of no arguments returning the session's outputs.

    Raises:
        as :func:`export_onnx`.
    """
    require_onnx()
    plain, args = _prepare(model, example_input)
    session = _session(_onnx_bytes(plain, args, dynamic_batch=False), threads=threads or torch.get_num_threads())
    _compare("ONNX Runtime", _run_session(session, args), _reference(plain, args), _ONNX_RTOL, _ONNX_ATOL)
    feed = _feed(session, args)
    return lambda: session.run(None, feed)


# -- helpers ----------------------------------------------------------------------------------


def require_onnx() -> None:
    """Imports the optional ONNX packages (:data:`ONNX_REQUIREMENTS`).

    Raises:
        MissingDependencyError: naming the missing or broken ones and how to install them.
    """
    names = ONNX_REQUIREMENTS
    missing, broken = [], []
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            # a package importing a missing one (onnxscript without onnx) is not the one missing
            missing.append(e.name if e.name in names else name)
        except ImportError as e:
            broken.append(f"{name} ({_first_line(e)})")
    missing = list(dict.fromkeys(missing))
    if missing:
        raise MissingDependencyError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; {_INSTALL_HINT}")
    if broken:
        raise MissingDependencyError(f"{', '.join(broken)} cannot be imported; reinstall: {_INSTALL_HINT}")


def _check_tolerances(rtol: float, atol: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def _prepare(model: nn.Module, example_input: Any) -> tuple[nn.Module, tuple]:
    """A plain copy of the model (eval, CPU, no easier_ext site) and the example on CPU."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = (example_input,) if isinstance(example_input, torch.Tensor) else example_input
    if not isinstance(args, tuple) or not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(f"example_input must be a tensor or a non-empty tuple of tensors, got {type(example_input).__name__}")
    plain = copy.deepcopy(model).cpu().eval()
    for name, module in list(plain.named_modules()):
        if isinstance(module, EntropyActivation):
            module.track = False  # its forward runs torch's functional, not easier_ext's op
            if module.linearized and module.linear_scale is not None:
                continue  # input * scale: torch ops, kept as they are
            if not name:  # the model is one site
                plain = module.to_torch()
                break
            parent, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(parent), leaf, module.to_torch())
    return plain, tuple(a.detach().cpu() for a in args)


def _trace_args(args: tuple, dynamic_batch: bool) -> tuple:
    """The inputs to trace with: torch.export fixes a size of 1, so a batch of 1 is doubled."""
    if not dynamic_batch:
        return args
    return tuple(torch.cat([a, a]) if a.dim() and a.shape[0] == 1 else a for a in args)


def _exported_program(model: nn.Module, args: tuple, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the plain model, with one shared dynamic batch dim when asked."""
    for i, a in enumerate(args):
        if dynamic_batch and a.dim() == 0:
            raise ValueError(f"input {i} is a scalar tensor, which has no batch dim; export with dynamic_batch=False")
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: batch} for _ in args)
    try:
        with torch.no_grad():
            program = torch.export.export(model, _trace_args(args, dynamic_batch), dynamic_shapes=dynamic)
    except Exception as e:
        hint = ""
        if dynamic_batch and ("specializ" in str(e) or "Constraints violated" in str(e)):
            hint = "; the model fixes its batch size: export with dynamic_batch=False (easier-ext export --static-batch)"
        raise ExportError(f"torch.export could not export {type(model).__name__}: {type(e).__name__}: {_first_line(e)}{hint}") from e
    custom = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("easier_ext")})
    if custom:
        raise ExportError(f"{type(model).__name__} calls {', '.join(custom)} outside a site module; an exported model must run "
                          "torch ops only (fold it first, or call the torch functional instead)")
    return program


def _onnx_bytes(model: nn.Module, args: tuple, dynamic_batch: bool) -> bytes:
    """The model as a serialized ONNX ModelProto (weights inline)."""
    program = _exported_program(model, args, dynamic_batch)
    try:
        onnx_program = torch.onnx.export(program, _trace_args(args, dynamic_batch), dynamo=True, verbose=False)
        return onnx_program.model_proto.SerializeToString()
    except Exception as e:
        raise ExportError(f"torch.onnx.export could not convert {type(model).__name__} to ONNX: {type(e).__name__}: {_first_line(e)}") from e


def _session(data: bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {type(e).__name__}: {_first_line(e)}") from e


def _feed(session, args: tuple) -> dict:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(args):
        raise ExportError(f"the ONNX model takes {len(names)} inputs, the example has {len(args)}")
    return {name: a.numpy() for name, a in zip(names, args)}


def _run_session(session, args: tuple) -> list[torch.Tensor]:
    return [torch.from_numpy(o) for o in session.run(None, _feed(session, args))]


def _reference(model: nn.Module, args: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return _tensors(model(*args))


def _tensors(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def _compare(what: str, actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float, atol: float) -> float:
    """The largest absolute difference; raises when any output is off beyond the tolerance."""
    if len(actual) != len(expected):
        raise ExportMismatchError(f"{what} gives {len(actual)} outputs, the PyTorch model {len(expected)}")
    worst = 0.0
    for i, (a, e) in enumerate(zip(actual, expected)):
        if tuple(a.shape) != tuple(e.shape):
            raise ExportMismatchError(f"{what}'s output {i} has shape {tuple(a.shape)}, PyTorch's {tuple(e.shape)}")
        a, e = a.double(), e.double()
        if a.numel() == 0:
            continue
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))  # equal infinities and NaNs in both differ by 0
        difference = float(torch.where(same, 0.0, (a - e).abs()).max())  # NaN where only one side is NaN
        if not torch.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True):
            raise ExportMismatchError(
                f"{what}'s output {i} differs from PyTorch's by up to {difference:.3g} on the example input "
                f"(allowed: {atol:g} + {rtol:g} * |value|); the exported model does not compute what the model does"
            )
        worst = max(worst, difference)
    return worst


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else ""

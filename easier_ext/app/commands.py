"""The subcommands that work on a model or a run directory: ``measure``, ``fold``, ``export`` and
``report`` (``run`` is :mod:`easier_ext.app.run`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from easier_ext.app.flags import flag_errors
from easier_ext.app.inputs import check_numbers, check_runs_on, init_distributed, load_data, model_from_args, pick_device
from easier_ext.app.report import write_report
from easier_ext.core.files import atomic_write
from easier_ext.methods.options import ScheduleOptions
from easier_ext.surgery.convert import convert
from easier_ext.surgery.costs import compare, compare_latency, cost
from easier_ext.surgery.export import export_onnx, export_program, require_onnx
from easier_ext.surgery.fold import fold
from easier_ext.surgery.measure import measure_entropy

__all__ = ["export_command", "fold_command", "measure_command", "report_command"]


def measure_command(args: argparse.Namespace) -> int:
    """``easier-ext measure``: prints every site's entropy over a dataset split.

    Args:
        args: the parsed flags of ``measure``.

    Returns:
        the exit status, 0.
    """
    check_numbers(args)
    with flag_errors():
        ScheduleOptions.checked("measure_batches", args.measure_batches)
    device = pick_device(args.device)
    init_distributed(device)
    train_loader, val_loader, classes, _ = load_data(args)
    model = model_from_args(args, classes).to(device)
    check_runs_on(model, val_loader, args)
    model = convert(model)
    loader = train_loader if args.split == "train" else val_loader
    result = measure_entropy(model, loader, max_batches=args.measure_batches, train=args.train_mode,
                             aggregate=args.aggregate, device=device, progress=not args.quiet)
    width = max(len(n) for n in result)
    print(f"{'site':<{width}}  entropy (bits)  neurons  constant")
    for name, r in result.items():
        print(f"{name:<{width}}  {r.entropy:14.4f}  {r.neurons.numel():7d}  {'yes' if r.constant else 'no'}")
    return 0


def fold_command(args: argparse.Namespace) -> int:
    """``easier-ext fold``: folds a linearized checkpoint, saves it and prints its costs.

    Args:
        args: the parsed flags of ``fold``.

    Returns:
        the exit status, 0.
    """
    if args.backend == "onnxruntime":
        require_onnx()  # before any work
    _check_shape(args.input_shape)
    model = _load_model(args.checkpoint, "a run's checkpoints/NNN.pt or final_linearized.pt")
    x = _example_input(model, args.input_shape)
    folded = fold(model, x, cost=args.cost)
    out = args.output or args.checkpoint.with_name(args.checkpoint.stem + "_folded.pt")
    atomic_write(out, lambda f: torch.save(folded, f))
    print(compare(cost(model, x, latency=False), cost(folded, x, latency=False)))
    backend = " (ONNX Runtime)" if args.backend == "onnxruntime" else ""
    print(f"latency{backend}: {compare_latency(model, folded, x, backend=args.backend)}")
    print(f"folded model: {out} (torch.load(path, weights_only=False), without easier_ext)")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``easier-ext export``: writes a run's folded model (or a model file) to ONNX and/or a
    ``torch.export`` program, each checked against PyTorch.

    Args:
        args: the parsed flags of ``export``.

    Returns:
        the exit status, 0.
    """
    if args.onnx is None and args.pt2 is None:
        raise ValueError("say what to write: --onnx FILE, --pt2 FILE, or both")
    if args.onnx is not None:
        require_onnx()  # before any work
    shape = args.input_shape
    _check_shape(shape)
    if not args.source.exists():
        raise FileNotFoundError(f"{args.source} does not exist")
    if args.source.is_dir():
        config_path, path = args.source / "config.json", args.source / "final_folded.pt"
        if not config_path.is_file():
            raise FileNotFoundError(f"{args.source} is not a run directory: it has no config.json")
        if not path.is_file():
            raise FileNotFoundError(f"{args.source} has no final_folded.pt: the run has not finished (continue it with "
                                    "easier-ext run --resume), or export a checkpoint file instead")
        if shape is None:
            try:
                size = json.loads(config_path.read_text()).get("image_size")
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{config_path} is not a run's configuration (a JSON object); pass --input-shape") from e
            if not isinstance(size, int):
                raise ValueError(f"{config_path} gives no image size; pass --input-shape")
            shape = [1, 3, size, size]
    else:
        path = args.source
    model = _load_model(path, "a run directory, a run's final_folded.pt or a checkpoint")
    x = _example_input(model, shape if shape is not None else [1, 3, 32, 32])
    common = dict(dynamic_batch=not args.static_batch)
    if args.onnx is not None:
        print(f"ONNX: {export_onnx(model, x, args.onnx, **common)}")
    if args.pt2 is not None:
        print(f"torch.export: {export_program(model, x, args.pt2, **common)}")
    return 0



def report_command(args: argparse.Namespace) -> int:
    """``easier-ext report``: renders a run directory's ``report.md`` and plots.

    Args:
        args: the parsed flags of ``report``.

    Returns:
        the exit status, 0.
    """
    print(write_report(args.run_dir))
    return 0


def _load_model(path: Path, expected: str) -> nn.Module:
    """The model a file holds (a pickled model, or a run checkpoint's ``"model"``), with one-line
    errors for a file that is missing, unreadable or holds something else."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected {expected}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ValueError(f"{path} holds classes of the module {e.name!r}, which is not importable here; run from the "
                         f"folder of {e.name}.py (the --model FILE.py of the run) or add that folder to PYTHONPATH") from e
    except Exception as e:
        raise ValueError(f"{path} is not a file torch.load can read ({type(e).__name__}); expected {expected}") from e
    model = loaded["model"] if isinstance(loaded, dict) and "model" in loaded else loaded
    if not isinstance(model, nn.Module):
        raise TypeError(f"{path} holds a {type(model).__name__}, not a model or a run checkpoint")
    return model


def _check_shape(shape: Optional[Sequence[int]]) -> None:
    if shape is not None and any(n < 1 for n in shape):
        raise ValueError(f"--input-shape must be positive sizes, got {list(shape)}")


def _example_input(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """A random input of ``shape`` (--input-shape), after checking that the model runs on it."""
    _check_shape(shape)
    x = torch.randn(*shape)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:
        raise ValueError(f"the model cannot run on --input-shape {' '.join(map(str, shape))} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass the shape of its input, batch first") from e
    return x

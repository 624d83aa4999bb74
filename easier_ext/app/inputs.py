"""What a subcommand's model and data flags build, each checked with a one-line error that names
the flag: the device, the process group under torchrun, the data loaders and the model."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from easier_ext.app.data import load_dataset
from easier_ext.app.loaders import make_loader
from easier_ext.app.models import build_model

__all__ = [
    "DATASET_DEFAULTS", "DEFAULT_IMAGE_SIZE", "SMALL_INPUT_DATASETS", "check_numbers", "check_runs_on", "init_distributed",
    "load_data", "load_weights", "model_from_args", "pick_device",
]

DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagefolder": 224}
# Training defaults per dataset: quick on the embedded digits (the README's few-minute run);
# CIFAR and ImageFolder expect longer finetunes (the paper uses 160 epochs on CIFAR-10).
DATASET_DEFAULTS = {
    "digits": {"pretrain_epochs": 8, "epochs": 1, "lr": 0.01},
    "cifar10": {"pretrain_epochs": 60, "epochs": 10, "lr": 0.01},
    "cifar100": {"pretrain_epochs": 60, "epochs": 10, "lr": 0.01},
    "imagefolder": {"pretrain_epochs": 30, "epochs": 5, "lr": 0.001},
}
SMALL_INPUT_DATASETS = ("digits", "cifar10", "cifar100")


def pick_device(arg: Optional[str]) -> torch.device:
    """The device ``--device`` names, checked; by default CUDA (this rank's GPU under torchrun)
    where there is one, else the CPU.

    Args:
        arg: ``--device``'s value, or None.

    Returns:
        the device.

    Raises:
        ValueError: not a device, or not one this machine has.
    """
    if arg:
        try:
            device = torch.device(arg)
        except RuntimeError:
            raise ValueError(f"--device {arg} is not a device; expected cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {arg}: no CUDA GPU is available here (torch.cuda.is_available() is False); use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {arg}: easier_ext runs on cpu or cuda, not {device.type}")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> None:
    """Under torchrun (WORLD_SIZE > 1): one process group, nccl on CUDA, gloo on CPU.

    Args:
        device: this process's device.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def load_data(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, int, Optional[int]]:
    """The loaders of ``--dataset`` at ``--image-size`` (or the dataset's default size).

    Args:
        args: the parsed data flags.

    Returns:
        the training and validation loaders, the number of classes, the image size.
    """

    size = args.image_size if args.image_size is not None else DEFAULT_IMAGE_SIZE.get(args.dataset)
    train, val, classes = load_dataset(args.dataset, args.data_root, image_size=size, download=args.download, seed=args.seed)
    train_loader = make_loader(train, args.batch_size, train=True, seed=args.seed, workers=args.workers)
    val_loader = make_loader(val, args.batch_size, train=False, seed=args.seed, workers=args.workers)
    return train_loader, val_loader, classes, size


def model_from_args(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model ``--model`` names (a torchvision name, or ``FILE.py:FUNCTION``), with
    ``--weights`` loaded.

    Args:
        args: the parsed model and data flags.
        num_classes: the dataset's.

    Returns:
        the model, on the CPU.
    """

    small = args.small_input if args.small_input is not None else args.dataset in SMALL_INPUT_DATASETS
    if ":" in args.model and args.model.split(":")[0].endswith(".py"):
        model = _model_from_file(args.model, num_classes)
    else:
        model = build_model(args.model, num_classes, small_input=small)
    if args.weights is not None:
        load_weights(model, args.weights, f"--weights {args.weights}", f"--model {args.model}")
    return model


def load_weights(model: nn.Module, path: Path, what: str, model_name: str) -> None:
    """Loads a state_dict file into ``model``, with a clear error for a file that is not one or
    that belongs to another architecture.

    Args:
        model: the model to load into.
        path: the file.
        what: the file, as the error messages call it (``--weights FILE``).
        model_name: the model, as the error messages call it (``--model NAME``).

    Raises:
        FileNotFoundError, ValueError: no such file, or not a state_dict of this model.
    """
    if not path.exists():
        raise FileNotFoundError(f"{what} does not exist")
    try:
        state = torch.load(path, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{what} is not a state_dict torch.load can read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{what} holds a {type(state).__name__}, not a state_dict (a dict of tensors, from model.state_dict())")
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state.keys() if isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        parts += [f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)})"] if shapes else []
        raise ValueError(f"{what} does not fit {model_name}: keys {', '.join(parts)}; expected a state_dict of this model")
    model.load_state_dict(state)


def check_runs_on(model: nn.Module, loader: DataLoader, args: argparse.Namespace) -> None:
    """One image through the model, so that a size the model cannot take fails here, clearly.

    Args:
        model: the model.
        loader: batches of ``(input, target)``.
        args: the parsed model and data flags (for the message).

    Raises:
        ValueError: the model cannot run on the loader's images.
    """
    x = next(iter(loader))[0][:1]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x.to(next(model.parameters()).device))
    except RuntimeError as e:
        raise ValueError(
            f"--model {args.model} cannot run on {tuple(x.shape[1:])} inputs of {args.dataset} ({str(e).splitlines()[0]}); "
            "pass a larger --image-size (e.g. 32 for VGG's five max-pools)"
        ) from e
    finally:
        model.train(was_training)


_MODEL_FILES: set = set()  # the modules --model FILE.py:FUNCTION loaded


def _model_from_file(spec: str, num_classes: int) -> nn.Module:
    """What ``FUNCTION(num_classes=...)`` of ``--model FILE.py:FUNCTION`` returns."""
    path, _, name = spec.rpartition(":")
    if not Path(path).exists():
        raise FileNotFoundError(f"--model {spec}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    known = sys.modules.get(module_spec.name)
    if known is not None and known not in _MODEL_FILES:
        raise ValueError(f"--model {spec}: a module named {module_spec.name!r} is already imported (from "
                         f"{getattr(known, '__file__', 'built in')}); rename {path}")
    # registered, so that checkpoints can pickle the classes it defines (and load them in this process)
    sys.modules[module_spec.name] = module
    _MODEL_FILES.add(module)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"--model {spec}: importing {path} raised {type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {path} has no function {name!r}")
    try:
        model = factory(num_classes=num_classes)
    except Exception as e:
        raise ValueError(f"--model {spec}: {name}(num_classes={num_classes}) raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {spec}: {name}() returned {type(model).__name__}, not an nn.Module")
    return model


def check_numbers(args: argparse.Namespace) -> None:
    """The numeric data and training flags a subcommand takes, checked before any work (the
    schedule's are checked by its options).

    Args:
        args: the parsed flags.

    Raises:
        ValueError: a flag out of range; the message names it.
    """
    checks = [("image_size", 1, "pixels"), ("batch_size", 1, "images"), ("workers", 0, "loader processes"),
              ("pretrain_epochs", 0, "epochs"), ("epochs", 0, "epochs")]
    for name, low, unit in checks:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low} {unit}, got {value}")
    for name in ("lr", "pretrain_lr"):
        value = getattr(args, name, None)
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if not 0 <= getattr(args, "weight_decay", 0) < float("inf"):
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")

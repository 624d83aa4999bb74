"""``easier-ext``: the EASIER and NEPENTHE schedules and their parts from the command line.

Subcommands: ``run`` (the whole job, ``--method easier|nepenthe``), ``measure`` (site entropies of
a model), ``fold`` (merge a linearized checkpoint), ``export`` (a run's folded model, or a model
file, to ONNX and/or ``torch.export``'s ``.pt2``, checked against PyTorch), ``report`` (Markdown
summary and plots of a run directory).
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

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
# the run options that only one method takes
METHOD_OPTIONS = {"easier": ("fold_aware", "fold_tolerance"), "nepenthe": ("zeta", "allocation", "layer_cap", "temperature")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``easier-ext`` command.

    Every error reaches the user as one line on stderr (``--debug``, or ``EASIER_EXT_DEBUG=1``,
    shows the traceback instead).

    Returns:
        the process exit status: 0, 2 for bad input, 1 for a failure, 130 when interrupted.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        resume = " (continue it with --resume)" if args.command == "run" else ""
        print(f"easier-ext {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"easier-ext {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, _BAD_INPUT) and _explained(e) else 1


# bad input: the user can fix it by changing the command line
_BAD_INPUT = (ValueError, KeyError, FileNotFoundError, TypeError)


def _one_line(e: BaseException) -> str:
    """What went wrong, in one line: the message of our own errors, a named cause for the rest."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device while writing {e.filename or 'a file'}; free some space or use another --run-dir"
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename} (use a folder you can write, e.g. another --run-dir)"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    lines = [line.strip() for line in _message(e).splitlines() if line.strip()]
    text = " ".join(lines) if len(lines) <= 3 else lines[0] + " ..."
    return text if _explained(e) else f"{type(e).__name__}: {text} (run with --debug for the traceback)"


def _message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _explained(e: BaseException) -> bool:
    """Whether the error explains itself: ours, or bad input with a sentence for a message (a
    KeyError of a bare key is a failure, not something the user typed)."""
    return type(e).__module__.startswith("easier_ext") or (isinstance(e, _BAD_INPUT) and " " in _message(e).strip())


# -- parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="easier-ext",
        description="Make networks shallower: measure rectifier entropy, linearize (EASIER) or prune (NEPENTHE), finetune, fold.",
    )
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=os.environ.get("EASIER_EXT_DEBUG", "").lower() not in ("", "0", "false", "no"),
                       help="show the traceback of an error (also EASIER_EXT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole job: train (if needed), linearize within a budget, fold, report",
                         formatter_class=_HelpFormatter, parents=[debug])
    _model_args(run)
    _data_args(run)
    g = run.add_argument_group("schedule")
    g.add_argument("--method", choices=["easier", "nepenthe"], default="easier",
                   help="easier: linearize the lowest-entropy site each iteration; nepenthe: entropy-weighted pruning "
                        "until sites reach zero entropy, then remove those")
    g.add_argument("--budget", type=float, default=1.0, help="largest accepted top-1 drop, in points")
    g.add_argument("--aggregate", choices=["easier", "nepenthe"], default=None,
                   help="layer entropy aggregate (default: the method's own)")
    g.add_argument("--zeta", type=float, default=None,
                   help="nepenthe: fraction of the remaining eligible weights pruned per iteration (default: 0.5)")
    g.add_argument("--allocation", choices=["guarded", "reference"], default=None,
                   help="nepenthe: how an iteration's pruning is shared among sites: guarded (default) empties only layers a "
                        "residual sum bypasses and caps the others; reference is the paper's split, which can empty a layer "
                        "on the only path")
    g.add_argument("--layer-cap", type=float, default=None,
                   help="nepenthe --allocation guarded: largest fraction of a non-bypassed site's remaining weights pruned "
                        "per iteration (default: 0.1)")
    g.add_argument("--temperature", type=float, default=None,
                   help="nepenthe: divides the budget split's softmax logits; above 1 spreads the pruning (default: 1)")
    g.add_argument("--protect", nargs="*", default=[], metavar="SITE", help="sites never linearized (nor pruned)")
    g.add_argument("--measure-batches", type=int, default=None, help="batches per entropy measurement (default: all)")
    g.add_argument("--max-iterations", type=int, default=None, help="cap on linearize-finetune iterations")
    g.add_argument("--patience", type=int, default=0, help="iterations to go on past the budget before stopping (a later finetune may recover)")
    g.add_argument("--fold-aware", action="store_true", help="easier: prefer, among near-equal entropies, sites whose removal lets a merge pay")
    g.add_argument("--fold-tolerance", type=float, default=None,
                   help="easier --fold-aware: how many bits above the lowest entropy a site may be and still be preferred (default: 0.02)")
    g = run.add_argument_group("training")
    g.add_argument("--pretrain-epochs", type=int, default=None,
                   help="train the dense model first for this many epochs (default: 0 with --weights, else digits 8, CIFAR 60, ImageFolder 30)")
    g.add_argument("--pretrain-lr", type=float, default=None,
                   help="learning rate of the dense pretraining (cosine schedule; default: 5x --lr with SGD, --lr with AdamW)")
    g.add_argument("--epochs", type=int, default=None, help="finetune epochs after each linearization (default: digits 1, CIFAR 10, ImageFolder 5)")
    g.add_argument("--lr", type=float, default=None, help="finetune learning rate (default: 0.01; ImageFolder 0.001)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    g.add_argument("--schedule", choices=["multistep", "cosine", "constant"], default="multistep")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    g = run.add_argument_group("output")
    g.add_argument("--run-dir", type=Path, default=None, help="logs, checkpoints, final model, plots (default: runs/METHOD)")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    g.add_argument("--no-latency", action="store_true", help="skip CPU latency measurements")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)

    measure = sub.add_parser("measure", help="print every site's entropy over a dataset",
                             formatter_class=_HelpFormatter, parents=[debug])
    _model_args(measure)
    _data_args(measure)
    measure.add_argument("--split", choices=["train", "val"], default="train")
    measure.add_argument("--aggregate", choices=["easier", "nepenthe"], default="easier")
    measure.add_argument("--measure-batches", type=int, default=None)
    measure.add_argument("--train-mode", action="store_true", help="measure in train mode (BatchNorm statistics restored)")
    measure.add_argument("--quiet", action="store_true")
    measure.set_defaults(handler=_measure)

    fold = sub.add_parser("fold", help="fold a linearized model (a checkpoint of a run) and report its cost",
                          formatter_class=_HelpFormatter, parents=[debug])
    fold.add_argument("checkpoint", type=Path, help="a run's checkpoints/NNN.pt or final_linearized.pt")
    fold.add_argument("--input-shape", type=int, nargs="+", default=[1, 3, 32, 32], help="example input shape")
    fold.add_argument("--cost", choices=["macs", "latency"], default="macs", help="what decides whether a merge pays")
    fold.add_argument("--output", type=Path, default=None, help="where to save the folded model (default: next to the checkpoint)")
    fold.add_argument("--backend", choices=["eager", "onnxruntime"], default="eager",
                      help="what times the latency: PyTorch eager, or ONNX Runtime on CPU (needs easier_ext[onnx])")
    fold.set_defaults(handler=_fold)

    export = sub.add_parser("export", help="export a run's folded model (or a model file) to ONNX and/or a torch.export .pt2",
                            formatter_class=_HelpFormatter, parents=[debug])
    export.add_argument("source", type=Path,
                        help="a run directory (its final_folded.pt, at the run's image size) or a model file (a folded model, "
                             "a run's checkpoint)")
    export.add_argument("--onnx", type=Path, default=None, metavar="FILE",
                        help="write an ONNX file, checked in ONNX Runtime (needs: pip install easier_ext[onnx])")
    export.add_argument("--pt2", type=Path, default=None, metavar="FILE",
                        help="write a torch.export program (load it with torch.export.load(FILE).module())")
    export.add_argument("--input-shape", type=int, nargs="+", default=None,
                        help="example input shape, batch first (default: 1 3 S S for a run directory of image size S, "
                             "else 1 3 32 32)")
    export.add_argument("--static-batch", action="store_true",
                        help="fix the batch size to the example's (default: any batch size)")
    export.set_defaults(handler=_export)

    report = sub.add_parser("report", help="render report.md and plots for a run directory", parents=[debug])
    report.add_argument("run_dir", type=Path)
    report.set_defaults(handler=_report)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        nothing = action.default is None or action.default is False or action.default == [] or action.default is argparse.SUPPRESS
        if nothing or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", help="a torchvision model name, or FILE.py:FUNCTION returning an nn.Module (called with num_classes)")
    g.add_argument("--small-input", dest="small_input", action="store_true", default=None, help="CIFAR-style stem (default for digits/CIFAR)")
    g.add_argument("--no-small-input", dest="small_input", action="store_false")
    g.add_argument("--weights", type=Path, default=None, help="a state_dict (.pt) of the dense model")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0)


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help="digits (embedded), cifar10, cifar100, imagefolder")
    g.add_argument("--data-root", type=Path, default=None, help="folder of CIFAR or of an ImageFolder (train/ and val/)")
    g.add_argument("--download", action="store_true", help="download CIFAR into --data-root")
    g.add_argument("--image-size", type=int, default=None, help="input size (default per dataset: digits 16, CIFAR 32, ImageFolder 224)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=0)


# -- shared setup -----------------------------------------------------------------------------
def _device(arg: Optional[str]) -> torch.device:
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


def _init_distributed(device: torch.device) -> None:
    """Under torchrun (WORLD_SIZE > 1): one process group, nccl on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _load_data(args):
    from easier_ext.app.data import load_dataset, make_loader

    size = args.image_size if args.image_size is not None else DEFAULT_IMAGE_SIZE.get(args.dataset)
    train, val, classes = load_dataset(args.dataset, args.data_root, image_size=size, download=args.download, seed=args.seed)
    train_loader = make_loader(train, args.batch_size, train=True, seed=args.seed, workers=args.workers)
    val_loader = make_loader(val, args.batch_size, train=False, seed=args.seed, workers=args.workers)
    return train_loader, val_loader, classes, size


def _build_model(args, num_classes: int) -> nn.Module:
    from easier_ext.app.models import build_model

    small = args.small_input if args.small_input is not None else args.dataset in SMALL_INPUT_DATASETS
    if ":" in args.model and args.model.split(":")[0].endswith(".py"):
        model = _model_from_file(args.model, num_classes)
    else:
        model = build_model(args.model, num_classes, small_input=small)
    if args.weights is not None:
        _load_weights(model, args.weights, f"--weights {args.weights}", f"--model {args.model}")
    return model


def _load_weights(model: nn.Module, path: Path, what: str, model_name: str) -> None:
    """Loads a state_dict file into ``model``, with a clear error for a file that is not one or
    that belongs to another architecture."""
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


def _check_runs_on(model: nn.Module, loader, args) -> None:
    """One image through the model, so that a size the model cannot take fails here, clearly."""
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


# -- subcommands ------------------------------------------------------------------------------
class CommandError(Exception):
    """A failure the command explains in its message (printed as it is, exit status 1)."""


def _check_numbers(args) -> None:
    """The numeric options every subcommand with data takes, checked before any work."""
    checks = [("image_size", 1, "pixels"), ("batch_size", 1, "images"), ("workers", 0, "loader processes"),
              ("measure_batches", 1, "batches (omit it to measure the whole split)")]
    checks += [("pretrain_epochs", 0, "epochs"), ("epochs", 0, "epochs"), ("max_iterations", 1, "iterations"), ("patience", 0, "iterations")]
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


def _check_run_options(args) -> dict:
    """The method's own options, as given (unset ones take the method's defaults), after checking
    every option that can be checked without the model or the data."""
    if not 0 <= args.budget <= 100:  # also refuses nan
        raise ValueError(f"--budget must be in [0, 100] top-1 points, got {args.budget}")
    _check_numbers(args)
    names = [name for options in METHOD_OPTIONS.values() for name in options]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None and getattr(args, name) is not False}
    for name in sorted(given.keys() - set(METHOD_OPTIONS[args.method])):
        owner = next(m for m, owned in METHOD_OPTIONS.items() if name in owned)
        raise ValueError(f"--{name.replace('_', '-')} applies to --method {owner} only")
    # checked here as well as by the method, so that the message names the flag
    if "zeta" in given and not 0 < args.zeta <= 1:
        raise ValueError(f"--zeta must be in (0, 1] (the fraction of remaining weights pruned per iteration), got {args.zeta}")
    if "layer_cap" in given and args.allocation == "reference":
        raise ValueError("--layer-cap applies to --allocation guarded only (the reference split caps a site only at empty)")
    if "layer_cap" in given and not 0 < args.layer_cap <= 1:
        raise ValueError(f"--layer-cap must be in (0, 1] (a fraction of a site's remaining weights), got {args.layer_cap}")
    if "temperature" in given and not 0 < args.temperature < float("inf"):
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if "fold_tolerance" in given and not 0 <= args.fold_tolerance < float("inf"):
        raise ValueError(f"--fold-tolerance must be a finite number >= 0 bits, got {args.fold_tolerance}")
    return given


def _run(args) -> int:
    from easier_ext.core.sites import sites
    from easier_ext.methods.easier import EASIER
    from easier_ext.methods.nepenthe import NEPENTHE
    from easier_ext.methods.rundir import is_main_process, seed_everything
    from easier_ext.methods.train import NonFiniteLossError, Recipe, finetune

    given = _check_run_options(args)
    args.run_dir = args.run_dir or Path("runs") / args.method
    aggregate = args.aggregate or args.method
    device = _device(args.device)
    _init_distributed(device)
    seed_everything(args.seed)
    train_loader, val_loader, classes, size = _load_data(args)
    defaults = DATASET_DEFAULTS[args.dataset]
    epochs = args.epochs if args.epochs is not None else defaults["epochs"]
    lr = args.lr if args.lr is not None else defaults["lr"]
    pretrain = args.pretrain_epochs if args.pretrain_epochs is not None else (0 if args.weights else defaults["pretrain_epochs"])
    model = _build_model(args, classes).to(device)
    _check_runs_on(model, val_loader, args)
    recipe = Recipe(epochs=epochs, lr=lr, optimizer=args.optimizer, schedule=args.schedule,
                    weight_decay=args.weight_decay, amp=not args.no_amp)
    config = {"model": args.model, "small_input": args.small_input, "weights": str(args.weights) if args.weights else None,
              "dataset": args.dataset, "image_size": size, "batch_size": args.batch_size, "method": args.method,
              "pretrain_epochs": pretrain}
    if args.pretrain_lr is not None:  # recorded when given (else it follows from the recipe's lr and optimizer)
        config["pretrain_lr"] = args.pretrain_lr
    pretrain_lr = args.pretrain_lr if args.pretrain_lr is not None else (lr * 5 if args.optimizer == "sgd" else lr)
    example = next(iter(val_loader))[0][:2].to(device)
    common = dict(example_input=example, budget=args.budget, recipe=recipe, protect=args.protect, aggregate=aggregate,
                  measure_batches=args.measure_batches, max_iterations=args.max_iterations, patience=args.patience,
                  run_dir=args.run_dir, resume=args.resume, config=config, latency=not args.no_latency, device=device,
                  seed=args.seed, progress=not args.quiet)
    method = NEPENTHE if args.method == "nepenthe" else EASIER
    # Every check (options, sites, traceability, the run directory's configuration, lock and free
    # space) comes before the pretraining: config.json is the first file a run writes.
    schedule = method(model, train_loader, val_loader, **given, **common)
    try:
        schedule.run_dir.check_space(_checkpoint_bytes(model))
        pretrained = args.run_dir / "dense.pt"
        if schedule.run_dir.iterations():
            pass  # resumed: the last checkpoint holds the model
        elif pretrain and pretrained.exists():  # the run directory allows it only with --resume
            _load_weights(model, pretrained, f"{pretrained} (this run's pretrained weights)", f"--model {args.model}")
        elif pretrain:
            try:
                finetune(model, train_loader, Recipe(epochs=pretrain, lr=pretrain_lr, optimizer=args.optimizer, schedule="cosine",
                                                     weight_decay=args.weight_decay, amp=not args.no_amp),
                         device=device, progress=not args.quiet, desc="pretrain")
            except NonFiniteLossError as e:
                raise CommandError(f"pretraining failed: {e} (--pretrain-lr sets its learning rate)") from e
            schedule.run_dir.save_state_dict("dense.pt", model.state_dict())
        schedule.start_from(model)
        result = schedule.run()
        if is_main_process():
            print(_summary_table(result, len(sites(schedule.model)), result.example_images))
            try:
                from easier_ext.app.report import write_report

                print(f"report: {write_report(args.run_dir)}")
            except ImportError:
                pass
            print(f"folded model: {args.run_dir / 'final_folded.pt'} (torch.load(path, weights_only=False), without easier_ext)")
            if result.sparsity is not None:
                print(f"sparse model: {args.run_dir / schedule.unfolded_name} (pruned weights, before folding)")
    finally:
        schedule.close()
    return 0


def _checkpoint_bytes(model: nn.Module) -> int:
    """Room for what a run writes at once: the dense weights, two checkpoints and the two final
    models, each about the size of the model's tensors."""
    tensors = [*model.parameters(), *model.buffers()]
    return 5 * sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)


def _summary_table(result, total_sites: int, images: int) -> str:
    """The run's outcome; every change is said one way round: before -> after, and how many times
    smaller or faster the result is. Costs were measured on ``images`` images at once: MACs and
    latency are given per batch of those, MACs also per image."""
    b, a = result.before, result.after
    rows = [
        ("dense top-1", f"{result.dense_accuracy:.2f} %"),
        ("final top-1", f"{result.accuracy:.2f} % ({result.accuracy - result.dense_accuracy:+.2f})"),
        ("sites removed", f"{len(result.removed)}/{total_sites}: {', '.join(result.removed) or '-'}"),
        *([("sparsity", f"{100 * result.sparsity:.1f} % of the weights feeding sites")] if result.sparsity is not None else []),
        ("depth", f"{b.depth} -> {a.depth}"),
        ("params", f"{b.params / 1e6:.2f} M -> {a.params / 1e6:.2f} M ({b.params / max(a.params, 1):.2f}x fewer)"),
        ("MACs/image", f"{b.macs / images / 1e6:.1f} M -> {a.macs / images / 1e6:.1f} M ({b.macs / max(a.macs, 1):.2f}x fewer)"),
        (f"latency ({images} images)",
         f"{b.latency_s * 1e3:.2f} ms -> {a.latency_s * 1e3:.2f} ms: {result.latency}" if result.latency else "not measured"),
        *([("not merged", f"{len(result.unmerged)} chain(s) that would pay: their convs pad inside (summary.json 'unmerged')")]
          if result.unmerged else []),
        ("stopped", result.stopped or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _measure(args) -> int:
    from easier_ext.surgery.convert import convert
    from easier_ext.surgery.measure import measure_entropy

    _check_numbers(args)
    device = _device(args.device)
    _init_distributed(device)
    train_loader, val_loader, classes, _ = _load_data(args)
    model = _build_model(args, classes).to(device)
    _check_runs_on(model, val_loader, args)
    model = convert(model)
    loader = train_loader if args.split == "train" else val_loader
    result = measure_entropy(model, loader, max_batches=args.measure_batches, train=args.train_mode,
                             aggregate=args.aggregate, device=device, progress=not args.quiet)
    width = max(len(n) for n in result)
    print(f"{'site':<{width}}  entropy (bits)  neurons  constant")
    for name, r in result.items():
        print(f"{name:<{width}}  {r.entropy:14.4f}  {r.neurons.numel():7d}  {'yes' if r.constant else 'no'}")
    return 0


def _fold(args) -> int:
    from easier_ext.surgery.costs import compare, compare_latency, cost
    from easier_ext.surgery.fold import fold
    from easier_ext.core.files import atomic_write

    if args.backend == "onnxruntime":
        from easier_ext.surgery.export import require_onnx

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


def _export(args) -> int:
    import json

    from easier_ext.surgery.export import export_onnx, export_program, require_onnx

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


def _report(args) -> int:
    from easier_ext.app.report import write_report

    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

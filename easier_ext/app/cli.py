"""``easier-ext``: the EASIER and NEPENTHE schedules and their parts from the command line: the
parser, and errors as one line each.

Subcommands: ``run`` (the whole job, ``--method easier|nepenthe``; :mod:`easier_ext.app.run`),
``measure`` (site entropies of a model), ``fold`` (merge a linearized checkpoint), ``export`` (a
run's folded model, or a model file, to ONNX and/or ``torch.export``'s ``.pt2``, checked against
PyTorch), ``report`` (Markdown summary and plots of a run directory); these four are in
:mod:`easier_ext.app.commands`.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from easier_ext.app.commands import export_command, fold_command, measure_command, report_command
from easier_ext.app.flags import add_option_flags, add_schedule_flags
from easier_ext.app.run import run_command
from easier_ext.methods.train import OPTIMIZERS, SCHEDULES
from easier_ext.surgery.costs import BACKENDS
from easier_ext.surgery.fold import FOLD_COSTS

__all__ = ["main"]


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
    """The ``easier-ext`` parser: a subparser per subcommand, each naming its handler."""
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
    add_schedule_flags(run.add_argument_group("schedule"))
    g = run.add_argument_group("training")
    g.add_argument("--pretrain-epochs", type=int, default=None,
                   help="train the dense model first for this many epochs (default: 0 with --weights, else digits 8, CIFAR 60, ImageFolder 30)")
    g.add_argument("--pretrain-lr", type=float, default=None,
                   help="learning rate of the dense pretraining (cosine schedule; default: 5x --lr with SGD, --lr with AdamW)")
    g.add_argument("--epochs", type=int, default=None, help="finetune epochs after each linearization (default: digits 1, CIFAR 10, ImageFolder 5)")
    g.add_argument("--lr", type=float, default=None, help="finetune learning rate (default: 0.01; ImageFolder 0.001)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    g.add_argument("--schedule", choices=SCHEDULES, default="multistep")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    g = run.add_argument_group("output")
    g.add_argument("--run-dir", type=Path, default=None, help="logs, checkpoints, final model, plots (default: runs/METHOD)")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    g.add_argument("--no-latency", action="store_true", help="skip CPU latency measurements")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=run_command)

    measure = sub.add_parser("measure", help="print every site's entropy over a dataset",
                             formatter_class=_HelpFormatter, parents=[debug])
    _model_args(measure)
    _data_args(measure)
    measure.add_argument("--split", choices=["train", "val"], default="train")
    add_option_flags(measure, ["aggregate", "measure_batches"])
    measure.add_argument("--train-mode", action="store_true", help="measure in train mode (BatchNorm statistics restored)")
    measure.add_argument("--quiet", action="store_true")
    measure.set_defaults(handler=measure_command)

    fold = sub.add_parser("fold", help="fold a linearized model (a checkpoint of a run) and report its cost",
                          formatter_class=_HelpFormatter, parents=[debug])
    fold.add_argument("checkpoint", type=Path, help="a run's checkpoints/NNN.pt or final_linearized.pt")
    fold.add_argument("--input-shape", type=int, nargs="+", default=[1, 3, 32, 32], help="example input shape")
    fold.add_argument("--cost", choices=FOLD_COSTS, default="macs", help="what decides whether a merge pays")
    fold.add_argument("--output", type=Path, default=None, help="where to save the folded model (default: next to the checkpoint)")
    fold.add_argument("--backend", choices=BACKENDS, default="eager",
                      help="what times the latency: PyTorch eager, or ONNX Runtime on CPU (needs easier_ext[onnx])")
    fold.set_defaults(handler=fold_command)

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
    export.set_defaults(handler=export_command)

    report = sub.add_parser("report", help="render report.md and plots for a run directory", parents=[debug])
    report.add_argument("run_dir", type=Path)
    report.set_defaults(handler=report_command)
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


if __name__ == "__main__":
    sys.exit(main())

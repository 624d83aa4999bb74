"""``easier-ext run``: the whole job (pretrain when needed, run the schedule, report), checked
before any work, and its summary table."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from torch import nn

from easier_ext.app.flags import METHODS, schedule_options
from easier_ext.app.inputs import (
    DATASET_DEFAULTS, check_numbers, check_runs_on, init_distributed, load_data, load_weights, model_from_args, pick_device,
)
from easier_ext.app.report import write_report
from easier_ext.core.sites import sites
from easier_ext.methods import train  # train.finetune is looked up when called, so that a wrapped one is called
from easier_ext.core.runtime import is_main_process
from easier_ext.methods.rundir import seed_everything
from easier_ext.methods.schedule import ScheduleResult

__all__ = ["CommandError", "run_command"]


class CommandError(Exception):
    """A failure the command explains in its message (printed as it is, exit status 1)."""


def run_command(args: argparse.Namespace) -> int:
    """Runs ``easier-ext run``: checks every flag, the model, the data and the run directory;
    pretrains the dense model when asked (or resumes); runs the schedule; prints the summary and
    writes the report.

    Args:
        args: the parsed flags of ``run``.

    Returns:
        the exit status, 0.

    Raises:
        ValueError, KeyError, FileNotFoundError, TypeError: bad input, before any work.
        CommandError: the pretraining failed.
    """
    options = schedule_options(args)
    check_numbers(args)
    args.run_dir = args.run_dir or Path("runs") / args.method
    device = pick_device(args.device)
    init_distributed(device)
    seed_everything(args.seed)
    train_loader, val_loader, classes, size = load_data(args)
    defaults = DATASET_DEFAULTS[args.dataset]
    epochs = args.epochs if args.epochs is not None else defaults["epochs"]
    lr = args.lr if args.lr is not None else defaults["lr"]
    pretrain = args.pretrain_epochs if args.pretrain_epochs is not None else (0 if args.weights else defaults["pretrain_epochs"])
    model = model_from_args(args, classes).to(device)
    check_runs_on(model, val_loader, args)
    recipe = train.Recipe(epochs=epochs, lr=lr, optimizer=args.optimizer, schedule=args.schedule,
                          weight_decay=args.weight_decay, amp=not args.no_amp)
    config = {"model": args.model, "small_input": args.small_input, "weights": str(args.weights) if args.weights else None,
              "dataset": args.dataset, "image_size": size, "batch_size": args.batch_size, "method": args.method,
              "pretrain_epochs": pretrain}
    if args.pretrain_lr is not None:  # recorded when given (else it follows from the recipe's lr and optimizer)
        config["pretrain_lr"] = args.pretrain_lr
    pretrain_lr = args.pretrain_lr if args.pretrain_lr is not None else (lr * 5 if args.optimizer == "sgd" else lr)
    example = next(iter(val_loader))[0][:2].to(device)
    # Every check (options, sites, traceability, the run directory's configuration, lock and free
    # space) comes before the pretraining: config.json is the first file a run writes.
    schedule = METHODS[args.method](
        model, train_loader, val_loader, example_input=example, options=options, recipe=recipe, run_dir=args.run_dir,
        resume=args.resume, config=config, latency=not args.no_latency, device=device, seed=args.seed, progress=not args.quiet,
    )
    try:
        schedule.run_dir.check_space(_checkpoint_bytes(model))
        pretrained = args.run_dir / "dense.pt"
        if schedule.run_dir.iterations():
            pass  # resumed: the last checkpoint holds the model
        elif pretrain and pretrained.exists():  # the run directory allows it only with --resume
            load_weights(model, pretrained, f"{pretrained} (this run's pretrained weights)", f"--model {args.model}")
        elif pretrain:
            try:
                train.finetune(model, train_loader, replace(recipe, epochs=pretrain, lr=pretrain_lr, schedule="cosine"),
                               device=device, progress=not args.quiet, desc="pretrain")
            except train.NonFiniteLossError as e:
                raise CommandError(f"pretraining failed: {e} (--pretrain-lr sets its learning rate)") from e
            schedule.run_dir.save_state_dict("dense.pt", model.state_dict())
        schedule.start_from(model)
        result = schedule.run()
        if is_main_process():
            print(_summary_table(result, len(sites(schedule.model)), result.example_images))
            try:
                print(f"report: {write_report(args.run_dir)}")
            except ImportError:
                pass  # no matplotlib: the run's results stand without the report
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


def _summary_table(result: ScheduleResult, total_sites: int, images: int) -> str:
    """The run's outcome; every change is said one way round: before -> after, and how many times
    smaller or faster the result is.

    Args:
        result: what the schedule returned.
        total_sites: the model's sites before any removal.
        images: the batch size of the example input the costs were measured on: MACs and latency
            are given per batch of those, MACs also per image.

    Returns:
        the table, one row per line.
    """
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

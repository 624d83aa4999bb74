"""EASIER and NEPENTHE end to end on the embedded digits, from the same dense model: how many
rectifier sites go within a 1-point budget, how sparse NEPENTHE leaves the weights, and what
folding then does to depth, MACs and CPU latency.

For each model (CIFAR-style stems, digits at 16x16; 32x32 for VGG, whose five max-pools need it;
a Swin-T-shaped model sized for the digits, see ``easier_ext.build_model("swin_t", small_input=True)``):
the first method's ``easier-ext run`` trains the dense model and every later method starts from
those weights (``--weights``), each run through the CLI (the same code path users take); then
the dense (BatchNorm folded) and the returned folded model are timed on a batch of 128 in
paired rounds (``easier_ext.compare_latency``).

Run: python benchmarks/bench_methods.py [--models resnet18 vgg16_bn mobilenet_v2 swin_t] [--methods easier nepenthe]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from easier_ext import LatencyComparison, compare_latency, fold
from easier_ext.app.cli import main as cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine  # noqa: E402

MODELS = ("resnet18", "vgg16_bn", "mobilenet_v2", "swin_t")
METHODS = ("easier", "nepenthe")
IMAGE_SIZE = {"vgg16_bn": 32}  # five max-pools: 16x16 would pool to nothing
# Swin trains with AdamW: 1e-3 to pretrain; a finetune at 1e-3 costs 5 points even with nothing removed
MODEL_ARGS = {"swin_t": ["--optimizer", "adamw", "--pretrain-lr", "1e-3", "--lr", "1e-4"]}


def latency(run_dir: Path, batch: int, rounds: int, size: int) -> LatencyComparison:
    """The dense and the folded model on one batch, timed in paired rounds."""
    dense = torch.load(run_dir / "checkpoints" / "000.pt", weights_only=False)["model"]
    folded = torch.load(run_dir / "final_folded.pt", weights_only=False)
    x = torch.randn(batch, 3, size, size)
    dense = fold(dense, x[:2])  # what one would deploy without EASIER: BatchNorm folded too
    return compare_latency(dense, folded, x, rounds=rounds)


def runs_from_one_dense(name: str, variants: dict[str, list[str]], out: Path, budget: float, resume: bool,
                        dense_weights: Optional[Path] = None) -> dict[str, Path]:
    """``easier-ext run`` of model ``name`` once per variant (its extra options), in ``out/<variant>``:
    all start from ``dense_weights``; without them the first trains the dense model and the others
    start from its ``dense.pt``. With ``resume``, a finished run is kept as it is and an unfinished
    one resumed.

    Returns:
        each variant's run directory.
    """
    dirs = {}
    for variant, options in variants.items():
        run_dir = dirs[variant] = out / variant
        size = (["--image-size", str(IMAGE_SIZE[name])] if name in IMAGE_SIZE else []) + MODEL_ARGS.get(name, [])
        start = ["--weights", str(dense_weights), "--pretrain-epochs", "0"] if dense_weights else []
        if not (resume and (run_dir / "summary.json").exists()):
            status = cli(["run", "--model", name, "--budget", str(budget), "--run-dir", str(run_dir), "--quiet", "--no-latency",
                          *size, *start, *options, *(["--resume"] if resume and run_dir.exists() else [])])
            if status != 0:
                sys.exit(f"easier-ext run {' '.join(options)} failed for {name}")
        dense_weights = dense_weights or run_dir / "dense.pt"
    return dirs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_methods"))
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=128, help="batch of the latency measurement")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--resume", action="store_true", help="continue runs already in --out")
    parser.add_argument("--run-args", default="", help="more easier-ext run options for every run, e.g. '--patience 3'")
    parser.add_argument("--easier-args", default="", help="more options for the EASIER runs only, e.g. '--fold-aware'")
    parser.add_argument("--nepenthe-args", default="", help="more options for the NEPENTHE runs only, e.g. '--zeta 0.3'")
    args = parser.parse_args(argv)
    extra = f"{args.run_args} easier: {args.easier_args or '-'} nepenthe: {args.nepenthe_args or '-'}"
    print(f"torch {torch.__version__}, {machine('cpu')}, digits 16x16, budget {args.budget} point(s), {extra}\n", flush=True)
    rows = []
    for name in args.models:
        variants = {method: ["--method", method, *args.run_args.split(), *getattr(args, f"{method}_args").split()]
                    for method in args.methods}
        for method, run_dir in runs_from_one_dense(name, variants, args.out / name, args.budget, args.resume).items():
            summary = json.loads((run_dir / "summary.json").read_text())
            config = json.loads((run_dir / "config.json").read_text())
            rows.append((name, method, summary, len(config["sites"]), latency(run_dir, args.batch, args.rounds, config["image_size"])))

    print("\n| model | method | dense top-1 | final top-1 | sites removed | sparsity | depth | MACs/image | CPU latency, batch %d "
          "| speedup (paired; middle half of rounds) | finetune epochs |" % args.batch)
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, method, s, n, t in rows:
        b, a = s["before"], s["after"]
        sparse = f"{100 * s['sparsity']:.1f} %" if s.get("sparsity") is not None else "-"
        print(f"| {name} | {method.upper()} | {s['dense_accuracy']:.2f} | {s['accuracy']:.2f} | {len(s['removed'])}/{n} | {sparse} "
              f"| {b['depth']} -> {a['depth']} | {b['macs'] / 2 / 1e6:.1f} M -> {a['macs'] / 2 / 1e6:.1f} M "
              f"| {t.before_s * 1e3:.1f} ms -> {t.after_s * 1e3:.1f} ms | {t.speedup:.2f}x ({t.low:.2f}-{t.high:.2f}) | {s['finetune_epochs']} |")


if __name__ == "__main__":
    main()

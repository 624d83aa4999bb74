"""EASIER as it was against its ways of paying fewer finetunes, side by side from the same dense
weights and within the same budget: how many sites go, how many finetune epochs that took (undone
iterations included), the wall time, the final accuracy, depth and CPU latency.

Variants (``easier-ext run --method easier`` options on top of ``--run-args``):

- ``base``: one site per iteration, a finetune after each (the paper's EASIER);
- ``auto``: ``--sites-per-step auto`` (doubling while within the budget, an over-budget iteration
  undone and the number halved);
- ``probe``: ``auto`` and ``--probe`` (each iteration's sites, then half as many, tried with
  re-estimated BatchNorm statistics and kept without a finetune when within the budget);
- ``probe+reg``: ``probe`` and the entropy regularizer (``--entropy-weight 0.01``);
- ``probe+stop``: ``probe`` and ``--early-stop 4`` (every finetune ends at the first check, every
  4 batches, where the validation accuracy is back within the budget);
- ``probe+stop+reg``: ``probe+stop`` and the regularizer;
- ``probe+stop+cap``: ``probe+stop`` with ``--max-finetune-epochs`` a third of what ``base`` spent
  (the issue's target as a budget the run is given: how many sites it removes within it).

"epochs to base's sites" is what a variant had spent when it first held as many sites as ``base``
removed, within the budget.

The first variant of each model trains the dense model (``easier-ext run`` pretrains it); every
other variant starts from its ``dense.pt``. Run from the repository root:

    python benchmarks/bench_fewer_finetunes.py [--models resnet18 mobilenet_v2 vgg16_bn] [--variants base probe+stop probe+stop+reg]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from easier_ext.app.runlog import load_run
from easier_ext.methods.results import finetune_epochs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine  # noqa: E402
from bench_methods import latency, runs_from_one_dense  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "vgg16_bn")
VARIANTS = {
    "base": [],
    "auto": ["--sites-per-step", "auto"],
    "probe": ["--sites-per-step", "auto", "--probe"],
    "probe+reg": ["--sites-per-step", "auto", "--probe", "--entropy-weight", "0.01"],
    "probe+stop": ["--sites-per-step", "auto", "--probe", "--early-stop", "4"],
    "probe+stop+reg": ["--sites-per-step", "auto", "--probe", "--early-stop", "4", "--entropy-weight", "0.01"],
    "probe+stop+cap": ["--sites-per-step", "auto", "--probe", "--early-stop", "4"],  # and a third of base's epochs
}
CAPPED = {"probe+stop+cap": 1 / 3}  # variants given this share of base's finetune epochs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fewer_finetunes"))
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--run-args", default="--patience 2", help="easier-ext run options for every variant")
    parser.add_argument("--batch", type=int, default=128, help="batch of the latency measurement")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--resume", action="store_true", help="continue the runs already in --out (finished ones are only timed again)")
    args = parser.parse_args(argv)
    if set(args.variants) & set(CAPPED) and "base" not in args.variants:
        parser.error(f"--variants {' '.join(sorted(set(args.variants) & set(CAPPED)))} need base, whose epochs they get a share of")
    print(f"torch {torch.__version__}, {machine('cpu')}, digits, budget {args.budget} point(s), {args.run_args}\n", flush=True)
    rows = []
    for name in args.models:
        variants = {v: ["--method", "easier", *args.run_args.split(), *VARIANTS[v]] for v in args.variants}
        uncapped = {v: options for v, options in variants.items() if v not in CAPPED}
        dirs = runs_from_one_dense(name, uncapped, args.out / name, args.budget, args.resume)
        if set(variants) & set(CAPPED):
            spent = load_run(dirs["base"])["summary"]["finetune_epochs"]
            capped = {v: [*options, "--max-finetune-epochs", f"{CAPPED[v] * spent:.6g}"] for v, options in variants.items() if v in CAPPED}
            dense = next(iter(dirs.values())) / "dense.pt"  # the first run trained it
            dirs.update(runs_from_one_dense(name, capped, args.out / name, args.budget, args.resume, dense))
        for variant, run_dir in dirs.items():
            run = load_run(run_dir)
            rows.append((name, variant, run["summary"], len(run["config"]["sites"]), run["iterations"],
                         latency(run_dir, args.batch, args.rounds, run["config"]["image_size"])))

    print(f"\n| model | variant | dense top-1 | final top-1 | sites removed | finetune epochs | vs base | epochs to base's sites "
          f"| iterations (undone, no finetune) | wall | depth | CPU latency, batch {args.batch} (paired speedup) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {name: s for name, variant, s, *_ in rows if variant == "base"}
    for name, variant, s, n, logs, t in rows:
        epochs = s["finetune_epochs"]
        ratio = f"{epochs / base[name]['finetune_epochs']:.2f}x" if name in base and base[name]["finetune_epochs"] else "-"
        reached = epochs_to_sites(logs, s["dense_accuracy"], args.budget, len(base[name]["removed"])) if name in base else None
        undone = sum(bool(log.get("undone")) for log in logs)
        probed = sum(log.get("finetuned") is False for log in logs)
        wall = sum(log["wall_s"] for log in logs) / 60
        print(f"| {name} | {variant} | {s['dense_accuracy']:.2f} | {s['accuracy']:.2f} | {len(s['removed'])}/{n} | {epochs:.3g} | {ratio} "
              f"| {'-' if reached is None else f'{reached:.3g}'} | {len(logs) - 1} ({undone}, {probed}) | {wall:.1f} min "
              f"| {s['before']['depth']} -> {s['after']['depth']} | {t.before_s * 1e3:.1f} -> {t.after_s * 1e3:.1f} ms ({t.speedup:.2f}x) |")


def epochs_to_sites(logs: list[dict], dense: float, budget: float, sites: int):
    """The finetune epochs a run had spent when it first kept ``sites`` sites linearized within the
    budget (None: it never did)."""
    for i, log in enumerate(logs[1:], start=2):
        if not log.get("undone") and dense - log["val_accuracy"] <= budget and len(log["linearized"]) >= sites:
            return finetune_epochs(logs[:i])
    return None


if __name__ == "__main__":
    main()

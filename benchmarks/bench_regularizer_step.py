"""The entropy regularizer's cost per training step: one SGD step (forward, loss, backward, step)
of a CIFAR-shaped model with no site regularized, with the next site(s) a schedule would push, and
with every site, timed against each other in shuffled paired rounds on the same machine.

Run: python benchmarks/bench_regularizer_step.py [--model resnet18] [--batch 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn

import easier_ext as ee

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine, paired_ratio, sample_calls  # noqa: E402


def training_step(model: nn.Module, sites: list, weight: float, tau: float):
    """One step as finetune takes it, with ``sites`` regularized (none: the plain step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    for s in sites:
        s.regularize(tau)

    def step(batch):
        x, y = batch
        loss = criterion(model(x), y)
        if sites:
            loss = loss + weight * torch.stack([s.entropy_proxy for s in sites]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of timing per variant")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models, variants = {}, {}
    for name, count in [("plain", 0), ("next site", 1), ("next 4 sites", 4), ("every site", None)]:
        model = ee.convert(ee.build_model(args.model, 10, small_input=True)).train()
        found = list(ee.sites(model).values())
        for s in found:
            s.track = False  # as in a schedule's finetune: torch's kernels, no counting
        chosen = found if count is None else found[:count]
        models[name] = model
        variants[name] = training_step(model, chosen, 0.1, 1.0)
    batch = (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))
    samples = sample_calls(variants, batch, "cpu", args.seconds)
    print(f"easier_ext {ee.__version__}, torch {torch.__version__}, {machine('cpu')}, {args.model}, batch {args.batch}\n")
    print("| regularized | sites | step (median) | vs plain (paired) |")
    print("|---|---|---|---|")
    for name, times in samples.items():
        n = 0 if name == "plain" else sum(s.entropy_tau is not None for s in ee.sites(models[name]).values())
        t = statistics.median(times)
        print(f"| {name} | {n} | {t * 1e3:.1f} ms | {paired_ratio(samples, name, 'plain'):.3f}x |")


if __name__ == "__main__":
    main()

"""Whole-model entropy measurement and linearize-and-fold, on CIFAR-style torchvision models.

For resnet18, vgg16_bn and mobilenet_v2 (32x32 input, eval mode, batch 128) it prints:
- the time and peak memory of a plain inference pass, of an easier_ext measurement pass
  (``measure_entropy`` on one batch), and of the hook-based pass the EASIER reference code makes
  (a forward hook per rectifier module keeps the module's input and counts z >= 0 per channel,
  with a ``.item()`` per batch); the memory each keeps after the pass;
- parameters, MACs per image, depth and CPU latency of the plain model and of the model with its
  lowest-entropy half of sites linearized and folded.

The models are randomly initialised and fed random data: the timings and the structural effect of
folding are real, which sites have the lowest entropy is not meaningful (see the EASIER benchmark
for trained models).

Run: python benchmarks/bench_surgery.py [--models resnet18 ...] [--batch 128] [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys

import torch
from torch import nn

import easier_ext as ee

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import fmt_bytes, machine, paired_ratio, peak_extra_bytes, sample_calls  # noqa: E402

MODELS = ("resnet18", "vgg16_bn", "mobilenet_v2")


def hook_based(model: nn.Module) -> tuple[nn.Module, dict]:
    """The EASIER reference code's measurement: hooks on every rectifier module's input."""
    model = copy.deepcopy(model)
    state = {"kept": [], "counts": {}, "entropies": []}

    def hook(module, inputs):
        z = inputs[0]
        state["kept"].append(z)  # the reference keeps each pre-activation of the batch
        dims = [d for d in range(z.dim()) if d != 1]
        counts = (z >= 0).sum(dim=dims)
        key = id(module)
        state["counts"][key] = counts if key not in state["counts"] else state["counts"][key] + counts
        p = counts.double() / (z.numel() // z.shape[1])
        h = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)
        state["entropies"].append(h.mean().item())

    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            m.inplace = False  # the reference forces this, or the kept input would be overwritten
            m.register_forward_pre_hook(hook)
    return model, state


def passes(name: str, batch: int, rounds: int) -> tuple[list, nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    plain = ee.build_model(name, 10, small_input=True).eval()
    converted = ee.convert(plain)
    hooked, state = hook_based(plain)
    x = torch.randn(batch, 3, 32, 32)

    def run_plain(x):
        with torch.no_grad():
            return plain(x)

    def run_measure(x):
        return ee.measure_entropy(converted, [x], progress=False)

    def run_hooks(x):
        state["kept"].clear()
        with torch.no_grad():
            return hooked(x)

    variants = {"plain": run_plain, "easier_ext": run_measure, "hook-based": run_hooks}
    samples = sample_calls(variants, x, "cpu", min_run_time=0, min_rounds=rounds)
    times = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {k: paired_ratio(samples, k, "plain") for k in variants}
    peaks = {k: peak_extra_bytes(fn, x, "cpu") for k, fn in variants.items()}
    kept = {"plain": 0, "easier_ext": sum(s.on_counts.numel() * 8 + 8 for s in ee.sites(converted).values()),
            "hook-based": sum(z.numel() * z.element_size() for z in state["kept"])}
    row = [name, times, ratios, peaks, kept]
    return row, plain, converted, x


def surgery(plain: nn.Module, converted: nn.Module, x: torch.Tensor, rounds: int):
    entropies = ee.measure_entropy(converted, [x], progress=False)
    lowest = sorted(entropies, key=lambda n: entropies[n].entropy)[: len(entropies) // 2]
    model = copy.deepcopy(converted)
    ee.linearize(model, lowest)
    folded = ee.fold(model, x[:2])
    before = ee.cost(plain, x, latency=False)
    after = ee.cost(folded, x, latency=False)
    timed = ee.compare_latency(plain, folded, x, rounds=rounds)
    return len(lowest), len(entropies), before, after, {"before": timed.before_s, "after": timed.after_s}, timed.speedup


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30, help="timing rounds (one call of each variant per round, shuffled)")
    args = parser.parse_args(argv)
    info = ee.build_info()
    print(f"easier_ext {info['version']}, torch {torch.__version__}, {machine('cpu')}, batch {args.batch}, 32x32, eval mode\n")

    print("| model | plain pass | easier_ext measurement | hook-based | measurement / plain (paired median) | hook / plain | peak extra mem plain | easier_ext | hook-based | kept after the pass: easier_ext | hook-based |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    kept_models = []
    for name in args.models:
        (model, times, ratios, peaks, kept), plain, converted, x = passes(name, args.batch, args.rounds)
        kept_models.append((name, plain, converted, x))
        t_plain, t_ours, t_hook = times["plain"], times["easier_ext"], times["hook-based"]
        print(f"| {model} | {t_plain * 1e3:.1f} ms | {t_ours * 1e3:.1f} ms | {t_hook * 1e3:.1f} ms | {ratios['easier_ext']:.3f}x | {ratios['hook-based']:.3f}x "
              f"| {fmt_bytes(peaks['plain'])} | {fmt_bytes(peaks['easier_ext'])} | {fmt_bytes(peaks['hook-based'])} | {fmt_bytes(kept['easier_ext'])} | {fmt_bytes(kept['hook-based'])} |", flush=True)

    print("\nLowest-entropy half of the sites linearized, then folded (MACs per image; latency of a batch):\n")
    print("| model | sites linearized | params | MACs/image | depth | CPU latency (median) | speedup (paired median) |")
    print("|---|---|---|---|---|---|---|")
    for name, plain, converted, x in kept_models:
        k, n, before, after, latency, speedup = surgery(plain, converted, x, args.rounds)
        per = lambda c: f"{c.macs / x.shape[0] / 1e6:.1f} M"  # noqa: E731
        print(f"| {name} | {k}/{n} | {before.params / 1e6:.2f} M -> {after.params / 1e6:.2f} M | {per(before)} -> {per(after)} "
              f"| {before.depth} -> {after.depth} | {latency['before'] * 1e3:.0f} ms -> {latency['after'] * 1e3:.0f} ms | {speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

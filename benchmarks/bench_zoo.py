"""Linearize half the sites and fold, on a dozen timm and torchvision models of different families.

For each model (randomly initialised, 10 classes, eval mode, a 1x3xSxS input) it converts every
rectifier call site, measures entropy on random batches, linearizes the lowest-entropy half of the
sites, folds, and prints a Markdown table: sites, parameters, MACs per image, depth, and the
latency of one forward in eager PyTorch and in ONNX Runtime, dense -> folded, each pair timed
against each other in paired rounds (``compare_latency``; the speedup is the median per-round
ratio). "Dense" is the converted model with nothing linearized, folded too (BatchNorm into its
conv), so the ratio is what linearizing half the sites buys, not BatchNorm folding.

Random weights and random data: which sites have the lowest entropy is not meaningful (a trained
model would pick others), this is about what removing half of them costs and saves.

Run: python benchmarks/bench_zoo.py [--models resnet18 ...] [--size 64] [--rounds 20] [--no-onnx]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings

import torch

import easier_ext as ee

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine  # noqa: E402


def _tv_vit(**kw):
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=kw.pop("image_size"), patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, **kw)


# name -> (source, constructor name, extra kwargs, input size or None for --size)
MODELS = {
    "resnet18": ("torchvision", "resnet18", {}, None),
    "densenet121": ("torchvision", "densenet121", {}, None),
    "vit (torchvision, 4 layers)": ("torchvision", _tv_vit, {"image_size": "size"}, None),
    "efficientnet_b0": ("timm", "efficientnet_b0", {}, None),
    "mobilenetv3_small_100": ("timm", "mobilenetv3_small_100", {}, None),
    # timm zero-initialises the last BatchNorm of each block: every residual branch would be a
    # constant that fold drops (dense depth 6); a trained model's are not
    "regnety_002": ("timm", "regnety_002", {"zero_init_last": False}, None),
    "convnext_atto": ("timm", "convnext_atto", {}, None),
    "fastvit_t8": ("timm", "fastvit_t8", {}, None),
    "vit_tiny_patch16_224": ("timm", "vit_tiny_patch16_224", {"img_size": "size", "patch_size": 8}, None),
    "deit3_small_patch16_224": ("timm", "deit3_small_patch16_224", {"img_size": "size", "patch_size": 8}, None),
    "swin_tiny_patch4_window7_224": ("timm", "swin_tiny_patch4_window7_224", {"img_size": "size", "window_size": 4, "patch_size": 2}, None),
    "mixer_s16_224": ("timm", "mixer_s16_224", {"img_size": "size"}, None),
}


def build(name: str, size: int) -> torch.nn.Module:
    source, ctor, kw, _ = MODELS[name]
    kw = {k: (size if v == "size" else v) for k, v in kw.items()}
    if callable(ctor):
        return ctor(num_classes=10, **kw).eval()
    if source == "torchvision":
        import torchvision
        return getattr(torchvision.models, ctor)(weights=None, num_classes=10, **kw).eval()
    import timm
    return timm.create_model(ctor, pretrained=False, num_classes=10, **kw).eval()


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def run(name: str, size: int, rounds: int, onnx: bool) -> str:
    torch.manual_seed(0)
    model = build(name, size)
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ee.convert(model)
        names = list(ee.sites(converted))
        dense = ee.fold(converted.eval(), x)
        h = ee.measure_entropy(converted, [torch.randn(8, 3, size, size) for _ in range(2)], progress=False)
        lowest = sorted(h, key=lambda s: h[s].entropy)[: len(names) // 2]
        ee.linearize(converted, lowest)
        folded = ee.fold(converted.eval(), x)
    before, after = ee.cost(dense, x, latency=False), ee.cost(folded, x, latency=False)
    eager = ee.compare_latency(dense, folded, x, rounds=rounds)
    row = [name, f"{len(lowest)}/{len(names)}", f"{before.params / 1e6:.2f} M -> {after.params / 1e6:.2f} M",
           f"{before.macs / 1e6:.1f} M -> {after.macs / 1e6:.1f} M", f"{before.depth} -> {after.depth}",
           f"{_ms(eager.before_s)} -> {_ms(eager.after_s)} ({eager.speedup:.2f}x{'' if eager.measurable else ', n.s.'})"]
    if onnx:
        ort = ee.compare_latency(dense, folded, x, rounds=rounds, backend="onnxruntime")
        row.append(f"{_ms(ort.before_s)} -> {_ms(ort.after_s)} ({ort.speedup:.2f}x{'' if ort.measurable else ', n.s.'})")
    else:
        row.append("-")
    return "| " + " | ".join(row) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    print(f"{machine('cpu')}, torch {torch.__version__}, {datetime.date.today()}, input 1x3x{args.size}x{args.size}\n")
    print("| model | sites linearized | params | MACs/image | depth | eager latency (paired) | ONNX Runtime latency (paired) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        t0 = time.perf_counter()
        try:
            line = run(name, args.size, args.rounds, not args.no_onnx)
        except Exception as e:  # one model's failure should not hide the others' rows
            line = f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} |"
        print(line, flush=True)
        print(f"<!-- {name}: {time.perf_counter() - t0:.0f} s -->", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

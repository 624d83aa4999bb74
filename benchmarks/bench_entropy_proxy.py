"""Cost of the entropy proxy computed inside the fused op: rectify_count against
rectify_count_entropy, forward alone and forward + backward, on bench_overhead.py's shapes.

Prints a Markdown table: median time per call of each variant and the paired ratios (median over
rounds of entropy / count in the same round, so that drifts of the machine's load cancel out).
The backward of rectify_count_entropy also carries the sums' gradient (one upstream value per
channel, as a loss term ``lambda * sums.mean()`` gives).
Run: python benchmarks/bench_entropy_proxy.py [--activations relu gelu] [--device cpu|cuda] [--tau 0.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import easier_ext
from easier_ext import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine, paired_ratio, sample_calls  # noqa: E402
from bench_overhead import SHAPES  # noqa: E402


def variants(name, dim, tau, x):
    """The four timed calls on ``x``: each op forward, and forward + backward to a leaf copy of x."""
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    grad_out = torch.randn_like(x)
    grad_sums = torch.full((x.shape[dim],), 1.0 / x.shape[dim], device=x.device)

    def count(x):
        return ops.rectify_count(x, name, channel_dim=dim)

    def entropy(x):
        return ops.rectify_count_entropy(x, name, tau=tau, channel_dim=dim)

    def count_backward(_x):
        y, _ = ops.rectify_count(leaf, name, channel_dim=dim)
        return torch.autograd.grad(y, leaf, grad_out)

    def entropy_backward(_x):
        y, _, sums = ops.rectify_count_entropy(leaf, name, tau=tau, channel_dim=dim)
        return torch.autograd.grad((y, sums), leaf, (grad_out, grad_sums))

    return {"count": count, "entropy": entropy, "count_bwd": count_backward, "entropy_bwd": entropy_backward}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activations", nargs="+", default=["relu", "gelu"], choices=list(ops.ACTIVATIONS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per variant and case")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is available")

    info = easier_ext.build_info()
    print(f"easier_ext {info['version']} (CPU kernel {info['cpu_capability']}, CUDA kernels: {info['cuda_kernels']}), "
          f"torch {torch.__version__}, {machine(args.device)}, tau {args.tau}\n")
    print("| activation | shape | count fwd | count+entropy fwd | ratio fwd | count fwd+bwd | count+entropy fwd+bwd "
          "| ratio fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.activations:
        for label, (shape, dim, fmt) in SHAPES.items():
            x = torch.randn(shape, device=args.device).contiguous(memory_format=fmt)
            samples = sample_calls(variants(name, dim, args.tau, x), x, args.device, args.min_run_time)
            ms = {k: f"{statistics.median(v) * 1e3:.3f} ms" for k, v in samples.items()}
            print(f"| {name} | {label} | {ms['count']} | {ms['entropy']} | "
                  f"{paired_ratio(samples, 'entropy', 'count'):.2f}x | {ms['count_bwd']} | {ms['entropy_bwd']} | "
                  f"{paired_ratio(samples, 'entropy_bwd', 'count_bwd'):.2f}x |", flush=True)


if __name__ == "__main__":
    main()

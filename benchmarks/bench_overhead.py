"""Entropy-tracking overhead of the fused kernels, against torch's activation alone, the hook-based
way research code measures it, and torch.compile of activation + counting.

Prints a Markdown table (time per call, ratios measured in this run, peak extra memory), with the
in-place forms (torch's `relu_` and friends against `rectify_count_`) where torch has one.
Run: python benchmarks/bench_overhead.py [--activations relu gelu ...] [--device cpu|cuda] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import easier_ext
from easier_ext import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import fmt_bytes, machine, peak_extra_bytes, time_calls  # noqa: E402

SHAPES = {
    "(64,64,32,32) NCHW": ((64, 64, 32, 32), 1, torch.contiguous_format),
    "(64,64,32,32) channels_last": ((64, 64, 32, 32), 1, torch.channels_last),
    "(4096,3072) Linear": ((4096, 3072), -1, torch.contiguous_format),
}

TORCH_FN = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "prelu": None,  # needs the weight: built per shape
    "gelu": F.gelu,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "elu": F.elu,
    "mish": F.mish,
}


def torch_activation(name, channels, channel_dim, device):
    """torch's own activation for the case, and the matching rectify_count keyword arguments."""
    if name == "prelu":
        # nn.PReLU puts per-channel slopes on dim 1; (N, C) rows with C last get one shared slope.
        w = torch.full((channels if channel_dim == 1 else 1,), 0.25, device=device)
        return (lambda x: F.prelu(x, w)), {"weight": w}
    return TORCH_FN[name], ({"negative_slope": 0.01} if name == "leaky_relu" else {})


TORCH_INPLACE_FN = {  # torch's in-place forms (nn.ReLU(inplace=True) and friends); none for prelu, gelu
    "relu": F.relu_,
    "relu6": lambda x: F.relu6(x, inplace=True),
    "leaky_relu": lambda x: F.leaky_relu_(x, 0.01),
    "silu": lambda x: F.silu(x, inplace=True),
    "hardswish": lambda x: F.hardswish(x, inplace=True),
    "elu": lambda x: F.elu(x, inplace=True),
    "mish": lambda x: F.mish(x, inplace=True),
}


def on_own_copy(fn, x):
    """An in-place variant timed on its own copy of the input, so the others' input stays as it was
    (the kernels' cost does not depend on the values)."""
    mine = x.clone(memory_format=torch.preserve_format)
    return lambda _x: fn(mine)


def hook_based(activation_fn, channel_dim):
    """What the EASIER reference code does: a forward hook on the activation module keeps its input
    and counts z >= 0 per channel for each batch, then syncs with .item() for the batch's entropy."""

    class Act(torch.nn.Module):
        def forward(self, x):
            return activation_fn(x)

    state = {"counts": None, "kept": None, "entropies": []}

    def hook(module, inputs, output):
        z = inputs[0]
        state["kept"] = z  # the reference keeps the pre-activation (and forces inplace=False)
        d = channel_dim % z.dim()
        dims = [i for i in range(z.dim()) if i != d]
        counts = (z >= 0).sum(dim=dims)
        state["counts"] = counts if state["counts"] is None else state["counts"] + counts
        p = counts.double() / (z.numel() // z.shape[d])
        h = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)
        state["entropies"].append(h.mean().item())

    m = Act()
    m.register_forward_hook(hook)
    return m


def compiled_count(activation_fn, channel_dim):
    def f(x):
        d = channel_dim % x.dim()
        dims = [i for i in range(x.dim()) if i != d]
        return activation_fn(x), (x > 0).sum(dim=dims)

    torch._dynamo.reset()  # a fresh compile per case, not a recompile of the last one
    return torch.compile(f, fullgraph=True)


# glibc returns a freed block of more than 32 MiB to the system, so the next one page-faults afresh:
# ~20 ms of every variant's 48 MiB output on the Linear shape. These settings keep freed memory for
# reuse, as the jemalloc/tcmalloc PyTorch's CPU tuning guide recommends would; they must be set
# before the process starts.
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def allocator_label():
    return "glibc keeping freed memory" if os.environ.get("GLIBC_TUNABLES") == KEEP_FREED_MEMORY else "system allocator"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--activations", nargs="+", default=list(TORCH_FN), choices=list(TORCH_FN))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per variant and case")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="rerun under glibc settings that keep freed memory for reuse instead of returning large "
                        "blocks to the system (no page faults on fresh outputs)")
    args = p.parse_args(argv)
    if args.keep_freed_memory and os.environ.get("GLIBC_TUNABLES") != KEEP_FREED_MEMORY:
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, GLIBC_TUNABLES=KEEP_FREED_MEMORY))
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is available")

    info = easier_ext.build_info()
    print(f"easier_ext {info['version']} (CPU kernel {info['cpu_capability']}, CUDA kernels: {info['cuda_kernels']}), "
          f"torch {torch.__version__}, {machine(device)}, {allocator_label()}\n")
    print("| activation | shape | torch alone | fused + tracking | hook-based | compile (act + count) "
          "| fused / torch | hook / fused | torch in-place | fused in-place | fused / torch, in-place | hook / fused in-place "
          "| extra mem fused | extra mem hook | extra mem compile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.activations:
        for label, (shape, dim, fmt) in SHAPES.items():
            x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
            channels = shape[dim]
            plain, op_args = torch_activation(name, channels, dim, device)
            op_name = name

            def fused(x, op_name=op_name, op_args=op_args, dim=dim):
                return ops.rectify_count(x, op_name, channel_dim=dim, **op_args)

            hook = hook_based(plain, dim)
            variants = {"torch": plain, "fused": fused, "hook": hook}
            if name in TORCH_INPLACE_FN:
                variants["torch_"] = on_own_copy(TORCH_INPLACE_FN[name], x)
                variants["fused_"] = on_own_copy(lambda x, n=op_name, a=op_args, d=dim: ops.rectify_count_(x, n, channel_dim=d, **a), x)
            if not args.no_compile:
                variants["compile"] = compiled_count(plain, dim)
            times = time_calls(variants, x, device, args.min_run_time)
            mem = {k: peak_extra_bytes(fn, x, device) for k, fn in variants.items() if not k.endswith("_")}
            hook._forward_hooks.clear()
            ms = lambda k: f"{times[k] * 1e3:.3f} ms" if k in times else "-"
            mb = lambda k: fmt_bytes(mem[k]) if k in mem else "-"
            ratio = lambda a, b: f"{times[a] / times[b]:.2f}x" if a in times and b in times else "-"
            print(f"| {name} | {label} | {ms('torch')} | {ms('fused')} | {ms('hook')} | {ms('compile')} "
                  f"| {times['fused'] / times['torch']:.2f}x | {times['hook'] / times['fused']:.1f}x "
                  f"| {ms('torch_')} | {ms('fused_')} | {ratio('fused_', 'torch_')} | {ratio('hook', 'fused_')} "
                  f"| {mb('fused')} | {mb('hook')} | {mb('compile')} |", flush=True)


if __name__ == "__main__":
    main()

"""CPU kernel microbenchmarks: the float32 convolutions csp_kernels runs on its own GEMM, side by
side with what torch would run instead, in GFLOP/s (direct-convolution FLOPs, so that Winograd's
saving shows as a higher rate).

    python -m benchmarks.kernels [--quick] [--out kernels.json]

Rows: the 1x1 convolution (ours: `conv1x1_fused`; MKL: torch.bmm over (N, C, H*W) views; oneDNN
on NCHW and on channels_last input, the last being oneDNN's GEMM at its best), and 3x3
convolutions forward and input gradient (ours: Winograd F(2x2, 3x3); oneDNN on NCHW). Each row's
variants are timed round-robin in one run (`measure.time_interleaved`), after warm-up calls:
timed alone in a fresh process, oneDNN's NCHW convolutions pay page faults for their reorder
buffers on every call (glibc returns large freed blocks to the system until a large free raises
its mmap threshold), which made the pdb-cpu layer's input gradient look 3x slower (11.7 vs 4.0
ms) than it runs inside a training step.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from csp_kernels import build_info
from csp_kernels.ops.conv import conv_backward
from csp_kernels.ops.conv1x1 import conv1x1_fused
from csp_kernels.ops.conv3x3 import conv3x3_winograd
from csp_kernels.ops.routing import winograd_usable

from .machine import machine_info
from .measure import time_interleaved

# (batch, in_channels, out_channels, side): trans-cpu's 1x1, pdb-cpu's dense-layer 3x3 and its
# input gradient, CSPDarknet-style 3x3s; --quick shrinks every one.
SHAPES = {"conv1x1": (8, 256, 256, 56), "conv3x3 dense layer": (8, 128, 32, 56),
          "conv3x3 input grad, dense layer": (8, 32, 128, 56), "conv3x3 128 -> 128": (8, 128, 128, 56),
          "conv3x3 input grad, 128 -> 128": (8, 128, 128, 56), "conv3x3 256 -> 256": (8, 256, 256, 28)}
QUICK_SHAPES = {name: (2, c_in // 8, c_out // 8, 8) for name, (_, c_in, c_out, _) in SHAPES.items()}


def _conv1x1_variants(x, weight):
    channels_last = x.contiguous(memory_format=torch.channels_last)
    a = weight.flatten(1).expand(x.shape[0], -1, -1)
    return {"ours": lambda: conv1x1_fused(x, weight), "MKL (bmm)": lambda: torch.bmm(a, x.flatten(2)),
            "oneDNN NCHW": lambda: F.conv2d(x, weight),
            "oneDNN channels_last": lambda: F.conv2d(channels_last, weight)}


def _conv3x3_variants(x, weight):
    variants = {"oneDNN NCHW": lambda: F.conv2d(x, weight, padding=1)}
    if winograd_usable(x):
        variants["ours (Winograd)"] = lambda: conv3x3_winograd(x, weight)
    return variants


def _input_grad_variants(grad_y, weight):
    """grad_y: (batch, out_channels, h, w); weight: (out_channels, in_channels, 3, 3)."""
    x = grad_y.new_empty(grad_y.shape[0], weight.shape[1], *grad_y.shape[2:])
    variants = {"oneDNN NCHW": lambda: torch.ops.aten.convolution_backward(
        grad_y, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])}
    if winograd_usable(grad_y):
        variants["ours (Winograd)"] = lambda: conv_backward(grad_y, x, weight, [1, 1], [1, 1], [1, 1], 1, True, False)
    return variants


def measure_row(name: str, shape: tuple, rounds: int) -> dict:
    """{"name", "shape", "gflops": {variant: GFLOP/s}} of one row."""
    batch, c_in, c_out, side = shape
    generator = torch.Generator().manual_seed(0)
    if name == "conv1x1":
        flops = 2 * batch * side * side * c_in * c_out
        variants = _conv1x1_variants(torch.randn(batch, c_in, side, side, generator=generator),
                                     torch.randn(c_out, c_in, 1, 1, generator=generator))
    elif name.startswith("conv3x3 input grad"):
        # The gradient of a c_out -> c_in convolution: grad_y has c_in channels here.
        flops = 2 * batch * side * side * c_in * c_out * 9
        variants = _input_grad_variants(torch.randn(batch, c_in, side, side, generator=generator),
                                        torch.randn(c_in, c_out, 3, 3, generator=generator))
    else:
        flops = 2 * batch * side * side * c_in * c_out * 9
        variants = _conv3x3_variants(torch.randn(batch, c_in, side, side, generator=generator),
                                     torch.randn(c_out, c_in, 3, 3, generator=generator))
    samples = time_interleaved(variants, torch.device("cpu"), warmup=2, rounds=rounds, min_sample_s=0.05, desc=name)
    return {"name": name, "shape": list(shape),
            "gflops": {v: flops / statistics.median(s) / 1e9 for v, s in samples.items()}}


def report(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        batch, c_in, c_out, side = row["shape"]
        rates = " · ".join(f"{v} {g:.0f}" for v, g in row["gflops"].items())
        lines.append(f"{row['name']:32s} {batch}x{c_in}x{side}x{side} -> {c_out}: {rates} GFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed samples per variant (default 10)")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    if args.out:
        try:  # before the measurements: a path that cannot be written fails at once
            open(args.out, "a").close()
        except OSError as err:
            parser.error(f"--out {args.out}: cannot write this file ({err.strerror})")
    rounds = args.rounds or (3 if args.quick else 10)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = [measure_row(name, shape, rounds) for name, shape in shapes.items()]
    print(f"cpu_sgemm: {build_info()['cpu_sgemm']}")
    print(report(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine_info(torch.device("cpu")), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

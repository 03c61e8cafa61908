"""GPU kernel microbenchmarks: each memory-bound kernel of csp_kernels (the CUDA BN + act
kernels and reductions, Maxout, the Triton 1x1 GEMM) at a size several times the L2, in GB/s of
compulsory traffic (each input read once, each output written once) against a measured
device-to-device copy.

    python3 -m benchmarks.gpu_kernels [--dtype bf16] [--out gpu_kernels.json]

Median of CUDA-event timings (triton.testing.do_bench) on random data; the JSON is rewritten
after every row, so a run stopped early keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import csp_kernels  # noqa: F401  (loads the extension's ops)

from .gpu_smoke import DTYPES
from .roofline import copy_bandwidth

ACT = "silu"


def rows(dtype: torch.dtype, shape=(64, 256, 56, 56)):
    """(name, call, bytes moved)."""
    ops = torch.ops.csp_kernels
    from csp_kernels.triton.conv1x1 import conv1x1
    n, c, h, w = shape
    x, g, acc, out = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    mean, invstd, bn_w, bn_b, s1, s2 = (torch.rand(c, device="cuda", dtype=sd) + 0.5 for _ in range(6))
    plane = x.numel() * x.element_size()
    feats = [torch.randn(n, c // 2, h, w, device="cuda", dtype=dtype),
             torch.randn(n, c // 2, h // 2, w // 2, device="cuda", dtype=dtype)]
    feat_bytes = sum(f.numel() * f.element_size() for f in feats)
    weight = torch.randn(c, c, device="cuda", dtype=dtype) / c ** 0.5
    return [
        ("channel_stats", lambda: ops.channel_stats(x), plane),
        ("scale_shift_act_out", lambda: ops.scale_shift_act_out(x, bn_w, bn_b, ACT, out), 2 * plane),
        ("bn_act_backward_reduce", lambda: ops.bn_act_backward_reduce(g, x, mean, invstd, bn_w, bn_b, ACT), 2 * plane),
        ("bn_act_backward_apply", lambda: ops.bn_act_backward_apply(g, x, mean, invstd, bn_w, bn_b, s1, s2, ACT),
         3 * plane),
        ("bn_act_backward_accumulate",
         lambda: ops.bn_act_backward_accumulate(g, x, mean, invstd, bn_w, bn_b, ACT, acc), 4 * plane),
        ("bn_grad_correct", lambda: ops.bn_grad_correct(acc, x, mean, invstd, s1, s2, out), 4 * plane),
        ("maxout_pyramid_forward", lambda: ops.maxout_pyramid_forward(feats, h, w, c // 4, True),
         feat_bytes + plane // 4),
        ("triton_conv1x1 (bias + act)", lambda: conv1x1(x, weight, bias=s1, act=ACT, out=out), 2 * plane),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: needs a CUDA GPU; torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    from triton.testing import do_bench
    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    report = {"gpu": torch.cuda.get_device_name(), "dtype": args.dtype, "copy_GBps": copy / 1e9, "rows": []}
    print(f"copy (read + write): {copy / 1e9:.0f} GB/s")
    for name, call, nbytes in rows(DTYPES[args.dtype]):
        try:
            ms = do_bench(call, warmup=25, rep=100, return_mode="median")
            row = {"kernel": name, "ms": ms, "GBps": nbytes / ms / 1e6, "of_copy": nbytes / ms / 1e-3 / copy}
            print(f"{name:<30} {ms:8.3f} ms {row['GBps']:7.0f} GB/s {100 * row['of_copy']:5.1f}% of copy", flush=True)
        except Exception as err:  # keep measuring the others
            row = {"kernel": name, "error": f"{type(err).__name__}: {err}"[:300]}
            print(f"{name:<30} ERROR {row['error']}", flush=True)
        report["rows"].append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    return 0 if all("error" not in r for r in report["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

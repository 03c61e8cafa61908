"""Every CUDA and Triton kernel of csp_kernels once on the GPU, in bfloat16, float32 and
float64, against the same computation in float64 on the CPU (the C++ CPU ops, or plain PyTorch
for the Triton GEMMs). Outputs that the kernels write into are poisoned with NaN first, so an
unwritten element fails. Small odd shapes: fast enough under compute-sanitizer.

    python3 -m benchmarks.gpu_smoke [--only NAME,...] [--dtypes bf16,fp32,fp64]

Prints one line per (kernel, dtype) and exits 1 if any failed, 2 without a CUDA GPU or a CUDA
build of the extension. benchmarks/gpu_validate.sh runs it plainly, under memcheck, and the
reductions under racecheck (REDUCTIONS).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import csp_kernels

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
# Relative error allowed against float64: bfloat16 rounds every input and output to 8 bits.
TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-4, torch.float64: 1e-9}
REDUCTIONS = ("channel_stats", "bn_act_backward_reduce", "bn_act_backward_accumulate", "maxout_pyramid_backward",
              "triton_conv1x1", "triton_weight_grad", "triton_dgrad_bn_accumulate")
SHAPE = (3, 24, 9, 11)  # batch, channels, height, width: no dimension a multiple of a block
ACT = "silu"


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _vectors(channels: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """mean, invstd (positive), weight, bias in the statistics dtype."""
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    return [torch.randn(channels, dtype=sd, device=device), torch.rand(channels, dtype=sd, device=device) + 0.5,
            torch.rand(channels, dtype=sd, device=device) + 0.5, torch.randn(channels, dtype=sd, device=device)]


def _on_cpu64(tensors):
    return [t.cpu().double() if isinstance(t, torch.Tensor) else t for t in tensors]


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def cuda_cases(dtype: torch.dtype):
    """(name, run(device) -> tuple of outputs, args): each extension op, whose CPU op in float64 is
    the reference."""
    ops = torch.ops.csp_kernels
    n, c, h, w = SHAPE
    x = torch.randn(SHAPE).to(dtype)
    g = torch.randn(SHAPE).to(dtype)
    vec = _vectors(c, dtype, "cpu")
    feats = [torch.randn(n, 8, 9, 11).to(dtype), torch.randn(n, 16, 5, 6).to(dtype), torch.randn(n, 8, 3, 3).to(dtype)]
    grad_out = torch.randn(n, 8, 9, 11).to(dtype)

    def scale_shift_act_out(x, scale, shift):
        out = _nan_like(x)
        ops.scale_shift_act_out(x, scale, shift, ACT, out)
        return (out,)

    def accumulate(g, x, *vec):
        acc = torch.ones_like(x)
        return (*ops.bn_act_backward_accumulate(g, x, *vec, ACT, acc), acc)

    def correct(acc, x, mean, invstd, s1, s2):
        grad_x = torch.ones_like(x)
        ops.bn_grad_correct(acc, x, mean, invstd, s1, s2, grad_x)
        return (grad_x,)

    sums = [torch.randn(c, dtype=vec[0].dtype) for _ in range(2)]
    return [
        ("channel_stats", lambda *a: ops.channel_stats(*a), [x]),
        ("scale_shift_act", lambda *a: (ops.scale_shift_act(*a, ACT),), [x, vec[2], vec[3]]),
        ("scale_shift_act_out", scale_shift_act_out, [x, vec[2], vec[3]]),
        ("bn_act_backward_reduce", lambda *a: ops.bn_act_backward_reduce(*a, ACT), [g, x, *vec]),
        ("bn_act_backward_apply", lambda *a: (ops.bn_act_backward_apply(*a, ACT),), [g, x, *vec, *sums]),
        ("bn_act_backward_accumulate", accumulate, [g, x, *vec]),
        ("bn_grad_correct", correct, [g, x, vec[0], vec[1], *sums]),
        ("maxout_pyramid_forward", lambda *f: (ops.maxout_pyramid_forward(list(f), 9, 11, 8, True),), feats),
        ("maxout_pyramid_backward", lambda go, *f: tuple(ops.maxout_pyramid_backward(go, list(f), 8, True)),
         [grad_out, *feats]),
    ]


def triton_cases(dtype: torch.dtype):
    """The three Triton GEMMs with their prologues and epilogues; references in plain PyTorch."""
    from csp_kernels.triton.conv1x1 import conv1x1
    from csp_kernels.triton.conv1x1_backward import dgrad_bn_accumulate, weight_grad
    n, c, h, w = SHAPE
    out_c = 20
    x = torch.randn(SHAPE).to(dtype)
    weight = (torch.randn(out_c, c) / c ** 0.5).to(dtype)
    grad_z = torch.randn(n, out_c, h, w).to(dtype)
    mean, invstd, bn_w, bn_b = _vectors(c, dtype, "cpu")
    scale, shift = bn_w * invstd, bn_b - mean * bn_w * invstd
    bias = torch.randn(out_c, dtype=mean.dtype)

    def conv(x, weight, scale, shift, bias):
        out, mean_out, var_out = conv1x1(x, weight, in_scale=scale, in_shift=shift, in_act="relu", bias=bias, act=ACT,
                                         out=_nan_like(torch.empty(n, out_c, h, w, dtype=x.dtype, device=x.device)),
                                         stats=True)
        return out, mean_out, var_out

    def conv_ref(x, weight, scale, shift, bias):
        a = torch.relu(x * scale[:, None, None] + shift[:, None, None])
        out = F.silu(F.conv2d(a, weight[:, :, None, None], bias))
        return out, out.mean((0, 2, 3)), out.var((0, 2, 3), unbiased=False)

    def wgrad_ref(g, x, scale, shift):
        return (torch.einsum("nohw,nihw->oi", g, torch.relu(x * scale[:, None, None] + shift[:, None, None])),)

    def dgrad(g, weight, x, mean, invstd, bn_w, bn_b):
        acc = torch.ones_like(x)
        return (*dgrad_bn_accumulate(g, weight[:, :, None, None], x, mean, invstd, bn_w, bn_b, "relu", acc), acc)

    def dgrad_ref(g, weight, x, mean, invstd, bn_w, bn_b):
        xhat = (x - mean[:, None, None]) * invstd[:, None, None]
        pre = bn_w[:, None, None] * xhat + bn_b[:, None, None]
        dpre = torch.einsum("oi,nohw->nihw", weight, g) * (pre > 0)
        return dpre.sum((0, 2, 3)), (dpre * xhat).sum((0, 2, 3)), 1 + bn_w[:, None, None] * dpre

    return [
        ("triton_conv1x1", conv, conv_ref, [x, weight, scale, shift, bias]),
        ("triton_weight_grad",
         lambda g, x, s, t: (weight_grad(g, x, in_scale=s, in_shift=t, in_act="relu")[..., 0, 0],),
         wgrad_ref, [grad_z, x, scale, shift]),
        ("triton_dgrad_bn_accumulate", dgrad, dgrad_ref, [grad_z, weight, x, mean, invstd, bn_w, bn_b]),
    ]


def check(name: str, dtype: torch.dtype, run, reference, args) -> bool:
    try:
        got = run(*[a.cuda() for a in args])
        torch.cuda.synchronize()
        ref = reference(*_on_cpu64(args))
        errors = [rel_error(a, b) for a, b in zip(got, ref, strict=True)]
        ok = max(errors) <= TOL[dtype]
        detail = " ".join(f"{e:.2e}" for e in errors)
    except Exception as err:  # report every kernel, not only the first failure
        ok, detail = False, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    print(f"{'PASS' if ok else 'FAIL'} {name:<28} {str(dtype).removeprefix('torch.'):<9} {detail}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=lambda s: s.split(","), help="comma-separated kernel names (or 'reductions')")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES), help="bf16,fp32,fp64")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA GPU; torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    info = csp_kernels.build_info()
    if not info["cuda"]:
        print(f"gpu_smoke: the extension has no CUDA kernels: {info['import_error'] or info['cuda_skipped_reason']}",
              file=sys.stderr)
        return 2
    only = set(REDUCTIONS) if args.only == ["reductions"] else set(args.only or ())
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    torch.manual_seed(0)
    ok = True
    for key in args.dtypes:
        dtype = DTYPES[key]
        cases = [(name, run, lambda *a, _run=run: _run(*a), a) for name, run, a in cuda_cases(dtype)]
        cases += triton_cases(dtype)
        for name, run, reference, case_args in cases:
            if not only or name in only:
                ok &= check(name, dtype, run, reference, case_args)
    print("gpu_smoke:", "all passed" if ok else "FAILURES above")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

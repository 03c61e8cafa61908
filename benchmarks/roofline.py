"""The roofline floor of an eval forward: max(FLOPs / matmul peak, compulsory bytes / copy
bandwidth), with the peak and the bandwidth measured on this machine.

    python -m benchmarks.roofline [--device cuda] [--out roofline.json]
prints (and saves) the copy bandwidth and the bf16/fp32 matmul peaks.
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .measure import median_time, tensors_of


@contextlib.contextmanager
def _conv_precision():
    """Matmuls in float32 use TF32 exactly when cuDNN convolutions do (torch's defaults differ:
    TF32 on for convolutions, off for matmul), so the peak is the one convolutions can reach."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write) of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, desc="copy bandwidth")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of an n×n×n matmul in `dtype`: on the CPU the faster of torch's matmul (MKL) and
    oneDNN's GEMM (a 1x1 convolution of a channels_last (1, n, 1, n) input). Why both: on AMD
    CPUs MKL takes a slow code path (the 2-core AMD EPYC we measure on: MKL 213-221 GFLOP/s,
    oneDNN 453 GFLOP/s at n = 2048), and a floor from MKL alone would be one that oneDNN's
    convolutions, and ours, run faster than."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with _conv_precision():
        seconds = median_time(lambda: a @ b, device, desc=f"matmul {dtype}")
    if device.type == "cpu":
        x = a.view(1, n, 1, n).contiguous(memory_format=torch.channels_last)
        w = b.view(n, n, 1, 1)
        seconds = min(seconds, median_time(lambda: F.conv2d(x, w), device, desc=f"oneDNN GEMM {dtype}"))
    return 2 * n ** 3 / seconds


def eval_flops(module: torch.nn.Module, args: tuple) -> int:
    """FLOPs of one eval forward (matmuls and convolutions, as torch's FlopCounterMode counts)."""
    module.eval()
    # Detached: the counter's module tracker hooks the gradient of every input that requires
    # one, which fails for a view of such an input taken under no_grad (x[:, a:] in a block).
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


def compulsory_bytes(module: torch.nn.Module, args: tuple) -> int:
    """Bytes an eval forward cannot avoid: inputs, parameters and buffers read once, outputs
    written once."""
    module.eval()
    with torch.no_grad():
        outputs = tensors_of(module(*args))
    tensors = [*tensors_of(args), *module.parameters(), *module.buffers(), *outputs]
    return sum(t.numel() * t.element_size() for t in tensors)


def floor_seconds(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
    return max(flops / peak_flops, nbytes / bandwidth)


def measure_machine(device: torch.device, dtypes: list[torch.dtype],
                    matmul_size: int = 8192, copy_bytes: int = 1 << 30) -> dict:
    """{"copy_bandwidth": B/s, "matmul_peak": {dtype name: FLOP/s}} for `device`."""
    return {
        "device": str(device),
        "copy_bandwidth": copy_bandwidth(device, copy_bytes),
        "matmul_peak": {str(d).removeprefix("torch."): matmul_peak(device, d, matmul_size)
                        for d in dtypes},
        "matmul_size": matmul_size,
        "copy_bytes": copy_bytes,
        "tf32_convolutions": torch.backends.cudnn.allow_tf32,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--copy-bytes", type=int, default=1 << 30)
    args = parser.parse_args(argv)
    figures = measure_machine(torch.device(args.device), [torch.bfloat16, torch.float32],
                              args.matmul_size, args.copy_bytes)
    print(f"copy bandwidth: {figures['copy_bandwidth'] / 1e9:.4g} GB/s")
    for dtype, peak in figures["matmul_peak"].items():
        print(f"matmul peak {dtype}: {peak / 1e12:.4g} TFLOP/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU code as compiled, inspected on any machine (no GPU needed): registers, spilled bytes
and shared memory of every Triton launch configuration the wrappers pick (compiled ahead of
time for sm_80 and sm_90, with the 16-byte global accesses of its PTX) and of every kernel in
the built CUDA extension.

    python -m benchmarks.gpu_compile [--json]

The Triton interpreter, which runs the kernels on the CPU in the tests, checks what they
compute but not whether they compile, nor how: a kernel whose accumulator does not fit in
registers still interprets correctly and runs many times slower on a GPU. Triton's own ptxas
compiles for sm_80 and sm_90 here, and its cuobjdump reads the extension's cubins, so
tests/test_gpu_compile.py can refuse spills in CI. Needs the real Triton front end: run it
without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from csp_kernels.triton import conv1x1 as conv1x1_module
from csp_kernels.triton import conv1x1_backward as backward_module

TARGETS = (80, 90)  # the capabilities setup.py builds the CUDA kernels for
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# (data dtype, tl.dot input precision): every path `conv1x1` can take on a GPU.
PRECISIONS = ((torch.float32, "tf32"), (torch.float32, "ieee"), (torch.bfloat16, "tf32"), (torch.float16, "tf32"),
              (torch.float64, "ieee"))


@dataclasses.dataclass(frozen=True)
class Compiled:
    kernel: str         # "conv1x1", "wgrad", "dgrad" (Triton), or "cuda" for the extension's kernels
    variant: str        # the launch configuration, or the CUDA kernel's name
    capability: int
    registers: int
    spill_bytes: int    # per thread: stack frame plus local memory, 0 when nothing spills
    shared_bytes: int   # Triton: dynamic shared memory of the launch; CUDA: static
    wide_accesses: int | None = None  # Triton: 16-byte global accesses in the PTX (see _wide_global_accesses)


_USAGE = re.compile(r"^ Function (\S+):\n\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", re.MULTILINE)
_ARCH = re.compile(r"^arch = sm_(\d+)", re.MULTILINE)


def resource_usage(path: str) -> list[tuple[str, int | None, int, int, int]]:
    """(function, capability, registers, spilled bytes per thread, static shared bytes) of every
    kernel in a cubin (capability None: a bare cubin does not say) or in a binary with embedded
    cubins, read by the cuobjdump that Triton ships beside ptxas."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    kernels = []
    # In a binary, each embedded cubin starts with its "arch = sm_XX" line.
    sections = _ARCH.split(usage)
    for capability, body in zip([None, *sections[1::2]], sections[::2]):
        for name, registers, stack, shared, local in _USAGE.findall(body):
            kernels.append((name, capability and int(capability), int(registers), int(stack) + int(local),
                            int(shared)))
    if not kernels:
        raise RuntimeError(f"cuobjdump listed no kernels in {path}:\n{usage[:2000]}")
    names = _demangle([k[0] for k in kernels])
    return [(name, *rest) for name, (_, *rest) in zip(names, kernels)]


def _demangle(names: list[str]) -> list[str]:
    """C++ names as c++filt prints them (where binutils is installed), without the namespace,
    return type and parameter list: `kernel<template arguments>`."""
    if shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return [_without_parameters(line.replace("csp_kernels::(anonymous namespace)::", "").removeprefix("void "))
            for line in out.splitlines()]


def _without_parameters(name: str) -> str:
    """`f<(Act)5>(float const*, int)` -> `f<(Act)5>`: the name up to its trailing parameter list."""
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def _cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spilled bytes per thread) of the one kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        ((_, _, registers, spill, _),) = resource_usage(f.name)
    return registers, spill


def _specialize(kernel, args: dict, constants: dict) -> ASTSource:
    """The kernel as Triton's launcher specializes it for these argument values: integers equal
    to 1 become constants, integers divisible by 16 and 16-byte aligned pointers (a fresh
    allocation) carry that divisibility, which is what lets the compiler vectorize."""
    signature, constexprs, attrs = {}, dict(constants), {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):  # a pointer, given as its element type
            signature[name] = value
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    # Keys as (argument index,) tuples: what every Triton 3.x ASTSource accepts.
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _compile(kernel_name: str, kernel, args: dict, constants: dict, config: tuple, capability: int,
             variant: str) -> Compiled:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("benchmarks.gpu_compile needs Triton's compiler; unset TRITON_INTERPRET")
    *_, num_warps, num_stages = config
    compiled = triton.compile(_specialize(kernel, args, constants), target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    registers, spill = _cubin_usage(compiled.asm["cubin"])
    blocks = "x".join(map(str, config[:3]))
    return Compiled(kernel_name, f"{variant} {blocks} w{num_warps}", capability, registers, spill,
                    compiled.metadata.shared, _wide_global_accesses(compiled.asm["ptx"]))


def _strides(prefix: str, t: torch.Tensor) -> dict:
    """{prefix_n, prefix_c, prefix_h, prefix_w: t's strides}."""
    return dict(zip((f"{prefix}_n", f"{prefix}_c", f"{prefix}_h", f"{prefix}_w"), t.stride()))


def _types(dtype: torch.dtype) -> tuple[str, str]:
    """(data pointer type, statistics pointer type) in Triton's signature notation."""
    return "*" + _TRITON_TYPES[dtype], "*fp64" if dtype == torch.float64 else "*fp32"


def compile_conv1x1(dtype: torch.dtype, input_precision: str, capability: int, *, stats: bool, prologue: bool,
                    act: str = "silu", shape: tuple[int, int, int, int] = (64, 256, 56, 56), out_channels: int = 256,
                    channels_last: bool = False) -> Compiled:
    """Compiles `_conv1x1_kernel` as `conv1x1` would launch it on a GPU of `capability` (80:
    sm_80) for a fresh x of `shape` (NCHW or channels_last) and a fresh NCHW output, with bias +
    `act`, optionally the BN + ReLU prologue and the statistics epilogue."""
    batch, in_channels, height, width = shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, device="meta", memory_format=memory_format)
    out = torch.empty(batch, out_channels, height, width, device="meta")
    config = conv1x1_module.launch_config(out_channels, in_channels, dtype, input_precision, on_gpu=True)
    data, stat = _types(dtype)
    constants = dict(HAS_BIAS=True, **conv1x1_module.act_constexprs(act), HAS_IN_AFFINE=prologue,
                     **conv1x1_module.act_constexprs("relu" if prologue else "identity", "IN_"), STATS=stats,
                     ACC_FP64=dtype == torch.float64, INPUT_PRECISION=input_precision,
                     X_PLANES=conv1x1_module.pixels_contiguous(x), OUT_PLANES=conv1x1_module.pixels_contiguous(out),
                     BLOCK_O=config[0], BLOCK_P=config[1], BLOCK_K=config[2])
    args = dict(x_ptr=data, w_ptr=data, out_ptr=data, bias_ptr=stat, in_scale_ptr=stat, in_shift_ptr=stat,
                moments_ptr=stat, plane=height * width, width=width, in_channels=in_channels,
                out_channels=out_channels, **_strides("sx", x), sw_o=in_channels, sw_i=1, **_strides("so", out))
    variant = (f"{_TRITON_TYPES[dtype]}/{input_precision}{' channels_last' if channels_last else ''}"
               f"{' prologue' if prologue else ''}{' stats' if stats else ''}")
    return _compile("conv1x1", conv1x1_module._conv1x1_kernel, args, constants, config, capability, variant)


def compile_weight_grad(dtype: torch.dtype, input_precision: str, capability: int,
                        shape: tuple[int, int, int, int] = (64, 256, 56, 56), out_channels: int = 128) -> Compiled:
    """`_weight_grad_kernel` as `weight_grad` launches it with the BN + ReLU prologue, for x of
    `shape` (a dense layer's NCHW prefix) and grad_z of `out_channels`."""
    batch, in_channels, height, width = shape
    x = torch.empty(shape, device="meta")
    grad_z = torch.empty(batch, out_channels, height, width, device="meta")
    config = conv1x1_module.launch_config(out_channels, in_channels, dtype, input_precision, on_gpu=True)
    data, stat = _types(dtype)
    constants = dict(HAS_IN_AFFINE=True, **conv1x1_module.act_constexprs("relu", "IN_"),
                     ACC_FP64=dtype == torch.float64, INPUT_PRECISION=input_precision, G_PLANES=True, X_PLANES=True,
                     BLOCK_O=config[0], BLOCK_I=config[1], BLOCK_P=config[2])
    args = dict(g_ptr=data, x_ptr=data, scale_ptr=stat, shift_ptr=stat, partial_ptr=stat, batch=batch,
                plane=height * width, width=width, out_channels=out_channels, in_channels=in_channels,
                **_strides("sg", grad_z), **_strides("sx", x))
    return _compile("wgrad", backward_module._weight_grad_kernel, args, constants, config, capability,
                    f"{_TRITON_TYPES[dtype]}/{input_precision} prologue")


def compile_dgrad_bn_accumulate(dtype: torch.dtype, input_precision: str, capability: int,
                                shape: tuple[int, int, int, int] = (64, 256, 56, 56),
                                out_channels: int = 128) -> Compiled:
    """`_dgrad_bn_accumulate_kernel` as `dgrad_bn_accumulate` launches it (ReLU) for a dense
    layer's NCHW prefix of `shape` and grad_z of `out_channels`."""
    batch, in_channels, height, width = shape
    x = torch.empty(shape, device="meta")
    grad_z = torch.empty(batch, out_channels, height, width, device="meta")
    config = backward_module.dgrad_launch_config(in_channels, out_channels, dtype, input_precision, on_gpu=True)
    data, stat = _types(dtype)
    constants = dict(**conv1x1_module.act_constexprs("relu"), ACC_FP64=dtype == torch.float64,
                     INPUT_PRECISION=input_precision, G_PLANES=True, X_PLANES=True, ACC_PLANES=True,
                     BLOCK_I=config[0], BLOCK_P=config[1], BLOCK_O=config[2])
    # acc_ptr: the BN1 accumulator, float32 for 16-bit data (routing.dense_grad_acc_dtype), i.e. the stats type.
    args = dict(g_ptr=data, w_ptr=data, x_ptr=data, acc_ptr=stat, mean_ptr=stat, invstd_ptr=stat, bnw_ptr=stat,
                bnb_ptr=stat, sums_ptr=stat, plane=height * width, width=width, out_channels=out_channels,
                in_channels=in_channels, **_strides("sg", grad_z), sw_o=in_channels, sw_i=1, **_strides("sx", x),
                **_strides("sa", x))
    return _compile("dgrad", backward_module._dgrad_bn_accumulate_kernel, args, constants, config, capability,
                    f"{_TRITON_TYPES[dtype]}/{input_precision} bn accumulate")


def _wide_global_accesses(ptx: str) -> int:
    """16-byte global loads, stores and async copies in the PTX: 0 means every access moves at
    most one 8-byte word, i.e. the compiler could not see contiguous runs."""
    wide = r"(?:ld|st)\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64)|cp\.async\.c[ag]\.shared\.global[^;]*, (?:16|0x10)\b"
    return len(re.findall(wide, ptx))


def compile_all() -> list[Compiled]:
    """Every GPU path of every Triton kernel, with and without prologue and statistics, on
    every target."""
    return [compile_conv1x1(dtype, precision, capability, stats=full, prologue=full)
            for dtype, precision in PRECISIONS for full in (True, False) for capability in TARGETS] + [
        compile_conv1x1(torch.bfloat16, "tf32", capability, stats=True, prologue=True, channels_last=True)
        for capability in TARGETS] + [
        compile_backward(dtype, precision, capability) for compile_backward in (compile_weight_grad,
                                                                                compile_dgrad_bn_accumulate)
        for dtype, precision in PRECISIONS for capability in TARGETS]


def extension_kernels() -> list[Compiled]:
    """Every kernel of the built CUDA extension, or [] when it was built without CUDA."""
    from csp_kernels import extension
    if extension._C is None or not extension._C.build_config()["cuda"]:
        return []
    return [Compiled("cuda", name, capability, registers, spill, shared)
            for name, capability, registers, spill, shared in resource_usage(extension._C.__file__)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = compile_all() + extension_kernels()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
        return 0
    print(f"{'kernel':<8} {'variant':<60} {'sm':>3} {'regs':>5} {'spill B':>8} {'smem B':>7} {'16B acc':>7}")
    for r in rows:
        wide = "-" if r.wide_accesses is None else r.wide_accesses
        print(f"{r.kernel:<8} {r.variant[:60]:<60} {r.capability:>3} {r.registers:>5} {r.spill_bytes:>8} "
              f"{r.shared_bytes:>7} {wide:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The compiled extension `csp_kernels._C`: loading it and reporting what was built."""
from __future__ import annotations

import torch

from .checks import env_choice

# CSP_KERNELS_CPU_SGEMM: which float32 GEMM the CPU kernels use (csrc/cpu/sgemm_avx512.h);
# unset, the faster of ours (AVX-512 CPUs only) and torch's BLAS, measured once per process.
CPU_SGEMM_CHOICES = ("avx512", "blas")
env_choice("CSP_KERNELS_CPU_SGEMM", CPU_SGEMM_CHOICES, "")  # warns about a bad value; the C++ side reads it
# CSP_KERNELS_CPU_ROWS: the per-element loops (BatchNorm + activation, the GEMMs' prologues and
# epilogues; csrc/cpu/isa.h) in their AVX-512 copies where the CPU has it ("avx512", the default)
# or in the baseline ones ("baseline", which tests use to check those on AVX-512 machines).
CPU_ROWS_CHOICES = ("avx512", "baseline")
env_choice("CSP_KERNELS_CPU_ROWS", CPU_ROWS_CHOICES, "")

try:
    from . import _C  # registers the torch.ops.csp_kernels.* C++ ops
    _IMPORT_ERROR = ""
except ImportError as err:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = str(err)


def build_info() -> dict:
    """What the compiled extension contains.

    Keys: "loaded" (bool), "import_error", "cpu" (bool), "cuda" (bool), "cuda_archs",
    "cuda_version" (toolkit it was compiled with), "torch_version" (torch it was compiled
    against), "cuda_skipped_reason" (why CUDA sources were not compiled), "cpu_sgemm" (the float32 GEMM of
    the CPU 1x1 kernels here: "avx512", ours, or "blas", torch's), "cpu_sgemm_reason" (how that was
    decided: CSP_KERNELS_CPU_SGEMM, or both measured on this CPU), "cpu_avx512" (whether the AVX-512
    kernels, our GEMM and the Winograd 3x3 convolutions, can run here), and the runtime's
    "runtime_torch_version" / "runtime_cuda_available".
    """
    info = {
        "loaded": _C is not None,
        "import_error": _IMPORT_ERROR,
        "runtime_torch_version": torch.__version__,
        "runtime_cuda_available": torch.cuda.is_available(),
    }
    if _C is None:
        info.update(cpu=False, cuda=False, cuda_archs="", cuda_version="", torch_version="", cpu_sgemm="",
                    cpu_sgemm_reason="", cpu_avx512=False, cuda_skipped_reason="extension not loaded")
        return info
    info.update(_C.build_config())
    return info


def why_unavailable(device: torch.device) -> str:
    """Empty string when the extension's kernels can run on `device`, else the reason."""
    if _C is None:
        return f"csp_kernels._C is not built or failed to import: {_IMPORT_ERROR}"
    if device.type == "cpu":
        return ""
    if device.type == "cuda":
        config = _C.build_config()
        if not config["cuda"]:
            return (f"extension built without CUDA ({config['cuda_skipped_reason']}); "
                    f"torch {torch.__version__}")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return ""
    return f"no kernels for device type {device.type!r}"

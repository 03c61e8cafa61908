"""Which machine and software a run measured: every record carries this."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

import csp_kernels

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's name, family/model and vector ISA: the same name covers machines 2-4x apart."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if name in flags]
    return (f"{fields['model name']} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}; {' '.join(isa) or 'no avx2'})")


def git_commit() -> str:
    """HEAD's hash, with "+dirty" when the tree has uncommitted changes; "unknown" without git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def machine_info(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    build_info = getattr(csp_kernels, "build_info", None)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "triton": triton_version,
        "git_commit": git_commit(),
        "csp_kernels_build": build_info() if build_info is not None else None,
        "csp_kernels_backend": os.environ.get("CSP_KERNELS_BACKEND", "auto"),
    }

"""Builds csp_kernels._C: C++ CPU ops always, CUDA ops when torch has CUDA and a toolkit is found.

No GPU is needed to build. Environment:
  CSP_KERNELS_SKIP_CUDA=1   CPU-only build
  TORCH_CUDA_ARCH_LIST      overrides the default sm_80 + sm_90 gencodes
  CUDA_HOME                 the toolkit; else found from the `nvcc` on PATH (wrappers resolved)
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = ("80", "90")


def nvcc_toolkit_root(nvcc: str) -> str | None:
    """The toolkit an `nvcc` belongs to: asks nvcc itself, so wrapper scripts resolve."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        open(probe, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", probe, "-o", os.path.join(tmp, "p.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root, reason it was not found)."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates.append(nvcc_on_path)
    for nvcc in candidates:
        if os.path.exists(nvcc):
            root = nvcc_toolkit_root(nvcc)
            if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
                return root, ""
    return None, "no nvcc found (set CUDA_HOME or put nvcc on PATH)"


def nvcc_release(cuda_root: str) -> str:
    out = subprocess.run([os.path.join(cuda_root, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else "unknown"


def pip_nvidia_include_dirs() -> list[str]:
    """Headers that torch's CUDA headers include but a trimmed toolkit may lack (cusparse.h, ...)."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def cuda_arch_flags() -> tuple[list[str], str]:
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if requested:
        archs = [a.replace(".", "").replace("+PTX", "") for a in re.split(r"[ ;,]+", requested) if a]
    else:
        archs = list(DEFAULT_CUDA_ARCHS)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags, ",".join(f"sm_{a}" for a in archs)


def cuda_build_decision() -> tuple[bool, str, str | None]:
    """(build CUDA?, reason if not, toolkit root)."""
    if os.environ.get("CSP_KERNELS_SKIP_CUDA") == "1":
        return False, "CSP_KERNELS_SKIP_CUDA=1", None
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA", None
    root, reason = find_cuda_home()
    if root is None:
        return False, reason, None
    return True, "", root


def cpu_flags() -> list[str]:
    # -fno-trapping-math: without it GCC keeps the branches of `u > 0 ? u : slope * u` (the
    # multiply "might trap"), so leaky_relu and every act'(u) loop stay scalar (~15x slower).
    # -fopenmp: at::parallel_for is a header template that is parallel only where _OPENMP is
    # defined in *this* build; without it every CPU kernel here ran on one core.
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    # AVX2+FMA lets the compiler vectorize the per-element loops; every x86 machine this
    # library targets (GPU hosts, CI) has them, and CSP_KERNELS_NO_AVX2=1 opts out.
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("CSP_KERNELS_NO_AVX2") != "1":
        flags += ["-mavx2", "-mfma"]
    return flags


def extension():
    build_cuda, skipped_reason, cuda_root = cuda_build_decision()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [("CSP_KERNELS_CUDA_SKIPPED_REASON", f'"{skipped_reason}"')]
    extra = {"cxx": cpu_flags()}
    include_dirs = [os.path.join(HERE, "csrc")]
    if build_cuda:
        # torch's own guess (e.g. /usr/local) can miss when nvcc is a wrapper script.
        os.environ["CUDA_HOME"] = cuda_root
        cpp_extension.CUDA_HOME = cuda_root
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        arch_flags, arch_names = cuda_arch_flags()
        extra["nvcc"] = ["-O3", "-lineinfo", *arch_flags]
        define_macros += [("CSP_KERNELS_WITH_CUDA", "1"), ("CSP_KERNELS_CUDA_ARCHS", f'"{arch_names}"'),
                          ("CSP_KERNELS_CUDA_VERSION", f'"{nvcc_release(cuda_root)}"')]
        include_dirs += pip_nvidia_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
    else:
        print(f"csp_kernels: building without CUDA: {skipped_reason}", file=sys.stderr)
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="csp_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        # libgomp: the process already has torch's copy (same soname), so one OpenMP runtime.
        extra_link_args=["-fopenmp"],
    )


setup(
    name="csp_kernels",
    version="0.1.0",
    description="Fused, memory-efficient CSPNet blocks for PyTorch (Triton + C++/CUDA)",
    packages=find_packages(include=["csp_kernels", "csp_kernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
)

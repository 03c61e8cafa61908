"""The GPU code as compiled for real targets (sm_80, sm_90), on any machine: Triton kernels
compiled ahead of time with Triton's own ptxas, and the built CUDA extension's kernels. The
interpreter that runs the Triton kernels in the other tests cannot see a kernel that fails to
compile or spills registers, and without a GPU nothing else looks at the CUDA kernels' code.
The report runs in a subprocess because this process imports Triton in interpreter mode
(conftest.py) when there is no GPU."""
import json
import os
import subprocess
import sys

import pytest

import csp_kernels

pytest.importorskip("triton")

MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block, A100 / H100


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_compile", "--json"], env=env,
                            capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_every_triton_kernel_compiles_for_every_gpu_path_and_target(compiled):
    from benchmarks.gpu_compile import PRECISIONS, TARGETS
    rows = {kernel: [r for r in compiled if r["kernel"] == kernel] for kernel in ("conv1x1", "wgrad", "dgrad")}
    # conv1x1: every precision with and without prologue and statistics, and channels_last once;
    # the dense layer's backward GEMMs: every precision
    assert len(rows["conv1x1"]) == (len(PRECISIONS) * 2 + 1) * len(TARGETS)
    assert len(rows["wgrad"]) == len(rows["dgrad"]) == len(PRECISIONS) * len(TARGETS)
    assert all({r["capability"] for r in kernel_rows} == set(TARGETS) for kernel_rows in rows.values())


def test_cuda_extension_kernels_are_listed_for_every_target(compiled):
    cuda_rows = [r for r in compiled if r["kernel"] == "cuda"]
    if not csp_kernels.build_info()["cuda"]:
        assert cuda_rows == []
        return
    archs = {int(a.removeprefix("sm_")) for a in csp_kernels.build_info()["cuda_archs"].split(",")}
    assert {r["capability"] for r in cuda_rows} == archs
    assert any("maxout" in r["variant"] for r in cuda_rows) and any("bn_act" in r["variant"] for r in cuda_rows)


def test_no_kernel_spills_registers(compiled):
    # A CUDA-core float32 dot at 128x128 tiles spills kilobytes per thread; any spill is a bug.
    spilled = [r for r in compiled if r["spill_bytes"] > 0]
    assert not spilled, spilled
    assert all(0 < r["registers"] <= 255 for r in compiled)


def test_triton_kernels_move_data_in_16_byte_accesses(compiled):
    # The weight tile alone gives 6 (bf16): the kernel whose pixel blocks crossed images, so that
    # no contiguous run was visible, had only those; x's loads and out's stores add 8 or more.
    narrow = [r for r in compiled if r["kernel"] != "cuda" and r["wide_accesses"] < 10]
    assert not narrow, narrow


def test_shared_memory_fits_the_targets(compiled):
    too_big = [r for r in compiled if r["shared_bytes"] > MAX_SHARED[r["capability"]]]
    assert not too_big, too_big

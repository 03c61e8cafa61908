"""Test-wide setup. TRITON_INTERPRET must be set before anything imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny test shapes would measure oneDNN faster than our GEMMs, Winograd and phases; the tests pin ours so that
# they are exercised wherever they can run (tests/test_conv_choice.py tests the measured choice itself).
os.environ.setdefault("CSP_KERNELS_CPU_CONV1X1", "gemm")
os.environ.setdefault("CSP_KERNELS_CPU_CONV3X3", "winograd")
os.environ.setdefault("CSP_KERNELS_CPU_CONV3X3_STRIDE2", "phases")
# Likewise the tests draw tiny maps, which the CPU backend runs as plain PyTorch by default
# (ops.routing.eager_is_faster, training_eager_is_faster): pinned to the fused ops
# (tests/test_partial_dense_block.py and tests/test_small_maps.py test the routes).
os.environ.setdefault("CSP_KERNELS_CPU_SMALL_MAPS", "fused")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of small shapes: on a busy 2-core machine OpenMP's threads
    mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def full_float32_precision():
    """float32 convolutions and matmuls without TF32, which cuDNN convolutions (and the Triton
    GEMM, which follows them) use by default on a GPU and which would miss float32 tolerances
    against float64; no effect on the CPU. Restored by hand: monkeypatch cannot undo the
    attributes that torch.backends.cuda.matmul serves through __getattr__."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = saved


def pytest_configure(config):
    # A fused path that quietly runs the reference would pass every comparison with it: a test
    # that means to reach the fallback says so with pytest.warns.
    config.addinivalue_line("filterwarnings", "error::csp_kernels.backend.ReferenceFallbackWarning")

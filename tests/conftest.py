"""Test-wide setup. TRITON_INTERPRET must be set before anything imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny test shapes would measure oneDNN faster than Winograd; the tests pin Winograd so that it is
# exercised wherever it can run (tests/test_conv3x3_choice.py tests the measured choice itself).
os.environ.setdefault("CSP_KERNELS_CPU_CONV3X3", "winograd")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # A fused path that quietly runs the reference would pass every comparison with it: a test
    # that means to reach the fallback says so with pytest.warns.
    config.addinivalue_line("filterwarnings", "error::csp_kernels.backend.ReferenceFallbackWarning")

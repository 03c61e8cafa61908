"""Test-wide setup. TRITON_INTERPRET must be set before anything imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # A fused path that quietly runs the reference would pass every comparison with it: a test
    # that means to reach the fallback says so with pytest.warns.
    config.addinivalue_line("filterwarnings", "error::csp_kernels.backend.ReferenceFallbackWarning")

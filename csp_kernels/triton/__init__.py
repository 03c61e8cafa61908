"""Triton kernels (GPU; tested on CPU through the Triton interpreter)."""

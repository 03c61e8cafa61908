"""Runnable examples: `python -m csp_kernels.examples.train` (csp_kernels/examples/train.py)."""

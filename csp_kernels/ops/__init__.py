"""torch.library custom ops, one module per op family (fake kernels and autograd registered)."""

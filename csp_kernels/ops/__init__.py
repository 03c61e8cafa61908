"""torch.library custom ops, one module per op family (fake kernels and autograd registered)."""
from . import decompositions  # noqa: F401  (registers every op's ATen decomposition, for export to ONNX)

"""torch.library custom ops, one module per op family (fake kernels and autograd registered)."""
from . import fakes  # noqa: F401  (the C++ ops' fake kernels, csrc/ops.cpp's order)
from . import decompositions  # noqa: F401  (registers every op's ATen decomposition, for export to ONNX)

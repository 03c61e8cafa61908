"""Whether a call must go through a custom op's dispatcher, or may run its implementation directly.

A torch.library custom op costs tens of microseconds of Python per call in the dispatcher (more
with a registered autograd formula, which refills the schema's defaults at every call), as much
as the convolution of a small feature map: a YOLO11n forward makes about ninety such calls. In
eager mode on plain tensors nothing observes that dispatch, so the modules' eager paths run the
op's implementation (and, in training, autograd through a torch.autograd.Function of the op
family) directly. Under a trace (torch.compile, torch.export), a dispatch or torch-function mode
(FakeTensorMode, FlopCounterMode, ...) or with tensor subclasses, the op is called, so graphs,
modes and subclasses see the fused op as before.
"""
from __future__ import annotations

import torch
from torch import nn

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def through_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on `tensors` (None ignored) must go through the custom op."""
    if (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()):
        return True
    for t in tensors:  # (a loop, not any() over a generator: this runs at every call of every module)
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return True
    return False

"""Inductor keeps the fused kernels of the ops that have an ATen decomposition.

The functional ops' decompositions sit in torch._decomp's global table so that torch.onnx.export
can write them (ops.decompositions). Inductor lowers an op it has no lowering for through an
implicit fallback (torch._inductor.graph), and refuses one for an op with a registered
decomposition whenever the environment variable CI is set ("make_fallback(...): a decomposition
exists"), as GitHub Actions and most CI services set it: torch.compile of a fused module would
fail there. So these ops get the explicit fallbacks Inductor would have made, with the same
layout constraint, once Inductor is loaded.

When: `keep_fused_in_inductor` wraps the fake kernels and the decompositions of those ops, one of
which runs in every trace that Inductor lowers (fake tensors run the fake kernel, or the
decomposition when sizes are symbolic). Importing Inductor up front instead would cost every
`import csp_kernels` about a second.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch._library.utils import get_layout_constraint_tag

DECOMPOSED_OPS: list[torch._ops.OpOverload] = []  # filled by ops.decompositions
_registered = False


def _register_fallbacks() -> None:
    global _registered
    lowering = sys.modules.get("torch._inductor.lowering")
    if _registered or lowering is None:
        return
    for op in DECOMPOSED_OPS:
        if op not in lowering.lowerings:
            tag = get_layout_constraint_tag(op, with_default=True)
            lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(tag), warn=False)
    _registered = True


def keep_fused_in_inductor(fn):
    """Decorates a fake kernel or a decomposition of an op in DECOMPOSED_OPS."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _register_fallbacks()
        return fn(*args, **kwargs)
    return wrapper

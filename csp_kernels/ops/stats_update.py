"""Running-statistics updates made inside a training op's autograd node, before it saves its
tensors, where nn.BatchNorm2d makes its own.

Why: a non-reentrant torch.utils.checkpoint recomputes its forward in backward and, by default
(early stop), ends the recomputation as soon as the last tensor that backward needs is saved
again. nn.BatchNorm2d has updated its running statistics by then (inside the op that then
saves), so the reference counts the batch twice, as PyTorch's BatchNorm under checkpointing
does; a fused module updating after its op returned would miss its second update.

A fused module runs its recorded training op under `before_saving(update)`; the op's autograd
forward (or setup_context) calls `update_before_saving(...)` with its batch statistics just
before its tensors are saved. Where no autograd node is built (no grad, no input requiring
grad) nothing calls it, and the module updates after the op (`done` is False).
Tests: tests/test_checkpoint.py.
"""
from __future__ import annotations

import threading
from typing import Callable

_slot = threading.local()


class before_saving:  # lowercase, as contextlib.suppress: used as `with before_saving(update) as pending`
    """Within: the first training op that calls `update_before_saving` makes `update` (with the
    statistics it passes). Enters as itself: `done` says whether an op made the update. (A class,
    not a generator context manager: it runs at every training call of every fused unit.)"""
    __slots__ = ("update", "done", "_previous")

    def __init__(self, update: Callable[..., None]):
        self.update, self.done = update, False

    def __enter__(self) -> "before_saving":
        self._previous = getattr(_slot, "pending", None)
        _slot.pending = self
        return self

    def __exit__(self, *exc_info) -> None:
        _slot.pending = self._previous


def update_before_saving(*statistics) -> None:
    """Called by a training op's autograd forward before it saves tensors: makes the pending
    update, once, if a module asked for one."""
    pending = getattr(_slot, "pending", None)
    if pending is not None and not pending.done:
        pending.done = True
        pending.update(*statistics)

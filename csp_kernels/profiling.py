"""Measuring instruments: memory traffic per op, bytes saved for backward, peak CUDA memory, CIO.

- `TrafficCounter`: bytes every op reads and writes (a TorchDispatchMode, so it sees the ops
  below autograd, backward ops included when backward runs inside it).
- `SavedTensorsMeter`: bytes autograd keeps for backward (saved_tensors_hooks), each storage once.
- `peak_cuda_memory`: `torch.cuda.max_memory_allocated` over a block.
- `peak_cpu_memory`: the most CPU tensor memory a block had allocated at any moment.
- `cio_dense_block`, `cio_partial_dense_block`, `cio_bytes`: the paper's CIO (arXiv 1911.11929).

Bytes are logical: a tensor argument or result of `numel` elements costs `numel * element_size`,
whatever its strides. A strided view passed to an op costs the elements it covers, not its whole
storage.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose outputs alias an input although their schema carries no alias annotation.
_UNANNOTATED_VIEWS = frozenset({"aten::_unsafe_view", "aten::unsafe_split",
                                "aten::unsafe_split_with_sizes"})
# Ops that only allocate: no element is read or written.
_ALLOCATIONS = frozenset({"aten::empty", "aten::empty_like", "aten::empty_strided",
                          "aten::new_empty", "aten::new_empty_strided"})
# Ops whose tensor inputs only supply shape, dtype and device.
_METADATA_INPUTS = frozenset({"aten::zeros_like", "aten::ones_like", "aten::full_like",
                              "aten::rand_like", "aten::randn_like", "aten::new_zeros",
                              "aten::new_ones", "aten::new_full"})
# In-place ops that overwrite `self` without reading it.
_OVERWRITES_SELF = frozenset({"aten::copy_", "aten::fill_", "aten::zero_"})
# Batch-norm kernels that update running statistics in training although their schema does not
# mark them as written (aten::native_batch_norm and the cuDNN/MIOpen twins).
_UNANNOTATED_RUNNING_STATS = frozenset({"aten::native_batch_norm", "aten::cudnn_batch_norm",
                                        "aten::miopen_batch_norm"})


def format_bytes(n: float | None) -> str:
    """`n` bytes in binary units, e.g. '12.5 MiB'; '-' for None."""
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while abs(n) >= 1024 and power < len(units) - 1:
        n /= 1024
        power += 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"


def _tensors(value) -> Iterator[torch.Tensor]:
    """The tensors in an argument or result: a tensor, or a list/tuple of tensors and Nones."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _is_view(func: torch._ops.OpOverload) -> bool:
    if getattr(func, "is_view", False) or func._schema.name in _UNANNOTATED_VIEWS:
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write
               for r in func._schema.returns)


def _bind(schema, args, kwargs) -> dict:
    """The values the caller supplied, by argument name (defaults left out)."""
    positional = [arg for arg in schema.arguments if not arg.kwarg_only]
    bound = {arg.name: value for arg, value in zip(positional, args)}
    bound.update(kwargs)
    return bound


@dataclasses.dataclass
class OpTraffic:
    """Bytes one op (an OpOverload such as aten.add.Tensor) moved over all its calls."""
    reads: int = 0
    writes: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.reads + self.writes


class _EnteredOnce:
    """A context manager that is active at most once at a time: entering it again while active
    (nesting one instance: it would count twice) or leaving it when not active raises a
    RuntimeError saying so. Entering again after it was left adds to what it measured."""

    _active = False

    def _enter_once(self) -> None:
        if self._active:
            raise RuntimeError(f"this {type(self).__name__} is already active; nest another instance instead")
        self._active = True

    def _exit_once(self) -> None:
        if not self._active:
            raise RuntimeError(f"this {type(self).__name__} is not active: leave it once per `with`")
        self._active = False


class TrafficCounter(_EnteredOnce, TorchDispatchMode):
    """Counts the bytes read and written by every op run inside `with TrafficCounter() as t:`.

    Rules (logical bytes, see the module docstring):
    - reads: every tensor input (lists flattened); writes: every output, plus the inputs the
      schema marks as mutated (`Tensor(a!)`).
    - a mutated input that is an out-style destination (keyword-only, or named `out`) is
      written, not read; other mutated inputs (`add_`'s `self`) are read and written, except
      for ops that overwrite without reading (`copy_`, `fill_`, `zero_`).
    - an output aliasing a mutated input is not counted again.
    - views (ops whose outputs alias an input: view, t, slice, expand, detach, ...) and pure
      allocations (empty, empty_like, ...) move nothing and are not recorded at all.
    - `*_like`/`new_*` factories read no data: only their output counts.
    - a custom op (torch.ops.csp_kernels.*) counts once by its own inputs and outputs: the
      ops inside it run while this mode is disabled, so they are not seen.

    `per_op` maps an op name ("aten.add.Tensor") to its `OpTraffic`; `reads`, `writes`,
    `total` are the sums; `table()` formats the breakdown.
    """

    def __init__(self):
        super().__init__()
        self.per_op: dict[str, OpTraffic] = {}

    def __enter__(self) -> TrafficCounter:
        self._enter_once()
        return super().__enter__()

    def __exit__(self, *exc):
        self._exit_once()
        return super().__exit__(*exc)

    @property
    def reads(self) -> int:
        return sum(op.reads for op in self.per_op.values())

    @property
    def writes(self) -> int:
        return sum(op.writes for op in self.per_op.values())

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func._schema.name
        if _is_view(func) or name in _ALLOCATIONS:
            return result
        reads, writes = self._count(func, args, kwargs, result)
        op = self.per_op.setdefault(str(func), OpTraffic())
        op.reads += reads
        op.writes += writes
        op.calls += 1
        return result

    @staticmethod
    def _count(func, args, kwargs, result) -> tuple[int, int]:
        schema = func._schema
        name = schema.name
        bound = _bind(schema, args, kwargs)
        reads = writes = 0
        arguments = () if name in _METADATA_INPUTS else schema.arguments
        for arg in arguments:
            if arg.name not in bound:
                continue
            nbytes = _nbytes(bound[arg.name])
            mutated = (arg.alias_info is not None and arg.alias_info.is_write) or (
                name in _UNANNOTATED_RUNNING_STATS and bound.get("training") is True
                and arg.name in ("running_mean", "running_var"))
            destination_only = arg.kwarg_only or arg.name == "out" or (
                arg.name == "self" and name in _OVERWRITES_SELF)
            if not (mutated and destination_only):
                reads += nbytes
            if mutated:
                writes += nbytes
        results = result if len(schema.returns) > 1 else (result,)
        for ret, value in zip(schema.returns, results):
            if ret.alias_info is None:  # an aliased return is a mutated input, counted above
                writes += _nbytes(value)
        return reads, writes

    def table(self, top: int | None = None) -> str:
        """The per-op breakdown, largest total first, with a totals line."""
        rows = sorted(self.per_op.items(), key=lambda item: item[1].total, reverse=True)
        if top is not None:
            rows = rows[:top]
        width = max([len("op")] + [len(name) for name, _ in rows])
        total = self.total or 1
        lines = [f"{'op':<{width}}  {'calls':>6}  {'read':>11}  {'written':>11}  {'share':>6}"]
        for name, op in rows:
            lines.append(f"{name:<{width}}  {op.calls:>6}  {format_bytes(op.reads):>11}  "
                         f"{format_bytes(op.writes):>11}  {100 * op.total / total:>5.1f}%")
        lines.append(f"{'total':<{width}}  {sum(op.calls for op in self.per_op.values()):>6}  "
                     f"{format_bytes(self.reads):>11}  {format_bytes(self.writes):>11}  100.0%")
        return "\n".join(lines)


class SavedTensorsMeter(_EnteredOnce):
    """Bytes autograd saves for backward inside `with SavedTensorsMeter() as meter:`.

    Every tensor saved for backward (by ATen's autograd formulas and by custom
    `autograd.Function`s through `ctx.save_for_backward` alike) keeps its whole storage alive,
    so a storage counts once, with its full `nbytes`, however many tensors or views of it are
    saved. A storage freed during the block whose memory is then reused by a new storage counts
    as a second storage. Only saving is metered; unpacking in backward is free.

    `bytes`: all saved storages; `bytes_excluding(tensors)`: without the storages of `tensors`
    (e.g. a module's parameters and buffers, to get activation memory); `tensors`: the number of
    tensors saved (with repeats).

    `recipe_transparent`: the fused ConvBNActs, which save a tensor they can rebuild as a recipe
    (ops/recompute.py), still save everything else through this meter while it is active.
    """
    recipe_transparent = True

    def __init__(self):
        self._storages: dict[tuple, tuple[int, StorageWeakRef]] = {}
        self._retired_bytes = 0
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        storage = tensor.untyped_storage()
        return (tensor.device.type, tensor.device.index, storage.data_ptr())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        storage = tensor.untyped_storage()
        key = self._key(tensor)
        known = self._storages.get(key)
        if known is None or known[1].expired():
            if known is not None:  # the old storage died and its memory was reused
                self._retired_bytes += known[0]
            self._storages[key] = (storage.nbytes(), StorageWeakRef(storage))
        # Detached: a packed value that is the op's own output (a custom op saving what it
        # returns) would hold its grad_fn, a cycle through C++ autograd nodes that leaked the
        # whole graph when no backward ran; autograd re-attaches an output's grad_fn on unpack.
        return tensor.detach()

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def bytes(self) -> int:
        return self._retired_bytes + sum(nbytes for nbytes, _ in self._storages.values())

    def bytes_excluding(self, tensors: Iterable[torch.Tensor]) -> int:
        """Saved bytes without the storages of `tensors` (counted once each if saved)."""
        excluded = {self._key(t) for t in tensors}
        return self.bytes - sum(nbytes for key, (nbytes, ref) in self._storages.items()
                                if key in excluded and not ref.expired())

    def __enter__(self) -> SavedTensorsMeter:
        self._enter_once()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._exit_once()
        self._hooks.__exit__(*exc)


@dataclasses.dataclass
class PeakMemory:
    """What `peak_cuda_memory` or `peak_cpu_memory` measured; both None where it cannot.

    bytes: the peak over the block (`torch.cuda.max_memory_allocated`; CUDA only); increase:
    the peak minus the memory in use when the block began (what the block itself needed at its
    worst; CUDA and CPU).
    """
    bytes: int | None = None
    increase: int | None = None


@contextlib.contextmanager
def peak_cuda_memory(device: torch.device | str | int | None = None) -> Iterator[PeakMemory]:
    """`with peak_cuda_memory() as peak:` fills `peak.bytes` and `peak.increase` at exit."""
    record = PeakMemory()
    if not torch.cuda.is_available():
        yield record
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    try:
        yield record
    finally:
        torch.cuda.synchronize(device)
        record.bytes = torch.cuda.max_memory_allocated(device)
        record.increase = record.bytes - start


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block: Kineto logs every profiler start and stop
    there, whatever its log level."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def peak_cpu_memory() -> Iterator[PeakMemory]:
    """`with peak_cpu_memory() as peak:` fills `peak.increase`: the most CPU tensor memory the
    block had allocated at any moment, minus what it had freed by then of what was allocated
    before it (what the block itself needed at its worst). The CPU analogue of
    `torch.cuda.max_memory_allocated`, from every allocation and free of PyTorch's CPU
    allocator (the profiler's memory events): temporaries inside an op and compiled
    (torch.compile) code included, memory that libraries allocate behind it (oneDNN's scratch)
    not. Frees of tensors allocated before the block are not seen (the profiler knows no size
    for them, and PyTorch warns once), so free those first where they matter. `peak.bytes`
    stays None: the CPU allocator keeps no count of what is in use. Not inside another
    torch.profiler (another `peak_cpu_memory` included): that raises RuntimeError, as the inner
    profiler's exit would end the outer's collection."""
    if torch.autograd.profiler._is_profiler_enabled:
        raise RuntimeError("peak_cpu_memory cannot run inside another torch.profiler (or peak_cpu_memory): the "
                           "inner profiler's exit would end the outer one's collection")
    record = PeakMemory()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        profiler.__enter__()
    try:
        yield record
    finally:
        with _stderr_silenced():
            profiler.__exit__(None, None, None)
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    in_use = peak = 0
    for _, nbytes in events:
        in_use += nbytes
        peak = max(peak, in_use)
    record.increase = peak


def cio_dense_block(c: int, m: int, d: int) -> float:
    """The paper's CIO of a dense block, in channels: c·m + (m²+m)·d/2.

    c: base (input) channels, m: layers, d: growth rate. Multiply by batch·height·width·element
    size (`cio_bytes`) for bytes.
    """
    return c * m + (m * m + m) * d / 2


def cio_partial_dense_block(c: int, m: int, d: int) -> float:
    """The paper's CIO of a partial dense block, in channels: (c·m + (m²+m)·d)/2.

    c: the block's base channels before the split (the paper halves them, part_ratio 0.5).
    """
    return (c * m + (m * m + m) * d) / 2


def cio_bytes(channels: float, batch: int, height: int, width: int,
              dtype: torch.dtype = torch.float32) -> float:
    """A CIO figure in channels converted to bytes for feature maps of batch×height×width."""
    return channels * batch * height * width * dtype.itemsize

"""The eval fold caches' staleness test: a cached fold (BatchNorm folded into the conv, a
prepacked or Winograd-transformed weight) holds while its source tensors keep their bits.

Bits, not version counters and storage pointers, because edits through `.data` (EMA updates,
`p.data.mul_()`, `.data =` assignments reusing memory) bump no version. The cost is one read of
each source and of its copy per call, which the measured kernel choice for eval convs counts in
(`ops.conv_choice`); where ATen runs the conv the weight is used as it is and not compared.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Sequence

import numpy as np
import torch


def fold_key(sources: Sequence[torch.Tensor]) -> tuple:
    """What `fold_cache_hit` compares besides the bytes: dtypes, devices and shapes."""
    return tuple((t.dtype, t.device, t.shape) for t in sources)


def snapshot(sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Contiguous copies of an eval fold's source tensors, for `fold_cache_hit`."""
    with torch.no_grad():
        return tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in sources)


# Integer dtypes of each element size, to compare floating-point tensors bit by bit.
_BITS_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def same_bits(kept: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether `source` holds bit for bit the values of its contiguous copy `kept` (same dtype
    and shape). Bits, not values: a NaN parameter equals its copy, so the fold is not redone at
    every call. On the CPU single-threaded, because this runs at every eval call and
    torch.equal's intra-op threads wait on each other whenever the machine is busy: C's memcmp
    for a contiguous source (no temporary, a few bytes of call overhead, which matters for the
    BatchNorm vectors), else NumPy."""
    if source.device.type == "cpu" and source.is_contiguous():
        return _memcmp(kept.data_ptr(), source.data_ptr(), kept.numel() * kept.element_size()) == 0
    bits = _BITS_DTYPES[kept.element_size()]
    kept, source = kept.view(bits), source.detach().view(bits)
    if source.device.type != "cpu":
        return torch.equal(kept, source)
    return bool(np.array_equal(kept.numpy(), source.numpy()))


_memcmp = ctypes.CDLL(ctypes.util.find_library("c")).memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def fold_cache_hit(cache: tuple | None, key: tuple, sources: Sequence[torch.Tensor]) -> bool:
    """Whether an eval cache (key, snapshot(sources then), ...) still holds for `sources`: same
    key, same bits. Bits, not version counters and storage pointers, because edits through
    `.data` (EMA updates, `p.data.mul_()`, `.data =` assignments reusing memory) bump no version.
    One read of each parameter and of its copy per call, small next to the convolutions the fold
    serves."""
    return cache is not None and cache[0] == key and all(same_bits(s, t) for s, t in zip(cache[1], sources))

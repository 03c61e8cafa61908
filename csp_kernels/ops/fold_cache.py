"""The eval fold caches' staleness test: a cached fold (BatchNorm folded into the conv, a
prepacked or Winograd-transformed weight) holds while its source tensors keep their dtype,
device, shape and bits.

Bits, not version counters and storage pointers, because edits through `.data` (EMA updates,
`p.data.mul_()`, `.data =` assignments reusing memory) bump no version. Bits, not values: a NaN
parameter equals its copy, so the fold is not redone at every call. The cost is one read of each
source and of its copy per call, in one call of the extension's `same_bits` (csrc/same_bits.cpp:
no dispatcher, single-threaded on the CPU, since it runs at every eval call of every fused
module), which the measured kernel choice for eval convs counts in (`ops.conv_choice`); where
ATen runs the conv the weight is used as it is and not compared.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import extension


def snapshot(sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Contiguous copies of an eval fold's source tensors, for `same_bits`."""
    with torch.no_grad():
        return tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in sources)


def same_bits(kept: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> bool:
    """Whether each of `sources` has the dtype, device, shape and bits of its `snapshot` in
    `kept`."""
    return extension._C.same_bits(kept, sources)


def fold_cache_hit(cache: tuple | None, key: tuple, sources: Sequence[torch.Tensor]) -> bool:
    """Whether an eval cache (key, snapshot(sources then), ...) still holds for `sources`: the
    same key (what else the fold depends on) and `same_bits`."""
    return cache is not None and cache[0] == key and same_bits(cache[1], sources)

"""Collectives per training step of synchronized BatchNorms: the fused modules (their
BatchNorms converted by `csp_kernels.distributed.convert_sync_batchnorm`) against eager
nn.SyncBatchNorm in the reference modules, for a PartialDenseBlock, a C2f and a ConvBNAct.

    python -m benchmarks.collectives [--world-size 2]

Fused: counted, by wrapping torch.distributed.all_reduce / all_gather in each of `world_size`
gloo processes on the CPU during one training step (forward and backward) on 2 samples per
process. Eager: derived from nn.SyncBatchNorm's algorithm (torch/nn/modules/_functions.py),
since its forward refuses CPU tensors: per training BatchNorm call (each call of the reference
module's forward, tallied by forward hooks), one all_gather of each rank's (mean, invstd, count),
world_size·(2C + 1) values, in forward and one all_reduce of (sum_dy, sum_dy_xmu), 2C values, in
backward. Values are counted as the collective's tensors hold them (an all_gather's whole output
list); bytes in their dtypes (the fused forward's statistics travel in float64; eager's, and the
backward sums, in the statistics dtype, here float32). A few seconds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import csp_kernels
from csp_kernels import reference
from csp_kernels.distributed import convert_sync_batchnorm
from csp_kernels.ops.batch_norm_act import stats_dtype

COLLECTIVES = ("all_reduce", "all_gather")
SAMPLES_PER_RANK = 2
DTYPE = torch.float32
# name -> (build(library), one sample's shape); library: csp_kernels or csp_kernels.reference
MODULES = {
    # a CSPDenseNet-121 block's layer count and growth (its second stage), fusion as in the paper
    "PartialDenseBlock": (lambda lib: lib.PartialDenseBlock(128, num_layers=12, growth_rate=32, fusion="csp"),
                          (128, 8, 8)),
    "C2f": (lambda lib: lib.C2f(64, 64, n=2, shortcut=True), (64, 8, 8)),
    "ConvBNAct": (lambda lib: lib.ConvBNAct(64, 64, 3), (64, 8, 8)),
}


class CollectiveCounter:
    """Counts torch.distributed.all_reduce / all_gather calls, with the values and bytes they
    carry, while `active`; the fused path and eager nn.SyncBatchNorm call them through the
    module attribute (the wrappers stay installed for the process's life)."""

    def __init__(self):
        self.active = False
        self.calls = {name: [] for name in COLLECTIVES}
        for name in self.calls:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, collective):
        def counted(tensor, *args, **kwargs):
            if self.active:
                tensors = tensor if isinstance(tensor, list) else [tensor]
                self.calls[name].append((sum(t.numel() for t in tensors),
                                         sum(t.numel() * t.element_size() for t in tensors)))
            return collective(tensor, *args, **kwargs)
        return counted

    def take(self) -> dict[str, list[int]]:
        """{collective: [calls, values, bytes]} since the last take."""
        taken = {name: [len(sizes), sum(v for v, _ in sizes), sum(b for _, b in sizes)]
                 for name, sizes in self.calls.items()}
        for sizes in self.calls.values():
            sizes.clear()
        return taken


def eager_collectives(module: nn.Module, x: torch.Tensor, world_size: int) -> dict[str, list[int]]:
    """{collective: [calls, values, bytes]} that eager nn.SyncBatchNorm would issue in one
    training step of `module` (a reference module, any BatchNorms) on this rank's x, over
    `world_size` processes: its training BatchNorms' calls in one forward, tallied by hooks."""
    taken = {name: [0, 0, 0] for name in COLLECTIVES}
    itemsize = torch.empty(0, dtype=stats_dtype(x.dtype)).element_size()

    def tally(bn, inputs, output):
        if bn.training:
            c = inputs[0].shape[1]
            for name, values in (("all_gather", world_size * (2 * c + 1)), ("all_reduce", 2 * c)):
                taken[name] = [taken[name][0] + 1, taken[name][1] + values, taken[name][2] + values * itemsize]

    hooks = [m.register_forward_hook(tally) for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return taken


def fused_collectives(module: nn.Module, x: torch.Tensor, counter: CollectiveCounter) -> dict[str, list[int]]:
    """{collective: [calls, values, bytes]} of one training step (forward, backward) of the fused
    `module` on this rank's x, its BatchNorms converted to SyncBatchNorm, in the initialized
    process group."""
    convert_sync_batchnorm(module)
    counter.take()
    counter.active = True
    try:
        module(x).sum().backward()
    finally:
        counter.active = False
    return counter.take()


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        counter = CollectiveCounter()
        results = {}
        for name, (build, shape) in MODULES.items():
            torch.manual_seed(rank)
            results[name] = fused_collectives(build(csp_kernels).to(DTYPE),
                                              torch.randn(SAMPLES_PER_RANK, *shape, dtype=DTYPE), counter)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for init_method."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world_size: int = 2) -> list[dict]:
    """One row per module of MODULES: {"module", "batch_norms", "fused", "eager"}, the last two
    {collective: [calls, values, bytes]} per training step on each rank (every rank's fused
    counts are checked equal)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir), nprocs=world_size, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world_size)]
    if any(other != ranks[0] for other in ranks[1:]):
        raise RuntimeError(f"the ranks counted different collectives: {ranks}")
    rows = []
    for name, (build, shape) in MODULES.items():
        ref = build(reference).to(DTYPE)
        rows.append({"module": name,
                     "batch_norms": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ref.modules()),
                     "fused": ranks[0][name],
                     "eager": eager_collectives(ref, torch.randn(SAMPLES_PER_RANK, *shape, dtype=DTYPE), world_size)})
    return rows


def format_rows(rows: list[dict], world_size: int) -> str:
    """The table `main` prints."""
    lines = [f"Collectives per training step and process, {world_size} gloo processes, {SAMPLES_PER_RANK} samples "
             f"each, {str(DTYPE).removeprefix('torch.')}; fused: counted; eager nn.SyncBatchNorm: from its algorithm "
             "(it refuses CPU tensors)",
             f"{'module':<18} {'BNs':>4}  {'variant':<7} {'all_reduce':>10} {'all_gather':>10} {'values':>8} "
             f"{'KiB':>8}"]
    for row in rows:
        for variant in ("fused", "eager"):
            counts = row[variant]
            lines.append(f"{row['module'] if variant == 'fused' else '':<18} "
                         f"{row['batch_norms'] if variant == 'fused' else '':>4}  {variant:<7} "
                         f"{counts['all_reduce'][0]:>10} {counts['all_gather'][0]:>10} "
                         f"{sum(c[1] for c in counts.values()):>8} {sum(c[2] for c in counts.values()) / 1024:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collectives", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="gloo processes (default 2)")
    args = parser.parse_args(argv)
    print(format_rows(measure(args.world_size), args.world_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

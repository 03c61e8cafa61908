"""What is benchmarked: the standard configurations of docs/benchmarks.md, their --quick
shrinks and the sweeps behind the plots."""
from __future__ import annotations

import dataclasses

import torch

from csp_kernels import profiling, reference

@dataclasses.dataclass(frozen=True)
class Family:
    """A kind of module: the class name shared by `csp_kernels.reference` and `csp_kernels`."""
    name: str          # "pdb", "trans", "efm"
    class_name: str    # "PartialDenseBlock", ...
    takes_list: bool   # forward takes one list of tensors (ExactFusion) instead of one tensor


FAMILIES = {
    "pdb": Family("pdb", "PartialDenseBlock", takes_list=False),
    "trans": Family("trans", "ConvBNAct", takes_list=False),
    "efm": Family("efm", "ExactFusion", takes_list=True),
    "c2f": Family("c2f", "C3k2", takes_list=False),
    "cross": Family("cross", "CrossStage", takes_list=False),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One module built with `kwargs`, fed inputs of `input_shapes` in `dtype`.

    name: the configuration ("pdb-cpu"); label: name plus what distinguishes this workload
    (dtype when a configuration has several, the swept value).
    """
    name: str
    family: Family
    kwargs: dict
    input_shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    label: str = ""

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def make_inputs(self, device: torch.device, seed: int = 0) -> tuple:
        """The positional arguments of the module's forward, each input requiring grad (a block
        inside a network gets its input's gradient computed)."""
        generator = torch.Generator().manual_seed(seed)
        tensors = [torch.randn(shape, generator=generator).to(device, self.dtype).requires_grad_()
                   for shape in self.input_shapes]
        return (tensors,) if self.family.takes_list else tuple(tensors)

    def cio_channels(self) -> float | None:
        """The paper's CIO of a partial dense block (None for other families)."""
        if self.family.name != "pdb":
            return None
        return profiling.cio_partial_dense_block(
            self.kwargs["in_channels"], self.kwargs["num_layers"], self.kwargs["growth_rate"])

    def cio_bytes(self) -> float | None:
        channels = self.cio_channels()
        if channels is None:
            return None
        batch, _, height, width = self.input_shapes[0]
        return profiling.cio_bytes(channels, batch, height, width, self.dtype)

    def replace(self, label: str, **kwargs) -> Workload:
        """This workload with some module kwargs changed (or `batch`, the first input dim)."""
        batch = kwargs.pop("batch", None)
        shapes = self.input_shapes if batch is None else tuple(
            (batch,) + shape[1:] for shape in self.input_shapes)
        return dataclasses.replace(self, kwargs={**self.kwargs, **kwargs}, input_shapes=shapes,
                                   label=label)


def _pdb(name, channels, batch, size, dtype, num_layers=6, growth_rate=32):
    kwargs = dict(in_channels=channels, num_layers=num_layers, growth_rate=growth_rate,
                  part_ratio=0.5, fusion="csp")
    return Workload(name, FAMILIES["pdb"], kwargs, ((batch, channels, size, size),), dtype)


def _trans(name, channels, batch, size, dtype, act, kernel_size=1):
    kwargs = dict(in_channels=channels, out_channels=channels, kernel_size=kernel_size, act=act)
    return Workload(name, FAMILIES["trans"], kwargs, ((batch, channels, size, size),), dtype)


def _efm(name, channels, batch, sizes, dtype):
    # EFM over three levels: each output level Maxout-compresses the level and its neighbours,
    # resized to its resolution, to `channels` (out 128 per level on efm-cpu).
    kwargs = dict(in_channels=[channels] * len(sizes), out_channels=channels)
    shapes = tuple((batch, channels, s, s) for s in sizes)
    return Workload(name, FAMILIES["efm"], kwargs, shapes, dtype)


def _c3k2(name, c1, c2, batch, size, dtype, e=0.25):
    # yolo11s's P3 backbone stage (model.4: C3k2(128, 256, n=1, c3k=False, e=0.25), SiLU) on the
    # 80x80 map of a 640 px image.
    kwargs = dict(c1=c1, c2=c2, n=1, c3k=False, e=e)
    return Workload(name, FAMILIES["c2f"], kwargs, ((batch, c1, size, size),), dtype)


def _cross(name, in_chs, out_chs, batch, size, dtype, depth=8):
    # cspdarknet53's third stage as timm builds it (stages.2: 8 DarkBlocks, block_ratio 0.5,
    # bottle_ratio 1, expand_ratio 1, down_growth, leaky_relu): a 3x3 stride-2 conv_down halves
    # the input, 104x104 -> 52x52 for a 416 px image.
    kwargs = dict(in_chs=in_chs, out_chs=out_chs, stride=2, dilation=1, depth=depth, block_ratio=0.5,
                  bottle_ratio=1.0, expand_ratio=1.0, down_growth=True, block_fn=reference.DarkBlock,
                  act_layer="leaky_relu")
    return Workload(name, FAMILIES["cross"], kwargs, ((batch, in_chs, size, size),), dtype)


f32, bf16 = torch.float32, torch.bfloat16
# --quick's maps on the CPU: over the 8x8 at and below which the fused modules train as plain
# PyTorch (ops.routing.SMALL_TRAINING_MAP_PIXELS), so that quick rows compare the fused path.
QUICK_CPU_SIDE = 12
# name -> (workloads at full size, workloads for --quick), one workload per dtype
CONFIGS: dict[str, tuple[list[Workload], list[Workload]]] = {
    "pdb-cpu": ([_pdb("pdb-cpu", 128, 8, 56, f32)],
                [_pdb("pdb-cpu", 16, 2, QUICK_CPU_SIDE, f32, num_layers=3, growth_rate=8)]),
    "pdb-gpu": ([_pdb("pdb-gpu", 256, 64, 56, bf16), _pdb("pdb-gpu", 256, 64, 56, f32)],
                [_pdb("pdb-gpu", 16, 2, 8, bf16, 3, 8), _pdb("pdb-gpu", 16, 2, 8, f32, 3, 8)]),
    "trans-cpu": ([_trans("trans-cpu", 256, 8, 56, f32, "leaky_relu")],
                  [_trans("trans-cpu", 16, 2, QUICK_CPU_SIDE, f32, "leaky_relu")]),
    # cspdarknet53's stage-5 3x3 at 224 px input: a small map, where Winograd's tiles and
    # per-call weight transform do not pay (the kernel choice must fall back to oneDNN).
    "small-cpu": ([_trans("small-cpu", 512, 8, 7, f32, "leaky_relu", kernel_size=3)],
                  [_trans("small-cpu", 32, 2, 2, f32, "leaky_relu", kernel_size=3)]),
    "trans-gpu": ([_trans("trans-gpu", 256, 64, 80, bf16, "silu")],
                  [_trans("trans-gpu", 16, 2, 8, bf16, "silu")]),
    "efm-cpu": ([_efm("efm-cpu", 128, 8, (80, 40, 20), f32)],
                [_efm("efm-cpu", 8, 2, (8, 4, 2), f32)]),
    "efm-gpu": ([_efm("efm-gpu", 256, 32, (80, 40, 20), bf16)],
                [_efm("efm-gpu", 8, 2, (8, 4, 2), bf16)]),
    "c2f-cpu": ([_c3k2("c2f-cpu", 128, 256, 8, 80, f32)],
                [_c3k2("c2f-cpu", 16, 32, 2, QUICK_CPU_SIDE, f32)]),
    "cross-cpu": ([_cross("cross-cpu", 128, 256, 8, 104, f32)],
                  [_cross("cross-cpu", 16, 32, 2, 2 * QUICK_CPU_SIDE, f32, depth=2)]),
    "c2f-gpu": ([_c3k2("c2f-gpu", 128, 256, 64, 80, bf16)],
                [_c3k2("c2f-gpu", 16, 32, 2, 8, bf16)]),
    "cross-gpu": ([_cross("cross-gpu", 128, 256, 64, 104, bf16)],
                  [_cross("cross-gpu", 16, 32, 2, 8, bf16, depth=2)]),
}
DEFAULT_CONFIGS = {"cpu": ["pdb-cpu", "trans-cpu", "efm-cpu", "small-cpu", "c2f-cpu", "cross-cpu"],
                   "cuda": ["pdb-gpu", "trans-gpu", "efm-gpu", "c2f-gpu", "cross-gpu"]}


def workloads(name: str, quick: bool) -> list[Workload]:
    """The workloads of configuration `name`, labelled with their dtype when there are several."""
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}; got {name!r}")
    chosen = CONFIGS[name][1 if quick else 0]
    if len(chosen) == 1:
        return list(chosen)
    return [dataclasses.replace(w, label=f"{w.name}/{w.dtype_name}") for w in chosen]


# sweep name -> (values at full size, values for --quick); docs/benchmarks.md's ranges
SWEEPS = {
    "num_layers": ((2, 4, 6, 8, 10, 12, 14, 16), (2, 3, 4, 6)),
    "part_ratio": ((0.25, 0.5, 0.75), (0.25, 0.5, 0.75)),
    "growth_rate": ((12, 32, 64), (4, 8, 12)),
    "batch": ((1, 2, 4, 8, 16), (1, 2, 4)),
}
PLOT_SWEEPS = ("num_layers", "batch", "part_ratio")  # what --plots needs


def sweep_workloads(sweep: str, base: Workload, quick: bool) -> list[tuple[float, Workload]]:
    """`base` (a partial dense block) with one parameter stepped through the sweep's values."""
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {sorted(SWEEPS)}; got {sweep!r}")
    values = SWEEPS[sweep][1 if quick else 0]
    return [(value, base.replace(f"{base.name} {sweep}={value}", **{sweep: value}))
            for value in values]

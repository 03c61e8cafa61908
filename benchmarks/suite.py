"""A whole run: every workload and sweep point, every variant, the metrics the command asks for,
the ratios against each baseline and the verdict on each target."""
from __future__ import annotations

import copy
import dataclasses
import statistics

import torch
from tqdm import tqdm

from . import baselines, configs, measure, roofline, targets
from .configs import Workload
from .machine import machine_info
from .records import by_label

COMMANDS = ("traffic", "memory", "speed", "all")
RATIO_METRICS = ("saved_bytes", "traffic_train_bytes", "traffic_eval_bytes", "peak_train_bytes",
                 "peak_eval_bytes", "time_train_s", "time_eval_s")
SWEEP_VARIANTS = ("eager", "checkpoint", "fused")  # compiling every sweep point takes too long
TOP_OPS = 12  # per-op traffic rows kept in the JSON record
# relative error against eager above which a variant is flagged in the notes
# Sizes of the roofline's machine measurements: an 8192^3 matmul takes ~6 s on a 2-core CPU,
# where 2048^3 already runs at MKL's peak.
ROOFLINE_SIZES = {"cuda": {}, "cpu": dict(matmul_size=2048, copy_bytes=1 << 28)}
AGREEMENT = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclasses.dataclass
class Settings:
    command: str = "all"
    configs: list[str] = dataclasses.field(default_factory=list)  # empty: the device's defaults
    sweeps: list[str] = dataclasses.field(default_factory=list)
    quick: bool = False
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    variants: list[str] | None = None  # None: all that apply (no compile with --quick)
    warmup: int | None = None
    rounds: int | None = None

    def __post_init__(self):
        if self.command not in COMMANDS:
            raise ValueError(f"command must be one of {COMMANDS}; got {self.command!r}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' needs a CUDA GPU and none is available; use 'cpu'")
        unknown = sorted(set(self.variants or ()) - set(baselines.VARIANTS))
        if unknown:
            raise ValueError(f"variants must be among {baselines.VARIANTS}; got {unknown}")
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be at least 1; got {self.rounds}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be at least 0; got {self.warmup}")
        self.configs = self.configs or configs.DEFAULT_CONFIGS[torch.device(self.device).type]
        self.warmup = self.warmup if self.warmup is not None else (1 if self.quick else 3)
        self.rounds = self.rounds if self.rounds is not None else (3 if self.quick else 15)

    def wants(self, command: str) -> bool:
        return self.command in (command, "all")


def run(settings: Settings) -> dict:
    """Measures everything `settings` asks for; returns the record (see README's benchmarks
    section): machine, settings, rows, sweep_rows, ratios, targets, notes."""
    device = torch.device(settings.device)
    notes: list[str] = []
    variants = _variant_names(settings, notes)
    hardware = None
    if settings.wants("speed"):
        measured = [w for name in settings.configs for w in configs.workloads(name, settings.quick)]
        if settings.sweeps:
            measured.append(_sweep_base(settings))
        dtypes = sorted({w.dtype for w in measured}, key=str)
        sizes = dict(matmul_size=1024, copy_bytes=1 << 24) if settings.quick else ROOFLINE_SIZES[device.type]
        hardware = roofline.measure_machine(device, dtypes, **sizes)
    rows = []
    for name in settings.configs:
        for workload in configs.workloads(name, settings.quick):
            rows += measure_workload(workload, settings, device, variants, hardware, notes)
    sweep_rows = []
    for sweep in settings.sweeps:
        for value, workload in configs.sweep_workloads(sweep, _sweep_base(settings),
                                                       settings.quick):
            point = measure_workload(workload, settings, device,
                                     [v for v in variants if v in SWEEP_VARIANTS], hardware, notes)
            sweep_rows += [dict(row, sweep=sweep, sweep_value=value) for row in point]
    return {
        "machine": machine_info(device),
        "settings": dataclasses.asdict(settings),
        "roofline": hardware,
        "rows": rows,
        "sweep_rows": sweep_rows,
        "ratios": ratios(rows),
        "targets": targets.evaluate(rows, quick=settings.quick),
        "notes": notes,
    }


def _variant_names(settings: Settings, notes: list[str]) -> list[str]:
    if settings.variants is not None:
        return list(settings.variants)
    if settings.quick:
        notes.append("compile variants left out with --quick (compiling takes minutes on a "
                     "CPU); name them with --variants to include them")
        return [v for v in baselines.VARIANTS if not v.startswith("compile")]
    return list(baselines.VARIANTS)


def _sweep_base(settings: Settings) -> Workload:
    """The partial dense block the sweeps vary: the first pdb configuration asked for, else the
    device's standard one; its first dtype."""
    pdb = [name for name in settings.configs if name.startswith("pdb")]
    default = "pdb-gpu" if torch.device(settings.device).type == "cuda" else "pdb-cpu"
    return configs.workloads(pdb[0] if pdb else default, settings.quick)[0]


def measure_workload(workload: Workload, settings: Settings, device: torch.device,
                     variant_names: list[str], hardware: dict | None,
                     notes: list[str]) -> list[dict]:
    """One row per variant that could run, with every metric `settings.command` asks for."""
    ref = baselines.make_reference(workload, device)
    args = workload.make_inputs(device)
    oracle_module = copy.deepcopy(ref)  # computes the expected outputs; ref stays untouched
    oracle = baselines.Variant("eager", oracle_module, oracle_module)
    expected_eval = [o.clone() for o in measure.eval_step(oracle, args)]
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=generator).to(device, o.dtype) for o in expected_eval]
    expected_train = [o.detach().clone() for o in measure.train_step(oracle, args, grads)]

    checked = _build_checked(workload, ref, device, variant_names, args, grads,
                             expected_eval, expected_train, notes)
    variants = [variant for variant, _ in checked]
    rows = {}
    for variant, (error_eval, error_train) in checked:
        rows[variant.name] = dict(_base_row(workload, variant, device),
                                  rel_error_eval=error_eval, rel_error_train=error_train)
    if settings.wants("memory"):
        for variant in tqdm(variants, desc=f"{workload.label} memory", leave=False):
            row = rows[variant.name]
            row["saved_bytes"], row["saved_bytes_with_params"] = measure.saved_bytes(variant, args)
            for mode in ("train", "eval"):
                peak = measure.peak_memory(variant, args, grads, mode == "train", device)
                row[f"peak_{mode}_bytes"] = peak.increase
    if settings.wants("traffic"):
        for variant in tqdm(variants, desc=f"{workload.label} traffic", leave=False):
            if variant.name.startswith("compile"):
                continue  # compiled kernels are not aten ops: a dispatch mode cannot see them
            for mode in ("train", "eval"):
                counter = measure.traffic(
                    measure.step_function(variant, args, grads, mode == "train"))
                rows[variant.name][f"traffic_{mode}_bytes"] = counter.total
                top = sorted(counter.per_op.items(), key=lambda item: -item[1].total)[:TOP_OPS]
                rows[variant.name][f"traffic_{mode}_ops"] = {
                    op: [t.reads, t.writes, t.calls] for op, t in top}
    if settings.wants("speed"):
        min_sample_s = 0.02 if settings.quick or device.type == "cuda" else 0.0
        for mode in ("eval", "train"):
            steps = {v.name: measure.step_function(v, args, grads, mode == "train")
                     for v in variants}
            samples = measure.time_interleaved(steps, device, settings.warmup, settings.rounds,
                                               min_sample_s, desc=f"{workload.label} {mode} time")
            for name, times in samples.items():
                rows[name][f"time_{mode}_s"] = statistics.median(times)
                rows[name][f"time_{mode}_samples"] = times
        if hardware is not None:
            _add_roofline(rows, ref, args, workload, hardware)
    return list(rows.values())


def _build_checked(workload, ref, device, variant_names, args, grads, expected_eval,
                   expected_train, notes) -> list[tuple[baselines.Variant, tuple[float, float]]]:
    """The variants that build and run one eval then one train step (which also compiles the
    compile variants), each with its relative errors against eager in eval and in train. All are
    built before any runs, so that every one starts from ref's untouched running statistics."""
    built = []
    for name in variant_names:
        if name not in baselines.available_variants(workload, device):
            continue
        try:
            built.append(baselines.build_variant(name, ref, workload, device))
        except LookupError as err:
            notes.append(f"{workload.label}: {name} skipped: {err}")
    checked = []
    for variant in tqdm(built, desc=f"{workload.label} check", leave=False):
        try:
            eval_out = measure.eval_step(variant, args)
            train_out = measure.train_step(variant, args, grads)
        except Exception as err:  # a baseline that cannot run here is reported, not fatal
            first_line = (str(err).strip().splitlines() or [""])[0]
            notes.append(f"{workload.label}: {variant.name} skipped: "
                         f"{type(err).__name__}: {first_line}")
            continue
        errors = (measure.relative_error(eval_out, expected_eval),
                  measure.relative_error(train_out, expected_train))
        if max(errors) > AGREEMENT[workload.dtype]:
            notes.append(f"{workload.label}: {variant.name} disagrees with eager: relative error "
                         f"{errors[0]:.1e} (eval), {errors[1]:.1e} (train)")
        checked.append((variant, errors))
    return checked


def _base_row(workload: Workload, variant: baselines.Variant, device: torch.device) -> dict:
    return {
        "label": workload.label, "config": workload.name, "family": workload.family.name,
        "module": workload.family.class_name, "kwargs": workload.kwargs,
        "input_shapes": [list(s) for s in workload.input_shapes], "dtype": workload.dtype_name,
        "device": str(device), "variant": variant.name,
        "cio_channels": workload.cio_channels(), "cio_bytes": workload.cio_bytes(),
    }


def _add_roofline(rows: dict[str, dict], ref, args, workload: Workload, hardware: dict) -> None:
    flops = roofline.eval_flops(ref, args)
    nbytes = roofline.compulsory_bytes(ref, args)
    peak = hardware["matmul_peak"][workload.dtype_name]
    floor = roofline.floor_seconds(flops, nbytes, peak, hardware["copy_bandwidth"])
    for row in rows.values():
        row.update(eval_flops=flops, compulsory_bytes=nbytes, roofline_floor_s=floor,
                   roofline_fraction=floor / row["time_eval_s"],
                   bandwidth_fraction=nbytes / row["time_eval_s"] / hardware["copy_bandwidth"])


def ratios(rows: list[dict]) -> list[dict]:
    """fused / baseline for every metric both have, per workload."""
    result = []
    for label, variants in by_label(rows).items():
        fused = variants.get("fused")
        if fused is None:
            continue
        for baseline, row in variants.items():
            if baseline == "fused":
                continue
            for metric in RATIO_METRICS:
                if fused.get(metric) is not None and row.get(metric):
                    result.append({"label": label, "metric": metric, "baseline": baseline,
                                   "ratio": fused[metric] / row[metric]})
    return result

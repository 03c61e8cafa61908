"""Whole models, as upstream builds them against `csp_kernels.convert(model)`: one training step,
one eval forward, saved-for-backward bytes and peak training memory.

    python -m benchmarks.models [--quick] [--model NAME ...] [--compile] [--out DIR]

Models (random weights, built offline): ultralytics yolo11n and yolo11s (from their yaml), timm
cspresnet50, cspresnext50 and cspdarknet53. Variants in the rows, named as in the rest of the
suite: `eager` is the model as built, `fused` its conversion (every unit and CSP stage swapped
that convert knows; its report is in the notes), with --compile also `compile` and
`compile-fused` (torch.compile of each; slow on a CPU, left out with --quick). A training step
is forward + backward of the sum of every output tensor (gradient 1 everywhere: what a loss
reads is not the point here); eval is a forward under no_grad. Times: median of interleaved
rounds (`measure.time_interleaved`); saved bytes: each storage once, parameters and buffers
left out (exact, machine-independent); peak: the most memory PyTorch's CPU allocator had
allocated during a training step (`measure.peak_memory`). CPU only. The record is the suite's (same
machine description, report, results.json, report.txt; `report.format_report`), with the
model-level targets of issue 15 judged on CPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import csp_kernels

from . import measure, report, suite, targets
from .baselines import Variant
from .machine import machine_info

DEVICE = torch.device("cpu")  # the targets are CPU ones
CONFIG = "models-cpu"  # the rows' config, which the targets select
YOLO_SIZE, TIMM_SIZE, BATCH = 320, 256, 4
QUICK_SHAPE = (2, 3, 64, 64)
MODELS = ("yolo11n", "yolo11s", "cspresnet50", "cspresnext50", "cspdarknet53")
TARGETS = (  # issue 15, on a CPU; its GPU targets are noted, not judged (this machine has no GPU run)
    targets.Target(CONFIG, "peak_train_bytes", "eager", "<=", 0.5),
    targets.Target(CONFIG, "time_train_s", "eager", "<=", 0.8),
)


def build(name: str) -> nn.Module:
    """Model `name` with random weights, built without network access."""
    if name.startswith("yolo"):
        os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics checks nothing online
        from ultralytics.nn.tasks import DetectionModel
        return DetectionModel(f"{name}.yaml", verbose=False)
    import timm
    return timm.create_model(name, pretrained=False)


def input_shape(name: str, quick: bool) -> tuple[int, ...]:
    if quick:
        return QUICK_SHAPE
    side = YOLO_SIZE if name.startswith("yolo") else TIMM_SIZE
    return BATCH, 3, side, side


def outputs_of(value) -> list[torch.Tensor]:
    """The tensors of a model's output, dicts included (ultralytics' Detect returns {"boxes",
    "scores", "feats"} in training)."""
    if isinstance(value, dict):
        return outputs_of(list(value.values()))
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in outputs_of(item)]
    return measure.tensors_of(value)


def variant(name: str, model: nn.Module, compiled: bool) -> Variant:
    """A variant whose call returns the model's output tensors as a tuple, as the measure
    helpers take them."""
    forward = torch.compile(model) if compiled else model
    return Variant(name, lambda *args: tuple(outputs_of(forward(*args))), model)


def measure_model(name: str, quick: bool, compiled: bool, rounds: int, warmup: int, notes: list[str]) -> list[dict]:
    """One row per variant of model `name`."""
    torch.manual_seed(0)
    original = build(name)
    converted, conversion = csp_kernels.convert(original)  # before any step: the same running statistics
    notes.append(f"{name}: " + str(conversion).splitlines()[0].removeprefix("csp_kernels.convert: ") + "; "
                 + ", ".join(f"{key} {n}" for key, n in conversion.swapped_by_class().most_common()))
    models = {"eager": original, "fused": converted}
    if compiled:
        models.update({"compile": copy.deepcopy(original), "compile-fused": copy.deepcopy(converted)})
    variants = [variant(key, model, key.startswith("compile")) for key, model in models.items()]
    shape = input_shape(name, quick)
    args = (torch.randn(shape, generator=torch.Generator().manual_seed(1)),)

    # Every variant gets the same calls, so that their running statistics stay equal.
    for v in variants:
        v.module.train()
    with torch.no_grad():  # a training forward gives the outputs' shapes (YOLO's differ from eval's)
        grads = [torch.ones_like(o) for o in variants[0].callable(*args)]
        for other in variants[1:]:
            other.callable(*args)
    expected_eval = measure.eval_step(variants[0], args)
    rows = {}
    expected_train = None
    for v in variants:
        errors = [measure.relative_error(measure.eval_step(v, args), expected_eval)]
        train_out = [o.detach() for o in measure.train_step(v, args, grads)]
        if expected_train is None:
            expected_train = train_out
        errors.append(measure.relative_error(train_out, expected_train))
        if max(errors) > suite.AGREEMENT[torch.float32]:
            notes.append(f"{name}: {v.name} disagrees with eager: relative error {errors[0]:.1e} (eval), "
                         f"{errors[1]:.1e} (train)")
        rows[v.name] = {"label": name, "config": CONFIG, "module": type(original).__name__, "kwargs": {},
                        "input_shapes": [list(shape)], "dtype": "float32", "device": str(DEVICE), "variant": v.name,
                        "rel_error_eval": errors[0], "rel_error_train": errors[1]}
    for v in variants:
        rows[v.name]["saved_bytes"], rows[v.name]["saved_bytes_with_params"] = measure.saved_bytes(v, args)
        peak = measure.peak_memory(v, args, grads, True, DEVICE)
        rows[v.name]["peak_train_bytes"] = peak.increase
    for mode in ("eval", "train"):
        steps = {v.name: measure.step_function(v, args, grads, mode == "train") for v in variants}
        samples = measure.time_interleaved(steps, DEVICE, warmup, rounds, 0.0, desc=f"{name} {mode} time")
        for key, times in samples.items():
            rows[key][f"time_{mode}_s"] = statistics.median(times)
            rows[key][f"time_{mode}_samples"] = times
    return list(rows.values())


def run(model_names: list[str], quick: bool = False, compiled: bool = False, rounds: int | None = None,
        warmup: int = 1) -> dict:
    """The record of every model in `model_names`, as `suite.run` makes it."""
    rounds = rounds or (1 if quick else 3)
    notes = ["times come from a shared machine and are noisy (per round: the ratio's quartiles); saved bytes "
             "are exact",
             "issue 15's GPU targets for whole models are noted only: this benchmark judges the CPU ones"]
    if compiled and quick:
        notes.append("--compile ignored with --quick (compiling whole models takes minutes on a CPU)")
        compiled = False
    rows = [row for name in model_names
            for row in measure_model(name, quick, compiled, rounds, warmup, notes)]
    return {
        "machine": machine_info(DEVICE),
        "settings": {"models": model_names, "quick": quick, "compile": compiled, "rounds": rounds,
                     "warmup": warmup, "device": str(DEVICE)},
        "roofline": None,
        "rows": rows,
        "sweep_rows": [],
        "ratios": suite.ratios(rows),
        "targets": targets.evaluate(rows, TARGETS, quick=quick),
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"inputs {'x'.join(map(str, QUICK_SHAPE))}, 1 round")
    parser.add_argument("--model", action="append", dest="models", choices=MODELS, metavar="NAME",
                        help=f"repeatable: {', '.join(MODELS)} (default: all)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile of both (slow)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3, quick 1)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/out/models-<time>)")
    args = parser.parse_args(argv)
    out_dir = report.command_out_dir(parser, args.out, "models-", args.rounds)
    started = time.perf_counter()
    record = run(list(dict.fromkeys(args.models or MODELS)), args.quick, args.compile, args.rounds)  # (each once)
    record["elapsed_s"] = time.perf_counter() - started
    paths = report.write_all(record, out_dir)
    print(report.format_report(record))
    print(f"\n{record['elapsed_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Each conv + BN + activation unit of a converted model against its original, alone: where the
fused unit is slower than eager, shape by shape.

    python -m benchmarks.units [--quick] [--model NAME ...] [--rounds N] [--out DIR]

A model-level ratio (`python -m benchmarks.models`) sums gains and losses; this lists them. The
model is built and converted as benchmarks.models does; one training forward records the input
shape of every call of a fused `ConvBNAct` (with forward hooks, removed before timing). Each
distinct configuration (input shape, the conv's geometry, activation) is then timed alone: one
training step (forward, backward of ones into the input and the parameters, as a unit inside a
network has it) of the upstream module (ultralytics `Conv`, timm `ConvNormAct`, ...) and of its
fused twin, in interleaved rounds (`measure.time_interleaved`). `fused/eager` is the ratio of the
two medians, `per round` the quartiles of the rounds' own ratios; `lost` is calls x (fused -
eager): the step time a model loses (or, negative, gains) at that configuration. Units that
convert left unconverted are not in the table (the conversion's report names them).
A unit inside a fused stage is timed as a unit: the stage's own Python and its concat buffer are
not in these figures (the stage-level table is benchmarks.models' and the suite's). CPU only.
Writes units.json and units.txt (machine description first).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import csp_kernels
from csp_kernels.nn import ConvBNAct

from . import measure, report
from .baselines import Variant
from .machine import machine_info
from .models import DEVICE, MODELS, build, input_shape, outputs_of


def unit_inputs(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, input shape) of every call of a fused ConvBNAct of the converted `model` in one
    training forward of a random input of `shape`, in call order (a unit called twice, or held
    under two names, is there twice, under its first name). The forward runs on the "reference"
    backend: the hooks that record the shapes would make the fused stages fall back (they write
    their units' outputs past hooks), and the shapes are the same."""
    calls: list[tuple[str, tuple[int, ...]]] = []

    def record(name):
        def hook(module, args):
            calls.append((name, tuple(args[0].shape)))
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
               if isinstance(m, ConvBNAct)]
    try:
        with torch.no_grad(), csp_kernels.use_backend("reference"):
            outputs_of(model(torch.randn(shape)))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def configuration(unit: ConvBNAct, shape: tuple[int, ...]) -> tuple:
    """What a unit's step time depends on: (input shape, weight shape, stride, padding,
    dilation, groups, activation)."""
    conv = unit.conv
    return shape, tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups, repr(unit.act)


def measure_model(name: str, quick: bool, rounds: int) -> list[dict]:
    """One row per distinct unit configuration of model `name`."""
    torch.manual_seed(0)
    original = build(name).train()
    fused, _ = csp_kernels.convert(copy.deepcopy(original))
    fused.train()
    originals = dict(original.named_modules())
    groups: dict[tuple, list[str]] = {}
    fused_units = dict(fused.named_modules())
    for unit_name, shape in unit_inputs(fused, input_shape(name, quick)):
        groups.setdefault(configuration(fused_units[unit_name], shape), []).append(unit_name)
    rows = []
    for (shape, weight, stride, padding, dilation, conv_groups, act), names in groups.items():
        args = (torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_(),)
        variants = [Variant("eager", originals[names[0]], originals[names[0]]),
                    Variant("fused", fused_units[names[0]], fused_units[names[0]])]
        with torch.no_grad():
            grads = [torch.ones_like(variants[0].callable(*args))]
        steps = {v.name: measure.step_function(v, args, grads, True) for v in variants}
        samples = measure.time_interleaved(steps, DEVICE, 2, rounds, 0.02, desc=f"{name} {names[0]}")
        per_round = [f / e for e, f in zip(samples["eager"], samples["fused"])]
        eager, fused_time = statistics.median(samples["eager"]), statistics.median(samples["fused"])
        rows.append({"model": name, "units": names, "count": len(names), "input_shape": list(shape),
                     "weight_shape": list(weight), "stride": list(stride), "padding": list(padding),
                     "dilation": list(dilation), "groups": conv_groups, "act": act,
                     "time_eager_s": eager, "time_fused_s": fused_time, "ratio": fused_time / eager,
                     # (inclusive: the exclusive method extrapolates past the samples, even below 0)
                     "ratio_quartiles": statistics.quantiles(per_round, n=4, method="inclusive")
                     if len(per_round) > 1 else None,
                     "lost_s": len(names) * (fused_time - eager)})
    return rows


def _quartiles(quartiles: list[float] | None) -> str:
    return "-" if quartiles is None else f"{quartiles[0]:.2f}-{quartiles[2]:.2f}"


def format_units(record: dict) -> str:
    machine = record["machine"]
    parts = [f"{machine['cpu_model']}, {machine['cpu_count']} cores · torch {machine['torch']} · commit "
             f"{machine['git_commit'][:12]} · {machine['date']}"]
    for name in record["settings"]["models"]:
        rows = sorted((r for r in record["rows"] if r["model"] == name), key=lambda r: -r["lost_s"])
        eager = sum(r["count"] * r["time_eager_s"] for r in rows)
        fused = sum(r["count"] * r["time_fused_s"] for r in rows)
        if not rows:
            parts.append(f"== {name}: no fused conv + BN + act unit to time")
            continue
        slower = [r for r in rows if r["ratio"] > 1]
        body = [[r["units"][0], "×".join(map(str, r["input_shape"])), "×".join(map(str, r["weight_shape"])),
                 f"{r['stride'][0]}", f"{r['groups']}", r["act"], f"{r['count']}",
                 f"{r['time_eager_s'] * 1e3:.3f}", f"{r['time_fused_s'] * 1e3:.3f}", f"{r['ratio']:.2f}",
                 _quartiles(r["ratio_quartiles"]),
                 f"{r['lost_s'] * 1e3:+.2f}"] for r in rows]
        parts.append(f"== {name}: {sum(r['count'] for r in rows)} unit calls, {len(rows)} configurations; units alone, "
                     f"train step, eager {eager * 1e3:.1f} ms, fused {fused * 1e3:.1f} ms ({fused / eager:.3f}); "
                     f"fused slower at {len(slower)} configurations ({sum(r['count'] for r in slower)} calls)\n"
                     + report.text_table(["first unit", "input", "weight", "s", "g", "act", "n", "eager ms",
                                          "fused ms", "fused/eager", "per round", "lost ms"], body))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.units", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the models' quick inputs, 1 round")
    parser.add_argument("--model", action="append", dest="models", choices=MODELS, metavar="NAME",
                        help=f"repeatable: {', '.join(MODELS)} (default: yolo11n)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7, quick 1)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/out/units-<time>)")
    args = parser.parse_args(argv)
    out_dir = report.command_out_dir(parser, args.out, "units-", args.rounds)
    started = time.perf_counter()
    models = list(dict.fromkeys(args.models or ["yolo11n"]))  # (a repeated --model once)
    rounds = args.rounds or (1 if args.quick else 7)
    record = {"machine": machine_info(DEVICE), "settings": {"models": models, "quick": args.quick, "rounds": rounds},
              "rows": [row for name in models for row in measure_model(name, args.quick, rounds)]}
    record["elapsed_s"] = time.perf_counter() - started
    report.write_json(record, out_dir / "units.json")
    text = format_units(record)
    (out_dir / "units.txt").write_text(text + "\n")
    print(text)
    print(f"\n{record['elapsed_s']:.0f} s; wrote {out_dir / 'units.json'}, {out_dir / 'units.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

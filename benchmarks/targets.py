"""The targets of the standard configurations (docs/benchmarks.md), and whether a run met them."""
from __future__ import annotations

import dataclasses
import statistics

from .records import by_label


@dataclasses.dataclass(frozen=True)
class Target:
    """`fused[metric] / baseline[metric]` (or `fused[metric]` itself when baseline is None)
    compared with `threshold` by `op`, for every workload of configuration `config`."""
    config: str
    metric: str
    baseline: str | None
    op: str  # "<=" or ">="
    threshold: float
    floor: str = ""

    @property
    def figure(self) -> str:
        return f"{self.metric} fused" + (f" / {self.baseline}" if self.baseline else "")


def _stage_targets(config: str, saved_floor: str = "") -> tuple[Target, ...]:
    """A CSP stage's targets against eager (issue 14): saved bytes, training peak, train step."""
    return (Target(config, "saved_bytes", "eager", "<=", 0.50, saved_floor),
            Target(config, "peak_train_bytes", "eager", "<=", 0.60),
            Target(config, "time_train_s", "eager", "<=", 0.80))


TARGETS = (
    Target("pdb-cpu", "saved_bytes", "eager", "<=", 0.20, "≈ 0.14 (concat buffer + output)"),
    Target("pdb-cpu", "traffic_train_bytes", "eager", "<=", 0.50),
    Target("pdb-cpu", "traffic_eval_bytes", "eager", "<=", 0.40),
    Target("pdb-cpu", "time_train_s", "eager", "<=", 0.75, "≈ 0.6 at eager's conv speed"),
    Target("pdb-cpu", "time_train_s", "compile", "<=", 0.90),
    Target("pdb-cpu", "time_eval_s", "eager", "<=", 0.75, "≈ 0.65 at eager's conv speed"),
    Target("trans-cpu", "time_train_s", "eager", "<=", 0.85, "≈ 0.75 at eager's conv speed"),
    Target("trans-cpu", "time_eval_s", "eager", "<=", 0.85, "≈ 0.75 at eager's conv speed"),
    Target("small-cpu", "time_train_s", "eager", "<=", 1.0, "no shape slower than eager"),
    Target("small-cpu", "time_eval_s", "eager", "<=", 1.0, "no shape slower than eager"),
    Target("efm-cpu", "traffic_eval_bytes", "eager", "<=", 0.35,
           "inputs read once + output written once"),
    Target("efm-cpu", "time_eval_s", "eager", "<=", 0.50),
    *_stage_targets("c2f-cpu", "≈ 0.42: x and one conv output per ConvBNAct"),
    *_stage_targets("cross-cpu", "≈ 0.46: x and one conv output per ConvBNAct"),
    *_stage_targets("c2f-gpu"),
    *_stage_targets("cross-gpu"),
    *(Target(config, "time_train_s", "compile", "<=", 0.90) for config in ("c2f-cpu", "cross-cpu")),
    Target("pdb-gpu", "time_train_s", "eager", "<=", 0.50, "roofline"),
    Target("pdb-gpu", "time_train_s", "compile-max-autotune", "<=", 0.75),
    Target("pdb-gpu", "roofline_fraction", None, ">=", 0.70, "1.0"),
    Target("trans-gpu", "roofline_fraction", None, ">=", 0.70, "1.0"),
    Target("efm-gpu", "roofline_fraction", None, ">=", 0.70, "1.0"),
    Target("efm-gpu", "bandwidth_fraction", None, ">=", 0.80, "1.0"),
)


QUICK_STATUS = "not judged"
QUICK_REASON = "--quick shapes: targets apply to the full-size standard configurations"


def evaluate(rows: list[dict], targets=TARGETS, quick: bool = False) -> list[dict]:
    """One verdict per (target, workload of its config present in `rows`): status "met",
    "short", or "n/a" with the reason when a figure is missing. With `quick` the figures are
    shown but not judged: tiny shapes are dominated by per-call overheads that the targets do
    not describe."""
    verdicts = []
    for target in targets:
        for label, variants in by_label(rows).items():
            config = next(iter(variants.values()))["config"]
            if config != target.config:
                continue
            value, reason = _value(target, variants)
            spread = _paired_spread(target, variants)
            if quick:
                status, reason = QUICK_STATUS, QUICK_REASON
            elif value is None:
                status = "n/a"
            elif (value <= target.threshold) if target.op == "<=" else (value >= target.threshold):
                status = "met"
            else:
                status = "short"
            verdicts.append({"label": label, "config": config, "figure": target.figure,
                             "metric": target.metric, "baseline": target.baseline,
                             "op": target.op, "threshold": target.threshold, "value": value,
                             "status": status, "reason": reason, "floor": target.floor, "spread": spread})
    return verdicts


def _paired_spread(target: Target, variants: dict[str, dict]) -> list[float] | None:
    """[first quartile, median, third quartile] of a time ratio taken round by round: the
    samples of one round run back to back, so their ratio cancels the machine's drift between
    rounds, which moves whole runs by +-10% on a shared CPU. None for other metrics."""
    if not target.metric.startswith("time_") or target.baseline is None:
        return None
    key = target.metric.removesuffix("_s") + "_samples"
    fused, base = variants["fused"].get(key), variants.get(target.baseline, {}).get(key)
    if not fused or not base or len(fused) != len(base):
        return None
    paired = [f / b for f, b in zip(fused, base)]
    if len(paired) < 2:
        return [paired[0]] * 3
    q1, median, q3 = statistics.quantiles(paired, n=4, method="inclusive")  # (exclusive extrapolates past the samples)
    return [q1, median, q3]


def _value(target: Target, variants: dict[str, dict]) -> tuple[float | None, str]:
    needed = ["fused"] + ([target.baseline] if target.baseline else [])
    missing = [name for name in needed if variants.get(name, {}).get(target.metric) is None]
    if missing:
        return None, f"no {target.metric} for {', '.join(missing)}"
    fused = variants["fused"][target.metric]
    if target.baseline is None:
        return fused, ""
    return fused / variants[target.baseline][target.metric], ""

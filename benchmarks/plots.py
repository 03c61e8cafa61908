"""PNG plots of the sweeps: how saved bytes, traffic and time grow with each swept parameter."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .records import by_sweep  # noqa: E402

MIB = 1024 * 1024
# metric -> (axis label, scale); the panels each sweep's figure shows, when measured
METRICS = {
    "saved_bytes": ("saved for backward (MiB)", 1 / MIB),
    "traffic_train_bytes": ("traffic, train fwd+bwd (MiB)", 1 / MIB),
    "traffic_eval_bytes": ("traffic, eval fwd (MiB)", 1 / MIB),
    "time_train_s": ("time, train fwd+bwd (ms)", 1e3),
    "time_eval_s": ("time, eval fwd (ms)", 1e3),
}
PANELS = {
    "num_layers": ("saved_bytes", "traffic_train_bytes", "traffic_eval_bytes"),
    "batch": ("time_train_s", "time_eval_s"),
    "part_ratio": ("saved_bytes", "traffic_train_bytes", "time_train_s"),
    "growth_rate": ("saved_bytes", "traffic_train_bytes", "time_train_s"),
}


def plot_sweep(sweep: str, rows: list[dict], machine: str, path: Path) -> bool:
    """One figure, a panel per measured metric, a line per variant; False when nothing to plot.
    On traffic panels the paper's CIO of the block (bytes) is drawn dotted for scale."""
    panels = [m for m in PANELS[sweep] if any(row.get(m) is not None for row in rows)]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    for axis, metric in zip(axes[0], panels):
        title, scale = METRICS[metric]
        for index, variant in enumerate(variants):
            points = sorted((row["sweep_value"], row[metric] * scale) for row in rows
                            if row["variant"] == variant and row.get(metric) is not None)
            if points:  # markers and dashes tell apart variants whose lines coincide
                axis.plot(*zip(*points), marker="os^Dv"[index % 5], markersize=7 - index,
                          linestyle=("-", "--", "-.", ":")[index % 4], label=variant)
        if metric.startswith("traffic") and rows[0].get("cio_bytes") is not None:
            cio = sorted({(row["sweep_value"], row["cio_bytes"] * scale) for row in rows})
            axis.plot(*zip(*cio), linestyle=":", color="gray", label="CIO (paper)")
        axis.set_xlabel(sweep)
        axis.set_ylabel(title)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    base = rows[0]
    figure.suptitle(f"{base['module']} sweep of {sweep} ({base['config']}, {base['dtype']}) "
                    f"on {machine}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def make_plots(record: dict, out_dir: Path) -> list[Path]:
    """sweep_<name>.png for each sweep in the record."""
    machine = record["machine"]["gpu_name"] or record["machine"]["cpu_model"]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for sweep, rows in by_sweep(record["sweep_rows"]).items():
        path = out_dir / f"sweep_{sweep}.png"
        if plot_sweep(sweep, rows, machine, path):
            paths.append(path)
    return paths

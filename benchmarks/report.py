"""A run's record as a terminal report, JSON and CSV."""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import tempfile
from pathlib import Path

from csp_kernels.profiling import format_bytes

from .records import by_label, by_sweep

CSV_COLUMNS = (
    "label", "config", "dtype", "device", "variant", "sweep", "sweep_value",
    "saved_bytes", "saved_bytes_with_params", "traffic_train_bytes", "traffic_eval_bytes",
    "cio_channels", "cio_bytes", "peak_train_bytes", "peak_eval_bytes", "time_eval_s",
    "time_train_s", "rel_error_eval", "rel_error_train", "eval_flops", "compulsory_bytes",
    "roofline_floor_s", "roofline_fraction", "bandwidth_fraction",
)
TARGET_COLUMNS = ("label", "figure", "op", "threshold", "value", "spread", "status", "floor", "reason")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _spread(quartiles: list[float] | None) -> str:
    return "-" if quartiles is None else f"{quartiles[1]:.2f} ({quartiles[0]:.2f}-{quartiles[2]:.2f})"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# (row key, column title, formatter) of the per-workload table
TABLE_COLUMNS = (
    ("saved_bytes", "saved", format_bytes),
    ("traffic_train_bytes", "traffic train", format_bytes),
    ("traffic_eval_bytes", "traffic eval", format_bytes),
    ("peak_train_bytes", "peak train", format_bytes),
    ("peak_eval_bytes", "peak eval", format_bytes),
    ("time_eval_s", "eval fwd", _ms),
    ("time_train_s", "train fwd+bwd", _ms),
    ("roofline_fraction", "of roofline", _fraction),
    ("rel_error_train", "rel err", lambda e: "-" if e is None else f"{e:.1e}"),
)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}"
                       for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [headers, *rows]]
    return "\n".join(lines)


def _variant_table(rows: list[dict], first: str = "variant") -> str:
    columns = [c for c in TABLE_COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    body = [[str(row[first])] + [fmt(row.get(key)) for key, _, fmt in columns] for row in rows]
    return text_table([first] + [title for _, title, _ in columns], body)


def _workload_header(row: dict) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in row["kwargs"].items())
    shapes = ", ".join("×".join(map(str, s)) for s in row["input_shapes"])
    header = f"== {row['label']}: {row['module']}({kwargs}) on {shapes} {row['dtype']}"
    if row.get("cio_channels") is not None:
        header += (f"\n   CIO (paper, partial dense block) {row['cio_channels']:g} channels"
                   f" = {format_bytes(row['cio_bytes'])}")
    return header


def format_report(record: dict) -> str:
    machine = record["machine"]
    where = machine["gpu_name"] or f"{machine['cpu_model']}, {machine['cpu_count']} cores"
    parts = [f"{where} · torch {machine['torch']} · triton {machine['triton']} · "
             f"commit {machine['git_commit'][:12]} · {machine['date']}"]
    hardware = record.get("roofline")
    if hardware:
        peaks = ", ".join(f"{dtype} {flops / 1e9:.4g} GFLOP/s" for dtype, flops in hardware["matmul_peak"].items())
        parts.append(f"roofline: matmul peak {peaks} ({hardware['matmul_size']}^3), copy "
                     f"{hardware['copy_bandwidth'] / 1e9:.3g} GB/s; \"of roofline\" = that floor / eval time")
    for label, variants in by_label(record["rows"]).items():
        rows = list(variants.values())
        parts.append(_workload_header(rows[0]) + "\n" + _variant_table(rows))
        ratio_text = [f"{r['metric']} {r['ratio']:.2f}" for r in record["ratios"]
                      if r["label"] == label and r["baseline"] == "eager"]
        if ratio_text:
            parts.append("   fused / eager: " + " · ".join(ratio_text))
    for sweep, rows in by_sweep(record["sweep_rows"]).items():
        rows = [dict(row, point=f"{sweep}={row['sweep_value']} {row['variant']}") for row in rows]
        parts.append(f"== sweep {sweep} ({rows[0]['config']})\n" + _variant_table(rows, "point"))
    if record["targets"]:
        body = [[t["label"], t["figure"], f"{t['op']} {t['threshold']:g}",
                 "-" if t["value"] is None else f"{t['value']:.3f}", _spread(t.get("spread")), t["status"],
                 t["reason"] or t["floor"]] for t in record["targets"]]
        parts.append("== targets (docs/benchmarks.md); per round: quartiles of the ratio of samples taken back "
                     "to back\n" + text_table(
                         ["workload", "figure", "target", "value", "per round", "status", "floor / note"], body))
    if record["notes"]:
        parts.append("notes:\n" + "\n".join(f"  - {note}" for note in record["notes"]))
    return "\n\n".join(parts)


def merge_records(records: list[dict]) -> dict:
    """One record from several runs on the same machine (e.g. one configuration per run, as the
    GPU script does): rows, sweeps, ratios, targets and notes concatenated; machine and roofline
    from the first run; each run's settings kept."""
    merged = dict(records[0])
    for key in ("rows", "sweep_rows", "ratios", "targets", "notes"):
        merged[key] = [item for record in records for item in record[key]]
    merged["settings"] = [record["settings"] for record in records]
    merged["elapsed_s"] = sum(record.get("elapsed_s", 0) for record in records)
    return merged


def write_json(record: dict, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)


def write_csv(rows: list[dict], columns: tuple[str, ...], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def make_out_dir(out_dir: Path) -> Path:
    """`out_dir`, created (with its parents) before a run, so that a folder that cannot be
    written fails at once rather than after the measurements; ValueError naming it if not."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # an existing folder may still refuse files (/proc)
    except OSError as err:
        raise ValueError(f"--out {out_dir}: cannot create the output folder or write into it ({err.strerror})") from err
    return out_dir


def command_out_dir(parser: argparse.ArgumentParser, out: Path | None, prefix: str, rounds: int | None) -> Path:
    """A benchmark command's output folder, --out or benchmarks/out/<prefix><time>, made before
    any measurement (`make_out_dir`), its --rounds checked too: a usage error (parser.error)
    naming what is wrong."""
    if rounds is not None and rounds < 1:
        parser.error(f"--rounds must be at least 1; got {rounds}")
    try:
        return make_out_dir(out or Path(__file__).parent / "out" / datetime.datetime.now().strftime(
            f"{prefix}%Y%m%d-%H%M%S"))
    except ValueError as err:
        parser.error(str(err))


def write_all(record: dict, out_dir: Path) -> dict[str, Path]:
    """results.json, results.csv (workload and sweep rows), targets.csv and report.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in
             ("results.json", "results.csv", "targets.csv", "report.txt")}
    write_json(record, paths["results.json"])
    write_csv(record["rows"] + record["sweep_rows"], CSV_COLUMNS, paths["results.csv"])
    write_csv(record["targets"], TARGET_COLUMNS, paths["targets.csv"])
    paths["report.txt"].write_text(format_report(record) + "\n")
    return paths

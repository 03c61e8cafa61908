"""Grouping the rows of a run's record."""
from __future__ import annotations


def by_label(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Rows grouped as {workload label: {variant: row}}, in run order."""
    grouped: dict[str, dict[str, dict]] = {}
    for row in rows:
        grouped.setdefault(row["label"], {})[row["variant"]] = row
    return grouped


def by_sweep(rows: list[dict]) -> dict[str, list[dict]]:
    """Sweep rows grouped as {sweep name: rows}, in run order."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["sweep"], []).append(row)
    return grouped

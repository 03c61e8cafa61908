"""`python -m benchmarks.models --quick` on yolo11n at 2x3x64x64: the rows, ratios, targets and files
it writes (no timing assertions; saved bytes are exact)."""
import json

import pytest

from benchmarks import models, targets
from helpers import assert_usage_error


pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_writes_the_table_ratios_and_targets(tmp_path, capsys):
    # (a repeated --model runs once)
    assert models.main(["--quick", "--model", "yolo11n", "--model", "yolo11n", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    eager, fused = record["rows"]
    assert [(row["label"], row["variant"]) for row in record["rows"]] == [("yolo11n", "eager"), ("yolo11n", "fused")]
    assert eager["input_shapes"] == [list(models.QUICK_SHAPE)] and record["settings"]["rounds"] == 1
    for row in (eager, fused):
        assert row["rel_error_eval"] < 1e-4 and row["rel_error_train"] < 1e-4, row  # wiring mistakes give ~1
        assert row["time_eval_s"] > 0 and row["time_train_s"] > 0 and len(row["time_train_samples"]) == 1
    assert eager["rel_error_eval"] == eager["rel_error_train"] == 0  # eager is the reference itself
    assert 0 < fused["saved_bytes"] < eager["saved_bytes"]  # the fused stages save no concat inputs
    assert not [note for note in record["notes"] if "disagrees" in note]
    assert any("C3k2 -> C3k2 8" in note for note in record["notes"])  # the conversion's report
    assert {r["metric"] for r in record["ratios"]} >= {"saved_bytes", "time_train_s", "time_eval_s"}
    assert [(t["label"], t["figure"], t["status"]) for t in record["targets"]] == [
        ("yolo11n", "peak_train_bytes fused / eager", targets.QUICK_STATUS),
        ("yolo11n", "time_train_s fused / eager", targets.QUICK_STATUS)]

    text = (tmp_path / "report.txt").read_text()
    assert text.startswith(record["machine"]["cpu_model"]) and text.strip() in capsys.readouterr().out
    lines = text.splitlines()
    start = lines.index("== yolo11n: DetectionModel() on 2×3×64×64 float32") + 1
    assert [line.split()[0] for line in lines[start:start + 3]] == ["variant", "eager", "fused"]
    assert "saved" in lines[start] and "train fwd+bwd" in lines[start]
    assert "fused / eager: saved_bytes" in text


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--out", "/proc/no-such-folder"], "cannot create the output folder"),
    (["--out", "/proc"], "or write into it"),
])
def test_bad_options_are_usage_errors_before_any_run(argv, message, capsys):
    assert_usage_error(models.main, ["--quick", "--model", "yolo11n", *argv], message, capsys)

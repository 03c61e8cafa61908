"""`python -m benchmarks.units --quick` on yolo11n: one row per distinct unit configuration, the
units counted once each, and the files it writes (no timing assertions)."""
import copy
import json

import pytest
import torch
from torch import nn

import csp_kernels
from benchmarks import models, units
from csp_kernels.nn import ConvBNAct
from helpers import assert_usage_error

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_times_every_unit_configuration_once(tmp_path, capsys):
    assert units.main(["--quick", "--model", "yolo11n", "--model", "yolo11n", "--out", str(tmp_path)]) == 0  # (once)
    record = json.loads((tmp_path / "units.json").read_text())
    rows = record["rows"]
    converted, _ = csp_kernels.convert(copy.deepcopy(models.build("yolo11n")))
    fused_units = [name for name, m in converted.named_modules() if isinstance(m, ConvBNAct)]
    assert sorted(name for row in rows for name in row["units"]) == sorted(fused_units)
    configurations = [(tuple(r["input_shape"]), tuple(r["weight_shape"]), tuple(r["stride"]), tuple(r["padding"]),
                       tuple(r["dilation"]), r["groups"], r["act"]) for r in rows]
    assert len(set(configurations)) == len(rows)  # each configuration timed once
    for row in rows:
        assert row["count"] == len(row["units"]) and row["time_eager_s"] > 0 and row["time_fused_s"] > 0
        assert row["ratio"] == pytest.approx(row["time_fused_s"] / row["time_eager_s"])
        assert row["lost_s"] == pytest.approx(row["count"] * (row["time_fused_s"] - row["time_eager_s"]))
        assert row["input_shape"][0] == models.QUICK_SHAPE[0]
    stem = next(r for r in rows if r["units"] == ["model.0"])
    assert stem["input_shape"] == list(models.QUICK_SHAPE) and stem["weight_shape"] == [16, 3, 3, 3]
    assert stem["stride"] == [2, 2]

    text = (tmp_path / "units.txt").read_text()
    assert text.startswith(record["machine"]["cpu_model"]) and text.strip() in capsys.readouterr().out
    assert f"== yolo11n: {len(fused_units)} unit calls, {len(rows)} configurations" in text


def test_unit_inputs_are_recorded_without_hooks_left_behind():
    converted, _ = csp_kernels.convert(copy.deepcopy(models.build("yolo11n")))
    calls = units.unit_inputs(converted, (1, 3, 64, 64))
    assert calls[:2] == [("model.0", (1, 3, 64, 64)), ("model.1", (1, 16, 32, 32))]
    assert not any(m._forward_pre_hooks for m in converted.modules())
    assert torch.is_grad_enabled()  # the recording ran under no_grad, and left the mode as it was


def test_a_unit_called_twice_is_counted_twice():
    """Every call counts (a unit shared by two places of a model runs twice per forward), each
    with its own input shape."""
    unit = csp_kernels.ConvBNAct(8, 8, 3, stride=2)
    model = nn.Sequential(unit, unit)
    assert units.unit_inputs(model, (1, 8, 16, 16)) == [("0", (1, 8, 16, 16)), ("0", (1, 8, 8, 8))]


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--out", "/proc/no-such-folder"], "cannot create the output folder"),
    (["--out", "/proc"], "or write into it"),
])
def test_bad_options_are_usage_errors_before_any_run(argv, message, capsys):
    assert_usage_error(units.main, ["--quick", *argv], message, capsys)

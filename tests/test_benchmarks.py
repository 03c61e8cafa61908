"""The benchmark suite's own logic: hand-counted figures of a trivial module, and well-formed
records from quick runs of every subcommand (no timing assertions)."""
import csv
import json

import pytest
import torch
from torch import nn

import csp_kernels
from benchmarks import baselines, cli, configs, kernels, measure, report, roofline, suite, targets
from helpers import assert_usage_error

SHAPE = (2, 3, 4, 5)
NBYTES = 2 * 3 * 4 * 5 * 4  # float32


def relu_variant():
    module = nn.ReLU()
    return baselines.Variant("eager", module, module)


def test_saved_bytes_of_relu_is_its_output():
    x = torch.randn(SHAPE, requires_grad=True)
    assert measure.saved_bytes(relu_variant(), (x,)) == (NBYTES, NBYTES)


def test_saved_bytes_leave_out_parameters():
    linear = nn.Linear(5, 7, bias=False)  # saves its input (activation) and its weight
    x = torch.randn(SHAPE, requires_grad=True)
    activations, everything = measure.saved_bytes(baselines.Variant("eager", linear, linear), (x,))
    assert (activations, everything) == (NBYTES, NBYTES + 7 * 5 * 4)


def test_traffic_of_relu_train_and_eval_steps():
    x = torch.randn(SHAPE, requires_grad=True)
    grad = torch.randn(SHAPE)
    variant = relu_variant()
    train = measure.traffic(measure.step_function(variant, (x,), [grad], train=True))
    # forward reads x, writes y; backward (threshold_backward) reads grad and y, writes dx
    assert (train.reads, train.writes) == (3 * NBYTES, 2 * NBYTES)
    evaluation = measure.traffic(measure.step_function(variant, (x,), [grad], train=False))
    assert (evaluation.reads, evaluation.writes) == (NBYTES, NBYTES)


def test_train_step_resets_gradients_instead_of_accumulating():
    linear = nn.Linear(5, 7)
    variant = baselines.Variant("eager", linear, linear)
    x = torch.randn(SHAPE, requires_grad=True)
    grads = [torch.randn(2, 3, 4, 7)]
    measure.train_step(variant, (x,), grads)
    first = linear.weight.grad.clone()
    measure.train_step(variant, (x,), grads)
    torch.testing.assert_close(linear.weight.grad, first)


def test_checkpointed_dense_block_matches_eager_and_saves_less():
    workload = configs.workloads("pdb-cpu", quick=True)[0]
    ref = baselines.make_reference(workload, torch.device("cpu"))
    ckpt = baselines.build_variant("checkpoint", ref, workload, torch.device("cpu"))
    eager = baselines.Variant("eager", ref, ref)
    args = workload.make_inputs(torch.device("cpu"))
    grads = [torch.randn(2, ref.out_channels, configs.QUICK_CPU_SIDE, configs.QUICK_CPU_SIDE)]
    expected = [o.detach().clone() for o in measure.train_step(eager, args, grads)]
    expected_grad = args[0].grad.clone()
    outputs = measure.train_step(ckpt, args, grads)
    torch.testing.assert_close(outputs[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(args[0].grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert measure.saved_bytes(ckpt, args)[0] < measure.saved_bytes(eager, args)[0]


def test_targets_met_short_and_missing():
    target = targets.Target("pdb-cpu", "saved_bytes", "eager", "<=", 0.2)
    rows = [{"label": "pdb-cpu", "config": "pdb-cpu", "variant": "eager", "saved_bytes": 100},
            {"label": "pdb-cpu", "config": "pdb-cpu", "variant": "fused", "saved_bytes": 15}]
    (verdict,) = targets.evaluate(rows, [target])
    assert (verdict["value"], verdict["status"]) == (0.15, "met")
    rows[1]["saved_bytes"] = 30
    assert targets.evaluate(rows, [target])[0]["status"] == "short"
    rows[1]["saved_bytes"] = None
    assert targets.evaluate(rows, [target])[0]["status"] == "n/a"


def test_time_targets_give_the_per_round_ratio_quartiles():
    # The machine slows down 3x over the run: each round's pair still says fused = 0.8 eager.
    target = targets.Target("pdb-cpu", "time_train_s", "eager", "<=", 0.75)
    eager = [1.0, 1.0, 2.0, 3.0, 3.0]
    rows = [{"label": "pdb-cpu", "config": "pdb-cpu", "variant": "eager", "time_train_s": 2.0,
             "time_train_samples": eager},
            {"label": "pdb-cpu", "config": "pdb-cpu", "variant": "fused", "time_train_s": 1.2,
             "time_train_samples": [0.8 * t for t in eager[:2]] + [0.9 * t for t in eager[2:]]}]
    (verdict,) = targets.evaluate(rows, [target])
    assert verdict["value"] == pytest.approx(0.6) and verdict["status"] == "met"
    assert verdict["spread"] == pytest.approx([0.8, 0.9, 0.9])
    saved = targets.evaluate(rows, [targets.Target("pdb-cpu", "saved_bytes", "eager", "<=", 0.2)])
    assert saved[0]["spread"] is None


def test_cio_of_the_standard_partial_dense_block():
    (workload,) = configs.workloads("pdb-cpu", quick=False)
    assert workload.cio_channels() == (128 * 6 + (36 + 6) * 32) / 2
    assert workload.cio_bytes() == workload.cio_channels() * 8 * 56 * 56 * 4


def test_unknown_config_and_sweep_are_rejected():
    with pytest.raises(ValueError, match="config must be one of"):
        configs.workloads("pdb-tpu", quick=True)
    with pytest.raises(ValueError, match="sweep must be one of"):
        configs.sweep_workloads("depth", configs.workloads("pdb-cpu", True)[0], True)


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "rounds must be at least 1"),
    (["--warmup", "-1"], "warmup must be at least 0"),
    (["--out", "/proc/no-such-folder"], "cannot create the output folder"),
])
def test_bad_options_are_usage_errors_before_any_run(argv, message, capsys):
    assert_usage_error(cli.main, ["--quick", "--config", "trans-cpu", *argv], message, capsys)


def run_quick(tmp_path, *argv):
    assert cli.main([*argv, "--quick", "--device", "cpu", "--rounds", "1", "--warmup", "1",
                     "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    return record, table


@pytest.mark.parametrize("command, metrics", [
    ("traffic", ["traffic_train_bytes", "traffic_eval_bytes"]),
    ("memory", ["saved_bytes", "saved_bytes_with_params"]),
    ("speed", ["time_eval_s", "time_train_s"]),
])
def test_each_subcommand_writes_its_metrics(tmp_path, command, metrics):
    record, table = run_quick(tmp_path, command, "--config", "pdb-cpu")
    assert record["settings"]["command"] == command
    variants = [row["variant"] for row in record["rows"]]
    assert variants == ["eager", "checkpoint", "fused"]  # compile is left out with --quick
    assert not [note for note in record["notes"] if "skipped" in note or "disagrees" in note]
    for row in record["rows"]:
        assert all(row[m] > 0 for m in metrics)
        assert row["rel_error_train"] < 1e-4  # same weights: wiring mistakes give ~1
        assert row["cio_channels"] == (16 * 3 + (9 + 3) * 8) / 2
    assert [row["variant"] for row in table] == variants
    assert all(float(row[m]) > 0 for row in table for m in metrics)


def test_all_with_sweep_and_plots(tmp_path):
    record, table = run_quick(tmp_path, "all", "--config", "trans-cpu", "--config", "efm-cpu",
                              "--sweep", "num_layers", "--plots")
    assert {row["config"] for row in record["rows"]} == {"trans-cpu", "efm-cpu"}
    assert record["machine"]["torch"] == torch.__version__
    assert {t["config"] for t in record["targets"]} == {"trans-cpu", "efm-cpu"}
    # Tiny shapes are not the standard configurations: their figures are shown, never judged.
    assert {t["status"] for t in record["targets"]} == {targets.QUICK_STATUS}
    assert all(t["reason"] == targets.QUICK_REASON for t in record["targets"])
    assert "short" not in (tmp_path / "report.txt").read_text()
    sweep = [row for row in record["sweep_rows"] if row["variant"] == "eager"]
    assert [row["sweep_value"] for row in sweep] == list(configs.SWEEPS["num_layers"][1])
    saved = [row["saved_bytes"] for row in sweep]
    assert saved == sorted(saved) and len(set(saved)) == len(saved)
    assert len(table) == len(record["rows"]) + len(record["sweep_rows"])
    assert (tmp_path / "sweep_num_layers.png").stat().st_size > 0
    assert (tmp_path / "report.txt").read_text().startswith(record["machine"]["cpu_model"])


def test_roofline_floor_of_a_transition_by_hand():
    (workload,) = configs.workloads("trans-cpu", quick=True)  # ConvBNAct 16 -> 16 on 2×16×side×side
    side = configs.QUICK_CPU_SIDE
    settings = suite.Settings(command="speed", quick=True, device="cpu", rounds=1, warmup=1)
    hardware = {"matmul_peak": {"float32": 1e12}, "copy_bandwidth": 1e10}
    rows = suite.measure_workload(workload, settings, torch.device("cpu"), ["eager"], hardware, [])
    (row,) = rows
    assert row["eval_flops"] == 2 * (2 * side * side) * 16 * 16
    # input and output (2×16×side×side float32 each); conv weight, BN weight+bias, running
    # mean+var, step counter
    assert row["compulsory_bytes"] == 2 * (2 * 16 * side * side * 4) + 16 * 16 * 4 + 4 * 16 * 4 + 8
    assert row["roofline_floor_s"] == row["compulsory_bytes"] / 1e10
    assert row["roofline_fraction"] == row["roofline_floor_s"] / row["time_eval_s"]


def test_roofline_machine_figures_are_positive():
    figures = roofline.measure_machine(torch.device("cpu"), [torch.float32], matmul_size=64,
                                       copy_bytes=1 << 16)
    assert figures["copy_bandwidth"] > 0 and figures["matmul_peak"]["float32"] > 0


def test_merge_records_concatenates_runs():
    first = {"machine": {"gpu_name": "X"}, "settings": {"configs": ["a"]}, "rows": [1],
             "sweep_rows": [], "ratios": [2], "targets": [3], "notes": [], "elapsed_s": 1.0}
    second = dict(first, settings={"configs": ["b"]}, rows=[4], elapsed_s=2.0)
    merged = report.merge_records([first, second])
    assert merged["rows"] == [1, 4] and merged["targets"] == [3, 3]
    assert merged["settings"] == [{"configs": ["a"]}, {"configs": ["b"]}]
    assert merged["elapsed_s"] == 3.0 and merged["machine"] == {"gpu_name": "X"}


def test_pinned_backend_variant_runs_its_module_on_that_backend():
    ref = csp_kernels.reference.ConvBNAct(4, 6, 3)
    fused = csp_kernels.ConvBNAct(4, 6, 3)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 5)
    with csp_kernels.use_backend("cpu"):
        pinned = baselines.PinnedBackend(fused, "reference")(x)
        assert csp_kernels.backend.requested_backend() == "cpu"
    assert torch.equal(pinned, ref(x))  # the reference's own ops, bit for bit
    workload = configs.workloads("trans-cpu", quick=True)[0]
    assert "fused-cuda" not in baselines.available_variants(workload, torch.device("cpu"))


def test_compile_fused_variant_compiles_the_fused_module():
    workload = configs.workloads("trans-cpu", quick=True)[0]
    device = torch.device("cpu")
    ref = baselines.make_reference(workload, device)
    assert "compile-fused" in baselines.available_variants(workload, device)
    variant = baselines.build_variant("compile-fused", ref, workload, device)
    assert type(variant.module) is csp_kernels.ConvBNAct
    assert variant.callable._orig_mod is variant.module  # steps set the fused module's mode
    assert all(torch.equal(a, b) for a, b in zip(variant.module.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--rounds", "-1"], "--rounds must be at least 1"),
    (["--out", "/proc/k.json"], "cannot write this file"),
])
def test_kernel_microbenchmark_options_are_usage_errors_before_any_run(argv, message, capsys):
    """(--rounds 0 ran the default 10 rounds, -1 ended in a StatisticsError, an unwritable --out in a
    traceback after the measurements.)"""
    assert_usage_error(kernels.main, ["--quick", *argv], message, capsys)


def test_kernel_microbenchmarks_write_every_row(tmp_path):
    """`python -m benchmarks.kernels --quick`: every row with each variant's rate, ours among them
    where our kernels run (Winograd where the AVX-512 GEMM does)."""
    out = tmp_path / "kernels.json"
    assert kernels.main(["--quick", "--rounds", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [row["name"] for row in record["rows"]] == list(kernels.QUICK_SHAPES)
    winograd = csp_kernels.build_info()["cpu_avx512"]
    for row in record["rows"]:
        assert all(rate > 0 for rate in row["gflops"].values()), row
        ours = [v for v in row["gflops"] if v.startswith("ours")]
        assert len(ours) == (1 if row["name"] == "conv1x1" or winograd else 0), row
    assert kernels.report(record["rows"]).count("GFLOP/s") == len(record["rows"])


def test_per_round_spread_stays_within_the_rounds_ratios():
    """The quartiles of the rounds' ratios interpolate between them (with two rounds the
    default exclusive method extrapolated past both: ratios 1 and 3 gave 0.5-3.5)."""
    target = targets.Target("pdb-cpu", "time_train_s", "eager", "<=", 0.75)
    variants = {"fused": {"time_train_samples": [1.0, 3.0]}, "eager": {"time_train_samples": [1.0, 1.0]}}
    assert targets._paired_spread(target, variants) == [1.5, 2.0, 2.5]

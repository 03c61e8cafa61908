"""The training example (python -m csp_kernels.examples.train) runs end to end on a few tiny
steps: it writes its JSON and PNG, and the fused and reference models train alike."""
import json

import pytest

from csp_kernels.examples import train
from helpers import assert_usage_error


def test_train_example_writes_results_and_losses_agree(tmp_path):
    results = train.main(["--model", "cspdensenet121", "--steps", "3", "--batch", "8", "--size", "32",
                          "--lr", "0.01", "--dtype", "float64", "--out", str(tmp_path)])

    written = json.loads((tmp_path / "train.json").read_text())
    assert (tmp_path / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["max_relative_loss_difference"] == results["max_relative_loss_difference"]
    assert (written["train_samples"], written["held_out_samples"]) == (1500, 297)
    fused, reference = written["fused"], written["reference"]
    assert len(fused["losses"]) == len(reference["losses"]) == 3
    assert fused["losses"][1] != fused["losses"][0], "the model must actually train"
    # float64: training this net amplifies rounding about 100-fold per step (BatchNorms over batch x 1 x 1
    # values in the last stage), which float32's 1e-7 cannot afford but float64's 1e-16 can.
    assert fused["losses"] == pytest.approx(reference["losses"], rel=1e-4)
    assert written["max_relative_loss_difference"] < 1e-4
    for record in (fused, reference):
        assert record["mean_step_seconds"] > 0 and 0 <= record["held_out_accuracy"] <= 1
        assert record["peak_memory_bytes"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--batch", "-1"], "--batch must be a positive integer"),
    (["--device", "nonsense"], "--device: "),
    (["--lr", "nan"], "--lr must be a positive finite number"),
    (["--momentum", "-0.5"], "--momentum must be a finite number >= 0"),
    (["--out", "/proc/no-such-folder"], "cannot create the output folder"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    assert_usage_error(train.parse_args, argv, message, capsys)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        train.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "(default: cspdensenet121)" in text and "(default: 200)" in text and "(default: 32)" in text

"""Train a CSPNet model for real, on the fused modules and on their reference twins side by side.

    python -m csp_kernels.examples.train --model cspdensenet121 --steps 200

Data: scikit-learn's digits (sklearn.datasets.load_digits, shipped inside the package, so no
download): 1797 grayscale 8x8 images of 10 digits, bilinearly upsampled to --size, repeated to 3
channels and standardized; a seeded permutation holds out HELD_OUT of them for the accuracy.

Both models start from the same weights (the reference loads the fused model's state_dict) and
see the same batches, one step of each in turn, with SGD and momentum. Their loss curves differ
only by rounding, which training amplifies: about 100-fold per step early on with the CSPDenseNets
at 32x32, whose last BatchNorms see only batch x 1 x 1 values (float64, --dtype float64, shows the
curves agreeing to 1e-9 and better over the first steps; in float32 they part by a few percent
within a few steps and then follow the same course). For each it reports the loss curve, the mean step time (forward,
backward, optimizer; the first two steps left out, unless there are no more), the peak memory of the second step
(memory allocated: torch.cuda.max_memory_allocated on a GPU, PyTorch's CPU allocator's on the CPU,
minus what was in use before the step) and the held-out accuracy at the end. It writes
`train.json` (every number) and `train.png` (both loss curves and their relative difference) into
--out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import models
from ..profiling import PeakMemory, format_bytes, peak_cpu_memory, peak_cuda_memory

HELD_OUT = 297  # of the 1797 digits: the 1500 others train
NUM_CLASSES = 10
VARIANTS = ("fused", "reference")


def load_digits(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (train_x, train_y, test_x, test_y): x (n, 3, size, size) float32,
    standardized with the training images' mean and standard deviation; y (n,) int64 in 0..9."""
    from sklearn.datasets import load_digits as sklearn_digits  # the example's dependency only

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[HELD_OUT:], order[:HELD_OUT]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return images[train].contiguous(), labels[train], images[test].contiguous(), labels[test]


def batch_indices(num_samples: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of `batch` sample indices: seeded epochs, each a permutation of the
    training set (a last incomplete batch of an epoch is carried into the next)."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / num_samples)
    order = torch.cat([torch.randperm(num_samples, generator=generator) for _ in range(epochs)])
    return list(order[:steps * batch].split(batch))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, measure_peak: bool) -> tuple[float, float, int | None]:
    """One SGD step on the batch (x (batch, 3, size, size), y (batch,)): (loss, seconds, peak
    memory increase in bytes with measure_peak, where it can be measured, else None)."""
    # Gradients go first: the CPU measure cannot see frees of what was allocated before it.
    optimizer.zero_grad(set_to_none=True)
    peak_memory = contextlib.nullcontext(PeakMemory()) if not measure_peak else (
        peak_cuda_memory(device) if device.type == "cuda" else peak_cpu_memory())
    with peak_memory as peak:
        _synchronize(device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        loss = loss.item()  # waits for the device
        seconds = time.perf_counter() - start
    return loss, seconds, peak.increase


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device) -> float:
    """The fraction of x (n, 3, size, size) the model in eval mode classifies as y (n,)."""
    model.eval()
    correct = sum((model(xb.to(device)).argmax(1) == yb.to(device)).sum().item()
                  for xb, yb in zip(x.split(batch), y.split(batch)))
    return correct / len(y)


def plot(losses: dict[str, list[float]], title: str, path: Path) -> None:
    """Both loss curves over the steps, and below them |fused - reference| / reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # files only, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), constrained_layout=True)
    FigureCanvasAgg(fig)
    curves, gap = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = range(1, len(losses["fused"]) + 1)
    curves.plot(steps, losses["reference"], label="reference (plain PyTorch)", color="tab:blue", linewidth=2.5,
                alpha=0.5)
    curves.plot(steps, losses["fused"], label="fused (csp_kernels)", color="tab:red", linewidth=1)
    curves.set_ylabel("training loss (cross-entropy)")
    curves.set_title(title)
    curves.legend()
    curves.grid(alpha=0.3)
    relative = [abs(f - r) / abs(r) for f, r in zip(losses["fused"], losses["reference"])]
    gap.semilogy(steps, [max(d, 1e-12) for d in relative], color="tab:gray")  # 1e-12: a log axis has no 0
    gap.set_xlabel("step")
    gap.set_ylabel("|fused - ref| / ref")
    gap.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m csp_kernels.examples.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="cspdensenet121", choices=list(models.MODELS), help="a model by name")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each model")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--size", type=int, default=32, help="image side the 8x8 digits are upsampled to")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the batches and the held-out split")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float64 shows the two curves agree to rounding once chaos has less to amplify")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (unset: benchmarks/out/train-<time> under the current directory)")
    args = parser.parse_args(argv)
    for option in ("steps", "batch", "size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be a positive integer; got {getattr(args, option)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and none is available; use cpu")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive finite number; got {args.lr}")
    if not (math.isfinite(args.momentum) and args.momentum >= 0):
        parser.error(f"--momentum must be a finite number >= 0; got {args.momentum}")
    if args.out is None:
        args.out = Path("benchmarks/out") / time.strftime("train-%Y%m%d-%H%M%S")
    try:  # before the run: a folder that cannot be written fails now, not after training
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {args.out}: cannot create the output folder ({err.strerror})")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the example with command-line arguments `argv` (sys.argv's by default); returns what
    it writes to train.json."""
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    train_x, train_y, test_x, test_y = load_digits(args.size, args.seed)
    train_x, test_x = train_x.to(dtype), test_x.to(dtype)
    torch.manual_seed(args.seed)
    nets = {"fused": models.create(args.model, num_classes=NUM_CLASSES, fused=True)}
    nets["reference"] = models.create(args.model, num_classes=NUM_CLASSES, fused=False)
    nets["reference"].load_state_dict(nets["fused"].state_dict())
    optimizers = {}
    for name, net in nets.items():
        net.to(device, dtype).train()
        optimizers[name] = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=1e-4)
    records = {name: {"losses": [], "step_seconds": [], "peak_bytes": []} for name in VARIANTS}

    bar = tqdm(batch_indices(len(train_y), args.batch, args.steps, args.seed), desc=f"{args.model} {args.size}px",
               unit="step")
    # Memory is measured in one step, the second (the first sets kernels and momentum buffers
    # up), whose time is left out with the first's: the profiler behind the CPU measure costs time.
    peak_step = min(1, args.steps - 1)
    for step, indices in enumerate(bar):
        x, y = train_x[indices].to(device), train_y[indices].to(device)
        # Alternate which runs first, so that neither always meets the caches and the machine the other left.
        for name in VARIANTS if step % 2 == 0 else VARIANTS[::-1]:
            loss, seconds, peak = train_step(nets[name], optimizers[name], x, y, device, step == peak_step)
            record = records[name]
            record["losses"].append(loss)
            record["step_seconds"].append(seconds)
            record["peak_bytes"].append(peak)
        bar.set_postfix(fused=f"{records['fused']['losses'][-1]:.4f}",
                        reference=f"{records['reference']['losses'][-1]:.4f}")

    for name, record in records.items():
        timed = record["step_seconds"][peak_step + 1:] or record["step_seconds"]
        record.update(mean_step_seconds=statistics.fmean(timed), median_step_seconds=statistics.median(timed),
                      peak_memory_bytes=record["peak_bytes"][peak_step],
                      held_out_accuracy=accuracy(nets[name], test_x, test_y, 4 * args.batch, device))
    fused_losses, reference_losses = records["fused"]["losses"], records["reference"]["losses"]
    relative = [abs(f - r) / abs(r) for f, r in zip(fused_losses, reference_losses)]
    results = {
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "machine": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "train_samples": len(train_y), "held_out_samples": len(test_y),
        "max_relative_loss_difference": max(relative), **records,
    }

    (args.out / "train.json").write_text(json.dumps(results, indent=1))
    plot({"fused": fused_losses, "reference": reference_losses},
         f"{args.model} on digits at {args.size}x{args.size}, batch {args.batch}, SGD lr {args.lr}",
         args.out / "train.png")

    last = min(10, args.steps)
    for name, record in records.items():
        losses = record["losses"]
        print(f"{name:>9}: loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of the last {last} "
              f"{statistics.fmean(losses[-last:]):.4f}), step {1e3 * record['mean_step_seconds']:.0f} ms mean "
              f"({1e3 * record['median_step_seconds']:.0f} ms median), peak memory "
              f"{format_bytes(record['peak_memory_bytes'])}, held-out accuracy {record['held_out_accuracy']:.3f}")
    print(f"largest relative difference between the loss curves: {max(relative):.2e}")
    print(f"wrote {args.out / 'train.json'} and {args.out / 'train.png'}")
    return results


if __name__ == "__main__":
    main()

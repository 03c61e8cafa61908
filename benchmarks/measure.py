"""Measuring one variant: train and eval steps, saved bytes, traffic, peak memory, time."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from csp_kernels.profiling import PeakMemory, SavedTensorsMeter, TrafficCounter, peak_cpu_memory, peak_cuda_memory

from .baselines import Variant


def tensors_of(value) -> list[torch.Tensor]:
    """The tensors in a module's arguments or outputs (a tensor, or nested lists/tuples)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_of(item)]
    return []


def reset_grads(variant: Variant, args: tuple) -> None:
    """The gradients of the module's parameters and of the inputs to None."""
    for tensor in [*variant.module.parameters(), *tensors_of(args)]:
        tensor.grad = None


def train_step(variant: Variant, args: tuple, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Forward in training mode, then backward of `grads` (one per output); gradients are reset
    first so no step pays for accumulating into the previous step's."""
    variant.module.train()
    reset_grads(variant, args)
    outputs = tensors_of(variant.callable(*args))
    torch.autograd.backward(outputs, grads)
    return outputs


def eval_step(variant: Variant, args: tuple) -> list[torch.Tensor]:
    """Forward in eval mode without autograd."""
    variant.module.eval()
    with torch.no_grad():
        return tensors_of(variant.callable(*args))


def step_function(variant: Variant, args: tuple, grads: list[torch.Tensor],
                  train: bool) -> Callable[[], object]:
    return (lambda: train_step(variant, args, grads)) if train else (
        lambda: eval_step(variant, args))


def relative_error(outputs: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """‖outputs − expected‖ / ‖expected‖ over all outputs, in float64."""
    outputs = [o.detach().double() for o in outputs]
    expected = [e.detach().double() for e in expected]
    diff = sum(float((o - e).square().sum()) for o, e in zip(outputs, expected))
    norm = sum(float(e.square().sum()) for e in expected)
    return math.sqrt(diff / norm) if norm else math.sqrt(diff)


def saved_bytes(variant: Variant, args: tuple) -> tuple[int, int]:
    """(activation bytes, all bytes) saved for backward by one training forward; activation
    bytes leave out the module's parameters and buffers."""
    variant.module.train()
    with SavedTensorsMeter() as meter:
        variant.callable(*args)
    weights = [*variant.module.parameters(), *variant.module.buffers()]
    return meter.bytes_excluding(weights), meter.bytes


def traffic(step: Callable[[], object]) -> TrafficCounter:
    """The traffic of one step, after one uncounted step (lazy initialisation, weight caches)."""
    step()
    with TrafficCounter() as counter:
        step()
    return counter


def peak_memory(variant: Variant, args: tuple, grads: list[torch.Tensor], train: bool,
                device: torch.device) -> PeakMemory:
    """Peak memory of one step after one unmeasured step, whose gradients are dropped first (the
    CPU measure cannot see frees of what was allocated before it): memory allocated, CUDA's on
    a GPU (`peak_cuda_memory`), PyTorch's CPU allocator's on a CPU (`peak_cpu_memory`)."""
    step = step_function(variant, args, grads, train)
    step()
    reset_grads(variant, args)
    with (peak_cuda_memory(device) if device.type == "cuda" else peak_cpu_memory()) as peak:
        step()
    return peak


def _sample(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Seconds per call of `step`, over `repeats` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - begin) / repeats


def time_interleaved(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                     rounds: int, min_sample_s: float, desc: str = "") -> dict[str, list[float]]:
    """Seconds per call of each step: `rounds` samples each, taken round-robin (the starting
    step rotating every round) so that drift of clocks and caches hits every step alike.

    A sample averages enough back-to-back calls to last about `min_sample_s`.
    """
    repeats = {}
    for name, step in steps.items():
        for _ in range(max(warmup - 1, 0)):
            step()
        last = _sample(step, 1, device)
        repeats[name] = max(1, math.ceil(min_sample_s / max(last, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    with tqdm(total=rounds * len(names), desc=desc, leave=False) as bar:
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_sample(steps[name], repeats[name], device))
                bar.update()
    return samples


def median_time(step: Callable[[], object], device: torch.device, warmup: int = 3,
                rounds: int = 10, min_sample_s: float = 0.05, desc: str = "") -> float:
    """Median seconds per call of one step."""
    samples = time_interleaved({"step": step}, device, warmup, rounds, min_sample_s, desc)
    return statistics.median(samples["step"])

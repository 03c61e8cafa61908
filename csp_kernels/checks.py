"""Argument validation shared by the reference and the fused modules.

Every check raises TypeError (wrong kind of value) or ValueError (right kind, wrong value) with a
message that names the argument and says what was expected, so that the reference and the fused
modules reject bad input with the same words.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "silu", "mish", "hardswish", "identity")
LEAKY_RELU_SLOPE = 0.1  # darknet's leaky ReLU
FUSIONS = ("last", "first", "csp")
GROUPINGS = ("interleaved", "contiguous")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_activation(act) -> str:
    """Return `act` if it names a supported activation (see ACTIVATIONS)."""
    return _check_choice(act, "act", ACTIVATIONS)


def check_fusion(fusion) -> str:
    """Return `fusion` if it names a partial-transition strategy (see FUSIONS)."""
    return _check_choice(fusion, "fusion", FUSIONS)


def check_grouping(grouping) -> str:
    """Return `grouping` if it names a Maxout channel grouping (see GROUPINGS)."""
    return _check_choice(grouping, "grouping", GROUPINGS)


def check_positive_int(value, name: str) -> int:
    """Return `value` as an int if it is an integer > 0 (bool is not accepted)."""
    if (torch.jit.is_tracing() and isinstance(value, torch.Tensor) and value.dim() == 0
            and not value.is_floating_point() and value.dtype != torch.bool):
        value = int(value)  # torch.jit.trace hands sizes over as 0-dim tensors; the trace keeps them
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int; got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return int(value)


def partial_split(in_channels: int, part_ratio: float) -> tuple[int, int]:
    """Split `in_channels` into (part1, part2): part1 = round(in_channels * part_ratio) channels
    bypass the stage, the other part2 go through it. Both parts must be non-empty.
    Python's round: halves go to the even integer (5 channels at 0.5 give part1 = 2)."""
    in_channels = check_positive_int(in_channels, "in_channels")
    if (
        isinstance(part_ratio, bool)
        or not isinstance(part_ratio, numbers.Real)
        or not 0.0 < part_ratio < 1.0
    ):
        raise ValueError(f"part_ratio must be a float in the open interval (0, 1); got {part_ratio!r}")
    part1 = int(round(in_channels * part_ratio))
    part2 = in_channels - part1
    if part1 == 0:
        raise ValueError(
            f"part_ratio={part_ratio} with in_channels={in_channels} leaves part 1 empty: "
            f"round({in_channels} * {part_ratio}) = 0 bypass channels; increase part_ratio"
        )
    if part2 == 0:
        raise ValueError(
            f"part_ratio={part_ratio} with in_channels={in_channels} leaves part 2 empty: "
            f"round({in_channels} * {part_ratio}) = {in_channels} takes every channel into "
            f"part 1; decrease part_ratio"
        )
    return part1, part2


def check_input(
    x,
    name: str = "x",
    channels: int | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Return `x` if it is a 4-D (batch, channels, height, width) floating tensor with
    `channels` channels (when given) and a dtype in `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, channels, height, width); got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1); got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}); got {x.dtype}")
    return x


def check_same_device_dtype(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise ValueError unless all `tensors` share one device and one dtype."""
    _check_same(tensors, names, "device")
    _check_same(tensors, names, "dtype")


def check_module_input(x: torch.Tensor, module: nn.Module, name: str = "x") -> None:
    """Raise ValueError if `x` is not on the device of `module`'s parameters, or (outside
    autocast, which legitimately mixes them) does not have their dtype."""
    param = next(module.parameters(), None)
    if param is None:
        return
    tensors, names = (x, param), (name, f"{type(module).__name__} parameters")
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        _check_same(tensors, names, "device")
    else:
        check_same_device_dtype(tensors, names)


def _check_same(tensors: Sequence[torch.Tensor], names: Sequence[str], attribute: str) -> None:
    values = [getattr(t, attribute) for t in tensors]
    if any(v != values[0] for v in values[1:]):
        found = ", ".join(f"{n} on {v}" if attribute == "device" else f"{n} is {v}" for n, v in zip(names, values))
        raise ValueError(f"{', '.join(names)} must have the same {attribute}; got {found}")


def maxout_args(x, out_channels, grouping) -> tuple[int, str]:
    """Validated (out_channels, grouping) of a Maxout of `x` (channels divisible by out_channels)."""
    check_input(x)
    out_channels = check_positive_int(out_channels, "out_channels")
    grouping = check_grouping(grouping)
    if x.shape[1] % out_channels != 0:
        raise ValueError(
            f"x channels ({x.shape[1]}) must be divisible by out_channels; got out_channels={out_channels}"
        )
    return out_channels, grouping


def feature_list(features, num_levels: int | None = None) -> None:
    """A non-empty list (or tuple) of feature maps, `num_levels` long when given."""
    expected = "a non-empty list of tensors" if num_levels is None else f"a list of {num_levels} tensors"
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be {expected}; got {type(features).__name__}")
    if len(features) == 0 or num_levels not in (None, len(features)):
        raise ValueError(f"features must be {expected}; got {len(features)} of them")


def spatial_size(size) -> tuple[int, int]:
    """(height, width) from an int or a pair of positive ints."""
    if not isinstance(size, (list, tuple, torch.Size)):
        return (check_positive_int(size, "size"),) * 2
    if len(size) != 2:
        raise ValueError(f"size must be an int or a (height, width) pair; got {tuple(size)}")
    return check_positive_int(size[0], "size[0]"), check_positive_int(size[1], "size[1]")


def maxout_pyramid_args(features, size, out_channels, grouping) -> tuple[tuple[int, int], int, str]:
    """Validated (size, out_channels, grouping) of a Maxout pyramid over `features`: 4-D maps of
    one batch size, dtype and device whose total channels divide by out_channels."""
    feature_list(features)
    names = [f"features[{i}]" for i in range(len(features))]
    for feature, name in zip(features, names):
        check_input(feature, name=name)
    check_same_device_dtype(features, names)
    batches = [feature.shape[0] for feature in features]
    if any(b != batches[0] for b in batches):
        raise ValueError(f"features must all have the same batch size (dim 0); got {batches}")
    size = spatial_size(size)
    out_channels = check_positive_int(out_channels, "out_channels")
    channels = [feature.shape[1] for feature in features]
    if sum(channels) % out_channels != 0:
        raise ValueError(
            f"the features' total channels {' + '.join(map(str, channels))} = {sum(channels)} must "
            f"be divisible by out_channels; got out_channels={out_channels}"
        )
    return size, out_channels, check_grouping(grouping)


_ACTIVATION_MODULES = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE),
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "identity": nn.Identity,
}


def activation_module(act: str) -> nn.Module:
    """A new nn.Module computing activation `act` (see ACTIVATIONS)."""
    return _ACTIVATION_MODULES[check_activation(act)]()

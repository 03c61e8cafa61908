"""Argument validation shared by the reference and the fused modules.

Every check raises TypeError (wrong kind of value) or ValueError (right kind, wrong value) with a
message that names the argument and says what was expected, so that the reference and the fused
modules reject bad input with the same words. The environment variables that pin a kernel
choice are read here too (`env_choice`); a bad one warns rather than raises, at import.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "silu", "mish", "hardswish", "identity")
LEAKY_RELU_SLOPE = 0.1  # darknet's leaky ReLU; the default `negative_slope`
FUSIONS = ("last", "first", "csp")
GROUPINGS = ("interleaved", "contiguous")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def env_choice(var: str, choices: tuple[str, ...], default: str, renamed_from: str = "") -> str:
    """The environment variable `var` when it is one of `choices`; `default` when it is unset or
    empty, and, with a warning naming it, when it is anything else. Read once, at import. A
    variable set under its old name `renamed_from` is ignored with a warning saying so."""
    if renamed_from and os.environ.get(renamed_from):
        warnings.warn(f"{renamed_from} is now {var}; {renamed_from} is ignored", stacklevel=2)
    value = os.environ.get(var, "")
    if value and value not in choices:
        warnings.warn(f"{var} must be one of {choices} or unset; got {value!r}, which is ignored", stacklevel=2)
        value = ""
    return value or default


def check_tensor(value, name: str) -> torch.Tensor:
    """Return `value` if it is a torch.Tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def check_out_tensor(out, shape, dtype: torch.dtype, device: torch.device) -> None:
    """Raise, as ATen's out= does, unless `out` is a tensor of `shape`, `dtype` on `device` (the
    check every out= shares; the ops add their layout checks)."""
    check_tensor(out, "out")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be a {dtype} tensor of shape {tuple(shape)} on {device}; got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_activation(act) -> str:
    """Return `act` if it names a supported activation (see ACTIVATIONS)."""
    return _check_choice(act, "act", ACTIVATIONS)


def check_negative_slope(value) -> float:
    """Return `value` as a float if it is a real number (LeakyReLU's negative slope)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"negative_slope must be a float; got {type(value).__name__} {value!r}")
    return float(value)


def check_fusion(fusion) -> str:
    """Return `fusion` if it names a partial-transition strategy (see FUSIONS)."""
    return _check_choice(fusion, "fusion", FUSIONS)


def check_grouping(grouping) -> str:
    """Return `grouping` if it names a Maxout channel grouping (see GROUPINGS)."""
    return _check_choice(grouping, "grouping", GROUPINGS)


def check_module(model, name: str = "model") -> nn.Module:
    """Return `model` if it is an nn.Module instance (not a class, a tensor, None, ...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module instance; got {type(model).__name__} {model!r:.60}")
    return model


def check_bool(value, name: str) -> bool:
    """Return `value` if it is a bool (a flag; "no" or 0 would read as something else)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return value


def check_positive_ratio(value, name: str) -> float:
    """Return `value` as a float if it is a finite real number > 0 (a width ratio; bool is not
    accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float (a width ratio); got {type(value).__name__} {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite float (a width ratio); got {value!r}")
    return float(value)


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


def check_padding(padding):
    """Return a conv's `padding` if nn.Conv2d would run it: None (the caller's default), a
    non-negative int, a (height, width) pair of them, or nn.Conv2d's "same" / "valid"."""
    if padding is None or isinstance(padding, str):  # nn.Conv2d checks the strings
        return padding
    values = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,)
    if len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
        raise TypeError(f"padding must be None, a non-negative int or a pair of them, or 'same'/'valid'; got "
                        f"{padding!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"padding must be non-negative; got {padding!r}")
    return padding


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
    check_tensor(x, name)
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


# Found once, outside any trace: torch.amp.is_autocast_available is untraceable by Dynamo
# (torch 2.11), and torch.is_autocast_enabled raises for device types without autocast (meta).
_AUTOCAST_DEVICE_TYPES = frozenset(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu",
                torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(d))


def check_batch_norm_eps(eps: float, training: bool) -> None:
    """Raise, with F.batch_norm's words, for an eps it refuses: not positive in training (batch
    statistics), negative in eval. The fused kernels read eps without calling it."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_batch_norm_dtypes(dtype: torch.dtype, bn: nn.Module, name: str = "bn") -> None:
    """Raise, as ATen's batch_norm does ("mixed dtype"), unless the parameters and running
    statistics of BatchNorm `bn` (called `name`) all have the dtype `dtype` of the data it
    normalizes, or, for float16 / bfloat16 data, all float32. The fused kernels convert them
    without calling it."""
    allowed = (dtype, torch.float32) if dtype in (torch.float16, torch.bfloat16) else (dtype,)
    first = None
    for key, t in (*bn._parameters.items(), *bn._buffers.items()):
        if key == "num_batches_tracked" or t is None:
            continue
        if t.dtype not in allowed or (first is not None and t.dtype != first[1].dtype):
            raise ValueError(f"{name}.{key} is {t.dtype} for {dtype} data"
                             + (f" and {name}.{first[0]} {first[1].dtype}" if first and t.dtype in allowed else "")
                             + " (BatchNorm takes parameters and statistics all of the data's dtype, or all float32 "
                               "for float16 / bfloat16 data)")
        first = first or (key, t)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (False for a device type without autocast)."""
    return device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def check_module_input(x: torch.Tensor, module: nn.Module, name: str = "x") -> None:
    """Raise ValueError if `x` is not on the device of `module`'s parameters, or does not have
    their dtype: under autocast, the dtypes autocast casts both to (`autocast_dtype`), as a
    convolution would find them."""
    param = _first_parameter(module)
    if param is None or (x.device == param.device and x.dtype == param.dtype):
        return
    tensors, names = (x, param), (name, f"{type(module).__name__} parameters")
    _check_same(tensors, names, "device")
    if autocast_dtype(x) != autocast_dtype(param):
        _check_same(tensors, names, "dtype")


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a lower-precision op (a convolution) computes argument `t` in: under autocast on
    t's device, the autocast dtype for a floating-point tensor other than float64, which autocast
    leaves as it is (ATen's cached_cast); else t's own."""
    if t.is_floating_point() and t.dtype != torch.float64 and autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _first_parameter(module: nn.Module) -> torch.Tensor | None:
    """next(module.parameters(), None) without its generators (a few microseconds at every
    call of every fused module): the module's own parameters first, then its children's, in
    order."""
    for param in module._parameters.values():
        if param is not None:
            return param
    for child in module._modules.values():
        if child is not None and (param := _first_parameter(child)) is not None:
            return param
    return None


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


def activation_module(act: str, negative_slope: float = LEAKY_RELU_SLOPE) -> nn.Module:
    """A new nn.Module computing activation `act` (see ACTIVATIONS); `negative_slope` is
    leaky_relu's."""
    if check_activation(act) == "leaky_relu":
        return nn.LeakyReLU(check_negative_slope(negative_slope))
    return _ACTIVATION_MODULES[act]()


# The modules the kernels compute exactly, by exact type: a subclass may compute something else.
_KERNEL_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.Mish: "mish",
                       nn.Hardswish: "hardswish", nn.Identity: "identity"}


def bypass_reason(module: nn.Module, name: str, consequence: str) -> str:
    """Why `module` (called `name` in the message) must run as a module call of its own, or "":
    its forward (or a convolution's _conv_forward) replaced on the instance or on its class, or a
    forward or forward pre-hook, or a backward or backward pre-hook (full or not), which a fused
    kernel computing it inside another op would not run (`consequence` says how)."""
    if "forward" in module.__dict__:
        return f"{name}'s forward is replaced on the instance ({consequence})"
    if "_conv_forward" in module.__dict__:  # what nn.Conv2d's forward calls
        return f"{name}'s _conv_forward is replaced on the instance ({consequence})"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"a forward hook on {name} ({consequence})"
    if module._backward_hooks or module._backward_pre_hooks:
        return f"a backward hook on {name} ({consequence})"
    if replaced := class_forward_replaced(type(module)):
        return f"{name}'s {replaced} ({consequence})"
    return ""


def class_forward_replaced(cls: type) -> str:
    """"<Owner>.forward is replaced on the class (by ...)" when the forward (or, for a
    convolution, the _conv_forward) that instances of `cls` run is not the one its defining class
    wrote: a function patched onto the class, as tools that instrument torch.nn do; else "".
    Asked at every call of a fused module, so answered once per (class, functions) triple. Not
    inside a torch.compile trace, where dynamo reads a function's __qualname__ as the descriptor
    of the function type: "" there."""
    if torch.compiler.is_compiling():
        return ""
    key = (cls, cls.forward, getattr(cls, "_conv_forward", None))
    found = _CLASS_FORWARDS.get(key)
    if found is None:
        found = _CLASS_FORWARDS[key] = _replaced_on_class(cls)
    return found


_CLASS_FORWARDS: dict[tuple, str] = {}  # class_forward_replaced's answers


def _replaced_on_class(cls: type) -> str:
    for attr in ("forward", "_conv_forward"):
        owner = next((c for c in cls.__mro__ if attr in vars(c)), None)
        if owner is None:
            continue
        function = vars(owner)[attr]
        if (getattr(function, "__qualname__", None) != f"{owner.__qualname__}.{attr}"
                or getattr(function, "__module__", None) != owner.__module__):
            return (f"{owner.__qualname__}.{attr} is replaced on the class (by "
                    f"{getattr(function, '__qualname__', function)} of {getattr(function, '__module__', None)})")
    return ""


def is_bypassed(module: nn.Module) -> bool:
    """Whether a fused kernel computing `module` would bypass something (`bypass_reason`)."""
    return bool(bypass_reason(module, "", ""))


def _kernel_act(module: nn.Module) -> str:
    name = _KERNEL_ACTIVATIONS.get(type(module), "")
    if not name or is_bypassed(module):  # (not name: anything else, a plain function included)
        return ""  # the kernels would skip its hooks or its own forward
    if name == "leaky_relu" and module.negative_slope != LEAKY_RELU_SLOPE:
        slope = float(module.negative_slope)
        return f"leaky_relu:{slope!r}" if math.isfinite(slope) else ""  # (the kernels take finite slopes)
    return name


def kernel_activation(*modules: nn.Module) -> tuple[str, str]:
    """(the kernels' name for what `modules` compute, "") when every one of them computes the
    same activation the kernels can, else ("", the reason). The kernels' names are ACTIVATIONS
    and "leaky_relu:<slope>" (repr of the float, exact) for a slope other than LEAKY_RELU_SLOPE
    (csrc/activation.h parse_act, triton/activation.py act_constexprs read it back). Read at
    forward time, so a module whose `act` was replaced after construction runs what it holds (a
    plain function too, which the kernels do not compute)."""
    if len(modules) == 1 and (name := _kernel_act(modules[0])):
        return name, ""  # the common case, at every call of every fused module
    names = [_kernel_act(m) for m in modules]
    for m, name in zip(modules, names):
        if not name:
            return "", ((isinstance(m, nn.Module) and bypass_reason(m, f"activation {m!r}",
                                                                    "the fused kernels would skip it"))
                        or f"activation {m!r} (the fused kernels compute nn.ReLU, nn.LeakyReLU with a finite "
                           "slope, nn.SiLU, nn.Mish, nn.Hardswish and nn.Identity)")
    if any(name != names[0] for name in names):
        return "", f"different activations {', '.join(map(repr, modules))} (the fused op applies one)"
    return names[0], ""


def parse_activation(act: str) -> tuple[str, float]:
    """(name, negative slope) of a kernels' activation name (see kernel_activation)."""
    name, _, slope = act.partition(":")
    check_activation(name)
    if slope and name != "leaky_relu":
        raise ValueError(f"act: only leaky_relu takes a slope ('leaky_relu:<slope>'); got {act!r}")
    try:
        return name, float(slope) if slope else LEAKY_RELU_SLOPE
    except ValueError:
        raise ValueError(f"act 'leaky_relu:<slope>' needs a number as slope; got {act!r}") from None

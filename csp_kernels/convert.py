"""`convert(model)`: swap the fused modules into a model built with ultralytics, timm,
torchvision or plain PyTorch (Liger-Kernel's `apply_liger_kernel_to_*` convention, for any
nn.Module); `revert(model)`: put the upstream modules back, so that checkpoints stay portable.

A fused module is built around the upstream module's own conv, BatchNorm and activation objects
(timm's BatchNormAct2d becomes an nn.BatchNorm2d holding the same Parameter and buffer tensors),
so parameters, buffers, requires_grad, device, dtype and train/eval mode carry over with no copy,
and an optimizer built before the conversion still steps the model's parameters. A CSP stage
(ultralytics' Bottleneck, C2f, C3, C3k, C3k2; timm's BottleneckBlock, DarkBlock, CrossStage,
CrossStage3, DarkStage) becomes its csp_kernels.nn.stages twin the same way, around its own
children once they are converted; torchvision's DenseNet `_DenseBlock` becomes a
csp_kernels.DenseBlock holding its very `_DenseLayer`s (not when they use dropout or
memory_efficient checkpointing, which the fused block does not compute alike).

CONVERTERS is the one table of what converts: (upstream module path, class name) -> Converter.
Classes are matched by name, exactly (a subclass may compute something else), so that no
optional package (ultralytics, timm, torchvision) is imported: a package that is not installed
has no instances to match.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import importlib
import itertools
import re
from typing import Callable

import torch
from torch import nn

from . import checks, reference
from .nn import pooling, stages
from .nn.dense import DenseBlock, dense_layer_reason
from .nn.transition import ConvBNAct, batch_norm_reason, conv_reason

ORIGIN_ATTRIBUTE = "_csp_kernels_origin"  # on a fused module made by convert: its Origin


@dataclasses.dataclass(frozen=True)
class Converter:
    """How instances of one upstream class become a fused module, and back.

    fuse(module): the fused module built around module's submodules (or their tensors); a str
      saying why this unit stays as it is; or None when the module is no unit but a container
      to walk into (a plain nn.Sequential that is not conv, BatchNorm, activation).
    unfuse(fused, origin): the upstream module of class origin.cls rebuilt around fused's
      submodules, already reverted (convert's attribute and mode bookkeeping is redone by `revert`).
    children_first: convert the module's children before calling fuse, which then sees them as
      converted: a CSP stage is fused around fused ConvBNActs and blocks, or left when one was left.
    """

    fuse: Callable[[nn.Module], nn.Module | str | None]
    unfuse: Callable[[nn.Module, Origin], nn.Module]
    children_first: bool = False


@dataclasses.dataclass(frozen=True)
class Origin:
    """What `revert` needs besides a fused module's submodules: the upstream class, the plain
    attributes the upstream module carried (ultralytics' layer index `i` and input `f`, which
    its model's forward reads; torchvision's `out_channels`), kept on the fused module too, and
    the fused module's children that the upstream one named otherwise ({"conv": "0", "bn": "1"}
    for an nn.Sequential), whose state_dict keys the fused module writes and reads the upstream way."""

    cls: type
    attributes: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]
    # (fused child name, upstream child name) for every child both hold, renamed or not
    # (revert names an nn.Sequential's layers as upstream did); older pickles lack it
    children: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Swapped:
    """A unit swapped: its qualified name in the model ("" for the model itself) and classes."""

    name: str
    from_class: str
    to_class: str


@dataclasses.dataclass(frozen=True)
class Left:
    """A unit left as it is, and why."""

    name: str
    from_class: str
    reason: str


@dataclasses.dataclass
class ConversionReport:
    """What `convert` did: the units swapped and those left with the reason; modules that no
    converter knows and that hold parameters or buffers counted by class (`unknown`); fused
    modules already in the model (`already_fused`: convert twice converts once)."""

    swapped: list[Swapped] = dataclasses.field(default_factory=list)
    left: list[Left] = dataclasses.field(default_factory=list)
    unknown: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    already_fused: int = 0

    def counts(self) -> dict[str, int]:
        return {"swapped": len(self.swapped), "left": len(self.left), "unknown": sum(self.unknown.values()),
                "already_fused": self.already_fused}

    def swapped_by_class(self) -> collections.Counter:
        """{"Conv -> ConvBNAct": count, ...}"""
        return collections.Counter(f"{s.from_class} -> {s.to_class}" for s in self.swapped)

    def __str__(self) -> str:
        counts = self.counts()
        lines = [f"csp_kernels.convert: {counts['swapped']} swapped, {counts['left']} left as is, "
                 f"{counts['already_fused']} already fused; modules with parameters or buffers that no converter "
                 f"knows: {counts['unknown']}" + (f" ({_format_counter(self.unknown)})" if self.unknown else "")]
        if self.swapped:
            lines += _table(("swapped", "from -> to"),
                            [(_display(s.name), f"{s.from_class} -> {s.to_class}") for s in self.swapped])
        if self.left:
            lines += _table(("left as is", "class", "reason"),
                            [(_display(item.name), item.from_class, item.reason) for item in self.left])
        return "\n".join(lines)


def convert(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, ConversionReport]:
    """Swap the fused module in for every unit of `model` that CONVERTERS knows: ultralytics'
    Conv and DWConv, timm's ConvNormAct, torchvision's Conv2dNormActivation and a plain
    nn.Sequential(Conv2d, BatchNorm2d, activation) become csp_kernels.ConvBNAct; the CSP stages
    of ultralytics (Bottleneck, C2f, C3, C3k, C3k2) and timm (BottleneckBlock, DarkBlock,
    CrossStage, CrossStage3, DarkStage) their csp_kernels.nn.stages twins; torchvision's DenseNet
    _DenseBlock a csp_kernels.DenseBlock (left with drop_rate > 0 or memory_efficient). Units the fused
    kernels cannot compute (an activation they lack, a conv bias, a forward or backward hook, ...) are left
    as they are and reported with the reason; so is a stage whose twin would need one of them
    fused, or which computes more than its twin (attention, drop path), its children converted.

    The fused modules hold the units' own submodules, so parameters, buffers, requires_grad,
    device, dtype and modes are kept, and state_dict keys too: a unit that is an nn.Sequential
    (torchvision's, or plain) writes and reads its upstream keys ("0.weight", "1.running_mean")
    through state_dict hooks, while named_parameters() says "conv.weight", "bn.weight".

    inplace=False converts a deep copy and leaves `model` untouched; inplace=True converts
    `model` itself. Returns (converted model, report): the converted model is `model` (or its
    copy), or the fused module when `model` itself is a unit; `print(report)` shows the report.
    """
    checks.check_module(model)
    checks.check_bool(inplace, "inplace")
    if not inplace:
        model = _deep_copy(model, "convert")
    report = ConversionReport()
    occurrences = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return _convert_tree(model, "", report, {}, occurrences), report


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with the upstream module back in place of every fused module `convert` made,
    holding the fused modules' (trained) parameters and buffers: its state_dict loads into a
    freshly built original model with strict=True. inplace=False reverts a deep copy (a
    training run can save a portable checkpoint and go on fused). Hooks registered on the fused
    modules themselves stay with them, not with the upstream modules put back (those on their
    conv, bn and act submodules, which the upstream modules hold again, come back)."""
    checks.check_module(model)
    checks.check_bool(inplace, "inplace")
    if not inplace:
        model = _deep_copy(model, "revert")
    return _revert_tree(model, {})


def _deep_copy(model: nn.Module, function: str) -> nn.Module:
    """copy.deepcopy(model), or a RuntimeError that says how to do without it: torch cannot
    deep-copy a module holding non-leaf tensors (torch.nn.utils.prune's weight, the legacy
    weight_norm's)."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as error:
        raise RuntimeError(f"csp_kernels.{function}(model) with inplace=False converts a deep copy, and torch could "
                           f"not copy this model: {error} Pass inplace=True to {function} the model itself.") from error


def class_key(cls: type) -> tuple[str, str]:
    """(defining module, qualified name) of class `cls`: its key in CONVERTERS."""
    return cls.__module__, cls.__qualname__


# --- the walk ---------------------------------------------------------------------------------

def _convert_tree(module: nn.Module, name: str, report: ConversionReport, memo: dict,
                  occurrences: collections.Counter) -> nn.Module:
    """`module` with its units swapped (a module shared at several places is converted once).
    occurrences: how many times each module (by id) appears in the model as given."""
    if id(module) in memo:
        return memo[id(module)]
    if type(module).__module__.startswith("csp_kernels.nn."):
        report.already_fused += 1
        result = module
    else:
        converter = CONVERTERS.get(class_key(type(module)))
        if converter is not None and converter.children_first:
            _convert_children(module, name, report, memo, occurrences)
        fused = (_patched_forward_reason(type(module)) or converter.fuse(module)) if converter else None
        if isinstance(fused, nn.Module):
            fused = _dropped_reason(module, fused, occurrences) or fused
        if fused is None:  # never for children_first: a stage is fused or left
            _count_unknown(module, report)
            _convert_children(module, name, report, memo, occurrences)
            result = module
        elif isinstance(fused, str):
            report.left.append(Left(name, type(module).__qualname__, fused))
            result = module
        else:
            _remember_origin(fused, module)
            report.swapped.append(Swapped(name, type(module).__qualname__, type(fused).__qualname__))
            result = fused
    memo[id(module)] = result
    return result


def _convert_children(module: nn.Module, name: str, report: ConversionReport, memo: dict,
                      occurrences: collections.Counter) -> None:
    _replace_children(module, lambda child, child_name: _convert_tree(child, _qualify(name, child_name), report, memo,
                                                                      occurrences))


def _patched_forward_reason(cls: type) -> str:
    """Why instances of the upstream class `cls` cannot be swapped because the forward they run
    is not the one its defining class wrote (patched onto the class: the fused twin computes the
    original forward), or ""."""
    replaced = checks.class_forward_replaced(cls)
    return f"{replaced[:-1]}; the fused module computes the original)" if replaced else ""


_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def _dropped_reason(module: nn.Module, fused: nn.Module, occurrences: collections.Counter) -> str:
    """Why swapping `fused` in for `module` would lose or split something, or "": a parameter or
    buffer that `fused` does not hold (registered on the unit itself, or on a submodule that
    fused replaces, as timm's BatchNormAct2d), a state_dict or load_state_dict hook on a module
    that fused does not keep, or such a module that is also used elsewhere in the model (a
    BatchNormAct2d shared by two units: each would get a BatchNorm2d of its own, whose mode and
    hyper-parameters then go apart)."""
    kept_modules = {id(m) for m in fused.modules()}
    kept_tensors = {id(t) for t in itertools.chain(fused.parameters(), fused.buffers())}
    for sub_name, sub in module.named_modules(remove_duplicate=False):
        if id(sub) in kept_modules:
            continue
        where = sub_name or "it"
        own = itertools.chain(sub.named_parameters(recurse=False), sub.named_buffers(recurse=False))
        for tensor_name, tensor in own:
            if id(tensor) not in kept_tensors:
                return (f"{_qualify(sub_name, tensor_name)} is a tensor of its own that the fused "
                        f"{type(fused).__name__} would not hold")
        if hooks := [h.strip("_") for h in _STATE_DICT_HOOKS if getattr(sub, h, None)]:
            return f"{where} has {', '.join(hooks)} (the fused {type(fused).__name__} would not run them)"
        if sub is not module and occurrences[id(sub)] > occurrences[id(module)]:
            return (f"{where} ({type(sub).__qualname__}) is also used elsewhere in the model, and the fused "
                    f"{type(fused).__name__} would hold a module of its own in its place")
    return ""


def _revert_tree(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    # Children first: a fused stage's ConvBNActs and blocks go back before the stage does.
    _replace_children(module, lambda child, _: _revert_tree(child, memo))
    origin = getattr(module, ORIGIN_ATTRIBUTE, None)
    if origin is None:
        result = module
    else:
        result = CONVERTERS[class_key(origin.cls)].unfuse(module, origin)
        for attribute in origin.attributes:
            setattr(result, attribute, getattr(module, attribute))
        result.training = module.training
    memo[id(module)] = result
    return result


def _replace_children(module: nn.Module, new_child: Callable[[nn.Module, str], nn.Module]) -> None:
    """Replaces each child of `module` by new_child(child, name), under every name it has: one
    module registered twice (`self.b = self.a`, `nn.Sequential(m, m)`) is one entry of
    named_children(), which lists each module once, but the callers' memo makes both names
    get the same replacement, so they stay one module."""
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        replacement = new_child(child, child_name)
        if replacement is not child:
            setattr(module, child_name, replacement)


def _count_unknown(module: nn.Module, report: ConversionReport) -> None:
    """Count a module no converter takes as a unit when it computes with tensors of its own
    (containers, activations and pooling are not worth listing)."""
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        report.unknown[type(module).__qualname__] += 1


# What a load hands a renamed module's load pre-hook that its post-hook needs: (prefix, the
# load's error messages, how many there were before this module's children loaded).
_LOAD_PREFIX = "_csp_kernels_load_prefix"


def _remember_origin(fused: nn.Module, upstream: nn.Module) -> None:
    """Record on `fused` what `revert` needs, carry the upstream module's plain attributes and
    its own train/eval mode over (its submodules' modes are theirs, as for a frozen BatchNorm in
    a training model), and keep the upstream state_dict keys of renamed children."""
    attributes = tuple(a for a in vars(upstream) if not a.startswith("_") and a != "training")
    for attribute in attributes:
        if attribute not in vars(fused):  # the fused module's own (in_channels, out_channels) stay
            setattr(fused, attribute, getattr(upstream, attribute))
    upstream_names = {id(child): child_name for child_name, child in upstream.named_children()}
    children = tuple((child_name, upstream_names[id(child)]) for child_name, child in fused.named_children()
                     if id(child) in upstream_names)
    renamed = tuple((new, old) for new, old in children if new != old)
    setattr(fused, ORIGIN_ATTRIBUTE, Origin(type(upstream), attributes, renamed, children))
    fused.training = upstream.training
    if renamed:
        fused.register_state_dict_post_hook(_write_upstream_keys)
        fused.register_load_state_dict_pre_hook(_read_upstream_keys)
        fused.register_load_state_dict_post_hook(_report_upstream_keys)


def _rename_keys(state_dict: dict, keys: list[str], prefix: str, renames) -> None:
    """Rename, in place and in order, those of `keys` that read `prefix + old + "." + rest` in
    `state_dict` to `prefix + new + "." + rest`, for each (old, new) of `renames`."""
    mapping = {prefix + old + ".": prefix + new + "." for old, new in renames}
    for key in keys:
        old = next((o for o in mapping if key.startswith(o)), None)
        if old is not None:
            state_dict[mapping[old] + key[len(old):]] = state_dict.pop(key)


def _write_upstream_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # Runs right after the module wrote its entries, the last ones of state_dict: only those are
    # looked at, and renaming them by pop-and-insert keeps the model's key order.
    own = list(itertools.takewhile(lambda key: key.startswith(prefix), reversed(state_dict)))[::-1]
    _rename_keys(state_dict, own, prefix, getattr(module, ORIGIN_ATTRIBUTE).renamed)


def _read_upstream_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs: list[str]) -> None:
    # Upstream keys ("0.weight") are read as the fused module's ("conv.weight"), whose own keys
    # load too. state_dict holds this module's entries only (load_state_dict hands each module
    # its share).
    renames = [(new, old) for old, new in getattr(module, ORIGIN_ATTRIBUTE).renamed]
    _rename_keys(state_dict, list(state_dict), prefix, renames)
    module.__dict__[_LOAD_PREFIX] = prefix, error_msgs, len(error_msgs)  # for _report_upstream_keys


def _report_upstream_keys(module: nn.Module, incompatible_keys) -> None:
    # Missing keys and the children's error messages ("size mismatch for 0.weight") name the
    # keys state_dict() writes ("0.weight"), not the fused module's own ("conv.weight"), which
    # neither the checkpoint nor state_dict() holds.
    loading = module.__dict__.pop(_LOAD_PREFIX, None)
    if loading is None:
        return
    prefix, error_msgs, start = loading
    renames = getattr(module, ORIGIN_ATTRIBUTE).renamed
    keys = incompatible_keys.missing_keys
    renamed = dict.fromkeys(keys)
    _rename_keys(renamed, keys, prefix, renames)
    keys[:] = list(renamed)
    for old, new in renames:  # a key in a message, not the tail of another ("blocks.0.conv.")
        fused_key = re.compile(rf"(?<![\w.]){re.escape(prefix + old)}\.")
        error_msgs[start:] = [fused_key.sub(f"{prefix}{new}.", message) for message in error_msgs[start:]]


# --- converters -------------------------------------------------------------------------------

def fuse_conv_bn_act(conv: nn.Module, bn: nn.Module, act: nn.Module) -> ConvBNAct | str:
    """A ConvBNAct holding these very modules, or why its kernels cannot compute them (the
    reasons its forward would fall back for)."""
    reason = conv_reason(conv, "conv") or batch_norm_reason(bn, "bn") or checks.kernel_activation(act)[1]
    if reason:
        return reason
    with torch.device("meta"):  # the constructor's own conv and bn are replaced at once
        fused = ConvBNAct(conv.in_channels, conv.out_channels)
    fused.conv, fused.bn, fused.act = conv, bn, act
    return fused


def _fuse_conv_bn_act_module(module: nn.Module) -> ConvBNAct | str:
    """A module with submodules conv, bn, act computing act(bn(conv(x))): ultralytics' Conv,
    csp_kernels.reference.ConvBNAct."""
    if "forward" in vars(module):
        return ("its forward is replaced on the instance (ultralytics' fuse() folds bn into conv and runs "
                "forward_fuse)")
    return _bypass_reason(module) or fuse_conv_bn_act(module.conv, module.bn, module.act)


# timm's synchronized BatchNormAct2d (timm.layers.convert_sync_batchnorm makes it): its forward
# is nn.SyncBatchNorm's, then `drop` and `act`.
_TIMM_SYNC_NORM = ("timm.layers.norm_act", "SyncBatchNormAct")


def _fuse_timm_conv_norm_act(module: nn.Module) -> ConvBNAct | str:
    norm = module.bn
    synchronized = class_key(type(norm)) == _TIMM_SYNC_NORM
    if class_key(type(norm)) != ("timm.layers.norm_act", "BatchNormAct2d") and not synchronized:
        return (f"bn is {type(norm).__qualname__} (the fused kernels compute timm's BatchNormAct2d and, after "
                "timm's convert_sync_batchnorm, SyncBatchNormAct)")
    if type(norm.drop) is not nn.Identity:
        return f"bn.drop is {norm.drop!r} (the fused kernels have no dropout between BatchNorm and activation)"
    aa = getattr(module, "aa", None)  # as ConvNormAct.forward reads it
    if aa is not None:
        return f"aa is {type(aa).__qualname__} (the fused kernels have no anti-aliasing after the activation)"
    bn = (batch_norm_sharing(norm, nn.SyncBatchNorm, process_group=norm.process_group) if synchronized
          else batch_norm_sharing(norm, nn.BatchNorm2d))
    return _bypass_reason(module) or _bypass_reason(norm, "bn") or fuse_conv_bn_act(module.conv, bn, norm.act)


def _fuse_conv_norm_sequential(module: nn.Module) -> ConvBNAct | str:
    """torchvision's Conv2dNormActivation: conv, norm and (unless activation_layer=None) act."""
    layers = list(module)
    # Without a norm layer (norm_layer=None) the second layer is the activation, if any.
    if len(layers) < 2 or "Norm" not in type(layers[1]).__qualname__:
        return "it has no BatchNorm (norm_layer=None)"
    if not isinstance(layers[1], nn.modules.batchnorm._BatchNorm):
        return f"its norm layer is {type(layers[1]).__qualname__} (the fused kernels compute nn.BatchNorm2d)"
    act = layers[2] if len(layers) == 3 else nn.Identity()
    return _bypass_reason(module) or fuse_conv_bn_act(layers[0], layers[1], act)


def _fuse_plain_sequential(module: nn.Sequential) -> ConvBNAct | str | None:
    layers = list(module)
    is_unit = (len(layers) == 3 and isinstance(layers[0], nn.Conv2d)
               and isinstance(layers[1], nn.modules.batchnorm._BatchNorm) and not list(layers[2].children()))
    return _fuse_conv_norm_sequential(module) if is_unit else None


def _unfuse_conv(fused: ConvBNAct, origin: Origin) -> nn.Module:
    return _bare(origin.cls, conv=fused.conv, bn=fused.bn, act=fused.act)


def _unfuse_timm_conv_norm_act(fused: ConvBNAct, origin: Origin) -> nn.Module:
    """timm's ConvNormAct, its norm + activation one module again: the BatchNormAct2d (or
    SyncBatchNormAct, FrozenBatchNormAct2d) that timm makes of the fused module's bn and act."""
    norm_act = importlib.import_module("timm.layers.norm_act")
    bn = fused.bn
    if isinstance(bn, nn.SyncBatchNorm):  # synchronized after conversion, or before it by timm
        norm = batch_norm_sharing(bn, norm_act.SyncBatchNormAct, process_group=bn.process_group)
        norm.drop = nn.Identity()
    elif isinstance(bn, nn.BatchNorm2d):
        norm = batch_norm_sharing(bn, norm_act.BatchNormAct2d, apply_act=False)
    elif class_key(type(bn)) == _FROZEN_BATCH_NORM:  # timm's freeze_batch_norm_2d, after conversion
        norm = norm_act.FrozenBatchNormAct2d(bn.num_features, eps=bn.eps, apply_act=False, device="meta")
        for name, tensor in bn.named_buffers(recurse=False):
            setattr(norm, name, tensor)
    else:
        raise TypeError(f"csp_kernels.revert: a ConvBNAct converted from timm's ConvNormAct holds a bn of type "
                        f"{type(bn).__name__}, which timm's norm + activation modules (BatchNormAct2d, "
                        "SyncBatchNormAct, FrozenBatchNormAct2d) cannot hold; put a BatchNorm2d back first")
    norm.act = fused.act
    return _bare(origin.cls, conv=fused.conv, bn=norm)


# torchvision's FrozenBatchNorm2d, which timm's freeze_batch_norm_2d puts in for a BatchNorm2d.
_FROZEN_BATCH_NORM = ("torchvision.ops.misc", "FrozenBatchNorm2d")


def _unfuse_sequential(fused: ConvBNAct, origin: Origin) -> nn.Module:
    """The nn.Sequential (or torchvision's) of conv, bn and, where upstream had one or one was set
    on the fused module since, act, under upstream's names ("0", "1", "2" or its own)."""
    names = dict(origin.children or origin.renamed)  # (a pickle from before `children`: the renamed ones)
    layers = [("conv", fused.conv), ("bn", fused.bn)]
    if "act" in names or type(fused.act) is not nn.Identity:  # an act set on the fused module is kept
        layers.append(("act", fused.act))
    return _bare(origin.cls, **{names.get(name, str(i)): layer for i, (name, layer) in enumerate(layers)})


# CSP stages: the csp_kernels.nn.stages twins, built around the upstream stage's own children as
# converted. A stage is swapped when every child its buffered forward writes through `out=` (its
# "writers", as each twin's forward lists them for `_reference_reason`) is of the fused class: the
# other children are called as plain modules, so a left one (a GELU Conv as a C3's cv1) still
# computes what upstream's forward does.

Writers = list[tuple[str, nn.Module, tuple[type, ...]]]  # (name, child, the fused classes it must be)


@dataclasses.dataclass(frozen=True)
class _Stage:
    """twin: the fused class; children: the upstream stage's submodules, in its order; writers:
    what the twin's forward writes through; attributes: the plain attributes the twin's forward
    reads; blocks: the submodule (a sequence of blocks) of which the twin's forward needs at least
    one; identities: submodules that the twin has no place for and that must be nn.Identity (timm's
    attn and drop_path: another module there computes something the twin does not)."""

    twin: type
    children: tuple[str, ...]
    writers: Callable[[nn.Module], Writers]
    attributes: tuple[str, ...] = ()
    blocks: str = ""
    identities: tuple[str, ...] = ()

    def without_identities(self) -> _Stage:
        """The spec of the reference twin, which has the fused twin's submodules only."""
        return dataclasses.replace(self, children=tuple(c for c in self.children if c not in self.identities),
                                   identities=())


def _conv_writers(module: nn.Module, *names: str) -> Writers:
    return [(name, getattr(module, name), (ConvBNAct,)) for name in names]


def _last_block(module: nn.Module, sequence: str, kinds: tuple[type, ...]) -> Writers:
    blocks = getattr(module, sequence)
    return [(f"{sequence}.{len(blocks) - 1}", blocks[-1], kinds)]


def _c2f_writers(module: nn.Module) -> Writers:
    # C3k: the blocks of a C3k2 (a C2f's forward)
    return _conv_writers(module, "cv1", "cv2") + [
        (f"m.{i}", block, (stages.Bottleneck, stages.C3k)) for i, block in enumerate(module.m)]


def _c3_writers(module: nn.Module) -> Writers:
    return _conv_writers(module, "cv2", "cv3") + _last_block(module, "m", (stages.Bottleneck,))


def _cross_stage3_writers(module: nn.Module) -> Writers:
    return _conv_writers(module, "conv_exp", "conv_transition") + _last_block(module, "blocks", _TIMM_BLOCKS)


_TIMM_BLOCKS = (stages.BottleneckBlock, stages.DarkBlock)
_C2F = _Stage(stages.C2f, ("cv1", "cv2", "m"), _c2f_writers, attributes=("c",))
_C3 = _Stage(stages.C3, ("cv1", "cv2", "cv3", "m"), _c3_writers, blocks="m")
_STAGES = {
    "ultralytics.nn.modules.block": {
        "Bottleneck": _Stage(stages.Bottleneck, ("cv1", "cv2"), lambda m: _conv_writers(m, "cv2"),
                             attributes=("add",)),
        "C2f": _C2F,
        "C3": _C3,
        "C3k": dataclasses.replace(_C3, twin=stages.C3k),
        # C3k2(attn=True) has nn.Sequential(Bottleneck, PSABlock) blocks, which the twin cannot write through: left
        "C3k2": dataclasses.replace(_C2F, twin=stages.C3k2),
    },
    "timm.models.cspnet": {
        "BottleneckBlock": _Stage(stages.BottleneckBlock,
                                  ("conv1", "conv2", "attn2", "conv3", "attn3", "drop_path", "act3"),
                                  lambda m: _conv_writers(m, "conv3"), identities=("attn2", "attn3", "drop_path")),
        "DarkBlock": _Stage(stages.DarkBlock, ("conv1", "attn", "conv2", "drop_path"),
                            lambda m: _conv_writers(m, "conv2"), identities=("attn", "drop_path")),
        "CrossStage": _Stage(stages.CrossStage, ("conv_down", "conv_exp", "blocks", "conv_transition_b",
                                                 "conv_transition"),
                             lambda m: _conv_writers(m, "conv_exp", "conv_transition_b", "conv_transition"),
                             attributes=("expand_chs",), blocks="blocks"),
        # Without downsampling timm's CrossStage3 has conv_down None (its forward fails): left.
        "CrossStage3": _Stage(stages.CrossStage3, ("conv_down", "conv_exp", "blocks", "conv_transition"),
                              _cross_stage3_writers, attributes=("expand_chs",), blocks="blocks"),
        "DarkStage": _Stage(stages.DarkStage, ("conv_down", "blocks"),
                            lambda m: _last_block(m, "blocks", _TIMM_BLOCKS), blocks="blocks"),
    },
}
# The reference twins (csp_kernels.reference) convert as upstream's classes do.
_STAGES.update({twin_module: {name: spec.without_identities() for name, spec in _STAGES[upstream].items()}
                for twin_module, upstream in [(reference.C2f.__module__, "ultralytics.nn.modules.block"),
                                              (reference.CrossStage.__module__, "timm.models.cspnet")]})


def _fuse_stage(spec: _Stage, module: nn.Module) -> nn.Module | str:
    """The twin holding module's (converted) children and attributes, or why it cannot."""
    if "forward" in vars(module):
        return "its forward is replaced on the instance"
    twin, children = spec.twin.__name__, module._modules
    missing = [name for name in spec.children if children.get(name) is None]
    if missing:
        return f"it has no submodule {', '.join(missing)} (the fused {twin} calls {', '.join(spec.children)})"
    extra = [name for name in children if name not in spec.children]
    if extra:
        return f"it has submodules {', '.join(extra)} that the fused {twin} would not run"
    for name in spec.identities:
        if type(children[name]) is not nn.Identity:
            return f"{name} is {type(children[name]).__qualname__} (the fused {twin} has no {name})"
    if spec.blocks and not len(children[spec.blocks]):
        return f"{spec.blocks} is empty (the fused {twin} runs at least one block)"
    for name, child, kinds in spec.writers(module):
        if type(child) not in kinds:
            expected = " or ".join(f"csp_kernels {kind.__name__}" for kind in kinds)
            return (f"{name} is {type(child).__qualname__}, not fused (the fused {twin} writes {name}'s output into "
                    f"its buffer through {expected})")
    if reason := _bypass_reason(module):
        return reason
    fused = _bare(spec.twin, **{name: children[name] for name in spec.children if name not in spec.identities})
    for attribute in spec.attributes:
        setattr(fused, attribute, getattr(module, attribute))
    return fused


def _unfuse_stage(spec: _Stage, fused: nn.Module, origin: Origin) -> nn.Module:
    # The attributes the twin reads come back with upstream's other plain attributes (revert sets them).
    return _bare(origin.cls, **{name: nn.Identity() if name in spec.identities else getattr(fused, name)
                                for name in spec.children})


# torchvision's DenseNet block: a fused DenseBlock holding the _DenseLayers themselves, so that a
# fallback to the reference math runs torchvision's own layer forward (its dropout and
# memory_efficient checkpointing included) and revert puts the same layers back.

def _fuse_dense_block(module: nn.Module) -> DenseBlock | str:
    """The DenseBlock holding module's layers, or why the fused op cannot compute them (the
    reasons its forward would fall back for, in any mode: drop_rate > 0 and memory_efficient
    too)."""
    if "forward" in vars(module):
        return "its forward is replaced on the instance"
    layers = dict(module.named_children())
    if not layers or list(layers) != [f"denselayer{j + 1}" for j in range(len(layers))]:
        return f"its children are {', '.join(layers) or 'none'} (the fused DenseBlock runs denselayer1..N)"
    for name, layer in layers.items():
        if reason := dense_layer_reason(layer, name):
            return reason
    first = layers["denselayer1"]
    with torch.device("meta"):  # the constructor's own layers are replaced at once
        fused = DenseBlock(first.conv1.in_channels, len(layers), first.conv2.out_channels)
    for name, layer in layers.items():
        setattr(fused, name, layer)
    return _bypass_reason(module) or fused.fusion_reason() or fused


def _unfuse_dense_block(fused: DenseBlock, origin: Origin) -> nn.Module:
    return _bare(origin.cls, **dict(fused.named_children()))


def _fuse_max_pool(module: nn.MaxPool2d) -> nn.Module | str:
    return _bypass_reason(module) or pooling.MaxPool2d(module.kernel_size, module.stride, module.padding,
                                                     module.dilation, module.return_indices, module.ceil_mode)


def _unfuse_max_pool(fused: pooling.MaxPool2d, origin: Origin) -> nn.Module:
    return origin.cls(fused.kernel_size, fused.stride, fused.padding, fused.dilation, fused.return_indices,
                      fused.ceil_mode)


CONVERTERS: dict[tuple[str, str], Converter] = {
    ("ultralytics.nn.modules.conv", "Conv"): Converter(_fuse_conv_bn_act_module, _unfuse_conv),
    ("ultralytics.nn.modules.conv", "DWConv"): Converter(_fuse_conv_bn_act_module, _unfuse_conv),  # Conv's forward
    ("timm.layers.conv_bn_act", "ConvNormAct"): Converter(_fuse_timm_conv_norm_act, _unfuse_timm_conv_norm_act),
    ("torchvision.ops.misc", "Conv2dNormActivation"): Converter(_fuse_conv_norm_sequential, _unfuse_sequential),
    ("torch.nn.modules.container", "Sequential"): Converter(_fuse_plain_sequential, _unfuse_sequential),
    ("torchvision.models.densenet", "_DenseBlock"): Converter(_fuse_dense_block, _unfuse_dense_block),
    # Saves its input's recipe where the input has one (a stem's pool): the same op otherwise.
    ("torch.nn.modules.pooling", "MaxPool2d"): Converter(_fuse_max_pool, _unfuse_max_pool),
    class_key(reference.ConvBNAct): Converter(_fuse_conv_bn_act_module, _unfuse_conv),  # the same conv, bn, act
    **{(module, name): Converter(functools.partial(_fuse_stage, spec), functools.partial(_unfuse_stage, spec),
                                 children_first=True)
       for module, specs in _STAGES.items() for name, spec in specs.items()},
}


# --- helpers ----------------------------------------------------------------------------------

def batch_norm_sharing(bn: nn.modules.batchnorm._BatchNorm, cls: type, **kwargs) -> nn.Module:
    """A `cls` (nn.BatchNorm2d, nn.SyncBatchNorm, or a subclass such as timm's BatchNormAct2d;
    `kwargs` go to its constructor) with `bn`'s hyper-parameters and mode, holding `bn`'s
    Parameter and buffer tensors themselves."""
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats, device="meta", **kwargs)
    for name, tensor in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
        setattr(new, name, tensor)
    return new.train(bn.training)


def _bare(cls: type, **children: nn.Module) -> nn.Module:
    """An instance of the upstream class `cls` holding `children`, made without its __init__,
    which would allocate the weights the children already hold."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, child in children.items():
        module.add_module(name, child)
    return module


def _bypass_reason(module: nn.Module, name: str = "") -> str:
    return checks.bypass_reason(module, name or "it", "the fused module would not run it")


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _display(name: str) -> str:
    return name or "(the model itself)"


def _format_counter(counter: collections.Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common())


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Lines of a left-aligned text table (the last column unpadded)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in [header, *rows]]

"""Activations rebuilt in backward instead of saved twice (the InPlace-ABN idea, by recomputation).

A training ConvBNAct computes z = conv(x), y = act(z * scale + shift) and saves z for its own
backward. The next convolution that reads y saves y as its input: a second activation-sized
tensor for what z, two per-channel vectors and the activation already determine. Here:

  - every fused training ConvBNAct tags its output y with a `Recipe` (`tag`): how to rebuild y
    from the producer's own saved z and batch statistics;
  - every fused training ConvBNAct runs its op under `saving_recipes()`, a saved-tensors hook
    whose pack stores the recipe of a tagged input instead of the input, and whose unpack
    rebuilds it in backward (one `scale_shift_act` pass per term: the kernel that wrote y, on
    the same values, so the rebuilt tensor is y);
  - the fused stages tag what they assemble: a concat buffer (`concat`: its slots' recipes side
    by side), a channel slice of it (`narrow`), a residual sum (`add`: the terms of both, summed
    in the forward's order), an activation of a residual sum (`activated`: a piece whose sum is
    activated in place, and which enters the next block's sum as one term, a `Part`);
  - a recipe saved more than once (a block's output, read by its activation's backward and the
    next block's conv1) is rebuilt at its first unpack in a backward and kept until its last.

Saved for a chain of ConvBNActs: one activation per unit (z) instead of two (z and the next
unit's input). A unit whose input is a small fraction of its conv output and cheap to convolve
again (a network's stem on the image) saves neither: its z is a `ConvOutput`, recomputed from
x by the forward's kernel where its own backward or a recipe needs it; so is the z of an
expanding 1x1 (z at least twice x, as CSP stages' conv_exp and BottleneckBlock's conv3) whose
input is itself rebuilt from a recipe: its GEMM runs again in backward. A recipe holds no new
activation-sized tensor: the z's it names are saved by their producers anyway (their storage
counted once), and the per-channel vectors are tiny.

A tag is valid while its tensor is unchanged: it records the tensor's version counter, and an
in-place write (a residual add, a later write into the buffer) retires it; the stage then tags
the result anew. A recipe rebuilds with at most `MAX_TERMS` terms per channel, nested ones
counted: a long residual chain (o_k = o_{k-1} + a_k, or act(o_{k-1} + a_k)) is saved as a tensor
again rather than rebuilt in O(k) passes. Its
BatchNorm weight and bias are checked, as autograd checks saved tensors, to be unmodified in
place when it is rebuilt. The tag holds its recipe strongly until the first pack, weakly after,
so a tensor that outlives the graph (a returned feature map a caller keeps) does not keep the
producer's z alive. Not under torch.compile (which plans its own saved tensors; the tags are
Python-side records it does not trace) nor for synchronized BatchNorms (their statistics are a
collective's, not a recipe's yet).

Tests: tests/test_recompute.py; benchmarks: the stages' and models' saved bytes and peak memory.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..backend import transform_reason
from ..checks import parse_activation
from .batch_norm_act import batch_scale_shift, scale_shift_act
from .conv import run_conv
from .conv1x1 import conv1x1_fused

# Terms summed per channel at most: a rebuild costs one pass per term, and a residual chain's
# k-th output would otherwise take k + 1.
MAX_TERMS = 3


def _modified_in_place(what: str) -> RuntimeError:
    """Autograd's error for a saved tensor modified in place, for `what` a recipe reads."""
    return RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                        f"operation: {what} of a csp_kernels ConvBNAct, between its forward and backward")


class ConvOutput:
    """A conv output recomputed where it is needed instead of saved: conv(x, weight) by the
    kernel that computed it in the forward (the same values), for a training ConvBNAct whose
    conv is cheap to run again for the memory it spares (`routing.recomputed_conv_kernel`): a
    network's stem on the image, or an expanding 1x1 whose input is rebuilt from its recipe.
    Holds weight and x, or where x is saved as its recipe a weak reference to that recipe (the
    op's saved x keeps it alive until the op's backward), and raises as autograd does if the
    weight or a held x was modified in place since. Computed once for the recipes that rebuild
    the unit's output (whose backward comes first) and its own backward, which releases it: on
    a 3-channel input the conv is slow for its size (22 ms for cspdarknet53's stem at
    4x3x256x256)."""
    __slots__ = ("x", "weight", "conv_args", "kernel", "versions", "_z")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, conv_args: tuple, kernel: str,
                 recipe: Recipe | None):
        """recipe: x's, where the op saves x as it (`rebuilt_recipe`), else None."""
        self.x = x.detach() if recipe is None else weakref.ref(recipe.packed())  # read as one more save
        self.weight, self.conv_args, self.kernel = weight.detach(), conv_args, kernel
        self.versions = (x._version if recipe is None else None, weight._version)
        self._z = None

    def compute(self) -> torch.Tensor:
        held = self.x if isinstance(self.x, torch.Tensor) else None
        if (None if held is None else held._version, self.weight._version) != self.versions:
            raise _modified_in_place("the input or conv weight")
        if self._z is None:
            x = held if held is not None else _alive(self.x())
            if self.kernel == "gemm":  # the training forward's GEMM (`ops.transition._batch_stats_conv`)
                self._z = conv1x1_fused(x, self.weight)
            else:
                self._z = run_conv(self.kernel, x, self.weight, *self.conv_args)
        return self._z

    def release(self) -> None:
        """Drops the computed z (the unit's own backward has run)."""
        self._z = None


def _alive(recipe: Recipe | None) -> torch.Tensor:
    if recipe is None:
        raise RuntimeError("a csp_kernels ConvBNAct's conv output was needed after its backward freed its saved "
                           "input; run backward with retain_graph=True to backward through the graph again")
    return recipe.unpacked()


class Activation(NamedTuple):
    """act(z[:, start:start + channels] * scale + shift), with (scale, shift) from BatchNorm's
    batch statistics (mean, var) and its affine (weight, bias, eps): what a training ConvBNAct
    wrote, its conv output z saved or recomputed (`ConvOutput`). `versions` are weight's and
    bias's version counters when it wrote."""
    z: torch.Tensor | ConvOutput
    start: int
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    act: str
    versions: tuple[int, int]

    def shifted(self, offset: int) -> Activation:
        return self._replace(start=self.start + offset)


class Part(NamedTuple):
    """Channels [start, start + channels) of what `recipe` rebuilds, as a term of a piece of
    `channels` channels: a term rebuilt by a recipe of its own (a residual block's output that
    the next block's sum adds, see `activated`)."""
    recipe: Recipe
    start: int

    def shifted(self, offset: int) -> Part:
        return self._replace(start=self.start + offset)


class Piece(NamedTuple):
    """Channels [start, start + channels) of the rebuilt tensor: the sum of `terms`, in order,
    then `act` in place ("identity", "relu" or "leaky_relu[:<slope>]": a residual block's
    activation of its sum, as `activate_` computes it)."""
    start: int
    channels: int
    terms: tuple[Activation | Part, ...]
    act: str = "identity"


class Recipe:
    """How to rebuild an (batch, channels, height, width) tensor: its pieces, covering every
    channel once, in channel order."""
    __slots__ = ("shape", "pieces", "_packs", "_pending", "_value", "__weakref__")

    def __init__(self, shape: tuple[int, ...], pieces: tuple[Piece, ...]):
        self.shape, self.pieces = tuple(shape), pieces
        self._packs, self._pending, self._value = 0, 0, None

    def packed(self) -> Recipe:
        """Counts a save of the tensor as this recipe (`saving_recipes`' pack)."""
        self._packs += 1
        return self

    def unpacked(self) -> torch.Tensor:
        """The rebuilt tensor for one of the saves: rebuilt at the first unpack of a backward
        and kept for the others (a block's output is read by its own activation's backward and
        the next block's conv1, one after the other), dropped at the last."""
        value = self.rebuild() if self._value is None else self._value
        self._pending = (self._pending or self._packs) - 1
        self._value = value if self._pending else None
        return value

    def rebuild(self) -> torch.Tensor:
        out = None
        for piece in self.pieces:
            for i, term in enumerate(piece.terms):
                if isinstance(term, Part):  # a rebuilt tensor, added (or copied) in
                    source = narrow(term.recipe, term.start, term.start + piece.channels).rebuild()
                else:  # a conv output, whose BN + act the first term writes in place
                    source = term.z.compute() if isinstance(term.z, ConvOutput) else term.z
                out = source.new_empty(self.shape) if out is None else out
                target = out[:, piece.start:piece.start + piece.channels]
                if isinstance(term, Part):
                    target.add_(source) if i else target.copy_(source)
                elif i:
                    target.add_(_evaluate(term, source, piece.channels, None))
                else:
                    _evaluate(term, source, piece.channels, target)
            if piece.act != "identity":
                activate_(out[:, piece.start:piece.start + piece.channels], piece.act)
        return out


def _evaluate(term: Activation, z: torch.Tensor, channels: int, out: torch.Tensor | None) -> torch.Tensor:
    if (term.weight._version, term.bias._version) != term.versions:
        raise _modified_in_place("a BatchNorm weight or bias")
    scale, shift = batch_scale_shift(term.mean, term.var, term.weight, term.bias, term.eps)
    stop = term.start + channels
    return scale_shift_act(z[:, term.start:stop], scale[term.start:stop], shift[term.start:stop], term.act,
                           out=out)


def activate_(t: torch.Tensor, act: str) -> torch.Tensor:
    """act(t) in t's memory, for the activations whose gradient reads their output ("relu",
    "leaky_relu[:<slope>]" with a slope >= 0), by the functions a block's forward calls."""
    name, slope = parse_activation(act)
    return torch.relu_(t) if name == "relu" else F.leaky_relu_(t, slope)


def activation_backward(grad: torch.Tensor, y: torch.Tensor, act: str) -> torch.Tensor:
    """The gradient of `activate_` from its output y, as autograd computes it for relu_ and
    leaky_relu_."""
    name, slope = parse_activation(act)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, y, 0)
    return torch.ops.aten.leaky_relu_backward(grad, y, slope, True)


def activation(z: torch.Tensor | ConvOutput, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, shape: tuple[int, ...], eps: float, act: str) -> Recipe:
    """The recipe of y = act(BN(z)) with batch statistics (mean, var): z (batch, channels,
    height, width) of `shape`, saved or recomputed, the rest (channels,)."""
    term = Activation(z, 0, mean, var, weight, bias, eps, act, (weight._version, bias._version))
    return Recipe(shape, (Piece(0, shape[1], (term,)),))


def narrow(recipe: Recipe | None, start: int, stop: int) -> Recipe | None:
    """The recipe of channels [start, stop) of what `recipe` rebuilds."""
    if recipe is None:
        return None
    pieces = []
    for piece in recipe.pieces:
        lo, hi = max(start, piece.start), min(stop, piece.start + piece.channels)
        if lo < hi:
            offset = lo - piece.start
            pieces.append(Piece(lo - start, hi - lo, tuple(t.shifted(offset) for t in piece.terms), piece.act))
    return Recipe((recipe.shape[0], stop - start, *recipe.shape[2:]), tuple(pieces))


def concat(recipes: list[Recipe | None]) -> Recipe | None:
    """The recipe of torch.cat(tensors, dim=1) from theirs (None if any is None)."""
    if not recipes or any(r is None for r in recipes):
        return None
    pieces, offset = [], 0
    for recipe in recipes:
        pieces += [p._replace(start=p.start + offset) for p in recipe.pieces]
        offset += recipe.shape[1]
    return Recipe((recipes[0].shape[0], offset, *recipes[0].shape[2:]), tuple(pieces))


def add(a: Recipe | None, b: Recipe | None) -> Recipe | None:
    """The recipe of a + b (a's terms first, as `a.add_(b)` or `b.add_(a)` rounds the same), or
    None where a channel would cost more than MAX_TERMS terms to rebuild."""
    if a is None or b is None or a.shape != b.shape:
        return None
    bounds = sorted({p.start for p in a.pieces} | {p.start for p in b.pieces} | {a.shape[1]})
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        terms = _summands(a, lo, hi) + _summands(b, lo, hi)
        if sum(map(_cost, terms)) > MAX_TERMS:
            return None
        pieces.append(Piece(lo, hi - lo, terms))
    return Recipe(a.shape, tuple(pieces))


def activated(recipe: Recipe | None, act: str) -> Recipe | None:
    """The recipe of `activate_(t, act)` for t that `recipe` rebuilds."""
    if recipe is None:
        return None
    return Recipe(recipe.shape, tuple(
        piece._replace(act=act) if piece.act == "identity" else Piece(piece.start, piece.channels,
                                                                      (Part(recipe, piece.start),), act)
        for piece in recipe.pieces))


def _summands(recipe: Recipe, lo: int, hi: int) -> tuple[Activation | Part, ...]:
    """Channels [lo, hi) of what `recipe` rebuilds (one piece there) as terms of a sum."""
    piece = narrow(recipe, lo, hi).pieces[0]
    return piece.terms if piece.act == "identity" else (Part(recipe, lo),)


def _cost(term: Activation | Part) -> int:
    """The terms rebuilding `term` evaluates per channel, nested ones included (for a Part, the
    most over its recipe's channels)."""
    if isinstance(term, Activation):
        return 1
    return max(sum(map(_cost, p.terms)) for p in term.recipe.pieces)


class _Tag:
    __slots__ = ("recipe", "weak", "version")

    def __init__(self, recipe: Recipe, version: int):
        self.recipe, self.weak, self.version = recipe, None, version

    def get(self) -> Recipe | None:
        return self.recipe if self.weak is None else self.weak()

    def weaken(self) -> None:
        """From the first pack on the packed recipe holds it; the tag only points at it."""
        if self.weak is None:
            self.weak, self.recipe = weakref.ref(self.recipe), None


# The tags, by id of the tagged tensor: (a weak reference to it, its _Tag). Beside the tensors,
# not in their __dict__, which torch.save, pickle and deepcopy of a tensor carry along (a
# recipe's z's written into the file; a weakened tag, which pickle refuses). An entry goes
# when its tensor does (the reference's callback).
_TAGS: dict[int, tuple[weakref.ref, _Tag]] = {}


def _untag_on_free(key: int):
    def untag(ref: weakref.ref) -> None:
        entry = _TAGS.get(key)
        if entry is not None and entry[0] is ref:  # not a later tensor's, under a reused id
            del _TAGS[key]
    return untag


def tag(t: torch.Tensor, recipe: Recipe | None) -> torch.Tensor:
    """Marks t as rebuilt by `recipe` (None: not rebuildable) while unchanged; returns t."""
    key = id(t)
    if recipe is not None and tuple(t.shape) == recipe.shape and not torch.compiler.is_compiling():
        entry = _TAGS.get(key)
        ref = entry[0] if entry is not None and entry[0]() is t else weakref.ref(t, _untag_on_free(key))
        _TAGS[key] = ref, _Tag(recipe, t._version)
    elif (entry := _TAGS.get(key)) is not None and entry[0]() is t:
        del _TAGS[key]
    return t


def _valid_tag(t: torch.Tensor) -> _Tag | None:
    entry = _TAGS.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    tag_ = entry[1]
    return tag_ if tag_.version == t._version and tag_.get() is not None else None


def recipe_of(t: torch.Tensor) -> Recipe | None:
    """t's recipe while t is unchanged since it was tagged, else None."""
    tag_ = _valid_tag(t)
    return None if tag_ is None else tag_.get()


class _Saved(NamedTuple):
    """A tensor saved as itself: detached (an op's own output would otherwise hold its grad_fn, a
    cycle through the graph), with its version, which autograd checks for a saved tensor
    without hooks but not for one a hook packed."""
    value: object  # the tensor, or what an outer hook packed it as
    detached: torch.Tensor
    version: int


class _SavedRecipe(NamedTuple):
    """A tensor saved as its recipe, with a weak reference to the tensor and its version: an
    in-place write into it after the save raises in backward, as autograd's check of a saved
    tensor does (the recipe would rebuild the value from before the write)."""
    recipe: Recipe
    tensor: weakref.ref
    version: int


def _check_version(t: torch.Tensor, version: int) -> None:
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"[{t.type()} {list(t.shape)}] is at version {t._version}; expected version {version} instead (saved "
            "by a csp_kernels module)")


def _hooks(outer_pack, outer_unpack):
    def pack(t: torch.Tensor):
        tag_ = _valid_tag(t)
        if tag_ is not None:
            recipe = tag_.get()
            tag_.weaken()
            return _SavedRecipe(recipe.packed(), weakref.ref(t), t._version)
        detached = t.detach() if t.requires_grad else t  # (no grad_fn to cut: a detach would cost a call)
        return _Saved(outer_pack(t) if outer_pack else detached, detached, t._version)

    def unpack(packed):
        if isinstance(packed, _SavedRecipe):
            if (t := packed.tensor()) is not None:  # a tensor gone since can have no write to see
                _check_version(t, packed.version)
            return packed.recipe.unpacked()
        _check_version(packed.detached, packed.version)
        return outer_unpack(packed.value) if outer_unpack else packed.value

    pack.saves_recipes = True
    return pack, unpack


_PLAIN_HOOKS = _hooks(None, None)


def saving_recipes() -> contextlib.AbstractContextManager:
    """Within: autograd saves a tagged, unchanged tensor as its recipe (rebuilt in backward).

    Under another saved-tensors hook (torch.utils.checkpoint, save_on_cpu, a caller's own) the
    outer hook decides what is saved and no recipe is used: a recipe keeps its z's where they
    are, which would defeat an outer hook that moves or drops them. An outer hook whose owner
    declares `recipe_transparent` (profiling.SavedTensorsMeter, which only counts) still sees
    every tensor saved as itself; a recipe's z's it saw when their producers saved them."""
    if torch.compiler.is_compiling() or transform_reason():  # torch.func refuses saved-tensors hooks
        return contextlib.nullcontext()
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if outer is None:
        return torch.autograd.graph.saved_tensors_hooks(*_PLAIN_HOOKS)
    if _recipe_transparent(outer):
        return torch.autograd.graph.saved_tensors_hooks(*_hooks(*outer))
    return contextlib.nullcontext()


def _recipe_transparent(hooks: tuple) -> bool:
    """Whether the saved-tensors hooks (pack, unpack) belong to an owner that only counts what
    is saved (`recipe_transparent`: profiling.SavedTensorsMeter)."""
    return getattr(getattr(hooks[0], "__self__", None), "recipe_transparent", False)


def rebuilt_recipe(t: torch.Tensor) -> Recipe | None:
    """The recipe autograd would save for t now (rebuilt in backward), or None (t saved as
    itself): t is tagged and unchanged, and no saved-tensors hook is active but
    `saving_recipes()`'s or a recipe-transparent one, nor a torch.compile trace."""
    if torch.compiler.is_compiling():
        return None
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is None or getattr(top[0], "saves_recipes", False) or _recipe_transparent(top):
        return recipe_of(t)
    return None

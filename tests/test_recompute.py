"""Activations rebuilt in backward (csp_kernels/ops/recompute.py): a fused ConvBNAct's input that
an earlier fused ConvBNAct (or a stage) wrote is saved as a recipe over the producer's own z.
What must hold: the rebuilt tensor is the forward's, bit for bit, so gradients are the same as
with every input saved; the saved bytes drop to one activation per unit; autograd's in-place
checks still fire; an outer saved-tensors hook (checkpoint, offloading) turns recipes off; a tensor
a caller keeps does not keep its producer's z once the graph is gone."""
import contextlib
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import csp_kernels
from csp_kernels import reference
from csp_kernels.ops import conv_choice, recompute, routing
from csp_kernels.profiling import SavedTensorsMeter, peak_cpu_memory
from helpers import rel_error
from test_stages import CASES, make_pair, run


def chain(module_ns, dtype=torch.float32) -> nn.Sequential:
    """Three ConvBNActs: 3x3 (Winograd or oneDNN), 1x1 (the GEMM), 3x3 with stride 2."""
    return nn.Sequential(module_ns.ConvBNAct(8, 16, 3, act="silu"), module_ns.ConvBNAct(16, 16, 1, act="silu"),
                         module_ns.ConvBNAct(16, 8, 3, stride=2, act="leaky_relu")).to(dtype)


def without_recipes():
    """An outer saved-tensors hook that is not recipe_transparent: every tensor saved as itself."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t)


def activation_bytes(module: nn.Module, meter: SavedTensorsMeter) -> int:
    return meter.bytes_excluding(list(module.parameters()) + list(module.buffers()))


def conv_output_bytes(ref: nn.Module, x: torch.Tensor, but: tuple[nn.Module, ...] = ()) -> int:
    """Bytes of every ConvBNAct's output in ref(x), but those of `but`: what the fused twin
    saves as z."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size()))
             for m in ref.modules() if isinstance(m, reference.ConvBNAct) and m not in but]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    return sum(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_chain_saves_one_activation_per_unit(dtype):
    fused, ref = chain(csp_kernels, dtype), chain(reference, dtype)
    x = torch.randn(4, 8, 16, 16, dtype=dtype, requires_grad=True)
    with SavedTensorsMeter() as meter:
        fused(x)
    vectors = 3 * 16 * 4 * 8  # a few per-channel vectors per unit (mean, invstd; float64 at most)
    expected = x.numel() * x.element_size() + conv_output_bytes(ref, x)
    assert expected <= activation_bytes(fused, meter) <= expected + vectors


def test_rebuilt_tensors_are_the_forward_ones():
    """recipe_of(y).rebuild() is y exactly: a fresh output, a channel slot, a residual sum."""
    unit = csp_kernels.ConvBNAct(8, 16, 3, act="silu")
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    y = unit(x)
    assert torch.equal(recompute.recipe_of(y).rebuild(), y)
    buf = torch.empty(2, 24, 10, 10)
    slot = unit(x, out=buf[:, 4:20])
    assert torch.equal(recompute.recipe_of(slot).rebuild(), buf[:, 4:20])
    block = csp_kernels.Bottleneck(16, 16, True, 1, (3, 3), 0.5)
    out = block(y)
    recipe = recompute.recipe_of(out)
    assert len(recipe.pieces[0].terms) == 2 and torch.equal(recipe.rebuild(), out)


def test_tag_retires_on_in_place_write():
    unit = csp_kernels.ConvBNAct(8, 16, 1)
    y = unit(torch.randn(2, 8, 6, 6, requires_grad=True))
    assert recompute.recipe_of(y) is not None
    y.mul_(2)
    assert recompute.recipe_of(y) is None
    with torch.no_grad():
        assert recompute.recipe_of(unit(torch.randn(2, 8, 6, 6))) is None  # nothing recorded, nothing to rebuild


@pytest.mark.parametrize("case", CASES)
def test_stage_gradients_bitwise_as_when_saved(case):
    """float32 training: outputs, gradients and running statistics with recipes are those with
    every tensor saved, bit for bit."""
    _, fused, in_channels = make_pair(case, torch.float32)
    fused.train()
    x = torch.randn(2, in_channels, 8, 8)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    with_recipes = run(fused, x)
    fused.load_state_dict(state)
    with without_recipes():
        saved = run(fused, x)
    assert len(with_recipes) == len(saved)
    for index, (a, b) in enumerate(zip(with_recipes, saved)):
        assert torch.equal(a, b), f"tensor {index}"


@pytest.mark.parametrize("stage", ["C3k2", "CrossStage"])
def test_stage_saves_input_and_conv_outputs(stage):
    """C3k2 (two Bottlenecks) and a CrossStage of two DarkBlocks save x and each ConvBNAct's z
    but conv_exp's (16 -> 32 channels, 1x1, on conv_down's output: recomputed); every concat
    slot and block input is rebuilt (within MAX_TERMS terms)."""
    if stage == "C3k2":
        ref = reference.C3k2(16, 32, 2, False, 0.5)
        x = torch.randn(2, 16, 12, 12)
    else:
        ref = reference.CrossStage(16, 32, stride=2, dilation=1, depth=2, block_ratio=0.5, bottle_ratio=1.0,
                                   expand_ratio=1.0, block_fn=reference.DarkBlock, act_layer="leaky_relu")
        x = torch.randn(2, 16, 24, 24)
    fused = getattr(csp_kernels, stage)(*((16, 32, 2, False, 0.5) if stage == "C3k2" else (16, 32)),
                                        **({} if stage == "C3k2" else dict(
                                            stride=2, dilation=1, depth=2, block_ratio=0.5, bottle_ratio=1.0,
                                            expand_ratio=1.0, block_fn=csp_kernels.DarkBlock,
                                            act_layer="leaky_relu")))
    fused.load_state_dict(ref.state_dict())
    x.requires_grad_()
    with SavedTensorsMeter() as meter:
        fused(x)
    expected = x.numel() * 4 + conv_output_bytes(ref, x, but=(getattr(ref, "conv_exp", None),))
    units = sum(isinstance(m, csp_kernels.ConvBNAct) for m in fused.modules())
    assert expected <= activation_bytes(fused, meter) <= expected + units * 2 * 32 * 8


def test_long_residual_chain_stops_at_max_terms():
    blocks = nn.Sequential(*[csp_kernels.DarkBlock(16, 16, act_layer="leaky_relu") for _ in range(4)])
    h = csp_kernels.ConvBNAct(8, 16, 1)(torch.randn(2, 8, 6, 6, requires_grad=True))
    terms = []
    for block in blocks:
        h = block(h)
        recipe = recompute.recipe_of(h)
        terms.append(None if recipe is None else len(recipe.pieces[0].terms))
    assert terms == [2, 3, None, None] and recompute.MAX_TERMS == 3


def test_in_place_edit_of_a_saved_input_raises():
    fused = chain(csp_kernels)
    x = torch.randn(2, 8, 8, 8, requires_grad=True) * 1  # not a leaf: may be edited in place
    y = fused(x)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_edited_batch_norm_weight_raises():
    fused = chain(csp_kernels)
    y = fused(torch.randn(2, 8, 8, 8, requires_grad=True))
    with torch.no_grad():
        fused[0].bn.weight.mul_(2)
    # Raised by the rebuild, before the next unit's backward computes with a wrong input.
    with pytest.raises(RuntimeError, match="BatchNorm weight or bias of a csp_kernels ConvBNAct"):
        y.sum().backward()


def test_edit_before_the_next_unit_is_saved_as_edited():
    """An in-place edit before the next unit reads its input retires the tag: the edited tensor
    is saved."""
    ref, fused = chain(reference, torch.float64), chain(csp_kernels, torch.float64)
    fused.load_state_dict(ref.state_dict())
    grads = []
    for module in (ref, fused):
        x = torch.randn(2, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        h = module[0](x).mul_(2)
        module[2](module[1](h)).square().sum().backward()
        grads.append([x.grad, *(p.grad for p in module.parameters())])
    for got, expected in zip(grads[1], grads[0]):
        assert rel_error(got, expected) <= 1e-10


@pytest.mark.parametrize("reader", ["ConvBNAct", "MaxPool2d"])
def test_edit_after_the_next_unit_raises(reader):
    """An in-place edit of a tensor after a fused reader saved it as its recipe: autograd's
    error, as for the reference's saved tensor (the recipe would rebuild the value from
    before the edit)."""
    for module_ns in (reference, csp_kernels):
        producer = module_ns.ConvBNAct(8, 16, 3, act="identity")
        consumer = module_ns.ConvBNAct(16, 8, 1) if reader == "ConvBNAct" else (
            csp_kernels.MaxPool2d(3, 2, 1) if module_ns is csp_kernels else nn.MaxPool2d(3, 2, 1))
        h = producer(torch.randn(2, 8, 8, 8, requires_grad=True))
        y = consumer(h)
        h.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("outer", ["checkpoint", "save_on_cpu", "a caller's hook"])
def test_outer_hooks_see_every_tensor(outer):
    """Under another saved-tensors hook no recipe is used: the hook receives the intermediate
    activations themselves, and the gradients are the reference's."""
    ref, fused = chain(reference, torch.float64), chain(csp_kernels, torch.float64)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    packed = []

    def pack(t):
        packed.append(t)
        return t.detach()

    results = []
    for module in (ref, fused):
        xi = x.clone().requires_grad_()
        if outer == "checkpoint":
            y = checkpoint(module, xi, use_reentrant=False)
        elif outer == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                y = module(xi)
        else:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                hidden = module[0](xi)
                y = module[2](module[1](hidden))
            if module is fused:
                assert any(t is hidden or t.data_ptr() == hidden.data_ptr() for t in packed)
        y.square().sum().backward()
        results.append([y, xi.grad, *(p.grad for p in module.parameters())])
    for got, expected in zip(results[1], results[0]):
        assert rel_error(got, expected) <= 1e-10


def test_kept_tensor_lets_go_of_the_producer_state():
    """A tensor the caller keeps points at its recipe weakly once a consumer packed it: after
    backward frees the graph, the producer's z is gone with it."""
    fused = chain(csp_kernels)
    hidden = fused[0](torch.randn(2, 8, 8, 8, requires_grad=True))
    z = recompute.recipe_of(hidden).pieces[0].terms[0].z
    z_storage = torch.multiprocessing.reductions.StorageWeakRef(z.untyped_storage())
    del z
    y = fused[2](fused[1](hidden))
    assert recompute.recipe_of(hidden) is not None
    y.sum().backward()
    del y
    assert recompute.recipe_of(hidden) is None and z_storage.expired()


@pytest.mark.parametrize("consumed", [False, True])
def test_tagged_tensor_saves_as_a_plain_tensor(consumed):
    """A tagged output (read by a fused consumer or not) pickles and saves as the reference's
    output does: the tag stays beside the tensor, not in its __dict__, which
    torch.save carried into the file (a recipe's z's: twice the bytes, refused by the default
    weights_only load; once packed, a weak reference pickle refuses). A tag goes with its tensor."""
    fused = chain(csp_kernels)
    hidden = fused[0](torch.randn(2, 8, 8, 8, requires_grad=True))
    if consumed:
        y = fused[1](hidden)
    assert recompute.recipe_of(hidden) is not None
    plain = hidden.detach().clone().requires_grad_()  # what the reference's output holds, untagged
    sizes = []
    for t in (hidden, plain):
        buffer = io.BytesIO()
        torch.save(t, buffer)
        sizes.append(buffer.tell())
        buffer.seek(0)
        assert torch.equal(torch.load(buffer), t)
    assert sizes[0] == sizes[1]
    assert torch.equal(pickle.loads(pickle.dumps(hidden)), hidden)
    tags = len(recompute._TAGS)
    if consumed:
        del y
    del hidden
    assert len(recompute._TAGS) < tags


def saved_and_grads(module: nn.Module, x: torch.Tensor, outer_hook=None) -> tuple[int, list[torch.Tensor]]:
    """(activation bytes saved, [x's gradient, parameters' gradients]) of a training step of
    `module` on x with gradient 1 everywhere, inside `outer_hook` if given."""
    leaf = x.clone().requires_grad_()
    with SavedTensorsMeter() as meter, outer_hook or contextlib.nullcontext():
        y = module(leaf)
    y.backward(torch.ones_like(y))
    grads = [leaf.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return activation_bytes(module, meter), grads


def stem(module_ns, dtype=torch.float64, kernel_size: int = 3) -> nn.Sequential:
    """A stem on a small input (3 -> 32 channels 3x3, x a tenth of z; or 8 -> 32 channels 1x1, the
    GEMM, x a quarter of z: its z is recomputed from x), then a unit whose z is saved."""
    in_channels = 3 if kernel_size == 3 else 8
    return nn.Sequential(module_ns.ConvBNAct(in_channels, 32, kernel_size, act="silu"),
                         module_ns.ConvBNAct(32, 16, 3, stride=2, act="leaky_relu")).to(dtype)


@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stem_conv_output_is_recomputed_not_saved(dtype, kernel_size, monkeypatch):
    """The stem saves x only; its gradients, and the next unit's (which rebuilds the stem's
    output from the recomputed z), are bitwise those of the run that saves z."""
    fused, ref = stem(csp_kernels, dtype, kernel_size), stem(reference, dtype, kernel_size)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, fused[0].in_channels, 16, 16, dtype=dtype)
    saved, grads = saved_and_grads(fused, x)
    monkeypatch.setattr(routing, "recomputed_conv_kernel", lambda *args: None)
    saved_with_z, grads_with_z = saved_and_grads(fused, x)
    stem_z = 2 * 32 * 16 * 16 * x.element_size()
    assert saved == saved_with_z - stem_z
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_with_z))


def expansion(module_ns, dtype=torch.float64) -> nn.Sequential:
    """A unit, then an expanding 1x1 (8 -> 24 channels) whose input is the first unit's output:
    its z, three times its input, is recomputed in backward from the rebuilt input."""
    return nn.Sequential(module_ns.ConvBNAct(6, 8, 3, act="leaky_relu"),
                         module_ns.ConvBNAct(8, 24, 1, act="silu")).to(dtype)


@pytest.mark.parametrize(("dtype", "conv1x1"), [(torch.float32, "gemm"), (torch.float32, "onednn"),
                                                (torch.float64, "gemm")])  # (float64 always the GEMM)
def test_expanding_1x1_conv_output_is_recomputed_not_saved(dtype, conv1x1, monkeypatch):
    """Whichever kernel the 1x1 runs on (the measured verdict, pinned here), z is recomputed by it."""
    monkeypatch.setattr(conv_choice, "_PINNED_1X1", conv1x1)
    assert routing.runs_as_gemm(torch.empty(2, 8, 10, 10, dtype=dtype), torch.empty(24, 8, 1, 1, dtype=dtype),
                                (1, 1), (0, 0), 1, training=True) == (conv1x1 == "gemm")
    fused, ref = expansion(csp_kernels, dtype), expansion(reference, dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 10, 10, dtype=dtype)
    saved, grads = saved_and_grads(fused, x)
    expanded_z = 2 * 24 * 10 * 10 * x.element_size()
    # x, the first unit's z, and each unit's mean and invstd
    assert saved == (x.numel() + 2 * 8 * 10 * 10 + 2 * (8 + 24)) * x.element_size()
    _, grads_saving = saved_and_grads(fused, x, without_recipes())  # under an outer hook, z is saved as itself
    monkeypatch.setattr(routing, "recomputed_conv_kernel", lambda *args: None)
    saved_with_z, grads_with_z = saved_and_grads(fused, x)
    assert saved == saved_with_z - expanded_z
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_with_z))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_saving))
    y_ref = ref(x.clone().requires_grad_())
    assert rel_error(fused(x), y_ref) <= (1e-5 if dtype == torch.float32 else 1e-12)


def grouped(module_ns, groups: int, dtype=torch.float64) -> nn.Sequential:
    """A unit, then a grouped 3x3 (8 -> 8 channels) whose input is the first unit's output: its
    z (as large as its input) is recomputed in backward from the rebuilt input."""
    return nn.Sequential(module_ns.ConvBNAct(6, 8, 1, act="leaky_relu"),
                         module_ns.ConvBNAct(8, 8, 3, groups=groups, act="silu")).to(dtype)


@pytest.mark.parametrize(("groups", "recomputed"), [(2, True), (8, True), (1, False)])  # (groups 1: 72 MACs)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_conv_output_is_recomputed_not_saved(dtype, groups, recomputed, monkeypatch):
    fused, ref = grouped(csp_kernels, groups, dtype), grouped(reference, groups, dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 10, 10, dtype=dtype)
    saved, grads = saved_and_grads(fused, x)
    monkeypatch.setattr(routing, "recomputed_conv_kernel", lambda *args: None)
    saved_with_z, grads_with_z = saved_and_grads(fused, x)
    assert saved == saved_with_z - (2 * 8 * 10 * 10 * x.element_size() if recomputed else 0)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_with_z))
    y_ref = ref(x.clone().requires_grad_())
    assert rel_error(fused(x), y_ref) <= (1e-5 if dtype == torch.float32 else 1e-12)


def test_recomputed_conv_output_checks_its_weight():
    """The stem's weight edited in place between forward and backward (an optimizer step before
    backward): the recomputation would see another weight, so backward raises."""
    fused = stem(csp_kernels)
    y = fused(torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True))
    with torch.no_grad():
        fused[0].conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def bottleneck_chain(module_ns, blocks: int = 3) -> nn.Sequential:
    """A unit, then residual BottleneckBlocks (act3 leaky_relu, in place on the sum)."""
    return nn.Sequential(module_ns.ConvBNAct(8, 16, 1, act="leaky_relu"),
                         *(module_ns.BottleneckBlock(16, 16, act_layer="leaky_relu") for _ in range(blocks))
                         ).double()


def test_bottleneck_outputs_are_rebuilt_within_max_terms():
    """Block k's output act3(BN(z3) + block k-1's output) is rebuilt from a nested recipe while it
    costs at most MAX_TERMS terms (blocks 1 and 2 after the unit), then saved (block 3); the
    gradients are bitwise those with every tensor saved."""
    fused = bottleneck_chain(csp_kernels)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    h = fused[0](x.clone().requires_grad_())
    costs = []
    for block in fused[1:]:
        h = block(h)
        recipe = recompute.recipe_of(h)
        costs.append(None if recipe is None else [(p.act, len(p.terms)) for p in recipe.pieces])
    assert costs == [[("leaky_relu:0.01", 2)], [("leaky_relu:0.01", 2)], None]
    results = []
    for hooks in (contextlib.nullcontext(), without_recipes()):
        leaf = x.clone().requires_grad_()
        with hooks:
            y = fused(leaf)
        y.square().sum().backward()
        results.append([y, leaf.grad] + [p.grad.clone() for p in fused.parameters()])
        fused.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bottleneck_chain_saves_no_rebuilt_output():
    """Saved: x, the first unit's z, each block's z1 and z2 (its conv3 expands 4 -> 16 channels
    from a rebuilt input: recomputed), the third block's output (past MAX_TERMS) and per-channel
    statistics; not the first two blocks' outputs."""
    fused = bottleneck_chain(csp_kernels)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    with SavedTensorsMeter() as meter:
        fused(x)
    plane = 2 * 6 * 6 * 8  # bytes per channel of a (2, c, 6, 6) float64 tensor
    expected = plane * (8 + 16 + 3 * (4 + 4) + 16)
    assert expected <= activation_bytes(fused, meter) <= expected + 2 * 8 * (16 + 3 * (4 + 4 + 16))


def test_a_recipe_saved_twice_is_rebuilt_once_per_backward(monkeypatch):
    """A block's output is read by its act3's backward and the next block's conv1: rebuilt at
    the first unpack and kept for the second; a second backward (retain_graph) rebuilds again."""
    fused = bottleneck_chain(csp_kernels, blocks=2)
    saves, rebuilt = [], []
    real_packed, real_rebuild = recompute.Recipe.packed, recompute.Recipe.rebuild
    monkeypatch.setattr(recompute.Recipe, "packed", lambda self: saves.append(self) or real_packed(self))
    monkeypatch.setattr(recompute.Recipe, "rebuild", lambda self: rebuilt.append(self) or real_rebuild(self))
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    y = fused(x)
    shared = len(saves) - len({id(r) for r in saves})
    assert shared >= 2  # the blocks' outputs, each saved twice
    y.sum().backward(retain_graph=True)
    grad = x.grad.clone()
    saved_rebuilds = [r for r in rebuilt if any(r is s for s in saves)]
    assert len(saved_rebuilds) == len(saves) - shared  # one rebuild per recipe, not per save
    y.sum().backward()
    assert len([r for r in rebuilt if any(r is s for s in saves)]) == 2 * len(saved_rebuilds)
    assert torch.equal(x.grad, 2 * grad)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev"])
def test_max_pool_under_torch_func(transform):
    """torch.func refuses saved-tensors hooks: under its transforms the pool saves its input as
    nn.MaxPool2d does, no recipe."""
    fused, plain = csp_kernels.MaxPool2d(2), nn.MaxPool2d(2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    results = []
    for pool in (fused, plain):
        if transform == "grad":
            results.append(torch.func.grad(lambda t, pool=pool: pool(t).square().sum())(x))
        elif transform == "vjp":
            out, pullback = torch.func.vjp(pool, x)
            results.append(pullback(out)[0])
        else:
            results.append(torch.func.jacrev(pool)(x[:1, :1, :4, :4]))
    assert torch.equal(results[0], results[1])


def test_max_pool_saves_its_inputs_recipe():
    """csp_kernels.MaxPool2d on a unit's output (a stem's pool) saves the recipe, not the input:
    the same output and gradients as nn.MaxPool2d, bit for bit."""
    unit = csp_kernels.ConvBNAct(3, 8, 3, act="relu").double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    results, saved = [], []
    for pool in (csp_kernels.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)):
        leaf = x.clone().requires_grad_()
        with SavedTensorsMeter() as meter:
            y = pool(unit(leaf))
        saved.append(activation_bytes(unit, meter))
        y.square().sum().backward()
        results.append([y, leaf.grad] + [p.grad.clone() for p in unit.parameters()])
        unit.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert saved[1] - saved[0] == 2 * 8 * 12 * 12 * 8  # the unit's output, saved by nn.MaxPool2d only


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_rebuilt_block_outputs_with_non_finite_inputs(value):
    """A non-finite input value spreads through the batch statistics: the rebuilt block outputs
    and MaxPool2d's input give the gradients of the run that saves every tensor, NaN for NaN,
    and the reference's."""
    fused = nn.Sequential(*bottleneck_chain(csp_kernels), csp_kernels.MaxPool2d(3, 2, 1))
    ref = nn.Sequential(*bottleneck_chain(reference), nn.MaxPool2d(3, 2, 1))
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    x[1, 3, 2, 4] = value
    results = []
    runs = ((fused, contextlib.nullcontext()), (fused, without_recipes()), (ref, contextlib.nullcontext()))
    for module, hooks in runs:
        leaf = x.clone().requires_grad_()
        with hooks:
            y = module(leaf)
        y.sum().backward()
        results.append([y, leaf.grad] + [p.grad.clone() for p in module.parameters()])
        module.zero_grad()
    for a, b, c in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(a, c, equal_nan=True)


def _train_step_peak(module: nn.Module, x: torch.Tensor) -> int:
    """The most CPU memory a forward + backward of `module` on x holds at once (after a warm-up
    step: a fused module's first call per shape measures its kernels)."""
    for measured in (False, True):
        module.zero_grad(set_to_none=True)
        x_step = x.detach().clone().requires_grad_()
        with peak_cpu_memory() if measured else contextlib.nullcontext() as peak:
            module(x_step).sum().backward()
    return peak.increase


@pytest.mark.parametrize("block, bound", [("BottleneckBlock", 0.47), ("DarkBlock", 0.56)])
def test_a_stage_training_step_peaks_below_eager(monkeypatch, block, bound):
    """Rebuilt activations are freed as the backward passes them (a recipe is held by what
    autograd releases, not by a node that lives to the end of the backward): a CrossStage of
    three blocks peaks at `bound` of eager's at most (0.44 and 0.54 now; 0.50 and 0.58 when each
    unit's recipe lived on its node). With oneDNN's stride-2 input gradient (measured faster on
    small maps), the route on which that difference shows."""
    monkeypatch.setattr(conv_choice, "_PINNED_STRIDE2", "onednn")
    torch.manual_seed(0)
    kwargs = dict(in_chs=32, out_chs=64, stride=2, dilation=1, depth=3, block_ratio=0.5, bottle_ratio=0.5,
                  block_fn=getattr(reference, block), act_layer="leaky_relu")
    ref, fused = reference.CrossStage(**kwargs), csp_kernels.CrossStage(**kwargs)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 48, 48)
    assert _train_step_peak(fused, x) <= bound * _train_step_peak(ref, x)

"""The reference implementation: shapes, parameter counts, ecosystem weights, Maxout semantics,
gradients and bad input."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import ConvNormAct
from torchvision.models.densenet import _DenseBlock, _DenseLayer

from csp_kernels import reference

FUSIONS = ("last", "first", "csp")
GROUPINGS = ("interleaved", "contiguous")


pytestmark = pytest.mark.usefixtures("single_thread")


def randomize_batchnorm(module):
    """Give every BatchNorm non-trivial affine weights and running statistics."""
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
    return module


def num_parameters(module):
    return sum(p.numel() for p in module.parameters())


def conv_bn_act_params(in_channels, out_channels, kernel_size=1, groups=1):
    return in_channels // groups * out_channels * kernel_size**2 + 2 * out_channels


def dense_layer_params(in_channels, growth_rate, bn_size):
    bottleneck = bn_size * growth_rate
    return 2 * in_channels + in_channels * bottleneck + 2 * bottleneck + bottleneck * growth_rate * 9


def dense_block_params(in_channels, num_layers, growth_rate, bn_size):
    return sum(dense_layer_params(in_channels + j * growth_rate, growth_rate, bn_size) for j in range(num_layers))


def amax_maxout(x, out_channels, grouping):
    """Maxout values by reshape + amax: an independent check of the values (not of tie gradients)."""
    n, c, h, w = x.shape
    if grouping == "interleaved":
        return x.view(n, c // out_channels, out_channels, h, w).amax(1)
    return x.view(n, out_channels, c // out_channels, h, w).amax(2)


def interleaved_to_contiguous(x, out_channels):
    """Permute channels so that contiguous maxout of the result equals interleaved maxout of x,
    group members keeping their order: y[:, g * group_size + j] = x[:, g + j * out_channels]."""
    n, c, h, w = x.shape
    return x.view(n, c // out_channels, out_channels, h, w).transpose(1, 2).reshape(n, c, h, w)


# ---------------------------------------------------------------- shapes and parameter counts


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("part_ratio, part1", [(0.25, 2), (0.5, 4), (0.75, 6), (0.3, 2)])
@pytest.mark.parametrize("out_channels", [None, 13])
def test_partial_dense_block_shapes(fusion, part_ratio, part1, out_channels):
    in_channels, num_layers, growth_rate = 8, 2, 3
    block = reference.PartialDenseBlock(
        in_channels, num_layers, growth_rate, part_ratio, bn_size=2, fusion=fusion, out_channels=out_channels
    )
    part2 = in_channels - part1
    expected_out = part1 + part2 + num_layers * growth_rate if out_channels is None else out_channels
    assert (block.part1, block.part2, block.out_channels, block.fusion) == (part1, part2, expected_out, fusion)
    x = torch.randn(2, in_channels, 5, 4)
    out = block(x)
    assert out.shape == (2, expected_out, 5, 4)
    if fusion == "last":
        assert torch.equal(out[:, :part1], x[:, :part1])  # part 1 bypasses the block untouched


@pytest.mark.parametrize("fusion", FUSIONS)
def test_partial_dense_block_wiring(fusion):
    # part1 = 3 leading channels bypass; the other 5 feed the dense block
    block = reference.PartialDenseBlock(8, 2, 2, part_ratio=0.375, fusion=fusion).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    dense = block.dense(x[:, 3:])
    if fusion == "last":
        expected = torch.cat([x[:, :3], block.transition(dense)], 1)
    elif fusion == "first":
        expected = block.transition(torch.cat([x[:, :3], dense], 1))
    else:
        expected = block.transition2(torch.cat([x[:, :3], block.transition1(dense)], 1))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_partial_dense_block_act_reaches_every_transition(fusion):
    block = reference.PartialDenseBlock(8, 1, 2, fusion=fusion, act="mish")
    transitions = [m for m in block.modules() if isinstance(m, reference.ConvBNAct)]
    assert len(transitions) == (2 if fusion == "csp" else 1)
    assert all(isinstance(t.act, torch.nn.Mish) for t in transitions)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("out_channels", [None, 11])
def test_partial_dense_block_parameter_count(fusion, out_channels):
    in_channels, num_layers, growth_rate, bn_size = 10, 3, 4, 2
    block = reference.PartialDenseBlock(
        in_channels, num_layers, growth_rate, 0.4, bn_size, fusion=fusion, out_channels=out_channels
    )
    part1, part2 = 4, 6
    t = part2 + num_layers * growth_rate
    out = part1 + t if out_channels is None else out_channels
    expected = dense_block_params(part2, num_layers, growth_rate, bn_size)
    if fusion == "last":
        expected += conv_bn_act_params(t, out - part1)
    elif fusion == "first":
        expected += conv_bn_act_params(part1 + t, out)
    else:
        expected += conv_bn_act_params(t, t) + conv_bn_act_params(part1 + t, out)
    assert num_parameters(block) == expected


def test_parameter_count_worked_example():
    # dense layers over 4 and 8 channels (k=4, bottleneck 16): (8+64+32+576) + (16+128+32+576);
    # transition 12 -> 12: 144 + 24.
    assert num_parameters(reference.PartialDenseBlock(8, 2, 4)) == 680 + 752 + 168


def test_conv_bn_act_shapes_and_parameters():
    conv = reference.ConvBNAct(6, 9, kernel_size=3, stride=2, groups=3, act="silu")
    assert conv.conv.padding == (1, 1)
    assert conv(torch.randn(2, 6, 7, 8)).shape == (2, 9, 4, 4)
    assert num_parameters(conv) == conv_bn_act_params(6, 9, 3, groups=3)
    assert reference.ConvBNAct(4, 4, kernel_size=3, padding=0)(torch.randn(1, 4, 5, 5)).shape == (1, 4, 3, 3)


def test_dense_block_shapes_and_parameters():
    block = reference.DenseBlock(5, num_layers=3, growth_rate=2, bn_size=3)
    assert block.out_channels == 11
    x = torch.randn(2, 5, 4, 3)
    out = block(x)
    assert out.shape == (2, 11, 4, 3)
    assert torch.equal(out[:, :5], x)  # new features are appended after the input
    assert num_parameters(block) == dense_block_params(5, 3, 2, 3)


def test_state_dict_keys():
    conv_keys = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert list(reference.ConvBNAct(3, 4).state_dict()) == conv_keys
    assert list(reference.DenseLayer(4, 2, 3).state_dict()) == list(_DenseLayer(4, 2, 3, 0.0).state_dict())
    for fusion, transitions in [("last", ["transition"]), ("first", ["transition"]),
                                ("csp", ["transition1", "transition2"])]:
        keys = list(reference.PartialDenseBlock(8, 2, 4, fusion=fusion).state_dict())
        expected = [f"dense.{k}" for k in _DenseBlock(2, 4, 4, 4, 0.0).state_dict()]
        expected += [f"{t}.{k}" for t in transitions for k in conv_keys]
        assert keys == expected


# ---------------------------------------------------------------- ecosystem weights load as-is


@pytest.mark.parametrize("train", [True, False])
def test_torchvision_dense_block_weights_give_identical_outputs(train):
    num_layers, in_channels, bn_size, growth_rate = 3, 5, 2, 3
    theirs = randomize_batchnorm(_DenseBlock(num_layers, in_channels, bn_size, growth_rate, drop_rate=0.0)).double()
    ours = reference.DenseBlock(in_channels, num_layers, growth_rate, bn_size).double()
    ours.load_state_dict(theirs.state_dict())
    theirs.train(train)
    ours.train(train)
    x = torch.randn(2, in_channels, 6, 5, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-12, atol=1e-12)
    # running statistics and the conv weight gradients match too
    for (name, ours_value), theirs_value in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(ours_value, theirs_value, rtol=1e-12, atol=1e-12, msg=name)
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "act, timm_kwargs",
    [
        ("relu", dict(act_layer="relu")),
        ("leaky_relu", dict(act_layer="leaky_relu", act_kwargs=dict(negative_slope=0.1))),
        ("silu", dict(act_layer="silu")),
        ("mish", dict(act_layer="mish")),
        ("hardswish", dict(act_layer="hard_swish")),
        ("identity", dict(apply_act=False)),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_timm_conv_norm_act_weights_give_identical_outputs(act, timm_kwargs, train):
    theirs = randomize_batchnorm(ConvNormAct(4, 6, kernel_size=3, stride=2, **timm_kwargs)).double()
    ours = reference.ConvBNAct(4, 6, kernel_size=3, stride=2, act=act).double()
    ours.load_state_dict(theirs.state_dict())
    theirs.train(train)
    ours.train(train)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.bn.running_mean, theirs.bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.bn.running_var, theirs.bn.running_var, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- maxout semantics


def test_maxout_hand_computed():
    # one pixel, six channels, two outputs (groups of three)
    x = torch.tensor([3.0, -1.0, 7.0, 2.0, 5.0, 0.5], dtype=torch.float64).view(1, 6, 1, 1)
    # interleaved: out[g] = max(x[g], x[g + 2], x[g + 4])
    assert reference.maxout(x, 2, "interleaved").flatten().tolist() == [7.0, 2.0]
    # contiguous: out[g] = max(x[3g], x[3g + 1], x[3g + 2])
    assert reference.maxout(x, 2, "contiguous").flatten().tolist() == [7.0, 5.0]
    assert reference.Maxout(3, "contiguous")(x).flatten().tolist() == [3.0, 7.0, 5.0]
    assert reference.Maxout(3)(x).flatten().tolist() == [3.0, 5.0, 7.0]


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_maxout_matches_amax(grouping):
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64)
    for out_channels in (1, 2, 3, 4, 6, 12):
        torch.testing.assert_close(
            reference.maxout(x, out_channels, grouping), amax_maxout(x, out_channels, grouping), rtol=0, atol=0
        )


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_maxout_ties_send_gradient_to_lowest_channel_only(grouping):
    out_channels, group_size = 3, 4
    x = torch.full((2, out_channels * group_size, 2, 3), 1.5, dtype=torch.float64, requires_grad=True)
    reference.maxout(x, out_channels, grouping).sum().backward()
    lowest = list(range(out_channels)) if grouping == "interleaved" else [g * group_size for g in range(out_channels)]
    expected = torch.zeros_like(x)
    expected[:, lowest] = 1.0
    assert torch.equal(x.grad, expected)


def test_maxout_partial_tie_goes_to_lowest_of_the_maxima():
    # group (channels 0, 2, 4) with maxima tied at channels 2 and 4: only channel 2 gets gradient
    x = torch.tensor([1.0, 0.0, 9.0, 0.0, 9.0, 0.0], dtype=torch.float64).view(1, 6, 1, 1).requires_grad_()
    reference.maxout(x, 2).sum().backward()
    assert x.grad.flatten().tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(
    out_channels=st.integers(1, 4),
    group_size=st.integers(1, 4),
    height=st.integers(1, 3),
    values=st.lists(st.integers(-2, 2), min_size=4 * 4 * 3, max_size=4 * 4 * 3),
)
def test_interleaved_is_contiguous_after_channel_permutation(out_channels, group_size, height, values):
    # small integer values make ties frequent: the permutation keeps each group's order, so the
    # winner (and its gradient) must match too
    channels = out_channels * group_size
    x = torch.tensor(values[: channels * height], dtype=torch.float64).view(1, channels, height, 1)
    x_interleaved = x.clone().requires_grad_()
    x_contiguous = interleaved_to_contiguous(x, out_channels).requires_grad_()
    out_interleaved = reference.maxout(x_interleaved, out_channels, "interleaved")
    out_contiguous = reference.maxout(x_contiguous, out_channels, "contiguous")
    assert torch.equal(out_interleaved, out_contiguous)
    grad = torch.arange(out_interleaved.numel(), dtype=torch.float64).view_as(out_interleaved)
    out_interleaved.backward(grad)
    out_contiguous.backward(grad)
    assert torch.equal(interleaved_to_contiguous(x_interleaved.grad, out_channels), x_contiguous.grad)


# ---------------------------------------------------------------- maxout pyramid and ExactFusion


PYRAMID_CASES = {
    "down non-integer 5x7->3x4": ([(3, 5, 7)], (3, 4), 3),
    "up non-integer 3x3->8x8": ([(4, 3, 3)], (8, 8), 2),
    "mixed levels": ([(2, 8, 8), (4, 4, 4), (6, 2, 2)], (4, 4), 4),
    "odd sizes": ([(3, 5, 7), (3, 3, 4), (6, 9, 13)], (5, 6), 6),
    "int size": ([(2, 3, 3), (2, 6, 6)], 4, 2),
}


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("case", PYRAMID_CASES, ids=str)
def test_maxout_pyramid_matches_interpolate_cat_maxout(case, grouping):
    shapes, size, out_channels = PYRAMID_CASES[case]
    features = [torch.randn(2, *shape, dtype=torch.float64) for shape in shapes]
    out = reference.maxout_pyramid(features, size, out_channels, grouping)
    size = (size, size) if isinstance(size, int) else size
    resized = torch.cat([F.interpolate(f, size=size, mode="nearest") for f in features], 1)
    assert out.shape == (2, out_channels, *size)
    torch.testing.assert_close(out, amax_maxout(resized, out_channels, grouping), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    channels=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    out_channels=st.sampled_from([1, 2, 3]),
    grouping=st.sampled_from(GROUPINGS),
    seed=st.integers(0, 2**16),
)
def test_maxout_pyramid_at_common_size_is_maxout_of_cat(channels, out_channels, grouping, seed):
    channels[-1] += (-sum(channels)) % out_channels  # make the total divisible
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randint(-2, 3, (2, c, 3, 4), generator=generator).double() for c in channels]
    expected = reference.maxout(torch.cat(features, 1), out_channels, grouping)
    assert torch.equal(reference.maxout_pyramid(features, (3, 4), out_channels, grouping), expected)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("transition", [False, True])
def test_exact_fusion_shapes_and_values(grouping, transition):
    in_channels, out_channels = [4, 4, 8, 4], 4
    efm = reference.ExactFusion(in_channels, out_channels, grouping, transition=transition)
    assert efm.in_channels == tuple(in_channels) and efm.out_channels == out_channels
    assert (efm.transitions is not None) == transition
    sizes = [(16, 12), (8, 6), (4, 3), (2, 2)]
    features = [torch.randn(2, c, *s, dtype=torch.float64) for c, s in zip(in_channels, sizes)]
    if transition:
        efm.double()
        assert len(efm.transitions) == len(in_channels)
        assert isinstance(efm.transitions[0].act, torch.nn.LeakyReLU)
    outputs = efm(features)
    assert [tuple(o.shape) for o in outputs] == [(2, out_channels, *s) for s in sizes]
    if not transition:
        # level 1 gathers levels 0 (downsampled), 1 and 2 (upsampled), in that order
        gathered = torch.cat([F.interpolate(f, size=sizes[1], mode="nearest") for f in features[:3]], 1)
        torch.testing.assert_close(outputs[1], amax_maxout(gathered, out_channels, grouping), rtol=0, atol=0)
        gathered = torch.cat([F.interpolate(f, size=sizes[3], mode="nearest") for f in features[2:]], 1)
        torch.testing.assert_close(outputs[3], amax_maxout(gathered, out_channels, grouping), rtol=0, atol=0)


def test_exact_fusion_single_level():
    x = torch.randn(1, 6, 3, 3, dtype=torch.float64)
    (out,) = reference.ExactFusion([6], 2)([x])
    assert torch.equal(out, reference.maxout(x, 2))


# ---------------------------------------------------------------- gradients (float64)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_gradcheck_maxout(grouping):
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.maxout(t, 3, grouping), (x,))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_gradcheck_maxout_pyramid(grouping):
    # 5x7 -> 3x4 (down, non-integer), 3x4 (identity), 2x2 -> 3x4 (up: an input feeds several outputs)
    features = [
        torch.randn(1, c, h, w, dtype=torch.float64, requires_grad=True)
        for c, h, w in [(2, 5, 7), (3, 3, 4), (3, 2, 2)]
    ]
    assert torch.autograd.gradcheck(lambda *fs: reference.maxout_pyramid(list(fs), (3, 4), 4, grouping), features)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "mish", "hardswish", "identity"])
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck_conv_bn_act(act, train):
    module = randomize_batchnorm(reference.ConvBNAct(2, 3, kernel_size=3, act=act)).double().train(train)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = module.conv.weight

    def run(x, weight):
        return torch.func.functional_call(module, {"conv.weight": weight}, (x,))

    assert torch.autograd.gradcheck(run, (x, weight))


@pytest.mark.parametrize("train", [True, False])
def test_gradcheck_dense_layer(train):
    module = randomize_batchnorm(reference.DenseLayer(3, growth_rate=2, bn_size=2)).double().train(train)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradcheck_partial_dense_block(fusion):
    module = reference.PartialDenseBlock(4, 2, 2, bn_size=2, fusion=fusion).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(part_ratio=0), ValueError, r"part_ratio must be a float in the open interval \(0, 1\); got 0"),
        (dict(part_ratio=1), ValueError, r"part_ratio .*got 1"),
        (dict(part_ratio=1.5), ValueError, r"part_ratio .*got 1\.5"),
        (dict(part_ratio="a"), ValueError, r"part_ratio .*got 'a'"),
        (dict(part_ratio=0.05), ValueError, r"part_ratio=0\.05 with in_channels=8 leaves part 1 empty"),
        (dict(part_ratio=0.95), ValueError, r"part_ratio=0\.95 with in_channels=8 leaves part 2 empty"),
        (dict(fusion="middle"), ValueError, r"fusion must be one of \('last', 'first', 'csp'\); got 'middle'"),
        (dict(fusion=None), TypeError, r"fusion must be a str"),
        (dict(act="gelu"), ValueError, r"act must be one of .*'relu'.*got 'gelu'"),
        (dict(num_layers=0), ValueError, r"num_layers must be a positive int; got 0"),
        (dict(growth_rate=2.0), TypeError, r"growth_rate must be a positive int; got float"),
        (dict(out_channels=4), ValueError, r'out_channels must exceed part1 = 4 with fusion "last"'),
        (dict(out_channels=-1, fusion="csp"), ValueError, r"out_channels must be a positive int; got -1"),
    ],
)
def test_partial_dense_block_rejects_bad_arguments(kwargs, error, match):
    arguments = dict(in_channels=8, num_layers=2, growth_rate=4) | kwargs
    with pytest.raises(error, match=match):
        reference.PartialDenseBlock(**arguments)


@pytest.mark.parametrize(
    "make_module",
    [
        lambda: reference.PartialDenseBlock(6, 1, 2),
        lambda: reference.DenseBlock(6, 1, 2),
        lambda: reference.DenseLayer(6, 2),
        lambda: reference.ConvBNAct(6, 3),
    ],
)
def test_modules_reject_bad_input(make_module):
    module = make_module()
    with pytest.raises(ValueError, match=r"x must be 4-D \(batch, channels, height, width\); got shape \(6, 4, 4\)"):
        module(torch.randn(6, 4, 4))
    with pytest.raises(ValueError, match=r"x must have 6 channels \(dim 1\); got shape \(1, 5, 4, 4\)"):
        module(torch.randn(1, 5, 4, 4))
    with pytest.raises(TypeError,
                       match=r"x must have dtype in \(float16, bfloat16, float32, float64\); got torch.int64"):
        module(torch.ones(1, 6, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor; got list"):
        module([[1.0]])
    with pytest.raises(ValueError, match=r"x, .* parameters must have the same device; got x on meta"):
        module(torch.empty(1, 6, 4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"x, .* parameters must have the same dtype; got x is torch.float64"):
        module(torch.randn(1, 6, 4, 4, dtype=torch.float64))


def test_maxout_rejects_bad_input():
    x = torch.randn(1, 6, 2, 2)
    with pytest.raises(ValueError, match=r"x channels \(6\) must be divisible by out_channels; got out_channels=4"):
        reference.maxout(x, 4)
    with pytest.raises(ValueError, match=r"grouping must be one of \('interleaved', 'contiguous'\); got 'blocked'"):
        reference.maxout(x, 3, "blocked")
    with pytest.raises(ValueError, match=r"grouping must be one of"):
        reference.Maxout(3, "blocked")
    with pytest.raises(ValueError, match=r"out_channels must be a positive int; got 0"):
        reference.Maxout(0)
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        reference.maxout(torch.randn(6, 2, 2), 3)
    with pytest.raises(TypeError, match=r"x must have dtype in"):
        reference.maxout(torch.ones(1, 6, 2, 2, dtype=torch.int32), 3)


@pytest.mark.parametrize(
    "features, size, error, match",
    [
        (lambda: [torch.randn(1, 3, 4, 4), torch.randn(1, 2, 2, 2)], (4, 4), ValueError,
         r"total channels 3 \+ 2 = 5 must be divisible by out_channels; got out_channels=2"),
        (lambda: [torch.randn(1, 2, 4, 4), torch.randn(2, 2, 2, 2)], (4, 4), ValueError,
         r"features must all have the same batch size \(dim 0\); got \[1, 2\]"),
        (lambda: [torch.randn(1, 2, 4, 4), torch.empty(1, 2, 2, 2, device="meta")], (4, 4), ValueError,
         r"features\[0\], features\[1\] must have the same device; got features\[0\] on cpu, features\[1\] on meta"),
        (lambda: [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2, dtype=torch.float64)], (4, 4), ValueError,
         r"must have the same dtype; got features\[0\] is torch.float32, features\[1\] is torch.float64"),
        (lambda: [torch.randn(1, 2, 4, 4), torch.randn(2, 2, 2)], (4, 4), ValueError,
         r"features\[1\] must be 4-D \(batch, channels, height, width\); got shape \(2, 2, 2\)"),
        (lambda: [torch.randn(1, 2, 4, 4), torch.ones(1, 2, 2, 2, dtype=torch.int64)], (4, 4), TypeError,
         r"features\[1\] must have dtype in"),
        (lambda: [], (4, 4), ValueError, r"features must be a non-empty list of tensors; got 0 of them"),
        (lambda: torch.randn(1, 2, 4, 4), (4, 4), TypeError,
         r"features must be a non-empty list of tensors; got Tensor"),
        (lambda: [torch.randn(1, 2, 4, 4)], (4, 4, 4), ValueError, r"size must be an int or a \(height, width\) pair"),
        (lambda: [torch.randn(1, 2, 4, 4)], (4, 0), ValueError, r"size\[1\] must be a positive int; got 0"),
        (lambda: [torch.randn(1, 2, 4, 4)], 2.5, TypeError, r"size must be a positive int; got float"),
    ],
)
def test_maxout_pyramid_rejects_bad_input(features, size, error, match):
    with pytest.raises(error, match=match):
        reference.maxout_pyramid(features(), size, 2)


def test_exact_fusion_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"in_channels of level 1 and its neighbours, 2 \+ 4 \+ 3 = 9, "
                                         r"must be divisible by out_channels; got 2"):
        reference.ExactFusion([2, 4, 3, 5], 2)
    with pytest.raises(ValueError, match=r"in_channels must be a non-empty list of ints; got \[\]"):
        reference.ExactFusion([], 2)
    with pytest.raises(TypeError, match=r"in_channels\[1\] must be a positive int; got str"):
        reference.ExactFusion([2, "4"], 2)
    with pytest.raises(ValueError, match=r"act must be one of"):
        reference.ExactFusion([2, 2], 2, transition=True, act="tanh")
    efm = reference.ExactFusion([2, 4], 2)
    with pytest.raises(ValueError, match=r"features must be a list of 2 tensors; got 1 of them"):
        efm([torch.randn(1, 2, 4, 4)])
    with pytest.raises(ValueError, match=r"features\[1\] must have 4 channels \(dim 1\); got shape \(1, 2, 2, 2\)"):
        efm([torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)])

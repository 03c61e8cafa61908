"""Fused modules under torch.utils.checkpoint, reentrant and not: the reference's outputs,
gradients and running statistics. Under non-reentrant checkpointing (early stop, PyTorch's
default) the recomputation ends once the last saved tensor is saved again, so a module must
update its running statistics before its op saves, as nn.BatchNorm2d does
(csp_kernels/ops/stats_update.py); every BatchNorm counts the batch twice, as the reference's do."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import csp_kernels
from csp_kernels import reference

from helpers import randomize_

MODULES = {
    "ConvBNAct 3x3": (lambda m: m.ConvBNAct(6, 8, 3, act="silu"), 6),
    "ConvBNAct 1x1": (lambda m: m.ConvBNAct(6, 8, 1, act="leaky_relu"), 6),
    "C2f": (lambda m: m.C2f(8, 12, n=2, shortcut=True), 8),
    "C3k2": (lambda m: m.C3k2(8, 12, n=1, c3k=True), 8),
    "CrossStage": (lambda m: m.CrossStage(8, 16, stride=2, dilation=1, depth=2, block_ratio=0.5, bottle_ratio=1.0,
                                          expand_ratio=1.0, down_growth=True, block_fn=m.DarkBlock), 8),
    "PartialDenseBlock csp": (lambda m: m.PartialDenseBlock(8, 2, 4, fusion="csp"), 8),
    "PartialDenseBlock last": (lambda m: m.PartialDenseBlock(8, 2, 4, fusion="last"), 8),
}


def _run(module, x, reentrant: bool):
    """One checkpointed training step; (output, x's gradient, parameters' gradients)."""
    x = x.clone().requires_grad_()
    y = checkpoint(module, x, use_reentrant=reentrant)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return y.detach(), x.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", list(MODULES))
def test_checkpointed_training_step_matches_the_reference(name, reentrant):
    build, channels = MODULES[name]
    torch.manual_seed(0)
    # Two modules in one checkpoint: the fused module's op is the segment's last saver.
    ref_seq = nn.Sequential(nn.Conv2d(channels, channels, 1), randomize_(build(reference))).double()
    fused_seq = nn.Sequential(nn.Conv2d(channels, channels, 1), build(csp_kernels)).double()
    fused_seq.load_state_dict(ref_seq.state_dict())
    ref, fused = ref_seq[1], fused_seq[1]
    x = torch.randn(2, channels, 12, 12, dtype=torch.float64)
    expected, got = _run(ref_seq, x, reentrant), _run(fused_seq, x, reentrant)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for g, e in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(g, e)
    ref_buffers, fused_buffers = dict(ref.named_buffers()), dict(fused.named_buffers())
    assert ref_buffers.keys() == fused_buffers.keys()
    for key, value in ref_buffers.items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == 2 and fused_buffers[key].item() == 2, key
        torch.testing.assert_close(fused_buffers[key], value, msg=key)


def test_without_early_stop_too():
    """set_checkpoint_early_stop(False): the whole segment runs again, both updates made."""
    torch.manual_seed(0)
    ref = randomize_(reference.ConvBNAct(6, 8, 3)).double()
    fused = csp_kernels.ConvBNAct(6, 8, 3).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    with set_checkpoint_early_stop(False):
        _run(ref, x, False), _run(fused, x, False)
    assert fused.bn.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == 2
    torch.testing.assert_close(fused.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(fused.bn.running_var, ref.bn.running_var)


@pytest.mark.parametrize("name", ["ConvBNAct 3x3", "PartialDenseBlock csp"])
def test_one_update_per_call_outside_checkpoints(name):
    """Without a checkpoint each training call updates once, recorded or not."""
    build, channels = MODULES[name]
    torch.manual_seed(0)
    ref, fused = build(reference).double(), build(csp_kernels).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, channels, 10, 10, dtype=torch.float64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            ref(x.requires_grad_(grad)), fused(x.requires_grad_(grad))
    for key, value in ref.named_buffers():
        if key.endswith("num_batches_tracked"):
            assert value.item() == dict(fused.named_buffers())[key].item() == 2, key
        torch.testing.assert_close(dict(fused.named_buffers())[key], value, msg=key)

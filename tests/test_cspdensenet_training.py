"""A small CSPDenseNet-style classifier built from csp_kernels modules trains exactly like the
same network built from the reference modules: same loss trajectory, same final state."""
import pytest
import torch
from torch import nn

import csp_kernels
from csp_kernels import backend, reference
from helpers import assert_matches_reference, fused_backends


class TinyCSPDenseNet(nn.Module):
    """stem ConvBNAct 3x3/2 -> CSP dense stage (fusion "csp") -> avg pool -> CSP dense stage
    (fusion "last", compressed output) -> global pool -> linear.

    x: (batch, 3, height, width) -> logits (batch, num_classes)
    """

    def __init__(self, lib, num_classes: int = 5):
        super().__init__()
        self.stem = lib.ConvBNAct(3, 12, kernel_size=3, stride=2, act="leaky_relu")
        self.stage1 = lib.PartialDenseBlock(12, num_layers=3, growth_rate=4, fusion="csp", out_channels=16)
        self.pool = nn.AvgPool2d(2)
        self.stage2 = lib.PartialDenseBlock(16, num_layers=2, growth_rate=4, part_ratio=0.25, fusion="last",
                                            out_channels=20)
        self.head = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.pool(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def train(model, inputs, targets, name):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses = []
    with backend.use_backend(name):
        for x, y in zip(inputs, targets):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            eval_logits = model(inputs[0])
    return torch.tensor(losses, dtype=torch.float64), eval_logits


@pytest.mark.parametrize("name", fused_backends("cpu"))
def test_training_trajectory_matches_reference(name):
    ref = TinyCSPDenseNet(reference).double()
    fused = TinyCSPDenseNet(csp_kernels).double()
    assert fused.state_dict().keys() == ref.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    steps = 2 if name == "triton" else 4  # the Triton interpreter is slow
    inputs = [torch.randn(4, 3, 16, 16, dtype=torch.float64) for _ in range(steps)]
    targets = [torch.randint(0, 5, (4,)) for _ in range(steps)]

    ref_losses, ref_logits = train(ref, inputs, targets, "reference")
    losses, logits = train(fused, inputs, targets, name)

    assert (ref_losses[1:] != ref_losses[0]).all(), "the model must actually train"
    torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=0)
    assert_matches_reference(logits, ref_logits, tol=1e-9, name="eval logits after training")
    for (key, value), ref_value in zip(fused.state_dict().items(), ref.state_dict().values()):
        if value.is_floating_point():
            assert_matches_reference(value, ref_value, tol=1e-9, name=key)
        else:
            assert torch.equal(value, ref_value), key

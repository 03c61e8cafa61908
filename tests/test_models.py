"""csp_kernels.models: the timm models load timm's state_dict as is and compute what timm's
models compute (float64, eval and train, gradients and running statistics included); the
CSPDenseNets train on the fused modules as on the reference; features_only and bad names."""
import numpy as np
import pytest
import torch

from csp_kernels import models
from helpers import assert_matches_reference, randomize_

timm = pytest.importorskip("timm")

# timm's parameter counts with 1000 classes: what the paper and timm's model cards quote (21.6M, 20.6M, 27.6M).
TIMM_PARAMETERS = {"cspresnet50": 21_616_168, "cspresnext50": 20_569_896, "cspdarknet53": 27_642_184}
DENSE_PARAMETERS = {"cspdensenet121": 10_997_032, "cspdensenet201": 29_648_808}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TIMM_PARAMETERS)
def test_timm_state_dict_and_parameter_count(name):
    upstream = timm.create_model(name, pretrained=False)
    assert count(upstream) == TIMM_PARAMETERS[name]
    for fused in (True, False):
        model = models.create(name, fused=fused)
        assert list(model.state_dict()) == list(upstream.state_dict())
        assert count(model) == TIMM_PARAMETERS[name]
        model.load_state_dict(upstream.state_dict(), strict=True)


def _timm_pair(name: str, fused: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(timm's model with non-trivial BatchNorms, ours holding its weights), both float64."""
    upstream = randomize_(timm.create_model(name, pretrained=False)).double()
    model = models.create(name, fused=fused).double()
    model.load_state_dict(upstream.state_dict())
    return upstream, model


@pytest.mark.parametrize("name, fused", [("cspdarknet53", True), ("cspresnext50", True), ("cspresnet50", False)])
def test_timm_outputs_match_in_float64(name, fused):
    upstream, model = _timm_pair(name, fused)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert_matches_reference(model.eval()(x), upstream.eval()(x), tol=1e-12, name="eval logits")
    x.requires_grad_(True)
    logits, upstream_logits = model.train()(x), upstream.train()(x)
    assert_matches_reference(logits, upstream_logits, tol=1e-12, name="train logits")
    weights = torch.randn_like(logits)  # a loss that weighs every logit differently
    grad_x, = torch.autograd.grad((logits * weights).sum(), x)
    upstream_grad_x, = torch.autograd.grad((upstream_logits * weights).sum(), x)
    assert_matches_reference(grad_x, upstream_grad_x, tol=1e-9, name="input gradient")
    for (key, value), upstream_value in zip(model.state_dict().items(), upstream.state_dict().values()):
        if value.is_floating_point():  # running statistics after the training forward
            assert_matches_reference(value, upstream_value, tol=1e-12, name=key)


def test_num_classes_zero_returns_pooled_features_as_timm():
    """timm's num_classes=0: no classifier, the head returns the pooled features."""
    torch.manual_seed(0)
    upstream = timm.create_model("cspresnet50", pretrained=False, num_classes=0).double()
    model = models.create("cspresnet50", num_classes=0).double()
    model.load_state_dict(upstream.state_dict())  # strict: no head.fc keys on either side
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        features = model.eval()(x)
        assert features.shape == (2, 1024)
        assert_matches_reference(features, upstream.eval()(x), tol=1e-12, name="pooled features")
    with pytest.raises(ValueError, match="num_classes must be a positive int, or 0 .*; got -1"):
        models.create("cspresnet50", num_classes=-1)


def test_timm_features_match_forward_intermediates():
    upstream, model = _timm_pair("cspresnet50", fused=True)
    backbone = models.create("cspresnet50", features_only=True, out_indices=(1, 3)).double()
    assert backbone.load_state_dict(upstream.state_dict(), strict=False).unexpected_keys == ["head.fc.weight",
                                                                                             "head.fc.bias"]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        # timm's index 0 is the stem's output, then one per stage.
        expected = upstream.eval().forward_intermediates(x, indices=[2, 4], intermediates_only=True)
        features = backbone.eval()(x)
    assert backbone.feature_channels == (256, 1024) and [f.shape[1] for f in features] == [256, 1024]
    for feature, reference in zip(features, expected):
        assert_matches_reference(feature, reference, tol=1e-12, name="stage output")


@pytest.mark.parametrize("name", DENSE_PARAMETERS)
def test_cspdensenet_builds(name):
    fused, reference = models.create(name), models.create(name, fused=False)
    assert list(fused.state_dict()) == list(reference.state_dict())
    assert count(fused) == DENSE_PARAMETERS[name]
    assert fused.stage_channels == ((256, 512, 1024, 1024) if name.endswith("121") else (256, 512, 1792, 1920))
    assert fused.stage_reductions == (4, 8, 16, 32)
    block = fused.stages[1].block
    assert (block.fusion, block.part1, block.dense.growth_rate) == ("csp", 64, 32)


def test_cspdensenet121_fused_trains_as_reference():
    reference = randomize_(models.create("cspdensenet121", num_classes=10, fused=False)).double()
    fused = models.create("cspdensenet121", num_classes=10).double()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # 2x2 maps in the last stage: BatchNorm over 8 values
    targets = torch.tensor([3, 7])
    losses = [torch.nn.functional.cross_entropy(net(x), targets) for net in (fused, reference)]
    assert_matches_reference(losses[0], losses[1], tol=1e-12, name="loss")
    for loss in losses:
        loss.backward()
    for (key, param), reference_param in zip(fused.named_parameters(), reference.parameters()):
        assert_matches_reference(param.grad, reference_param.grad, tol=1e-9, name=f"{key} gradient")
    for (key, value), reference_value in zip(fused.state_dict().items(), reference.state_dict().values()):
        if value.is_floating_point():
            assert_matches_reference(value, reference_value, tol=1e-12, name=key)
    with torch.no_grad():
        assert_matches_reference(fused.eval()(x), reference.eval()(x), tol=1e-12, name="eval logits")


def test_cspdensenet_features_only():
    backbone = models.create("cspdensenet121", features_only=True, out_indices=(0, 2))
    assert len(backbone.stages) == 3 and not hasattr(backbone, "head")  # nothing past the last stage used
    with torch.no_grad():
        features = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 256, 16, 16), (1, 1024, 4, 4)]
    assert backbone.feature_channels == (256, 1024)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'cspnet9'.*cspresnet50, cspresnext50, cspdarknet53, "
                                         "cspdensenet121, cspdensenet201"):
        models.create("cspnet9")
    with pytest.raises(ValueError, match="strictly increasing stage indices in range\\(5\\)"):
        models.create("cspdarknet53", features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match="strictly increasing"):
        models.create("cspdarknet53", features_only=True, out_indices=(2, 1))
    with pytest.raises(ValueError, match="features_only=True"):
        models.create("cspdarknet53", out_indices=(1,))
    with pytest.raises(TypeError, match="name must be a str"):
        models.create(["cspresnet50"])
    with pytest.raises(TypeError, match="out_indices must be a sequence"):
        models.create("cspdarknet53", features_only=True, out_indices=3)
    for flag in ("fused", "features_only"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            models.create("cspdarknet53", **{flag: "no"})


def test_numpy_out_indices():
    model = models.create("cspdarknet53", features_only=True, out_indices=[np.int64(1), np.int64(3)])
    assert model.out_indices == (1, 3) and all(type(i) is int for i in model.out_indices)

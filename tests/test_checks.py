"""Shared argument validation: accepted values pass through, bad ones raise naming the argument."""
import re

import numpy as np
import pytest
import torch
from torch import nn

import csp_kernels
from csp_kernels import checks


@pytest.mark.parametrize(
    "check, name, choices",
    [
        (checks.check_activation, "act", checks.ACTIVATIONS),
        (checks.check_fusion, "fusion", checks.FUSIONS),
        (checks.check_grouping, "grouping", checks.GROUPINGS),
    ],
)
def test_choice_checks(check, name, choices):
    for choice in choices:
        assert check(choice) == choice
    with pytest.raises(ValueError, match=re.escape(f"{name} must be one of {choices}; got 'nope'")):
        check("nope")
    with pytest.raises(TypeError, match=rf"{name} must be a str, one of .*; got int"):
        check(1)


def test_constants():
    assert checks.ACTIVATIONS == ("relu", "leaky_relu", "silu", "mish", "hardswish", "identity")
    assert checks.FUSIONS == ("last", "first", "csp")
    assert checks.GROUPINGS == ("interleaved", "contiguous")
    assert checks.LEAKY_RELU_SLOPE == 0.1


def test_check_positive_int():
    assert checks.check_positive_int(3, "n") == 3
    assert type(checks.check_positive_int(np.int64(3), "n")) is int
    with pytest.raises(ValueError, match=r"n must be a positive int; got 0"):
        checks.check_positive_int(0, "n")
    with pytest.raises(ValueError, match=r"n must be a positive int; got -2"):
        checks.check_positive_int(-2, "n")
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match=rf"n must be a positive int; got {type(bad).__name__}"):
            checks.check_positive_int(bad, "n")


@pytest.mark.parametrize(
    "in_channels, part_ratio, parts",
    [(8, 0.25, (2, 6)), (8, 0.5, (4, 4)), (8, 0.75, (6, 2)), (10, 0.3, (3, 7)), (7, 0.5, (4, 3)),
     (5, 0.5, (2, 3)), (8, np.float64(0.25), (2, 6)), (2, 0.5, (1, 1))],
)
def test_partial_split(in_channels, part_ratio, parts):
    assert checks.partial_split(in_channels, part_ratio) == parts


@pytest.mark.parametrize(
    "in_channels, part_ratio, error, match",
    [
        (8, 0.0, ValueError, r"part_ratio must be a float in the open interval \(0, 1\); got 0\.0"),
        (8, 1.0, ValueError, r"part_ratio must be a float in the open interval \(0, 1\); got 1\.0"),
        (8, -0.5, ValueError, r"part_ratio .*got -0\.5"),
        (8, "0.5", ValueError, r"part_ratio .*got '0\.5'"),
        (8, True, ValueError, r"part_ratio .*got True"),
        (8, float("nan"), ValueError, r"part_ratio .*got nan"),
        (4, 0.1, ValueError, r"part_ratio=0\.1 with in_channels=4 leaves part 1 empty: round\(4 \* 0\.1\) = 0"),
        (4, 0.9, ValueError, r"part_ratio=0\.9 with in_channels=4 leaves part 2 empty: round\(4 \* 0\.9\) = 4"),
        (1, 0.5, ValueError, r"leaves part 1 empty"),  # round(0.5) == 0
        (0, 0.5, ValueError, r"in_channels must be a positive int; got 0"),
        (8.0, 0.5, TypeError, r"in_channels must be a positive int; got float"),
    ],
)
def test_partial_split_rejects(in_channels, part_ratio, error, match):
    with pytest.raises(error, match=match):
        checks.partial_split(in_channels, part_ratio)


def test_check_input():
    x = torch.randn(2, 3, 4, 5)
    assert checks.check_input(x, channels=3) is x
    with pytest.raises(TypeError, match=r"feat must be a torch.Tensor; got ndarray"):
        checks.check_input(np.zeros((2, 3, 4, 5)), name="feat")
    with pytest.raises(ValueError, match=r"x must be 4-D \(batch, channels, height, width\); got shape \(3, 4, 5\)"):
        checks.check_input(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"x must have 4 channels \(dim 1\); got shape \(2, 3, 4, 5\)"):
        checks.check_input(x, channels=4)
    with pytest.raises(TypeError,
                       match=r"x must have dtype in \(float16, bfloat16, float32, float64\); got torch.int32"):
        checks.check_input(x.int())
    with pytest.raises(TypeError, match=r"x must have dtype in \(float32\); got torch.float64"):
        checks.check_input(x.double(), dtypes=(torch.float32,))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        checks.check_input(x.to(dtype))


def test_check_same_device_dtype():
    a, b = torch.zeros(1), torch.zeros(2)
    checks.check_same_device_dtype([a, b], ["a", "b"])
    with pytest.raises(ValueError, match=r"a, b must have the same dtype; got a is torch.float32, b is torch.float64"):
        checks.check_same_device_dtype([a, b.double()], ["a", "b"])
    with pytest.raises(ValueError, match=r"a, b must have the same device; got a on cpu, b on meta"):
        checks.check_same_device_dtype([a, torch.empty(2, device="meta")], ["a", "b"])


def test_check_module_input():
    module = nn.Conv2d(2, 2, 1)
    x = torch.randn(1, 2, 3, 3)
    checks.check_module_input(x, module)
    checks.check_module_input(x.double(), nn.ReLU())  # no parameters: nothing to compare
    with pytest.raises(ValueError, match=r"x, Conv2d parameters must have the same dtype; got x is torch.float64"):
        checks.check_module_input(x.double(), module)
    with pytest.raises(ValueError, match=r"y, Conv2d parameters must have the same device; got y on meta"):
        checks.check_module_input(x.to("meta"), module, name="y")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes on purpose
        checks.check_module_input(x.bfloat16(), module)
        with pytest.raises(ValueError, match=r"same device"):
            checks.check_module_input(x.to("meta"), module)


def test_first_parameter_is_parameters_first():
    """The parameter check_module_input compares against is next(module.parameters()): for a
    module without parameters of its own (its first child's), one with (its own), one whose
    first children have none, and none at all."""
    stage = csp_kernels.C3k2(8, 16, 1, False, 0.5)
    nested = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), nn.Conv2d(2, 3, 1)), nn.Linear(2, 2))
    for module in (stage, csp_kernels.ConvBNAct(4, 4), nn.Linear(2, 3), nested, nn.ReLU()):
        assert checks._first_parameter(module) is next(module.parameters(), None)


def test_activation_module():
    expected = {
        "relu": nn.ReLU,
        "leaky_relu": nn.LeakyReLU,
        "silu": nn.SiLU,
        "mish": nn.Mish,
        "hardswish": nn.Hardswish,
        "identity": nn.Identity,
    }
    assert set(expected) == set(checks.ACTIVATIONS)
    for act, module_type in expected.items():
        assert type(checks.activation_module(act)) is module_type
    assert checks.activation_module("leaky_relu").negative_slope == checks.LEAKY_RELU_SLOPE
    assert checks.activation_module("relu") is not checks.activation_module("relu")
    with pytest.raises(ValueError, match=r"act must be one of"):
        checks.activation_module("gelu")

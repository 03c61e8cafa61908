"""Whole CSPNet models built from the library's modules: `create(name, ...)` or a constructor.

  cspresnet50, cspresnext50, cspdarknet53   timm's models, timm's module names: timm's
                                            state_dict loads with strict=True (models/cspnet.py)
  cspdensenet121, cspdensenet201            the CSPNet paper's CSPDenseNets (models/cspdensenet.py)

fused=True builds them from the fused modules (csp_kernels.nn), fused=False from their
plain-PyTorch twins (csp_kernels.reference): same state_dict keys, same numbers, so one's weights
load into the other. features_only=True makes a backbone returning the stages' outputs (CSPNet).

The fused PartialDenseBlock runs eval mode as inference only: evaluate the CSPDenseNets under
torch.no_grad() (with autograd recording, eval falls back to the reference with a warning).
"""
from __future__ import annotations

from typing import Sequence

from .cspdensenet import cspdensenet121, cspdensenet201
from .cspnet import CSPNet, cspdarknet53, cspresnet50, cspresnext50

MODELS = {fn.__name__: fn for fn in (cspresnet50, cspresnext50, cspdarknet53, cspdensenet121, cspdensenet201)}


def create(name: str, *, num_classes: int = 1000, fused: bool = True, features_only: bool = False,
           out_indices: Sequence[int] | None = None) -> CSPNet:
    """The model `name` (a key of MODELS). fused: the fused modules (True) or the reference
    twins (False); features_only: a backbone returning the outputs of the stages in out_indices
    (all by default). See CSPNet for the shapes: create("cspdarknet53", num_classes=10) maps
    (2, 3, 64, 64) images to (2, 10) logits; num_classes=0 (as in timm) leaves out the
    classifier, and the model returns the pooled features (2, 1024).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {', '.join(MODELS)}; got {type(name).__name__}")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the models are {', '.join(MODELS)}")
    for flag, value in (("fused", fused), ("features_only", features_only)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool; got {value!r}")
    return MODELS[name](num_classes=num_classes, fused=fused, features_only=features_only, out_indices=out_indices)


__all__ = ["CSPNet", "MODELS", "create", *MODELS]

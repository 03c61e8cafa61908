"""Fused ConvBNAct (placeholder: runs the reference until the fused transition lands)."""
from .. import reference


class ConvBNAct(reference.ConvBNAct):
    pass

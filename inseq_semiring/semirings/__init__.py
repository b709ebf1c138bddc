"""Semirings by name: ``SEMIRINGS[name](**options)`` builds one."""

from .gradient import Gradient
from .maxpath import MaxPath
from .scaled import Entropy, Flow

SEMIRINGS = {"gradient": Gradient, "flow": Flow, "entropy": Entropy, "maxpath": MaxPath}

__all__ = ["SEMIRINGS", "Gradient", "Flow", "Entropy", "MaxPath"]

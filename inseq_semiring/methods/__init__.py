"""Gradient-based attribution methods on the engine (Captum-like): each ``<name>(fn, inputs, **options)`` returns a
tuple of attributions shaped like ``inputs``; ``fn(*inputs)`` returns a scalar or one scalar per batch row.

* :func:`guided_backprop` -- Guided Backprop for any element-wise activation (a rule-set overlay);
* :func:`deeplift_shap` -- DeepLift with exact secant multipliers, averaged over baselines (:func:`deeplift`: one);
"""

from .deeplift_shap import deeplift, deeplift_shap
from .guided_backprop import guided_backprop

__all__ = ["guided_backprop", "deeplift", "deeplift_shap"]

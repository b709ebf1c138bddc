"""Gradient-based attribution methods on the engine (Captum-like): each ``<name>(fn, inputs, **options)`` returns a
tuple of attributions shaped like ``inputs``; ``fn(*inputs)`` returns a scalar or one scalar per batch row.

* :func:`guided_backprop` -- Guided Backprop for any element-wise activation (a rule-set overlay);
* :func:`deeplift_shap` -- DeepLift with exact secant multipliers, averaged over baselines (:func:`deeplift`: one);
* :func:`guided_integrated_gradients` -- adaptive-path IG (Kapishnikov et al. 2021);
* :func:`greedy_pig` -- IG in rounds that fix the top-k features (Axiotis et al. 2023);
* :func:`pgd_attribution` -- VaPGD / PGDInp: the PGD adversarial perturbation as attribution (Yin et al. 2022).
"""

from .deeplift_shap import deeplift, deeplift_shap
from .greedy_pig import greedy_pig
from .guided_backprop import guided_backprop
from .guided_ig import guided_integrated_gradients
from .pgd import pgd_attribution

__all__ = ["guided_backprop", "deeplift", "deeplift_shap", "guided_integrated_gradients", "greedy_pig",
           "pgd_attribution"]

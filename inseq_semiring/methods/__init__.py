"""Gradient-based attribution methods on the engine (Captum-like): each ``<name>(fn, inputs, **options)`` returns a
tuple of attributions shaped like ``inputs``; ``fn(*inputs)`` returns a scalar or one scalar per batch row.

* :func:`guided_backprop` -- Guided Backprop for any element-wise activation (a rule-set overlay);
"""

from .guided_backprop import guided_backprop

__all__ = ["guided_backprop"]

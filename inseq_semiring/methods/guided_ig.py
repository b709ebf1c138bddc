"""Guided Integrated Gradients (Kapishnikov et al., CVPR 2021, "Guided Integrated Gradients: an Adaptive Path
Method for Removing Noise").

IG integrates the gradient along the straight line from the baseline ``x'`` to the input ``x``. Guided IG chooses
the path adaptively: at every step it moves the features whose gradient is *smallest* in magnitude, so that the
path avoids the regions where the gradient is large but noisy. With ``Δ = x - x'`` and the position of feature
``j`` on its own segment ``α_j = (p_j - x'_j) / Δ_j``, each of the ``steps`` steps (``t = 1..steps``):

1. take the gradient ``g = ∇f(p)`` at the current point ``p``;
2. the path may not stray further than ``max_dist`` (in α) from the straight line: features with
   ``α_j < t/steps - max_dist`` are moved up to that lower bound at once, and no feature moves past
   ``α_hi = min(t/steps + max_dist, 1)``;
3. the step must bring the L1 distance to the input down to ``‖Δ‖₁ (1 - t/steps)``: repeatedly select, among the
   features still below ``α_hi``, the ``fraction`` of all features with the smallest ``|g_j|`` (features already at
   ``α_hi`` count as infinitely large), and move them towards ``α_hi`` -- all the way, or by the share ``γ`` of the
   way that exactly meets the target;
4. every move adds ``(p_new - p_old) ⊙ g`` to the attribution.

``max_dist = 0`` or ``fraction = 1`` gives the straight line, i.e. IG by a left Riemann sum; ``max_dist = 1``
lets a feature reach the input before any other one starts. The sum of the attributions approaches
``f(x) - f(x')`` as ``steps`` grows (it is a Riemann sum along the chosen path). Rows of a batch (a root of shape
``(B,)``) are separate examples with their own paths; one gradient of the whole batch is taken per step.
Gradients are autograd's (the gradient the engine's gradient semiring equals).
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidInputError
from ._engine import (as_baselines, as_inputs, autograd_gradient, flat_rows, positive_int, row_count,
                      unflat_rows)

_WHERE = "guided_integrated_gradients"
_TOL = 1e-9


def _lower_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of a 1-D tensor taking the lower of two neighbours (an element of ``values``)."""
    return torch.kthvalue(values, int(math.floor(q * (values.numel() - 1))) + 1).values


def _guided_step(p, g, x, b, delta, t, steps, fraction, max_dist, l1_total):
    """Move one row ``p`` (in place) for step ``t``; return the attribution increment."""
    attr = torch.zeros_like(p)
    moving = delta != 0
    alpha = t / steps
    lo, hi = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    p_lo, p_hi = b + lo * delta, b + hi * delta
    target = l1_total * (1.0 - alpha)

    safe_delta = torch.where(moving, delta, torch.ones_like(delta))

    def position():
        return torch.where(moving, (p - b) / safe_delta, torch.full_like(p, hi))

    behind = position() < lo
    if bool(behind.any()):
        old = p.clone()
        p[behind] = p_lo[behind]
        attr += (p - old) * g
    while True:
        remaining = float((p - x).abs().sum())
        if remaining - target <= _TOL * max(1.0, l1_total):
            break
        free = moving & (position() < hi - 1e-12)
        if not bool(free.any()):
            break
        mag = torch.where(free, g.abs(), torch.full_like(g, math.inf))
        threshold = _lower_quantile(mag, fraction)
        chosen = free & (mag <= threshold) if math.isfinite(float(threshold)) else free
        room = float(((p_hi - p).abs() * chosen).sum())
        if room <= 0:
            break
        gamma = (remaining - target) / room
        old = p.clone()
        if gamma >= 1.0:
            p[chosen] = p_hi[chosen]
        else:
            p[chosen] = p[chosen] + gamma * (p_hi[chosen] - p[chosen])
        attr += (p - old) * g
        if gamma < 1.0:
            break
    return attr


def guided_integrated_gradients(fn, inputs, *, baselines=None, steps: int = 200, fraction: float = 0.25,
                                max_dist: float = 0.02, model: torch.nn.Module | None = None
                                ) -> tuple[torch.Tensor, ...]:
    """Guided IG for each input, shaped like it. ``baselines``: one tensor per input (default zeros);
    ``steps`` gradient evaluations; ``fraction`` of the features moved per selection; ``max_dist`` in [0, 1]."""
    inputs = as_inputs(inputs, _WHERE)
    base, *rest = as_baselines(baselines, inputs, _WHERE)
    if rest:
        raise InvalidInputError("Guided IG takes one baseline", where=_WHERE, fix="pass one tuple of baselines")
    positive_int(steps, "steps", _WHERE)
    if not 0 < float(fraction) <= 1:
        raise InvalidInputError(f"fraction must lie in (0, 1], got {fraction!r}", where=_WHERE, fix="e.g. 0.25")
    if not 0 <= float(max_dist) <= 1:
        raise InvalidInputError(f"max_dist must lie in [0, 1], got {max_dist!r}", where=_WHERE, fix="e.g. 0.02")
    root, grads = autograd_gradient(fn, base, model)  # the first step's gradient (the path starts at x')
    rows = row_count(inputs, root)
    x, b = flat_rows(inputs, rows), flat_rows(base, rows)
    delta = x - b
    l1 = delta.abs().sum(1)
    p = b.clone()
    attr = torch.zeros_like(x)
    for t in range(1, steps + 1):
        if t > 1:
            _, grads = autograd_gradient(fn, unflat_rows(p, inputs, rows), model)
        g = flat_rows(grads, rows)
        for r in range(rows):
            if float(l1[r]) == 0:
                continue
            row = p[r].clone()
            attr[r] += _guided_step(row, g[r], x[r], b[r], delta[r], t, steps, float(fraction), float(max_dist),
                                    float(l1[r]))
            p[r] = row
    return unflat_rows(attr, inputs, rows)

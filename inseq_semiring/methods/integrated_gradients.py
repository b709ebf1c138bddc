"""Integrated Gradients (Sundararajan et al., ICML 2017) by the midpoint Riemann rule, the building block of
:mod:`~inseq_semiring.methods.greedy_pig`: ``IG_j = Δ_j · (1/n) Σ_{i<n} ∂f/∂x_j (x' + (i + ½)/n · Δ)``."""

from __future__ import annotations

import torch

from ._engine import autograd_gradient


def integrated_gradients(fn, inputs: tuple[torch.Tensor, ...], baseline: tuple[torch.Tensor, ...], steps: int,
                         model=None, return_root: bool = False):
    """IG of each input (and, with ``return_root``, the root at the first path point: its shape gives the rows)."""
    total = [torch.zeros_like(x) for x in inputs]
    first = None
    for i in range(steps):
        a = (i + 0.5) / steps
        point = tuple(b + a * (x - b) for x, b in zip(inputs, baseline))
        root, grads = autograd_gradient(fn, point, model)
        first = root if first is None else first
        for acc, g in zip(total, grads):
            acc += g
    out = tuple((x - b) * acc / steps for x, b, acc in zip(inputs, baseline, total))
    return (out, first) if return_root else out

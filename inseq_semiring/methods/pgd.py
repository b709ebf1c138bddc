"""PGD attributions (Yin et al., ACL 2022, "On the Sensitivity and Stability of Model Interpretations in NLP"):
the adversarial perturbation of the input embeddings found by projected gradient descent, as an attribution.

A projected gradient descent on the perturbation ``δ`` (one per example, over all its input elements) decreases the
explained output ``f(x + δ)`` inside the ball ``‖δ‖ <= ε``:

    δ_0 = 0 (or uniform noise in the ball, ``random_start``, drawn from a generator seeded with ``seed``)
    δ_{t+1} = Π_ε(δ_t - η · d_t),   d_t = g_t / ‖g_t‖₂ (``norm="l2"``) or sign(g_t) (``norm="linf"``),
    g_t = ∇f(x + δ_t),   Π_ε: the projection onto the ε-ball (rescaling for l2, clipping for linf)

The attribution is the direction that lowers the output most, with the sign of a gradient:
``VaPGD = -δ_T`` (``variant="vapgd"``) and ``PGDInp = -δ_T ⊙ x`` (``variant="pgdinp"``, like gradient x input).
One small step from ``δ_0 = 0`` gives ``-δ_1 = η g / ‖g‖``, a multiple of the gradient. Cost: ``steps`` gradients.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from ..graph.model_state import attribution_mode
from ._engine import as_inputs, autograd_gradient, flat_rows, positive_int, row_count, unflat_rows

_WHERE = "pgd_attribution"


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Project each row of ``delta`` ([rows, features]) onto the ``norm`` ball of radius ``epsilon``."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    size = delta.norm(dim=1, keepdim=True)
    return delta * torch.where(size > epsilon, epsilon / size.clamp_min(1e-300), torch.ones_like(size))


def pgd_attribution(fn, inputs, *, epsilon: float = 0.1, steps: int = 10, step_size: float | None = None,
                    norm: str = "l2", variant: str = "vapgd", random_start: bool = False, seed: int = 0,
                    model: torch.nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """VaPGD / PGDInp attributions shaped like the inputs. ``step_size`` defaults to ``2.5 ε / steps``."""
    inputs = as_inputs(inputs, _WHERE)
    positive_int(steps, "steps", _WHERE)
    if norm not in ("l2", "linf"):
        raise InvalidInputError(f"norm must be 'l2' or 'linf', got {norm!r}", where=_WHERE, fix="norm='l2'")
    if variant not in ("vapgd", "pgdinp"):
        raise InvalidInputError(f"variant must be 'vapgd' or 'pgdinp', got {variant!r}", where=_WHERE,
                                fix="variant='vapgd'")
    if not float(epsilon) > 0:
        raise InvalidInputError(f"epsilon must be > 0, got {epsilon!r}", where=_WHERE, fix="e.g. epsilon=0.1")
    eta = 2.5 * float(epsilon) / steps if step_size is None else float(step_size)
    grads = None
    if random_start:
        gen = torch.Generator().manual_seed(seed)
        noise = tuple(torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1 for t in inputs)
    else:
        root, grads = autograd_gradient(fn, inputs, model)  # the first step's gradient (δ_0 = 0)
    if random_start:  # the number of rows needs the root: evaluate it once, without a gradient
        with torch.no_grad(), attribution_mode(model):
            root, grads = fn(*inputs), None
    rows = row_count(inputs, root)
    x = flat_rows(inputs, rows)
    delta = torch.zeros_like(x)
    if random_start:
        delta = project(flat_rows(noise, rows) * float(epsilon), float(epsilon), norm)
    for _ in range(steps):
        if grads is None:
            _, grads = autograd_gradient(fn, unflat_rows(x + delta, inputs, rows), model)
        g = flat_rows(grads, rows)
        grads = None
        if norm == "l2":
            direction = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
        else:
            direction = torch.sign(g)
        delta = project(delta - eta * direction, float(epsilon), norm)
    attr = -delta if variant == "vapgd" else -delta * x
    return unflat_rows(attr, inputs, rows)

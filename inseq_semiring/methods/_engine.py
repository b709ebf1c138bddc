"""Shared plumbing of the gradient methods: inputs and baselines, one engine sweep with a rule set, autograd gradients
for the path methods, and one generic Jacobian kind (:class:`Gated`) with the semiring that understands it.

* :class:`Gated` ``(inner, gate)``: the local Jacobian ``inner``, but the adjoint is passed through ``gate`` before the
  pull: ``a' = pull(inner, gate(a))``. A gate makes the backward pass non-linear in the adjoint (Guided Backprop's
  ``max(a, 0)``), so only the (+, x) semiring of this module (:class:`GatedGradient`) accepts it.
* :func:`engine_sweep`: record ``fn(*inputs)`` (or reuse a tape) and sweep it once with :class:`GatedGradient`
  under a given :class:`~inseq_semiring.rules.registry.RuleSet`; the model is in attribution mode while recording.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..api import _check_inputs, _check_root
from ..errors import InvalidInputError
from ..graph.model_state import attribution_mode
from ..graph.recorder import record
from ..graph.tape import Tape
from ..rules.registry import DEFAULT_RULES, RuleSet
from ..rules.weight_cache import sweep_scope
from ..semirings.base import linear_pull
from ..semirings.gradient import Gradient
from ..traversal import sweep


@dataclass(frozen=True, eq=False)
class Gated:
    """``inner`` with the adjoint mapped by ``gate`` first (e.g. ``max(a, 0)``)."""

    inner: object
    gate: Callable[[Tensor], Tensor]

    @property
    def in_shape(self):
        return self.inner.in_shape

    @property
    def out_shape(self):
        return self.inner.out_shape


class GatedGradient(Gradient):
    """The gradient semiring, plus :class:`Gated` edges (gate, then the ordinary linear pull)."""

    name = "gated-gradient"

    def pull(self, kind, value: Tensor, origin) -> Tensor:
        if isinstance(kind, Gated):
            return linear_pull(kind.inner, kind.gate(value))
        return linear_pull(kind, value)


def as_inputs(inputs, where: str) -> tuple[Tensor, ...]:
    try:
        return tuple(x.detach() for x in _check_inputs(inputs))
    except InvalidInputError as e:
        raise InvalidInputError(e.what, where=where, fix=e.fix) from None


def record_tape(fn, inputs: tuple[Tensor, ...], *, model=None, rules: RuleSet = DEFAULT_RULES) -> Tape:
    with attribution_mode(model):
        tape = record(fn, inputs, model=model, rules=rules)
    _check_root(tape)
    return tape


def engine_sweep(fn, inputs: tuple[Tensor, ...], rules: RuleSet, *, model=None, tape: Tape | None = None
                 ) -> tuple[Tensor, ...]:
    """``d~root/dx`` for each input under ``rules`` (one sweep of :class:`GatedGradient`)."""
    if tape is None:
        tape = record_tape(fn, inputs, model=model)
    ring = GatedGradient()
    with torch.no_grad(), sweep_scope():
        env = sweep(tape, ring, ring.seed(tape.root), rules=rules)
        return tuple(ring.finalize(env.get(tid), x) for tid, x in zip(tape.input_ids, inputs))


def autograd_gradient(fn, inputs: Sequence[Tensor], model=None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The root ``fn(*inputs)`` (detached) and its gradient w.r.t. each input (per-row roots are summed: rows are
    independent, so row ``b`` of the gradient is that row's own gradient)."""
    xs = tuple(x.detach().requires_grad_(True) for x in inputs)
    with attribution_mode(model), torch.enable_grad():
        root = fn(*xs)
        if not isinstance(root, Tensor) or root.dim() > 1:
            raise InvalidInputError("fn must return a scalar or one scalar per batch row (shape (B,))",
                                    where="inseq_semiring.methods", fix="reduce the output to the quantity to explain")
        grads = torch.autograd.grad(root.sum(), xs, allow_unused=True)
    grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs))
    return root.detach(), grads


def as_baselines(baselines, inputs: tuple[Tensor, ...], where: str) -> list[tuple[Tensor, ...]]:
    """Normalise ``baselines`` to a list of tuples shaped like ``inputs``: ``None`` -> ``[zeros]``; a tensor (one input)
    or a tuple of tensors -> one baseline; a list of those -> a distribution. Each tensor must broadcast to its input."""
    if baselines is None:
        return [tuple(torch.zeros_like(x) for x in inputs)]
    if isinstance(baselines, Tensor) or (isinstance(baselines, tuple) and all(isinstance(b, Tensor) for b in baselines)):
        baselines = [baselines]
    out = []
    for k, b in enumerate(baselines):
        b = (b,) if isinstance(b, Tensor) else tuple(b)
        if len(b) != len(inputs):
            raise InvalidInputError(f"baseline {k} has {len(b)} tensors but there are {len(inputs)} inputs",
                                    where=where,
                                    fix="give one baseline tensor per input (a tuple), or a list of tuples")
        row = []
        for i, (t, x) in enumerate(zip(b, inputs)):
            if not isinstance(t, Tensor):
                t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
            try:
                t = torch.broadcast_to(t.detach().to(dtype=x.dtype, device=x.device), x.shape).clone()
            except RuntimeError:
                raise InvalidInputError(f"baseline {k} for input {i} has shape {tuple(t.shape)}, which does not "
                                        f"broadcast to the input's shape {tuple(x.shape)}", where=where,
                                        fix="give baselines shaped like the inputs") from None
            if not bool(torch.isfinite(t).all()):
                raise InvalidInputError(f"baseline {k} for input {i} contains NaN or inf", where=where,
                                        fix="use finite baselines")
            row.append(t)
        out.append(tuple(row))
    if not out:
        raise InvalidInputError("an empty list of baselines", where=where, fix="give at least one baseline")
    return out


def positive_int(value, name: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}", where=where,
                                fix=f"pass {name}={max(minimum, 1)} or more")
    return value


def row_count(inputs: tuple[Tensor, ...], root: Tensor) -> int:
    """Batch rows when the root is one scalar per row (``(B,)``), else 1 (the whole input is one example)."""
    return int(root.shape[0]) if root.dim() == 1 else 1


def flat_rows(tensors: tuple[Tensor, ...], rows: int) -> Tensor:
    """Concatenate the inputs into ``[rows, features]`` (float64 for the path bookkeeping)."""
    return torch.cat([t.reshape(rows, -1).to(torch.float64) for t in tensors], dim=1)


def unflat_rows(flat: Tensor, like: tuple[Tensor, ...], rows: int) -> tuple[Tensor, ...]:
    out, start = [], 0
    for x in like:
        n = x.numel() // rows
        out.append(flat[:, start:start + n].reshape(x.shape).to(x.dtype))
        start += n
    return tuple(out)

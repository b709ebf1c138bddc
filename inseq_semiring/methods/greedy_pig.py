"""Greedy PIG (Axiotis et al., 2023, "Greedy PIG: Adaptive Integrated Gradients"): integrated gradients in rounds,
each round fixing the features it found most important.

Features are the input elements (``per_token=True``: the positions, i.e. every index but the last dimension, whose
score is the sum over the last dimension). With ``S`` the selected features (initially none), each of the ``rounds``
rounds:

1. the round's baseline is the baseline with the features in ``S`` set to the input: ``x'_S = x`` on ``S``,
   ``x'`` elsewhere (selected features are removed from the baseline);
2. ``a = IG(x; x'_S)`` with ``steps`` midpoint steps (features in ``S`` have ``Δ = 0`` and get 0);
3. the ``k`` unselected features with the largest score (``rank="value"``: ``a``; ``"abs"``: ``|a|``) join ``S``,
   and keep ``a`` as their final attribution.

After the last round the features never selected keep the last round's ``a``. One round is IG; the selected set
grows by ``k`` per round (fewer when no unselected feature is left). Rows of a batch (a root of shape ``(B,)``)
select their own features. Cost: ``rounds · steps`` gradients.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from ._engine import as_baselines, as_inputs, positive_int, row_count
from .integrated_gradients import integrated_gradients

_WHERE = "greedy_pig"


def _feature_scores(attr, rows, per_token):
    """``[rows, features]`` scores and, per input, the number of features it contributes."""
    parts = [a.sum(-1) if per_token else a for a in attr]
    return torch.cat([p.reshape(rows, -1).to(torch.float64) for p in parts], 1), [p.numel() // rows for p in parts]


def _expand(mask_flat, attr, rows, per_token, sizes):
    """Per-input element masks from a ``[rows, features]`` mask."""
    out, start = [], 0
    for a, n in zip(attr, sizes):
        m = mask_flat[:, start:start + n]
        start += n
        shape = a.shape[:-1] if per_token else a.shape
        m = m.reshape(shape)
        out.append(m.unsqueeze(-1).expand(a.shape) if per_token else m)
    return out


def greedy_pig(fn, inputs, *, baselines=None, rounds: int = 4, k: int = 1, steps: int = 32, rank: str = "value",
               per_token: bool = False, return_order: bool = False, model: torch.nn.Module | None = None):
    """Greedy PIG attributions, shaped like the inputs. ``return_order=True`` also returns, per input, the round
    (1-based) in which each feature was selected, 0 for never (shaped like the input)."""
    inputs = as_inputs(inputs, _WHERE)
    base, *more = as_baselines(baselines, inputs, _WHERE)
    if more:
        raise InvalidInputError("Greedy PIG takes one baseline", where=_WHERE, fix="pass one tuple of baselines")
    positive_int(rounds, "rounds", _WHERE)
    positive_int(k, "k", _WHERE)
    positive_int(steps, "steps", _WHERE)
    if rank not in ("value", "abs"):
        raise InvalidInputError(f"rank must be 'value' or 'abs', got {rank!r}", where=_WHERE, fix="rank='value'")
    final = [torch.zeros_like(x) for x in inputs]
    order_flat = None
    current = base
    for r in range(1, rounds + 1):
        attr, root = integrated_gradients(fn, inputs, current, steps, model, return_root=True)
        rows = row_count(inputs, root)
        scores, sizes = _feature_scores(attr, rows, per_token)
        if order_flat is None:
            order_flat = torch.zeros(scores.shape, dtype=torch.long)
        free = order_flat == 0
        key = scores if rank == "value" else scores.abs()
        key = torch.where(free, key, torch.full_like(key, -torch.inf))
        take = min(k, scores.shape[1])
        top = key.topk(take, dim=1).indices
        new = torch.zeros_like(free)
        new.scatter_(1, top, True)
        new &= free
        order_flat[new] = r
        last = r == rounds
        keep = _expand(new | (free if last else torch.zeros_like(free)), attr, rows, per_token, sizes)
        final = [torch.where(m, a, f) for m, a, f in zip(keep, attr, final)]
        selected = _expand(order_flat > 0, attr, rows, per_token, sizes)
        current = tuple(torch.where(m, x, b) for m, x, b in zip(selected, inputs, base))
    final = tuple(final)
    if return_order:
        order = tuple(o.to(torch.long) for o in _expand(order_flat, inputs, rows, per_token, sizes))
        return final, order
    return final

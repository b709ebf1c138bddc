"""Agreement with leave-one-out: ``loo_i = s(x) - s(x without token i)``, compared by Kendall's tau-b.

``tau_b = (n_c - n_d) / sqrt((n_0 - n_x) (n_0 - n_y))`` over the pairs ``i < j`` of removable tokens, with ``n_c``
/ ``n_d`` the concordant / discordant pairs (``sign(x_i - x_j) sign(y_i - y_j) = +1 / -1``), ``n_0 = n(n-1)/2``,
``n_x`` / ``n_y`` the pairs tied in ``x`` / in ``y``. NaN when a side is constant (the denominator is 0) or
``n < 2``. Exact ties only (no tolerance).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["kendall_tau_b"]


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long score lists (O(n^2), float64)."""
    a = torch.as_tensor(list(x), dtype=torch.float64)
    b = torch.as_tensor(list(y), dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"kendall_tau_b: {a.numel()} and {b.numel()} scores; give two lists of the same length")
    n = a.numel()
    if n < 2 or bool(a.isnan().any()) or bool(b.isnan().any()):
        return float("nan")
    iu = torch.triu_indices(n, n, offset=1)
    sa = torch.sign(a[iu[0]] - a[iu[1]])
    sb = torch.sign(b[iu[0]] - b[iu[1]])
    n0 = n * (n - 1) // 2
    nx = int((sa == 0).sum())
    ny = int((sb == 0).sum())
    s = float((sa * sb).sum())  # n_c - n_d (pairs tied in either give 0)
    den = math.sqrt((n0 - nx) * (n0 - ny))
    return s / den if den > 0 else float("nan")

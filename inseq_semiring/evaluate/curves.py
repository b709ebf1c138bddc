"""MoRF / LeRF deletion curves and the area between them (ABPC).

For a ranking ``r_1, ..., r_n`` of the removable tokens (most relevant first):

* ``MoRF_k = s(x without r_1..r_k)``, ``LeRF_k = s(x without r_{n-k+1}..r_n)``, ``k = 0..n`` (``k = 0``: the full
  score; ``MoRF_n = LeRF_n``: every removable token removed);
* ``abpc = (1/n) sum_{k=1..n} (LeRF_k - MoRF_k)``.

:func:`curve_sets` lists the removal sets, so that a whole example is scored by one batched forward
(comprehensiveness and sufficiency at every fraction are points of these curves).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["curve_sets", "abpc"]


def curve_sets(order: Sequence[int]) -> tuple[list[frozenset], list[frozenset]]:
    """``(morf, lerf)``: for ``k = 0..n`` the set of positions removed (``morf[k]``: the first ``k`` of ``order``;
    ``lerf[k]``: the last ``k``)."""
    n = len(order)
    morf = [frozenset(order[:k]) for k in range(n + 1)]
    lerf = [frozenset(order[n - k:]) for k in range(n + 1)]
    return morf, lerf


def abpc(morf: Sequence[float], lerf: Sequence[float]) -> float:
    """``mean_{k=1..n} (LeRF_k - MoRF_k)`` (NaN for ``n = 0``)."""
    n = len(morf) - 1
    if n <= 0:
        return float("nan")
    return float(sum(lerf[k] - morf[k] for k in range(1, n + 1)) / n)

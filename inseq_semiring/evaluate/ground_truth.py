"""Ground-truth metrics, where the data marks the relevant tokens ``R`` (a set of positions).

For the ranking ``r_1, ..., r_n`` of the removable tokens:

* ``hit@1 = 1 if r_1 in R else 0``;
* ``rr = 1 / min{i : r_i in R}`` (0 when no relevant token is ranked).
"""

from __future__ import annotations

from typing import Collection, Sequence

__all__ = ["hit_at_1", "reciprocal_rank"]


def hit_at_1(order: Sequence[int], relevant: Collection[int]) -> float:
    """1.0 if the top-ranked position is relevant, else 0.0."""
    return 1.0 if order and order[0] in set(relevant) else 0.0


def reciprocal_rank(order: Sequence[int], relevant: Collection[int]) -> float:
    """``1 / rank`` of the best-ranked relevant position (ranks from 1), 0.0 if none is ranked."""
    rel = set(relevant)
    for i, p in enumerate(order, start=1):
        if p in rel:
            return 1.0 / i
    return 0.0

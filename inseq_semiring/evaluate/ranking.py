"""Ranking and the exact top fraction.

* ``rank(scores, removable)``: the removable positions ordered by score, descending; ties by position (earlier
  first); NaN scores rank last (then by position).
* ``k_of(f, n) = ceil(f * n)`` computed in exact rational arithmetic on the decimal string of ``f``
  (``k_of(0.14, 50) == 7``; the float product 7.000000000000001 would give 8).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

__all__ = ["rank", "k_of", "check_fractions"]


def rank(scores: Sequence[float], removable: Sequence[int]) -> list[int]:
    """Positions of ``removable`` sorted by ``scores[position]`` descending, ties broken by position, NaN last."""
    def key(p: int):
        v = float(scores[p])
        return (1, 0.0, p) if math.isnan(v) else (0, -v, p)

    return sorted(removable, key=key)


def _exact(f) -> Fraction:
    if isinstance(f, Fraction):
        return f
    if isinstance(f, float):
        return Fraction(repr(f))  # the shortest decimal that round-trips: 0.14 -> 14/100
    return Fraction(str(f))


def k_of(f, n: int) -> int:
    """``ceil(f * n)``, exactly: ``f`` is read as the decimal it is written as."""
    return math.ceil(_exact(f) * n)


def check_fractions(fractions: Sequence) -> tuple[float, ...]:
    """The fractions as floats, each in (0, 1], without repeats (raises ``ValueError`` naming the bad one)."""
    out = []
    for f in fractions:
        try:
            q = _exact(f)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"fraction {f!r} is not a number; give fractions in (0, 1], e.g. 0.1,0.2") from None
        if not 0 < q <= 1:
            raise ValueError(f"fraction {f!r} is outside (0, 1]; give fractions such as 0.1,0.2,0.3")
        if float(q) in out:
            raise ValueError(f"fraction {f!r} is given twice")
        out.append(float(q))
    if not out:
        raise ValueError("no fractions given; e.g. 0.1,0.2,0.3,0.4,0.5")
    return tuple(out)

"""Comprehensiveness and sufficiency (DeYoung et al. 2020), from the deletion curves.

With ``s`` the full score, ``MoRF_k`` the score after removing the ``k`` top-ranked tokens and ``LeRF_k`` the
score after removing the ``k`` bottom-ranked ones (:mod:`.curves`), and ``k = k(f) = ceil(f n)``:

* ``comp(f) = s(x) - s(x without top_f) = s - MoRF_k``;
* ``suff(f) = s(x) - s(top_f only) = s - LeRF_{n-k}`` (keeping the top ``k`` is removing the other ``n - k``;
  ``LeRF_0 = s``);
* ``aopc_comp = mean_f comp(f)``, ``aopc_suff = mean_f suff(f)``.
"""

from __future__ import annotations

from typing import Sequence

from .ranking import k_of

__all__ = ["comprehensiveness", "sufficiency", "aopc"]


def comprehensiveness(full: float, morf: Sequence[float], f) -> float:
    """``comp(f) = s - MoRF_{k(f)}``; ``morf[k]`` is the score with the top ``k`` removed (``morf[0] = s``)."""
    n = len(morf) - 1
    return float(full - morf[k_of(f, n)])


def sufficiency(full: float, lerf: Sequence[float], f) -> float:
    """``suff(f) = s - LeRF_{n - k(f)}``; ``lerf[k]`` is the score with the bottom ``k`` removed (``lerf[0] = s``)."""
    n = len(lerf) - 1
    return float(full - lerf[n - k_of(f, n)])


def aopc(values: Sequence[float]) -> float:
    """The area over the perturbation curve at the given fractions: the mean of the values."""
    return float(sum(values) / len(values)) if len(values) else float("nan")

"""Signed (max, x) / (min, x) pulls through row-dense Jacobians without the dense Jacobian.

Every output ``i`` of a row offers the input ``j`` the two candidates ``J_ij M+_i`` and ``J_ij M-_i``; the signed
max-path semiring keeps ``M+'_j = max`` and ``M-'_j = min`` over the reachable outputs ``i`` (``M+_i`` finite) of
the row, each with the smallest ``i`` among ties. Both ``J`` below separate, so the pull needs no ``[n, n]`` block:

* rank one plus diagonal (softmax, log-softmax), ``J = diag(d) + u v^T``: off the diagonal
  ``J_ij m = v_j (u_i m)``, so with ``T+_i = max(u_i M+_i, u_i M-_i)`` and ``T-_i = min(...)`` the best off-diagonal
  candidate for ``j`` is ``v_j max_{i != j} T+_i`` (``v_j > 0``), ``v_j min_{i != j} T-_i`` (``v_j < 0``) or ``0``
  from the first reachable ``i != j`` (``v_j = 0``): the best and second-best ``T+`` / ``T-`` of the row and its
  first two reachable positions give all of them, O(n) per row. The diagonal ``(d_j + u_j v_j) M_j`` is compared
  separately (the smaller index wins a tie).
* layer norm, ``J = diag(gain) C`` with the symmetric core ``C``: ``J_ij m = C_ij (gain_i m)``, and for a fixed
  ``C_ij`` the larger candidate is ``C_ij max(gain_i M+_i, gain_i M-_i)`` when ``C_ij >= 0`` (else the smaller one):
  one walk over the row's pairs for both ``M+`` and ``M-``
  (:func:`~inseq_semiring.kernels.signed_rowcore.signed_core_pull`).

Floating point: a candidate is rounded as ``v_j (u_i m)`` (resp. ``C_ij (gain_i m)``) instead of ``(u_i v_j) m``;
a product by one number is monotone, so the winner is the same up to candidates within one rounding of each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.signed_rowcore import signed_core_pull, signed_rank1_pull
from ..rules.jacobians import LayerNormRow, RowDense
from .base import _first_extreme


def _top2(t: Tensor, largest: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best and second-best over the last dim (distinct positions), each at its smallest position among ties."""
    b1, a1 = _first_extreme(t, largest)
    fill = float("-inf") if largest else float("inf")
    b2, a2 = _first_extreme(t.scatter(-1, a1.unsqueeze(-1), fill), largest)
    return b1.unsqueeze(-1), a1.unsqueeze(-1), b2.unsqueeze(-1), a2.unsqueeze(-1)


def _off_diagonal(t: Tensor, largest: bool, pos: Tensor) -> tuple[Tensor, Tensor]:
    """For each position j of a row: the best of ``t`` over ``i != j`` and the smallest such ``i``."""
    b1, a1, b2, a2 = _top2(t, largest)
    own = pos == a1
    return torch.where(own, b2, b1), torch.where(own, a2, a1)


def signed_rank1(kind: RowDense, hi: Tensor, lo: Tensor, backend: str | None = None):
    """``(M+', flat argmax, M-', flat argmin)`` through ``J = diag(d) + u v^T`` (rank one, weights as they are).
    CPU float32/float64: the C++ walk (:func:`~inseq_semiring.kernels.signed_rowcore.signed_rank1_pull`) unless
    ``backend="torch"``; this function's torch code otherwise."""
    n = hi.shape[-1]
    u, v, d = kind.u[0], kind.v[0], kind.d
    rows = torch.arange(hi.numel() // n, device=hi.device).reshape(hi.shape[:-1]).unsqueeze(-1) * n
    fast = signed_rank1_pull(d, u, v, hi, lo) if backend != "torch" else None
    if fast is not None:
        return fast[0], rows + fast[1], fast[2], rows + fast[3]
    reach = torch.isfinite(hi)
    h = torch.where(reach, hi, torch.zeros_like(hi))
    l = torch.where(reach, lo, torch.zeros_like(lo))
    inf = torch.full_like(h, float("inf"))
    th, tl = u * h, u * l
    t_max = torch.where(reach, torch.maximum(th, tl), -inf)  # unreachable outputs offer nothing
    t_min = torch.where(reach, torch.minimum(th, tl), inf)
    pos = torch.arange(n, device=hi.device)
    best_max, arg_max = _off_diagonal(t_max, True, pos)
    best_min, arg_min = _off_diagonal(t_min, False, pos)
    _, first_reach = _off_diagonal(reach.to(h.dtype), True, pos)  # the first reachable i != j (v_j = 0)
    others = reach.sum(-1, keepdim=True) - reach.to(torch.long) > 0  # some reachable i != j

    positive, negative = v > 0, v < 0
    off_hi = torch.where(positive, v * best_max, torch.where(negative, v * best_min, v * torch.zeros_like(h)))
    arg_hi = torch.where(positive, arg_max, torch.where(negative, arg_min, first_reach))
    off_lo = torch.where(positive, v * best_min, torch.where(negative, v * best_max, v * torch.zeros_like(h)))
    arg_lo = torch.where(positive, arg_min, torch.where(negative, arg_max, first_reach))
    off_hi = torch.where(others, off_hi, -inf)
    off_lo = torch.where(others, off_lo, inf)
    if n == 1:
        off_hi, off_lo = -inf, inf

    jd = d + u * v  # the diagonal entry, as the dense Jacobian has it
    c1, c2 = jd * h, jd * l
    diag_hi = torch.where(reach, torch.maximum(c1, c2), -inf)
    diag_lo = torch.where(reach, torch.minimum(c1, c2), inf)
    take_hi = (diag_hi > off_hi) | ((diag_hi == off_hi) & (pos < arg_hi)) | ~reach.any(-1, keepdim=True)
    take_lo = (diag_lo < off_lo) | ((diag_lo == off_lo) & (pos < arg_lo)) | ~reach.any(-1, keepdim=True)
    out_hi = torch.where(take_hi, diag_hi, off_hi)
    out_lo = torch.where(take_lo, diag_lo, off_lo)
    return out_hi, rows + torch.where(take_hi, pos, arg_hi), out_lo, rows + torch.where(take_lo, pos, arg_lo)


def signed_layernorm(kind: LayerNormRow, hi: Tensor, lo: Tensor, index: bool = True):
    """``(M+', flat argmax, M-', flat argmin)`` through ``J = diag(gain) C`` (one walk over each row's pairs); the
    args are None when ``index`` is False."""
    n = hi.shape[-1]
    reach = torch.isfinite(hi)
    g = kind.gain
    ph = torch.where(reach, g * hi, torch.zeros_like(hi))
    pl = torch.where(reach, g * lo, torch.zeros_like(lo))
    nan = torch.full_like(ph, float("nan"))  # the kernel's "no candidate"
    p_max = torch.where(reach, torch.maximum(ph, pl), nan)
    p_min = torch.where(reach, torch.minimum(ph, pl), nan)
    out_hi, arg_hi, out_lo, arg_lo = signed_core_pull(kind.xh, p_max, p_min, index=index)
    if arg_hi is None:
        return out_hi, None, out_lo, None
    rows = torch.arange(hi.numel() // n, device=hi.device).reshape(hi.shape[:-1]).unsqueeze(-1) * n
    return out_hi, rows + arg_hi, out_lo, rows + arg_lo


def fast_signed_rowdense(kind, hi: Tensor, lo: Tensor, index: bool = True):
    """The separable pull for ``kind`` if it has one (weights as they are), else None (the caller goes dense)."""
    if isinstance(kind, RowDense) and kind.entry_map is None and kind.u.shape[0] == 1:
        return signed_rank1(kind, hi, lo)
    if isinstance(kind, LayerNormRow) and kind.entry_map is None:
        return signed_layernorm(kind, hi, lo, index)
    return None

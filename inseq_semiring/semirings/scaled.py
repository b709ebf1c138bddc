"""Additive semirings on non-negative weights, kept in a per-tensor scaled representation.

A value is ``Scaled(z, u, log_scale)`` meaning ``Z = z * exp(log_scale)`` and ``U = u * exp(log_scale)``;
``z`` is renormalised to max 1 after every pull that weighs or sums entries (the others fold their scale into
``log_scale``, see :class:`ScaledSum`), so 30-layer models neither overflow nor underflow the tensor's dtype.
``flow`` uses only ``Z`` (edge ``|w|``); ``entropy`` is the expectation semiring on ``<Z, U>`` with edge
``<|w|, -|w| log|w|>``, ``<a, b> (x) <c, d> = <ac, ad + bc>``, and ``H = U/Z + log Z`` (nats).
The ``0 log 0 = 0`` convention lives in :func:`~inseq_semiring.semirings.base.neg_w_log_w` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.xlogx import pointwise_pull, rank1_pull
from ..rules import jacobians as _jacobians
from ..rules.jacobians import IndexMap, Pointwise, RowDense
from .base import Semiring, abs_weight, linear_pull, neg_w_log_w, scaled_pulls, sum_to_shape  # noqa: F401
from .weight_maps import abs_and_neg_w_log_w


@dataclass(frozen=True)
class Scaled:
    z: Tensor
    u: Tensor | None
    log_scale: Tensor  # 0-dim float64

    def log_z(self) -> Tensor:
        """``log Z`` per element (``-inf`` where ``Z = 0``), in float64."""
        return torch.log(self.z.double()) + self.log_scale


def _renormalise(z: Tensor, u: Tensor | None, log_scale: Tensor, *, fresh: bool = False,
                 z_max: Tensor | None = None) -> Scaled:
    """Divide ``z`` (and ``u``) by ``max z`` and add its log to ``log_scale`` (a zero ``z`` is left as it is).
    ``fresh``: ``z`` and ``u`` are new tensors owned by the caller, divided in place. ``z_max``: ``max z`` when the
    pull already has it. On CPU the max is read as a number (no device to wait for) and a max of exactly 1 costs
    nothing more; elsewhere it stays a tensor."""
    if z.numel() == 0:
        return Scaled(z, u, log_scale)
    m = z.amax() if z_max is None else z_max
    if _jacobians.reads_on_host(z):
        mf = float(m)
        if mf <= 0 or mf == 1.0 or mf != mf:
            return Scaled(z, u, log_scale)
        if fresh:
            z.div_(mf)
            if u is not None:
                u.div_(mf)
        else:
            z, u = z / mf, None if u is None else u / mf
        return Scaled(z, u, log_scale + math.log(mf))
    m = torch.where(m > 0, m, torch.ones_like(m))
    if u is not None:
        u = u / m
    return Scaled(z / m, u, log_scale + torch.log(m.double()))


def _is_fresh(t: Tensor | None, *inputs: Tensor | None) -> bool:
    """``t`` is a new tensor (not a view, not one of ``inputs``): safe to update in place."""
    return t is None or (t._base is None and all(t is not x for x in inputs))


def _cpu_scalar(w: Tensor) -> float | None:
    """The value of a 0-dim CPU weight as a number (None otherwise: no host read of a device tensor)."""
    return float(w) if w.dim() == 0 and _jacobians.reads_on_host(w) else None


def _neg_xlogx(s: float) -> float:
    a = abs(s)
    return 0.0 if a == 0.0 else -a * math.log(a)


class ScaledSum(Semiring):
    """Shared arithmetic of :class:`Flow` and :class:`Entropy`.

    Renormalisation is folded into the pulls: a pull that only moves or copies entries (a structural index map of
    weight 1, a scalar weight without broadcast) cannot raise ``max z``, and a scalar weight ``s`` goes into
    ``log_scale`` as ``log |s|`` (``U`` gains ``z (-|s| log |s|) / |s|``); only pulls that sum or weigh entries
    renormalise. ``plus`` leaves the sum unnormalised (its max is at most the number of terms). So ``max z`` may
    drift below 1 or up to a count between renormalisations, far inside the dtype's range.
    """

    with_u = False

    def seed(self, root: Tensor) -> Scaled:
        zero = torch.zeros((), dtype=torch.float64, device=root.device)
        return Scaled(torch.ones_like(root), torch.zeros_like(root) if self.with_u else None, zero)

    def pull(self, kind, value: Scaled, origin) -> Scaled:
        u = value.u if self.with_u else None
        if isinstance(kind, IndexMap) and kind.weight == 1.0:  # -1 log 1 = 0: both parts move alike
            z2 = linear_pull(kind, value.z)
            u2 = None if u is None else linear_pull(kind, u)
            if kind.injective or kind.identity:
                return Scaled(z2, u2, value.log_scale)
            return _renormalise(z2, u2, value.log_scale, fresh=True)
        if isinstance(kind, Pointwise):
            return self._pull_pointwise(kind, value.z, u, value.log_scale)
        if isinstance(kind, RowDense) and kind.entry_map is None and kind.u.shape[0] == 1:
            out = rank1_pull(kind.d, kind.u[0], kind.v[0], value.z, u)  # compiled, maps in registers (CPU)
            if out is not None:
                return _renormalise(out[0], out[1], value.log_scale, fresh=True)
        z2, u2 = scaled_pulls(kind, value.z, u)
        return _renormalise(z2, u2, value.log_scale, fresh=_is_fresh(z2, value.z, u) and _is_fresh(u2, value.z, u))

    def _pull_pointwise(self, kind: Pointwise, z: Tensor, u: Tensor | None, log_scale: Tensor) -> Scaled:
        """``z' = z |w|``, ``u' = u |w| + z (-|w| log |w|)``, summed over broadcast dims."""
        s = _cpu_scalar(kind.weight)
        same = tuple(kind.in_shape) == tuple(kind.out_shape) == tuple(z.shape)
        if s is not None and s != 0.0 and s == s and abs(s) != math.inf:
            c = _neg_xlogx(s) / abs(s)
            if same:  # z' = z, u' = u + c z, scale |s|
                u2 = u if u is None or c == 0.0 else torch.add(u, z, alpha=c)
                return Scaled(z, u2, log_scale + math.log(abs(s)))
            z2 = sum_to_shape(z, kind.in_shape)
            u2 = None if u is None else sum_to_shape(u if c == 0.0 else torch.add(u, z, alpha=c), kind.in_shape)
            return _renormalise(z2, u2, log_scale + math.log(abs(s)), fresh=_is_fresh(z2, z, u) and _is_fresh(u2, z, u))
        w = kind.weight
        if (tuple(w.shape) == tuple(z.shape) == tuple(kind.in_shape)
                and not (w.requires_grad and torch.is_grad_enabled())
                and (fused := pointwise_pull(w, z, u)) is not None):  # compiled: one pass, maps in L1
            return _renormalise(fused[0], fused[1], log_scale, fresh=True, z_max=fused[2])
        if u is None:
            z2 = sum_to_shape(z * kind.weight.abs(), kind.in_shape)
            return _renormalise(z2, None, log_scale, fresh=True)
        a, nl = abs_and_neg_w_log_w(kind.weight)
        z2 = sum_to_shape(z * a, kind.in_shape)
        u2 = sum_to_shape(torch.addcmul(u * a, z, nl), kind.in_shape)
        return _renormalise(z2, u2, log_scale, fresh=True)

    def cast(self, value: Scaled, dtype: torch.dtype) -> Scaled:
        return Scaled(value.z.to(dtype), None if value.u is None else value.u.to(dtype), value.log_scale)

    def plus(self, a: Scaled, b: Scaled) -> Scaled:
        if _jacobians.reads_on_host(a.log_scale):  # scale factors as numbers: the larger side is taken as it is
            la, lb = float(a.log_scale), float(b.log_scale)
            if la < lb:
                a, b, la, lb = b, a, lb, la
            fb = math.exp(lb - la)
            z = torch.add(a.z, b.z, alpha=fb) if fb != 1.0 else a.z + b.z
            u = None
            if self.with_u:
                u = torch.add(a.u, b.u, alpha=fb) if fb != 1.0 else a.u + b.u
            return Scaled(z, u, a.log_scale)
        top = torch.maximum(a.log_scale, b.log_scale)
        fa = torch.exp(a.log_scale - top).to(a.z.dtype)
        fb = torch.exp(b.log_scale - top).to(b.z.dtype)
        u = a.u * fa + b.u * fb if self.with_u else None
        return Scaled(a.z * fa + b.z * fb, u, top)


class Flow(ScaledSum):
    """``Z(x) = sum over paths of prod |w|``: total absolute gradient flow (no cancellation).

    Returned in float64 whatever the model's dtype: a 30-layer model's flow reaches ``e^380``, far past float32.
    ``log Z`` is available as ``value.log_z()`` on the raw value.
    """

    name = "flow"

    def finalize(self, value: Scaled | None, like: Tensor) -> Tensor:
        if value is None:
            return torch.zeros_like(like, dtype=torch.float64)
        return value.z.double() * torch.exp(value.log_scale)


class Entropy(ScaledSum):
    """Entropy of the path distribution ``p(pi) ~ |w_pi|`` over paths ending at each element (0 where Z = 0)."""

    name = "entropy"
    with_u = True

    def finalize(self, value: Scaled | None, like: Tensor) -> Tensor:
        if value is None:
            return torch.zeros_like(like)
        return entropy_of(value.z, value.u, value.log_scale).to(like.dtype)


def entropy_of(z: Tensor, u: Tensor, log_scale: Tensor) -> Tensor:
    """``H = U/Z + log Z`` element-wise in float64, 0 where ``Z = 0``."""
    z, u = z.double(), u.double()
    safe = torch.where(z > 0, z, torch.ones_like(z))
    h = u / safe + torch.log(safe) + log_scale
    return torch.where(z > 0, h, torch.zeros_like(h))


def pooled_entropy(value: Scaled, dims) -> Tensor:
    """Entropy of the paths ending anywhere in ``dims`` (sum ``Z`` and ``U`` over ``dims``, then ``U/Z + log Z``)."""
    return entropy_of(value.z.sum(dims), value.u.sum(dims), value.log_scale)

"""Additive semirings on non-negative weights, kept in a per-tensor scaled representation.

A value is ``Scaled(z, u, log_scale)`` meaning ``Z = z * exp(log_scale)`` and ``U = u * exp(log_scale)``;
``z`` is renormalised to max 1 after every operation, so 30-layer models neither overflow nor underflow the
tensor's dtype. ``flow`` uses only ``Z`` (edge ``|w|``); ``entropy`` is the expectation semiring on ``<Z, U>``
with edge ``<|w|, -|w| log|w|>``, ``<a, b> (x) <c, d> = <ac, ad + bc>``, and ``H = U/Z + log Z`` (nats).
The ``0 log 0 = 0`` convention lives in :func:`~inseq_semiring.semirings.base.neg_w_log_w` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Semiring, abs_weight, neg_w_log_w, scaled_pulls  # noqa: F401  (weight maps re-exported)


@dataclass(frozen=True)
class Scaled:
    z: Tensor
    u: Tensor | None
    log_scale: Tensor  # 0-dim float64

    def log_z(self) -> Tensor:
        """``log Z`` per element (``-inf`` where ``Z = 0``), in float64."""
        return torch.log(self.z.double()) + self.log_scale


def _renormalise(z: Tensor, u: Tensor | None, log_scale: Tensor) -> Scaled:
    m = z.amax() if z.numel() else z.new_ones(())
    m = torch.where(m > 0, m, torch.ones_like(m))
    if u is not None:
        u = u / m
    return Scaled(z / m, u, log_scale + torch.log(m.double()))


class ScaledSum(Semiring):
    """Shared arithmetic of :class:`Flow` and :class:`Entropy`."""

    with_u = False

    def seed(self, root: Tensor) -> Scaled:
        zero = torch.zeros((), dtype=torch.float64, device=root.device)
        return Scaled(torch.ones_like(root), torch.zeros_like(root) if self.with_u else None, zero)

    def pull(self, kind, value: Scaled, origin) -> Scaled:
        z, u = scaled_pulls(kind, value.z, value.u if self.with_u else None)
        return _renormalise(z, u, value.log_scale)

    def cast(self, value: Scaled, dtype: torch.dtype) -> Scaled:
        return Scaled(value.z.to(dtype), None if value.u is None else value.u.to(dtype), value.log_scale)

    def plus(self, a: Scaled, b: Scaled) -> Scaled:
        top = torch.maximum(a.log_scale, b.log_scale)
        fa = torch.exp(a.log_scale - top).to(a.z.dtype)
        fb = torch.exp(b.log_scale - top).to(b.z.dtype)
        u = a.u * fa + b.u * fb if self.with_u else None
        return _renormalise(a.z * fa + b.z * fb, u, top)


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

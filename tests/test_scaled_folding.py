"""Renormalisation folded into the pulls of flow and entropy (semirings/scaled.py): the fast paths (a scalar weight
moves only ``log_scale``, a structural index map moves entries, ``plus`` sums without renormalising) give the values
of the general path (the same weight as a full tensor), and long chains stay inside the dtype's range."""

import math

import pytest
import torch

from inseq_semiring.api import make_semiring
from inseq_semiring.rules.jacobians import IndexMap, Pointwise
from inseq_semiring.semirings.scaled import Scaled

torch.set_num_threads(1)
ORIGIN = (0, 0, 0)


def _value(ring, shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if ring.with_u else None
    return Scaled(z, u, torch.tensor(3.0, dtype=torch.float64))


def _real(v: Scaled):
    z = v.z.double() * torch.exp(v.log_scale)
    return z, (None if v.u is None else v.u.double() * torch.exp(v.log_scale))


def _close(a: Scaled, b: Scaled, rtol=1e-12):
    (za, ua), (zb, ub) = _real(a), _real(b)
    torch.testing.assert_close(za, zb, rtol=rtol, atol=0)
    if ua is not None:
        torch.testing.assert_close(ua, ub, rtol=rtol, atol=1e-300)


@pytest.mark.parametrize("name", ["flow", "entropy"])
@pytest.mark.parametrize("s", [0.125, -3.0, 1.0, -1.0, 7e-30])
@pytest.mark.parametrize("broadcast", [False, True])
def test_scalar_weight_equals_the_full_tensor_weight(name, s, broadcast):
    ring = make_semiring(name)
    out_shape, in_shape = torch.Size([4, 5]), (torch.Size([1, 5]) if broadcast else torch.Size([4, 5]))
    v = _value(ring, out_shape, 1)
    fast = ring.pull(Pointwise(torch.tensor(s, dtype=torch.float64), in_shape, out_shape), v, ORIGIN)
    full = ring.pull(Pointwise(torch.full(out_shape, s, dtype=torch.float64), in_shape, out_shape), v, ORIGIN)
    _close(fast, full)
    if not broadcast:  # no entry moved or summed: z is kept and the scale goes into log_scale
        assert fast.z is v.z
        assert math.isclose(float(fast.log_scale), 3.0 + math.log(abs(s)), rel_tol=1e-15)


@pytest.mark.parametrize("name", ["flow", "entropy"])
def test_plus_across_scales_equals_float64(name):
    ring = make_semiring(name)
    a, b = _value(ring, (3, 4), 2), _value(ring, (3, 4), 3)
    b = Scaled(b.z, b.u, torch.tensor(-40.0, dtype=torch.float64))  # e^-43 below a
    got = ring.plus(a, b)
    (za, ua), (zb, ub) = _real(a), _real(b)
    zg, ug = _real(got)
    torch.testing.assert_close(zg, za + zb, rtol=1e-14, atol=0)
    if ua is not None:
        torch.testing.assert_close(ug, ua + ub, rtol=1e-14, atol=0)
    _close(ring.plus(a, b), ring.plus(b, a), rtol=1e-15)


@pytest.mark.parametrize("name", ["flow", "entropy"])
def test_fan_out_chain_stays_finite_in_float32(name):
    """300 sums of 8 copies each (8^300 overall, far past float32): non-injective index maps renormalise."""
    ring = make_semiring(name)
    v = _value(ring, torch.Size([8]), 4, torch.float32)
    fan = IndexMap(torch.zeros(8, dtype=torch.long), torch.Size([1]))  # y_0..y_7 = x_0: x_0 gets the sum
    spread = IndexMap(torch.zeros(8, dtype=torch.long), torch.Size([1]))
    x = ring.pull(fan, v, ORIGIN)
    for _ in range(300):
        x = ring.pull(spread, Scaled(x.z.expand(8).contiguous(), None if x.u is None else x.u.expand(8).contiguous(),
                                     x.log_scale), ORIGIN)
    assert bool(torch.isfinite(x.z).all()) and float(x.z.abs().max()) <= 1.0
    z0 = float(v.z.double().sum())
    assert math.isclose(float(x.log_scale) + math.log(float(x.z)), 3.0 + math.log(z0) + 300 * math.log(8),
                        rel_tol=1e-6)


@pytest.mark.parametrize("name", ["flow", "entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tensor_weight_pull_equals_the_tensor_formulas(name, dtype):
    """The compiled one-pass pointwise pull (kernels/xlogx.pointwise_pull) gives ``z |w|`` and
    ``u |w| + z (-|w| log |w|)`` divided by ``max z |w|``, down to zeros and subnormal weights."""
    ring = make_semiring(name)
    shape = torch.Size([3, 1100])  # more than one of the kernel's chunks
    v = _value(ring, shape, 4, dtype)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    tiny = torch.finfo(dtype).smallest_normal
    w[0, :4] = torch.tensor([0.0, tiny / 8, -tiny / 1024, -1.0], dtype=dtype)
    got = ring.pull(Pointwise(w, shape, shape), v, ORIGIN)
    a = w.double().abs()
    z = v.z.double() * a
    m = float(z.max())
    rtol = 1e-15 if dtype == torch.float64 else 2e-7
    torch.testing.assert_close(got.z.double(), z / m, rtol=rtol, atol=tiny)  # atol: subnormal z
    assert math.isclose(float(got.log_scale), 3.0 + math.log(m), rel_tol=1e-15 if dtype == torch.float64 else 1e-7)
    if ring.with_u:
        u = v.u.double() * a - v.z.double() * torch.xlogy(a, a)
        scale = float((v.u.double().abs() * a + v.z.double() * (a * a.log().abs()).nan_to_num()).max()) / m
        worst = float(((got.u.double() - u / m).abs()).max()) / scale
        assert worst <= (1e-15 if dtype == torch.float64 else 4e-7), worst

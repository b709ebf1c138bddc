"""The fused max-times kernels against brute-force references: |b| taken while packing (``max_times_abs``), the
signed pair (``max_min_pair``), strided / transposed / expanded ``b`` read in place, and the index-free layer-norm
walks (``index=False``) against the indexed ones."""

from __future__ import annotations

import pytest
import torch

from inseq_semiring.kernels import maxtimes as mt
from inseq_semiring.kernels.maxtimes import active_backend, fuses, max_min_pair, max_times, max_times_abs, min_times
from inseq_semiring.kernels.rowcore import core_pull_max
from inseq_semiring.kernels.signed_rowcore import signed_core_pull

torch.set_num_threads(1)

DTYPES = [torch.float32, torch.float64]
# odd shapes: m not a multiple of the register tile, n not a multiple of the vector width, k across k-blocks (256)
SHAPES = [(1, 1, 1), (1, 7, 5), (5, 300, 37), (13, 33, 129), (7, 513, 3)]


def _products(a, b):
    return a.unsqueeze(-1) * b.unsqueeze(-3)  # [*batch, m, k, n]


def _first_index(prod, target):
    hit = (prod == target.unsqueeze(-2)).to(torch.uint8)
    assert bool(hit.any(-2).all())
    return hit.argmax(-2)


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv(mt.NO_EXT_ENV, "1")
    else:
        monkeypatch.delenv(mt.NO_EXT_ENV, raising=False)
        if active_backend() != "cpp":
            pytest.skip("C++ max-times kernel not available")
    return request.param


def _weights(k, n, dtype, layout, g, batch=()):
    """``b`` [*batch, k, n] in a given memory layout: contiguous, transposed (a Linear weight), column slice,
    expanded over the batch (stride 0)."""
    if layout == "contiguous":
        return torch.randn(*batch, k, n, generator=g, dtype=dtype)
    if layout == "transposed":
        return torch.randn(*batch, n, k, generator=g, dtype=dtype).transpose(-1, -2)
    if layout == "sliced":
        return torch.randn(*batch, k, 2 * n + 3, generator=g, dtype=dtype)[..., 1:2 * n + 1:2]
    if layout == "expanded":
        return torch.randn(k, n, generator=g, dtype=dtype).expand(*batch, k, n)
    raise ValueError(layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_max_times_abs_matches_reference(backend, dtype, shape, layout):
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randn(m, k, generator=g, dtype=dtype)
    b = _weights(k, n, dtype, layout, g)
    prod = _products(a, b.abs())
    vals, idx = max_times_abs(a, b, argmax=True)
    assert torch.equal(vals, prod.amax(-2))
    assert torch.equal(idx, _first_index(prod, vals))
    assert torch.equal(max_times_abs(a, b), vals)
    assert torch.equal(max_times(a, b, argmax=True)[0], _products(a, b).amax(-2))  # plain kernel, strided b


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_times_abs_ties_keep_smallest_index(backend, dtype):
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 3, (9, 300), generator=g).to(dtype)
    b = torch.randint(-2, 3, (40, 300), generator=g).to(dtype).T  # many ties, |b| folds signs together
    prod = _products(a, b.abs())
    vals, idx = max_times_abs(a, b, argmax=True)
    assert torch.equal(vals, prod.amax(-2))
    assert torch.equal(idx, _first_index(prod, vals))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_times_batched_strided_and_expanded(backend, dtype):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 6, 70, generator=g, dtype=dtype)
    for layout in ("contiguous", "transposed", "sliced", "expanded"):
        b = _weights(70, 19, dtype, layout, g, batch=(3,))
        vals, idx = max_times(a, b, argmax=True)
        prod = _products(a, b)
        assert torch.equal(vals, prod.amax(-2)), layout
        assert torch.equal(idx, _first_index(prod, vals)), layout
        assert torch.equal(max_times_abs(a, b), _products(a, b.abs()).amax(-2)), layout


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_times_abs_nonfinite_and_zeros(backend, dtype):
    a = torch.tensor([[0.0, 1.0, 2.0], [float("-inf"), 0.0, 1.0], [float("nan"), 1.0, 1.0], [0.0, 0.0, 0.0]],
                     dtype=dtype)
    b = torch.tensor([[-1.0, 0.0], [-2.0, float("inf")], [3.0, -0.0]], dtype=dtype).T.contiguous().T
    want = max_times(a, b.abs().contiguous(), _backend="torch")
    got = max_times_abs(a, b)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert torch.equal(got[ok], want[ok])
    empty = max_times_abs(torch.ones(2, 0, dtype=dtype), torch.ones(0, 3, dtype=dtype))
    assert torch.equal(empty, torch.full((2, 3), float("-inf"), dtype=dtype))


def _pair_reference(h, l, b):
    ph, pl = _products(h, b), _products(l, b)
    return torch.maximum(ph, pl).amax(-2), torch.minimum(ph, pl).amin(-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_max_min_pair_matches_reference(backend, dtype, shape, layout):
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    h = torch.randn(m, k, generator=g, dtype=dtype)
    l = h - torch.rand(m, k, generator=g, dtype=dtype)
    h[:, ::3] = 0.0  # zeros (absent elements enter as 0) and negative rows
    l[:, ::3] = 0.0
    b = _weights(k, n, dtype, layout, g)
    hi, lo = max_min_pair(h, l, b)
    want_hi, want_lo = _pair_reference(h, l, b)
    assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)
    # the same as the four-product form it replaces
    assert torch.equal(hi, torch.maximum(max_times(h, b), max_times(l, b)))
    assert torch.equal(lo, torch.minimum(min_times(h, b), min_times(l, b)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_min_pair_unordered_batched_and_expanded(backend, dtype):
    g = torch.Generator().manual_seed(5)
    h, l = torch.randn(2, 2, 9, 300, generator=g, dtype=dtype), torch.randn(2, 2, 9, 300, generator=g, dtype=dtype)
    for b in (torch.randn(2, 2, 300, 21, generator=g, dtype=dtype),
              torch.randn(300, 21, generator=g, dtype=dtype).expand(2, 2, 300, 21)):
        hi, lo = max_min_pair(h, l, b)  # no order between h and l is assumed
        want_hi, want_lo = _pair_reference(h, l, b)
        assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_min_pair_nonfinite_falls_back(backend, dtype):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(4, 10, generator=g, dtype=dtype)
    l = h - 1
    h[0, 2], l[1, 3] = float("inf"), float("-inf")
    b = torch.randn(10, 6, generator=g, dtype=dtype)
    b[5, 0] = 0.0  # inf * 0 = NaN where it meets the infinite entries
    hi, lo = max_min_pair(h, l, b)
    want_hi = torch.maximum(max_times(h, b, _backend="torch"), max_times(l, b, _backend="torch"))
    want_lo = torch.minimum(min_times(h, b, _backend="torch"), min_times(l, b, _backend="torch"))
    for got, want in ((hi, want_hi), (lo, want_lo)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.equal(got[ok], want[ok])


def test_fuses_only_for_cpu_float():
    a = torch.ones(2, 3, dtype=torch.float32)
    assert fuses(a, torch.ones(3, 4, dtype=torch.float32)) == (active_backend() == "cpp")
    assert not fuses(a, torch.ones(3, 4, dtype=torch.float64))  # mixed dtypes: the general path
    assert not fuses(a.to(torch.int64), torch.ones(3, 4, dtype=torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_walks_without_index_give_the_same_values(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 45, generator=g, dtype=dtype)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, unbiased=False)
    p = torch.rand(6, 45, generator=g, dtype=dtype)
    p[2] = 0.0  # a dead row
    v, i = core_pull_max(x, p)
    v2, i2 = core_pull_max(x, p, index=False)
    assert torch.equal(v, v2) and (i2 is None or torch.equal(i, i2))
    q = p - torch.rand(6, 45, generator=g, dtype=dtype)
    q[4, ::2] = p[4, ::2] = float("nan")  # outputs that offer nothing
    full = signed_core_pull(x, p, q)
    vals = signed_core_pull(x, p, q, index=False)
    assert torch.equal(full[0], vals[0]) and torch.equal(full[2], vals[2])
    assert (vals[1] is None and vals[3] is None) or (torch.equal(full[1], vals[1]) and torch.equal(full[3], vals[3]))

"""The one-read products with both entropy maps of a weight (kernels/xlogx.py ``pair_products``):
``(a1 @ |W|, a2 @ (-|W| log |W|))`` equal to the float64 formulas for float32 and float64, odd shapes (tails of a
vector, one column, column blocks, the row counts of the register-tiled kernel), zeros in W and in the factors
(0 log 0 = 0), subnormal weights, either factor absent, strided operands; and the blocked path of ``mapped_mm_pair``
still equal when the kernel is not taken."""

import pytest
import torch

from inseq_semiring.kernels import xlogx
from inseq_semiring.semirings import weight_maps as wm

torch.set_num_threads(1)

SHAPES = [(37, 5, 2, 1), (130, 1031, 1, 3), (5, 1, 0, 2), (3, 17, 4, 0), (1000, 768, 2, 1),
          # the row counts with a register-tiled kernel (whole chunks, single vectors and a padded tail)
          (70, 100, 0, 1), (64, 300, 4, 2), (33, 129, 1, 0), (20, 50, 1, 1), (45, 97, 2, 0)]


def _ref(a1, a2, w):
    a = w.double().abs()
    nlogn = -torch.xlogy(a, a)
    return (None if a1 is None else a1.double() @ a), (None if a2 is None else a2.double() @ nlogn), a, nlogn


def _case(n, k, r1, r2, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + n * 7 + k)
    w = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
    w[::3, ::2] = 0.0  # 0 log 0 = 0
    w[1, 0] = torch.finfo(dtype).tiny / 4  # subnormal: outside the vector log's range
    a1 = torch.rand(r1, n, generator=g, dtype=torch.float64).to(dtype) if r1 else None
    a2 = torch.rand(r2, n, generator=g, dtype=torch.float64).to(dtype) if r2 else None
    for a in (a1, a2):
        if a is not None:
            a[:, 2:4] = 0.0  # rows of w with no coefficient are skipped
    return a1, a2, w


def _check(got, want, factor, mapped, rtol):
    if want is None:
        assert got is None
        return
    scale = factor.double() @ mapped + 1e-300  # the size of the terms (all non-negative)
    assert got.dtype == factor.dtype and got.shape == want.shape
    assert float(((got.double() - want).abs() / scale).max()) <= rtol


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_pair_products_equal_the_formulas(shape, dtype, rtol, backend):
    if backend == "cpp" and xlogx.EXTENSION.load() is None:
        pytest.skip("no C++ toolchain")
    if backend == "torch" and dtype == torch.float32:
        rtol = 1e-5  # plain float32 products (the kernel flushes its float partial sums into double)
    n, k, r1, r2 = shape
    a1, a2, w = _case(n, k, r1, r2, dtype)
    got1, got2 = xlogx.pair_products(a1, a2, w, backend=backend)
    want1, want2, a, nlogn = _ref(a1, a2, w)
    _check(got1, want1, a1, a, rtol)
    _check(got2, want2, a2, a * (1 + a.clamp_min(1e-300).log().abs()), rtol)


def test_pair_products_strided_operands():
    """A column slice of W (row stride > k) and factors that are slices of a bigger tensor."""
    if xlogx.EXTENSION.load() is None:
        pytest.skip("no C++ toolchain")
    big = torch.randn(50, 70, dtype=torch.float64)
    w = big[:, 3:64]
    f = torch.rand(6, 50, dtype=torch.float64)
    got1, got2 = xlogx.pair_products(f[::2], f[1:2], w, backend="cpp")
    want1, want2, _, _ = _ref(f[::2], f[1:2], w)
    torch.testing.assert_close(got1, want1, rtol=1e-13, atol=0)
    torch.testing.assert_close(got2, want2, rtol=1e-13, atol=0)
    tw = torch.randn(40, 30, dtype=torch.float64).t()  # a transposed weight is copied, same values
    torch.testing.assert_close(xlogx.pair_products(None, f[:2, :30], tw, backend="cpp")[1],
                               _ref(None, f[:2, :30], tw)[1], rtol=1e-13, atol=0)


def test_pair_products_zero_factors_and_all_zero_weight():
    if xlogx.EXTENSION.load() is None:
        pytest.skip("no C++ toolchain")
    w = torch.zeros(9, 33)
    a = torch.rand(2, 9)
    o1, o2 = xlogx.pair_products(a, a[:1], w, backend="cpp")
    assert torch.equal(o1, torch.zeros(2, 33)) and torch.equal(o2, torch.zeros(1, 33))
    w = torch.randn(9, 33)
    o1, o2 = xlogx.pair_products(torch.zeros(2, 9), torch.zeros(1, 9), w, backend="cpp")
    assert torch.equal(o1, torch.zeros(2, 33)) and torch.equal(o2, torch.zeros(1, 33))


@pytest.mark.parametrize("rows_limit", [0, 8])
def test_mapped_mm_pair_with_and_without_the_kernel(monkeypatch, rows_limit):
    """``mapped_mm_pair`` gives the same products whether the one-read kernel (few rows) or the blocked maps
    (kernel threshold 0, blocks of two rows) are used."""
    monkeypatch.setattr(wm, "PAIR_KERNEL_ROWS", rows_limit)
    monkeypatch.setattr(wm, "PAIR_KERNEL_COLUMNS", 1)
    monkeypatch.setattr(wm, "BLOCK_ELEMENTS", 2 * 13)
    a1, a2, w = _case(29, 13, 2, 1, torch.float64)
    got1, got2 = wm.mapped_mm_pair(a1, a2, w)
    want1, want2, _, _ = _ref(a1, a2, w)
    torch.testing.assert_close(got1, want1, rtol=1e-13, atol=0)
    torch.testing.assert_close(got2, want2, rtol=1e-13, atol=0)


def _rank1_kinds(dtype):
    """Softmax rows (with a masked 0 and a subnormal probability) and log-softmax rows, as the rules build them."""
    from inseq_semiring.rules.jacobians import RowDense

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 19, generator=g, dtype=torch.float64) * 3
    x[..., 0] = -float("inf")  # a masked position: probability exactly 0
    y = torch.softmax(x, -1).to(dtype)
    y[0, 0, 1] = torch.finfo(dtype).tiny / 8
    s = torch.softmax(x[..., 1:], -1).to(dtype)
    return {"softmax": RowDense(y, (-y).unsqueeze(0), y.unsqueeze(0)),
            "log_softmax": RowDense(torch.ones_like(s), -torch.ones_like(s).unsqueeze(0), s.unsqueeze(0))}


@pytest.mark.parametrize("with_u", [True, False])
@pytest.mark.parametrize("which", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_rank1_pull_equals_the_tensor_formulas(which, dtype, rtol, with_u):
    """``rank1_pull`` (compiled) against ``scaled_pulls`` (tensor formulas, in float64), rows of zeros included."""
    from inseq_semiring.semirings.base import scaled_pulls

    if xlogx.EXTENSION.load() is None:
        pytest.skip("no C++ toolchain")
    kind = _rank1_kinds(dtype)[which]
    g = torch.Generator().manual_seed(6)
    z = torch.rand(kind.d.shape, generator=g, dtype=torch.float64).to(dtype)
    u = (torch.randn(kind.d.shape, generator=g, dtype=torch.float64)).to(dtype) if with_u else None
    z[1, 2] = 0.0
    if u is not None:
        u[1, 2] = 0.0  # a row that carries nothing
    got_z, got_u = xlogx.rank1_pull(kind.d, kind.u[0], kind.v[0], z, u)
    k64 = type(kind)(kind.d.double(), kind.u.double(), kind.v.double())
    want_z, want_u = scaled_pulls(k64, z.double(), None if u is None else u.double())
    assert got_z.dtype == dtype and bool((got_z[1, 2] == 0).all())
    scale_z = want_z.abs().amax(-1, keepdim=True) + 1e-300
    assert float(((got_z.double() - want_z).abs() / scale_z).max()) <= rtol
    if u is None:
        assert got_u is None
        return
    # the size of u's terms: |u| |J| + z (|J| (1 + |log |J||)), bounded row-wise by the same formulas on |u|
    mag_z, mag_u = scaled_pulls(k64, z.double() * 8, u.double().abs())
    scale_u = (mag_u.abs() + mag_z).amax(-1, keepdim=True) + 1e-300
    assert float(((got_u.double() - want_u).abs() / scale_u).max()) <= rtol


def test_rank1_pull_declines_what_it_does_not_cover():
    y = torch.softmax(torch.randn(2, 5), -1)
    assert xlogx.rank1_pull(y.half(), -y.half(), y.half(), y.half(), None) is None  # no half kernel
    assert xlogx.rank1_pull(y, -y, y, y.double(), None) is None  # mixed dtypes


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_a_product_with_a_computed_factor_equals_the_formulas(left, layout):
    """The entropy pull through a batched product whose weight is a computed tensor (attention's ``q k^T``, ``p v``):
    ``z |W|`` and ``u |W| + z (-|W| log|W|)`` against the float64 formulas, for the weight layouts attention makes
    (a batched transpose of a contiguous tensor, a strided view into a fused projection)."""
    from inseq_semiring.rules.jacobians import MatMul
    from inseq_semiring.semirings.base import scaled_pulls

    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 7, 30, generator=g, dtype=torch.float64).to(torch.float32)
    base[0, 1, :5] = 0.0
    w = {"contiguous": base[..., :9].contiguous(), "transposed": base[..., :7].transpose(-1, -2),
         "strided": base[..., 2:11]}[layout]  # [3, 7, 9] in each layout
    b, n, k = w.shape
    rows = 4
    z = torch.rand(b, rows, n, generator=g) if left else torch.rand(b, k, rows, generator=g)
    u = torch.rand(z.shape, generator=g)
    in_shape = torch.Size([b, rows, k] if left else [b, n, rows])
    kind = MatMul(w, left, in_shape, torch.Size(z.shape))
    got_z, got_u = scaled_pulls(kind, z, u)
    a = w.double().abs()
    nl = -torch.xlogy(a, a)
    if left:
        want_z, want_u = z.double() @ a, u.double() @ a + z.double() @ nl
    else:
        want_z, want_u = a @ z.double(), a @ u.double() + nl @ z.double()
    assert got_z.shape == got_u.shape == in_shape
    torch.testing.assert_close(got_z.double(), want_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_u.double(), want_u, rtol=1e-5, atol=1e-6)

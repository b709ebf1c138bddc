"""Tests of the fused layer-norm core pulls (``inseq_semiring.kernels.rowcore``), both backends."""

from __future__ import annotations

import warnings

import pytest
import torch

from inseq_semiring.kernels import rowcore as rc
from inseq_semiring.kernels.extension import CompiledExtension
from inseq_semiring.kernels.rowcore import active_backend, core_pull_max, core_pull_sum

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# float64 references (dense [R, n, n]; small sizes only)
# ------------------------------------------------------------------------------------------


def ref_core(xh: torch.Tensor) -> torch.Tensor:
    """``C`` in float64. Test rows hold float32-representable values, so ``xh_i xh_j`` is exact in
    float64 and every entry is within ~1 ulp (the diagonal is exact when ``xh_i^2 == n - 1``)."""
    x = xh.double()
    n = x.shape[-1]
    c = -(1.0 + x.unsqueeze(-1) * x.unsqueeze(-2)) / n
    c.diagonal(dim1=-2, dim2=-1).copy_((n - 1 - x * x) / n)
    return c


def core_magnitude(xh: torch.Tensor) -> torch.Tensor:
    """Size of the terms of ``C_ij`` before cancellation: the scale of its rounding errors."""
    x = xh.double()
    n = x.shape[-1]
    return (1.0 + (x.unsqueeze(-1) * x.unsqueeze(-2)).abs()) / n + torch.eye(n, dtype=torch.float64)


def ref_sum(xh, p, q=None, pb=None):
    """(zA, uAB) and per-entry error scales (the size of the terms before any cancellation)."""
    c = ref_core(xh)
    a = c.abs()
    b = -torch.xlogy(a, a)
    a_mag = core_magnitude(xh)
    b_mag = a_mag * (1.0 + torch.log(torch.maximum(a, 1e-7 * a_mag)).abs())

    def pull(v, m):
        return torch.bmm(v.double().unsqueeze(-2), m).squeeze(-2)

    z, z_scale = pull(p, a), pull(p.abs(), a_mag)
    u = u_scale = None
    if q is not None or pb is not None:
        u = torch.zeros_like(z)
        u_scale = torch.zeros_like(z)
        if q is not None:
            u += pull(q, a)
            u_scale += pull(q.abs(), a_mag)
        if pb is not None:
            u += pull(pb, b)
            u_scale += pull(pb.abs(), b_mag)
    return z, u, z_scale, u_scale


def ref_max_products(xh, p):
    """``[R, i, j] = p_i |C_ij|`` in float64."""
    return p.double().unsqueeze(-1) * ref_core(xh).abs()


def first_index(prod, vals):
    return (prod == vals.unsqueeze(-2)).to(torch.uint8).argmax(-2)


def assert_close_scaled(out, ref, scale, rtol, what):
    err = (out.double() - ref).abs()
    bound = rtol * scale + 1e-300
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output"
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the bound (rtol={rtol})"


def rtol_for(backend, dtype):
    if dtype == torch.float64:
        return 1e-13
    return 1e-6 if backend == "cpp" else 1e-5


# ------------------------------------------------------------------------------------------
# backend selection: "cpp" (compiled) or "torch" (forced through the environment variable)
# ------------------------------------------------------------------------------------------


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv(rc.NO_EXT_ENV, "1")
        assert active_backend() == "torch"
    else:
        monkeypatch.delenv(rc.NO_EXT_ENV, raising=False)
        if active_backend() != "cpp":
            pytest.skip("the C++ extension could not be built here")
    used = []
    real_sum, real_max = rc._torch_sum, rc._torch_max
    monkeypatch.setattr(rc, "_torch_sum", lambda *a: used.append("torch") or real_sum(*a))
    monkeypatch.setattr(rc, "_torch_max", lambda *a: used.append("torch") or real_max(*a))
    yield request.param
    if request.param == "cpp":
        assert not used, "the torch backend was used although the C++ one was expected"


def make_rows(n: int, dtype, seed: int):
    """Rows of assorted kinds; float32-representable values (see ref_core)."""
    g = torch.Generator().manual_seed(seed)
    R = 8
    x = torch.randn(R, n, generator=g, dtype=torch.float64)
    x[4] = torch.nn.functional.layer_norm(x[4], (n,))  # a normalised row
    x[5] *= 3.0
    xh = x.float().to(dtype)
    p = torch.randn(R, n, generator=g).to(dtype)
    q = torch.randn(R, n, generator=g).to(dtype)
    pb = torch.rand(R, n, generator=g).to(dtype)
    p[1] = q[1] = pb[1] = 0  # an all-zero row: skipped
    p[2] = 0  # p zero, q/pb not: uAB still needed
    p[3] = q[3] = 0  # only pb
    q[6] = pb[6] = 0  # only p
    p[7, ::2] = 0
    return xh, p, q, pb


NS = [1, 2, 3, 17, 64]
QB = ["p", "pq", "pb", "pqb"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("which", QB)
def test_sum_matches_reference(backend, dtype, n, which):
    xh, p, q, pb = make_rows(n, dtype, seed=n)
    q = q if "q" in which else None
    pb = pb if "b" in which else None
    z, u = core_pull_sum(xh, p, q, pb)
    zr, ur, zs, us = ref_sum(xh, p, q, pb)
    assert z.shape == xh.shape and z.dtype == dtype
    rtol = rtol_for(backend, dtype)
    assert_close_scaled(z, zr, zs, rtol, "zA")
    assert torch.equal(z[1], torch.zeros(n, dtype=dtype))
    if q is None and pb is None:
        assert u is None
    else:
        assert u.shape == xh.shape and u.dtype == dtype
        assert_close_scaled(u, ur, us, rtol, "uAB")
        assert torch.equal(u[1], torch.zeros(n, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", NS)
def test_max_matches_reference(backend, dtype, n):
    xh, p, _, _ = make_rows(n, dtype, seed=100 + n)
    p = p.abs()
    vals, argi = core_pull_max(xh, p)
    prod = ref_max_products(xh, p)
    ref = prod.amax(-2)
    assert vals.shape == xh.shape and vals.dtype == dtype
    assert argi.shape == xh.shape and argi.dtype == torch.int64
    assert int(argi.min()) >= 0 and int(argi.max()) < n
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    scale = (p.double().unsqueeze(-1) * core_magnitude(xh)).amax(-2) + 1e-300  # rounding scale
    assert float(((vals.double() - ref).abs() / scale).max()) <= tol
    picked = torch.gather(prod, -2, argi.unsqueeze(-2)).squeeze(-2)
    assert float(((picked - ref).abs() / scale).max()) <= 2 * tol  # the index attains the max
    # the smallest such index, wherever the max is clear of rounding-level near-ties
    near = prod >= (ref - 4 * tol * scale).unsqueeze(-2)
    clear = near.sum(-2) == 1
    assert torch.equal(argi[clear], first_index(prod, ref)[clear])
    # the all-zero row: vals 0 and the smallest index attaining 0
    assert torch.equal(vals[1], torch.zeros(n, dtype=dtype)) and torch.equal(argi[1], torch.zeros(n, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_accuracy_long_rows(backend, dtype):
    """n = 768, R = 4: the float32 pulls stay close to the float64 reference (the C++ kernel
    flushes its float32 partial sums into float64)."""
    xh, p, q, pb = make_rows(768, dtype, seed=7)
    xh, p, q, pb = xh[:4], p[:4], q[:4], pb[:4]
    z, u = core_pull_sum(xh, p, q, pb)
    zr, ur, zs, us = ref_sum(xh, p, q, pb)
    rtol = rtol_for(backend, dtype)
    assert_close_scaled(z, zr, zs, rtol, "zA")
    assert_close_scaled(u, ur, us, rtol, "uAB")
    vals, argi = core_pull_max(xh, p.abs())
    ref = ref_max_products(xh, p.abs()).amax(-2)
    scale = (p.abs().double().unsqueeze(-1) * core_magnitude(xh)).amax(-2) + 1e-300
    assert float(((vals.double() - ref).abs() / scale).max()) <= (1e-6 if dtype == torch.float32 else 1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_zeros_of_core(backend, dtype):
    """0 log 0 = 0: entries with 1 + xh_i xh_j == 0 (and c_ii == 0) exactly give no NaN."""
    # n = 2, xh = [1, -1]: C is exactly zero
    xh = torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=dtype)
    p = torch.tensor([[1.0, 2.0], [0.5, 0.25]], dtype=dtype)
    z, u = core_pull_sum(xh, p, p, p)
    assert torch.equal(z, torch.zeros_like(z)) and torch.equal(u, torch.zeros_like(u))
    vals, argi = core_pull_max(xh, p)
    assert torch.equal(vals, torch.zeros_like(vals)) and torch.equal(argi, torch.zeros_like(argi))
    # n = 5, xh_0 = 2 (c_00 = (5 - 1 - 4) / 5 = 0), xh_1 = -1/2 (1 + xh_0 xh_1 = 0)
    xh = torch.tensor([[2.0, -0.5, 0.25, -1.0, 1.5]], dtype=dtype)
    e0 = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]], dtype=dtype)
    z, u = core_pull_sum(xh, e0, None, e0)  # z = A[0, :], u = B[0, :]
    assert z[0, 0] == 0 and z[0, 1] == 0 and u[0, 0] == 0 and u[0, 1] == 0
    c = ref_core(xh)[0, 0].abs()
    tol = 1e-15 if dtype == torch.float64 else 1e-7
    assert torch.allclose(z[0].double(), c, rtol=tol, atol=0)
    assert torch.allclose(u[0].double(), -torch.xlogy(c, c), rtol=20 * tol, atol=0)
    g = torch.Generator().manual_seed(3)
    p, q, pb = (torch.rand(1, 5, generator=g).to(dtype) for _ in range(3))
    z, u = core_pull_sum(xh, p, q, pb)
    zr, ur, zs, us = ref_sum(xh, p, q, pb)
    rtol = rtol_for(backend, dtype)
    assert_close_scaled(z, zr, zs, rtol, "zA")
    assert_close_scaled(u, ur, us, rtol, "uAB")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_argmax_tie_rule(backend, dtype):
    n = 40
    # row 0: xh = 0, so every off-diagonal |C_ij| = 1/n (exact ties); p = 1 on S, 0 elsewhere.
    # For j outside S the candidates i in S tie -> the smallest, 3 (it reaches j < 3 from above,
    # j > 33 from below, and the j in between from both sides); j in S: the diagonal (n-1)/n wins.
    S = [3, 7, 20, 33]
    xh = torch.zeros(3, n, dtype=dtype)
    p = torch.zeros(3, n, dtype=dtype)
    p[0, S] = 1.0
    # row 1: xh alternates +-1, p = e_0: |C_0j| = 0 for odd j, so every candidate of an odd j is
    # 0 and the smallest i (0) wins; even j > 0 get 2/n from i = 0.
    xh[1] = torch.tensor([1.0, -1.0] * (n // 2), dtype=dtype)
    p[1, 0] = 1.0
    # row 2: xh = 0, p = 1: the diagonal (n-1)/n beats the off-diagonal ties at 1/n
    p[2] = 1.0
    vals, argi = core_pull_max(xh, p)
    exp0 = torch.full((n,), 3, dtype=torch.int64)
    exp0[S] = torch.tensor(S)
    assert argi[0].tolist() == exp0.tolist()
    assert torch.equal(vals[0, S], torch.full((len(S),), (n - 1) / n, dtype=dtype))
    exp1 = torch.zeros(n, dtype=torch.int64)
    assert argi[1].tolist() == exp1.tolist()
    assert (vals[1, 1::2] == 0).all() and (vals[1, 2::2] > 0).all()
    assert argi[2].tolist() == list(range(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_argmax_ties_across_vector_lanes(backend, dtype):
    """Ties between candidates in different vector lanes and inner-loop steps (n = 100; for the
    output 0 the tie at j = 99 sits in a lower lane than the one at j = 5)."""
    n = 100
    xh = torch.zeros(1, n, dtype=dtype)
    p = torch.zeros(1, n, dtype=dtype)
    ties = [5, 6, 22, 37, 54, 71, 99]
    p[0, ties] = 0.5
    vals, argi = core_pull_max(xh, p)
    for j in range(n):
        expect = j if j in ties else 5
        assert int(argi[0, j]) == expect, j


def test_batched_rows_noncontiguous_and_promotion(backend):
    g = torch.Generator().manual_seed(5)
    xh = torch.randn(2, 3, 9, generator=g).float()
    p = torch.rand(9, 6, generator=g, dtype=torch.float64).T.reshape(2, 3, 9)  # non-contiguous
    q = torch.randn(2, 3, 9, generator=g)
    z, u = core_pull_sum(xh, p, q)
    assert z.shape == (2, 3, 9) and z.dtype == torch.float64 and u.dtype == torch.float64
    zr, ur, zs, us = ref_sum(xh.reshape(6, 9), p.reshape(6, 9), q.reshape(6, 9))
    assert_close_scaled(z.reshape(6, 9), zr, zs, 1e-13, "zA")
    assert_close_scaled(u.reshape(6, 9), ur, us, 1e-13, "uAB")
    vals, argi = core_pull_max(xh, p)
    assert vals.shape == (2, 3, 9) and argi.shape == (2, 3, 9)


def test_empty_inputs(backend):
    for shape in [(0, 5), (3, 0)]:
        xh = torch.zeros(shape)
        z, u = core_pull_sum(xh, xh, xh, xh)
        assert z.shape == shape and u.shape == shape
        v, i = core_pull_max(xh, xh)
        assert v.shape == shape and i.shape == shape


def test_threads_do_not_change_results():
    if active_backend() != "cpp":
        pytest.skip("the C++ extension could not be built here")
    xh, p, q, pb = make_rows(64, torch.float32, seed=11)
    one = core_pull_sum(xh, p, q, pb), core_pull_max(xh, p.abs())
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = core_pull_sum(xh, p, q, pb), core_pull_max(xh, p.abs())
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------
# the C++ kernel's log
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-7), (torch.float64, 1e-15)])
def test_fast_log_accuracy(dtype, tol):
    """Relative error of the kernel's vector log (vs log of the same input, in float64)."""
    ext = rc._load_ext() if active_backend() == "cpp" else None
    if ext is None:
        pytest.skip("the C++ extension could not be built here")
    g = torch.Generator().manual_seed(0)
    lo = -37 if dtype == torch.float32 else -300
    x = torch.cat(
        [
            10.0 ** (lo + (2 - lo) * torch.rand(200_000, generator=g, dtype=torch.float64)),  # wide range
            1.0 + (torch.rand(100_000, generator=g, dtype=torch.float64) - 0.5) * 0.9,  # around 1
            1.0 + (torch.rand(100_000, generator=g, dtype=torch.float64) - 0.5) * 1e-5,  # log ~ 0
            torch.tensor([2.0**-0.5, 2.0**0.5, 0.5, 2.0, 1 / 768, 767 / 768]),
        ]
    ).to(dtype)
    x = x[(x > 0) & (x != 1)]
    y = ext.fast_log_cpu(x).double()
    r = torch.log(x.double())
    assert float(((y - r).abs() / r.abs()).max()) <= tol
    assert torch.equal(ext.fast_log_cpu(torch.ones(3, dtype=dtype)), torch.zeros(3, dtype=dtype))
    z = ext.fast_log_cpu(torch.zeros(20, dtype=dtype))  # finite, so 0 * log 0 == 0
    assert bool(torch.isfinite(z).all()) and bool(((0 * z) == 0).all())


# ------------------------------------------------------------------------------------------
# arguments, backend selection, build handling
# ------------------------------------------------------------------------------------------


def test_shape_mismatch_names_the_shapes():
    xh = torch.zeros(3, 4)
    with pytest.raises(ValueError) as ei:
        core_pull_sum(xh, torch.zeros(3, 5))
    assert "(3, 4)" in str(ei.value) and "(3, 5)" in str(ei.value)
    with pytest.raises(ValueError) as ei:
        core_pull_sum(xh, torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4, 3))
    assert "pb.shape=(4, 3)" in str(ei.value) and "xh.shape=(3, 4)" in str(ei.value)
    with pytest.raises(ValueError) as ei:
        core_pull_max(xh, torch.zeros(2, 4))
    assert "(3, 4)" in str(ei.value) and "(2, 4)" in str(ei.value)
    with pytest.raises(ValueError):
        core_pull_sum(torch.zeros(()), torch.zeros(()))
    with pytest.raises(TypeError):
        core_pull_sum(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64))


def test_torch_backend_chunks_rows(monkeypatch):
    monkeypatch.setenv(rc.NO_EXT_ENV, "1")
    xh, p, q, pb = make_rows(17, torch.float64, seed=2)
    z0, u0 = core_pull_sum(xh, p, q, pb)
    v0, i0 = core_pull_max(xh, p.abs())
    monkeypatch.setattr(rc, "_TORCH_CHUNK_ELEMS", 17 * 17 * 2)  # 2 rows per chunk
    z1, u1 = core_pull_sum(xh, p, q, pb)
    v1, i1 = core_pull_max(xh, p.abs())
    assert torch.allclose(z0, z1, rtol=1e-14, atol=0) and torch.allclose(u0, u1, rtol=1e-14, atol=0)
    assert torch.equal(v0, v1) and torch.equal(i0, i1)


def test_backend_override_and_cuda_uses_torch(monkeypatch):
    assert active_backend("cuda") == "torch"
    with pytest.raises(ValueError):
        core_pull_sum(torch.zeros(2, 3), torch.zeros(2, 3), _backend="fortran")
    with pytest.raises(RuntimeError):
        core_pull_sum(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.float16), _backend="cpp")
    # float16 (not a C++ dtype) goes to the torch backend automatically
    z, _ = core_pull_sum(torch.zeros(2, 3, dtype=torch.float16), torch.ones(2, 3, dtype=torch.float16))
    assert z.dtype == torch.float16
    if torch.cuda.is_available():
        xh, p, q, pb = (t.cuda() for t in make_rows(17, torch.float32, seed=4))
        z, u = core_pull_sum(xh, p, q, pb)
        zr, ur, zs, us = ref_sum(*(t.cpu() for t in (xh, p, q, pb)))
        assert_close_scaled(z.cpu(), zr, zs, 1e-5, "zA")


def test_env_var_forces_fallback(monkeypatch):
    monkeypatch.setenv(rc.NO_EXT_ENV, "1")
    called = []
    monkeypatch.setattr(rc, "_load_ext", lambda: called.append(1))
    assert active_backend() == "torch"
    core_pull_sum(torch.zeros(2, 3), torch.ones(2, 3))
    core_pull_max(torch.zeros(2, 3), torch.ones(2, 3))
    assert not called  # the build is not even attempted


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp_ext

    def boom(**kwargs):
        raise RuntimeError("Error building extension: no compiler here")

    monkeypatch.delenv(rc.NO_EXT_ENV, raising=False)
    monkeypatch.setattr(rc, "EXTENSION", CompiledExtension("rowcore", rc._CPP_SOURCE, rc._EXT_CFLAGS, "layer-norm core"))
    monkeypatch.setattr(cpp_ext, "load_inline", boom)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        z, _ = core_pull_sum(torch.zeros(2, 3), torch.ones(2, 3))
        core_pull_max(torch.zeros(2, 3), torch.ones(2, 3))
        assert active_backend() == "torch"
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0]
    zr, _, _, _ = ref_sum(torch.zeros(2, 3), torch.ones(2, 3))
    assert torch.allclose(z.double(), zr)


def test_build_dir_keyed_by_source():
    name, path = rc.EXTENSION.build_dir()
    assert name.startswith("inseq_semiring_rowcore_") and path.name == name
    changed = CompiledExtension("rowcore", rc._CPP_SOURCE + "\n// changed\n", rc._EXT_CFLAGS, "layer-norm core")
    assert changed.build_dir()[0] != name

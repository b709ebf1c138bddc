"""Tests of the max-times / min-times contraction kernel (both backends)."""

from __future__ import annotations

import warnings

import pytest
import torch

from inseq_semiring.kernels import maxtimes as mt
from inseq_semiring.kernels.extension import CompiledExtension
from inseq_semiring.kernels.maxtimes import active_backend, max_times, min_times

torch.set_num_threads(1)

# explicit dtypes everywhere: tests/conftest.py makes float64 the default dtype of every test
DTYPES = [torch.float32, torch.float64]


# ------------------------------------------------------------------------------------------
# references (brute force: builds the full [*batch, m, k, n] product; small shapes only)
# ------------------------------------------------------------------------------------------


def _products(a, b):
    return a.unsqueeze(-1) * b.unsqueeze(-3)  # [*batch, m, k, n]


def ref_max(a, b):
    return _products(a, b).amax(-2)


def ref_min(a, b):
    return _products(a, b).amin(-2)


def first_index_of(prod, target):
    """Smallest k with prod[..., k, :] == target (argmax of a uint8 mask returns the first 1)."""
    hit = (prod == target.unsqueeze(-2)).to(torch.uint8)
    assert bool(hit.any(-2).all()), "reference value not attained"
    return hit.argmax(-2)


def gather_k(prod, idx):
    return torch.gather(prod, -2, idx.unsqueeze(-2)).squeeze(-2)


# ------------------------------------------------------------------------------------------
# backend selection: "cpp" (compiled) or "torch" (forced through the environment variable)
# ------------------------------------------------------------------------------------------


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv(mt.NO_EXT_ENV, "1")
        assert active_backend() == "torch"
    else:
        monkeypatch.delenv(mt.NO_EXT_ENV, raising=False)
        if active_backend() != "cpp":
            pytest.skip("the C++ extension could not be built here")
    used = []
    real_torch, real_cpp = mt._torch_backend, mt._cpp_backend
    monkeypatch.setattr(mt, "_torch_backend", lambda *a: used.append("torch") or real_torch(*a))
    monkeypatch.setattr(mt, "_cpp_backend", lambda *a: used.append("cpp") or real_cpp(*a))
    yield request.param
    assert set(used) <= {request.param}, f"expected only the {request.param} backend, used {used}"


SHAPES = [
    # (batch, m, k, n): edges of the register tiles, k > the k-block (256), m > the row chunk
    # (192), n > the column chunk (1536)
    ((), 1, 1, 1),
    ((), 5, 7, 3),
    ((), 13, 37, 71),
    ((), 17, 300, 50),
    ((), 200, 5, 9),
    ((), 3, 4, 1600),
    ((2,), 6, 64, 64),
    ((2, 3), 4, 9, 17),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
def test_max_times_matches_reference(backend, dtype, shape):
    batch, m, k, n = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    a = torch.randn(*batch, m, k, generator=g, dtype=dtype)  # any sign
    b = torch.randn(*batch, k, n, generator=g, dtype=dtype)
    prod = _products(a, b)
    ref = prod.amax(-2)

    out = max_times(a, b)
    assert out.shape == (*batch, m, n) and out.dtype == dtype
    assert torch.equal(out, ref)  # exact: the same products, the max of them

    val, idx = max_times(a, b, argmax=True)
    assert torch.equal(val, ref)
    assert idx.dtype == torch.int64 and idx.shape == (*batch, m, n)
    assert int(idx.min()) >= 0 and int(idx.max()) < k
    assert torch.equal(gather_k(prod, idx), ref)  # the product at the index is the max
    assert torch.equal(idx, first_index_of(prod, ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_min_times_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 9, 300, generator=g, dtype=dtype)
    b = torch.randn(2, 300, 21, generator=g, dtype=dtype)
    prod = _products(a, b)
    ref = prod.amin(-2)
    assert torch.equal(min_times(a, b), ref)
    val, idx = min_times(a, b, argmax=True)
    assert torch.equal(val, ref)
    assert torch.equal(gather_k(prod, idx), ref)
    assert torch.equal(idx, first_index_of(prod, ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tie_rule_constructed(backend, dtype):
    a = torch.tensor([[1.0, 2.0, 1.0], [0.5, 1.0, 1.5]], dtype=dtype)
    b = torch.tensor([[2.0, 2.0], [1.0, 3.0], [2.0, 2.0]], dtype=dtype)
    # products over k:  (0, 0): 2, 2, 2 -> k=0   (0, 1): 2, 6, 2 -> k=1
    #                   (1, 0): 1, 1, 3 -> k=2   (1, 1): 1, 3, 3 -> k=1 (tie of k=1 and k=2)
    val, idx = max_times(a, b, argmax=True)
    assert val.tolist() == [[2.0, 6.0], [3.0, 3.0]]
    assert idx.tolist() == [[0, 1], [2, 1]]
    # min: (0, 0): 2, 2, 2 -> k=0   (0, 1): 2 at k=0, 2 -> k=0   (1, 0): 1, 1 -> k=0
    val, idx = min_times(a, b, argmax=True)
    assert val.tolist() == [[2.0, 2.0], [1.0, 1.0]]
    assert idx.tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tie_rule_across_k_blocks(backend, dtype):
    # equal maxima at k = 10, 300 and 599 (the C++ kernel walks k in blocks of 256)
    k = 600
    a = torch.ones(3, k, dtype=dtype)
    b = torch.full((k, 5), -1.0, dtype=dtype)
    for kk in (599, 300, 10):
        b[kk] = 4.0
    val, idx = max_times(a, b, argmax=True)
    assert torch.equal(val, torch.full((3, 5), 4.0, dtype=dtype))
    assert torch.equal(idx, torch.full((3, 5), 10))
    val, idx = min_times(-a, b, argmax=True)  # min of -1 * b: -4 at k = 10, 300, 599
    assert torch.equal(val, torch.full((3, 5), -4.0, dtype=dtype))
    assert torch.equal(idx, torch.full((3, 5), 10))


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_ties_small_integers(backend, dtype):
    # small integers (zeros of both signs included): ties everywhere
    g = torch.Generator().manual_seed(7)
    a = torch.randint(-2, 3, (3, 11, 290), generator=g).to(dtype)
    b = torch.randint(-2, 3, (3, 290, 37), generator=g).to(dtype)
    prod = _products(a, b)
    for fn, red in ((max_times, prod.amax(-2)), (min_times, prod.amin(-2))):
        val, idx = fn(a, b, argmax=True)
        assert torch.equal(val, red)
        assert torch.equal(idx, first_index_of(prod, red))


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_values_not_abs(backend, dtype):
    a = torch.tensor([[-3.0, 1.0]], dtype=dtype)
    b = torch.tensor([[2.0], [1.0]], dtype=dtype)  # products -6, 1: the max is 1 (not |-6|)
    val, idx = max_times(a, b, argmax=True)
    assert val.item() == 1.0 and idx.item() == 1
    val, idx = min_times(a, b, argmax=True)
    assert val.item() == -6.0 and idx.item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(backend, dtype):
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([[1.0, 2.0, -1.0], [nan, 1.0, 1.0], [inf, 1.0, 1.0], [-inf, -inf, -inf]], dtype=dtype)
    b = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, nan]], dtype=dtype)
    ref = ref_max(a, b)  # NaN: row 1, column 2, inf * 0 at (2, 1) and (3, 1); row 3 col 0 -inf
    out, idx = max_times(a, b, argmax=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert int(torch.isnan(out).sum()) == int(torch.isnan(ref).sum()) == 8
    # not NaN outputs: the index points at the max (and is the first one)
    ok = ~torch.isnan(ref)
    prod = _products(a, b)
    assert torch.equal(gather_k(prod, idx)[ok], ref[ok])
    assert idx[3, 0].item() == 0  # all products -inf: a tie, the smallest k
    assert int(idx.min()) >= 0 and int(idx.max()) < 3
    torch.testing.assert_close(min_times(a, b), ref_min(a, b), rtol=0, atol=0, equal_nan=True)


def test_overflowing_products(backend):
    # finite inputs whose products overflow to +-inf: ordinary float products, ties on inf
    big = 1e30
    f32 = torch.float32
    a = torch.tensor([[1.0, big, big], [-big, big, 1.0], [3e38, 3e38, 1.0]], dtype=f32)
    b = torch.tensor([[2.0, 1.0], [big, -big], [big, 3.0]], dtype=f32)
    prod = _products(a, b)
    ref = prod.amax(-2)
    assert bool(torch.isinf(ref).any())
    for fn, red in ((max_times, ref), (min_times, prod.amin(-2))):
        val, idx = fn(a, b, argmax=True)
        assert torch.equal(val, red)
        assert torch.equal(idx, first_index_of(prod, red))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_k(backend, dtype):
    a = torch.empty(2, 3, 0, dtype=dtype)
    b = torch.empty(2, 0, 4, dtype=dtype)
    out = max_times(a, b)
    assert out.shape == (2, 3, 4) and bool((out == float("-inf")).all())
    val, idx = max_times(a, b, argmax=True)
    assert bool((val == float("-inf")).all()) and bool((idx == -1).all())
    val, idx = min_times(a, b, argmax=True)
    assert bool((val == float("inf")).all()) and bool((idx == -1).all())


def test_empty_m_n_batch(backend):
    assert max_times(torch.empty(0, 5), torch.randn(5, 3)).shape == (0, 3)
    assert max_times(torch.randn(4, 5), torch.empty(5, 0)).shape == (4, 0)
    v, i = max_times(torch.empty(0, 4, 5), torch.empty(0, 5, 3), argmax=True)
    assert v.shape == i.shape == (0, 4, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(backend, dtype):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 30, generator=g, dtype=dtype).t()  # [30, 40], transposed view
    b = torch.randn(50, 40, generator=g, dtype=dtype).t()[:, ::2]  # [40, 25], strided
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(max_times(a, b), ref_max(a, b))


def test_dtype_promotion(backend):
    a = torch.randn(3, 4, dtype=torch.float32)
    b = torch.randn(4, 5, dtype=torch.float64)
    out = max_times(a, b)
    assert out.dtype == torch.float64
    assert torch.equal(out, ref_max(a.double(), b))


def test_several_threads(backend):
    # the C++ kernel splits batch x row-chunks x column-chunks over torch's intra-op threads
    g = torch.Generator().manual_seed(9)
    a = torch.randint(-2, 3, (2, 200, 6), generator=g).float()
    b = torch.randint(-2, 3, (2, 6, 1600), generator=g).float()
    prod = _products(a, b)
    ref = prod.amax(-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        val, idx = max_times(a, b, argmax=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(val, ref) and torch.equal(idx, first_index_of(prod, ref))


def test_shape_mismatch_names_both_shapes():
    a, b = torch.randn(3, 4), torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 6\)"):
        max_times(a, b)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(3, 4, 6\)"):
        max_times(torch.randn(2, 3, 4), torch.randn(3, 4, 6))  # batch dims differ
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(4, 6\)"):
        min_times(torch.randn(2, 3, 4), torch.randn(4, 6))  # batch vs none
    with pytest.raises(ValueError, match=r"\(4,\).*\(4, 6\)"):
        max_times(torch.randn(4), torch.randn(4, 6))


# ------------------------------------------------------------------------------------------
# torch backend internals, other dtypes, devices
# ------------------------------------------------------------------------------------------


def test_torch_backend_blocks_every_dim(monkeypatch):
    # a 64-byte temporary forces blocks along batch, m, n and k at once
    monkeypatch.setattr(mt, "_TORCH_TARGET_BYTES", 64)
    g = torch.Generator().manual_seed(11)
    a = torch.randn(3, 7, 33, generator=g)
    b = torch.randn(3, 33, 40, generator=g)
    prod = _products(a, b)
    ref = prod.amax(-2)
    val, idx = max_times(a, b, argmax=True, _backend="torch")
    assert torch.equal(val, ref) and torch.equal(idx, first_index_of(prod, ref))
    monkeypatch.setattr(mt, "_TORCH_TARGET_BYTES", 1 << 12)
    val, idx = max_times(a, b, argmax=True, _backend="torch")
    assert torch.equal(val, ref) and torch.equal(idx, first_index_of(prod, ref))


def test_torch_backend_temporary_is_bounded(monkeypatch):
    # the product buffer is the only big temporary: its size is capped
    sizes = []
    real_empty = torch.empty

    def spy_empty(*args, **kw):
        t = real_empty(*args, **kw)
        sizes.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(mt, "_TORCH_TARGET_BYTES", 1 << 16)
    monkeypatch.setattr(mt.torch, "empty", spy_empty)
    a, b = torch.randn(64, 512, dtype=torch.float32), torch.randn(512, 96, dtype=torch.float32)
    full = 64 * 512 * 96 * 4
    out = mt._torch_backend(a[None], b[None], True)[0][0]
    assert max(sizes) <= max(1 << 16, 64 * 96 * 8)  # product buffer or the [m, n] outputs
    assert max(sizes) < full
    monkeypatch.setattr(mt.torch, "empty", real_empty)
    assert torch.equal(out, ref_max(a, b))


def test_integer_dtype_uses_torch_backend():
    a = torch.randint(-5, 6, (4, 9))
    b = torch.randint(-5, 6, (9, 3))
    prod = _products(a, b)
    val, idx = max_times(a, b, argmax=True)
    assert torch.equal(val, prod.amax(-2))
    assert torch.equal(idx, first_index_of(prod, prod.amax(-2)))


def test_torch_backend_block_budget_depends_on_device():
    # CPU: cache-sized blocks; other devices (CUDA, ...): big blocks, fewer launches
    cpu_bytes, cpu_kc = mt._torch_block_budget(torch.device("cpu"))
    dev_bytes, dev_kc = mt._torch_block_budget(torch.device("cuda", 0))
    assert cpu_bytes == min(mt._TORCH_TARGET_BYTES, mt._TORCH_CHUNK_BYTES) and cpu_kc == mt._TORCH_KC
    assert dev_bytes == mt._TORCH_DEVICE_TARGET_BYTES >= 64 * cpu_bytes
    assert dev_kc <= 255  # uint8 tie-break weights


# ------------------------------------------------------------------------------------------
# CUDA: the Triton kernel (and the torch fallback there)
# ------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def triton_backend(monkeypatch):
    """CUDA with the Triton kernel active; records which backends ran."""
    monkeypatch.delenv(mt.NO_EXT_ENV, raising=False)
    if active_backend("cuda") != "triton":
        pytest.skip("triton is not available here")
    tri = mt._load_triton()
    used = []
    real_tri, real_torch = tri.max_times_triton, mt._torch_backend
    monkeypatch.setattr(tri, "max_times_triton", lambda *a, **kw: used.append("triton") or real_tri(*a, **kw))
    monkeypatch.setattr(mt, "_torch_backend", lambda *a: used.append("torch") or real_torch(*a))
    yield used
    assert set(used) <= {"triton"}, f"expected only the triton backend, used {used}"


def _check_cuda(fn, a, b, red):
    """``fn`` on CUDA vs the brute-force CPU reference (exact values, first index)."""
    prod = _products(a, b)
    ref = getattr(prod, red)(-2)
    ac, bc = a.cuda(), b.cuda()
    out = fn(ac, bc)
    assert out.is_cuda and out.dtype == a.dtype
    assert torch.equal(out.cpu(), ref)
    val, idx = fn(ac, bc, argmax=True)
    assert val.is_cuda and idx.is_cuda and idx.dtype == torch.int64
    assert torch.equal(val.cpu(), ref)
    assert torch.equal(idx.cpu(), first_index_of(prod, ref))


CUDA_SHAPES = [
    # (batch, m, k, n): not multiples of the 16/32/64 tiles, split-k (long k, few tiles),
    # attention-like batches, batch dims
    ((), 1, 1, 1),
    ((), 13, 37, 71),
    ((), 70, 300, 130),
    ((), 5, 1000, 3),
    ((), 64, 768, 200),
    ((12,), 64, 64, 64),
    ((2, 3), 4, 9, 17),
]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
def test_triton_matches_reference(triton_backend, dtype, shape):
    batch, m, k, n = shape
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    a = torch.randn(*batch, m, k, generator=g, dtype=dtype)  # any sign
    b = torch.randn(*batch, k, n, generator=g, dtype=dtype)
    _check_cuda(max_times, a, b, "amax")
    _check_cuda(min_times, a, b, "amin")
    assert triton_backend


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_many_ties(triton_backend, dtype):
    # small integers (zeros of both signs included): ties everywhere, inside and across k slices
    g = torch.Generator().manual_seed(7)
    a = torch.randint(-2, 3, (3, 11, 1290), generator=g).to(dtype)
    b = torch.randint(-2, 3, (3, 1290, 37), generator=g).to(dtype)
    _check_cuda(max_times, a, b, "amax")
    _check_cuda(min_times, a, b, "amin")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [1, 2, 7])
@pytest.mark.parametrize("tile", [(16, 16, 1), (32, 64, 4), (64, 64, 4)])
def test_triton_launch_configs(dtype, split, tile):
    # every tile shape / number of k slices gives the same (exact) answer and the first index
    tri = mt._load_triton()
    if tri is None:
        pytest.skip("triton is not available here")
    bm, bn, nw = tile
    g = torch.Generator().manual_seed(split)
    a = torch.randint(-3, 4, (2, 45, 300), generator=g).to(dtype)
    b = torch.randint(-3, 4, (2, 300, 70), generator=g).to(dtype)
    prod = _products(a, b)
    for negate, ref in ((False, prod.amax(-2)), (True, prod.amin(-2))):
        val, idx = tri.max_times_triton(a.cuda(), b.cuda(), True, negate, block_m=bm, block_n=bn, num_warps=nw, split=split)
        assert torch.equal(val.cpu(), ref)
        assert torch.equal(idx.cpu(), first_index_of(prod, ref))
        val, none = tri.max_times_triton(a.cuda(), b.cuda(), False, negate, block_m=bm, block_n=bn, num_warps=nw, split=split)
        assert none is None and torch.equal(val.cpu(), ref)


@needs_cuda
@pytest.mark.parametrize("split", [1, 3])
def test_triton_fast_launch_respects_specialisation(split, monkeypatch):
    # opt-in fast path: after a first launch, the same kernel is relaunched directly; views that
    # differ in what Triton specialises on (16-byte alignment, strides == 1 or divisible by 16)
    # must not reuse a kernel compiled for another case
    tri = mt._load_triton()
    if tri is None:
        pytest.skip("triton is not available here")
    monkeypatch.setattr(tri, "_fast_launch", True)
    monkeypatch.setattr(tri, "_fast_cache", {})
    g = torch.Generator().manual_seed(10 + split)
    a_full = torch.randint(-3, 4, (3, 41, 200), generator=g).float()
    b_full = torch.randint(-3, 4, (3, 200, 49), generator=g).float()
    variants = [
        (a_full[:, :40, :192], b_full[:, :192, :48]),
        (a_full[:, 1:, 1:193], b_full[:, 1:193, 1:]),  # misaligned data, n = 48, b row stride 49
        (a_full[:, :40, :192].transpose(1, 2).contiguous().transpose(1, 2), b_full[:, :192, :48]),  # a column-major
        (a_full[:, :40, :192], b_full[:, :192, :48].contiguous()),  # b row stride 48
        (a_full[:, :40, :192].contiguous(), b_full[:, :192, :1].contiguous()),  # n = 1
    ]
    for _ in range(2):
        for a, b in variants:
            prod = _products(a, b)
            ref = prod.amax(-2)
            val, idx = tri.max_times_triton(a.cuda(), b.cuda(), True, split=split)
            assert torch.equal(val.cpu(), ref)
            assert torch.equal(idx.cpu(), first_index_of(prod, ref))
    if tri._fast_launch_supported():
        assert tri._fast_launch and tri._fast_cache  # the direct path is in use (and did not fail)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_tie_rule(triton_backend, dtype):
    a = torch.tensor([[1.0, 2.0, 1.0], [0.5, 1.0, 1.5]], dtype=dtype).cuda()
    b = torch.tensor([[2.0, 2.0], [1.0, 3.0], [2.0, 2.0]], dtype=dtype).cuda()
    val, idx = max_times(a, b, argmax=True)
    assert val.tolist() == [[2.0, 6.0], [3.0, 3.0]]
    assert idx.tolist() == [[0, 1], [2, 1]]
    val, idx = min_times(a, b, argmax=True)
    assert val.tolist() == [[2.0, 2.0], [1.0, 1.0]]
    assert idx.tolist() == [[0, 0], [0, 0]]
    # equal maxima far apart in k (different unrolled blocks and k slices): the smallest wins
    k = 3000
    a = torch.ones(3, k, dtype=dtype).cuda()
    b = torch.full((k, 5), -1.0, dtype=dtype)
    for kk in (2999, 1500, 10):
        b[kk] = 4.0
    tri = mt._load_triton()
    for split in (None, 1, 4, 40):
        val, idx = tri.max_times_triton(a[None], b.cuda()[None], True, split=split)
        assert torch.equal(val[0].cpu(), torch.full((3, 5), 4.0, dtype=dtype))
        assert torch.equal(idx[0].cpu(), torch.full((3, 5), 10))
    val, idx = min_times(-a, b.cuda(), argmax=True)
    assert torch.equal(val.cpu(), torch.full((3, 5), -4.0, dtype=dtype))
    assert torch.equal(idx.cpu(), torch.full((3, 5), 10))
    # all products -inf: index 0
    val, idx = max_times(torch.full((2, 600), float("-inf"), dtype=dtype).cuda(), torch.ones(600, 3, dtype=dtype).cuda(), argmax=True)
    assert bool((val == float("-inf")).all()) and bool((idx == 0).all())


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_negative_values_not_abs(triton_backend, dtype):
    a = torch.tensor([[-3.0, 1.0]], dtype=dtype).cuda()
    b = torch.tensor([[2.0], [1.0]], dtype=dtype).cuda()
    val, idx = max_times(a, b, argmax=True)
    assert val.item() == 1.0 and idx.item() == 1
    val, idx = min_times(a, b, argmax=True)
    assert val.item() == -6.0 and idx.item() == 0


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_nan_and_inf(triton_backend, dtype):
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([[1.0, 2.0, -1.0], [nan, 1.0, 1.0], [inf, 1.0, 1.0], [-inf, -inf, -inf]], dtype=dtype)
    b = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, nan]], dtype=dtype)
    ref = ref_max(a, b)
    prod = _products(a, b)
    ok = ~torch.isnan(ref)
    tri = mt._load_triton()
    for split in (1, 2, 3):
        out, idx = tri.max_times_triton(a.cuda()[None], b.cuda()[None], True, split=split)
        out, idx = out[0].cpu(), idx[0].cpu()
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        assert int(torch.isnan(out).sum()) == 8
        assert torch.equal(gather_k(prod, idx)[ok], ref[ok])
        assert idx[3, 0].item() == 0 and int(idx.min()) >= 0 and int(idx.max()) < 3
    out, idx = max_times(a.cuda(), b.cuda(), argmax=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(min_times(a.cuda(), b.cuda()).cpu(), ref_min(a, b), rtol=0, atol=0, equal_nan=True)
    # a NaN deep inside a long reduction (after the max, in another k slice) still wins
    a = torch.ones(4, 2000, dtype=dtype)
    b = torch.randn(2000, 6, dtype=dtype)
    b[1700, 2] = nan
    b[5, 3] = 100.0
    out, idx = max_times(a.cuda(), b.cuda(), argmax=True)
    out, idx = out.cpu(), idx.cpu()
    assert bool(torch.isnan(out[:, 2]).all()) and not bool(torch.isnan(out[:, [0, 1, 3, 4, 5]]).any())
    assert bool((out[:, 3] == 100.0).all()) and bool((idx[:, 3] == 5).all())
    assert int(idx.min()) >= 0 and int(idx.max()) < 2000


@needs_cuda
def test_triton_overflow_and_denormals(triton_backend):
    f32 = torch.float32
    big = 1e30
    a = torch.tensor([[1.0, big, big], [-big, big, 1.0], [3e38, 3e38, 1.0]], dtype=f32)
    b = torch.tensor([[2.0, 1.0], [big, -big], [big, 3.0]], dtype=f32)
    _check_cuda(max_times, a, b, "amax")
    _check_cuda(min_times, a, b, "amin")
    # subnormal products are kept (not flushed to zero): 0.25 * 1.5 * tiny < 0.25 * 2 * tiny
    tiny = torch.finfo(f32).tiny
    a = torch.full((1, 2), 0.25, dtype=f32)
    b = torch.tensor([[1.5 * tiny], [2.0 * tiny]], dtype=f32)
    val, idx = max_times(a.cuda(), b.cuda(), argmax=True)
    assert val.item() == 0.5 * tiny > 0 and idx.item() == 1


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(triton_backend, dtype):
    # float32 accumulation: the value is the (rounded) max; the index points at a product that
    # rounds to it (the first exact maximum)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 7, 150, generator=g).to(dtype)
    b = torch.randn(2, 150, 9, generator=g).to(dtype)
    prod32 = _products(a.float(), b.float())
    ref32 = prod32.amax(-2)
    val, idx = max_times(a.cuda(), b.cuda(), argmax=True)
    assert val.dtype == dtype
    assert torch.equal(val.cpu(), ref32.to(dtype))
    assert torch.equal(val.cpu(), _products(a, b).amax(-2))  # = the max of the rounded products
    assert torch.equal(idx.cpu(), first_index_of(prod32, ref32))
    assert torch.equal(min_times(a.cuda(), b.cuda()).cpu(), prod32.amin(-2).to(dtype))


@needs_cuda
def test_triton_strided_inputs_and_promotion(triton_backend):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 30, generator=g).cuda().t()  # [30, 40], transposed view
    b = torch.randn(50, 40, generator=g).cuda().t()[:, ::2]  # [40, 25], strided
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(max_times(a, b).cpu(), ref_max(a.cpu(), b.cpu()))
    x = torch.randn(3, 4, dtype=torch.float32).cuda()
    y = torch.randn(4, 5, dtype=torch.float64).cuda()
    out = max_times(x, y)
    assert out.dtype == torch.float64 and torch.equal(out.cpu(), ref_max(x.double().cpu(), y.cpu()))


@needs_cuda
def test_triton_large_batch(triton_backend):
    # more batch entries than one grid dimension holds (65535)
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-3, 4, (70000, 2, 3), generator=g).float()
    b = torch.randint(-3, 4, (70000, 3, 2), generator=g).float()
    _check_cuda(max_times, a, b, "amax")


@needs_cuda
def test_triton_empty(triton_backend):
    for dtype in DTYPES:
        a = torch.empty(2, 3, 0, dtype=dtype).cuda()
        b = torch.empty(2, 0, 4, dtype=dtype).cuda()
        val, idx = max_times(a, b, argmax=True)
        assert val.is_cuda and bool((val == float("-inf")).all()) and bool((idx == -1).all())
        val, idx = min_times(a, b, argmax=True)
        assert bool((val == float("inf")).all()) and bool((idx == -1).all())
    assert max_times(torch.empty(0, 5).cuda(), torch.randn(5, 3).cuda()).shape == (0, 3)
    v, i = max_times(torch.empty(0, 4, 5).cuda(), torch.empty(0, 5, 3).cuda(), argmax=True)
    assert v.shape == i.shape == (0, 4, 3)


@needs_cuda
def test_cuda_env_var_forces_torch_backend(monkeypatch):
    monkeypatch.setenv(mt.NO_EXT_ENV, "1")
    assert active_backend("cuda") == "torch"
    used = []
    real_torch = mt._torch_backend
    monkeypatch.setattr(mt, "_torch_backend", lambda *a: used.append("torch") or real_torch(*a))
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (2, 33, 300), generator=g).float()
    b = torch.randint(-3, 4, (2, 300, 45), generator=g).float()
    _check_cuda(max_times, a, b, "amax")
    _check_cuda(min_times, a, b, "amin")
    assert used and set(used) == {"torch"}


@needs_cuda
def test_cuda_torch_backend_big_blocks(monkeypatch):
    # the torch backend on CUDA: large blocks (few launches), still exact with ties across blocks
    g = torch.Generator().manual_seed(6)
    a = torch.randint(-2, 3, (3, 20, 700), generator=g).float()
    b = torch.randint(-2, 3, (3, 700, 30), generator=g).float()
    prod = _products(a, b)
    ref = prod.amax(-2)
    val, idx = max_times(a.cuda(), b.cuda(), argmax=True, _backend="torch")
    assert torch.equal(val.cpu(), ref) and torch.equal(idx.cpu(), first_index_of(prod, ref))
    h = torch.randn(2, 9, 300, generator=g).to(torch.float16)
    w = torch.randn(2, 300, 11, generator=g).to(torch.float16)
    assert torch.equal(max_times(h.cuda(), w.cuda(), _backend="torch").cpu(), _products(h, w).amax(-2))


@needs_cuda
def test_triton_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv(mt.NO_EXT_ENV, raising=False)
    tri = mt._load_triton()
    if tri is None:
        pytest.skip("triton is not available here")

    def broken(*args, **kwargs):
        raise RuntimeError("error: PassManager::run failed (simulated)")

    monkeypatch.setattr(mt, "_triton_failed", False)
    monkeypatch.setattr(tri, "max_times_triton", broken)
    g = torch.Generator().manual_seed(8)
    a = torch.randn(5, 6, generator=g).cuda()
    b = torch.randn(6, 7, generator=g).cuda()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = max_times(a, b)
        out2, _ = max_times(a, b, argmax=True)
        backend = active_backend("cuda")
    recs = [w for w in rec if issubclass(w.category, RuntimeWarning)]
    msgs = [str(w.message) for w in recs]
    assert len(msgs) == 1, msgs
    assert "simulated" in msgs[0] and mt.NO_EXT_ENV in msgs[0]
    assert recs[0].filename == __file__  # points at the caller
    assert backend == "torch"
    ref = ref_max(a.cpu(), b.cpu())
    assert torch.equal(out1.cpu(), ref) and torch.equal(out2.cpu(), ref)
    with pytest.raises(RuntimeError, match="simulated"):  # an explicit request is not masked
        monkeypatch.setattr(mt, "_triton_failed", False)
        max_times(a, b, _backend="triton")


def test_triton_backend_unavailable_on_cpu():
    with pytest.raises(RuntimeError, match="Triton backend is not available"):
        max_times(torch.randn(2, 3), torch.randn(3, 4), _backend="triton")


# ------------------------------------------------------------------------------------------
# extension management
# ------------------------------------------------------------------------------------------


def test_env_var_forces_fallback(monkeypatch):
    monkeypatch.setenv(mt.NO_EXT_ENV, "1")
    assert active_backend() == "torch"
    called = []
    monkeypatch.setattr(mt, "_load_ext", lambda *args, **kw: called.append(1))
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert torch.equal(max_times(a, b), ref_max(a, b))
    assert not called  # the build is not even attempted


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp_ext

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension: no compiler here")

    monkeypatch.delenv(mt.NO_EXT_ENV, raising=False)
    monkeypatch.setattr(mt, "EXTENSION", CompiledExtension("maxtimes", mt._CPP_SOURCE, mt._EXT_CFLAGS, "max-times"))
    monkeypatch.setattr(cpp_ext, "load_inline", broken)
    a, b = torch.randn(5, 6), torch.randn(6, 7)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = max_times(a, b)
        out2, _ = max_times(a, b, argmax=True)
        backend = active_backend()
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "no compiler here" in msgs[0] and mt.NO_EXT_ENV in msgs[0]
    assert backend == "torch"
    assert torch.equal(out1, ref_max(a, b)) and torch.equal(out2, ref_max(a, b))


def test_build_dir_keyed_by_source():
    name, path = mt.EXTENSION.build_dir()
    assert path.parent.parts[-3:] == (".cache", "inseq_semiring", "ext") and path.name == name
    assert name.startswith("inseq_semiring_maxtimes_")
    changed = CompiledExtension("maxtimes", mt._CPP_SOURCE + "\n// changed\n", mt._EXT_CFLAGS, "max-times")
    name2, path2 = changed.build_dir()
    assert name2 != name and path2 != path


def test_torch_backend_with_flushed_denormals():
    # 1.5 * 2**-126 and 2 * 2**-126 differ by a subnormal: with denormals flushed, p - v == 0
    # there although p != v, so the torch backend must not read ties off the subtraction
    tiny = torch.finfo(torch.float32).tiny
    a = torch.ones(1, 2, dtype=torch.float32)
    b = torch.tensor([[1.5 * tiny], [2.0 * tiny]], dtype=torch.float32)
    if not torch.set_flush_denormal(True):
        pytest.skip("flushing denormals is not supported on this CPU")
    try:
        assert mt._flushes_denormals(torch.float32)
        val, idx = max_times(a, b, argmax=True, _backend="torch")
        assert val.item() == 2.0 * tiny and idx.item() == 1
    finally:
        torch.set_flush_denormal(False)
    assert not mt._flushes_denormals(torch.float32)

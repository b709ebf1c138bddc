"""Products with a mapped constant weight, done block by block (semirings/weight_maps.py), and the one-pass
``(|w|, -|w| log|w|)`` kernel (kernels/xlogx.py): equal to the whole-matrix formulas, on any layout and with blocks
that split the weight anywhere; end to end equal to the eagerly mapped (cached) weights; never a whole map."""

import pytest
import torch

import inseq_semiring as isr
import tiny_models as tm
from inseq_semiring.kernels import xlogx
from inseq_semiring.paths import top_paths
from inseq_semiring.rules import weight_cache
from inseq_semiring.semirings import weight_maps as wm

torch.set_num_threads(1)


def _nlogn(w):
    a = w.abs()
    return -torch.xlogy(a, a)


def _weights(dtype=torch.float64):
    """The layouts the rules hand over: row-major (nn.Linear), a transposed view (GPT-2 Conv1D), a column slice."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(13, 7, generator=g, dtype=torch.float64).to(dtype)
    base[2, :3] = 0.0  # 0 log 0 = 0
    base[5] = base[1]  # equal rows: max-times ties across blocks
    t = torch.randn(7, 13, generator=g, dtype=torch.float64).to(dtype).t()
    wide = torch.randn(13, 11, generator=g, dtype=torch.float64).to(dtype)[:, 2:9]
    return {"row-major": base, "transposed": t, "sliced": wide}


@pytest.fixture(params=["rows", "cols"])
def tiny_blocks(monkeypatch, request):
    """Blocks of whole rows (1 or 2 rows of a 13 x 7 weight) or of whole columns (2 or 3 columns)."""
    if request.param == "rows":
        monkeypatch.setattr(wm, "BLOCK_ELEMENTS", 10)
        monkeypatch.setattr(wm, "MAX_BLOCK_ELEMENTS", 15)
    else:
        monkeypatch.setattr(wm, "MIN_BLOCK_ROWS", 10**9)
        monkeypatch.setattr(wm, "MIN_BLOCK_COLUMNS", 1)
        monkeypatch.setattr(wm, "BLOCK_ELEMENTS", 30)
        monkeypatch.setattr(wm, "MAX_BLOCK_ELEMENTS", 40)
    return request.param


@pytest.mark.parametrize("layout", ["row-major", "transposed", "sliced"])
def test_mapped_products_equal_the_whole_matrix_formulas(layout, tiny_blocks):
    w = _weights()[layout]
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, w.shape[0], generator=g, dtype=torch.float64)
    torch.testing.assert_close(wm.mapped_mm(a, w, wm.abs_weight), a @ w.abs(), rtol=1e-13, atol=0)
    torch.testing.assert_close(wm.mapped_mm(a, w, wm.neg_w_log_w), a @ _nlogn(w), rtol=1e-13, atol=0)
    square = lambda t: t * t  # noqa: E731  (any map, not only the two named ones)
    torch.testing.assert_close(wm.mapped_mm(a, w, square), a @ (w * w), rtol=1e-13, atol=0)
    z, u = a[:2], a[2:]
    pa, pb = wm.mapped_mm_pair(z, u, w)
    torch.testing.assert_close(pa, z @ w.abs(), rtol=1e-13, atol=0)
    torch.testing.assert_close(pb, u @ _nlogn(w), rtol=1e-13, atol=0)
    assert wm.mapped_mm_pair(None, u, w)[0] is None


@pytest.mark.parametrize("layout", ["row-major", "transposed", "sliced"])
def test_mapped_max_times_value_and_first_winner(layout, tiny_blocks):
    w = _weights()[layout]
    a = torch.ones(3, w.shape[0], dtype=torch.float64)  # with rows 1 and 5 equal, both always tie
    a[1] = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cand = a[:, :, None] * w.abs()[None]  # [r, n, k]
    vals, idx = wm.mapped_max_times(a, w, wm.abs_weight)
    torch.testing.assert_close(vals, cand.amax(1), rtol=0, atol=0)
    first = (cand == cand.amax(1, keepdim=True)).to(torch.int64).argmax(1)  # first maximal position
    assert torch.equal(idx, first)
    only, none = wm.mapped_max_times(a, w, wm.abs_weight, argmax=False)
    assert none is None and torch.equal(only, vals)


def test_mapped_max_times_with_an_empty_contraction():
    vals, idx = wm.mapped_max_times(torch.ones(2, 0), torch.ones(0, 3), wm.abs_weight)
    assert vals.shape == (2, 3) and bool(torch.isneginf(vals).all()) and bool((idx == -1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_xlogx_kernel_matches_the_torch_formula(dtype):
    if xlogx.active_backend(torch.zeros(1, dtype=dtype)) != "cpp":
        pytest.skip("no C++ extension here")
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(37, 45, generator=g, dtype=torch.float64) * 0.05).to(dtype)  # 45: a vector tail
    w[0, :4] = 0.0
    w[1, 0] = torch.finfo(dtype).smallest_normal / 8  # subnormal: outside the vector log's range
    w[3, 44] = -torch.finfo(dtype).smallest_normal / 3
    w[4, 1] = 1.0  # log 1 = 0
    batched = w[:36].reshape(4, 9, 45)
    for x in (w, w.t(), w[:, 1:40], w[5:6], w.reshape(-1), batched, batched.transpose(-1, -2),
              batched[:, ::2].transpose(-1, -2)):  # batched transposes (attention's p^T) map in place
        a, b = xlogx.abs_and_neg_xlogx(x)
        ta, tb = xlogx.abs_and_neg_xlogx(x, backend="torch")
        assert a.shape == x.shape and b.shape == x.shape
        assert torch.equal(a, ta)
        exact = _nlogn(x.double())
        tol = 4 * torch.finfo(dtype).eps
        assert bool(((b.double() - exact).abs() <= tol * exact.abs() + torch.finfo(dtype).smallest_normal).all())
        assert bool((b[x == 0] == 0).all())
        assert bool((tb[x == 0] == 0).all())


def test_torch_backend_is_exact_down_to_subnormals():
    w = torch.tensor([0.0, 5e-324, 1e-310, 1e-5, -2.5, 1.0], dtype=torch.float64)
    _, b = xlogx.abs_and_neg_xlogx(w, backend="torch")
    torch.testing.assert_close(b, _nlogn(w), rtol=1e-15, atol=0)


def _run_all(case, semiring, **kw):
    return isr.run(case.fn, case.inputs, semiring, model=case.model, **kw)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # transposed Conv1D weights; row-major nn.Linear weights
def test_blockwise_maps_equal_cached_whole_maps_end_to_end(arch, tiny_blocks, monkeypatch):
    case = tm.build(arch)
    lazy = {s: _run_all(case, s, backpointers=s == "maxpath") for s in ("flow", "entropy", "maxpath")}
    assert weight_cache.cache_bytes() == 0
    monkeypatch.setenv("INSEQ_SEMIRING_WEIGHT_CACHE_MB", "64")
    weight_cache.clear()
    try:
        eager = {s: _run_all(case, s, backpointers=s == "maxpath") for s in lazy}
        assert weight_cache.cache_bytes() > 0
    finally:
        weight_cache.clear()
    for s in lazy:
        for x, y in zip(lazy[s].values, eager[s].values):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-300)
    for p, q in zip(top_paths(lazy["maxpath"], k=3), top_paths(eager["maxpath"], k=3)):
        assert [(h.op, h.index) for h in p.hops] == [(h.op, h.index) for h in q.hops]
        assert p.value == pytest.approx(q.value, rel=1e-12)


def test_a_pull_maps_one_block_at_a_time(monkeypatch):
    """An LM-head-shaped weight is never mapped whole: every mapped piece is at most one block."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 500, bias=False).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    fn = lambda e: torch.log_softmax(head(e), -1)[0, 3]  # noqa: E731
    monkeypatch.setattr(wm, "BLOCK_ELEMENTS", 600)
    monkeypatch.setattr(wm, "MAX_BLOCK_ELEMENTS", 600)
    sizes = []
    real_pair, real_abs = xlogx.abs_and_neg_xlogx, wm.abs_weight
    monkeypatch.setattr(wm, "abs_and_neg_xlogx", lambda w, **k: (sizes.append(w.numel()), real_pair(w, **k))[1])
    isr.semiring_backward(fn, x, "entropy")
    assert sizes and max(sizes) <= 600
    monkeypatch.setattr(wm, "_contiguous_map", lambda b, f: (sizes.append(b.numel()), real_abs(b).contiguous())[1])
    sizes.clear()
    isr.semiring_backward(fn, x, "maxpath")
    from inseq_semiring.kernels.maxtimes import NO_EXT_ENV, fuses

    if fuses(x, head.weight):  # CPU: the max-times kernel takes |W| while packing W; nothing is mapped at all
        assert sizes == []
        monkeypatch.setenv(NO_EXT_ENV, "1")  # the block path (other devices, no compiled kernel)
        isr.semiring_backward(fn, x, "maxpath")
    assert sizes and max(sizes) <= 600


def test_xlogx_falls_back_to_torch_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp_ext
    from inseq_semiring.kernels.extension import CompiledExtension

    def boom(**kwargs):
        raise RuntimeError("Error building extension: no compiler here")

    monkeypatch.delenv("INSEQ_SEMIRING_NO_EXT", raising=False)
    monkeypatch.setattr(xlogx, "EXTENSION", CompiledExtension("xlogx", "// never built", [], "weight-map"))
    monkeypatch.setattr(cpp_ext, "load_inline", boom)
    w = torch.tensor([[0.0, -0.5, 2.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="no compiler here") as caught:
        a, b = xlogx.abs_and_neg_xlogx(w)
        xlogx.abs_and_neg_xlogx(w)
    assert len(caught) == 1 and xlogx.active_backend(w) == "torch"
    torch.testing.assert_close(b, _nlogn(w), rtol=1e-15, atol=0)


def test_no_ext_env_skips_the_build(monkeypatch):
    from inseq_semiring.kernels.extension import CompiledExtension

    monkeypatch.setenv("INSEQ_SEMIRING_NO_EXT", "1")
    fresh = CompiledExtension("xlogx", "// never built", [], "weight-map")
    monkeypatch.setattr(xlogx, "EXTENSION", fresh)
    assert xlogx.active_backend(torch.ones(2)) == "torch"
    assert fresh.module is None and not fresh.failed  # not even attempted


def _hard_float32_weight(rows: int, cols: int) -> torch.Tensor:
    """float32 weights of every size class: zeros, ones, near 1 (where log |w| -> 0), subnormal, large, tiny."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05).float()
    w[0, :5] = torch.tensor([0.0, 1.0, -1.0, 0.999, 1.001])
    w[1, :4] = torch.tensor([torch.finfo(torch.float32).smallest_normal / 8, -1e-44, 1e-30, 3e4])
    w[2] = 1 + torch.linspace(-0.3, 0.3, cols)  # the log2 polynomial's whole range around 1
    return w


def test_summed_maps_bound_the_error_of_each_log():
    """``summed=True`` (the maps a matrix product sums at once): float32 entries within 2e-7 |w| (1 + |log |w||) of
    the float64 formula, or within the smallest normal where the entry is subnormal (the log's absolute error, not
    ~1 ulp of each entry); |w| exact; 0 log 0 = 0; float64 as
    without it."""
    if xlogx.active_backend(torch.zeros(1)) != "cpp":
        pytest.skip("no C++ extension here")
    w = _hard_float32_weight(37, 45)
    out = (torch.empty(w.numel()), torch.empty(w.numel()))
    a, b = xlogx.abs_and_neg_xlogx(w, out=out, summed=True)
    assert torch.equal(a, w.abs())
    exact = _nlogn(w.double())
    scale = w.double().abs() * (1 + w.double().abs().clamp_min(1e-300).log().abs())
    tiny = torch.finfo(torch.float32).smallest_normal  # results below it have subnormal precision
    assert bool(((b.double() - exact).abs() <= 2e-7 * scale + tiny).all())
    assert bool((b[w == 0] == 0).all()) and bool((b[w.abs() == 1] == 0).all())
    wd = w.double()
    outd = (torch.empty(w.numel(), dtype=torch.float64), torch.empty(w.numel(), dtype=torch.float64))
    assert torch.equal(xlogx.abs_and_neg_xlogx(wd, out=outd, summed=True)[1], xlogx.abs_and_neg_xlogx(wd)[1])


@pytest.mark.parametrize("rows_limit", [0, 8])
def test_float32_products_through_either_path_bound_their_error(monkeypatch, rows_limit):
    """float32 ``mapped_mm_pair`` by the blocked summed maps (kernel threshold 0) or the one-read kernel: within 1e-6
    of the float64 products, relative to the size of their terms."""
    monkeypatch.setattr(wm, "PAIR_KERNEL_ROWS", rows_limit)
    monkeypatch.setattr(wm, "BLOCK_ELEMENTS", 3 * 45)
    w = _hard_float32_weight(37, 45)
    g = torch.Generator().manual_seed(8)
    a1, a2 = torch.rand(2, 37, generator=g), torch.rand(1, 37, generator=g)
    got1, got2 = wm.mapped_mm_pair(a1, a2, w)
    wd = w.double()
    want1, want2 = a1.double() @ wd.abs(), a2.double() @ _nlogn(wd)
    scale2 = a2.double() @ (wd.abs() * (1 + wd.abs().clamp_min(1e-300).log().abs()))
    assert float(((got1.double() - want1).abs() / (a1.double() @ wd.abs())).max()) <= 1e-6
    assert float(((got2.double() - want2).abs() / scale2).max()) <= 1e-6

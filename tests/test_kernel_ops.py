"""The compiled kernels as dispatcher operators (kernels/extension.py ``dispatcher_op``, ``kernels_visible``): inside
``kernels_visible()`` every kernel entry point is one call of ``torch.ops.inseq_semiring.<name>`` that a dispatch mode
sees (and whose inner loops it does not), with the same results, bit for bit, as the direct call outside; a traced
sweep keeps the kernels it used (kernels/, traced_sweep.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inseq_semiring.kernels import maxtimes, rowcore, signed_rowcore, xlogx
from inseq_semiring.kernels.extension import kernels_visible, visible

torch.set_num_threads(1)


class _Seen(TorchDispatchMode):
    """The operators called under it, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _rows(shape, seed, positive=False):
    x = torch.randn(shape, generator=_g(seed))
    return x.abs() if positive else x


def _calls():
    """(operator name, call of the public kernel function) for every kernel; each call gives tensors or tuples."""
    a, b = _rows((2, 5, 7), 1, positive=True), _rows((2, 7, 3), 2)
    h = _rows((2, 5, 7), 3)
    xh, p, q = _rows((4, 6), 4), _rows((4, 6), 5, positive=True), _rows((4, 6), 6)
    w = _rows((9, 11), 7)
    d, u, v, z = (_rows((3, 8), s) for s in (8, 9, 10, 11))
    return [
        ("inseq_semiring::max_times", lambda: maxtimes.max_times(a, b, argmax=True)),
        ("inseq_semiring::max_times", lambda: maxtimes.max_times_abs(a, b, argmax=True)),
        ("inseq_semiring::max_min_pair", lambda: maxtimes.max_min_pair(h, h - 1, b)),
        ("inseq_semiring::core_pull_sum", lambda: rowcore.core_pull_sum(xh, p, q, pb=p)),
        ("inseq_semiring::core_pull_max", lambda: rowcore.core_pull_max(xh, p)),
        ("inseq_semiring::abs_neg_xlogx", lambda: xlogx.abs_and_neg_xlogx(w)),
        ("inseq_semiring::pair_products", lambda: xlogx.pair_products(p[:2, :6].contiguous(), p[2:, :6].contiguous(),
                                                                       w[:6], backend="cpp")),
        ("inseq_semiring::rank1_pull", lambda: xlogx.rank1_pull(d, u, v, z.abs(), z)),
        ("inseq_semiring::pointwise_pull", lambda: xlogx.pointwise_pull(d, z.abs(), u)),
        ("inseq_semiring::signed_rank1_pull", lambda: signed_rowcore.signed_rank1_pull(d, u, v, z, z - 1)),
        ("inseq_semiring::signed_core_pull", lambda: signed_rowcore.signed_core_pull(xh, p, -p)),
    ]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _tensors(o)] if isinstance(out, (tuple, list)) else []


def _kernels_available():
    return all(ext.load() is not None for ext in (maxtimes.EXTENSION, rowcore.EXTENSION, signed_rowcore.EXTENSION,
                                                  xlogx.EXTENSION))


@pytest.mark.skipif(not _kernels_available(), reason="the compiled kernels are not available here")
@pytest.mark.parametrize("index", range(len(_calls())))
def test_a_visible_kernel_is_one_operator_with_the_direct_results(index):
    name, call = _calls()[index]
    direct = _tensors(call())
    seen = _Seen()
    with kernels_visible(), seen:
        assert visible()
        through = _tensors(call())
    assert not visible()
    assert name in seen.names, seen.names
    assert not [n for n in seen.names if n.startswith("inseq_semiring::") and n != name], seen.names
    assert len(direct) == len(through) and direct
    for x, y in zip(direct, through):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    with _Seen() as outside:
        call()
    assert not [n for n in outside.names if n.startswith("inseq_semiring::")], outside.names


@pytest.mark.skipif(not _kernels_available(), reason="the compiled kernels are not available here")
def test_the_nan_rule_holds_through_the_operator():
    a = torch.tensor([[[1.0, float("inf")], [2.0, 0.5]]])
    b = torch.tensor([[[0.0, 1.0], [0.0, 2.0]]])  # inf * 0: NaN in the first output
    want = maxtimes.max_times(a, b)
    with kernels_visible():
        got = maxtimes.max_times(a, b)
    assert torch.isnan(want[0, 0, 0]) and torch.isnan(got[0, 0, 0])
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)

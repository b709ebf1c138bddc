"""No host synchronisation inside the sweep off the CPU (gradient, flow, entropy, maxpath in every mode).

On CUDA (skipped without a GPU): the sweep of a replayed plan runs under ``torch.cuda.set_sync_debug_mode("error")``.
On the CPU the same code paths are checked by forcing the device branch (``reads_on_host`` False) and running the sweep
under a dispatch mode that refuses every operator that reads a device value on the host (``_local_scalar_dense``:
``.item()``, ``bool(t)``, ``int(t)``; ``nonzero`` and boolean-mask indexing); the results must equal the CPU path's.
Maxpath is covered in the abs and signed modes, at scalar and tensor granularity, with and without back-pointers (the
winning edges must be the CPU's too), plus the torch backend of the max-times kernel (the CUDA fallback without
Triton) and the signed matrix-product pulls on offers built to make a zero-substituted kernel wrong.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import inseq_semiring as isr
import tiny_models as tm
from inseq_semiring.rules.weight_cache import sweep_scope
from inseq_semiring.rules import jacobians
from inseq_semiring.traversal import sweep

torch.set_num_threads(1)
aten = torch.ops.aten
SEMIRINGS = ["gradient", "flow", "entropy"]
#: name -> (semiring, options) of the device-branch test
MODES = {**{name: (name, {}) for name in SEMIRINGS}, "maxpath": ("maxpath", {}),
         "maxpath back-pointers": ("maxpath", {"backpointers": True}),
         "maxpath tensor": ("maxpath", {"granularity": "tensor"}),
         "maxpath tensor positive back-pointers": ("maxpath", {"granularity": "tensor", "sign": "positive",
                                                               "backpointers": True}),
         "maxpath positive": ("maxpath", {"sign": "positive"}),
         "maxpath negative back-pointers": ("maxpath", {"sign": "negative", "backpointers": True})}
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.is_nonzero.default,
          aten.item.default}


class _NoHostReads(TorchDispatchMode):
    """Every tensor stands for a device tensor except those made from Python data (``torch.tensor(1.0)``, i.e.
    ``lift_fresh``) and what is computed from those only: reading a value of a device tensor on the host fails."""

    def __init__(self):
        super().__init__()
        self.host: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so that ids stay unique)

    def _is_host(self, t) -> bool:
        return id(t) in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_host = func is aten.lift_fresh.default or (bool(tensors) and all(map(self._is_host, tensors)))
        if func in _READS and not on_host:
            raise AssertionError(f"host read inside the sweep: {func}")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and not on_host:
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                raise AssertionError(f"boolean-mask indexing (a nonzero) inside the sweep: {func}")
        out = func(*args, **kwargs)
        if on_host:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[id(t)] = t
        return out


def _replayed(case, semiring, x, **options):
    isr.run(case.fn, x, semiring, model=case.model, **options)
    res = isr.run(case.fn, x, semiring, model=case.model, **options)
    assert res.tape.plan is not None
    return res


def _sweep(res, x, mode=None):
    """``(values per input, back-pointers per node or None)`` of one sweep of ``res``'s tape with its plan."""
    tape, ring, plan = res.tape, res.semiring, res.tape.plan
    trail = {} if getattr(ring, "backpointers", False) else None  # back-pointers kept, as run() keeps them
    keep = None if trail is None else trail.__setitem__
    with torch.no_grad(), sweep_scope(plan.memo()):
        if mode is not None:
            with mode:
                env = sweep(tape, ring, ring.seed(tape.root), plan_rules=plan.rules, on_complete=keep)
                out = [ring.finalize(env.get(t), like) for t, like in zip(tape.input_ids, x)]
        else:
            env = sweep(tape, ring, ring.seed(tape.root), plan_rules=plan.rules, on_complete=keep)
            out = [ring.finalize(env.get(t), like) for t, like in zip(tape.input_ids, x)]
    # back-pointers (maxpath with backpointers=True): the winning edge and element of every node
    pointers = None if trail is None else {tid: list((v.pointers("hi") or ()) + (v.pointers("lo") or ()))
                                           for tid, v in trail.items()}
    return out, pointers


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5"])
def test_the_device_branch_reads_nothing_on_the_host_and_gives_the_cpu_numbers(name, mode, monkeypatch):
    semiring, options = MODES[mode]
    case = tm.build(name)
    res = _replayed(case, semiring, case.inputs, **options)
    want, pointers = _sweep(res, case.inputs)
    with pytest.raises(AssertionError, match="host read|boolean-mask"):  # the CPU branch does read: the check works
        _sweep(res, case.inputs, _NoHostReads())
    monkeypatch.setattr(jacobians, "reads_on_host", lambda t: False)
    res = _replayed(case, semiring, case.inputs, **options)  # a plan built with the device branch
    got, got_pointers = _sweep(res, case.inputs, _NoHostReads())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12 * float(w.abs().max()))
    if options.get("backpointers"):  # the same winning edges and elements at every node
        assert pointers.keys() == got_pointers.keys()
        for tid, srcs in pointers.items():
            assert all(torch.equal(a, b) for a, b in zip(srcs, got_pointers[tid])), tid


def test_the_layer_norm_core_fallback_reads_nothing_on_the_host(monkeypatch):
    """The pure-torch layer-norm core pulls (the CUDA path; on the CPU the compiled kernel runs instead)."""
    from inseq_semiring.kernels import rowcore

    gen = torch.Generator().manual_seed(0)
    xh = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    p = torch.randn(6, 5, generator=gen, dtype=torch.float64).abs()
    p[[1, 4]] = 0  # dead rows: skipped on the CPU, computed (to 0, argmax 0) on a device
    q = torch.randn(6, 5, generator=gen, dtype=torch.float64) * (p != 0)
    want_sum, want_max = rowcore._torch_sum(xh, p, q, p), rowcore._torch_max(xh, p)
    monkeypatch.setattr(jacobians, "reads_on_host", lambda t: False)
    with _NoHostReads():
        got_sum, got_max = rowcore._torch_sum(xh, p, q, p), rowcore._torch_max(xh, p)
    for g, w in zip((*got_sum, *got_max), (*want_sum, *want_max)):
        assert torch.equal(g, w)


def test_the_torch_max_times_with_argmax_reads_nothing_on_the_host(monkeypatch):
    """The torch backend of max-times (CUDA without Triton): off the CPU the same values and winners as on it, also
    with NaN and inf (a NaN output points at its first NaN product), without host reads; finite outputs equal the
    C++ kernel's."""
    from inseq_semiring.kernels.maxtimes import max_times

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 300, generator=gen).abs()
    b = torch.randn(3, 300, 9, generator=gen).abs()
    a[0, 1, 5] = float("nan")
    b[1, 2, 4] = float("inf")
    a[2, 3] = 0.0
    want = max_times(a, b, argmax=True, _backend="torch")
    cpp = max_times(a, b, argmax=True, _backend="cpp")
    finite = torch.isfinite(cpp[0])
    assert torch.equal(want[0][finite], cpp[0][finite]) and torch.equal(want[1][finite], cpp[1][finite])
    with pytest.raises(AssertionError, match="host read"):  # the CPU branch reads: the check works
        with _NoHostReads():
            max_times(a, b, argmax=True, _backend="torch")
    monkeypatch.setattr(jacobians, "reads_on_host", lambda t: False)
    with _NoHostReads():
        got = max_times(a, b, argmax=True, _backend="torch")
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[1], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_no_host_synchronisation_in_the_cuda_sweep(name, mode):
    semiring, options = MODES[mode]
    case = tm.build(name)
    model = case.model.to("cuda")
    try:
        x = tuple(t.to("cuda") for t in case.inputs)
        res = _replayed(case, semiring, x, **options)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got, _ = _sweep(res, x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want = isr.run(case.fn, tuple(t.cpu() for t in x), semiring, plans=False, **options).values
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))
    finally:
        model.to("cpu")


def _signed_offers(shape, gen, dead=(), partial_frac=0.4):
    """Signed (M+, M-) offers with absent elements (-inf, +inf): whole slices dead, others partly reachable, values
    of both signs (where a zero-substituted kernel would be wrong)."""
    lo = torch.randn(shape, generator=gen, dtype=torch.float64)
    hi = lo + torch.rand(shape, generator=gen, dtype=torch.float64)
    absent = torch.rand(shape, generator=gen) < partial_frac
    for index in dead:
        absent[index] = True
    return hi.masked_fill(absent, float("-inf")), lo.masked_fill(absent, float("inf"))


@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("case", ["rows", "batched left", "batched right", "mostly dead"])
def test_signed_matmul_pulls_off_the_cpu_equal_the_cpu_ones(case, index, monkeypatch):
    """The scalar signed max-path pulls through matrix products: the device branch (every row through the kernels,
    every output also exactly from the masked candidates, masks choosing) gives the CPU branch's values and winners
    (dead rows skipped, partly reachable slices redone where the zero-substituted kernels can be wrong)."""
    from inseq_semiring.rules.jacobians import MatMul
    from inseq_semiring.semirings.maxpath import _signed_pull

    gen = torch.Generator().manual_seed(3)
    if case == "rows":
        kind = MatMul(torch.randn(6, 5, generator=gen, dtype=torch.float64), True, torch.Size([7, 5]),
                      torch.Size([7, 6]))
        hi, lo = _signed_offers((7, 6), gen, dead=[2, 5])
    elif case in ("batched left", "mostly dead"):
        kind = MatMul(torch.randn(3, 6, 5, generator=gen, dtype=torch.float64), True, torch.Size([3, 4, 5]),
                      torch.Size([3, 4, 6]))
        dead = [(0, 1), (2, 3)] if case == "batched left" else [(0, 0), (0, 1), (0, 3), (1, 0), (1, 2), (1, 3),
                                                                  (2, 0), (2, 1), (2, 2)]
        hi, lo = _signed_offers((3, 4, 6), gen, dead=dead)
    else:
        kind = MatMul(torch.randn(3, 5, 4, generator=gen, dtype=torch.float64), False, torch.Size([3, 5, 6]),
                      torch.Size([3, 4, 6]))
        hi, lo = _signed_offers((3, 4, 6), gen, dead=[(0, slice(None), 1), (2, slice(None), 4)])
    want = _signed_pull(kind, hi, lo, index=index)
    monkeypatch.setattr(jacobians, "reads_on_host", lambda t: False)
    with _NoHostReads():
        got = _signed_pull(kind, hi, lo, index=index)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert torch.equal(g, w)

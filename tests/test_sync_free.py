"""No host synchronisation inside the sweep off the CPU (gradient, flow, entropy).

On CUDA (skipped without a GPU): the sweep of a replayed plan runs under ``torch.cuda.set_sync_debug_mode("error")``.
On the CPU the same code paths are checked by forcing the device branch (``reads_on_host`` False) and running the sweep
under a dispatch mode that refuses every operator that reads a device value on the host (``_local_scalar_dense``:
``.item()``, ``bool(t)``, ``int(t)``; ``nonzero`` and boolean-mask indexing); the results must equal the CPU path's.
The maxpath semirings (semirings/maxpath.py, kernels/maxtimes.py) still read counts on the host and are not covered.
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


def _replayed(case, semiring, x):
    isr.run(case.fn, x, semiring, model=case.model)
    res = isr.run(case.fn, x, semiring, model=case.model)
    assert res.tape.plan is not None
    return res


def _sweep(res, x, mode=None):
    tape, ring, plan = res.tape, res.semiring, res.tape.plan
    with torch.no_grad(), sweep_scope(plan.memo()):
        if mode is not None:
            with mode:
                env = sweep(tape, ring, ring.seed(tape.root), plan_rules=plan.rules)
                return [ring.finalize(env.get(t), like) for t, like in zip(tape.input_ids, x)]
        env = sweep(tape, ring, ring.seed(tape.root), plan_rules=plan.rules)
        return [ring.finalize(env.get(t), like) for t, like in zip(tape.input_ids, x)]


@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5"])
def test_the_device_branch_reads_nothing_on_the_host_and_gives_the_cpu_numbers(name, semiring, monkeypatch):
    case = tm.build(name)
    res = _replayed(case, semiring, case.inputs)
    want = _sweep(res, case.inputs)
    with pytest.raises(AssertionError, match="host read|boolean-mask"):  # the CPU branch does read: the check works
        _sweep(res, case.inputs, _NoHostReads())
    monkeypatch.setattr(jacobians, "reads_on_host", lambda t: False)
    res = _replayed(case, semiring, case.inputs)  # a plan built with the device branch
    got = _sweep(res, case.inputs, _NoHostReads())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12 * float(w.abs().max()))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_no_host_synchronisation_in_the_cuda_sweep(name, semiring):
    case = tm.build(name)
    model = case.model.to("cuda")
    try:
        x = tuple(t.to("cuda") for t in case.inputs)
        res = _replayed(case, semiring, x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = _sweep(res, x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want = isr.run(case.fn, tuple(t.cpu() for t in x), semiring, plans=False).values
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))
    finally:
        model.to("cpu")

"""Index maps shared within a sweep (one per operator, shape, strides and arguments) give autograd's gradient, also
when calls of the same operator on the same shape differ only in their arguments or in the input's strides."""

import torch

import inseq_semiring as isr
from inseq_semiring.rules import structural
from inseq_semiring.rules.weight_cache import sweep_scope


def _fn(x):
    c = torch.arange(24.0).reshape(2, 3, 4)
    a = x.transpose(0, 1).transpose(0, 1)  # same op, same shape, same args twice: shared index
    b = x.transpose(1, 2)  # same op and shape as the first transpose, other dims
    b2 = x.transpose(1, 2)  # exactly b's call: shares b's index
    nc = x.transpose(0, 2).contiguous().transpose(0, 2)  # same shape as x, other strides
    d = nc.transpose(1, 2)
    s1, s2 = x.split(2, dim=2), x.split(1, dim=2)
    return ((a * c).sum() + (b.sin() * d * b2.cos()).sum() + (nc * c).pow(2).sum() + (s1[1] * s2[0]).sum()
            + x.select(1, 2).sum() + x.select(2, 1).exp().sum())


def test_gradient_with_shared_index_maps_equals_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    got = isr.semiring_backward(_fn, x, "gradient")[0]
    xr = x.clone().requires_grad_(True)
    want = torch.autograd.grad(_fn(xr), xr)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_memo_is_used_and_keyed_by_arguments_and_strides():
    from inseq_semiring.graph.recorder import record

    x = torch.randn(2, 3, 4)
    tape = record(_fn, (x,))
    transposes = [r for r in tape.records if r.op is torch.ops.aten.transpose.int]
    with sweep_scope():
        idx = {r.index: structural._index_maps(r, 0)[0][0] for r in transposes}
    same = [(p, q) for p in transposes for q in transposes if p.index < q.index
            and structural._memo_key(p, 0) == structural._memo_key(q, 0)]
    assert same, "two identical transpose calls should share one key"
    for p, q in same:
        assert idx[p.index] is idx[q.index]
    for r in transposes:  # every shared index equals the one computed afresh
        torch.testing.assert_close(idx[r.index], structural._index_call(r, 0)[0].long(), rtol=0, atol=0)

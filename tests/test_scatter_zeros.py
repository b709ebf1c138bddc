"""``semirings.base.scatter_zeros``: the zero tensor a scatter pull writes into. Large CPU ones come from calloc'd
memory (zero pages mapped on first touch); they are ordinary tensors to every later operation, and a sweep whose every
scatter pull takes them gives the bits of the default path, for every semiring and tiny architecture."""

import pytest
import torch

import inseq_semiring as isr
from inseq_semiring.semirings import base
from tiny_models import ARCHS, assert_same_bits, build

torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scatter_zeros_are_writable_zeros_of_the_dtype(dtype, monkeypatch):
    monkeypatch.setattr(base, "LAZY_ZERO_ELEMENTS", 1)
    like = torch.ones(3, dtype=dtype)
    z = base.scatter_zeros(1000, like)
    assert z.dtype == dtype and z.device == like.device and z.shape == (1000,) and z.is_contiguous()
    assert not z.requires_grad and z._base is None
    assert torch.equal(z, torch.zeros(1000, dtype=dtype))
    z.scatter_(0, torch.tensor([3, 999]), torch.tensor([2.0, -1.0], dtype=dtype))
    z.index_add_(0, torch.tensor([3]), torch.tensor([1.0], dtype=dtype))
    z.div_(2)
    assert z[3] == 1.5 and z[999] == -0.5 and int((z != 0).sum()) == 2
    assert base.scatter_zeros(0, like).shape == (0,)


def test_small_zeros_are_plain_tensors():
    like = torch.ones(2)
    assert base.LAZY_ZERO_ELEMENTS > 1000
    assert torch.equal(base.scatter_zeros(10, like), torch.zeros(10))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_semiring_equals_the_default_path_with_lazy_zeros(name, monkeypatch):
    case = build(name)
    rings = [("gradient", {}), ("flow", {}), ("entropy", {}), ("maxpath", {"sign": "abs"})]
    want = [isr.run(case.fn, case.inputs, r, model=case.model, plans=False, **o).values for r, o in rings]
    monkeypatch.setattr(base, "LAZY_ZERO_ELEMENTS", 1)
    got = [isr.run(case.fn, case.inputs, r, model=case.model, plans=False, **o).values for r, o in rings]
    for (r, _), g, w in zip(rings, got, want):
        assert_same_bits(g, w, f"{name} {r}")
    grad = isr.run(case.fn, case.inputs, "gradient", model=case.model, plans=False).values
    inputs = [x.detach().clone().requires_grad_(True) for x in case.inputs]
    auto = torch.autograd.grad(case.fn(*inputs), inputs)
    for g, a in zip(grad, auto):
        torch.testing.assert_close(g, a, rtol=1e-10, atol=1e-12)

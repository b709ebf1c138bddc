"""``F.cross_entropy`` / ``F.nll_loss`` as the root (``aten.nll_loss_forward``): only the target entries are edges.
Checked against autograd, the dense-Jacobian reference, brute-force path enumeration, and the same loss written
out by hand (``-log_softmax(z).gather(...)`` then a weighted mean), whose paths carry the same products."""

import pytest
import torch
import torch.nn.functional as F

import inseq_semiring as isr
from reference import dense
from reference.enumerate import enumerate_semirings
from shared import ALL_MODES, assert_close_scaled

torch.set_num_threads(1)

TARGETS = torch.tensor([1, 3, 1])
CLASS_WEIGHT = torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=torch.float64)  # class 2 weighs 0: still an edge

CASES = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "class-weights": dict(weight=CLASS_WEIGHT),
    "class-weights-sum": dict(weight=CLASS_WEIGHT, reduction="sum"),
    "ignore-index": dict(ignore_index=3),
}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 4)).double()


def _loss(net, case, targets=TARGETS):
    opts = CASES[case]
    if opts.get("reduction") == "none":
        return lambda x: (F.cross_entropy(net(x), targets, **opts) * torch.tensor([1.0, -2.0, 0.5])).sum()
    return lambda x: F.cross_entropy(net(x), targets, **opts)


def _inputs():
    return (torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64),)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_root_matches_autograd_and_the_dense_reference(case):
    net, xs = _net(), _inputs()
    fn = _loss(net, case)
    x = xs[0].clone().requires_grad_(True)
    expected = torch.autograd.grad(fn(x), x)
    assert_close_scaled(isr.semiring_backward(fn, xs, "gradient"), expected, 1e-12, case)
    g = dense.dense_graph(fn, xs)
    assert "aten.nll_loss_forward.default" in {str(r.op) for r in g.tape.records}
    ref = dense.all_semirings(g)
    for mode, (semiring, options) in ALL_MODES.items():
        actual = isr.semiring_backward(fn, xs, semiring, **options)
        assert_close_scaled(actual, ref[mode], 1e-12, f"{case}/{mode}")


def test_loss_root_matches_path_enumeration():
    net, xs = _net(), _inputs()
    fn = _loss(net, "class-weights")
    found = enumerate_semirings(dense.dense_graph(fn, xs))
    for mode in ("gradient", "flow", "entropy", "maxpath", "positive", "negative"):
        semiring, options = ALL_MODES[mode]
        assert_close_scaled(isr.semiring_backward(fn, xs, semiring, **options), found[mode], 1e-12, mode)


def test_loss_equals_its_hand_written_form():
    """Same paths, same products: every scalar semiring agrees with ``-(w * log_softmax(z)[y]).sum() / w.sum()``."""
    net, xs = _net(), _inputs()
    fused = _loss(net, "class-weights")

    def by_hand(x):
        picked = torch.log_softmax(net(x), -1).gather(1, TARGETS[:, None]).squeeze(1)
        w = CLASS_WEIGHT[TARGETS]
        return (picked * (-w / w.sum())).sum()

    torch.testing.assert_close(fused(xs[0]), by_hand(xs[0]), rtol=1e-14, atol=0)
    for mode in ("gradient", "flow", "entropy", "maxpath", "positive", "negative"):
        semiring, options = ALL_MODES[mode]
        a = isr.semiring_backward(fused, xs, semiring, **options)
        b = isr.semiring_backward(by_hand, xs, semiring, **options)
        assert_close_scaled(a, b, 1e-12, mode)


def test_one_dimensional_input_and_nll_loss():
    torch.manual_seed(2)
    z = torch.randn(5, dtype=torch.float64)
    fn = lambda v: F.nll_loss(torch.log_softmax(v * v, 0), torch.tensor(3))  # noqa: E731
    x = z.clone().requires_grad_(True)
    expected = torch.autograd.grad(fn(x), x)
    assert_close_scaled(isr.semiring_backward(fn, (z,), "gradient"), expected, 1e-12)
    ref = dense.all_semirings(dense.dense_graph(fn, (z,)))
    for mode in ("flow", "entropy", "positive", "negative"):
        semiring, options = ALL_MODES[mode]
        assert_close_scaled(isr.semiring_backward(fn, (z,), semiring, **options), ref[mode], 1e-12, mode)

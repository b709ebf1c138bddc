"""``semirings.base.live_mask``, the row test of every row skip, is ``(t != 0).any(dim)``: NaN and inf count as live,
``-0.0`` as zero, empty slices as dead, along either dim; and a pull that skips rows gives what one over every row
gives (a next-token root: one live row of the LM head)."""

import pytest
import torch

from inseq_semiring.semirings.base import live_mask

torch.set_num_threads(1)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_live_mask_is_any_nonzero(dim):
    t = torch.zeros(6, 9)
    t[1, 3] = float("nan")
    t[2, 0] = -0.0
    t[3, 8] = float("-inf")
    t[4, :] = -1e-45  # subnormal
    t[5, 4] = 2.0
    t[0, 5] = float("inf")
    torch.testing.assert_close(live_mask(t, dim), (t != 0).any(dim))
    assert live_mask(t, -1).tolist() == [True, True, False, True, True, True]


def test_live_mask_of_empty_slices():
    assert live_mask(torch.zeros(3, 0)).tolist() == [False, False, False]
    assert live_mask(torch.zeros(0, 4)).shape == (0,)
    assert live_mask(torch.zeros(2, 0, 5), 1).shape == (2, 5)


@pytest.mark.parametrize("semiring", ["flow", "entropy", "maxpath"])
def test_a_skipping_pull_equals_a_dense_one(semiring):
    """Rows of the LM head's value that carry nothing are skipped; the result is the one of a root that touches every
    row with a zero weight on all but the last (so no row carries exactly nothing and none is skipped)."""
    import inseq_semiring as isr

    torch.manual_seed(0)
    w = torch.randn(40, 16)
    x = torch.randn(5, 16)

    def last_row(e):
        return torch.log_softmax(torch.tanh(e) @ w.t(), -1)[-1, 7]

    def every_row(e):  # the same function of e; every row's logits reach the root (weight 1e-30 off the last row)
        scores = torch.log_softmax(torch.tanh(e) @ w.t(), -1)
        return scores[-1, 7] + 1e-30 * scores[:-1].sum()

    skipped = isr.run(last_row, [x], semiring).values[0]
    dense = isr.run(every_row, [x], semiring).values[0]
    torch.testing.assert_close(skipped[-1], dense[-1], rtol=1e-5, atol=1e-6)

"""Batch invariance of every method: a batch of rows gives each row's own attribution (to 1e-6)."""

import pytest
import torch

from inseq_semiring import methods
from tiny_models import build

torch.set_num_threads(1)

OPTIONS = {
    "guided_backprop": {},
    "deeplift_shap": {"baselines": "two"},
    "guided_integrated_gradients": {"steps": 12, "max_dist": 0.1},
    "greedy_pig": {"rounds": 2, "k": 3, "steps": 6},
    "pgd_attribution": {"steps": 4, "epsilon": 0.5, "random_start": True},
}


def _options(name, inputs, rows):
    opts = dict(OPTIONS[name])
    if opts.get("baselines") == "two":
        gen = torch.Generator().manual_seed(0)
        opts["baselines"] = [tuple(torch.zeros_like(x) for x in inputs),
                             tuple(0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in inputs)]
    return opts


def _row(opts, r):
    out = dict(opts)
    if "baselines" in out:
        out["baselines"] = [tuple(b[r:r + 1] for b in base) for base in out["baselines"]]
    return out


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_batch_equals_rows_alone(name, arch):
    case = build(arch, per_row=True, batch=3)
    fn = getattr(methods, name)
    opts = _options(name, case.inputs, 3)
    if name == "pgd_attribution":  # the random start is drawn for the whole batch: give rows their own draws
        opts.pop("random_start")
    together = fn(case.fn, case.inputs, model=case.model, **opts)
    assert all(t.shape == x.shape for t, x in zip(together, case.inputs))
    for r in range(3):
        alone = fn(case.fn, tuple(x[r:r + 1] for x in case.inputs), model=case.model, **_row(opts, r))
        for t, a in zip(together, alone):
            torch.testing.assert_close(t[r:r + 1], a, rtol=1e-6, atol=1e-9)

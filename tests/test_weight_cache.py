"""Cached mapped weights (|W|, -|W| log|W|) never outlive a change of the weights."""

import pytest
import torch

import inseq_semiring as isr
from inseq_semiring.rules import weight_cache

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()


@pytest.mark.parametrize("update", ["optimizer", "data", "load_state_dict"])
@pytest.mark.parametrize("semiring", ["flow", "entropy", "maxpath"])
def test_results_follow_weight_updates(update, semiring, monkeypatch):
    monkeypatch.setenv("INSEQ_SEMIRING_WEIGHT_CACHE_MB", "64")
    weight_cache.clear()
    model = _model()
    x = torch.randn(3, 4, dtype=torch.float64)
    root = lambda e: model(e).sum()  # noqa: E731
    before, = isr.run(root, x, semiring, model=model).values
    with torch.no_grad():
        if update == "optimizer":
            model[0].weight.mul_(-1.5)
        elif update == "data":  # does not bump the version counter
            model[0].weight.data.mul_(-1.5)
        else:
            state = {k: v * 1.5 for k, v in model.state_dict().items()}
            model.load_state_dict(state)
    assert weight_cache.cache_bytes() > 0
    cached, = isr.run(root, x, semiring, model=model).values
    weight_cache.clear()
    fresh, = isr.run(root, x, semiring, model=model).values
    torch.testing.assert_close(cached, fresh, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(before, fresh)


def test_cache_can_be_disabled(monkeypatch):
    monkeypatch.setenv("INSEQ_SEMIRING_WEIGHT_CACHE_MB", "0")
    weight_cache.clear()
    model = _model()
    isr.run(lambda e: model(e).sum(), torch.randn(2, 4, dtype=torch.float64), "entropy", model=model)
    assert weight_cache.cache_bytes() == 0

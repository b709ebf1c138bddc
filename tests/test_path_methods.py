"""Guided IG, Greedy PIG and PGD attributions: the reference cases and the properties their papers state."""

import pytest
import torch
from captum.attr import IntegratedGradients

from inseq_semiring.errors import InvalidInputError
from inseq_semiring.methods import greedy_pig, guided_integrated_gradients, pgd_attribution
from inseq_semiring.methods.integrated_gradients import integrated_gradients
from inseq_semiring.methods.pgd import project
from tiny_models import build

torch.set_num_threads(1)
D = torch.float64


def _quadratic(x):
    return (2 * x[0] + x[1]) ** 2


X = torch.tensor([3.0, 3.0], dtype=D)


# -- Guided IG ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(max_dist=0.0, fraction=0.1), dict(max_dist=0.5, fraction=1.0)])
def test_guided_ig_reduces_to_ig(options):
    a, = guided_integrated_gradients(_quadratic, X, steps=1000, **options)
    torch.testing.assert_close(a, torch.tensor([54.0, 27.0], dtype=D), rtol=0.01, atol=0)


def test_guided_ig_unbounded_moves_the_small_gradient_feature_first():
    a, = guided_integrated_gradients(_quadratic, X, steps=1000, fraction=0.1, max_dist=1.0)
    torch.testing.assert_close(a, torch.tensor([72.0, 9.0], dtype=D), rtol=0.01, atol=0)


def test_guided_ig_intermediate_max_dist_lies_between_and_stays_complete():
    firsts = []
    for max_dist in (0.1, 0.2, 0.4):
        a, = guided_integrated_gradients(_quadratic, X, steps=1000, fraction=0.1, max_dist=max_dist)
        assert 54.5 < float(a[0]) < 71.5 and 9.5 < float(a[1]) < 26.5
        assert abs(float(a.sum()) - 81.0) < 0.1
        firsts.append(float(a[0]))
    assert firsts[0] < firsts[1] < firsts[2]  # the further the path may stray, the closer to [72, 9]
    assert 55.0 < firsts[1] < 71.0  # max_dist=0.2: the window of the algorithm's authors' test


def test_guided_ig_completeness_improves_with_steps_on_a_tiny_transformer():
    case = build("llama", per_row=True, batch=1)
    # not the zero embedding: RMS norm near a zero vector has gradients of order eps^-1/2 (a Riemann sum's worst case)
    base = (0.5 * torch.randn(case.inputs[0].shape, dtype=D, generator=torch.Generator().manual_seed(9)),)
    with torch.no_grad():
        delta = float((case.fn(*case.inputs) - case.fn(*base))[0])
    errors = []
    for steps in (8, 32, 128):
        a, = guided_integrated_gradients(case.fn, case.inputs, baselines=base, steps=steps, fraction=0.25,
                                         max_dist=0.1, model=case.model)
        errors.append(abs(float(a.sum()) - delta))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < errors[0] / 4  # a Riemann sum along the chosen path: the error shrinks about like 1/steps


def test_guided_ig_checks_its_options():
    with pytest.raises(InvalidInputError, match="fraction"):
        guided_integrated_gradients(_quadratic, X, fraction=0)
    with pytest.raises(InvalidInputError, match="max_dist"):
        guided_integrated_gradients(_quadratic, X, max_dist=2)


# -- Greedy PIG -----------------------------------------------------------------------------------------------------

def _mlp(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(6, 9, generator=gen, dtype=D), torch.randn(9, generator=gen, dtype=D)
    return lambda e: torch.tanh(e @ w1) @ w2


def test_one_round_is_integrated_gradients():
    f = _mlp()
    x = torch.randn(3, 6, dtype=D, generator=torch.Generator().manual_seed(1))
    ours, = greedy_pig(f, x, rounds=1, k=2, steps=16)
    ref = IntegratedGradients(f).attribute(x, baselines=torch.zeros_like(x), n_steps=16, method="riemann_middle")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("per_token", [False, True])
def test_selection_grows_by_k_and_selected_attributions_are_kept(per_token):
    f = (lambda e: _mlp()(e.reshape(e.shape[0], -1)[:, :6])) if per_token else _mlp()
    x = torch.randn(2, 4, 2, dtype=D, generator=torch.Generator().manual_seed(2)) if per_token else \
        torch.randn(2, 6, dtype=D, generator=torch.Generator().manual_seed(2))
    k, rounds, steps = 2 if not per_token else 1, 2, 12
    (attr,), (order,) = greedy_pig(f, x, rounds=rounds, k=k, steps=steps, per_token=per_token, return_order=True)
    o = order[..., 0] if per_token else order
    flat = o.reshape(2, -1)
    for r in range(1, rounds + 1):
        assert torch.all(((flat > 0) & (flat <= r)).sum(1) == r * k)
    # replay: the features selected in round r keep that round's IG from the baseline with earlier picks fixed
    sel_mask = lambda upto: (order > 0) & (order < upto)  # noqa: E731
    for r in range(1, rounds + 1):
        base = torch.where(sel_mask(r), x, torch.zeros_like(x))
        ig, = integrated_gradients(f, (x,), (base,), steps)
        picked = order == r
        torch.testing.assert_close(attr[picked], ig[picked], rtol=1e-10, atol=1e-12)
    never = order == 0
    assert bool(never.any())
    base = torch.where(sel_mask(rounds), x, torch.zeros_like(x))
    ig, = integrated_gradients(f, (x,), (base,), steps)
    torch.testing.assert_close(attr[never], ig[never], rtol=1e-10, atol=1e-12)


# -- PGD ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_keeps_the_perturbation_in_the_ball(norm):
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(5, 7, generator=gen, dtype=D) * 3
    p = project(d, 0.5, norm)
    size = p.norm(dim=1) if norm == "l2" else p.abs().amax(1)
    assert torch.all(size <= 0.5 + 1e-12)
    inside = d * 0.01
    torch.testing.assert_close(project(inside, 0.5, norm), inside)  # already inside: unchanged
    f = _mlp()
    x = torch.randn(3, 6, dtype=D, generator=gen)
    for variant in ("vapgd",):
        a, = pgd_attribution(f, x, epsilon=0.3, steps=25, step_size=0.2, norm=norm, variant=variant)
        size = a.norm(dim=1) if norm == "l2" else a.abs().amax(1)
        assert torch.all(size <= 0.3 + 1e-12)
        with torch.no_grad():
            assert torch.all(f(x - a) < f(x))  # the perturbation -a lowers the output


def test_one_tiny_step_is_proportional_to_the_gradient():
    f = _mlp()
    x = torch.randn(3, 6, dtype=D, generator=torch.Generator().manual_seed(3))
    a, = pgd_attribution(f, x, epsilon=1.0, steps=1, step_size=1e-6, norm="l2")
    e = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(f(e).sum(), e)
    ratio = a / g
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-9, atol=0)
    assert torch.all(ratio > 0)
    inp, = pgd_attribution(f, x, epsilon=1.0, steps=1, step_size=1e-6, variant="pgdinp")
    torch.testing.assert_close(inp, a * x)


def test_pgd_is_deterministic_with_a_seed():
    f = _mlp()
    x = torch.randn(2, 6, dtype=D, generator=torch.Generator().manual_seed(4))
    runs = [pgd_attribution(f, x, random_start=True, seed=s, steps=5)[0] for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])

"""Plan once, replay many (inseq_semiring/plan.py): a replayed call equals a fresh sweep bit for bit, on all ten tiny
architectures and every semiring; a plan is not reused when the shapes, dtype, rules or graph change, and weights
written through ``.data`` are followed; concurrent calls sharing plans give the sequential results."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import inseq_semiring as isr
import tiny_models as tm
from inseq_semiring import plan as plan_mod
from inseq_semiring.paths import top_paths
from inseq_semiring.rules import registry
from inseq_semiring.rules.jacobians import Pointwise
from inseq_semiring.rules.registry import Edge, RuleSet
from shared import ALL_MODES

torch.set_num_threads(1)
aten = torch.ops.aten


def _same(a, b, what=""):
    assert len(a) == len(b), what
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, what
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _close(a, b, what=""):
    """Against autograd: the same function, another order of float operations (rounding only)."""
    assert len(a) == len(b), what
    for x, y in zip(a, b):
        tol = 1e-10 if x.dtype == torch.float64 else 1e-4
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * float(y.abs().max()), msg=lambda m: f"{what}: {m}")


def _new_inputs(case, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in case.inputs)


def _paths(res):
    return [(p.input_index, p.value, [(h.op, h.module_path, h.index, h.local_weight) for h in p.hops])
            for p in top_paths(res, k=3)]


@pytest.mark.parametrize("mode", list(ALL_MODES))
@pytest.mark.parametrize("name", list(tm.ARCHS))
def test_replay_equals_a_fresh_sweep_bit_for_bit(name, mode):
    semiring, options = ALL_MODES[mode]
    case = tm.build(name)
    plan_mod.PLANS.clear(case.model)
    first = isr.run(case.fn, case.inputs, semiring, model=case.model, **options)  # builds the plan
    assert first.tape.plan is None and plan_mod.PLANS.size(case.model) == 1
    x = _new_inputs(case, seed=7)  # other values, same shapes: a replay
    replay = isr.run(case.fn, x, semiring, model=case.model, **options)
    assert replay.tape.plan is not None, "the second call of the same shapes did not replay"
    fresh = isr.run(case.fn, x, semiring, model=case.model, plans=False, **options)
    assert fresh.tape.plan is None
    _same(replay.values, fresh.values, f"{name}/{mode}")
    if mode == "gradient":
        xs = tuple(t.clone().requires_grad_(True) for t in x)
        _close(replay.values, torch.autograd.grad(case.fn(*xs), xs), f"{name}: autograd")


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_replay_with_back_pointers_gives_the_fresh_paths(name):
    case = tm.build(name)
    plan_mod.PLANS.clear(case.model)
    isr.run(case.fn, case.inputs, "maxpath", model=case.model, backpointers=True)
    x = _new_inputs(case, seed=3)
    replay = isr.run(case.fn, x, "maxpath", model=case.model, backpointers=True)
    fresh = isr.run(case.fn, x, "maxpath", model=case.model, backpointers=True, plans=False)
    assert replay.tape.plan is not None
    _same(replay.values, fresh.values, name)
    assert _paths(replay) == _paths(fresh)


def _grad(fn, inputs):
    xs = tuple(t.clone().requires_grad_(True) for t in inputs)
    return torch.autograd.grad(fn(*xs), xs)


def test_a_new_shape_gets_its_own_plan():
    case = tm.build("gpt2")
    plan_mod.PLANS.clear(case.model)
    isr.run(case.fn, case.inputs, "flow", model=case.model)
    longer = (torch.randn(1, tm.SEQ + 2, tm.HIDDEN, dtype=torch.float64),)
    res = isr.run(case.fn, longer, "flow", model=case.model)
    assert res.tape.plan is None and plan_mod.PLANS.size(case.model) == 2
    _same(res.values, isr.run(case.fn, longer, "flow", model=case.model, plans=False).values)
    again = isr.run(case.fn, longer, "flow", model=case.model)
    assert again.tape.plan is not None
    _same(again.values, res.values)


def test_a_new_dtype_gets_its_own_plan():
    case = tm.build("llama")
    model = copy.deepcopy(case.model)

    def fn(emb):
        return torch.log_softmax(model(inputs_embeds=emb, use_cache=False).logits[:, -1], -1)[0, tm.TARGET]

    isr.run(fn, case.inputs, "gradient", model=model)
    model.float()  # the same module object, now float32
    x32 = tuple(x.float() for x in case.inputs)
    res = isr.run(fn, x32, "gradient", model=model)
    assert res.tape.plan is None, "a plan made for float64 inputs was reused for float32 ones"
    assert res.values[0].dtype == torch.float32
    _close(res.values, _grad(fn, x32))
    assert isr.run(fn, x32, "gradient", model=model).tape.plan is not None


def _scaled_tanh_rule(rec):
    y = rec.outputs[0]
    return [Edge(0, 0, Pointwise(2 * (1 - y * y), rec.leaves[0].shape, y.shape))]


def test_other_rules_get_their_own_plan_and_their_own_numbers():
    case = tm.build("gpt2")  # GPT-2's gelu_new calls tanh
    plan_mod.PLANS.clear(case.model)
    default = isr.run(case.fn, case.inputs, "gradient", model=case.model)
    doubled = RuleSet("doubled-tanh", {aten.tanh.default: _scaled_tanh_rule})
    res = isr.run(case.fn, case.inputs, "gradient", model=case.model, rules=doubled)
    assert res.tape.plan is None
    fresh = isr.run(case.fn, case.inputs, "gradient", model=case.model, rules=doubled, plans=False)
    _same(res.values, fresh.values)
    assert not torch.equal(res.values[0], default.values[0]), "the override changed nothing: the test tests nothing"
    replay = isr.run(case.fn, case.inputs, "gradient", model=case.model, rules=doubled)
    assert replay.tape.plan is not None
    _same(replay.values, fresh.values)
    back = isr.run(case.fn, case.inputs, "gradient", model=case.model)
    assert back.tape.plan is not None
    _same(back.values, default.values)


def test_a_registration_in_the_rule_tables_invalidates_plans():
    case = tm.build("gpt2")
    plan_mod.PLANS.clear(case.model)
    isr.run(case.fn, case.inputs, "gradient", model=case.model)
    assert isr.run(case.fn, case.inputs, "gradient", model=case.model).tape.plan is not None

    class _Unused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

    version = registry.table_version()
    try:
        isr.function_rule(_Unused)(lambda rec: [])
        assert registry.table_version() > version
        assert isr.run(case.fn, case.inputs, "gradient", model=case.model).tape.plan is None
    finally:
        registry.FUNCTION_RULES.pop(_Unused, None)


@pytest.mark.parametrize("semiring", ["gradient", "entropy", "maxpath"])
def test_weights_written_through_data_are_followed(semiring):
    case = tm.build("gpt2")
    model = copy.deepcopy(case.model)

    def fn(emb):
        return torch.log_softmax(model(inputs_embeds=emb, use_cache=False).logits[:, -1], -1)[0, tm.TARGET]

    before = isr.run(fn, case.inputs, semiring, model=model)
    isr.run(fn, case.inputs, semiring, model=model)
    gen = torch.Generator().manual_seed(11)
    for p in model.parameters():
        version = p._version
        p.data.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
        assert p._version == version  # the write does not show in the version counter
    after = isr.run(fn, case.inputs, semiring, model=model)
    assert after.tape.plan is not None, "the weights' change needs no new plan (plans hold no values)"
    fresh = isr.run(fn, case.inputs, semiring, model=model, plans=False)
    _same(after.values, fresh.values)
    assert not torch.equal(after.values[0], before.values[0])
    if semiring == "gradient":
        _close(after.values, _grad(fn, case.inputs))


class _Branchy(torch.nn.Module):
    """Value-dependent control flow: the graph for positive sums differs from the one for negative sums."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)  # lin(-x) = -lin(x)

    def forward(self, x):
        h = self.lin(x)
        if bool(h.sum() > 0):
            return (h * h).sum()
        return torch.tanh(h).exp().sum()


def test_a_different_graph_for_the_same_shapes_is_not_replayed():
    model = _Branchy()
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        pos = x if bool(model.lin(x).sum() > 0) else -x
    neg = -pos  # the same shape, the other branch
    plan_mod.PLANS.clear(model)
    isr.run(model, (pos,), "gradient", model=model)
    res = isr.run(model, (neg,), "gradient", model=model)
    assert res.tape.plan is None, "the plan of the other branch was taken"
    _close(res.values, _grad(model, (neg,)))
    again = isr.run(model, (pos,), "gradient", model=model)  # the plan now is the negative branch's
    assert again.tape.plan is None
    _close(again.values, _grad(model, (pos,)))


def test_the_cache_is_bounded_per_model():
    case = tm.build("gpt2")
    plan_mod.PLANS.clear(case.model)
    for n in range(1, plan_mod.PLANS_PER_MODEL + 3):
        isr.run(case.fn, (torch.randn(1, n, tm.HIDDEN, dtype=torch.float64),), "gradient", model=case.model)
    assert plan_mod.PLANS.size(case.model) == plan_mod.PLANS_PER_MODEL


def test_the_cache_is_bounded_in_bytes():
    model = torch.nn.Linear(2, 2)
    cache = plan_mod.PlanCache(per_model=8, bytes_per_model=100)

    def plan(nbytes):
        return plan_mod.Plan((), (), {}, nbytes)

    cache.put(model, "a", plan(60))
    cache.put(model, "b", plan(30))
    assert cache.size(model) == 2
    cache.put(model, "c", plan(30))  # 120 bytes: the least recently used ("a") goes
    assert cache.get(model, "a") is None and cache.get(model, "b") is not None and cache.size(model) == 2
    cache.put(model, "d", plan(101))  # larger than the bound: not kept, nothing else dropped
    assert cache.get(model, "d") is None and cache.size(model) == 2


@pytest.mark.parametrize("semiring", ["gradient", "entropy", "maxpath"])
def test_concurrent_calls_sharing_plans_give_the_sequential_results(semiring):
    cases = [tm.build("gpt2"), tm.build("llama")]
    jobs = []
    for case in cases:
        for seed in (1, 2):
            jobs.append((case, _new_inputs(case, seed)))
    want = [isr.run(c.fn, x, semiring, model=c.model, plans=False).values for c, x in jobs]
    for rounds in range(8):
        if rounds % 2 == 0:  # cold caches: threads race to build and publish plans
            for case in cases:
                plan_mod.PLANS.clear(case.model)
        barrier = threading.Barrier(len(jobs))
        got, errors = [None] * len(jobs), []

        def work(i, case=None, x=None):
            try:
                barrier.wait()
                got[i] = isr.run(case.fn, x, semiring, model=case.model).values
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        threads = [threading.Thread(target=work, args=(i, c, x)) for i, (c, x) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for g, w in zip(got, want):
            _same(g, w, f"round {rounds}")

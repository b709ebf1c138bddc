"""The traced sweep (inseq_semiring/traced_sweep.py, ``compile="all"``): on every tiny architecture a replayed sweep
gives the eager device-branch sweep's values bit for bit for new inputs; the gradient equals autograd; weight writes
through ``.data`` are followed; what a replay would get wrong (a host read of a tape value, a write into a tape
tensor or a constant) is refused with a reason; a tape that does not fit the trace is swept eagerly; concurrent calls
give the sequential results."""

from __future__ import annotations

import copy
import dataclasses
import threading
import warnings

import pytest
import torch

import inseq_semiring as isr
import tiny_models as tm
from inseq_semiring import traced_sweep
from inseq_semiring.errors import InvalidInputError
from inseq_semiring.rules.jacobians import device_branch

torch.set_num_threads(1)

MODES = {"gradient": ("gradient", {}), "flow": ("flow", {}), "entropy": ("entropy", {}), "maxpath": ("maxpath", {}),
         "maxpath tensor": ("maxpath", {"granularity": "tensor"}),
         "maxpath back-pointers": ("maxpath", {"backpointers": True}),
         "maxpath tensor back-pointers": ("maxpath", {"granularity": "tensor", "backpointers": True})}


def _case(name):
    """A tiny case on its own copy of the model (the cached models' plans and Dynamo entries, and their weights,
    stay as other test modules expect them)."""
    case = tm.build(name, dtype=torch.float32, pure=False)
    model = copy.deepcopy(case.model)
    rows = tm._per_row(name, model, case.kind, False)
    return dataclasses.replace(case, model=model, fn=lambda *xs: rows(*xs)[0])


def _run(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a forward Dynamo cannot replay is recorded, with a warning
        return isr.run(*args, **kwargs)


def _device_branch_reference(case, x, semiring, **options):
    """The sweep a trace logs, run eagerly on a fresh recording: the device branch, the kernels called directly."""
    with device_branch():
        return isr.run(case.fn, x, semiring, model=case.model, plans=False, **options)


def _options_key(semiring, options):
    return (semiring, options.get("sign", "abs"), options.get("granularity", "scalar"),
            options.get("backpointers", False))


def _key(semiring, options, tape):
    """The key of ``tape``'s plan's sweeps under which tapes like it (its forward) are traced."""
    return (*_options_key(semiring, options), tape.forward)


def _trail_tensors(result):
    """Every tensor of a back-pointer trail, in node order (values, scales, back-pointers)."""
    out = []
    for tid in sorted(result.trail):
        v = result.trail[tid]
        out += [v.hi, v.log_scale, *v.pointers("hi")]
    return out


def _assert_same_result(got, want, what):
    tm.assert_same_bits(got.values, want.values, what)
    assert sorted(got.trail) == sorted(want.trail), what
    tm.assert_same_bits(_trail_tensors(got), _trail_tensors(want), f"{what} (trail)")


@pytest.fixture
def replays(monkeypatch):
    """Counts the sweeps answered by a replayed program."""
    count = [0]
    real = traced_sweep.replay

    def counting(program, tape):
        out = real(program, tape)
        count[0] += out is not None
        return out

    monkeypatch.setattr(traced_sweep, "replay", counting)
    return count


@pytest.mark.parametrize("name", list(tm.ARCHS))
def test_replayed_sweep_equals_the_device_branch_bit_for_bit(name, replays):
    case = _case(name)
    _run(case.fn, case.inputs, "gradient", model=case.model, compile="all")  # builds the shape's plan
    x = tm.new_inputs(case, seed=5)  # other values, same shapes
    for mode, (semiring, options) in MODES.items():
        traced = _run(case.fn, case.inputs, semiring, model=case.model, compile="all", **options)  # traces
        plan = traced.tape.plan
        assert plan is not None, mode
        assert traced_sweep.refused(traced.tape, _options_key(semiring, options)) is None, (mode, plan.sweeps)
        assert isinstance(plan.sweeps[_key(semiring, options, traced.tape)], traced_sweep.Program), mode
        _assert_same_result(traced, _device_branch_reference(case, case.inputs, semiring, **options),
                            f"{name}/{mode} (tracing call)")
        before = replays[0]
        replay = _run(case.fn, x, semiring, model=case.model, compile="all", **options)
        assert replays[0] == before + 1, f"{name}/{mode}: the sweep was not replayed"
        reference = _device_branch_reference(case, x, semiring, **options)
        _assert_same_result(replay, reference, f"{name}/{mode}")
        assert bool(replay.trail) == options.get("backpointers", False), mode
        default = isr.run(case.fn, x, semiring, model=case.model, plans=False, **options)
        for a, b in zip(replay.values, default.values):  # the device branch only rounds differently
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    xs = tuple(t.clone().requires_grad_(True) for t in x)
    grads = torch.autograd.grad(case.fn(*xs), xs)
    replay = _run(case.fn, x, "gradient", model=case.model, compile="all")
    for g, v in zip(grads, replay.values):
        torch.testing.assert_close(v, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


@pytest.mark.parametrize("name", list(tm.ARCHS))
def test_a_replayed_forward_brings_its_tensors_as_the_records_hold_them(name):
    """The replayed forward's program knows from its source which tensor fills each slot of the records (and the
    root): the same objects, in the same order and aliasing pattern, that a search of the records finds."""
    case = _case(name)
    for _ in range(2):  # the first call captures the forward (its tape recorded), the second replays it
        result = _run(case.fn, case.inputs, "gradient", model=case.model, compile="all")
    tape = result.tape
    if tape.forward != "compiled":
        pytest.skip(f"{name}: the forward is recorded, not replayed")
    given = tape.tensors
    assert given is not None and tape.forward_program is not None
    found = traced_sweep.tape_tensors(dataclasses.replace(tape, tensors=None))
    assert given[1] == found[1]
    assert len(given[0]) == len(found[0]) and all(a is b for a, b in zip(given[0], found[0]))


def test_a_plan_made_without_compile_is_replayed_once_the_forward_is_compiled(replays):
    """A default call plans the shape; the next compile='all' call captures the forward (its tape recorded, not
    traced: later tapes are replayed forwards, which hold other tensors); the one after traces, then replays."""
    case = _case("gpt2")
    isr.run(case.fn, case.inputs, "gradient", model=case.model)  # plans the shape, no compile
    capture = _run(case.fn, case.inputs, "gradient", model=case.model, compile="all")
    assert capture.tape.forward == "recorded" and capture.tape.plan is not None
    assert _key("gradient", {}, capture.tape) not in capture.tape.plan.sweeps  # nothing traced on it
    traced = _run(case.fn, case.inputs, "gradient", model=case.model, compile="all")
    assert traced.tape.forward == "compiled" and traced.tape.plan is capture.tape.plan
    assert isinstance(traced.tape.plan.sweeps[_key("gradient", {}, traced.tape)], traced_sweep.Program)
    x = tm.new_inputs(case, seed=6)
    before = replays[0]
    again = _run(case.fn, x, "gradient", model=case.model, compile="all")
    assert replays[0] == before + 1, "the sweep was not replayed"
    tm.assert_same_bits(again.values, _device_branch_reference(case, x, "gradient").values)


def test_a_traced_sweep_keeps_the_compiled_kernels():
    from inseq_semiring.kernels import maxtimes, rowcore, xlogx

    if any(ext.load() is None for ext in (maxtimes.EXTENSION, rowcore.EXTENSION, xlogx.EXTENSION)):
        pytest.skip("the compiled kernels are not available here")
    case = _case("gpt2")
    want = {"entropy": {"inseq_semiring::abs_neg_xlogx", "inseq_semiring::core_pull_sum"},
            "maxpath": {"inseq_semiring::max_times", "inseq_semiring::core_pull_max"}}
    for semiring, kernels in want.items():
        for _ in range(2):  # plan, then trace
            got = _run(case.fn, case.inputs, semiring, model=case.model, compile="all")
        graph = str(got.tape.plan.sweeps[_key(semiring, {}, got.tape)].script.graph)
        assert all(k in graph for k in kernels), (semiring, kernels)


def test_weight_writes_through_data_are_followed(replays):
    case = _case("llama")
    for _ in range(2):  # plan, then trace
        _run(case.fn, case.inputs, "entropy", model=case.model, compile="all")
    before = _run(case.fn, case.inputs, "entropy", model=case.model, compile="all").values
    weight = case.model.model.layers[0].mlp.down_proj.weight
    weight.data.mul_(1.5)  # .data: no version bump
    count = replays[0]
    after = _run(case.fn, case.inputs, "entropy", model=case.model, compile="all")
    assert replays[0] == count + 1
    tm.assert_same_bits(after.values, _device_branch_reference(case, case.inputs, "entropy").values)
    assert not torch.equal(after.values[0], before[0])


def _tape_and_sweep(case, semiring="gradient"):
    from inseq_semiring.api import make_semiring
    from inseq_semiring.graph.recorder import record
    from inseq_semiring.traversal import sweep

    tape = record(case.fn, case.inputs, model=case.model)
    ring = make_semiring(semiring)

    def sweep_fn(t):
        with torch.no_grad():
            env = sweep(t, ring, ring.seed(t.root))
        return tuple(env.get(tid) for tid in t.input_ids)

    return tape, sweep_fn


def test_what_a_replay_would_get_wrong_is_refused():
    case = _case("gpt2")
    tape, sweep_fn = _tape_and_sweep(case)
    raw, program = traced_sweep.trace(tape, sweep_fn)
    assert isinstance(program, traced_sweep.Program)
    outside = torch.zeros(3)

    def reads(t):
        scale = float(t.root.abs())  # a host read of a value that depends on the tape
        return tuple(None if r is None else r * scale for r in sweep_fn(t))

    def writes_tape(t):
        t.records[0].outputs[0].mul_(1.0)
        return sweep_fn(t)

    def writes_constant(t):
        outside.add_(1.0)
        return sweep_fn(t)

    for fn, why in ((reads, "reads a value on the host"), (writes_tape, "writes into a tape tensor or a constant"),
                    (writes_constant, "writes into a tape tensor or a constant")):
        got, refusal = traced_sweep.trace(tape, fn)
        assert isinstance(refusal, traced_sweep.Refused) and why in refusal.reason, (fn.__name__, refusal)
        assert got[0] is not None  # the call still gets the eager sweep's values
    # a host read of a constant (no tape value in it) is fine: e.g. IndexMap.map_weights reads float(f(tensor(w)))
    _, ok = traced_sweep.trace(tape, lambda t: (sweep_fn(t)[0] * float(torch.tensor(2.0).abs()),))
    assert isinstance(ok, traced_sweep.Program)


def test_fixed_results_are_folded_but_never_shared_or_stale():
    case = _case("gpt2")
    tape, sweep_fn = _tape_and_sweep(case)

    def sweep_with_fixed(t):
        grad = sweep_fn(t)[0]
        n = grad.numel()
        ramp = torch.arange(n, dtype=grad.dtype).reshape(grad.shape)  # fixed: folded into a constant
        acc = torch.zeros(n, dtype=grad.dtype)  # fixed, then written with tape values: computed on every replay
        acc.index_add_(0, torch.arange(n), grad.reshape(-1))
        return grad * ramp, acc.reshape(grad.shape), torch.ones(3)  # the last output is fixed: copied out

    raw, program = traced_sweep.trace(tape, sweep_with_fixed)
    assert isinstance(program, traced_sweep.Program)
    code = program.script.code
    assert "arange" not in code and "zeros" in code and "index_add_" in code, code  # both ramps became constants
    case = dataclasses.replace(case, inputs=tm.new_inputs(case, seed=2))
    other, _ = _tape_and_sweep(case)
    first = traced_sweep.replay(program, other)
    want = traced_sweep._eager(other, sweep_with_fixed)
    assert not torch.equal(want[1], raw[1])  # new values
    tm.assert_same_bits(first, want)
    first[2].add_(5.0)  # the caller's copy: the program's constant is untouched
    second = traced_sweep.replay(program, other)
    tm.assert_same_bits(second, want)


def test_a_tape_that_does_not_fit_the_trace_is_not_replayed():
    case = _case("gpt2")
    tape, sweep_fn = _tape_and_sweep(case)
    _, program = traced_sweep.trace(tape, sweep_fn)
    other, _ = _tape_and_sweep(case)
    assert traced_sweep.replay(program, other) is not None
    made = {id(t) for r in other.records for t in r.outputs}
    rec = next(r for r in other.records if any(id(t) in made for t in r.leaves))
    leaf = next(i for i, t in enumerate(rec.leaves) if id(t) in made)  # also an earlier record's output
    leaves = list(rec.leaves)
    leaves[leaf] = leaves[leaf].clone()  # another aliasing pattern
    rec.__dict__["leaves"] = tuple(leaves)
    assert traced_sweep.replay(program, other) is None
    leaves[leaf] = leaves[leaf].double()  # another dtype, same pattern as traced
    rec.__dict__["leaves"] = tuple(leaves)
    assert traced_sweep.replay(program, other) is None


def test_untraced_modes_run_as_compile_true():
    case = _case("llama")
    x = tm.new_inputs(case, seed=3)
    for options in ({"sign": "positive"}, {"sign": "negative", "backpointers": True}):
        assert not traced_sweep.traces("maxpath", options.get("sign", "abs"))
        for _ in range(2):
            got = _run(case.fn, x, "maxpath", model=case.model, compile="all", **options)
        want = _run(case.fn, x, "maxpath", model=case.model, compile=True, **options)
        tm.assert_same_bits(got.values, want.values, str(options))
    assert _key("maxpath", {"sign": "positive"}, got.tape) not in got.tape.plan.sweeps


def test_compile_takes_only_known_values():
    case = _case("gpt2")
    with pytest.raises(InvalidInputError, match="compile='sweep' is not one of"):
        isr.run(case.fn, case.inputs, "gradient", model=case.model, compile="sweep")


def test_concurrent_calls_give_the_sequential_results():
    case = _case("gpt2")
    inputs = [tm.new_inputs(case, seed=s) for s in range(4)]
    for _ in range(2):
        _run(case.fn, case.inputs, "entropy", model=case.model, compile="all")
    sequential = [_run(case.fn, x, "entropy", model=case.model, compile="all").values for x in inputs]
    got: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(3):
                got[i] = _run(case.fn, inputs[i], "entropy", model=case.model, compile="all").values
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, want in enumerate(sequential):
        tm.assert_same_bits(got[i], want, f"thread {i}")


def test_a_refused_sweep_warns_once_and_keeps_the_eager_values(monkeypatch):
    from inseq_semiring.semirings.gradient import Gradient

    case = _case("gpt2")
    real = Gradient.pull

    def reading_pull(self, kind, value, where):
        if isinstance(value, torch.Tensor) and value.numel():
            float(value.reshape(-1)[0])  # a host read of a value that depends on the tape
        return real(self, kind, value, where)

    monkeypatch.setattr(Gradient, "pull", reading_pull)
    _run(case.fn, case.inputs, "gradient", model=case.model, compile="all")  # plans
    with pytest.warns(UserWarning, match="sweep of this shape is not traced .*reads a value on the host"):
        first = isr.run(case.fn, case.inputs, "gradient", model=case.model, compile="all")
    assert "reads a value on the host" in traced_sweep.refused(first.tape, _options_key("gradient", {}))
    x = tm.new_inputs(case, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # once per plan and semiring
        again = isr.run(case.fn, x, "gradient", model=case.model, compile="all")
    tm.assert_same_bits(again.values, _device_branch_reference(case, x, "gradient").values)


def test_a_tape_with_a_tensor_above_the_limit_runs_as_compile_true(monkeypatch):
    case = _case("gpt2")
    monkeypatch.setattr(traced_sweep, "MAX_TRACED_ELEMENTS", 10)
    x = tm.new_inputs(case, seed=4)
    for _ in range(3):
        got = _run(case.fn, x, "entropy", model=case.model, compile="all")
    assert got.tape.plan.sweeps.get("fits") is False
    assert _key("entropy", {}, got.tape) not in got.tape.plan.sweeps
    tm.assert_same_bits(got.values, _run(case.fn, x, "entropy", model=case.model, compile=True).values)

"""The compiled forward (inseq_semiring/graph/compiled.py): a replayed forward gives the recorded path's results bit
for bit on the tiny architectures; it follows new input values, weight writes through ``.data`` and changed Python
constants (Dynamo's guards); what it cannot replay faithfully is refused with a reason and recorded instead; errors
are those of the recorded path; concurrent calls give the sequential results."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import inseq_semiring as isr
import tiny_models as tm
from inseq_semiring.errors import InvalidInputError, UnsupportedOpError
from inseq_semiring.graph import compiled

torch.set_num_threads(1)

MODES = {"gradient": ("gradient", {}), "entropy": ("entropy", {}), "maxpath": ("maxpath", {}),
         "negative": ("maxpath", {"sign": "negative"})}


def _quiet_run(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return isr.run(*args, **kwargs)


@pytest.mark.parametrize("name", list(tm.ARCHS))
def test_replay_equals_the_recorded_path_bit_for_bit(name):
    case = tm.build(name, dtype=torch.float32, pure=False)
    first = _quiet_run(case.fn, case.inputs, "gradient", model=case.model, compile=True)
    assert first.tape.forward == "recorded"  # the first call captures and checks; its tape is the recorded one
    why = compiled.refused(case.model, case.fn)
    if name == "bart":  # Dynamo's graph of BART's encoder starts with another operator than the eager model's
        assert why is not None and "differs from the model's at record 0" in why
    else:
        assert why is None, why
    x = tm.new_inputs(case, seed=5)  # other values, same shapes
    for mode, (semiring, options) in MODES.items():
        replay = _quiet_run(case.fn, x, semiring, model=case.model, compile=True, **options)
        fresh = isr.run(case.fn, x, semiring, model=case.model, plans=False, **options)
        assert replay.tape.forward == ("recorded" if why else "compiled"), mode
        tm.assert_same_bits(replay.values, fresh.values, f"{name}/{mode}")
    if why is None:
        xs = tuple(t.clone().requires_grad_(True) for t in x)
        grads = torch.autograd.grad(case.fn(*xs), xs)
        replay = isr.run(case.fn, x, "gradient", model=case.model, compile=True)
        for g, v in zip(grads, replay.values):
            torch.testing.assert_close(v, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def test_replay_with_back_pointers_gives_the_recorded_paths():
    from inseq_semiring.paths import top_paths

    case = tm.build("llama", dtype=torch.float32, pure=False)
    isr.run(case.fn, case.inputs, "maxpath", model=case.model, compile=True, backpointers=True)
    x = tm.new_inputs(case, seed=2)
    replay = isr.run(case.fn, x, "maxpath", model=case.model, compile=True, backpointers=True)
    fresh = isr.run(case.fn, x, "maxpath", model=case.model, plans=False, backpointers=True)
    assert replay.tape.forward == "compiled"
    tm.assert_same_bits(replay.values, fresh.values)
    described = [[(p.value, [(h.op, h.module_path, h.index) for h in p.hops]) for p in top_paths(r, k=3)]
                 for r in (replay, fresh)]
    assert described[0] == described[1]  # module paths of the replayed records are the model's


def test_a_changed_python_constant_is_not_replayed_from_the_old_graph():
    case = tm.build("gpt2", dtype=torch.float32, pure=False)
    model = case.model

    def root_for(target):
        def root(e):
            return torch.log_softmax(model(inputs_embeds=e, use_cache=False).logits[0, -1], -1)[target]
        return root

    for target in (3, 11, 3):
        for _ in range(2):
            got = isr.run(root_for(target), case.inputs, "entropy", model=model, compile=True)
        fresh = isr.run(root_for(target), case.inputs, "entropy", model=model, plans=False)
        assert got.tape.forward == "compiled"
        tm.assert_same_bits(got.values, fresh.values, f"target {target}")
    other = isr.run(root_for(11), case.inputs, "entropy", model=model, plans=False)
    assert not torch.equal(other.values[0], fresh.values[0])  # the targets do give different answers


def test_weights_written_through_data_are_followed():
    case = tm.build("llama", dtype=torch.float32, pure=False)
    model = tm.tiny_model("llama", torch.float32)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for _ in range(2):
            isr.run(case.fn, case.inputs, "maxpath", model=model, compile=True)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.data.mul_(-1.5)
        got = isr.run(case.fn, case.inputs, "maxpath", model=model, compile=True)
        fresh = isr.run(case.fn, case.inputs, "maxpath", model=model, plans=False)
        assert got.tape.forward == "compiled"
        tm.assert_same_bits(got.values, fresh.values)
    finally:
        model.load_state_dict(saved)


class _Branchy(torch.nn.Module):
    """A forward whose graph depends on a value: Dynamo cannot capture it in one graph."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:
            return h.tanh().sum()
        return h.sigmoid().sum()


class _InPlace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h.mul_(2.0)  # an in-place write into a node: recorded with a snapshot, not replayed
        return h.tanh().sum()


@pytest.mark.parametrize("cls, reason", [(_Branchy, "could not capture it in one graph"),
                                         (_InPlace, "in-place write into a traced tensor")])
def test_what_cannot_be_replayed_is_refused_and_recorded(cls, reason):
    torch.manual_seed(0)
    model = cls().eval()
    fn = lambda x: model(x)  # noqa: E731
    for sign in (1.0, -1.0):  # both branches of _Branchy
        x = sign * torch.randn(2, 4).abs()
        with pytest.warns(UserWarning, match="compile=True") if sign == 1.0 else warnings.catch_warnings():
            got = isr.run(fn, x, "gradient", model=model, compile=True)
        assert got.tape.forward == "recorded"
        xs = x.clone().requires_grad_(True)
        torch.testing.assert_close(got.values[0], torch.autograd.grad(fn(xs), xs)[0])
    assert reason in compiled.refused(model, fn)


def test_a_custom_function_raises_as_on_the_recorded_path():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * g

    model = torch.nn.Linear(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedOpError, match="custom torch.autograd.Function"):
            isr.run(lambda x: Cube.apply(model(x)).sum(), torch.randn(2, 3), "gradient", model=model, compile=True)


def test_compile_needs_the_model():
    with pytest.raises(InvalidInputError, match="compile=True needs the model"):
        isr.run(lambda x: (x * 2).sum(), torch.randn(3), "gradient", compile=True)


def test_concurrent_compiled_calls_give_the_sequential_results():
    case = tm.build("qwen2", dtype=torch.float32, pure=False)
    xs = [tm.new_inputs(case, seed=s) for s in range(4)]
    for _ in range(2):
        isr.run(case.fn, case.inputs, "entropy", model=case.model, compile=True)
    expected = [isr.run(case.fn, x, "entropy", model=case.model, plans=False).values for x in xs]
    got: dict = {}
    errors: list = []

    def work(i):
        try:
            for _ in range(3):
                res = isr.run(case.fn, xs[i], "entropy", model=case.model, compile=True)
                assert res.tape.forward == "compiled"
                got.setdefault(i, []).append(res.values)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        for values in got[i]:
            tm.assert_same_bits(values, expected[i], f"thread {i}")


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_sdpa_attention_takes_other_branches_under_dynamo_and_is_refused(kv_heads):
    """Under TorchDynamo, Hugging Face's SDPA attention takes other branches than in eager mode (``repeat_kv`` in
    Python instead of SDPA's ``enable_gqa``; an additive float mask instead of a boolean one, which the recorder's
    SDPA decomposition turns into ``where``): another graph, with other edges. The check must refuse it and the
    results must be the recorded ones."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=kv_heads, max_position_embeddings=32)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    emb = torch.randn(1, 5, 8)

    def root(e):
        return torch.log_softmax(model(inputs_embeds=e, use_cache=False).logits[0, -1], -1)[3]

    _quiet_run(root, emb, "entropy", model=model, compile=True)
    replay = _quiet_run(root, emb, "entropy", model=model, compile=True)
    recorded = isr.run(root, emb, "entropy", model=model, plans=False)
    tm.assert_same_bits(replay.values, recorded.values)
    assert any(rec.decomposed_from is not None for rec in recorded.tape.records)  # SDPA was split
    assert replay.tape.forward == "recorded"
    expected = "aten.reshape.default" if kv_heads == 1 else "aten.where.self"
    assert f"where the model ran {expected}" in compiled.refused(model, root)

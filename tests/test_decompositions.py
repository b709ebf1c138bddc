"""Operator decompositions applied at record time (``decomposition="aten" | "paper" | "primitive"``).

* the mechanism: unknown names, user tables, records marked with the operator they came from, constants untouched;
* the gradient is the same under every decomposition, on all ten tiny architectures (a property: sums over paths
  do not depend on how an operator is cut into smaller ones);
* ``"paper"`` equals the ATen graph of the same model with softmax, layer norm and cross-entropy *hand-written* from
  the operators of Du et al.'s library, for every semiring (float64), and the independent dense reference;
* ``"paper"`` equals the paper's own library (brunoflow) on the fixtures in ``tests/fixtures/brunoflow``: M+, M-,
  gradient, Z, U, H per element at every attention input of four small BERTs, the winning consumer of every
  element and the "oplus" readout; and the FFOOM MLP's per-element values and per-feature entropies;
* under ``"aten"`` the same fixtures differ (the tensor-granularity max and the entropy legitimately depend on the
  graph), so the comparison can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

import inseq_semiring as isr
import tiny_models as tm
from inseq_semiring.components import BERT_SPLIT, component_readout, fanout_node
from inseq_semiring.decompositions import DECOMPOSITIONS, PAPER, Decomposition, resolve
from inseq_semiring.errors import InvalidInputError
from inseq_semiring.graph.recorder import record
from inseq_semiring.semirings.scaled import entropy_of
from reference import dense
from shared import ALL_MODES, assert_close_scaled

aten = torch.ops.aten
FIXTURES = Path(__file__).parent / "fixtures" / "brunoflow"
BERT_FIXTURES = ["bert_toy_s0_T10", "bert_toy_s1_T16", "bert_toy_s2_T10_init03", "bert_2layer_s3_T16"]


# -- the mechanism ------------------------------------------------------------------------------------------------

def _softmax_net():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()
    return lambda x: (torch.softmax(lin(x), -1) * torch.arange(1.0, 5.0, dtype=torch.float64)).sum()


def test_unknown_decomposition_is_a_clear_error():
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="unknown decomposition 'brunoflow'.*paper"):
        isr.semiring_backward(_softmax_net(), x, "gradient", decomposition="brunoflow")


def test_decomposed_records_name_their_composite_and_keep_the_module():
    x = torch.randn(2, 3, dtype=torch.float64)
    tape = record(_softmax_net(), (x,), decomposition="paper")
    ops = [str(r.op) for r in tape.records]
    assert "aten._softmax.default" not in ops
    inner = [r for r in tape.records if r.decomposed_from is aten._softmax.default]
    assert {str(r.op) for r in inner} >= {"aten.max.dim", "aten.exp.default", "aten.log.default", "aten.sub.Tensor"}
    assert tape.decomposition == "paper"
    assert record(_softmax_net(), (x,)).decomposition == "aten"


def test_operators_on_constants_are_not_decomposed():
    x = torch.randn(2, 3, dtype=torch.float64)
    const = torch.randn(2, 3, dtype=torch.float64)

    def fn(v):
        return (v * torch.softmax(const, -1)).sum()

    tape = record(fn, (x,), decomposition="paper")
    assert [str(r.op) for r in tape.records] == ["aten.mul.Tensor", "aten.sum.default"]


def test_a_user_decomposition_extends_a_table():
    def softmax_as_ratio(x, dim, half_to_float):
        e = aten.exp.default(x)
        return aten.div.Tensor(e, aten.sum.dim_IntList(e, [dim], True))

    mine = PAPER.extend("mine", {aten._softmax.default: softmax_as_ratio})
    assert isinstance(mine, Decomposition) and "mine" not in DECOMPOSITIONS and resolve(mine) is mine
    x = torch.randn(2, 3, dtype=torch.float64)
    fn = _softmax_net()
    tape = record(fn, (x,), decomposition=mine)
    assert "aten.max.dim" not in {str(r.op) for r in tape.records}
    xg = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(fn(xg), xg)[0]
    torch.testing.assert_close(isr.semiring_backward(fn, x, "gradient", decomposition=mine)[0], expected)
    with pytest.raises(InvalidInputError, match="ATen overloads"):
        PAPER.extend("bad", {"softmax": softmax_as_ratio})


def test_a_tape_recorded_under_another_decomposition_is_refused():
    x = torch.randn(2, 3, dtype=torch.float64)
    tape = record(_softmax_net(), (x,), decomposition="paper")
    with pytest.raises(InvalidInputError, match="recorded with decomposition 'paper'"):
        isr.run(_softmax_net(), x, "flow", tape=tape, decomposition="aten")
    isr.run(_softmax_net(), x, "flow", tape=tape)  # no decomposition given: the tape's own


# -- the gradient does not depend on the decomposition --------------------------------------------------------------

@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("decomposition", ["paper", "primitive"])
@pytest.mark.parametrize("arch", list(tm.ARCHS))
def test_gradient_is_the_same_under_every_decomposition(arch, decomposition):
    case = tm.build(arch)
    base = isr.semiring_backward(case.fn, case.inputs, "gradient")
    other = isr.semiring_backward(case.fn, case.inputs, "gradient", decomposition=decomposition)
    tape = record(case.fn, case.inputs, decomposition=decomposition)
    assert any(r.decomposed_from is not None for r in tape.records), "nothing was decomposed"
    assert_close_scaled(other, base, 1e-10, f"{arch}/{decomposition}")


# -- "paper" == the same model with the paper's operators written by hand ------------------------------------------

def _hand_softmax(x, dim=-1, dtype=None, **_):
    x = x if dtype is None else x.to(dtype)
    m = torch.max(x, dim, keepdim=True).values
    lse = torch.log(torch.sum(torch.exp(x - m), dim, keepdim=True)) + m
    return torch.exp(x - lse)


def _hand_log_softmax(x, dim=-1, dtype=None, **_):
    x = x if dtype is None else x.to(dtype)
    m = torch.max(x, dim, keepdim=True).values
    return x - (torch.log(torch.sum(torch.exp(x - m), dim, keepdim=True)) + m)


def _hand_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    n = x.shape[-1]
    mu = torch.sum(x, -1, keepdim=True) / n
    var = torch.sum(x ** 2, -1, keepdim=True) / n - mu ** 2
    y = (x - mu) / torch.sqrt(var + eps)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def _hand_cross_entropy(logits, target, **_):
    picked = -_hand_log_softmax(logits, -1)[torch.arange(logits.shape[0]), target]
    return torch.sum(picked) / logits.shape[0]


class HandWritten(TorchFunctionMode):
    """Softmax, log-softmax, layer norm and cross-entropy written out from the paper's operators."""

    HAND = {F.softmax: _hand_softmax, torch.softmax: _hand_softmax, torch.Tensor.softmax: _hand_softmax,
            F.log_softmax: _hand_log_softmax, torch.log_softmax: _hand_log_softmax, F.layer_norm: _hand_layer_norm,
            F.cross_entropy: _hand_cross_entropy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.HAND.get(func, func)(*args, **(kwargs or {}))


def _hand_written(fn):
    def run(*xs):
        with HandWritten():
            return fn(*xs)

    return run


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_paper_equals_the_hand_written_model_in_every_semiring(arch):
    case = tm.build(arch)
    hand = _hand_written(case.fn)
    assert "aten._softmax.default" not in {str(r.op) for r in record(hand, case.inputs).records}
    for mode, (semiring, options) in ALL_MODES.items():
        expected = isr.semiring_backward(hand, case.inputs, semiring, **options)
        actual = isr.semiring_backward(case.fn, case.inputs, semiring, decomposition="paper", **options)
        assert_close_scaled(actual, expected, 1e-10, f"{arch}/{mode}")


@pytest.mark.usefixtures("float64_default")
def test_paper_cross_entropy_root_equals_the_hand_written_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LeakyReLU(0.01), torch.nn.Linear(5, 4))
    x = torch.randn(6, 3)
    y = torch.tensor([0, 3, 1, 1, 2, 0])
    fn = lambda v: F.cross_entropy(net(v), y)  # noqa: E731
    hand = _hand_written(fn)
    for mode, (semiring, options) in ALL_MODES.items():
        expected = isr.semiring_backward(hand, x, semiring, **options)
        actual = isr.semiring_backward(fn, x, semiring, decomposition="paper", **options)
        assert_close_scaled(actual, expected, 1e-12, mode)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("options", [dict(reduction="sum"), dict(reduction="none"), dict(ignore_index=2),
                                     dict(weight=torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=torch.float64))],
                         ids=["sum", "none", "ignore-index", "class-weights"])
def test_paper_nll_variants_match_the_dense_reference(options):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 4))
    x = torch.randn(3, 2)
    y = torch.tensor([1, 2, 1])
    scale = torch.tensor([1.0, -2.0, 0.5])
    if options.get("reduction") == "none":
        fn = lambda v: (F.cross_entropy(net(v), y, **options) * scale).sum()  # noqa: E731
    else:
        fn = lambda v: F.cross_entropy(net(v), y, **options)  # noqa: E731
    ref = dense.all_semirings(dense.dense_graph(fn, (x,), decomposition="paper"))
    for mode, (semiring, opts) in ALL_MODES.items():
        actual = isr.semiring_backward(fn, x, semiring, decomposition="paper", **opts)
        assert_close_scaled(actual, ref[mode], 1e-12, f"{options}/{mode}")
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(isr.semiring_backward(fn, x, "gradient", decomposition="paper")[0],
                               torch.autograd.grad(fn(xg), xg)[0])


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("decomposition", ["paper", "primitive"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_decomposed_graphs_match_the_dense_reference(arch, decomposition):
    case = tm.build(arch)
    ref = dense.all_semirings(dense.dense_graph(case.fn, case.inputs, decomposition=decomposition))
    for mode, (semiring, options) in ALL_MODES.items():
        actual = isr.semiring_backward(case.fn, case.inputs, semiring, decomposition=decomposition, **options)
        assert_close_scaled(actual, ref[mode], 1e-9, f"{arch}/{decomposition}/{mode}")


# -- the paper's own library (brunoflow fixtures) -------------------------------------------------------------------

def _bert_fixture(name: str):
    data = json.loads((FIXTURES / name / "brunoflow.json").read_text())
    model = tf.BertForSequenceClassification.from_pretrained(FIXTURES / name, attn_implementation="eager")
    model = model.double().eval()
    emb = model.get_input_embeddings()(torch.tensor([data["input_ids"]])).detach()
    label = data["label"]
    return data, model, emb, (lambda e: model(inputs_embeds=e).logits[0, label])


def _at_attention_inputs(data, model, emb, fn, decomposition):
    """Our values at every layer's attention input: {layer: {quantity: [T, H] float64}} and the winners."""
    out = {}
    runs = {}
    for key, semiring, opts in [("grad", "gradient", {}), ("flow", "flow", {}), ("entropy", "entropy", {}),
                                ("Mplus", "maxpath", dict(sign="positive", granularity="tensor")),
                                ("Mminus", "maxpath", dict(sign="negative", granularity="tensor"))]:
        runs[key] = isr.run(fn, emb, semiring, backpointers=True, model=model, decomposition=decomposition,
                            **opts)
    for layer in data["layers"]:
        k = layer["layer"]
        vals = {}
        for key, res in runs.items():
            v = res.trail[fanout_node(res.tape, BERT_SPLIT, k)]
            if key == "grad":
                vals["grad"] = v[0]
            elif key == "flow":
                vals["Z"] = (v.z.double() * torch.exp(v.log_scale))[0]
            elif key == "entropy":
                vals["U"] = (v.u.double() * torch.exp(v.log_scale))[0]
                vals["H"] = entropy_of(v.z, v.u, v.log_scale)[0]
            else:
                ro = component_readout(res, BERT_SPLIT, k, agg="bucket_sum")
                v = res.semiring._settle(v)
                m = v.hi if key == "Mplus" else v.lo
                vals[key] = (m.double() * torch.exp(v.log_scale))[0]
                names = [ro.labels[i] if i >= 0 else None for i in ro.hidden_winners.reshape(-1).tolist()]
                vals[key + "_branch"] = [names[t * m.shape[-1]:(t + 1) * m.shape[-1]] for t in range(m.shape[-2])]
                if key == "Mplus":
                    oplus = component_readout(res, BERT_SPLIT, k, agg="oplus")
                    vals["oplus"] = (oplus.winner_labels(), oplus.unit.tolist(), oplus.value.tolist())
        out[k] = vals
    return out


def _max_rel(actual: torch.Tensor, expected) -> float:
    e = torch.tensor(expected, dtype=torch.float64)
    return float(((actual - e).abs() / e.abs().clamp_min(1e-30)).max())


@pytest.mark.parametrize("name", BERT_FIXTURES)
def test_paper_decomposition_reproduces_brunoflow_on_bert(name):
    data, model, emb, fn = _bert_fixture(name)
    ours = _at_attention_inputs(data, model, emb, fn, "paper")
    for layer in data["layers"]:
        got = ours[layer["layer"]]
        for q in ("grad", "Z", "U", "H", "Mplus", "Mminus"):
            assert _max_rel(got[q], layer[q]) < 1e-5, f"{name} layer {layer['layer']} {q}"
        for q in ("Mplus_branch", "Mminus_branch"):
            assert got[q] == layer[q], f"{name} layer {layer['layer']} {q}"
        winners, units, values = got["oplus"]
        assert winners == layer["oplus"]["branch"]
        assert units == layer["oplus"]["h_star"]
        torch.testing.assert_close(torch.tensor(values), torch.tensor(layer["oplus"]["value"]), rtol=1e-5, atol=0)


def test_aten_decomposition_differs_from_brunoflow_on_bert():
    """The check above can fail: on the ATen graph (one ``_softmax``, one ``native_layer_norm``) the
    tensor-granularity max and the entropy differ from the paper's library, while the gradient agrees."""
    data, model, emb, fn = _bert_fixture("bert_toy_s0_T10")
    got = _at_attention_inputs(data, model, emb, fn, "aten")[0]
    layer = data["layers"][0]
    assert _max_rel(got["grad"], layer["grad"]) < 1e-10
    assert _max_rel(got["Mplus"], layer["Mplus"]) > 0.1
    assert _max_rel(got["Z"], layer["Z"]) > 0.1


def _ffoom_fixture(hidden: int):
    data = json.loads((FIXTURES / "ffoom_brunoflow.json").read_text())
    batch = load_file(FIXTURES / "ffoom_batch.safetensors")
    net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.LeakyReLU(0.01), torch.nn.Linear(hidden, 2))
    net.load_state_dict(load_file(FIXTURES / f"ffoom_mlp_H{hidden}.safetensors"))
    net = net.double()
    x, y = batch["x"].double(), batch["y"]
    return data["models"][f"H{hidden}"], x, (lambda v: F.cross_entropy(net(v), y))


@pytest.mark.parametrize("hidden", [4, 16])
def test_paper_decomposition_reproduces_brunoflow_on_the_ffoom_mlp(hidden):
    ref, x, fn = _ffoom_fixture(hidden)
    with torch.no_grad():
        assert float(fn(x)) == pytest.approx(ref["loss"], rel=1e-6)
    grad, = isr.semiring_backward(fn, x, "gradient", decomposition="paper")
    flow = isr.run(fn, x, "flow", decomposition="paper").raw[0]
    ent = isr.run(fn, x, "entropy", decomposition="paper").raw[0]
    mplus, = isr.semiring_backward(fn, x, "maxpath", sign="positive", granularity="tensor", decomposition="paper")
    mminus, = isr.semiring_backward(fn, x, "maxpath", sign="negative", granularity="tensor", decomposition="paper")
    assert _max_rel(grad, ref["grad"]) < 1e-5
    assert _max_rel(flow.z.double() * torch.exp(flow.log_scale), ref["Z"]) < 1e-5
    assert _max_rel(mplus, ref["Mplus"]) < 1e-5
    assert _max_rel(mminus, ref["Mminus"]) < 1e-5
    # brunoflow computes the 1/n edge of its mean in float32 even in float64 (its README): U, H carry ~6e-9
    h = entropy_of(ent.z, ent.u, ent.log_scale)
    torch.testing.assert_close(h, torch.tensor(ref["H"], dtype=torch.float64), rtol=0, atol=1e-7)
    torch.testing.assert_close(h.mean(0), torch.tensor(ref["entropy_per_input_feature"], dtype=torch.float64),
                               rtol=0, atol=1e-7)
    aten_h = isr.semiring_backward(fn, x, "entropy")[0]
    assert float((aten_h - h).abs().max()) > 0.5  # the ATen cross-entropy has fewer paths

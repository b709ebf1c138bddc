"""Attention tracing (LAT) and rollout read from the tape: hand-chained products on a 2-layer toy, HF's own
attention probabilities (GQA), and the rollout formula."""

import pytest
import torch

import inseq_semiring.lrp as lrp
from inseq_semiring import InvalidInputError
import tiny_models as tm

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("float64_default")

H, T, D = 3, 5, 6  # head size 2


def _toy():
    """Two self-attention layers with H heads; returns fn and a list that receives [A_1, A_2] ([B, H, T, T])."""
    gen = torch.Generator().manual_seed(3)
    ws = [[torch.randn(D, D, generator=gen) for _ in range(3)] for _ in range(2)]
    seen = []

    def fn(x):
        seen.clear()
        h = x
        for wq, wk, wv in ws:
            b = h.shape[0]
            q = (h @ wq).view(b, T, H, 2).transpose(1, 2)
            k = (h @ wk).view(b, T, H, 2).transpose(1, 2)
            v = (h @ wv).view(b, T, H, 2).transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-1, -2) / 2 ** 0.5, dim=-1)
            seen.append(a)
            h = h + (a @ v).transpose(1, 2).reshape(b, T, D)
        return h[:, -1].sum()

    return fn, seen


def test_tracing_equals_the_hand_chained_product_per_head():
    fn, seen = _toy()
    x = torch.randn(2, T, D)
    got = lrp.attention_tracing(fn, x)
    a1, a2 = seen
    want = sum(a2[:, h, -1, :].unsqueeze(1) @ a1[:, h] for h in range(H)).squeeze(1)  # e_p^T A2[h] A1[h]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    mixed = (a2.sum(1)[:, -1, :].unsqueeze(1) @ a1.sum(1)).squeeze(1)  # mixing heads gives something else
    assert not torch.allclose(got, mixed, rtol=1e-3)
    torch.testing.assert_close(lrp.attention_tracing(fn, x, position=1),
                               sum(a2[:, h, 1, :].unsqueeze(1) @ a1[:, h] for h in range(H)).squeeze(1))


def test_rollout_equals_its_formula():
    fn, seen = _toy()
    x = torch.randn(2, T, D)
    got = lrp.attention_rollout(fn, x)
    eye = torch.eye(T)
    hat = [(0.5 * a.mean(1) + 0.5 * eye) for a in seen]
    hat = [m / m.sum(-1, keepdim=True) for m in hat]
    want = (hat[1] @ hat[0])[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.sum(-1), torch.ones(2), rtol=1e-12, atol=1e-12)  # rows stay distributions


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_tracing_reads_the_models_own_attention_probabilities(name):
    """One layer: LAT is the read-out row of the attention summed over heads (Llama: 2 query heads, 1 KV head)."""
    case = tm.build(name)
    emb = case.inputs[0]
    with tm.NoFloat32():
        out = case.model(inputs_embeds=emb, output_attentions=True)
    (att,) = out.attentions
    pos = 0 if case.kind == "cls" else -1
    got = lrp.attention_tracing(case.fn, case.inputs, model=case.model, position=pos)
    torch.testing.assert_close(got, att[:, :, pos, :].sum(1), rtol=1e-10, atol=1e-12)


def test_encoder_decoder_is_refused_with_a_clear_error():
    case = tm.build("t5")
    with pytest.raises(InvalidInputError, match="different shapes"):
        lrp.attention_tracing(case.fn, case.inputs, model=case.model)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_one_stack_of_an_encoder_decoder(name):
    case = tm.build(name)
    with tm.NoFloat32():
        out = case.model(inputs_embeds=case.inputs[0], decoder_inputs_embeds=case.inputs[1], output_attentions=True)
    for stack, att in (("encoder", out.encoder_attentions[0]), ("decoder", out.decoder_attentions[0])):
        got = lrp.attention_tracing(case.fn, case.inputs, model=case.model, stack=stack)
        torch.testing.assert_close(got, att[:, :, -1, :].sum(1), rtol=1e-10, atol=1e-12)

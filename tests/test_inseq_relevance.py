"""The relevance methods as Inseq methods (inseq_semiring.integrations.inseq_relevance), on tiny local models."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
inseq = pytest.importorskip("inseq")

from fixtures_inseq import *  # noqa: E402,F401,F403
import inseq_semiring.lrp as lrp  # noqa: E402
from inseq_semiring import InvalidInputError  # noqa: E402
from inseq_semiring.integrations import inseq as plugin  # noqa: E402
from inseq_semiring.integrations import inseq_relevance as rel  # noqa: E402

plugin.register()
PROMPT = "The keys to the cabinet"
LRP = ("lrp_epsilon", "attn_lrp", "cp_lrp")


def test_methods_are_registered_once():
    listed = inseq.list_feature_attribution_methods()
    assert all(m in listed for m in rel.METHODS) and len(listed) == len(set(listed))
    assert rel.register() == rel.register()


@pytest.mark.parametrize("method", LRP + ("attention_tracing", "attention_rollout"))
def test_decoder_only_per_token_values_equal_the_engine(gpt2_model, method):
    out = gpt2_model.attribute(PROMPT, PROMPT + " are", method=method, show_progress=False)
    seq = out.sequence_attributions[0]
    hf, tok, ids, emb, fn = next_token_probability_root(gpt2_model, PROMPT, " are")

    if method in LRP:
        expected = lrp.relevance(fn, (emb,), method, model=hf)[0].sum(-1)[0]
    else:
        engine = lrp.attention_tracing if method == "attention_tracing" else lrp.attention_rollout
        expected = engine(fn, (emb,), model=hf)[0]
    got = seq.target_attributions[: ids.shape[1], 0]
    assert seq.source_attributions is None and type(seq).__name__ == "CoarseFeatureAttributionSequenceOutput"
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-7)
    assert out.info["attribution_method"] == method


def test_epsilon_option_passes_through(gpt2_model):
    a = gpt2_model.attribute(PROMPT, PROMPT + " are", method="attn_lrp", show_progress=False)
    b = gpt2_model.attribute(PROMPT, PROMPT + " are", method="attn_lrp", epsilon=0.5, show_progress=False)
    x, y = a.sequence_attributions[0].target_attributions, b.sequence_attributions[0].target_attributions
    assert not torch.allclose(x[~x.isnan()], y[~y.isnan()], rtol=1e-3)


@pytest.mark.parametrize("method", LRP)
def test_encoder_decoder_attribute_target_equals_the_engine(bart_model, method, monkeypatch):
    calls = []
    orig = rel.explain

    def spy(fn, inputs, *args, **kw):
        calls.append((fn, tuple(x.detach().clone() for x in inputs)))
        return orig(fn, inputs, *args, **kw)

    monkeypatch.setattr(rel, "explain", spy)
    out = bart_model.attribute("the keys to the cabinet", "le chat sur la table", method=method,
                               attribute_target=True, show_progress=False)
    seq = out.sequence_attributions[0]
    assert seq.source_attributions is not None and seq.target_attributions is not None
    assert len(calls) == seq.source_attributions.shape[1]  # one sweep per generated token
    fn, inputs = calls[-1]  # the last step: every decoder position is attributed
    src, tgt = (r.sum(-1)[0] for r in lrp.relevance(fn, inputs, method, model=bart_model.model))
    torch.testing.assert_close(seq.source_attributions[:, -1], src.float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(seq.target_attributions[: tgt.shape[0], -1], tgt.float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", LRP)
def test_a_padded_batch_equals_each_row_alone(bart_model, gpt2_model, method):
    srcs, tgts = ["the keys to the cabinet", "hello world"], ["le chat sur la table", "le chien"]
    both = bart_model.attribute(srcs, tgts, method=method, attribute_target=True, show_progress=False)
    for i in range(2):
        one = bart_model.attribute(srcs[i], tgts[i], method=method, attribute_target=True, show_progress=False)
        a, b = both.sequence_attributions[i], one.sequence_attributions[0]
        torch.testing.assert_close(a.source_attributions, b.source_attributions, rtol=1e-4, atol=1e-6,
                                   equal_nan=True)
        torch.testing.assert_close(a.target_attributions, b.target_attributions, rtol=1e-4, atol=1e-6,
                                   equal_nan=True)
    prompts = ["The keys to the", "Hello, my dog is"]  # same token count: no padding shift of GPT-2's positions
    gens = [p + " on" for p in prompts]
    batch = gpt2_model.attribute(prompts, gens, method=method, show_progress=False)
    for i in range(2):
        one = gpt2_model.attribute(prompts[i], gens[i], method=method, show_progress=False)
        torch.testing.assert_close(batch.sequence_attributions[i].target_attributions,
                                   one.sequence_attributions[0].target_attributions, rtol=1e-4, atol=1e-6,
                                   equal_nan=True)


def test_show_save_load_and_load_model(tiny_gpt2_dir, tmp_path):
    model = inseq.load_model(tiny_gpt2_dir, "attn_lrp")
    out = model.attribute(PROMPT, PROMPT + " are on", show_progress=False)
    assert "<" in out.show(display=False, return_html=True)
    path = tmp_path / "lrp.json"
    out.save(str(path))
    back = inseq.FeatureAttributionOutput.load(str(path))
    torch.testing.assert_close(back.sequence_attributions[0].target_attributions,
                               out.sequence_attributions[0].target_attributions, equal_nan=True)
    assert back.info["attribution_method"] == "attn_lrp"
    lat = model.attribute(PROMPT, PROMPT + " are", method="attention_tracing", show_progress=False)
    assert torch.isfinite(lat.sequence_attributions[0].target_attributions[:5, 0]).all()


def test_attention_methods_refuse_encoder_decoder(bart_model):
    with pytest.raises(InvalidInputError, match="decoder-only"):
        bart_model.attribute("the keys", "le chat", method="attention_tracing", show_progress=False)


def test_cli_paths_over_relevance_rules(tiny_gpt2_dir, capsys):
    from inseq_semiring import cli

    rc = cli.main(["paths", "-m", tiny_gpt2_dir, "-k", "1", "--full", "--rules", "attn_lrp"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "lrp.epsilon" in out  # the epsilon hop after the LM head: a path of the AttnLRP-edited graph
    rc = cli.main(["paths", "-m", tiny_gpt2_dir, "-k", "1", "--full"])
    plain, _ = capsys.readouterr()
    assert rc == 0 and "lrp." not in plain


@pytest.mark.filterwarnings("ignore:Contrastive inputs do not match")
def test_contrastive_attributed_function(gpt2_model, monkeypatch):
    calls = []
    orig = rel.explain

    def spy(fn, inputs, *args, **kw):
        calls.append((fn, tuple(x.detach().clone() for x in inputs)))
        return orig(fn, inputs, *args, **kw)

    monkeypatch.setattr(rel, "explain", spy)
    out = gpt2_model.attribute(PROMPT, PROMPT + " are", method="attn_lrp", attributed_fn="contrast_prob_diff",
                               contrast_targets=PROMPT + " is", show_progress=False)
    fn, inputs = calls[-1]
    hf, tok = gpt2_model.model, gpt2_model.tokenizer
    probs = hf(inputs_embeds=inputs[0]).logits[0, -1].softmax(-1)
    are, is_ = tok(" are").input_ids[0], tok(" is").input_ids[0]
    torch.testing.assert_close(fn(*inputs), (probs[are] - probs[is_]).reshape(1), rtol=1e-4, atol=1e-9)
    expected = lrp.relevance(fn, inputs, "attn_lrp", model=hf)[0].sum(-1)[0]
    torch.testing.assert_close(out.sequence_attributions[0].target_attributions[: inputs[0].shape[1], -1],
                               expected.float(), rtol=1e-4, atol=1e-7)


def test_plain_inseq_cli_runs_attn_lrp(tiny_gpt2_dir, tmp_path):
    out_file = tmp_path / "out.json"
    res = run_plain_inseq_attribute(tiny_gpt2_dir, "attn_lrp", PROMPT, PROMPT + " are", out_file,
                                    ["--attribution_kwargs", '{"epsilon": 0.001}'])
    assert res.returncode == 0, res.stderr[-3000:]
    back = inseq.FeatureAttributionOutput.load(str(out_file))
    assert back.info["attribution_method"] == "attn_lrp" and back.info["attribution_args"] == {"epsilon": 0.001}

"""The five gradient methods as Inseq methods: registration, values equal to the Python API on the same root,
batching with padding, attribute_target, contrastive targets, .show() and .save()."""

from __future__ import annotations

import pytest
import torch

inseq = pytest.importorskip("inseq")

from fixtures_inseq import *  # noqa: E402,F401,F403
from inseq_semiring import methods  # noqa: E402
from inseq_semiring.integrations import inseq as plugin  # noqa: E402
from inseq_semiring.integrations.inseq_gradient_methods import GRADIENT_METHODS  # noqa: E402

torch.set_num_threads(1)
PROMPT = "The keys to the cabinet"
FAST = {"guided_integrated_gradients": {"steps": 8}, "greedy_pig": {"rounds": 2, "steps": 4},
        "pgd_attribution": {"steps": 3}, "deeplift_shap": {}, "guided_backprop": {}}


def test_registered_with_inseq():
    listed = inseq.list_feature_attribution_methods()
    assert all(m in listed for m in GRADIENT_METHODS)
    assert plugin.register()  # idempotent
    assert sorted(m for m in inseq.list_feature_attribution_methods() if m in GRADIENT_METHODS) == \
        sorted(GRADIENT_METHODS)


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_decoder_only_values_equal_the_python_api(gpt2_model, method):
    out = gpt2_model.attribute(PROMPT, PROMPT + " are", method=method, show_progress=False, **FAST[method])
    seq = out.sequence_attributions[0]
    hf, tok, ids, emb, fn = next_token_probability_root(gpt2_model, PROMPT, " are")

    opts = dict(FAST[method])
    if method == "deeplift_shap":
        unk = hf.get_input_embeddings()(torch.full_like(ids, tok.unk_token_id)).detach()
        opts["baselines"] = [(torch.zeros_like(emb),), (unk,)]
    elif method in ("guided_integrated_gradients", "greedy_pig"):
        opts["baselines"] = (hf.get_input_embeddings()(torch.full_like(ids, tok.unk_token_id)).detach(),)
    if method == "greedy_pig":
        opts["per_token"] = True
    expected, = getattr(methods, method)(fn, (emb,), model=hf, **opts)
    got = seq.target_attributions[: ids.shape[1], 0]  # granular: [T, 1 step, H]
    assert seq.source_attributions is None
    torch.testing.assert_close(got.float(), expected[0].float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_batch_with_padding_equals_each_text_alone(gpt2_model, method):
    texts = ["The keys to the cabinet", "The cat sat"]
    together = gpt2_model.attribute(texts, [t + " on" for t in texts], method=method, show_progress=False,
                                    **FAST[method])
    for i, text in enumerate(texts):
        alone = gpt2_model.attribute(text, text + " on", method=method, show_progress=False, **FAST[method])
        a = alone.sequence_attributions[0].target_attributions
        b = together.sequence_attributions[i].target_attributions
        n = a.shape[0]
        torch.testing.assert_close(b[-n:] if b.shape[0] != n else b, a, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_encoder_decoder_attribute_target_contrast_show_and_save(bart_model, tmp_path):
    out = bart_model.attribute("the cat sat", "le chat", method="deeplift_shap", attribute_target=True,
                               show_progress=False)
    seq = out.sequence_attributions[0]
    assert seq.source_attributions is not None and seq.target_attributions is not None
    assert torch.isfinite(seq.source_attributions).all()
    out.show(display=False, return_html=True)
    path = tmp_path / "attr.json"
    out.save(str(path), overwrite=True)
    again = inseq.FeatureAttributionOutput.load(str(path))
    torch.testing.assert_close(again.sequence_attributions[0].source_attributions, seq.source_attributions)
    contrast = bart_model.attribute("the cat sat", "le chat", method="guided_backprop", show_progress=False,
                                    attributed_fn="contrast_prob_diff", contrast_targets="la chat")
    assert torch.isfinite(contrast.sequence_attributions[0].source_attributions).all()


def test_unknown_option_is_a_clear_error(gpt2_model):
    with pytest.raises(Exception, match="baseline_set"):
        gpt2_model.attribute(PROMPT, PROMPT + " are", method="deeplift_shap", baseline_set="mean",
                             show_progress=False)


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_encoder_decoder_batch_with_padding_equals_each_pair_alone(bart_model, method):
    sources, targets = ["the cat sat on the mat", "the dog"], ["le chat", "le chien sur la"]
    together = bart_model.attribute(sources, targets, method=method, show_progress=False, batch_size=2,
                                    **FAST[method])
    for i in range(2):
        alone = bart_model.attribute(sources[i], targets[i], method=method, show_progress=False, **FAST[method])
        a, b = alone.sequence_attributions[0], together.sequence_attributions[i]
        assert a.source_attributions.shape == b.source_attributions.shape
        torch.testing.assert_close(b.source_attributions, a.source_attributions, rtol=1e-4, atol=1e-6,
                                   equal_nan=True)


def test_plain_inseq_cli_accepts_the_gradient_methods(tiny_gpt2_dir, tmp_path):
    out_file = tmp_path / "out.json"
    res = run_plain_inseq_attribute(tiny_gpt2_dir, "deeplift_shap", PROMPT, PROMPT + " are", out_file,
                                    ["--attribution_kwargs", '{"baseline_set": "zero"}'])
    assert res.returncode == 0, res.stderr[-3000:]
    back = inseq.FeatureAttributionOutput.load(str(out_file))
    assert back.info["attribution_method"] == "deeplift_shap"
    assert torch.isfinite(back.sequence_attributions[0].target_attributions[:5]).all()

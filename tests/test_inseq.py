"""The Inseq plugin (inseq_semiring.integrations.inseq) and the Captum front end, on tiny local models."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

inseq = pytest.importorskip("inseq")

from fixtures_inseq import *  # noqa: E402,F401,F403
from inseq_semiring import InvalidInputError, run, semiring_backward  # noqa: E402
from inseq_semiring.integrations import inseq as plugin  # noqa: E402
from inseq_semiring.integrations.captum import SemiringAttribution  # noqa: E402
from inseq_semiring.semirings.scaled import pooled_entropy  # noqa: E402

METHODS = plugin.METHODS
COARSE = ("semiring_maxpath", "semiring_entropy", "semiring_flow")
PROMPT, GENERATED = "The keys to the cabinet", "The keys to the cabinet are on"
STEP_SCORES = ["semiring_entropy", "semiring_top_path", "semiring_total_flow", "semiring_log_total_flow"]

plugin.register()


@pytest.fixture(autouse=True)
def registry_unchanged():
    """No test may leave methods or step functions registered that it created (or remove ours)."""
    before = (sorted(inseq.list_feature_attribution_methods()), sorted(inseq.list_step_functions()))
    yield
    after = (sorted(inseq.list_feature_attribution_methods()), sorted(inseq.list_step_functions()))
    assert after == before


def _spy(monkeypatch):
    """Record the inputs / forward arguments of every engine call the plugin makes."""
    calls = []
    orig = SemiringAttribution.attribute_result

    def spy(self, inputs, target=None, additional_forward_args=None, **kw):
        calls.append((tuple(x.detach().clone() for x in inputs), additional_forward_args, self))
        return orig(self, inputs, target, additional_forward_args, **kw)

    monkeypatch.setattr(SemiringAttribution, "attribute_result", spy)
    return calls


def _engine_per_token(method: str, fn, inputs, **opts):
    """What each method's per-token score must be, straight from the engine."""
    ring = method.split("_", 1)[1]
    if method == "semiring_maxpath":
        vals = semiring_backward(fn, inputs, "maxpath", **opts)
        opts = {k: v for k, v in opts.items() if k != "decomposition"}
        return [v.amin(-1) if opts.get("sign") == "negative" else v.amax(-1) for v in vals]
    if method == "semiring_gradient":
        return [v.abs() for v in semiring_backward(fn, inputs, "gradient")]
    res = run(fn, inputs, ring)
    if method == "semiring_entropy":
        return [pooled_entropy(r, -1).float() for r in res.raw]
    return [(r.z.double().sum(-1) * torch.exp(r.log_scale)).float() for r in res.raw]


# ------------------------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------------------------
def test_methods_and_step_functions_are_registered_once():
    listed = inseq.list_feature_attribution_methods()
    assert all(m in listed for m in METHODS)
    assert None not in listed and len(listed) == len(set(listed))
    assert all(s in inseq.list_step_functions() for s in STEP_SCORES)
    from inseq.attr.feat import FeatureAttribution

    first = plugin.register()
    assert plugin.register() == first  # idempotent: the same classes
    ours = [c for c in FeatureAttribution.subclasses() if getattr(c, "method_name", "").startswith("semiring_")]
    assert sorted(c.method_name for c in ours) == sorted(METHODS)
    assert plugin.SemiringAttributionRegistry not in FeatureAttribution.available_classes().values()
    assert plugin.is_registered()


def test_unregister_then_register_restores_the_registry():
    before = sorted(inseq.list_feature_attribution_methods())
    plugin.unregister()
    try:
        assert not any(s in inseq.list_step_functions() for s in STEP_SCORES)
        # a class stays listed only while something holds an instance of it; the others are gone
        from inseq.attr.feat import FeatureAttribution

        alive = [c for c in FeatureAttribution.subclasses() if getattr(c, "method_name", "").startswith("semiring_")]
        assert len(alive) == len({c.method_name for c in alive})
    finally:
        plugin.register()
    assert sorted(inseq.list_feature_attribution_methods()) == before


def test_import_registers_when_inseq_is_imported_later():
    code = ("import sys; import inseq_semiring; assert 'inseq' not in sys.modules; import inseq; "
            "m = inseq.list_feature_attribution_methods(); print(sorted(x for x in m if x.startswith('semiring')))")
    env = {**os.environ, "INSEQ_SEMIRING_NO_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(sorted(METHODS))


def test_startup_hook_is_light():
    """The .pth shim installs its finder without importing torch, Inseq or the package."""
    code = ("import sys; print('torch' in sys.modules, 'inseq_semiring' in sys.modules, 'inseq' in sys.modules, "
            "[type(f).__name__ for f in sys.meta_path if getattr(f, '_inseq_semiring_hook', False)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("[")[0].split() == ["False", "False", "False"]
    if "_Hook" not in out.stdout:
        pytest.skip("inseq_semiring_autoload.pth is not installed in this environment (reinstall the package)")


# ------------------------------------------------------------------------------------------------------------------
# per-token values = the engine's
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_decoder_only_per_token_values_equal_the_engine(gpt2_model, method):
    out = gpt2_model.attribute(PROMPT, PROMPT + " are", method=method, show_progress=False)
    seq = out.sequence_attributions[0]
    hf, tok, ids, emb, fn = next_token_probability_root(gpt2_model, PROMPT, " are")

    expected = _engine_per_token(method, fn, (emb,))[0][0]
    got = seq.target_attributions[: ids.shape[1], 0]
    assert seq.source_attributions is None
    assert type(seq).__name__ == ("GranularFeatureAttributionSequenceOutput" if method == "semiring_gradient"
                                  else "CoarseFeatureAttributionSequenceOutput")
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-9)
    assert out.info["attribution_method"] == method


@pytest.mark.parametrize("method", METHODS)
def test_encoder_decoder_attribute_target_equals_the_engine(bart_model, method, monkeypatch):
    calls = _spy(monkeypatch)
    out = bart_model.attribute("the keys to the cabinet", "le chat sur la table", method=method,
                               attribute_target=True, show_progress=False)
    seq = out.sequence_attributions[0]
    assert seq.source_attributions is not None and seq.target_attributions is not None
    n_src, n_gen = seq.source_attributions.shape[:2]
    assert n_gen == len(calls) and n_src == len(seq.source)
    inputs, extra, attr = calls[-1]  # the last step: every decoder position is attributed
    fn = attr.root_fn(None, extra)
    src, tgt = _engine_per_token(method, fn, inputs)
    torch.testing.assert_close(seq.source_attributions[:, -1], src[0].to(torch.float32), rtol=1e-4, atol=1e-9)
    n_prefix = tgt.shape[1]
    torch.testing.assert_close(seq.target_attributions[:n_prefix, -1], tgt[0].to(torch.float32), rtol=1e-4,
                               atol=1e-9)
    assert torch.isfinite(seq.source_attributions).all()


def test_semiring_gradient_equals_saliency(gpt2_model, bart_model):
    for model, kw in ((gpt2_model, {}), (bart_model, {"attribute_target": True})):
        text = PROMPT if model is gpt2_model else "the keys to the cabinet"
        gen = GENERATED if model is gpt2_model else "le chat sur la table"
        ours = model.attribute(text, gen, method="semiring_gradient", show_progress=False, **kw)
        ref = model.attribute(text, gen, method="saliency", show_progress=False, **kw)
        for a, b in zip(ours.sequence_attributions, ref.sequence_attributions):
            assert type(a) is type(b)
            for name in ("source_attributions", "target_attributions"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None) == (y is None)
                if x is not None:
                    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-8, equal_nan=True)
        agg_a, agg_b = ours.aggregate().sequence_attributions[0], ref.aggregate().sequence_attributions[0]
        torch.testing.assert_close(agg_a.target_attributions, agg_b.target_attributions, rtol=1e-4, atol=1e-7,
                                   equal_nan=True)


# ------------------------------------------------------------------------------------------------------------------
# batching, contrastive targets, options
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_batched_with_padding(gpt2_model, bart_model, method):
    # decoder-only: two prompts of different lengths (left padding), free generation of 2 tokens
    out = gpt2_model.attribute(["The keys", "Hello, my dog is"], method=method, show_progress=False,
                               generation_args={"max_new_tokens": 2, "do_sample": False}, batch_size=2)
    assert len(out.sequence_attributions) == 2
    for seq in out.sequence_attributions:
        assert seq.target_attributions.shape[1] == 2
        valid = seq.target_attributions[~seq.target_attributions.isnan()]
        assert valid.numel() > 0 and torch.isfinite(valid).all()
    # encoder-decoder: targets of different lengths (right padding); each row equals its unbatched run
    srcs, tgts = ["the keys to the cabinet", "hello world"], ["le chat sur la table", "le chien"]
    both = bart_model.attribute(srcs, tgts, method=method, attribute_target=True, show_progress=False)
    for i in range(2):
        one = bart_model.attribute(srcs[i], tgts[i], method=method, attribute_target=True, show_progress=False)
        a, b = both.sequence_attributions[i], one.sequence_attributions[0]
        assert [t.token for t in a.source] == [t.token for t in b.source]
        torch.testing.assert_close(a.source_attributions, b.source_attributions, rtol=1e-3, atol=1e-7,
                                   equal_nan=True)
        torch.testing.assert_close(a.target_attributions, b.target_attributions, rtol=1e-3, atol=1e-7,
                                   equal_nan=True)


@pytest.mark.filterwarnings("ignore:Contrastive inputs do not match")
@pytest.mark.parametrize("method", METHODS)
def test_contrastive_attributed_function(gpt2_model, method, monkeypatch):
    calls = _spy(monkeypatch)
    kw = dict(method=method, attributed_fn="contrast_prob_diff", contrast_targets=PROMPT + " is",
              show_progress=False)
    out = gpt2_model.attribute(PROMPT, PROMPT + " are", **kw)
    seq = out.sequence_attributions[0]
    assert out.info["attributed_fn"] == "contrast_prob_diff_fn"
    inputs, extra, attr = calls[-1]
    root = attr.root_fn(None, extra)(*inputs)
    hf, tok = gpt2_model.model, gpt2_model.tokenizer
    logits = hf(inputs_embeds=inputs[0]).logits[0, -1].softmax(-1)
    are, is_ = tok(" are").input_ids[0], tok(" is").input_ids[0]
    torch.testing.assert_close(root, (logits[are] - logits[is_]).reshape(1), rtol=1e-4, atol=1e-9)
    expected = _engine_per_token(method, attr.root_fn(None, extra), inputs)[0][0]
    torch.testing.assert_close(seq.target_attributions[: inputs[0].shape[1], -1], expected.to(torch.float32),
                               rtol=1e-4, atol=1e-9)


def test_maxpath_options_pass_through(gpt2_model):
    base = dict(method="semiring_maxpath", show_progress=False)
    plain = gpt2_model.attribute(PROMPT, PROMPT + " are", **base).sequence_attributions[0].target_attributions
    pos = gpt2_model.attribute(PROMPT, PROMPT + " are", sign="positive", **base)
    neg = gpt2_model.attribute(PROMPT, PROMPT + " are", sign="negative", **base)
    ten = gpt2_model.attribute(PROMPT, PROMPT + " are", granularity="tensor", **base)
    p = pos.sequence_attributions[0].target_attributions
    n = neg.sequence_attributions[0].target_attributions
    valid = ~plain.isnan()
    assert (p[valid] <= plain[valid] + 1e-12).all() and (n[valid] <= p[valid]).all()
    assert pos.info["attribution_args"] == {"sign": "positive"}
    assert torch.isfinite(ten.sequence_attributions[0].target_attributions[valid]).all()
    # the load-time default applies to every call, a per-call value overrides it
    model = inseq.load_model(gpt2_model.model, "semiring_maxpath", tokenizer=gpt2_model.tokenizer, sign="positive")
    again = model.attribute(PROMPT, PROMPT + " are", show_progress=False).sequence_attributions[0]
    torch.testing.assert_close(again.target_attributions, p, equal_nan=True)


def test_decomposition_option_changes_the_graph_not_the_gradient(gpt2_model):
    """``decomposition="paper"`` as a method option: the per-token maxpath (tensor granularity) and entropy are the
    engine's values on the paper's graph, and differ from the ATen graph's; the gradient does not change."""
    emb = gpt2_model.embed_ids(gpt2_model.encode(PROMPT).input_ids).detach()
    token = gpt2_model.encode(PROMPT + " are").input_ids[0, -1]

    def fn(e):
        return torch.softmax(gpt2_model.model(inputs_embeds=e).logits[:, -1], -1)[:, token].sum()

    base = dict(show_progress=False)
    out = {}
    for method, opts in (("semiring_maxpath", dict(sign="positive", granularity="tensor")),
                         ("semiring_entropy", {}), ("semiring_gradient", {})):
        for dec in ("aten", "paper"):
            res = gpt2_model.attribute(PROMPT, PROMPT + " are", method=method, decomposition=dec, **opts, **base)
            out[method, dec] = res.sequence_attributions[0].target_attributions[: emb.shape[1], 0]
            assert res.info["attribution_args"] == {**opts, "decomposition": dec}
    expected = _engine_per_token("semiring_maxpath", fn, (emb,), sign="positive", granularity="tensor",
                                 decomposition="paper")[0][0]
    torch.testing.assert_close(out["semiring_maxpath", "paper"], expected.float(), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(out["semiring_maxpath", "paper"], out["semiring_maxpath", "aten"], rtol=1e-3)
    assert not torch.allclose(out["semiring_entropy", "paper"], out["semiring_entropy", "aten"], rtol=1e-3)
    torch.testing.assert_close(out["semiring_gradient", "paper"].nan_to_num(), out["semiring_gradient", "aten"]
                               .nan_to_num(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method, kwargs, allowed", [
    ("semiring_maxpath", {"decomposition": "brunoflow"}, "'aten', 'paper', 'primitive'"),
    ("semiring_maxpath", {"sign": "up"}, "'abs', 'positive', 'negative'"),
    ("semiring_maxpath", {"granularity": "vector"}, "'scalar', 'tensor'"),
    ("semiring_flow", {"sign": "positive"}, "'abs'"),
    ("semiring_entropy", {"granularity": "tensor"}, "'scalar'"),
])
def test_bad_option_value_is_a_clear_error(gpt2_model, method, kwargs, allowed):
    with pytest.raises(InvalidInputError) as exc:
        gpt2_model.attribute(PROMPT, PROMPT + " are", method=method, show_progress=False, **kwargs)
    msg = str(exc.value)
    (name, value), = kwargs.items()
    assert f"option '{name}'" in msg and repr(value) in msg and allowed in msg and f"'{method}'" in msg


# ------------------------------------------------------------------------------------------------------------------
# step scores
# ------------------------------------------------------------------------------------------------------------------
def test_step_scores_are_whole_graph_values(gpt2_model, bart_model):
    # decoder-only: the graph of a step is the prefix, exactly what the methods attribute to
    per = {m: gpt2_model.attribute(PROMPT, GENERATED, method=m, show_progress=False, step_scores=STEP_SCORES)
           for m in ("semiring_maxpath", "semiring_flow", "saliency")}
    scores = per["semiring_maxpath"].sequence_attributions[0].step_scores
    for other in ("semiring_flow", "saliency"):  # the same whatever the method (and its tape sharing)
        for k, v in per[other].sequence_attributions[0].step_scores.items():
            torch.testing.assert_close(v, scores[k], rtol=1e-5, atol=0)
    mp = per["semiring_maxpath"].sequence_attributions[0].target_attributions
    fl = per["semiring_flow"].sequence_attributions[0].target_attributions
    torch.testing.assert_close(scores["semiring_top_path"], mp.nan_to_num(-1).amax(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(scores["semiring_total_flow"], fl.nan_to_num(0).sum(0), rtol=1e-4, atol=0)
    torch.testing.assert_close(scores["semiring_log_total_flow"], scores["semiring_total_flow"].log(), rtol=1e-5,
                               atol=1e-6)
    # entropy of the whole graph of the first step, from the engine
    hf, tok = gpt2_model.model, gpt2_model.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    emb = hf.get_input_embeddings()(ids).detach()
    res = run(lambda e: hf(inputs_embeds=e).logits[:, -1].softmax(-1)[:, tok(" are").input_ids[0]], (emb,),
              "entropy")
    torch.testing.assert_close(scores["semiring_entropy"][0], pooled_entropy(res.raw[0], (1, 2))[0].float(),
                               rtol=1e-5, atol=1e-5)
    # encoder-decoder: the graph has the encoder and the decoder inputs
    out = bart_model.attribute("the keys to the cabinet", "le chat", method="semiring_maxpath",
                               attribute_target=True, show_progress=False, step_scores=STEP_SCORES)
    seq = out.sequence_attributions[0]
    top = torch.maximum(seq.source_attributions.nan_to_num(-1).amax(0), seq.target_attributions.nan_to_num(-1).amax(0))
    torch.testing.assert_close(seq.step_scores["semiring_top_path"], top, rtol=1e-6, atol=0)
    assert all(torch.isfinite(v).all() for v in seq.step_scores.values())
    assert (seq.step_scores["semiring_top_path"] > 0).all() and (seq.step_scores["semiring_total_flow"] > 0).all()
    assert plugin._cache().tape is None  # the step's tape is released after the attribution


# ------------------------------------------------------------------------------------------------------------------
# Inseq features: save/load, show, aggregation
# ------------------------------------------------------------------------------------------------------------------
def test_save_load_round_trip(gpt2_model, bart_model, tmp_path):
    out = gpt2_model.attribute(PROMPT, GENERATED, method="semiring_entropy", show_progress=False,
                               step_scores=["semiring_entropy", "semiring_top_path"])
    path = tmp_path / "attr.json"
    out.save(str(path))
    back = inseq.FeatureAttributionOutput.load(str(path))
    a, b = out.sequence_attributions[0], back.sequence_attributions[0]
    assert type(a) is type(b) and a.target == b.target
    torch.testing.assert_close(a.target_attributions, b.target_attributions, equal_nan=True)
    for k in a.step_scores:
        torch.testing.assert_close(a.step_scores[k], b.step_scores[k])
    grad = bart_model.attribute("the keys", "le chat", method="semiring_gradient", attribute_target=True,
                                show_progress=False)
    grad.save(str(tmp_path / "grad.json"))
    # a saved file reloads in a process that never imports the plugin
    code = ("import sys, inseq; o = inseq.FeatureAttributionOutput.load(sys.argv[1]); "
            "s = o.sequence_attributions[0]; assert 'inseq_semiring' not in sys.modules; "
            "print(type(s).__name__, o.info['attribution_method'], sorted(s.step_scores))")
    env = {**os.environ, "INSEQ_SEMIRING_NO_AUTOLOAD": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["CoarseFeatureAttributionSequenceOutput", "semiring_entropy", "['semiring_entropy',",
                                  "'semiring_top_path']"]


@pytest.mark.parametrize("method", METHODS)
def test_show_and_aggregate(gpt2_model, bart_model, method, capsys):
    out = gpt2_model.attribute(PROMPT, GENERATED, method=method, show_progress=False,
                               step_scores=["semiring_top_path"])
    html = out.show(display=False, return_html=True)
    assert isinstance(html, str) and "<" in html
    out.show()  # console rendering
    assert "cabinet" in capsys.readouterr().out
    spans = out.aggregate("spans", target_spans=(1, 3))
    assert len(spans.sequence_attributions[0].target) == len(out.sequence_attributions[0].target) - 1
    spans.show(display=False, return_html=True)
    enc = bart_model.attribute("the keys to the cabinet", "le chat", method=method, attribute_target=True,
                               show_progress=False)
    sub = enc.aggregate("subwords")
    sub.show(display=False, return_html=True)
    if method in COARSE:
        assert enc.sequence_attributions[0].source_attributions.dim() == 2


# ------------------------------------------------------------------------------------------------------------------
# the Captum front end
# ------------------------------------------------------------------------------------------------------------------
def test_captum_semiring_attribution_targets_and_formats():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(2, 4)
    sa = SemiringAttribution(net)
    for ring in ("gradient", "flow", "entropy", "maxpath"):
        got = sa.attribute(x, target=1, semiring=ring)
        assert isinstance(got, torch.Tensor) and got.shape == x.shape
        exp = semiring_backward(lambda t: net(t)[:, 1], (x,), ring)[0]
        torch.testing.assert_close(got, exp)
    per_row = sa.attribute((x,), target=[0, 2], semiring="maxpath", sign="positive")
    assert isinstance(per_row, tuple) and len(per_row) == 1
    exp = semiring_backward(lambda t: torch.stack([net(t)[0, 0], net(t)[1, 2]]), (x,), "maxpath", sign="positive")
    torch.testing.assert_close(per_row[0], exp[0])
    grad = sa.attribute(x, target=torch.tensor([2, 0]), semiring="gradient")
    xr = x.clone().requires_grad_()
    ref, = torch.autograd.grad(net(xr).gather(1, torch.tensor([[2], [0]])).sum(), xr)
    torch.testing.assert_close(grad, ref)
    with pytest.raises(InvalidInputError, match="one scalar per batch row"):
        sa.attribute(x)  # (B, 3) output without a target
    with pytest.raises(InvalidInputError, match="semiring"):
        SemiringAttribution(net, semiring="tropical")
    assert not sa.has_convergence_delta() and not sa.multiplies_by_inputs
    assert math.isfinite(float(sa.attribute(x, target=0, semiring="entropy").sum()))

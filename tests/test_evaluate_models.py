"""The evaluation on a sequence classifier (direct backend: engine / Captum on the embeddings) and on an
encoder-decoder (through Inseq), both tiny random models saved from configs with word-level tokenizers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fixtures_inseq import *  # noqa: F401,F403
from fixtures_inseq import WORDS
from inseq_semiring.evaluate import evaluate


@pytest.fixture(scope="module")
def tiny_bert_classifier_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert-cls")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(str(folder))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, num_labels=3, pad_token_id=0,
                            id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
        BertForSequenceClassification(config).eval().save_pretrained(str(folder))
    finally:
        torch.set_default_dtype(old)
    return str(folder)


def _data(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sequence_classifier_direct_backend(tiny_bert_classifier_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"id": "a", "text": "the cat sat on the mat", "label": "pos", "relevant": [[4, 7]]},
            {"id": "b", "text": "a dog is on the table", "label": 0, "contrast": 2},
            {"id": "c", "text": "hello world"}]
    out = tmp_path / "out"
    s = evaluate(_data(tmp_path, rows), ["loo", "saliency", "semiring_maxpath", "attn_lrp", "attention_tracing",
                                         "attention", "occlusion"], out, model=tiny_bert_classifier_dir,
                 progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_bert_classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_classifier_dir).eval()
    ex = pd.read_parquet(out / "examples.parquet").set_index("id")
    enc = tok("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        p = model(**enc).logits[0].double().softmax(-1)
    assert ex.loc["a", "target_token_id"] == 2 and ex.loc["a", "full_score"] == pytest.approx(float(p[2]), rel=1e-6)
    assert ex.loc["a", "n_removable"] == 6  # [CLS] and [SEP] are never removed
    with torch.no_grad():
        pc = model(**tok("hello world", return_tensors="pt")).logits[0].argmax()
    assert ex.loc["c", "target_token_id"] == int(pc)  # no label: the predicted class
    assert ex.loc["b", "contrast_token_id"] == 2
    # saliency: the L2 norm of d p(label) / d embedding, by hand
    emb = model.get_input_embeddings()(enc.input_ids).detach().requires_grad_(True)
    g, = torch.autograd.grad(model(inputs_embeds=emb, attention_mask=enc.attention_mask).logits.softmax(-1)[0, 2],
                             emb)
    attr = pd.read_parquet(out / "attributions.parquet")
    sal = attr[(attr.id == "a") & (attr.method == "saliency")].sort_values("position")
    assert sal.score.to_numpy() == pytest.approx(g[0].norm(dim=-1).double().numpy(), rel=1e-4)
    assert sal.special.tolist() == [True] + [False] * 6 + [True]
    # occlusion: |s(x) - s(x with token i's embedding replaced by [UNK]'s)|, by hand
    unk = model.get_input_embeddings()(torch.tensor([tok.unk_token_id]))[0]
    occ = []
    with torch.no_grad():
        for i in range(emb.shape[1]):
            e = emb.detach().clone()
            e[0, i] = unk
            pi = model(inputs_embeds=e, attention_mask=enc.attention_mask).logits.softmax(-1)[0, 2]
            occ.append(abs(float(p[2]) - float(pi)))
    got = attr[(attr.id == "a") & (attr.method == "occlusion")].sort_values("position").score.to_numpy()
    assert got == pytest.approx(occ, rel=1e-4, abs=1e-7)
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped.method.tolist() == ["attention"] and "sequence classifiers" in skipped.reason[0]
    met = pd.read_parquet(out / "metrics.parquet")
    assert set(met.method) == {"loo", "saliency", "semiring_maxpath", "attn_lrp", "attention_tracing", "occlusion"}
    assert set(met[met.id == "a"].metric) >= {"hit@1", "rr"}
    assert s.computed == 18


def test_encoder_decoder_through_inseq(tiny_bart_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    rows = [{"id": "a", "text": "the cat sat on the mat", "target": "le chat"}]
    out = tmp_path / "out"
    evaluate(_data(tmp_path, rows), ["loo", "saliency", "semiring_maxpath"], out, model=tiny_bart_dir,
             progress=False, fractions=(0.5,))
    tok = AutoTokenizer.from_pretrained(tiny_bart_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart_dir).eval()
    enc = tok("the cat sat on the mat", return_tensors="pt")
    target = tok("le chat", add_special_tokens=False).input_ids[0]
    dec = torch.tensor([[model.config.decoder_start_token_id, tok.bos_token_id]])  # BART: </s> <s>, then "le"
    with torch.no_grad():
        p = model(**enc, decoder_input_ids=dec).logits[0, -1].double().softmax(-1)[target]
    ex = pd.read_parquet(out / "examples.parquet")
    assert ex.full_score[0] == pytest.approx(float(p), rel=1e-6) and ex.n_removable[0] == 6
    assert not (out / "skipped.csv").read_text().strip().splitlines()[1:], (out / "skipped.csv").read_text()
    met = pd.read_parquet(out / "metrics.parquet")
    assert set(met.method) == {"loo", "saliency", "semiring_maxpath"}
    # saliency through Inseq = the L2 norm of d p(le) / d encoder embedding, by hand
    emb = model.get_input_embeddings()(enc.input_ids).detach()  # (BART scales inside its embedding module)
    emb.requires_grad_(True)
    out_p = model(inputs_embeds=emb, attention_mask=enc.attention_mask, decoder_input_ids=dec).logits[0, -1]
    g, = torch.autograd.grad(out_p.softmax(-1)[target], emb)
    attr = pd.read_parquet(out / "attributions.parquet")
    sal = attr[attr.method == "saliency"].sort_values("position").score.to_numpy()
    assert sal == pytest.approx(g[0].norm(dim=-1).double().numpy(), rel=1e-4)


def test_direct_backend_equals_inseq_on_gpt2(tiny_gpt2_dir, tmp_path):
    """The same methods through Inseq and through the engine / Captum directly give the same per-token scores."""
    rows = [{"id": "a", "text": "The keys to the cabinet", "target": " are"},
            {"id": "b", "text": "the cat sat on the", "target": " mat"}]
    methods = ["saliency", "input_x_gradient", "semiring_maxpath", "attn_lrp", "occlusion", "integrated_gradients"]
    data = _data(tmp_path, rows)
    tables = {}
    for use_inseq in (True, False):
        out = tmp_path / f"inseq-{use_inseq}"
        evaluate(data, methods, out, model=tiny_gpt2_dir, use_inseq=use_inseq, progress=False, fractions=(0.5,))
        assert not (out / "skipped.csv").read_text().strip().splitlines()[1:]
        tables[use_inseq] = pd.read_parquet(out / "attributions.parquet").sort_values(["id", "method", "position"])
    a, b = tables[True], tables[False]
    assert a[["id", "method", "position"]].to_numpy().tolist() == b[["id", "method", "position"]].to_numpy().tolist()
    for m in methods:
        x, y = a[a.method == m].score.to_numpy(), b[b.method == m].score.to_numpy()
        scale = float(abs(x).max())
        assert scale > 0 and abs(x - y).max() <= 2e-3 * scale, (m, x, y)


def test_flow_is_ranked_by_its_log_and_equals_inseqs_flow(tiny_gpt2_dir, tmp_path):
    """``semiring_flow`` is scored as ``log Z`` on the direct backend even where Inseq is used (Inseq stores float32,
    which ``Z`` of a deep model overflows): its exponential equals Inseq's own per-token flow on a tiny model."""
    import inseq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inseq_semiring.evaluate import read_examples
    from inseq_semiring.evaluate.methods import inseq_scores
    from inseq_semiring.evaluate.scoring import TargetScorer
    from inseq_semiring.integrations.inseq import register

    rows = [{"id": "a", "text": "the cat sat on the", "target": " mat"}]
    data = _data(tmp_path, rows)
    evaluate(data, ["semiring_flow"], tmp_path / "out", model=tiny_gpt2_dir, progress=False, fractions=(0.5,))
    ours = pd.read_parquet(tmp_path / "out" / "attributions.parquet").sort_values("position").score.to_numpy()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ex, = read_examples(data, tok)
    target = tok(" mat").input_ids[0]
    register()
    am = inseq.load_model(model, "saliency", tokenizer=tok, device="cpu")
    theirs = inseq_scores(am, TargetScorer(model, "causal", tokenizer=tok), "semiring_flow", ex, target, None)
    assert all(z > 0 for z in theirs)
    assert torch.tensor(ours).exp().tolist() == pytest.approx(theirs, rel=1e-4)


def test_lime_runs_through_inseq(tiny_gpt2_dir, tmp_path):
    """LIME (Captum's, via Inseq) needs scikit-learn, which setup.sh installs (extra ``evaluate``): not skipped."""
    rows = [{"id": "a", "text": "the cat sat on the", "target": " mat"}]
    out = tmp_path / "out"
    evaluate(_data(tmp_path, rows), ["lime"], out, model=tiny_gpt2_dir, progress=False, fractions=(0.5,))
    assert not (out / "skipped.csv").read_text().strip().splitlines()[1:]
    scores = pd.read_parquet(out / "attributions.parquet").score.to_numpy()
    assert len(scores) == 5 and abs(scores).max() > 0

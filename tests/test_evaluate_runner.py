"""The evaluation runner: bad data (named-line errors, skip_bad), resume, skipped methods, changed settings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eval_models import AdditiveModel
from inseq_semiring.evaluate import DataError, evaluate, read_examples
from inseq_semiring.evaluate.store import SettingsMismatchError

W = [0.1, 0.0, 0.05, 0.3, 0.05, 0.2, 0.15]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line, field, needle", [
    ({"input_ids": [0, 3], "relevant": [7]}, "relevant", "out of range"),
    ({"input_ids": [0, 3], "relevant": []}, "relevant", "empty"),
    ({"input_ids": [0, 3], "colour": 1}, "colour", "unknown field"),
    ({"target": 0}, "text", "neither"),
    ({"input_ids": []}, "input_ids", "non-empty"),
    ({"input_ids": [0, 99]}, "input_ids", "outside the vocabulary"),
    ({"input_ids": [0, 3], "label": "maybe"}, "label", "unknown label name"),
    ({"input_ids": [0, 0]}, "input_ids", "special"),
    ('{"input_ids": [0, 3]', "(line)", "not valid JSON"),
])
def test_bad_line_names_file_line_and_field(tmp_path, line, field, needle):
    data = _write(tmp_path / "bad.jsonl", [{"input_ids": [0, 3, 4]}, line])
    with pytest.raises(DataError) as info:
        read_examples(data, None, config=AdditiveModel(W).config, kind="classifier")
    msg = str(info.value)
    assert f"{data}, line 2, field '{field}'" in msg and needle in msg, msg
    assert info.value.line == 2 and info.value.field == field


def test_text_data_errors(tmp_path, tiny_tokenizer):
    rows = [{"text": "the cat sat", "relevant": [[4, 7]], "target": " on"},
            {"text": "   "}, {"text": "the cat", "relevant": [[3, 40]]}, {"text": "the cat", "target": ""},
            {"text": "the cat", "relevant": [[5, 2]]}]
    data = _write(tmp_path / "d.jsonl", rows)
    good = read_examples(data, tiny_tokenizer, skip_bad=True, errors_path=tmp_path / "errors.jsonl")
    assert [e.line for e in good] == [1]
    assert good[0].relevant == (1,) and good[0].tokens[1].endswith("cat")  # [4, 7) is "cat": token 1
    errs = [json.loads(x) for x in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["field"]) for e in errs] == [(2, "text"), (3, "relevant"), (4, "target"), (5, "relevant")]
    assert "empty" in errs[0]["message"] and "tokenizes to nothing" in errs[2]["message"]
    with pytest.raises(DataError, match="line 2, field 'text'"):
        read_examples(data, tiny_tokenizer)


def test_skip_bad_logs_and_goes_on(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"id": "x", "input_ids": [0, 3, 4]}, {"id": "y", "input_ids": [0, 3],
                                                                                "relevant": [9]},
                                         {"id": "z", "input_ids": [0, 5, 6]}, {"id": "x", "input_ids": [0, 4]}])
    with pytest.raises(DataError, match="line 2, field 'relevant'"):
        evaluate(data, ["loo"], tmp_path / "out", model=AdditiveModel(W), progress=False)
    evaluate(data, ["loo"], tmp_path / "out2", model=AdditiveModel(W), skip_bad=True, progress=False)
    errs = [json.loads(x) for x in (tmp_path / "out2" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["field"]) for e in errs] == [(2, "relevant"), (4, "id")]
    assert pd.read_parquet(tmp_path / "out2" / "examples.parquet").id.tolist() == ["x", "z"]


def test_resume_redoes_nothing(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"input_ids": [0, 3, 4, 5]}, {"input_ids": [0, 6, 5]},
                                         {"input_ids": [0, 4, 6, 3, 5]}])
    model = AdditiveModel(W)
    first = evaluate(data, ["loo", "random", "saliency"], tmp_path / "out", model=model, progress=False)
    assert first.computed == 9 and first.forwards > 0
    tables = {n: pd.read_parquet(tmp_path / "out" / n) for n in ("metrics.parquet", "attributions.parquet")}
    model.calls.clear()
    again = evaluate(data, ["loo", "random", "saliency"], tmp_path / "out", model=model, progress=False)
    assert again.computed == 0 and again.reused == 9 and again.forwards == 0 and model.calls == []
    # an interrupted run: one (example, method) part missing -> only it is redone
    parts = sorted((tmp_path / "out" / "parts" / "saliency").glob("*.json"))
    parts[0].unlink()
    model.calls.clear()
    third = evaluate(data, ["loo", "random", "saliency"], tmp_path / "out", model=model, progress=False)
    assert third.computed == 1 and third.reused == 8 and len(model.calls) == 1  # one batched forward: the curves
    for name, df in tables.items():
        new = pd.read_parquet(tmp_path / "out" / name)
        cols = [c for c in df.columns if c != "value"] if name == "metrics.parquet" else list(df.columns)
        key = df[cols].sort_values(cols[:3]).reset_index(drop=True)
        assert key.equals(new[cols].sort_values(cols[:3]).reset_index(drop=True))
        if name == "metrics.parquet":
            a = df[df.metric != "seconds"].sort_values(["id", "method", "metric"]).value.to_numpy()
            b = new[new.metric != "seconds"].sort_values(["id", "method", "metric"]).value.to_numpy()
            assert np.array_equal(a, b, equal_nan=True)  # saliency's loo_tau is NaN: all its scores tie
    # a new method on the same folder computes only that method
    fourth = evaluate(data, ["loo", "input_x_gradient"], tmp_path / "out", model=model, progress=False)
    assert fourth.computed == 3 and fourth.reused == 3
    with pytest.raises(SettingsMismatchError, match="removal"):
        evaluate(data, ["loo"], tmp_path / "out", model=model, removal="replace", progress=False)
    fresh = evaluate(data, ["loo"], tmp_path / "out", model=model, removal="replace", overwrite=True, progress=False)
    assert fresh.computed == 3


def test_non_applicable_method_is_skipped_and_the_run_goes_on(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"input_ids": [0, 3, 4, 5]}, {"input_ids": [0, 6, 5]}])
    s = evaluate(data, ["attn_lrp", "loo", "attention", "semiring_maxpath"], tmp_path / "out",
                 model=AdditiveModel(W), progress=False)
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    reasons = dict(zip(skipped.method, skipped.reason))
    assert set(reasons) == {"attn_lrp", "attention"}, reasons  # the log of the additive model has no LRP rule
    assert "aten.log" in reasons["attn_lrp"] and "Inseq" in reasons["attention"]
    methods = set(pd.read_parquet(tmp_path / "out" / "metrics.parquet").method)
    assert methods == {"loo", "semiring_maxpath"}
    assert {m for m, i, _ in s.skipped if not i} == {"attn_lrp", "attention"}


def test_unknown_method_and_bad_fractions_fail_before_work(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"input_ids": [0, 3]}])
    with pytest.raises(ValueError, match="unknown method 'nope'.*--methods"):
        evaluate(data, ["nope"], tmp_path / "out", model=AdditiveModel(W))
    with pytest.raises(ValueError, match="outside"):
        evaluate(data, ["loo"], tmp_path / "out", model=AdditiveModel(W), fractions=(0.0,))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "<unk>", "the", "cat", "sat", "on"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")


def test_an_example_that_cannot_be_scored_is_skipped(tmp_path):
    """No target given, contrast 0 = the predicted class of [0, 3, 4, 5] (a = 0.65): that example is skipped."""
    data = _write(tmp_path / "d.jsonl", [{"id": "bad", "input_ids": [0, 3, 4, 5], "contrast": 0},
                                         {"id": "ok", "input_ids": [0, 6, 5]}])
    s = evaluate(data, ["loo"], tmp_path / "out", model=AdditiveModel(W), progress=False)
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped.method.tolist() == ["*"] and skipped.id.tolist() == ["bad"]
    assert "contrast is the model's predicted target" in skipped.reason[0]
    assert pd.read_parquet(tmp_path / "out" / "examples.parquet").id.tolist() == ["ok"]
    again = evaluate(data, ["loo"], tmp_path / "out", model=AdditiveModel(W), progress=False)
    assert again.computed == 0 and s.computed == 2


def test_a_passed_model_is_left_in_its_mode(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"input_ids": [0, 3, 4]}])
    model = AdditiveModel(W).train()
    evaluate(data, ["loo", "saliency"], tmp_path / "out", model=model, progress=False)
    assert model.training


def test_environment_failures_are_retried_on_resume_and_others_kept(tmp_path, monkeypatch):
    from inseq_semiring.evaluate import runner

    data = _write(tmp_path / "d.jsonl", [{"input_ids": [0, 3, 4, 5]}, {"input_ids": [0, 6, 5]},
                                         {"input_ids": [0, 4, 6, 3, 5]}])
    real = runner._Evaluator.method_record

    def flaky(self, method, ex, rec):
        if method == "saliency":  # e.g. a package missing in this environment
            raise ImportError("No module named 'sklearn'")
        if method == "loo" and ex.line == 2:  # a failure of this example
            raise ValueError("this example cannot be explained")
        return real(self, method, ex, rec)

    monkeypatch.setattr(runner._Evaluator, "method_record", flaky)
    first = evaluate(data, ["loo", "saliency"], tmp_path / "out", model=AdditiveModel(W), progress=False)
    assert sorted((m, r.split(":")[0]) for m, _, r in first.skipped) == [("loo", "ValueError")] + \
        [("saliency", "ImportError")] * 3
    monkeypatch.setattr(runner._Evaluator, "method_record", real)  # the environment is fixed
    second = evaluate(data, ["loo", "saliency"], tmp_path / "out", model=AdditiveModel(W), progress=False)
    assert second.computed == 3 and second.reused == 3  # saliency redone; loo's failure on line 2 kept
    assert [(m, r.split(":")[0]) for m, _, r in second.skipped] == [("loo", "ValueError")]
    metrics = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert metrics[metrics.method == "saliency"].id.nunique() == 3

"""The real path: a tiny random GPT-2 (config-built, GPT-2's BPE) through ``inseq-semiring evaluate``, with a
reference method, a semiring method (through Inseq) and an Inseq built-in; a bad data line through the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fixtures_inseq import *  # noqa: F401,F403
from inseq_semiring.cli import main


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_evaluate_tiny_gpt2(tiny_gpt2_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"id": "keys", "text": "The keys to the cabinet", "target": " are", "relevant": [[4, 8]]},
            {"id": "cat", "text": "the cat sat on the", "target": " mat", "contrast": " table"},
            {"id": "greedy", "text": "hello world"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "evaluate", "--data", str(data), "--methods", "loo,semiring_maxpath,saliency",
                           "--out", str(out), "--model", tiny_gpt2_dir, "--fractions", "0.2,0.5")
    assert rc == 0, err
    assert "evaluated 3 example(s) x 3 method(s): 9 computed" in stdout
    assert "evaluating" in err  # the progress bar (stderr)
    ex = pd.read_parquet(out / "examples.parquet")
    assert list(ex.columns) == ["id", "target_token_id", "contrast_token_id", "full_score", "n_removable"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    by_id = ex.set_index("id")
    assert by_id.loc["keys", "target_token_id"] == tok(" are").input_ids[0]
    assert by_id.loc["cat", "contrast_token_id"] == tok(" table").input_ids[0]
    assert pd.isna(by_id.loc["keys", "contrast_token_id"]) and by_id.loc["keys", "n_removable"] == 5
    # the full score is p(" are" | prompt) of the model itself
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        p = model(**tok("The keys to the cabinet", return_tensors="pt")).logits[0, -1].double().softmax(-1)
    assert by_id.loc["keys", "full_score"] == pytest.approx(float(p[tok(" are").input_ids[0]]), rel=1e-5)
    attr = pd.read_parquet(out / "attributions.parquet")
    assert list(attr.columns) == ["id", "method", "position", "token", "token_id", "special", "score"]
    assert set(attr.method) == {"loo", "semiring_maxpath", "saliency"}
    # saliency through Inseq equals the L2 norm of |d p / d embedding| computed by hand
    hf, _, ids, emb, fn = next_token_probability_root(type("M", (), {"model": model, "tokenizer": tok}),  # noqa: F405
                                                      "The keys to the cabinet", " are")
    e = emb.clone().requires_grad_(True)
    g, = torch.autograd.grad(fn(e).sum(), e)
    sal = attr[(attr.id == "keys") & (attr.method == "saliency")].sort_values("position").score.to_numpy()
    assert sal == pytest.approx(g[0].norm(dim=-1).double().numpy(), rel=1e-4)
    met = pd.read_parquet(out / "metrics.parquet")
    assert list(met.columns) == ["id", "method", "metric", "value"]
    names = set(met.metric)
    assert {"comp@0.2", "comp@0.5", "aopc_comp", "suff@0.2", "aopc_suff", "abpc", "loo_tau", "seconds"} <= names
    keys_loo = met[(met.id == "keys") & (met.method == "loo")].set_index("metric").value
    assert keys_loo["loo_tau"] == 1.0 and "hit@1" in keys_loo and "rr" in keys_loo
    assert "hit@1" not in set(met[met.id == "cat"].metric)
    cur = pd.read_parquet(out / "curves.parquet")
    assert list(cur.columns) == ["id", "method", "order", "k", "fraction", "score"]
    assert len(cur[(cur.id == "keys") & (cur.method == "loo")]) == 2 * 6
    # re-running resumes: nothing recomputed
    rc, stdout, err = _run(capsys, "evaluate", "--data", str(data), "--methods", "loo,semiring_maxpath,saliency",
                           "--out", str(out), "--model", tiny_gpt2_dir, "--fractions", "0.2", "0.5", "-q")
    assert rc == 0 and "0 computed, 9 already done; 0 scoring forward(s)" in stdout, stdout + err


def test_cli_evaluate_bad_line_and_skip_bad(tiny_gpt2_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "The keys", "target": " are"}) + "\n"
                    + json.dumps({"text": "The keys", "relevant": [[0, 99]]}) + "\n")
    rc, _, err = _run(capsys, "evaluate", "--data", str(data), "--methods", "loo", "--out", str(tmp_path / "a"),
                      "--model", tiny_gpt2_dir, "-q")
    lines = [x for x in err.splitlines() if x.startswith("inseq-semiring: error:")]
    assert rc == 2 and len(lines) == 1 and f"{data}, line 2, field 'relevant'" in lines[0], err
    rc, out, err = _run(capsys, "evaluate", "--data", str(data), "--methods", "loo", "--out", str(tmp_path / "b"),
                        "--model", tiny_gpt2_dir, "-q", "--skip-bad")
    assert rc == 0 and "evaluated 1 example(s)" in out, err
    logged = [json.loads(x) for x in (tmp_path / "b" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["field"]) for e in logged] == [(2, "relevant")]
    rc, _, err = _run(capsys, "evaluate", "--data", str(data), "--methods", "loo,bogus", "--out",
                      str(tmp_path / "c"), "--model", tiny_gpt2_dir)
    assert rc == 2 and "unknown method 'bogus'" in err


def test_cli_evaluate_checks_the_output_folder_before_loading(tmp_path, capsys, monkeypatch):
    import inseq_semiring.evaluate.loading as loading

    def no_load(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "The keys"}) + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, _, err = _run(capsys, "evaluate", "--data", str(data), "--methods", "loo", "--out", str(blocker), "-q")
    assert rc == 2 and "--out" in err and "not a folder" in err, err
    rc, _, err = _run(capsys, "evaluate", "--data", str(data), "--methods", "loo", "--out", str(tmp_path / "o"),
                      "--fractions", "0.1,2", "-q")
    assert rc == 2 and "--fractions" in err and "outside (0, 1]" in err, err
    rc, _, err = _run(capsys, "evaluate", "--data", str(tmp_path / "missing.jsonl"), "--methods", "loo", "--out",
                      str(tmp_path / "o"), "-q")
    assert rc == 2 and "no data file" in err and "--data" in err, err


def test_cli_evaluate_needs_data_or_suite(tmp_path, capsys):
    rc, _, err = _run(capsys, "evaluate", "--methods", "loo", "--out", str(tmp_path / "a"))
    assert rc == 2 and "give either --data F.jsonl or --suite NAME" in err, err
    rc, _, err = _run(capsys, "evaluate", "--data", str(tmp_path / "d.jsonl"), "--suite", "text", "--out",
                      str(tmp_path / "b"))
    assert rc == 2 and "give either --data F.jsonl or --suite NAME" in err, err
    rc, _, err = _run(capsys, "evaluate", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "c"))
    assert rc == 2 and "--methods is required with --data" in err, err
    rc, _, err = _run(capsys, "evaluate", "--suite", "text", "--model", str(tmp_path), "--out", str(tmp_path / "d"))
    assert rc == 2 and "brings its own model and removal" in err, err
    assert not any((tmp_path / x).exists() for x in "abcd")

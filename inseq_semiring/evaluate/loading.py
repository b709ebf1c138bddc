"""The model of an evaluation: the embedded SmolLM2 (``"smollm2"``) or a saved Hugging Face folder, whose kind
is read from its config: ``*ForSequenceClassification`` -> ``"classifier"``, ``is_encoder_decoder`` ->
``"seq2seq"``, otherwise ``"causal"``. A folder without a tokenizer loads with ``tokenizer=None`` (the data must
then give ``input_ids``)."""

from __future__ import annotations

import os

import torch

from ..errors import InvalidInputError

__all__ = ["load_model", "model_kind", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2"


def model_kind(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classifier"
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer or None, kind)``, the model in eval mode."""
    if name == DEFAULT_MODEL:
        from ..models.smollm2 import load_smollm2

        model, tok = load_smollm2(dtype=dtype)
        return model.eval(), tok, "causal"
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification, AutoTokenizer)

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot read a model config from {name!r} ({' '.join(str(e).split())[:200]})",
                                where="--model", fix=f"give a saved Hugging Face folder with a config.json, or "
                                                      f"'{DEFAULT_MODEL}' (the embedded default)") from e
    kind = model_kind(config)
    auto = {"classifier": AutoModelForSequenceClassification, "seq2seq": AutoModelForSeq2SeqLM,
            "causal": AutoModelForCausalLM}[kind]
    try:
        model = auto.from_pretrained(name, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInputError(f"cannot load {name!r} as a {kind} model ({' '.join(str(e).split())[:200]})",
                                where="--model") from e
    tok = None
    has_tokenizer_files = any(os.path.exists(os.path.join(name, f)) for f in
                              ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                               "tokenizer.model"))
    if not os.path.isdir(name) or has_tokenizer_files:
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError, TypeError):
            tok = None
    return model.eval(), tok, kind

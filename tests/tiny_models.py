"""Tiny random Hugging Face models built from configs (no hub), with one attribution root each.

Every model is float64 (unless asked otherwise), in eval mode, with eager attention and every parameter redrawn
from N(0, 0.4^2) so that no weight is an exact 0 or 1 by accident of initialisation. Sizes: hidden 8, 1 layer,
2 heads, vocab 40, sequence 4 (decoder 3).

``build(name)`` returns a :class:`TinyCase` with ``inputs`` (the embeddings to attribute to) and ``fn(*inputs)``
returning the root: a scalar (``per_row=False``) or one root per batch row, shape ``(B,)`` (``per_row=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf
from torch.overrides import TorchFunctionMode

VOCAB, HIDDEN, HEADS, SEQ, DEC_SEQ = 40, 8, 2, 4, 3
TARGET = 7  # the token whose log-probability / the label whose logit is the root

#: name -> (kind, causal): kind "lm" (causal LM, root = next-token log-prob at the last position),
#: "cls" (encoder classifier, root = one logit), "s2s" (encoder-decoder, root = decoder log-prob).
ARCHS = {
    "gpt2": ("lm", True),
    "llama": ("lm", True),
    "qwen2": ("lm", True),
    "mistral": ("lm", True),
    "gemma": ("lm", True),
    "bert": ("cls", False),
    "roberta": ("cls", False),
    "distilbert": ("cls", False),
    "t5": ("s2s", True),
    "bart": ("s2s", True),
}

_DECODER_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=HEADS, max_position_embeddings=32, tie_word_embeddings=False)


def _config(name: str):
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=HEADS, n_positions=32,
                             bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0), tf.GPT2LMHeadModel
    if name == "llama":
        return tf.LlamaConfig(**_DECODER_COMMON, num_key_value_heads=1), tf.LlamaForCausalLM
    if name == "qwen2":
        return tf.Qwen2Config(**_DECODER_COMMON, num_key_value_heads=1), tf.Qwen2ForCausalLM
    if name == "mistral":
        return tf.MistralConfig(**_DECODER_COMMON, num_key_value_heads=2, sliding_window=None), tf.MistralForCausalLM
    if name == "gemma":
        return tf.GemmaConfig(**_DECODER_COMMON, num_key_value_heads=1, head_dim=4), tf.GemmaForCausalLM
    if name == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                             intermediate_size=16, max_position_embeddings=32, num_labels=3,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), \
            tf.BertForSequenceClassification
    if name == "roberta":
        return tf.RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                                intermediate_size=16, max_position_embeddings=32, num_labels=3, pad_token_id=1,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), \
            tf.RobertaForSequenceClassification
    if name == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, hidden_dim=16, n_layers=1, n_heads=HEADS,
                                   max_position_embeddings=32, num_labels=3, dropout=0.0, attention_dropout=0.0,
                                   seq_classif_dropout=0.0), tf.DistilBertForSequenceClassification
    if name == "t5":
        return tf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                           num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                           dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0), \
            tf.T5ForConditionalGeneration
    if name == "bart":
        return tf.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1,
                             encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=16,
                             decoder_ffn_dim=16, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0), tf.BartForConditionalGeneration
    raise KeyError(name)


_MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def tiny_model(name: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The tiny model ``name`` (cached; identical weights across dtypes)."""
    key = (name, dtype)
    if key not in _MODELS:
        config, cls = _config(name)
        config._attn_implementation = "eager"
        torch.manual_seed(1234)
        model = cls(config)
        gen = torch.Generator().manual_seed(4321)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.4)
        _MODELS[key] = model.to(dtype).eval()
    return _MODELS[key]


class NoFloat32(TorchFunctionMode):
    """Keep a float64 model in float64: Llama-family RMSNorm and eager softmax upcast to float32 on purpose
    (``.to(torch.float32)``, ``softmax(..., dtype=torch.float32)``), which in a float64 model *truncates*.
    Inside this mode every ``torch.float32`` argument becomes ``torch.float64`` and ``.float()`` is ``.double()``,
    so the whole graph is float64 and comparisons at 1e-10 are meaningful."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        swap = lambda v: torch.float64 if v is torch.float32 else v  # noqa: E731
        args = tuple(swap(a) for a in args)
        kwargs = {k: swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@dataclass
class TinyCase:
    name: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    fn: Callable[..., torch.Tensor]
    causal: bool
    kind: str


def _per_row(name: str, model, kind: str, pure: bool) -> Callable[..., torch.Tensor]:
    rows = _rows(model, kind)
    if not pure:
        return rows

    def pure_rows(*xs):
        with NoFloat32():
            return rows(*xs)

    return pure_rows


def _rows(model, kind: str) -> Callable[..., torch.Tensor]:
    if kind == "lm":
        def root(emb):
            logits = model(inputs_embeds=emb, use_cache=False).logits
            return torch.log_softmax(logits[:, -1], dim=-1)[:, TARGET]
    elif kind == "cls":
        def root(emb):
            return model(inputs_embeds=emb).logits[:, 1]
    else:
        def root(emb, dec_emb):
            logits = model(inputs_embeds=emb, decoder_inputs_embeds=dec_emb, use_cache=False).logits
            return torch.log_softmax(logits[:, -1], dim=-1)[:, TARGET]
    return root


def build(name: str, *, batch: int = 1, dtype: torch.dtype = torch.float64, per_row: bool = False,
          seed: int = 0, pure: bool | None = None) -> TinyCase:
    """``pure`` (default: ``dtype is float64``) runs the model under :class:`NoFloat32`."""
    kind, causal = ARCHS[name]
    model = tiny_model(name, dtype)
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, SEQ, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    inputs = (emb,)
    if kind == "s2s":
        inputs = (emb, torch.randn(batch, DEC_SEQ, HIDDEN, generator=gen, dtype=torch.float64).to(dtype))
    pure = (dtype is torch.float64) if pure is None else pure
    rows = _per_row(name, model, kind, pure)
    if per_row:
        fn = rows
    elif batch == 1:
        def fn(*xs):
            return rows(*xs)[0]
    else:
        def fn(*xs):
            return rows(*xs).sum()
    return TinyCase(name, model, inputs, fn, causal, kind)


def new_inputs(case: TinyCase, seed: int) -> tuple[torch.Tensor, ...]:
    """Other input values of the case's shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in case.inputs)


def assert_same_bits(a, b, what: str = "") -> None:
    """Two sequences of tensors equal in dtype, shape and every value (NaN equal to NaN)."""
    assert len(a) == len(b), what
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, what
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")

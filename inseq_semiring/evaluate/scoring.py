"""The target score ``s(x)`` and the batched scoring of perturbed inputs.

``s(x) = p(target | x)``, or ``p(target | x) - p(contrast | x)`` with a contrast, where ``p`` is the softmax of

* a causal LM's logits at the last input position (the next token after ``x``);
* an encoder-decoder's decoder after the decoder start token and the special tokens the tokenizer puts before a
  text (BART: ``</s> <s>``; T5: ``<pad>``), ``x`` the encoder input: the step that predicts the first target token;
* a sequence classifier's logits (``target``: a class).

Perturbation (``removal``): ``"delete"`` drops the removed positions; ``"replace"`` puts ``baseline_id`` there
(default: the tokenizer's UNK token, else its pad token, else EOS, else the config's pad / EOS id). Special tokens
are never in a removal set (the caller ranks only removable positions). An input left empty by deletion (a causal
LM without a BOS token) is scored as the single BOS / EOS token: the model's prediction with no context.

:meth:`TargetScorer.scores` scores a list of inputs with one forward per ``batch_size`` rows (right-padded,
attention-masked; read-out at each row's own last position), so an example's whole curve set is one forward when it
fits in a batch. ``forwards`` / ``rows_scored`` count the work done.
"""

from __future__ import annotations

import threading
from typing import Iterable, Sequence

import torch

from ..errors import InvalidInputError

__all__ = ["TargetScorer", "KINDS", "REMOVALS", "default_baseline_id"]

KINDS = ("causal", "seq2seq", "classifier")
REMOVALS = ("delete", "replace")


def _first_int(*values):
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def default_baseline_id(tokenizer, config) -> int | None:
    """UNK, else pad, else EOS of the tokenizer; else the config's pad / EOS / BOS id."""
    t = tokenizer
    return _first_int(getattr(t, "unk_token_id", None), getattr(t, "pad_token_id", None),
                      getattr(t, "eos_token_id", None), getattr(config, "pad_token_id", None),
                      getattr(config, "eos_token_id", None), getattr(config, "bos_token_id", None))


def _leading_specials(tokenizer) -> list[int]:
    """The special tokens a tokenizer puts before a text (BART's ``<s>``; none for T5): the decoder sees them after
    the decoder start token, before the first target token (as in Inseq and in training)."""
    if tokenizer is None:
        return []
    enc = tokenizer("a", add_special_tokens=True, return_special_tokens_mask=True)
    out = []
    for t, special in zip(enc.input_ids, enc.special_tokens_mask):
        if not special:
            break
        out.append(int(t))
    return out


class TargetScorer:
    """Scores token-id inputs of one model. ``kind``: ``"causal"``, ``"seq2seq"`` or ``"classifier"``."""

    def __init__(self, model: torch.nn.Module, kind: str, *, tokenizer=None, removal: str = "delete",
                 baseline_id: int | None = None, batch_size: int = 64):
        if kind not in KINDS:
            raise InvalidInputError(f"unknown model kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")
        if removal not in REMOVALS:
            raise InvalidInputError(f"unknown removal {removal!r}", where="--removal",
                                    fix="use 'delete' (default) or 'replace'")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.kind, self.tokenizer = model, kind, tokenizer
        config = getattr(model, "config", None)
        self.config = config
        self.removal, self.batch_size = removal, batch_size
        self.baseline_id = baseline_id if baseline_id is not None else default_baseline_id(tokenizer, config)
        if removal == "replace" and self.baseline_id is None:
            raise InvalidInputError("removal='replace' needs a baseline token id and the model has no UNK, pad or "
                                    "EOS token", fix="pass baseline_id= (--baseline-id)")
        self.pad_id = _first_int(getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                                 self.baseline_id, 0)
        self.empty_id = _first_int(getattr(tokenizer, "bos_token_id", None), getattr(config, "bos_token_id", None),
                                   getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None))
        self.decoder_start_id = _first_int(getattr(config, "decoder_start_token_id", None),
                                           getattr(config, "bos_token_id", None), self.pad_id)
        self.decoder_prefix = [self.decoder_start_id] + _leading_specials(tokenizer) if kind == "seq2seq" else []
        self._lock = threading.Lock()
        self.forwards = 0
        self.rows_scored = 0

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    # -------------------------------------------------------------------------------------------------------------
    def perturb(self, ids: Sequence[int], removed: Iterable[int]) -> list[int]:
        """``ids`` with the positions in ``removed`` deleted or replaced by the baseline id."""
        removed = set(removed)
        if self.removal == "delete":
            return [t for i, t in enumerate(ids) if i not in removed]
        return [self.baseline_id if i in removed else t for i, t in enumerate(ids)]

    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """The read-out logits ``[B, V]`` of ``rows`` (one forward)."""
        rows = [r if r else self._empty() for r in rows]
        lengths = torch.tensor([len(r) for r in rows])
        width = int(lengths.max())
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = 1
        dev = self.device
        ids, mask = ids.to(dev), mask.to(dev)
        with torch.no_grad():
            if self.kind == "causal":
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                logits = logits[torch.arange(len(rows), device=dev), (lengths - 1).to(dev)]
            elif self.kind == "seq2seq":
                dec = torch.tensor([self.decoder_prefix] * len(rows), dtype=torch.long, device=dev)
                logits = self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            else:
                logits = self.model(input_ids=ids, attention_mask=mask).logits
        with self._lock:
            self.forwards += 1
            self.rows_scored += len(rows)
        return logits

    def _empty(self) -> list[int]:
        if self.empty_id is None:
            raise InvalidInputError("deleting every removable token leaves an empty input and the model has no BOS "
                                    "or EOS token to score it with", fix="use removal='replace' (--removal replace)")
        return [self.empty_id]

    def scores(self, rows: Sequence[Sequence[int]], target: int, contrast: int | None = None) -> list[float]:
        """``s`` of every row: one forward per ``batch_size`` rows."""
        out: list[float] = []
        rows = [list(r) for r in rows]
        for start in range(0, len(rows), self.batch_size):
            probs = self._logits(rows[start:start + self.batch_size]).double().softmax(-1)
            s = probs[:, target] - (probs[:, contrast] if contrast is not None else 0.0)
            out.extend(float(v) for v in s.cpu())
        return out

    def predict(self, ids: Sequence[int]) -> int:
        """The greedy next token (causal / seq2seq) or the predicted class (classifier)."""
        return int(self._logits([list(ids)]).argmax(-1)[0])

    # -------------------------------------------------------------------------------------------------------------
    def root(self, ids: Sequence[int], target: int, contrast: int | None = None):
        """``(embeds [1, S, H], fn)`` with ``fn(embeds) = s`` (shape ``[1]``): the function the attribution methods
        explain, over the input embeddings (used where Inseq is not: classifiers, ``input_ids`` data)."""
        dev = self.device
        ids_t = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        emb = self.model.get_input_embeddings()(ids_t).detach()
        mask = torch.ones_like(ids_t)
        model, kind = self.model, self.kind
        dec = torch.tensor([self.decoder_prefix], dtype=torch.long, device=dev)

        def fn(e: torch.Tensor) -> torch.Tensor:
            m = mask.expand(e.shape[0], -1)
            if kind == "causal":
                logits = model(inputs_embeds=e, attention_mask=m).logits[:, -1]
            elif kind == "seq2seq":
                logits = model(inputs_embeds=e, attention_mask=m, decoder_input_ids=dec.expand(e.shape[0], -1)) \
                    .logits[:, -1]
            else:
                logits = model(inputs_embeds=e, attention_mask=m).logits
            p = logits.softmax(-1)
            return p[:, target] - p[:, contrast] if contrast is not None else p[:, target]

        return emb, fn

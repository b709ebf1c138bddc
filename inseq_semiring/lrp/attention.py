"""Attention tracing (LAT, generalised) and attention rollout, read from the recorded tape.

Both use the attention probabilities ``A_l`` ([B, H, T, S], one per ``_softmax`` call over 4-D scores, in execution
order) as the recorder saw them, so they work on every architecture the recorder supports (GQA included: the
probabilities are per query head) and need no ``output_attentions`` support from the model.

* :func:`attention_tracing` (Layerwise Attention Tracing, Wu & Ong 2021, for any number of layers and heads):
  per head ``h``, start at the read-out position ``p`` and chain the attention matrices from the last layer down,
  ``t_h = e_p^T A_L[h] A_{L-1}[h] ... A_1[h]``, with no mixing across heads; the score is ``sum_h t_h``.
* :func:`attention_rollout` (Abnar & Zuidema 2020): ``A^_l = norm(0.5 mean_h A_l[h] + 0.5 I)`` (rows renormalised
  to sum 1), ``rollout = A^_L ... A^_1``; the score is row ``p`` of it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import re

import torch

from ..errors import InvalidInputError
from ..graph.tape import Tape

aten = torch.ops.aten
_SOFTMAX = {aten._softmax.default, aten._safe_softmax.default}


#: module-name parts of cross-attention layers (excluded when one stack is selected)
_CROSS = re.compile(r"(EncDecAttention|encoder_attn|crossattention|cross_attn)")


def attention_maps(tape: Tape, stack: str | None = None) -> list[torch.Tensor]:
    """The attention probabilities of every attention layer, in execution order: ``[B, H, T, S]`` each.
    ``stack`` (e.g. ``"encoder"`` or ``"decoder"`` of an encoder-decoder): only the self-attention layers whose
    module path has that component (cross-attention excluded)."""
    recs = [rec for rec in tape.records if rec.op in _SOFTMAX and rec.outputs[0].dim() == 4]
    if stack is not None:
        part = re.compile(rf"(^|\.){re.escape(stack)}(\.|$)")
        recs = [r for r in recs if part.search(r.module_path) and not _CROSS.search(r.module_path)]
    maps = [rec.outputs[0] for rec in recs]
    if not maps:
        raise InvalidInputError("no attention probabilities (a softmax over [batch, heads, query, key] scores) depend "
                                f"on the inputs{'' if stack is None else f' in stack {stack!r}'}",
                                where="inseq_semiring.lrp.attention",
                                fix="attribute to the embeddings of a transformer with eager or SDPA attention")
    shapes = {tuple(a.shape) for a in maps}
    square = all(a.shape[-1] == a.shape[-2] for a in maps)
    if len({(s[0], s[2], s[3]) for s in shapes}) != 1 or not square:
        raise InvalidInputError(f"the attention layers have different shapes {sorted(shapes)} (an encoder-decoder?)",
                                where="inseq_semiring.lrp.attention",
                                fix="trace one stack at a time: stack='encoder' or stack='decoder'")
    return maps


def _readout(maps, position: int) -> torch.Tensor:
    b, t = maps[0].shape[0], maps[0].shape[-2]
    e = torch.zeros(b, t, dtype=maps[0].dtype, device=maps[0].device)
    e[:, position] = 1
    return e


def trace_maps(maps: Sequence[torch.Tensor], position: int = -1) -> torch.Tensor:
    """LAT over given maps: ``sum_h e_p^T A_L[h] ... A_1[h]`` -> ``[B, S]``."""
    heads = {a.shape[1] for a in maps}
    if len(heads) != 1:
        raise InvalidInputError(f"layers have different head counts {sorted(heads)}", where="attention_tracing",
                                fix="trace layers with one head count (per-head chains need matching heads)")
    v = _readout(maps, position).unsqueeze(1).expand(-1, maps[0].shape[1], -1)  # [B, H, T]
    for a in reversed(maps):
        v = torch.einsum("bht,bhts->bhs", v, a)
    return v.sum(1)


def rollout_maps(maps: Sequence[torch.Tensor], position: int = -1) -> torch.Tensor:
    """Rollout over given maps: row ``position`` of ``A^_L ... A^_1`` -> ``[B, S]``."""
    v = _readout(maps, position)
    for a in reversed(maps):
        mixed = 0.5 * a.mean(1) + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        v = torch.einsum("bt,bts->bs", v, mixed)
    return v


def _tape(fn, inputs, model, tape):
    if tape is not None:
        return tape
    from .relevance import record_tape

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return record_tape(fn, inputs, model)


def attention_tracing(fn: Callable[..., torch.Tensor] | None, inputs=(), *, model=None, position: int = -1,
                      tape: Tape | None = None, stack: str | None = None) -> torch.Tensor:
    """LAT scores ``[B, S]`` of the input positions for the read-out ``position`` (-1: a causal LM's predicted
    position; 0: a classifier's pooled [CLS]); ``stack``: see :func:`attention_maps`."""
    return trace_maps(attention_maps(_tape(fn, inputs, model, tape), stack), position)


def attention_rollout(fn: Callable[..., torch.Tensor] | None, inputs=(), *, model=None, position: int = -1,
                      tape: Tape | None = None, stack: str | None = None) -> torch.Tensor:
    """Attention-rollout scores ``[B, S]`` for the read-out ``position``."""
    return rollout_maps(attention_maps(_tape(fn, inputs, model, tape), stack), position)

"""Python API: ``relevance(fn, inputs, method=...)`` and ``coverage(model, method, example_input)``.

``R(x) = x * g~(x)``: the input times the gradient of the root under the method's edited rules
(:mod:`~inseq_semiring.lrp.methods`), one reverse sweep of the gradient semiring. Signed; per token, sum over the
hidden dimension (``R.sum(-1)``). The model is put in eval mode with eager attention while it is recorded and
restored afterwards, also on error; nothing global is patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..api import _check_inputs, run
from ..graph.model_state import attribution_mode
from ..graph.recorder import record
from ..graph.tape import Tape
from .edited import DEFAULT_EPSILON
from .methods import METHODS, RECORD_ONLY, Plan, plan


@dataclass
class RelevanceResult:
    """``relevance``: one tensor per input, shaped like it; ``root``: the root's value; ``plan``: the rewritten tape,
    its rule overlay and the rule every operator on the path got; ``result``: the gradient sweep's result."""

    relevance: tuple[torch.Tensor, ...]
    root: torch.Tensor
    plan: Plan
    result: Any


def record_tape(fn: Callable, inputs: Sequence[torch.Tensor], model=None) -> Tape:
    with attribution_mode(model):
        return record(fn, inputs, model=model, rules=RECORD_ONLY)


def explain(fn: Callable[..., torch.Tensor], inputs, method: str = "attn_lrp", *, epsilon: float = DEFAULT_EPSILON,
            model: torch.nn.Module | None = None, extra_rules: dict | None = None,
            tape: Tape | None = None, keep_trail: bool = False) -> RelevanceResult:
    """As :func:`relevance`, with everything the sweep produced (``keep_trail``: ``result.trail`` holds the
    edited gradient ``g~`` of every node tensor, so ``R(t) = t * g~(t)`` anywhere in the graph)."""
    if method not in METHODS:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"unknown relevance method {method!r}", where="inseq_semiring.lrp.relevance",
                                fix=f"use one of {list(METHODS)}")
    inputs = _check_inputs(inputs)
    if tape is None:
        tape = record_tape(fn, inputs, model)
    p = plan(tape, method, epsilon=epsilon, model=model, extra_rules=extra_rules)
    res = run(fn, inputs, "gradient", rules=p.rules, tape=p.tape, backpointers=keep_trail)
    rel = tuple(x * g for x, g in zip(inputs, res.values))
    return RelevanceResult(rel, tape.root, p, res)


def relevance(fn: Callable[..., torch.Tensor], inputs, method: str = "attn_lrp", *,
              epsilon: float = DEFAULT_EPSILON, model: torch.nn.Module | None = None,
              extra_rules: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Relevance ``R(x) = x * g~(x)`` of each input for the root ``fn(*inputs)`` under ``method``:

    * ``"lrp_epsilon"`` (Bach et al. 2015): epsilon rule on contractions, identity rule on element-wise
      non-linearities, norms with sigma detached; a product of two input-dependent tensors passes the relevance of
      each operand as if the other were constant (so it counts the product twice);
    * ``"attn_lrp"`` (Achtibat et al. 2024): as above with the uniform rule (half per operand) on products of two
      input-dependent tensors (``Q K^T``, ``A V``, ``gate * up``) and the softmax rule;
    * ``"cp_lrp"`` (Ali et al. 2022): as ``attn_lrp`` with the attention weights held constant.

    ``epsilon`` (default ``1e-6``, LXT's default) stabilises every contraction: ``z / (z + eps sign z)``.
    ``model``: module names in errors/reports, eval mode + eager attention while recording (restored).
    ``extra_rules``: ``{aten op: "linear" | "identity" | "uniform" | "constant"}`` for operators with no rule.
    Raises :class:`~inseq_semiring.lrp.methods.UnsupportedRelevanceOpError` naming every operator on the path
    without a rule (never a silent gradient fallback).
    """
    return explain(fn, inputs, method, epsilon=epsilon, model=model, extra_rules=extra_rules).relevance


def relevance_semiring(fn: Callable[..., torch.Tensor], inputs, method: str = "attn_lrp", semiring: str = "maxpath",
                       *, epsilon: float = DEFAULT_EPSILON, model: torch.nn.Module | None = None, sign: str = "abs",
                       backpointers: bool = False, extra_rules: dict | None = None, tape: Tape | None = None):
    """Any semiring over the *relevance graph*: the gradient graph with the method's edited local Jacobians.

    A path's product ``prod w`` times its input element ``x_i`` is the relevance that path carries:
    ``R(x_i) = x_i * sum_paths prod w`` (the gradient semiring). ``"maxpath"`` gives the strongest relevance route
    per input element (decode it with :func:`inseq_semiring.paths.decode_path` / ``top_paths`` and
    ``rules=plan.rules``), ``"entropy"`` the entropy of ``p(path) ~ |prod w|``. Under ``cp_lrp`` with bias-free
    layers and ``epsilon -> 0`` the path relevances ``x_i prod w`` sum to the root. Returns ``(result, plan)``."""
    inputs = _check_inputs(inputs)
    if tape is None:
        tape = record_tape(fn, inputs, model)
    p = plan(tape, method, epsilon=epsilon, model=model, extra_rules=extra_rules)
    res = run(fn, inputs, semiring, sign=sign, rules=p.rules, tape=p.tape, backpointers=backpointers)
    return res, p


@dataclass(frozen=True)
class CoverageRow:
    op: str
    module: str
    rule: str | None  # None: no rule (relevance() raises)
    count: int

    def __str__(self) -> str:
        return f"{self.op:<34s} {self.module or '<top level>':<44s} {self.rule or 'NO RULE':<36s} x{self.count}"


def _default_root(model, example_input):
    """``fn, inputs`` for a Hugging Face model: the embeddings of ``example_input`` (token ids, or embeddings, or a
    dict with ``input_ids``) and as root the logit of the top-scoring token at the last position (chosen before
    recording; decoder: one start token)."""
    ids = example_input.get("input_ids") if isinstance(example_input, dict) else example_input
    emb = ids if ids.is_floating_point() else model.get_input_embeddings()(ids).detach()
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", 0) or 0
        dec = model.get_input_embeddings()(torch.full((emb.shape[0], 1), start, dtype=torch.long)).detach()

        def logits_of(e, d):
            return model(inputs_embeds=e, decoder_inputs_embeds=d, use_cache=False).logits[:, -1]

        inputs = (emb, dec)
    else:
        def logits_of(e):
            logits = model(inputs_embeds=e).logits
            return logits[:, -1] if logits.dim() == 3 else logits

        inputs = (emb,)
    with torch.no_grad():
        top = logits_of(*inputs).argmax(-1, keepdim=True)

    def fn(*xs):
        return logits_of(*xs).gather(-1, top).sum()

    return fn, inputs


def coverage(model: torch.nn.Module, method: str, example_input, *, fn: Callable | None = None,
             extra_rules: dict | None = None) -> list[CoverageRow]:
    """Every input-dependent operator on the relevance path of ``model`` under ``method`` and the rule it gets
    (``rule=None``: no rule; :func:`relevance` would raise). ``example_input``: token ids / embeddings / a
    tokenizer's dict (root: the largest last-position logit), or the inputs of ``fn`` when ``fn`` is given."""
    if fn is None:
        fn, inputs = _default_root(model, example_input)
    else:
        inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    tape = record_tape(fn, _check_inputs(inputs), model)
    p = plan(tape, method, model=model, extra_rules=extra_rules, strict=False)
    rows: dict[tuple, int] = {}
    for rec, a in p.assignments:
        key = (str(rec.op), rec.module_path, None if a is None else a.rule)
        rows[key] = rows.get(key, 0) + 1
    return [CoverageRow(op, mod, rule, n) for (op, mod, rule), n in rows.items()]

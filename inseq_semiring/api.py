"""Entry points: validate -> record -> sweep -> finalize.

``semiring_backward(fn, inputs, semiring)`` returns one tensor per input, shaped like it:

* ``"gradient"``: d root / d x (equals ``torch.autograd.grad``);
* ``"flow"``: ``Z(x) = sum_paths prod |w|``;
* ``"entropy"``: ``H(x) = U/Z + log Z`` of the path distribution ``p(pi) ~ |w_pi|`` (nats);
* ``"maxpath"``: the best path's value (``sign``: ``"abs"`` = max |prod w|, ``"positive"`` = M+, ``"negative"`` =
  M-; ``granularity``: ``"scalar"`` or the paper's ``"tensor"``).

:func:`run` gives the richer :class:`SemiringResult` (raw semiring values, the tape, back-pointers for paths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import plan as _plan
from . import traced_sweep
from . import rules as _rules  # noqa: F401  (fills the rule table)
from .decompositions import Decomposition, resolve
from .errors import InvalidInputError
from .graph.compiled import record_compiled
from .graph.compiled import refused as refused_forward
from .graph.model_state import attribution_mode
from .graph.recorder import record
from .graph.tape import Tape
from .rules.registry import DEFAULT_RULES, RuleSet
from .rules.weight_cache import sweep_scope
from .semirings import SEMIRINGS
from .traversal import sweep


@dataclass
class SemiringResult:
    """Everything one sweep produced. ``values``: finalized tensors shaped like the inputs; ``raw``: the semiring's
    own values per input (``None`` where no path reaches it); ``trail``: node id -> value of every node (only when
    back-pointers were requested; a maxpath node's pointers are read with ``trail[id].pointers("hi")``, see
    :class:`~inseq_semiring.semirings.maxpath.MaxValue`); ``semiring``: the semiring object (it knows how to read
    ``raw``)."""

    values: tuple[torch.Tensor, ...]
    raw: tuple[Any, ...]
    tape: Tape
    semiring: Any
    trail: dict[int, Any] = field(default_factory=dict)


def make_semiring(semiring: str, *, sign: str = "abs", granularity: str = "scalar", backpointers: bool = False):
    if semiring not in SEMIRINGS:
        raise InvalidInputError(f"unknown semiring {semiring!r}", where="semiring_backward",
                                fix=f"use one of {sorted(SEMIRINGS)}")
    if semiring == "maxpath":
        return SEMIRINGS[semiring](sign=sign, granularity=granularity, backpointers=backpointers)
    if sign != "abs" or granularity != "scalar":
        raise InvalidInputError(
            f"sign={sign!r} / granularity={granularity!r} apply to the maxpath semiring only, not {semiring!r}",
            where="semiring_backward", fix="leave sign='abs' and granularity='scalar' for this semiring")
    return SEMIRINGS[semiring]()


def _check_inputs(inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if inputs is None or not isinstance(inputs, (tuple, list)):
        raise InvalidInputError(f"inputs must be a tensor or a tuple/list of tensors, got {type(inputs).__name__}",
                                where="semiring_backward(fn, inputs, ...)",
                                fix="pass the tensor(s) to attribute to, e.g. the input embeddings")
    inputs = tuple(inputs)
    if not inputs:
        raise InvalidInputError("no inputs given", where="semiring_backward",
                                fix="pass the tensor(s) to attribute to, e.g. the input embeddings")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InvalidInputError(f"input {i} is not a floating-point tensor ({type(x).__name__})",
                                    where="semiring_backward",
                                    fix="attribute to floating tensors such as input embeddings, not token ids")
        if x.numel() == 0:
            raise InvalidInputError(f"input {i} is empty (shape {tuple(x.shape)})", where="semiring_backward",
                                    fix="pass a non-empty input")
        if not bool(torch.isfinite(x).all()):
            raise InvalidInputError(f"input {i} contains NaN or inf", where="semiring_backward",
                                    fix="check the model's embeddings / the input values")
    return inputs


def _check_root(tape: Tape) -> None:
    root = tape.root
    if root.dim() > 1:
        raise InvalidInputError(f"fn returned a tensor of shape {tuple(root.shape)}; the root must be a scalar or "
                                "one scalar per batch row (shape (B,))", where="semiring_backward",
                                fix="reduce the output to the quantity to explain, e.g. out.logits[0, -1, token]")
    if not bool(torch.isfinite(root).all()):
        raise InvalidInputError("the model's output (the root) is NaN or inf", where="semiring_backward",
                                fix="check the model and its inputs; a NaN forward pass has no gradient graph")
    if tape.root_id is None:
        raise InvalidInputError("fn's output does not depend on the inputs", where="semiring_backward",
                                fix="make sure fn uses the given input tensors (e.g. inputs_embeds=...)")


def run(
    fn: Callable[..., torch.Tensor],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    semiring: str = "gradient",
    *,
    sign: str = "abs",
    granularity: str = "scalar",
    backpointers: bool = False,
    model: torch.nn.Module | None = None,
    rules: RuleSet = DEFAULT_RULES,
    tape: Tape | None = None,
    decomposition: str | Decomposition | None = None,
    custom_functions: str = "error",
    plans: bool = True,
    compile: bool | str = False,
) -> SemiringResult:
    """Record ``fn(*inputs)`` (or reuse ``tape``) and sweep it once with the named semiring.

    ``model`` (optional): recorded module paths use its module names, and while recording it is put in eval mode
    (restored afterwards, also on error; fused SDPA attention is recorded as eager attention, see
    :mod:`~inseq_semiring.decompositions.attention`). ``backpointers``: keep every node's value and
    back-pointers in ``result.trail`` (maxpath) for :mod:`~inseq_semiring.paths`. ``decomposition``: how composite
    operators are split into the graph's operators (``"aten"``, the default; ``"paper"``: Du et al.'s library;
    ``"primitive"``; see :mod:`~inseq_semiring.decompositions`). It changes flow, entropy and tensor-granularity
    maxpath, never the gradient. ``custom_functions``: a custom ``torch.autograd.Function`` on the path without a
    registered rule (:func:`~inseq_semiring.rules.registry.function_rule`) raises (``"error"``, the default) or has
    its forward operators differentiated, with a warning (``"forward"``). ``plans`` (with ``model``): reuse the
    structure of an earlier call of the same input shapes (:mod:`~inseq_semiring.plan`; same results, bit for bit);
    False: always the one-off path. ``compile`` (with ``model``): capture the forward once with TorchDynamo and
    replay its operators without the recorder while Dynamo's guards hold (:mod:`~inseq_semiring.graph.compiled`;
    same results, bit for bit; a forward it cannot replay faithfully is recorded, with a warning). ``compile="all"``:
    that, and on the CPU the sweep of each plan traced once into TorchScript and replayed by its interpreter
    (:mod:`~inseq_semiring.traced_sweep`; gradient, flow, entropy and abs maxpath, back-pointers included, on tapes
    whose tensors have at most ``traced_sweep.MAX_TRACED_ELEMENTS`` elements; other calls as ``compile=True``; the
    values of the sweep's device branch, the same bits on every call, within float rounding of the default; meant
    for small models and short inputs, where the per-operator cost dominates).
    """
    ring = make_semiring(semiring, sign=sign, granularity=granularity, backpointers=backpointers)
    inputs = _check_inputs(inputs)
    plan_key = plan = None
    if compile not in (False, True, "all"):
        raise InvalidInputError(f"compile={compile!r} is not one of False, True, 'all'", where="run(compile=...)",
                                fix="compile=True (the forward) or compile='all' (the forward and the sweep)")
    if compile and (model is None or tape is not None):
        raise InvalidInputError("compile=True needs the model (model=...) and no given tape", where="run(compile=True)",
                                fix="pass model=<the model fn runs>, or leave compile out")
    if tape is None:
        if model is not None and plans:
            decomposition = resolve(decomposition)
            plan_key = _plan.key(inputs, rules, decomposition, custom_functions)
            plan = _plan.PLANS.get(model, plan_key)
        forward = record_compiled if compile else record
        with attribution_mode(model):
            tape = forward(fn, inputs, model=model, rules=rules, decomposition=decomposition,
                           custom_functions=custom_functions, plan=plan)
    elif decomposition is not None and resolve(decomposition).name != tape.decomposition:
        raise InvalidInputError(f"the given tape was recorded with decomposition {tape.decomposition!r}, not "
                                f"{resolve(decomposition).name!r}", where="run(tape=...)",
                                fix="record a new tape (pass tape=None) or leave decomposition out")
    _check_root(tape)
    replay = tape.plan if plan is not None and tape.plan is plan else None
    memo = {} if replay is None else replay.memo()

    def sweep_raw(t: Tape) -> tuple:
        """The raw value of each input and, with back-pointers, the trail as (node id, value) pairs in the order
        the sweep completed them (fixed by the plan, so a traced sweep gives them back the same way)."""
        trail: dict[int, Any] = {}
        env = sweep(t, ring, ring.seed(t.root), rules=rules, on_complete=trail.__setitem__ if backpointers else None,
                    plan_rules=None if replay is None else replay.rules)
        return tuple(env.get(tid) for tid in t.input_ids), tuple(trail.items())

    with torch.no_grad(), sweep_scope(memo):
        if compile == "all" and traced_sweep.traces(semiring, sign) and traced_sweep.fits(tape):
            recurs = tape.forward == "compiled" or refused_forward(model, fn) is not None
            raw, trail = traced_sweep.swept(replay, (semiring, sign, granularity, backpointers), tape, sweep_raw,
                                            recurs=recurs)
        else:
            raw, trail = sweep_raw(tape)
        values = tuple(ring.finalize(r, x) for r, x in zip(raw, inputs))
    if plan_key is not None and replay is None:  # first call of this key, or the graph changed: (re)plan
        _plan.PLANS.put(model, plan_key, _plan.build(tape, rules, memo), keep=(rules, decomposition))
    return SemiringResult(values, raw, tape, ring, dict(trail))


def semiring_backward(
    fn: Callable[..., torch.Tensor],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    semiring: str,
    *,
    sign: str = "abs",
    granularity: str = "scalar",
    decomposition: str | Decomposition | None = None,
    model: torch.nn.Module | None = None,
    custom_functions: str = "error",
    compile: bool | str = False,
) -> tuple[torch.Tensor, ...]:
    """One reverse sweep of ``semiring`` from the root ``fn(*inputs)``; one tensor per input, shaped like it.
    ``decomposition``, ``model``, ``custom_functions``, ``compile``: see :func:`run`."""
    return run(fn, inputs, semiring, sign=sign, granularity=granularity, decomposition=decomposition, model=model,
               custom_functions=custom_functions, compile=compile).values


def sweep_tape(
    tape: Tape,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    semiring: str = "gradient",
    *,
    sign: str = "abs",
    granularity: str = "scalar",
    backpointers: bool = False,
    rules: RuleSet = DEFAULT_RULES,
) -> SemiringResult:
    """The sweep of :func:`run` alone, on a tape already recorded from ``inputs`` (no forward pass); with the
    tape's plan (``tape.plan``, set when the recording matched one) as :func:`run` would replay it. For measuring
    the sweep on its own (``benchmarks/bench_sweep.py``); the same values as :func:`run`, bit for bit."""
    ring = make_semiring(semiring, sign=sign, granularity=granularity, backpointers=backpointers)
    inputs = _check_inputs(inputs)
    _check_root(tape)
    trail: dict[int, Any] = {}
    replay = tape.plan
    with torch.no_grad(), sweep_scope({} if replay is None else replay.memo()):
        env = sweep(tape, ring, ring.seed(tape.root), rules=rules, on_complete=trail.__setitem__ if backpointers
                    else None, plan_rules=None if replay is None else replay.rules)
        raw = tuple(env.get(tid) for tid in tape.input_ids)
        values = tuple(ring.finalize(r, x) for r, x in zip(raw, inputs))
    return SemiringResult(values, raw, tape, ring, trail)

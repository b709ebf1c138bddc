"""Captum front end: :class:`SemiringAttribution`, a ``captum.attr.GradientAttribution`` backed by the engine.

``SemiringAttribution(forward_func).attribute(inputs, target=..., additional_forward_args=..., semiring="maxpath")``
records ``forward_func(*inputs, *additional_forward_args)``, selects the root with ``target`` (Captum's conventions,
see :func:`select_root`) and sweeps it once with the named semiring. The result is shaped like ``inputs`` (a tensor
for a tensor, a tuple for a tuple), exactly like Captum's own gradient methods.

The root must be a scalar or one scalar per batch row, shape ``(B,)``, and row ``b`` may depend only on row ``b`` of
the inputs: the whole batch is swept in one pass. This module imports no Inseq.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from captum.attr import GradientAttribution

from ..api import SemiringResult, run
from ..errors import InvalidInputError
from ..semirings import SEMIRINGS

__all__ = ["SemiringAttribution", "select_root"]

_WHERE = "SemiringAttribution.attribute"


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, tuple) else (x,)


def select_root(output: Any, target: Any = None) -> torch.Tensor:
    """Select the root from ``output`` with a Captum-style ``target``; return a scalar or a ``(B,)`` tensor.

    * ``None``: ``output`` itself (a ``(B, 1)`` output is squeezed to ``(B,)``);
    * ``int`` or 0-dim tensor ``t``: ``output[..., t]`` (the last dimension);
    * ``tuple`` of ints: the trailing dimensions, ``output[(..., *t)]``;
    * 1-D tensor or list of ints (one per row): ``output[b, t[b]]`` for a 2-D output;
    * list of tuples (one per row): ``output[b][t[b]]``.
    """
    if not isinstance(output, torch.Tensor):
        raise InvalidInputError(f"the forward function returned a {type(output).__name__}, not a tensor",
                                where=_WHERE, fix="make forward_func return the model output as a tensor")
    out = output
    if target is None:
        pass
    elif isinstance(target, int) or (isinstance(target, torch.Tensor) and target.numel() == 1 and target.dim() == 0):
        out = output[..., int(target)]
    elif isinstance(target, tuple):
        out = output[(Ellipsis, *target)]
    elif isinstance(target, (list, torch.Tensor)):
        rows = target.tolist() if isinstance(target, torch.Tensor) else list(target)
        if output.dim() == 0 or len(rows) != output.shape[0]:
            raise InvalidInputError(f"target has {len(rows)} entries but the output has shape {tuple(output.shape)}",
                                    where=_WHERE, fix="give one target per batch row")
        picked = [output[b][tuple(t) if isinstance(t, (tuple, list)) else int(t)] for b, t in enumerate(rows)]
        out = torch.stack(picked)
    else:
        raise InvalidInputError(f"unsupported target of type {type(target).__name__}", where=_WHERE,
                                fix="use None, an int, a tuple of ints, a list or a 1-D tensor of per-row indices")
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() > 1:
        raise InvalidInputError(f"the selected output has shape {tuple(out.shape)}; the root must be a scalar or one "
                                "scalar per batch row (shape (B,))", where=_WHERE,
                                fix="pass a target selecting one output per row, e.g. target=<class index>")
    return out


class SemiringAttribution(GradientAttribution):
    """Semiring backpropagation as a Captum attribution method.

    Args:
        forward_func: the model or any callable ``forward_func(*inputs, *additional_forward_args)``.
        semiring: default semiring of :meth:`attribute` (``"maxpath"``, ``"entropy"``, ``"flow"``, ``"gradient"``).
        sign, granularity: default maxpath options (see :mod:`inseq_semiring.semirings.maxpath`).
        model: module whose sub-module names label the recorded operators (default: ``forward_func`` if it is a
            ``torch.nn.Module``); only used in error messages and back-pointer paths.
    """

    def __init__(self, forward_func: Callable, semiring: str = "maxpath", sign: str = "abs",
                 granularity: str = "scalar", model: torch.nn.Module | None = None) -> None:
        super().__init__(forward_func)
        if semiring not in SEMIRINGS:
            raise InvalidInputError(f"unknown semiring {semiring!r}", where="SemiringAttribution",
                                    fix=f"use one of {sorted(SEMIRINGS)}")
        self.semiring, self.sign, self.granularity = semiring, sign, granularity
        self.model = model if model is not None else (forward_func if isinstance(forward_func, torch.nn.Module)
                                                      else None)

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def has_convergence_delta(self) -> bool:
        return False

    def root_fn(self, target: Any = None, additional_forward_args: Any = None) -> Callable[..., torch.Tensor]:
        """``fn(*inputs) -> root``: the forward output selected by ``target``."""
        extra = _as_tuple(additional_forward_args)

        def fn(*inputs: torch.Tensor) -> torch.Tensor:
            return select_root(self.forward_func(*inputs, *extra), target)

        return fn

    def attribute_result(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        target: Any = None,
        additional_forward_args: Any = None,
        semiring: str | None = None,
        sign: str | None = None,
        granularity: str | None = None,
        **kw: Any,
    ) -> SemiringResult:
        """Like :meth:`attribute` but returns the engine's full :class:`~inseq_semiring.api.SemiringResult`
        (``raw`` semiring values, the tape, back-pointers with ``backpointers=True``). ``kw`` goes to
        :func:`inseq_semiring.api.run` (``backpointers``, ``tape``, ``rules``)."""
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        kw.setdefault("model", self.model)
        return run(self.root_fn(target, additional_forward_args), inputs, semiring or self.semiring,
                   sign=sign or self.sign, granularity=granularity or self.granularity, **kw)

    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        semiring: str | None = None,
        sign: str | None = None,
        granularity: str | None = None,
        **kw: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """One reverse sweep of ``semiring`` from the selected root; values shaped like ``inputs``.

        ``"gradient"`` is d root / d x, ``"flow"`` the total absolute path weight Z, ``"entropy"`` the entropy of the
        path distribution (nats), ``"maxpath"`` the best path's value (``sign``, ``granularity``: the maxpath
        options). Unused arguments of other Captum methods (``baselines``, ...) are not accepted.
        """
        result = self.attribute_result(inputs, target, additional_forward_args, semiring, sign, granularity, **kw)
        return result.values[0] if isinstance(inputs, torch.Tensor) else tuple(result.values)

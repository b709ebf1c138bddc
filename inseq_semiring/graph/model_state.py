"""Reversible changes to the user's model while it is being attributed.

:func:`attribution_mode` puts a model in eval mode for the duration of the block and restores every module's
training flag in ``finally``, so an exception midway leaves the model exactly as it was. The attention
implementation is left alone where the recorder can decompose it (``"eager"``, and ``"sdpa"``: fused attention is
recorded as eager attention's operators, see :mod:`inseq_semiring.decompositions.attention`); only other
implementations (e.g. ``"flash_attention_2"``, ``"flex_attention"``, whose kernels are not ATen operators the recorder
can split) are switched to ``"eager"`` for the block and switched back afterwards.

Reentrant and thread-safe: concurrent calls on one model share one switch. A per-model lock guards a reference
count; the first call to enter saves the state and switches, the last one to leave restores it.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

#: attention implementations the recorder decomposes (no switch needed)
DECOMPOSABLE_ATTENTION = ("eager", "sdpa")


def _attn_impl(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def _set_attn_impl(model: torch.nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


@dataclass
class _Switch:
    """The saved state of one model while at least one attribution runs on it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    count: int = 0
    training: dict = field(default_factory=dict)
    attn: str | None = None


_SWITCHES: "weakref.WeakKeyDictionary[torch.nn.Module, _Switch]" = weakref.WeakKeyDictionary()
_SWITCHES_LOCK = threading.Lock()  # guards _SWITCHES itself (creating a model's entry)


def _switch_for(model: torch.nn.Module) -> _Switch:
    with _SWITCHES_LOCK:
        switch = _SWITCHES.get(model)
        if switch is None:
            switch = _SWITCHES[model] = _Switch()
        return switch


def _enter(model: torch.nn.Module, switch: _Switch) -> None:
    switch.training = {m: m.training for m in model.modules()}
    switch.attn = _attn_impl(model)
    if any(switch.training.values()) or getattr(model, "use_kernels", False):  # eval() of an eval model: a no-op
        model.eval()
    if switch.attn is not None and switch.attn not in DECOMPOSABLE_ATTENTION:
        _set_attn_impl(model, "eager")


def _leave(model: torch.nn.Module, switch: _Switch) -> None:
    try:
        if switch.attn is not None and _attn_impl(model) != switch.attn:
            _set_attn_impl(model, switch.attn)
    finally:
        for module, mode in switch.training.items():
            if module.training is not mode:  # only what eval() changed (a Module attribute write is not cheap)
                module.training = mode
        switch.training, switch.attn = {}, None


@contextmanager
def attribution_mode(model: torch.nn.Module | None):
    """Eval mode (+ eager attention where the model's cannot be decomposed) for the block; restored afterwards,
    when the last concurrent block on the same model ends."""
    if model is None:
        yield model
        return
    switch = _switch_for(model)
    with switch.lock:
        if switch.count == 0:
            _enter(model, switch)
        switch.count += 1
    try:
        yield model
    finally:
        with switch.lock:
            switch.count -= 1
            if switch.count == 0:
                _leave(model, switch)

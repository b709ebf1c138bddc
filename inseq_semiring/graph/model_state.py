"""Reversible changes to the user's model while it is being attributed.

:func:`attribution_mode` switches a model to eval mode and to the eager attention implementation (fused SDPA /
flash kernels are one opaque ATen call; eager attention exposes the matmul-softmax-matmul graph), and restores
both in ``finally``, so an exception midway leaves the model exactly as it was.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _attn_impl(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


@contextmanager
def attribution_mode(model: torch.nn.Module | None):
    """Eval mode + eager attention for the duration of the block; the previous state is restored afterwards."""
    if model is None:
        yield model
        return
    training = {m: m.training for m in model.modules()}
    attn = _attn_impl(model)
    try:
        model.eval()
        if attn is not None and attn != "eager":
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")
            else:
                model.config._attn_implementation = "eager"
        yield model
    finally:
        if attn is not None and _attn_impl(model) != attn:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(attn)
            else:
                model.config._attn_implementation = attn
        for module, mode in training.items():
            module.training = mode

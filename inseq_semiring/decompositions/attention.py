"""Fused attention as the operators of eager attention, so SDPA-loaded models record without switching.

``scaled_dot_product_attention`` and its backends (CPU flash, CUDA flash / memory-efficient / cuDNN, the math
reference) are one ATen call each, with no rule. Every entry below computes, with ATen operators that have rules,
what Hugging Face's eager attention computes:

``S = (q k^T) * scale`` (``scale`` defaults to ``1/sqrt(E)``); ``S = S + mask`` for a float mask, or
``S = where(mask, S, -inf)`` for a boolean one, and the upper triangle set to ``-inf`` when ``is_causal``;
``P = softmax(S)`` (rows that are all ``-inf`` give 0, as ``_safe_softmax``); ``out = P v``.
With ``enable_gqa`` (or fewer key/value heads than query heads, as the fused kernels accept) each key/value head is
repeated for its group of query heads (``expand`` + ``reshape``, as eager's ``repeat_kv``).

Outputs besides ``out`` (log-sum-exp, random-number state, sequence bookkeeping) are returned as constants of the
shapes the kernels give; nothing on the attribution path reads them. Dropout must be 0 (eval mode): a dropout mask
drawn inside the kernel cannot be reproduced, so ``dropout_p > 0`` raises.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from . import bind

aten = torch.ops.aten


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, Hk, S, E) -> (B, Hk * groups, S, E)``, head ``h`` repeated ``groups`` times in a row (``repeat_kv``)."""
    if groups == 1:
        return t
    b, h, s, e = t.shape[-4], t.shape[-3], t.shape[-2], t.shape[-1]
    wide = aten.expand.default(aten.unsqueeze.default(t, -3), [b, h, groups, s, e])
    return aten.reshape.default(wide, [b, h * groups, s, e])


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, E) @ (B, H, E, S)`` as one ``bmm`` over the flattened batch and heads (as eager's matmul)."""
    lead = list(a.shape[:-2])
    n = 1
    for size in lead:
        n *= int(size)
    flat = aten.bmm.default(aten.reshape.default(a, [n, a.shape[-2], a.shape[-1]]),
                            aten.reshape.default(b, [n, b.shape[-2], b.shape[-1]]))
    return aten.reshape.default(flat, lead + [a.shape[-2], b.shape[-1]])


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with eager attention's operators (see the module docstring)."""
    if dropout_p:
        raise UnsupportedModelError(
            f"fused attention with dropout_p={dropout_p} draws its dropout mask inside the kernel",
            where="aten.scaled_dot_product_attention", fix="attribute in eval mode (pass model=..., or model.eval())")
    if query.dim() != 4 or key.dim() != 4:
        raise UnsupportedModelError(f"fused attention on {query.dim()}-d inputs", where="scaled_dot_product_attention",
                                    fix="load the model with attn_implementation='eager'")
    groups = query.shape[-3] // key.shape[-3]
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    e = query.shape[-1]
    factor = scale if scale is not None else e ** -0.5
    scores = aten.mul.Scalar(_matmul(query, aten.transpose.int(key, -2, -1)), factor)
    length, source = scores.shape[-2], scores.shape[-1]
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = aten.where.self(keep, scores, torch.full((), float("-inf"), dtype=scores.dtype,
                                                          device=scores.device))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = aten.where.self(attn_mask, scores, torch.full((), float("-inf"), dtype=scores.dtype,
                                                                   device=scores.device))
        else:
            scores = aten.add.Tensor(scores, attn_mask)
    probs = aten._safe_softmax.default(scores, -1)
    return _matmul(probs, value)


def _lse(query):
    """The kernels' log-sum-exp output ``(B, H, L)``, as a constant (nothing on the attribution path reads it)."""
    return torch.zeros(list(query.shape[:-1]), dtype=torch.float32, device=query.device)


def sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale)


def math(query, key, value, attn_mask, dropout_p, is_causal, dropout_mask, scale, enable_gqa):
    out = attention(query, key, value, attn_mask, dropout_p, is_causal, scale)
    return out, torch.zeros(out.shape[:-1] + (key.shape[-2],), dtype=out.dtype, device=out.device)


def flash_for_cpu(query, key, value, dropout_p, is_causal, attn_mask, scale):
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale), _lse(query)


def _cuda_tail(query, key, out):
    """The bookkeeping outputs of the CUDA flash / cuDNN kernels, as constants."""
    empty = torch.empty(0, dtype=torch.int64, device=query.device)
    return (empty, empty, query.shape[-2], key.shape[-2], empty, empty, torch.empty(0, dtype=out.dtype,
                                                                                    device=query.device))


def flash(query, key, value, dropout_p, is_causal, return_debug_mask, scale):
    out = attention(query, key, value, None, dropout_p, is_causal, scale)
    return (out, _lse(query)) + _cuda_tail(query, key, out)


def efficient(query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, scale):
    out = attention(query, key, value, attn_bias, dropout_p, is_causal, scale)
    seed = torch.zeros((), dtype=torch.int64, device=query.device)
    return out, _lse(query), seed, seed


def fused_with_bias(query, key, value, attn_bias, dropout_p, is_causal, return_debug_mask, scale,
                    compute_log_sumexp=None):
    out = attention(query, key, value, attn_bias, dropout_p, is_causal, scale)
    return (out, _lse(query)) + _cuda_tail(query, key, out)


def cudnn(query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, scale):
    return fused_with_bias(query, key, value, attn_bias, dropout_p, is_causal, return_debug_mask, scale)


TABLE = {
    aten.scaled_dot_product_attention.default: sdpa,
    aten._scaled_dot_product_attention_math.default: math,
    aten._scaled_dot_product_flash_attention_for_cpu.default: flash_for_cpu,
    aten._scaled_dot_product_flash_attention.default: flash,
    aten._scaled_dot_product_efficient_attention.default: efficient,
    aten._scaled_dot_product_cudnn_attention.default: cudnn,
    aten._scaled_dot_product_fused_attention_overrideable.default: fused_with_bias,
}

def _entry(op, f):
    return lambda *args, **kwargs: f(**bind(op, args, kwargs))


ENTRIES = {op: _entry(op, f) for op, f in TABLE.items()}

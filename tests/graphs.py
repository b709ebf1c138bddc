"""Tiny hand-built computation graphs (float64) for exact checks against path enumeration.

Each entry of :data:`GRAPHS` is ``name -> (fn, inputs)``; ``fn(*inputs)`` returns a scalar root. They cover fan-out
(a tensor read by several operators), a tensor passed twice to one operator (``x * x``), skip connections,
``tanh``/``gelu``/``relu``/``sigmoid``, ``mul``/``add``/``sub``/``div``, matrix products with and without bias,
reductions, ``where``/``masked_fill``, row-wise ``softmax``/``layer_norm``/``log_softmax``, and a one-layer attention
block with 2 tokens (hidden 3: over 2 features layer norm is constant, its Jacobian
rounding noise, so hidden 2 is only used without layer norm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_G = torch.Generator().manual_seed(20230709)


def _w(*shape, scale: float = 0.8) -> torch.Tensor:
    return torch.randn(*shape, generator=_G, dtype=torch.float64) * scale


# -- MLPs --------------------------------------------------------------------------------------------------------

W1, B1, W2, W3 = _w(3, 3), _w(1, 3), _w(3, 3), _w(3, 2)


def mlp_fanout(x):
    """x [1, 3]; h feeds a matmul and a mul; x feeds mul(x, x) (two edges per element) and the first layer."""
    h = torch.tanh(x @ W1 + B1)
    a = F.gelu(h @ W2)
    y = a * h + x * x
    return (y @ W3).sum()


A1, C1, A2, V = _w(3, 3), _w(3), _w(3, 3), _w(3, 1)


def mlp_skip(x):
    """Residual stream: each block adds to its input; sub, div by a tensor, sigmoid, addmm (F.linear + bias)."""
    h1 = x + torch.tanh(F.linear(x, A1, C1))
    h2 = h1 + F.gelu(h1 @ A2) * h1
    h3 = h2 - x / (1.5 + x * x)
    return (torch.sigmoid(h3) @ V).squeeze()


U1, U2 = _w(2, 3), _w(3, 2)


def two_inputs(x, y):
    """Two inputs meeting in a product and a skip; x [1, 2], y [1, 3]."""
    h = torch.tanh(x @ U1) * y
    return ((h @ U2) * x).sum() + (y * 0.5).sum()


R1 = _w(3, 3)


def relu_zero_edges(x):
    """relu below 0 gives exact-zero (but structural) edges; sum/mean reductions."""
    h = torch.relu(x @ R1)
    return h.sum() - 0.7 * (x * h).mean() + (2.0 * x).sum()


MASK = torch.tensor([[True, False, True]])


def select(x):
    """where / masked_fill: the unselected side does not feed the output; x also reaches it another way."""
    a = torch.where(MASK, torch.tanh(x), -3.0 * x)
    b = x.masked_fill(MASK, 0.25)
    return (a * b).sum() + (a @ W3).sum()


def rowwise(x):
    """softmax, log_softmax and layer_norm over the last dim (dense row Jacobians), x [2, 3]."""
    p = torch.softmax(x @ W1, dim=-1)
    ln = F.layer_norm(x, (3,), weight=torch.tensor([1.2, -0.7, 0.9], dtype=torch.float64),
                      bias=torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64))
    lp = torch.log_softmax(ln * p, dim=-1)
    return lp[:, 0].sum() + (p * ln).sum()


# -- one attention block -------------------------------------------------------------------------------------------

def make_attention(d: int):
    wq, wk, wv, wo, wf = _w(d, d), _w(d, d), _w(d, d), _w(d, d), _w(d, 1)
    gamma, beta = 1 + _w(d, scale=0.2), _w(d, scale=0.2)

    def attention(x):
        """x [2 tokens, d]: pre-LN single-head self-attention with a residual; root: a readout of the last token."""
        h = F.layer_norm(x, (d,), weight=gamma, bias=beta)
        q, k, v = h @ wq, h @ wk, h @ wv
        p = torch.softmax(q @ k.transpose(0, 1) / math.sqrt(d), dim=-1)
        y = x + (p @ v) @ wo
        return (y[-1:] @ wf).squeeze()

    return attention


def make_causal_attention(d: int):
    wq, wk, wv, wf = _w(d, d), _w(d, d), _w(d, d), _w(d, 1)
    causal = torch.triu(torch.full((2, 2), float("-inf"), dtype=torch.float64), diagonal=1)

    def causal_attention(x):
        """x [2 tokens, d], causal mask: exact-zero softmax entries, i.e. zero-weight structural edges."""
        s = (x @ wq) @ (x @ wk).transpose(0, 1) + causal
        p = torch.softmax(s, dim=-1)
        y = x + p @ (x @ wv)
        return (torch.tanh(y) @ wf).sum()

    return causal_attention


X13 = _w(1, 3, scale=1.0)
X23 = _w(2, 3, scale=1.0)
RELU_X = torch.tensor([[0.9, -1.3, 0.4]], dtype=torch.float64)

GRAPHS = {
    "mlp_fanout": (mlp_fanout, (X13,)),
    "mlp_skip": (mlp_skip, (X13,)),
    "two_inputs": (two_inputs, (_w(1, 2, scale=1.0), _w(1, 3, scale=1.0))),
    "relu_zero_edges": (relu_zero_edges, (RELU_X,)),
    "select": (select, (X13,)),
    "rowwise": (rowwise, (X23,)),
    "attention_d3": (make_attention(3), (_w(2, 3, scale=1.0),)),
    "causal_attention_d2": (make_causal_attention(2), (_w(2, 2, scale=1.0),)),
}

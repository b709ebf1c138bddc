"""The signed scalar max-path pulls that avoid dense row Jacobians and Python loops equal the dense formulas.

* rank-one rows (softmax, log-softmax) and layer norm: :mod:`inseq_semiring.semirings.signed_rows` (C++ and torch
  backends) against the dense candidates ``J_ij M_i`` (``_signed_rowdense_dense``) on random rows with absent
  entries, fully absent rows, integer-valued ties, exact zeros in ``v`` (masked softmax) and negative values;
* matrix products with partly reachable slices against brute-force masked candidates;
* end to end on tiny models against the dense-Jacobian reference, with and without back-pointers.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import inseq_semiring as isr
from inseq_semiring.kernels.signed_rowcore import active_backend, signed_core_pull
from inseq_semiring.rules.jacobians import LayerNormRow, MatMul, RowDense
from inseq_semiring.semirings.base import _first_extreme
from inseq_semiring.semirings.maxpath import _candidates, _signed_matmul, _signed_pull, _signed_rowdense_dense
from inseq_semiring.semirings.signed_rows import signed_layernorm, signed_rank1
from reference import dense
from shared import assert_close_scaled

DTYPES = [torch.float32, torch.float64]


def _values(rows: int, n: int, dtype, *, ties: bool, seed: int, absent: float = 0.3):
    """M+ >= M- with absent entries (-inf / +inf), row 0 fully absent; ``ties``: small integers (many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rows, n, generator=g, dtype=dtype), torch.randn(rows, n, generator=g, dtype=dtype)
    if ties:
        a, b = a.round(), b.round()
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    hi[1] = lo[1] = hi[1].abs().neg()  # a row where M+ = M- < = 0 (near the root)
    gone = torch.rand(rows, n, generator=g) < absent
    gone[0] = True
    return hi.masked_fill(gone, float("-inf")), lo.masked_fill(gone, float("inf")), g


def _assert_same_pull(new, old, hi, what):
    """Values close (the fast pulls round ``v_j (u_i m)`` where the dense one rounds ``(u_i v_j) m``); the
    winners equal wherever a value exists (the ties here are exact, so the smallest index must win)."""
    for k, (a, b) in enumerate(zip(new, old)):
        if k % 2 == 0:
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{what}: reachability"
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
        else:
            present = torch.isfinite(new[k - 1])
            assert torch.equal(a[present], b[present]), f"{what}: winners differ"


def _softmax_kind(g, rows, n, dtype):
    y = torch.softmax(torch.randn(rows, n, generator=g, dtype=dtype) * 3, -1)
    y[2, : n // 2] = 0  # a masked row: v_j = 0 (candidate 0 from the first reachable i != j)
    y[3] = 0  # a fully masked row (_safe_softmax): every entry 0
    y[3, 0] = 1
    return RowDense(y, (-y).unsqueeze(0), y.unsqueeze(0))


def _log_softmax_kind(g, rows, n, dtype):
    s = torch.log_softmax(torch.randn(rows, n, generator=g, dtype=dtype), -1)
    return RowDense(torch.ones_like(s), -torch.ones_like(s).unsqueeze(0), s.exp().unsqueeze(0))


def _integer_rank1_kind(g, rows, n, dtype):
    """Small-integer d, u, v of both signs (and zeros): every candidate exact, so every tie is a real tie."""
    d, u, v = (torch.randint(-2, 3, (rows, n), generator=g).to(dtype) for _ in range(3))
    return RowDense(d, u.unsqueeze(0), v.unsqueeze(0))


def _backends():
    return ["cpp", "torch"] if active_backend("cpu") == "cpp" else ["torch"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("make", [_softmax_kind, _log_softmax_kind, _integer_rank1_kind],
                         ids=["softmax", "log_softmax", "integers"])
@pytest.mark.parametrize("n", [1, 2, 17])
def test_rank1_pull_equals_the_dense_candidates(make, ties, dtype, n):
    hi, lo, g = _values(6, n, dtype, ties=ties, seed=n)
    kind = make(g, 6, n, dtype) if n > 3 or make is not _softmax_kind else _log_softmax_kind(g, 6, n, dtype)
    old = _signed_rowdense_dense(kind, hi, lo)
    results = {}
    for backend in ["cpp", "torch"]:
        results[backend] = signed_rank1(kind, hi, lo, backend=None if backend == "cpp" else "torch")
        _assert_same_pull(results[backend], old, hi, f"{make.__name__}/{backend}")
    for a, b in zip(results["cpp"], results["torch"]):  # the two backends round alike
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("n", [1, 3, 40])
def test_layernorm_pull_equals_the_dense_candidates(ties, dtype, n):
    hi, lo, g = _values(7, n, dtype, ties=ties, seed=10 + n)
    x = torch.randn(7, n, generator=g, dtype=dtype)
    xh = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True).clamp_min(1e-3)
    gain = torch.randn(7, n, generator=g, dtype=dtype)
    gain[:, : n // 3] = 0  # zero weights: every candidate of those outputs is 0
    gain[4] = -gain[4].abs()  # negative gains swap M+ and M-
    kind = LayerNormRow(gain, xh)
    old = _signed_rowdense_dense(kind, hi, lo)
    _assert_same_pull(signed_layernorm(kind, hi, lo), old, hi, "layer norm")
    reach = torch.isfinite(hi)
    p = [torch.where(reach, f(gain * hi.nan_to_num(0, 0, 0), gain * lo.nan_to_num(0, 0, 0)), float("nan"))
         for f in (torch.maximum, torch.minimum)]
    outs = {b: signed_core_pull(xh, *p, _backend=b) for b in _backends()}
    for b, out in outs.items():
        assert torch.equal(out[1][reach.any(-1)] >= 0, torch.ones_like(out[1][reach.any(-1)], dtype=torch.bool)), b
    if len(outs) == 2:
        _assert_same_pull(outs["cpp"], outs["torch"], hi, "layer norm cpp vs torch")


def test_layernorm_kernel_ties_go_to_the_smallest_output():
    """A row with xh = 0 has the core ``I - 1 1^T / n``: every off-diagonal candidate of equal offers ties."""
    n = 9
    xh = torch.zeros(1, n, dtype=torch.float64)
    p = torch.full((1, n), 2.0, dtype=torch.float64)
    for b in _backends():
        hi, arg_hi, lo, arg_lo = signed_core_pull(xh, p, p, _backend=b)
        # off the diagonal: -2/n (the smallest offer, first i != j); the diagonal 2 (n-1)/n is the largest
        assert torch.equal(arg_hi[0], torch.arange(n)), b
        assert torch.equal(arg_lo[0], torch.tensor([1] + [0] * (n - 1))), b
        torch.testing.assert_close(lo[0], torch.full((n,), -2.0 / n, dtype=torch.float64))


def _brute_matmul(kind: MatMul, hi, lo):
    m, n = kind.mat_out[-2:]
    h3, l3 = hi.reshape(-1, m, n), lo.reshape(-1, m, n)
    w = kind.weight
    w3 = w.expand(h3.shape[0], *w.shape) if w.dim() == 2 else w
    if kind.left:  # out [B, m, k] over c
        k = w3.shape[-1]
        ch, cl = _candidates(h3.unsqueeze(-2).expand(-1, -1, k, -1), l3.unsqueeze(-2).expand(-1, -1, k, -1),
                             w3.transpose(-1, -2).unsqueeze(1))
    else:  # out [B, k, n] over r
        k = w3.shape[-2]
        ch, cl = _candidates(h3.transpose(-1, -2).unsqueeze(1).expand(-1, k, -1, -1),
                             l3.transpose(-1, -2).unsqueeze(1).expand(-1, k, -1, -1), w3.unsqueeze(2))
    (vh, ah), (vl, al) = _first_extreme(ch, True), _first_extreme(cl, False)
    bidx = torch.arange(h3.shape[0]).view(-1, 1, 1)
    if kind.left:
        flat = lambda a: (bidx * m + torch.arange(m).view(1, -1, 1)) * n + a  # noqa: E731
    else:
        flat = lambda a: (bidx * m + a) * n + torch.arange(n).view(1, 1, -1)  # noqa: E731
    return vh, flat(ah), vl, flat(al)


@pytest.mark.parametrize("sparse", [False, True], ids=["scattered", "mostly-absent-slices"])
@pytest.mark.parametrize("shape", ["rows", "left", "right"])
@pytest.mark.parametrize("values", ["integers", "same-sign", "equal"])
def test_matmul_pull_with_absent_elements_equals_brute_force(shape, values, sparse):
    """Absent elements enter the kernels as 0; where that could matter (ties, results <= 0) the pull must still
    give the masked max / min and the smallest index, as an explicit loop over the candidates does. With most
    slices absent, batched products go slice by slice over the live part (rows and contraction positions)."""
    bad = []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        B, m, n, k = 3, 5, 6, 4
        a = torch.randn(B, m, n, generator=g, dtype=torch.float64).round()
        b = torch.randn(B, m, n, generator=g, dtype=torch.float64).round()
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        if values == "same-sign":  # every M <= -0.5: most candidates through w > 0 are negative
            hi, lo = -lo.abs() - 0.5, -hi.abs() - 0.5
            hi, lo = torch.maximum(hi, lo), torch.minimum(hi, lo)
        elif values == "equal":
            lo = hi.clone()
        gone = torch.rand(B, m, n, generator=g) < 0.4
        gone[0, 0] = True  # a fully absent row
        if sparse:  # most slices (rows; columns for a right factor) and a contraction position absent throughout
            gone |= torch.rand(B, 1, n, generator=g) < 0.8 if shape == "right" else torch.rand(B, m, 1, generator=g) < 0.8
            gone[:, :, 1] |= shape != "right"
            gone[:, 1, :] |= shape == "right"
        hi, lo = hi.masked_fill(gone, float("-inf")), lo.masked_fill(gone, float("inf"))
        if shape == "rows":  # one 2-D weight (a linear layer): the live-row path
            hi, lo = hi.reshape(B * m, n), lo.reshape(B * m, n)
            kind = MatMul(torch.randn(n, k, generator=g, dtype=torch.float64).round(), True,
                          torch.Size([B * m, k]), torch.Size([B * m, n]))
        elif shape == "left":
            kind = MatMul(torch.randn(B, n, k, generator=g, dtype=torch.float64).round(), True,
                          torch.Size([B, m, k]), torch.Size([B, m, n]))
        else:
            kind = MatMul(torch.randn(B, k, m, generator=g, dtype=torch.float64).round(), False,
                          torch.Size([B, k, n]), torch.Size([B, m, n]))
        ref = _brute_matmul(kind, hi, lo)
        for index in (True, False):
            out = _signed_pull(kind, hi, lo, index=index)
            for q in (0, 2):
                if not torch.equal(out[q].reshape(ref[q].shape), ref[q]):
                    bad.append((seed, index, "values"))
            if not index:
                assert out[1] is None and out[3] is None
                continue
            full = torch.isfinite(hi).reshape(-1, *kind.mat_out[-2:]).all(-1 if kind.left else -2)
            part = (~full).unsqueeze(-1 if kind.left else -2).expand_as(ref[0])
            for q in (1, 3):  # fully reachable slices keep the kernel's own tie rule (as before)
                here = part & torch.isfinite(ref[q - 1])
                if not torch.equal(out[q].reshape(ref[q].shape)[here], ref[q][here]):
                    bad.append((seed, index, "winners"))
    assert not bad, bad
    assert _signed_matmul  # the batched path is the one exercised for "left" / "right"


def _small_gpt2(seq: int = 10):
    cfg = tf.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=30, n_positions=32, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg).double().eval()
    emb = torch.randn(1, seq, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, emb, (lambda e: torch.log_softmax(model(inputs_embeds=e).logits[:, -1], -1)[0, 3])


def _small_bert(seq: int = 9):
    cfg = tf.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(cfg).double().eval()
    emb = torch.randn(1, seq, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return model, emb, (lambda e: model(inputs_embeds=e).logits[0, 1])


@pytest.mark.parametrize("build", [_small_gpt2, _small_bert], ids=["gpt2-causal", "bert"])
def test_signed_maxpath_end_to_end_equals_the_dense_reference(build):
    """Two layers, longer rows than the tiny architectures: M+ / M- equal the dense-Jacobian reference, and the
    run without back-pointers (no index work) gives the same values as the one with them."""
    model, emb, fn = build()
    plus, minus = dense.maxpath_signed(dense.dense_graph(fn, (emb,), model=model))
    for sign, ref in (("positive", plus), ("negative", minus)):
        fast = isr.run(fn, emb, "maxpath", sign=sign, model=model).values
        assert_close_scaled(fast, ref, 1e-10, sign)
        with_bp = isr.run(fn, emb, "maxpath", sign=sign, backpointers=True, model=model).values
        for a, b in zip(fast, with_bp):
            assert torch.equal(a, b), sign

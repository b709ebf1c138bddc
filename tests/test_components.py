"""Component analysis (inseq_semiring.components): checked against brute-force path enumeration on small linear
blocks, plus structural facts on random BERT / GPT-2 / Llama models."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import inseq_semiring
from inseq_semiring.components import (BERT_SPLIT, GPT2_SPLIT, LLAMA_SPLIT, Branch, analyze_components,
                                       component_readout, fanout_node, layers_on_tape, make_split, split_for)

torch.set_num_threads(1)
H, T = 4, 3


class _Block(nn.Module):
    """x -> pre (unlabelled linear) -> qkv (fused) -> split -> q.a + k.b + v.c, plus a skip term x.d."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.pre = nn.Linear(H, H, bias=False)
        if fused:
            self.qkv = nn.Linear(H, 3 * H, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(H, H, bias=False) for _ in range(3))
        self.coef = nn.Parameter(torch.randn(4, H))

    def forward(self, x):
        a, b, c, d = self.coef
        if self.fused:
            q, k, v = self.qkv(self.pre(x)).split(H, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        return (q * a).sum() + (k * b).sum() + (v * c).sum() + (x * d).sum()


class _Toy(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.layers = nn.ModuleList([_Block(fused)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p))

    def forward(self, x):
        return self.layers[0](x)


FUSED_SPLIT = make_split({"Query": ("qkv", (0, 3)), "Key": ("qkv", (1, 3)), "Value": ("qkv", (2, 3)), "Skip": "="},
                         layer_pattern=r"layers\.{layer}", anchor="pre", name="toy-fused")
PLAIN_SPLIT = make_split({"Query": "q", "Key": "k", "Value": "v", "Skip": "="}, layer_pattern=r"layers\.{layer}",
                         anchor="q", name="toy")
LABELS = ("Query", "Key", "Value", "Skip")


def _paths_fused(block: _Block):
    """All path products from x[h] to the root, grouped by component: (component, h, product)."""
    wp, wq = block.pre.weight.detach(), block.qkv.weight.detach()  # [H, H], [3H, H]
    coef = block.coef.detach()
    out = []
    for h in range(H):
        for j, o in itertools.product(range(H), range(3 * H)):
            out.append((LABELS[o // H], h, float(wp[j, h] * wq[o, j] * coef[o // H, o % H])))
        out.append(("Skip", h, float(coef[3, h])))
    return out


def _paths_plain(block: _Block):
    coef = block.coef.detach()
    out = []
    for c, lin in enumerate((block.q, block.k, block.v)):
        w = lin.weight.detach()
        for h, o in itertools.product(range(H), range(H)):
            out.append((LABELS[c], h, float(w[o, h] * coef[c, o])))
    for h in range(H):
        out.append(("Skip", h, float(coef[3, h])))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("sign", ["positive", "abs", "negative"])
def test_scalar_readout_matches_brute_force(fused, sign, seed):
    """Scalar granularity: the credited value is the best path of the token's best hidden unit, and the winner
    is the component that path goes through (through an unlabelled linear and a fused split, with sign flips)."""
    torch.manual_seed(10 * seed + fused)
    model = _Toy(fused).eval()
    x = torch.randn(1, T, H)
    split = FUSED_SPLIT if fused else PLAIN_SPLIT
    (ro,) = analyze_components(model, x, model, split=split, sign=sign, granularity="scalar")
    paths = (_paths_fused if fused else _paths_plain)(model.layers[0])
    key = {"positive": lambda p: p[2], "abs": lambda p: abs(p[2]), "negative": lambda p: -p[2]}[sign]
    per_h = {h: max((p for p in paths if p[1] == h), key=key) for h in range(H)}
    h_star = max(range(H), key=lambda h: key(per_h[h]))
    comp, _, val = per_h[h_star]
    expect = abs(val) if sign == "abs" else val
    for row in range(T):  # the graph is linear, so every token sees the same weights
        assert ro.unit[row] == h_star
        assert ro.winner_labels()[row] == comp
        assert ro.credit[row, ro.labels.index(comp)] == pytest.approx(expect, rel=1e-5)
        assert float(ro.credit[row].abs().sum()) == pytest.approx(abs(expect), rel=1e-5)


@pytest.mark.parametrize("sign", ["positive", "abs"])
def test_tensor_readout_plain_is_per_consumer_gradient(sign):
    """Tensor granularity on direct consumers: each consumer offers its VJP (|W|-VJP for abs); the readout
    credits the largest offer of the best hidden unit to that consumer."""
    torch.manual_seed(5)
    model = _Toy(False).eval()
    blk = model.layers[0]
    x = torch.randn(1, T, H)
    (ro,) = analyze_components(model, x, model, split=PLAIN_SPLIT, sign=sign, granularity="tensor")
    f = (lambda w: w.abs()) if sign == "abs" else (lambda w: w)
    coef = blk.coef.detach()
    offers = torch.stack([f(coef[c]) @ f(lin.weight.detach()) for c, lin in enumerate((blk.q, blk.k, blk.v))]
                         + [f(coef[3])])  # [4, H]: consumer c's value at hidden unit h
    best_per_h, comp_per_h = offers.max(0)
    h_star = int(best_per_h.argmax())
    for row in range(T):
        assert ro.unit[row] == h_star
        assert ro.winner[row] == int(comp_per_h[h_star])
        assert float(ro.value[row]) == pytest.approx(float(best_per_h[h_star]), rel=1e-5)
        assert (ro.hidden_winners[row] >= -1).all()


def test_tensor_readout_fused_follows_dominant_terms():
    """Tensor granularity through an unlabelled linear and a fused projection (abs): inside each operator the path
    follows the largest term of the VJP sum; the fused output column it reaches decides Query/Key/Value."""
    torch.manual_seed(7)
    model = _Toy(True).eval()
    blk = model.layers[0]
    x = torch.randn(1, T, H)
    (ro,) = analyze_components(model, x, model, split=FUSED_SPLIT, sign="abs", granularity="tensor")
    coef = blk.coef.detach().abs()
    wq, wp = blk.qkv.weight.detach().abs(), blk.pre.weight.detach().abs()
    qkv_out = coef[:3].reshape(-1)  # |M| at the fused output: the coefficient of each column
    pre_out = qkv_out @ wq  # [H]
    via_pre = pre_out @ wp  # [H]
    skip = coef[3]
    best = torch.maximum(via_pre, skip)
    h_star = int(best.argmax())
    j_star = int((wp[:, h_star] * pre_out).argmax())
    o_star = int((wq[:, j_star] * qkv_out).argmax())
    expect = "Skip" if skip[h_star] > via_pre[h_star] else LABELS[o_star // H]
    for row in range(T):
        assert ro.unit[row] == h_star
        assert ro.winner_labels()[row] == expect
        assert float(ro.value[row]) == pytest.approx(float(best[h_star]), rel=1e-5)


def test_bucket_sum_adds_every_hidden_unit():
    torch.manual_seed(11)
    model = _Toy(False).eval()
    x = torch.randn(1, T, H)
    res = inseq_semiring.run(model, x, "maxpath", sign="abs", granularity="scalar", backpointers=True, model=model)
    oplus = component_readout(res, PLAIN_SPLIT, 0)
    bucket = component_readout(res, PLAIN_SPLIT, 0, agg="bucket_sum")
    node = res.trail[fanout_node(res.tape, PLAIN_SPLIT, 0)]
    total = (node.hi.double() * torch.exp(node.log_scale)).reshape(-1, H).sum(-1)
    assert torch.allclose(bucket.credit.sum(-1), total, rtol=1e-6)
    assert (bucket.credit.sum(-1) >= oplus.credit.sum(-1) - 1e-12).all()


# -- real architectures -------------------------------------------------------------------------------------------

def _bert():
    from inseq_semiring.experiments.train import tiny_bert
    torch.manual_seed(0)
    return tiny_bert(initializer_range=0.3, hidden_dropout=0.0, seed=0).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, attn_implementation="eager",
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_split_presets_resolve():
    assert split_for("bert") is BERT_SPLIT and split_for("BertForSequenceClassification") is BERT_SPLIT
    assert split_for("GPT2LMHeadModel") is GPT2_SPLIT
    assert split_for("LlamaForCausalLM") is LLAMA_SPLIT and split_for("qwen2") is LLAMA_SPLIT
    s = make_split({"A": "x.y", "B": "=z"}, layer_pattern=r"blocks\.{layer}", anchor="x")
    assert s.branches == (Branch("A", "x.y"), Branch("B", "z", exact=True))
    with pytest.raises(ValueError):
        split_for("no-such-architecture")


@pytest.mark.parametrize("granularity", ["tensor", "scalar"])
def test_bert_only_pooled_position_has_query_and_skip(granularity):
    """1-layer BERT classifier pooling position 0: every other token's query and skip never reach the root."""
    model = _bert()
    ids = torch.randint(1, 20, (1, 6))
    emb = model.get_input_embeddings()(ids).detach()
    (ro,) = analyze_components(lambda e: model(inputs_embeds=e).logits[0, 1], emb, model, sign="abs",
                               granularity=granularity)
    assert ro.labels[:4] == LABELS
    q, s = ro.labels.index("Query"), ro.labels.index("Skip")
    assert (ro.credit[1:, q] == 0).all() and (ro.credit[1:, s] == 0).all()
    assert set(ro.winner_labels()[1:]) <= {"Key", "Value"}
    res = inseq_semiring.run(lambda e: model(inputs_embeds=e).logits[0, 1], emb, "maxpath", sign="abs",
                             granularity=granularity, backpointers=True, model=model)
    node = res.trail[fanout_node(res.tape, BERT_SPLIT, 0)]
    row_max = (node.hi.double() * torch.exp(node.log_scale)).reshape(-1, node.hi.shape[-1]).max(-1).values
    assert torch.allclose(ro.value, row_max, rtol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("granularity", ["tensor", "scalar"])
@pytest.mark.parametrize("sign", ["abs", "positive"])
def test_causal_last_layer_structure(arch, granularity, sign):
    """1-layer causal LM, root at the last position: earlier tokens reach it only as keys and values, so their
    Query and Skip credit is exactly 0 (fused GPT-2 c_attn and pre-norm following included); with sign='abs'
    they are won by Key or Value. Every row is attributed to a named component (never 'Other')."""
    model = {"gpt2": _gpt2, "llama": _llama}[arch]()
    ids = torch.randint(1, 30, (1, 5))
    emb = model.get_input_embeddings()(ids).detach()

    def fn(e):
        return model(inputs_embeds=e, use_cache=False).logits[0, -1, 3]

    res = inseq_semiring.run(fn, emb, "maxpath", sign=sign, granularity=granularity, backpointers=True, model=model)
    assert layers_on_tape(res.tape, split_for(model)) == [0]
    ro = component_readout(res, None, 0)
    q, s = ro.labels.index("Query"), ro.labels.index("Skip")
    assert (ro.credit[:-1, q] == 0).all() and (ro.credit[:-1, s] == 0).all()
    assert "Other" not in ro.winner_labels()
    if sign == "abs":
        assert set(ro.winner_labels()[:-1]) <= {"Key", "Value"}


def test_readout_requires_backpointers():
    model = _Toy(False).eval()
    res = inseq_semiring.run(model, torch.randn(1, T, H), "maxpath", sign="abs", model=model)
    with pytest.raises(ValueError, match="backpointers"):
        component_readout(res, PLAIN_SPLIT, 0)

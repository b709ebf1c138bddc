"""Models loaded with the default (SDPA) attention record as they are: fused attention is decomposed into eager
attention's operators at record time, so every semiring equals the eager model's value, with no switch."""

import copy

import pytest
import torch

import inseq_semiring as isr
import tiny_models as tm
from inseq_semiring.graph.recorder import record

torch.set_num_threads(1)

SDPA_OPS = {"aten.scaled_dot_product_attention.default", "aten._scaled_dot_product_flash_attention_for_cpu.default",
            "aten._scaled_dot_product_attention_math.default", "aten._scaled_dot_product_efficient_attention.default",
            "aten._scaled_dot_product_flash_attention.default"}
SEMIRINGS = [("gradient", {}), ("flow", {}), ("entropy", {}), ("maxpath", {}),
             ("maxpath", dict(sign="positive", granularity="tensor"))]
_SDPA = {}


def _fn(model, kind):
    rows = tm._per_row("", model, kind, True)
    return lambda *xs: rows(*xs)[0]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "bart", "t5"])
def test_sdpa_model_equals_eager_for_every_semiring(name):
    case = tm.build(name)
    if name not in _SDPA:
        model = copy.deepcopy(case.model)
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError) as err:  # an architecture Hugging Face gives no SDPA path
            pytest.skip(f"{name}: no SDPA attention in this transformers version ({err})")
        _SDPA[name] = model
    model = _SDPA[name]
    fn = _fn(model, case.kind)
    tape = record(fn, case.inputs, model=model)
    fused = {str(r.decomposed_from) for r in tape.records if r.decomposed_from is not None}
    assert fused & SDPA_OPS, f"{name}: the SDPA model dispatched no fused attention ({fused})"
    for semiring, opts in SEMIRINGS:
        want = isr.run(case.fn, case.inputs, semiring, model=case.model, **opts).values
        got = isr.run(fn, case.inputs, semiring, model=model, **opts).values
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()),
                                       msg=lambda m: f"{name} {semiring} {opts}: {m}")
    assert model.config._attn_implementation == "sdpa"


def test_llama_gqa_is_exercised():
    """Llama's tiny config has 1 key/value head for 2 query heads: the fused kernel receives them ungrouped."""
    assert tm.tiny_model("llama").config.num_key_value_heads < tm.tiny_model("llama").config.num_attention_heads


@pytest.mark.parametrize("mask, causal, gqa", [(None, True, False), ("bool", False, False), ("float", False, True),
                                               (None, False, True)])
def test_functional_sdpa_equals_autograd(mask, causal, gqa):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    k = torch.randn(2, 2 if gqa else 4, 6, 3, dtype=torch.float64)
    v = torch.randn(2, 2 if gqa else 4, 6, 3, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(5, 6) > 0.3
        m[:, 0] = True
    elif mask == "float":
        m = torch.randn(5, 6, dtype=torch.float64)
    length = 6 if not causal else 5
    k, v = k[..., :length, :], v[..., :length, :]

    def fn(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal,
                                                               enable_gqa=gqa, scale=0.7)
        return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()

    got = isr.semiring_backward(fn, (q, k, v), "gradient")
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(fn(*xs), xs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_fused_kernel_with_dropout_is_refused():
    """A fused kernel draws its dropout mask inside: its decomposition refuses rather than drop no unit."""
    from inseq_semiring.decompositions.attention import attention

    q = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    with pytest.raises(isr.UnsupportedModelError, match="dropout_p=0.5"):
        attention(q, q, q, dropout_p=0.5)


def test_attention_implementation_untouched_during_and_after():
    case = tm.build("gpt2")
    model = copy.deepcopy(case.model)
    model.set_attn_implementation("sdpa")
    model.train()
    seen = []
    fn = _fn(model, case.kind)

    def spy(*xs):
        seen.append((model.config._attn_implementation, model.training))
        return fn(*xs)

    isr.semiring_backward(spy, case.inputs, "gradient", model=model)
    assert seen == [("sdpa", False)]
    assert model.config._attn_implementation == "sdpa" and all(m.training for m in model.modules())

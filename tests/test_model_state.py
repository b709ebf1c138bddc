"""The user's model is left as it was: attention implementation, training flags, outputs; also after errors."""

import types

import pytest
import torch
import transformers

import inseq_semiring as isr
from inseq_semiring.graph.model_state import attribution_mode

torch.set_num_threads(1)


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=30, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    return transformers.GPT2LMHeadModel(cfg).double()


def _root(model):
    return lambda e: model(inputs_embeds=e, use_cache=False).logits[:, -1, 3].sum()


def test_attribution_restores_attention_and_training_flags():
    model = _gpt2().train()
    emb = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach()
    model.eval()
    before = model(inputs_embeds=emb).logits
    model.train()
    isr.run(_root(model), emb, "maxpath", model=model)
    assert model.config._attn_implementation == "sdpa"
    assert all(m.training for m in model.modules())
    model.eval()
    assert torch.equal(model(inputs_embeds=emb).logits, before)


def test_sdpa_is_kept_inside_and_training_restored_after_an_exception():
    model = _gpt2().train()
    with pytest.raises(RuntimeError, match="boom"):
        with attribution_mode(model):
            assert model.config._attn_implementation == "sdpa"  # decomposed at record time: no switch
            assert not model.training
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert model.training


class _FlashModel(torch.nn.Module):
    """A model whose attention implementation the recorder cannot decompose (a non-ATen kernel)."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(_attn_implementation="flash_attention_2")
        self.lin = torch.nn.Linear(2, 2)


def test_undecomposable_attention_is_switched_to_eager_and_back():
    model = _FlashModel().train()
    with pytest.raises(RuntimeError, match="boom"):
        with attribution_mode(model):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "flash_attention_2" and model.training


def test_error_midway_through_a_forward_leaves_the_model_usable():
    model = _gpt2().eval()
    emb = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach()

    def broken(e):
        model(inputs_embeds=e, use_cache=False)
        raise ValueError("user code failed")

    with pytest.raises(ValueError, match="user code failed"):
        isr.run(broken, emb, "gradient", model=model)
    hooks = torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks
    assert all(len(h) == 0 for h in hooks), "global module hooks leaked"
    g, = isr.run(_root(model), emb, "gradient", model=model).values
    e = emb.clone().requires_grad_(True)
    ref, = torch.autograd.grad(_root(model)(e), e)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_fused_attention_without_the_model_equals_autograd():
    """The README's first example on a model loaded the default way (SDPA), without model=."""
    model = _gpt2().eval()
    emb = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach()
    g, = isr.semiring_backward(_root(model), emb, "gradient")
    e = emb.clone().requires_grad_(True)
    ref, = torch.autograd.grad(_root(model)(e), e)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    assert model.config._attn_implementation == "sdpa"

"""The engine is device-agnostic: on CUDA it matches autograd and the CPU results (skipped without a GPU)."""

import pytest
import torch
import transformers

import inseq_semiring as isr

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _models():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)
    llama = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=32, vocab_size=40,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    out = {}
    for name, cfg, cls in (("gpt2", gpt2, transformers.GPT2LMHeadModel), ("llama", llama, transformers.LlamaForCausalLM)):
        cfg._attn_implementation = "eager"
        out[name] = cls(cfg).eval().double()
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_matches_cpu_and_autograd(arch):
    model = _models()[arch]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        emb = model.get_input_embeddings()(ids.to(device)).detach()

        def root(e):
            return torch.log_softmax(model(inputs_embeds=e, use_cache=False).logits[:, -1], -1)[:, 7].sum()

        e = emb.clone().requires_grad_(True)
        ref, = torch.autograd.grad(root(e), e)
        grad, = isr.run(root, emb, "gradient", model=model).values
        assert grad.device.type == device
        torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-9)
        results[device] = {
            (s, sign): isr.run(root, emb, s, sign=sign, model=model).values[0].cpu()
            for s, sign in (("flow", "abs"), ("entropy", "abs"), ("maxpath", "abs"), ("maxpath", "positive"),
                            ("maxpath", "negative"))
        }
    # Llama's RMSNorm computes in float32 even in a float64 model (a float32 island), where CPU and CUDA round
    # differently; GPT-2 is float64 throughout.
    rtol = 1e-7 if arch == "gpt2" else 1e-5
    for key, cpu in results["cpu"].items():
        torch.testing.assert_close(results["cuda"][key], cpu, rtol=rtol, atol=1e-10, msg=str(key))

"""The benchmarks' GPT-2-small-shaped random model (12 layers by default, hidden 768, 12 heads, vocab 50257), eager
attention, float32, eval mode, frozen weights, seed 0."""

from __future__ import annotations

import torch


def gpt2_small(layers: int = 12):
    import transformers

    cfg = transformers.GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

"""A tiny model whose target score is a known function of the tokens (the evaluation tests).

``AdditiveModel(weights, kind)``: ``p(class 0 | x) = a(x) = sum_i w[x_i]`` over the attended tokens (logits
``[log a, log(1 - a)]``, so the softmax gives ``a`` exactly). ``kind="classifier"``: logits ``[B, 2]``;
``kind="causal"``: logits ``[B, S, 2]`` with ``a`` the prefix sum up to each position (a causal model whose next
"token" 0 has probability ``a``). Token 0 is BOS (special), token 1 pad. ``calls`` records every forward's
``input_ids`` (masked rows as lists).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class AdditiveModel(torch.nn.Module):
    def __init__(self, weights, kind: str = "classifier"):
        super().__init__()
        w = torch.as_tensor(list(weights), dtype=torch.float64).reshape(-1, 1)
        self.emb = torch.nn.Embedding(w.shape[0], 1, dtype=torch.float64)
        with torch.no_grad():
            self.emb.weight.copy_(w)
        self.evaluation_kind = kind
        self.config = SimpleNamespace(vocab_size=w.shape[0], num_labels=2, bos_token_id=0, pad_token_id=1,
                                      label2id={"yes": 0, "no": 1}, architectures=[], is_encoder_decoder=False,
                                      _name_or_path="additive")
        self.calls: list[list[list[int]]] = []

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **_):
        if input_ids is not None:
            self.calls.append([[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(input_ids, attention_mask)])
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(e.shape[:2], dtype=torch.long)
        v = e[..., 0] * attention_mask.to(e.dtype)
        a = v.sum(-1) if self.evaluation_kind == "classifier" else v.cumsum(-1)
        return SimpleNamespace(logits=torch.stack([torch.log(a), torch.log1p(-a)], -1))

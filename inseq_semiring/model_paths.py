"""Top gradient paths of a language model, labelled by component, as text and as a figure.

``find_top_paths(model, tokenizer, text, target)`` attributes the log-probability of the first ``target`` token
(decoder-only: after ``text``; encoder-decoder: the first decoder step) to the input embeddings with the maxpath
semiring and decodes the best paths of the ``k`` strongest input elements. Each hop gets a component label from its
module path: embedding, layer k attention query / key / value / output, MLP, norm, LM head (GPT-2's fused
``c_attn`` is split into query / key / value by the output column the path leaves through).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .api import run
from .paths import Hop, Path, top_paths

_COMPONENTS = [  # (pattern on the module path's last parts, label); first match wins
    (r"(q_proj|\.query|self_attn\.q|\.q)$", "attention query"),
    (r"(k_proj|\.key|self_attn\.k|\.k)$", "attention key"),
    (r"(v_proj|\.value|self_attn\.v|\.v)$", "attention value"),
    (r"(o_proj|out_proj|attn\.c_proj|attention\.output\.dense|\.o|attention\.out_lin)$", "attention output"),
    (r"(attn|attention|self_attn|SelfAttention|EncDecAttention)(\.[A-Za-z_]+)?$", "attention"),
    (r"(mlp|ffn|intermediate|output\.dense|DenseReluDense|fc1|fc2|lin1|lin2)(\.[A-Za-z_]+)*$", "MLP"),
    (r"(norm|ln_\w+|layernorm|LayerNorm|layer_norm)$", "norm"),
    (r"(lm_head|classifier|score)$", "LM head"),
    (r"(embed_tokens|wte|wpe|embeddings.*|shared)$", "embedding"),
]


def component_label(hop: Hop) -> str:
    """``layer 3 attention key``, ``norm``, ``LM head``, ... for one hop."""
    path = hop.module_path
    layer = re.search(r"\.(\d+)(\.|$)", path)
    prefix = f"layer {layer.group(1)} " if layer else ""
    if path.endswith("c_attn") and hop.shape:  # GPT-2: one Conv1D makes q, k and v side by side
        third = hop.index[-1] * 3 // hop.shape[-1]
        return prefix + ("attention query", "attention key", "attention value")[min(third, 2)]
    for pattern, label in _COMPONENTS:
        if re.search(pattern, path):
            return prefix + label
    return prefix + "residual" if layer else "<top level>"  # model-level bookkeeping (views, log-softmax)


def hop_layer(hop: Hop) -> int | None:
    m = re.search(r"\.(\d+)(\.|$)", hop.module_path)
    return int(m.group(1)) if m else None


def hop_position(hop: Hop, n_tokens: int) -> int | None:
    """The token position of the hop's element: the first dimension of the tensor that has the sequence length."""
    for dim, size in enumerate(hop.shape):
        if size == n_tokens and (dim < len(hop.shape) - 1 or len(hop.shape) == 1):
            return hop.index[dim]
    return None


def condensed(path: Path) -> list[str]:
    """The path as component labels: repeats merged, a run of residual hops as one ``residual stream`` step,
    bookkeeping at the top level (log-softmax, indexing) dropped."""
    out: list[str] = []
    run: list[int] = []  # layers of the current residual run

    def flush():
        if run:
            out.append(f"residual stream (layer {run[0]})" if run[0] == run[-1]
                       else f"residual stream (layers {run[0]}-{run[-1]})")
            run.clear()

    for hop in path.hops:
        label = component_label(hop)
        if label.endswith("residual"):
            layer = hop_layer(hop)
            if not run or run[-1] != layer:
                run.append(layer)
            continue
        if label == "<top level>":
            continue
        flush()
        label = "final norm" if label == "norm" else label
        if not out or out[-1] != label:
            out.append(label)
    flush()
    return out


@dataclass
class TopPaths:
    paths: list[Path]
    tokens: list[str]
    n_layers: int

    def to_text(self, full: bool = False) -> str:
        lines = []
        for k, p in enumerate(self.paths):
            pos, dim = p.input_index[-2], p.input_index[-1]
            lines.append(f"#{k + 1} from {self.tokens[pos]!r} (position {pos}, dim {dim}), value {p.value:.4g}:")
            lines.append("    embedding -> " + " -> ".join(condensed(p)))
            if full:
                lines.append(p.to_text())
        return "\n".join(lines)

    def grid_hops(self, k: int = 0) -> list[tuple[int, int, str]]:
        """``(layer, position, label)`` per grid point of path ``k`` (layer -1 = embeddings, ``n_layers`` = head);
        components met at the same point are joined (``norm > MLP``); the residual stream is left unlabelled."""
        path = self.paths[k]
        hops = [(-1, path.input_index[-2], "embedding")]
        for hop in path.hops:
            layer, pos = hop_layer(hop), hop_position(hop, len(self.tokens))
            label = component_label(hop)
            if pos is None or label == "<top level>":
                continue
            if layer is None:
                layer = self.n_layers if "head" in label or "norm" in label else hops[-1][0]
            short = "" if label.endswith("residual") else label.replace(f"layer {layer} ", "")
            if (layer, pos) == hops[-1][:2]:
                prev = hops[-1][2]
                if short and not prev.endswith(short):
                    hops[-1] = (layer, pos, f"{prev} > {short}" if prev else short)
                continue
            hops.append((layer, pos, short))
        return hops

    def figure(self, k: int = 0, title: str | None = None):
        from .viz import path_grid

        return path_grid(self.grid_hops(k), n_layers=self.n_layers + 1, tokens=self.tokens,
                         title=title or f"top gradient path #{k + 1} (value {self.paths[k].value:.3g})")


@torch.no_grad()
def find_top_paths(model, tokenizer, text: str, target: str, *, k: int = 3, sign: str = "abs",
                   decomposition=None, rules: str | None = None) -> TopPaths:
    """The best gradient paths to ``log p(first target token)`` from the ``k`` strongest input elements
    (``decomposition``: the operator graph, see :func:`inseq_semiring.run`; ``rules``: a relevance method of
    :mod:`inseq_semiring.lrp`, e.g. ``"attn_lrp"``: the best *relevance* paths, over the LRP-edited graph)."""
    from .errors import InvalidInputError

    if not text or not text.strip():
        raise InvalidInputError("the input text is empty", where="find_top_paths", fix="pass a non-empty prompt")
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    target_ids = tokenizer(target, add_special_tokens=False).input_ids
    if not target_ids:
        raise InvalidInputError(f"the target {target!r} has no tokens", where="find_top_paths",
                                fix="pass the text whose first token should be explained, e.g. ' are'")
    token = target_ids[0]
    emb = model.get_input_embeddings()(ids).detach()
    if getattr(model.config, "is_encoder_decoder", False):
        start = torch.tensor([[model.config.decoder_start_token_id]], device=ids.device)

        def root(e):
            logits = model(inputs_embeds=e, decoder_input_ids=start, use_cache=False).logits
            return torch.log_softmax(logits[:, -1], -1)[:, token].sum()
    else:
        def root(e):
            logits = model(inputs_embeds=e, use_cache=False).logits
            return torch.log_softmax(logits[:, -1], -1)[:, token].sum()

    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", 0)
    if rules is not None:
        from .lrp.relevance import relevance_semiring

        result, plan = relevance_semiring(root, emb, rules, "maxpath", sign=sign, backpointers=True, model=model)
        return TopPaths(top_paths(result, k=k, rules=plan.rules), tokens, int(n_layers))
    result = run(root, emb, "maxpath", sign=sign, backpointers=True, model=model, decomposition=decomposition)
    return TopPaths(top_paths(result, k=k), tokens, int(n_layers))

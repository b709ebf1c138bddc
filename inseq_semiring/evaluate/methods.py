"""Per-token scores of the evaluated methods: one table (:data:`TOKEN_SCORES`) and the code that computes them.

Every method gives one score per input token (special tokens included; they are never ranked). ``s`` is the target
score of :mod:`.scoring` (``p(target)``, or ``p(target) - p(contrast)``), which is also the root every attribution
method explains. Tokens are ranked by the score, descending.

Backends:

* **Inseq** (generation models with a tokenizer and ``text`` data): ``AttributionModel.attribute(text, text +
  target_token, method=m)`` (encoder-decoder: the target token alone), ``attributed_fn="contrast_prob_diff"`` with a
  contrast, then the column of the first generated token with Inseq's default aggregation of the method's output:
  a granular output (one value per hidden dimension) is reduced by its L2 norm (Inseq's ``vnorm``), a
  multi-dimensional one (``attention``: heads x layers) by its mean, a per-token output is taken as it is. Inseq's final normalisation (a positive rescaling of each column) is left out: it does
  not change the ranking. Inseq does not run path methods (``integrated_gradients``) contrastively; on an example
  with a contrast that method goes through the direct backend (same root ``p(t) - p(c)``, same aggregation).
  ``attention`` ignores the target (and the contrast). ``semiring_flow`` always goes through the direct backend: it
  is ranked by ``log Z``, which Inseq's float32 attributions cannot carry (``Z`` overflows them on deep models).
* **direct** (sequence classifiers, which Inseq does not support, and ``input_ids`` data): the same methods through
  the engine / Captum on the input embeddings, with the same aggregation. Inseq-only built-ins are skipped there
  (:class:`MethodNotApplicable`, reason recorded).

``loo`` and ``random`` are the reference methods (the ceiling of ``loo_tau`` and the floor).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InvalidInputError, SemiringError

__all__ = ["TOKEN_SCORES", "TokenScore", "ALIASES", "MethodNotApplicable", "canonical_method", "direct_scores",
           "inseq_scores", "random_scores", "INSEQ_ONLY"]


class MethodNotApplicable(SemiringError):
    """The method does not apply to this model or data (recorded as skipped; the run goes on)."""


@dataclass(frozen=True)
class TokenScore:
    """How a method's per-token score is made. ``signed``: can be negative (ranked by value, not magnitude)."""

    signed: bool
    pooling: str
    meaning: str


_L2 = "L2 norm over the hidden dimension (Inseq's vnorm)"
#: method -> how its per-token score is computed (the documented table; README "Evaluation")
TOKEN_SCORES: dict[str, TokenScore] = {
    "loo": TokenScore(True, "-", "s(x) - s(x without token i), with the run's removal (delete / replace)"),
    "random": TokenScore(False, "-", "uniform in [0, 1), seeded by (seed, example id)"),
    "semiring_maxpath": TokenScore(False, "max over the hidden dimension",
                                   "top-path value max_pi |w_pi| of the token's best gradient path (sign='abs')"),
    "semiring_entropy": TokenScore(False, "Z and U summed over the hidden dimension, then H = U/Z + log Z",
                                   "entropy (nats) of the gradient-path distribution p(pi) ~ |w_pi|"),
    "semiring_flow": TokenScore(False, "Z summed over the hidden dimension, then its log",
                                "log of the total flow Z = sum_pi |w_pi| (the ranking of Z; Z itself overflows "
                                "float32, Inseq's storage type, on deep models)"),
    "semiring_gradient": TokenScore(False, _L2, "|ds/de| by the gradient semiring (= saliency)"),
    "lrp_epsilon": TokenScore(True, "sum over the hidden dimension", "LRP-epsilon relevance e * g~"),
    "attn_lrp": TokenScore(True, "sum over the hidden dimension", "AttnLRP relevance e * g~"),
    "cp_lrp": TokenScore(True, "sum over the hidden dimension", "CP-LRP relevance e * g~"),
    "attention_tracing": TokenScore(False, "-", "attention tracing (LAT) from the read-out position"),
    "attention_rollout": TokenScore(False, "-", "attention rollout from the read-out position"),
    "deeplift_shap": TokenScore(False, _L2, "DeepLiftSHAP (exact secants), baselines zero + UNK embeddings"),
    "guided_backprop": TokenScore(False, _L2, "Guided Backprop (signal clipped at every activation)"),
    "guided_integrated_gradients": TokenScore(False, _L2, "Guided IG (200 steps, fraction 0.25, max_dist 0.02), "
                                                          "UNK baseline"),
    "greedy_pig": TokenScore(False, _L2, "Greedy PIG (4 rounds x 32 steps, k=1 token), UNK baseline"),
    "pgd_attribution": TokenScore(False, _L2, "VaPGD (epsilon 0.1, 10 steps, L2)"),
    "saliency": TokenScore(False, _L2, "|ds/de| (Inseq / Captum saliency, abs=True)"),
    "input_x_gradient": TokenScore(False, _L2, "e * ds/de"),
    "integrated_gradients": TokenScore(False, _L2, "integrated gradients (50 steps; Inseq's UNK baseline)"),
    "deeplift": TokenScore(False, _L2, "Captum DeepLift via Inseq"),
    "gradient_shap": TokenScore(False, _L2, "Captum GradientShap via Inseq"),
    "attention": TokenScore(False, "mean over heads and layers (Inseq's default)", "attention weights from the "
                                                                                      "predicting position"),
    "occlusion": TokenScore(False, "one value per token (window = the whole embedding, Inseq's default)",
                            "|s(x) - s(x with the token's embedding replaced by UNK's)| (Inseq takes the abs)"),
    "lime": TokenScore(True, "Inseq's default aggregation", "Captum LIME via Inseq (needs scikit-learn)"),
    "value_zeroing": TokenScore(False, "Inseq's default aggregation", "Value Zeroing via Inseq"),
}
ALIASES = {"guided_ig": "guided_integrated_gradients", "pgd": "pgd_attribution", "ig": "integrated_gradients"}
#: computed through Inseq only (skipped on classifiers and input_ids data)
INSEQ_ONLY = ("deeplift", "gradient_shap", "attention", "lime", "value_zeroing")
REFERENCE = ("loo", "random")
#: Inseq's internals methods: they do not look at the target, so a contrast is not passed to them
OUTPUT_AGNOSTIC = ("attention", "value_zeroing")


def canonical_method(name: str) -> str:
    """The table name of ``name`` (aliases resolved); raises with the choices for an unknown one."""
    m = ALIASES.get(name.strip(), name.strip())
    if m not in TOKEN_SCORES:
        raise InvalidInputError(f"unknown method {name!r}", where="--methods",
                                fix=f"use some of {', '.join(TOKEN_SCORES)} (aliases: "
                                    f"{', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return m


def random_scores(n: int, seed: int, example_id: str) -> list[float]:
    """``n`` uniform scores in [0, 1), a function of ``(seed, example_id)`` only."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return [float(v) for v in torch.rand(n, generator=g, dtype=torch.float64)]


def _l2(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.double(), dim=-1)


# ------------------------------------------------------------------------------------------------------------------
# direct backend: the engine / Captum over the input embeddings
# ------------------------------------------------------------------------------------------------------------------
def _baseline_embeds(scorer, n: int) -> torch.Tensor:
    if scorer.baseline_id is None:
        raise MethodNotApplicable("the method needs a baseline token (UNK / pad / EOS) and the model has none")
    ids = torch.full((1, n), scorer.baseline_id, dtype=torch.long, device=scorer.device)
    return scorer.model.get_input_embeddings()(ids).detach()


def _semiring(name: str) -> Callable:
    def compute(scorer, emb, fn):
        from ..api import run
        from ..integrations.inseq import _DEFAULT_OPTIONS, METHOD_TABLE

        attrs = METHOD_TABLE[name][2]
        res = run(fn, (emb,), attrs["semiring"], model=scorer.model)
        per = attrs["per_token"](res, 0, dict(_DEFAULT_OPTIONS))
        return _l2(per)[0] if attrs.get("granular") else per[0].double()

    return compute


def _log_flow(scorer, emb, fn):
    """``log Z_i = log(sum_h z_ih) + log_scale``: a monotone transform of the total flow (the same ranking), which
    stays finite where ``Z`` itself exceeds float32 (``-inf`` for a token no path reaches)."""
    from ..api import run

    raw = run(fn, (emb,), "flow", model=scorer.model).raw[0]
    if raw is None:
        return torch.full((emb.shape[1],), -math.inf, dtype=torch.float64)
    return torch.log(raw.z.double().sum(-1))[0] + float(raw.log_scale)


def _grad(scorer, emb, fn):
    e = emb.clone().requires_grad_(True)
    g, = torch.autograd.grad(fn(e).sum(), e)
    return g


def _lrp(name: str) -> Callable:
    def compute(scorer, emb, fn):
        from ..lrp import relevance

        r, = relevance(fn, (emb,), method=name, model=scorer.model)
        return r[0].double().sum(-1)

    return compute


def _attention(name: str) -> Callable:
    def compute(scorer, emb, fn):
        from ..lrp import attention as att

        if scorer.kind == "seq2seq":
            raise MethodNotApplicable(f"{name} traces one self-attention stack (decoder-only models and encoder "
                                      "classifiers); this is an encoder-decoder")
        position = -1 if scorer.kind == "causal" else 0
        return getattr(att, name)(fn, (emb,), model=scorer.model, position=position)[0].double()

    return compute


def _method(name: str, **options) -> Callable:
    def compute(scorer, emb, fn):
        from .. import methods as m

        opts = dict(options)
        if name == "deeplift_shap":
            opts["baselines"] = [(torch.zeros_like(emb),), (_baseline_embeds(scorer, emb.shape[1]),)]
        elif name in ("guided_integrated_gradients", "greedy_pig"):
            opts["baselines"] = (_baseline_embeds(scorer, emb.shape[1]),)
        a, = getattr(m, name)(fn, (emb,), model=scorer.model, **opts)
        return _l2(a)[0]

    return compute


def _integrated_gradients(scorer, emb, fn):
    from captum.attr import IntegratedGradients

    a = IntegratedGradients(fn).attribute(emb, baselines=_baseline_embeds(scorer, emb.shape[1]), n_steps=50)
    return _l2(a)[0]


def _occlusion(scorer, emb, fn):
    """``|s(x) - s(x with token i's embedding replaced by the baseline token's)|``, all ``i`` in one batch (the
    absolute value, as Inseq's occlusion)."""
    n = emb.shape[1]
    base = _baseline_embeds(scorer, n)
    batch = emb.expand(n, -1, -1).clone()
    idx = torch.arange(n, device=emb.device)
    batch[idx, idx] = base[0]
    with torch.no_grad():
        return (fn(emb) - fn(batch)).double().abs()


DIRECT: dict[str, Callable] = {
    **{m: _semiring(m) for m in ("semiring_maxpath", "semiring_entropy", "semiring_gradient")},
    "semiring_flow": _log_flow,
    **{m: _lrp(m) for m in ("lrp_epsilon", "attn_lrp", "cp_lrp")},
    **{m: _attention(m) for m in ("attention_tracing", "attention_rollout")},
    "deeplift_shap": _method("deeplift_shap"),
    "guided_backprop": _method("guided_backprop"),
    "guided_integrated_gradients": _method("guided_integrated_gradients", steps=200, fraction=0.25, max_dist=0.02),
    "greedy_pig": _method("greedy_pig", rounds=4, k=1, steps=32, per_token=True),
    "pgd_attribution": _method("pgd_attribution", epsilon=0.1, steps=10, norm="l2", variant="vapgd"),
    "saliency": lambda scorer, emb, fn: _l2(_grad(scorer, emb, fn).abs())[0],
    "input_x_gradient": lambda scorer, emb, fn: _l2(emb * _grad(scorer, emb, fn))[0],
    "integrated_gradients": _integrated_gradients,
    "occlusion": _occlusion,
}


def direct_scores(scorer, method: str, ids, target: int, contrast: int | None) -> list[float]:
    """Per-token scores of ``method`` through the engine / Captum on the embeddings (see :data:`TOKEN_SCORES`)."""
    if method not in DIRECT:
        why = ("Inseq does not support sequence classifiers" if scorer.kind == "classifier"
               else "Inseq needs text, and this data gives input_ids")
        raise MethodNotApplicable(f"{method} is computed through Inseq only; {why}")
    emb, fn = scorer.root(ids, target, contrast)
    with torch.enable_grad():
        out = DIRECT[method](scorer, emb, fn)
    return [float(v) for v in out.detach().cpu()]


# ------------------------------------------------------------------------------------------------------------------
# Inseq backend
# ------------------------------------------------------------------------------------------------------------------
def inseq_scores(attribution_model, scorer, method: str, ex, target: int, contrast: int | None) -> list[float]:
    """Per-token scores of ``method`` through Inseq (first generated token; Inseq's default aggregation)."""
    tok = scorer.tokenizer
    tgt = tok.decode([target])
    kwargs = dict(method=method, show_progress=False, pretty_progress=False, step_scores=[])
    seq2seq = scorer.kind == "seq2seq"
    if contrast is not None and method not in OUTPUT_AGNOSTIC:
        alt = tok.decode([contrast])
        kwargs.update(attributed_fn="contrast_prob_diff", contrast_targets=alt if seq2seq else ex.text + alt)
    out = attribution_model.attribute(ex.text, tgt if seq2seq else ex.text + tgt, **kwargs)
    seq = out.sequence_attributions[0]
    start = seq.attr_pos_start
    if seq2seq:  # Inseq's decoder side: decoder start, the tokenizer's leading specials, then the target token
        block, prefix, at = seq.source_attributions, [t.id for t in seq.source], len(scorer.decoder_prefix)
        decoder = [t.id for t in seq.target[:at]]
        if decoder != scorer.decoder_prefix:
            raise InvalidInputError(f"Inseq's decoder prefix {decoder} is not the evaluation's "
                                    f"{scorer.decoder_prefix}")
    else:
        block, prefix, at = seq.target_attributions, [t.id for t in seq.target[:start]], start
    generated = seq.target[at].id if at < len(seq.target) else None
    # with a contrast Inseq marks the generated token as a pair (id -1): only the prompt can be compared then
    if prefix != list(ex.input_ids) or (generated != target and contrast is None):
        raise InvalidInputError(f"Inseq tokenized the example differently from the evaluation (input "
                                f"{prefix[:8]}... vs {list(ex.input_ids)[:8]}..., target {generated} vs {target})")
    col = block[:len(prefix), at - start]
    return [float(v) for v in inseq_default_aggregation(col, getattr(seq, "_aggregator", None))]


def inseq_default_aggregation(col: torch.Tensor, aggregator) -> torch.Tensor:
    """One value per token from Inseq's output column ``[tokens, *extra]``: granular outputs (aggregator
    ``"vnorm"``) by the L2 norm of the extra dimension, multi-dimensional ones (``attention``: heads, layers; one
    ``"mean"`` per dimension) by the mean over them, per-token outputs as they are."""
    col = col.double()
    if col.dim() == 1:
        return col
    names = [aggregator] if isinstance(aggregator, str) else list(aggregator or [])
    if names == ["vnorm"] and col.dim() == 2:
        return _l2(col)
    if names and all(n == "mean" for n in names) and len(names) == col.dim() - 1:
        return col.flatten(1).mean(-1)
    raise MethodNotApplicable(f"no known default aggregation {aggregator!r} for an Inseq output of shape "
                              f"{tuple(col.shape)}")

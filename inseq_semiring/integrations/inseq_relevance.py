"""Inseq methods for relevance propagation: ``lrp_epsilon``, ``attn_lrp``, ``cp_lrp``, ``attention_tracing``,
``attention_rollout`` (``model.attribute(..., method="attn_lrp")``, ``inseq.load_model(name, "attn_lrp")``,
``inseq attribute -a attn_lrp``). One score per input token:

* the LRP methods: ``R(x) = x * g~(x)`` summed over the hidden dimension (signed), for the step's attributed
  function as root (Inseq's default is the probability of the generated token; ``attributed_fn="logit"`` gives the
  classic LRP root). Option ``epsilon`` (default 1e-6). See :mod:`inseq_semiring.lrp`.
* ``attention_tracing`` / ``attention_rollout``: decoder-only models only (one attention stack); the read-out is
  the last prefix position (the one that predicts the generated token). Encoder-decoder models raise a clear error.

Outputs are Inseq's ``Coarse...`` classes, so ``.show()``, ``.save()`` and aggregation work as for any method.
Registered by :func:`inseq_semiring.integrations.inseq.register` (idempotent).
"""

from __future__ import annotations

import sys
from typing import Any

from inseq.attr.feat.attribution_utils import get_source_target_attributions
from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
from inseq.data import CoarseFeatureAttributionStepOutput
from inseq.utils import Registry

from ..errors import InvalidInputError
from ..lrp import attention as _attention
from ..lrp.edited import DEFAULT_EPSILON
from ..lrp.relevance import explain, record_tape
from .captum import SemiringAttribution

METHODS = ("lrp_epsilon", "attn_lrp", "cp_lrp", "attention_tracing", "attention_rollout")
OPTION_NAMES = ("epsilon",)
_MARK = "_inseq_semiring_plugin"


class RelevanceAttributionRegistry(GradientAttributionRegistry, Registry):
    """Shared base of the relevance methods (abstract: ``Registry`` as a direct base keeps it out of Inseq's list)."""

    relevance: str = ""

    def __init__(self, attribution_model, epsilon: float | None = None, **kwargs):
        super().__init__(attribution_model)
        self.epsilon = DEFAULT_EPSILON if epsilon is None else float(epsilon)
        self.method = SemiringAttribution(self.attribution_model, semiring="gradient",
                                          model=getattr(attribution_model, "model", None))

    def get_attribution_args(self, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        used = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
        return used, {k: v for k, v in kwargs.items() if k not in used}

    def attribute_step(self, attribute_fn_main_args: dict[str, Any], attribution_args: dict[str, Any] = {}):
        inputs = tuple(attribute_fn_main_args["inputs"])
        extra = attribute_fn_main_args.get("additional_forward_args")
        fn = self.method.root_fn(None, extra)
        model = getattr(self.attribution_model, "model", None)
        if self.relevance.startswith("attention_"):
            scores = self._attention_scores(fn, inputs, model)
        else:
            eps = float(attribution_args.get("epsilon", self.epsilon))
            res = explain(fn, inputs, self.relevance, epsilon=eps, model=model)
            scores = tuple(r.sum(-1) for r in res.relevance)
        source, target = get_source_target_attributions(scores, self.attribution_model.is_encoder_decoder)
        return CoarseFeatureAttributionStepOutput(source_attributions=source, target_attributions=target,
                                                  step_scores={})

    def _attention_scores(self, fn, inputs, model):
        if self.attribution_model.is_encoder_decoder:
            raise InvalidInputError(f"{self.relevance} supports decoder-only models (one attention stack); this "
                                    "model is an encoder-decoder", where=f"inseq method '{self.relevance}'",
                                    fix="use attn_lrp / cp_lrp, or inseq_semiring.lrp.attention_tracing(..., "
                                    "stack='encoder') in Python")
        tape = record_tape(fn, inputs, model)
        maps = _attention.attention_maps(tape)
        combine = _attention.trace_maps if self.relevance == "attention_tracing" else _attention.rollout_maps
        return (combine(maps, -1),)


_DOCS = {
    "lrp_epsilon": "LRP-epsilon relevance per token (sum over the hidden dimension, signed).",
    "attn_lrp": "AttnLRP relevance per token (Achtibat et al. 2024; sum over the hidden dimension, signed).",
    "cp_lrp": "CP-LRP relevance per token (Ali et al. 2022: attention weights constant; signed).",
    "attention_tracing": "Layerwise attention tracing: per-head chained attention from the read-out, head sum.",
    "attention_rollout": "Attention rollout (Abnar & Zuidema 2020): head mean, 0.5 A + 0.5 I, renormalised, chained.",
}
_STATE: dict[str, Any] = {"classes": None}


def _ours(obj) -> bool:
    return bool(getattr(obj, _MARK, False))


def _define(name: str) -> type:
    class_name = "".join(p.capitalize() for p in name.split("_")) + "Attribution"
    cls = type(class_name, (RelevanceAttributionRegistry,),
               {"__doc__": _DOCS[name], "__module__": __name__, "method_name": name, "relevance": name})
    cls.__qualname__ = class_name
    setattr(cls, _MARK, True)
    return cls


def register() -> dict[str, type]:
    """Register the relevance methods with Inseq (idempotent; returns ``{method_name: class}``)."""
    from inseq.attr.feat import FeatureAttribution

    if _STATE["classes"] is None:
        existing = FeatureAttribution.available_classes()
        clash = [m for m in METHODS if m in existing and not _ours(existing[m])]
        if clash:
            raise RuntimeError(f"Inseq already has methods named {clash} that are not inseq-semiring's")
        _STATE["classes"] = {m: existing[m] if m in existing else _define(m) for m in METHODS}
        module = sys.modules[__name__]
        for cls in _STATE["classes"].values():
            setattr(module, cls.__name__, cls)
    return dict(_STATE["classes"])


def unregister() -> None:
    module = sys.modules[__name__]
    for name in [n for n, c in vars(module).items() if isinstance(c, type) and _ours(c)]:
        delattr(module, name)
    _STATE["classes"] = None


# An autoload hook that fired while this module was being imported (importing Inseq above fired it) asked for this.
if globals().pop("_register_when_imported", False):
    register()

"""Inseq plugin: semiring backpropagation as Inseq feature-attribution methods and step functions.

Methods (``model.attribute(..., method=<name>)`` or ``inseq attribute -a <name>``), one score per input token:

================== =========================================================================================
``semiring_maxpath`` value of the best path from the token's embedding to the root: the max over the hidden
                     dimension of the per-element maxpath value (``sign="negative"``: the min, i.e. the most
                     negative path). Options ``sign`` (``abs``/``positive``/``negative``) and ``granularity``
                     (``scalar``/``tensor``) pass through ``model.attribute(..., sign="positive")``.
``semiring_entropy`` entropy (nats) of the distribution ``p(path) ~ |w_path|`` over all paths from the token's
                     embedding to the root: ``Z`` and ``U`` are summed over the hidden dimension first, then
                     ``H = U/Z + log Z`` (:func:`~inseq_semiring.semirings.scaled.pooled_entropy`).
``semiring_flow``    total absolute gradient flow ``Z`` (sum over paths of ``prod |w|``), summed over the hidden
                     dimension.
``semiring_gradient`` ``|d root / d embedding|`` per hidden dimension, computed by the gradient semiring: the
                     same granular output, aggregation (``vnorm``) and ``abs`` convention as Inseq's ``saliency``.
================== =========================================================================================

Every method also takes ``decomposition`` (``"aten"``, default; ``"paper"``: the operator graph of Du et al.'s
library; ``"primitive"``; or any name registered in :data:`~inseq_semiring.decompositions.DECOMPOSITIONS`), which
changes the graph that flow, entropy and maxpath are computed on (never the gradient).

The root is the attributed function of each generation step (``attributed_fn``: the probability of the generated
token by default, or e.g. ``contrast_prob_diff``). Outputs are Inseq's own classes (``Coarse...`` for the first three,
``Granular...`` for ``semiring_gradient``), so saved files reload without this plugin.

Step functions (``step_scores=[...]``), one value per generated token, computed over the *whole* graph (every input
embedding: the prefix for decoder-only models, encoder and decoder embeddings for encoder-decoder models) with the
model's default attributed function (the probability of the generated token) as root:

* ``semiring_entropy``: entropy of the path distribution over all paths of the graph (nats);
* ``semiring_top_path``: value of the single best path (abs maxpath) of the graph;
* ``semiring_total_flow``: total flow ``Z`` of the graph (overflows float32, i.e. Inseq's storage type, for deep
  models: about 10+ layers);
* ``semiring_log_total_flow``: ``log Z`` (nats), always representable.

Notes: Inseq stores attributions and step scores as float32, so per-token flow of deep models is ``inf`` (a warning
says so; use ``semiring_log_total_flow``). Span/subword aggregation uses Inseq's defaults (``absmax``), which is exact
for maxpath; for flow pass ``aggregate_fn="sum"``; the entropy of a merged span cannot be derived from per-token
entropies (absmax gives the largest). Registration is explicit and idempotent (:func:`register`); importing
``inseq_semiring`` arranges it as soon as Inseq is imported.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import warnings
import weakref
from typing import Any

import torch
from inseq.attr.feat.attribution_utils import get_source_target_attributions
from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
from inseq.attr.step_functions import STEP_SCORES_MAP, get_step_function, register_step_function
from inseq.data import CoarseFeatureAttributionStepOutput, GranularFeatureAttributionStepOutput
from inseq.data.aggregation_functions import DEFAULT_ATTRIBUTION_AGGREGATE_DICT
from inseq.utils import Registry

from ..decompositions import DECOMPOSITIONS
from ..errors import InvalidInputError
from ..semirings.maxpath import GRANULARITIES, SIGNS
from ..semirings.scaled import entropy_of, pooled_entropy
from .captum import SemiringAttribution

__all__ = ["register", "unregister", "is_registered", "METHODS", "STEP_FUNCTIONS", "SemiringAttributionRegistry",
           "graph_scores"]

logger = logging.getLogger(__name__)

METHODS = ("semiring_maxpath", "semiring_entropy", "semiring_flow", "semiring_gradient")
#: step function name -> aggregation used when merging spans of generated tokens
STEP_FUNCTIONS = {"semiring_entropy": "mean", "semiring_top_path": "max", "semiring_total_flow": "sum",
                  "semiring_log_total_flow": "max"}
OPTION_NAMES = ("sign", "granularity", "decomposition")
_DEFAULT_OPTIONS = {"sign": "abs", "granularity": "scalar", "decomposition": "aten"}
_MARK = "_inseq_semiring_plugin"  # attribute set on everything we register (to recognise our own objects)


# ------------------------------------------------------------------------------------------------------------------
# the graph cache: one tape per generation step, shared by the step functions (and the method when its root and
# inputs are the same graph), so a step records the model once instead of once per score
# ------------------------------------------------------------------------------------------------------------------
class _GraphCache:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key: tuple | None = None
        self.tape = None
        self.results: dict[str, Any] = {}
        self.token = object()

    def lookup(self, model, inputs: tuple, target_ids: torch.Tensor) -> bool:
        if self.key is None:
            return False
        m, ins, tgt = self.key
        same_inputs = len(ins) == len(inputs) and all(a is b for a, b in zip(ins, inputs))
        tid = target_ids.detach().reshape(-1).cpu()
        return m is model and same_inputs and tgt.shape == tid.shape and bool(torch.equal(tgt, tid))

    def store(self, model, inputs: tuple, target_ids: torch.Tensor, tape, results=None, owner=None) -> None:
        self.clear()
        self.key = (model, tuple(inputs), target_ids.detach().reshape(-1).cpu().clone())
        self.tape, self.results = tape, dict(results or {})
        if owner is not None:  # drop the tape when the step's forward output is freed (end of the step)
            token = self.token
            try:
                self._ref = weakref.ref(owner, lambda _r: self.clear() if self.token is token else None)
            except TypeError:  # not weak-referenceable: kept until replaced or cleared
                pass


class _PerThread(threading.local):
    """One graph cache per thread: an Inseq ``attribute`` call runs its steps and step functions on the calling
    thread, so this is a cache per call, and concurrent calls (even on one model) never see each other's graphs."""

    def __init__(self) -> None:
        self.cache = _GraphCache()


_CACHES = _PerThread()


def _cache() -> _GraphCache:
    return _CACHES.cache


# ------------------------------------------------------------------------------------------------------------------
# the methods
# ------------------------------------------------------------------------------------------------------------------
class SemiringAttributionRegistry(GradientAttributionRegistry, Registry):
    """Shared base of the ``semiring_*`` methods (abstract: listing ``Registry`` as a direct base keeps it out of
    Inseq's method list). Subclasses set the flags below."""

    semiring: str = ""
    #: keep the hidden dimension (granular output, like ``saliency``) instead of one score per token
    granular: bool = False
    #: allowed values of each option for this method
    allowed_options: dict[str, tuple[str, ...]] = {"sign": ("abs",), "granularity": ("scalar",)}

    def __init__(self, attribution_model, sign: str | None = None, granularity: str | None = None,
                 decomposition: str | None = None, **kwargs):
        super().__init__(attribution_model)
        given = {k: v for k, v in (("sign", sign), ("granularity", granularity), ("decomposition", decomposition))
                 if v is not None}
        self.options = self.check_options(given)
        self.method = SemiringAttribution(self.attribution_model, semiring=self.semiring,
                                          model=getattr(attribution_model, "model", None))

    # -- options ---------------------------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, given: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
        """Merge ``given`` into ``base`` (the defaults), raising a clear error for a value the method does not allow."""
        opts = dict(base or _DEFAULT_OPTIONS)
        for name, value in given.items():
            allowed = sorted(DECOMPOSITIONS) if name == "decomposition" else cls.allowed_options[name]
            if value not in allowed:
                many = len(allowed) > 1
                also = "" if many else "; sign and granularity apply to semiring_maxpath only"
                raise InvalidInputError(
                    f"invalid value {value!r} for option '{name}' of method '{cls.method_name}'; allowed values: "
                    f"{', '.join(repr(a) for a in allowed)}{also}",
                    where=f"inseq attribution method '{cls.method_name}'",
                    fix=f"pass one of the allowed values (default {name}={_DEFAULT_OPTIONS[name]!r})" if many
                    else f"leave '{name}' out")
            opts[name] = value
        return opts

    def get_attribution_args(self, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        used = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
        return used, {k: v for k, v in kwargs.items() if k not in used}

    # -- Inseq hooks -----------------------------------------------------------------------------------------------
    def attribute(self, *args, **kwargs):
        self.check_options({k: v for k, v in (kwargs.get("attribution_args") or {}).items() if k in OPTION_NAMES},
                           self.options)
        try:
            return super().attribute(*args, **kwargs)
        finally:
            _cache().clear()

    def attribute_step(self, attribute_fn_main_args: dict[str, Any], attribution_args: dict[str, Any] = {}):
        opts = self.check_options({k: v for k, v in attribution_args.items() if k in OPTION_NAMES}, self.options)
        inputs = tuple(attribute_fn_main_args["inputs"])
        extra = attribute_fn_main_args.get("additional_forward_args")
        tape, shared = self._shared_tape(inputs, extra, opts)
        result = self.method.attribute_result(inputs, additional_forward_args=extra, semiring=self.semiring,
                                              sign=opts["sign"], granularity=opts["granularity"], tape=tape,
                                              decomposition=None if tape is not None else opts["decomposition"])
        if shared is not None:
            _cache().store(*shared, tape=result.tape,
                         results={_result_key(self.semiring, opts): result} if self.semiring != "gradient" else {})
        per_input = tuple(self.per_token(result, i, opts) for i in range(len(inputs)))
        source, target = get_source_target_attributions(per_input, self.attribution_model.is_encoder_decoder)
        out_cls = GranularFeatureAttributionStepOutput if self.granular else CoarseFeatureAttributionStepOutput
        return out_cls(source_attributions=source, target_attributions=target, step_scores={})

    def per_token(self, result, i: int, opts: dict[str, str]) -> torch.Tensor:
        """The method's score for input ``i`` of ``result``: ``(B, T)`` (``(B, T, H)`` when granular)."""
        raise NotImplementedError

    # -- sharing the step's graph with the step functions ------------------------------------------------------------
    def _shared_tape(self, inputs: tuple, extra, opts):
        """If this step's root is the model's default attributed function over the whole graph, reuse / publish the
        step's tape through the cache. Returns ``(tape or None, key to publish or None)``."""
        model = self.attribution_model
        if not isinstance(extra, tuple) or opts["decomposition"] != "aten":  # step scores use the ATen graph
            return None, None
        # Inseq's layouts: (..., target_ids, attributed_fn, masks..., use_embeddings, argnames, *argvalues)
        pos = [i for i, a in enumerate(extra) if callable(a) and not isinstance(a, torch.Tensor)]
        names = [a for a in extra if isinstance(a, list)]
        whole = len(inputs) == (2 if model.is_encoder_decoder else 1)
        try:
            default = get_step_function(model.default_attributed_fn_id)
        except Exception:  # pragma: no cover - unknown default
            return None, None
        if len(pos) != 1 or pos[0] == 0 or extra[pos[0]] is not default or not names or names[0] or not whole:
            return None, None
        target_ids = extra[pos[0] - 1]
        if not isinstance(target_ids, torch.Tensor) or target_ids.is_floating_point():
            return None, None
        if _cache().lookup(model, inputs, target_ids):
            return _cache().tape, None
        return None, (model, inputs, target_ids)


def _result_key(semiring: str, opts: dict[str, str] | None = None) -> str:
    if semiring == "maxpath":
        opts = opts or _DEFAULT_OPTIONS
        return f"maxpath:{opts['sign']}:{opts['granularity']}"
    return semiring


def _no_path(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape[:-1], dtype=torch.float64, device=like.device)


def _maxpath_per_token(result, i, opts):
    v = result.values[i]
    return v.amin(-1) if opts["sign"] == "negative" else v.amax(-1)


def _entropy_per_token(result, i, opts):
    raw = result.raw[i]
    return _no_path(result.values[i]) if raw is None else pooled_entropy(raw, -1)


def _flow_per_token(result, i, opts):
    raw = result.raw[i]
    if raw is None:
        return _no_path(result.values[i])
    z = raw.z.double().sum(-1)
    top = float(raw.log_scale) + math.log(float(z.max())) if bool((z > 0).any()) else -math.inf
    if top > math.log(torch.finfo(torch.float32).max):
        warnings.warn(f"semiring_flow: the flow reaches exp({top:.1f}), beyond float32 (Inseq's storage type): "
                      "those scores become inf. Use step_scores=['semiring_log_total_flow'] for the graph's log flow.",
                      RuntimeWarning, stacklevel=2)
    return z * torch.exp(raw.log_scale)


def _gradient_per_element(result, i, opts):
    return result.values[i].abs()  # Captum's Saliency convention (abs=True)


#: method name -> (class name, docstring, class attributes): the whole difference between the four methods.
METHOD_TABLE = {
    "semiring_maxpath": ("SemiringMaxpathAttribution",
                         "Best-path value per token (max over the hidden dimension; ``sign=\"negative\"``: min).",
                         dict(semiring="maxpath", allowed_options={"sign": SIGNS, "granularity": GRANULARITIES},
                              per_token=staticmethod(_maxpath_per_token))),
    "semiring_entropy": ("SemiringEntropyAttribution",
                         "Entropy of the path distribution per token (Z and U pooled over the hidden dimension).",
                         dict(semiring="entropy", per_token=staticmethod(_entropy_per_token))),
    "semiring_flow": ("SemiringFlowAttribution",
                      "Total absolute gradient flow per token (sum over the hidden dimension).",
                      dict(semiring="flow", per_token=staticmethod(_flow_per_token))),
    "semiring_gradient": ("SemiringGradientAttribution",
                          "``|gradient|`` per hidden dimension via the gradient semiring: a drop-in for Inseq's "
                          "``saliency``.",
                          dict(semiring="gradient", granular=True, per_token=staticmethod(_gradient_per_element))),
}


def _define_method(name: str) -> type:
    """One concrete method class. Classes are defined on demand by :func:`register`, because defining a subclass
    *is* registering it with Inseq (its registry lists every subclass by ``method_name``)."""
    class_name, doc, attrs = METHOD_TABLE[name]
    cls = type(class_name, (SemiringAttributionRegistry,),
               {"__doc__": doc, "__module__": __name__, "method_name": name, **attrs})
    cls.__qualname__ = cls.__name__
    setattr(cls, _MARK, True)
    return cls


# ------------------------------------------------------------------------------------------------------------------
# step functions
# ------------------------------------------------------------------------------------------------------------------
def _graph_inputs(args) -> tuple[torch.Tensor, ...]:
    model = args.attribution_model
    dec = args.decoder_input_embeds
    if dec is None:
        dec = model.embed_ids(args.decoder_input_ids, as_targets=model.is_encoder_decoder)
    if not model.is_encoder_decoder:
        return (dec,)
    enc = args.encoder_input_embeds
    if enc is None:
        enc = model.embed_ids(args.encoder_input_ids)
    return (enc, dec)


def _graph_root_fn(args):
    model = args.attribution_model
    attributed = get_step_function(model.default_attributed_fn_id)
    fmt = model.formatter

    def fn(*embeds: torch.Tensor) -> torch.Tensor:
        if model.is_encoder_decoder:
            batch = fmt.convert_args_to_batch(
                encoder_input_ids=args.encoder_input_ids, decoder_input_ids=args.decoder_input_ids,
                encoder_attention_mask=args.encoder_attention_mask, decoder_attention_mask=args.decoder_attention_mask,
                encoder_input_embeds=embeds[0], decoder_input_embeds=embeds[1])
        else:
            batch = fmt.convert_args_to_batch(decoder_input_ids=args.decoder_input_ids,
                                              decoder_attention_mask=args.decoder_attention_mask,
                                              decoder_input_embeds=embeds[0])
        output = model.get_forward_output(batch, use_embeddings=True)
        step_args = fmt.format_step_function_args(attribution_model=model, forward_output=output,
                                                  target_ids=args.target_ids, is_attributed_fn=True, batch=batch)
        return attributed(step_args).reshape(-1)

    return fn


def _graph_result(args, semiring: str):
    """The step's whole-graph sweep with ``semiring`` (abs/scalar maxpath), through the cache."""
    from ..api import run

    if getattr(args, "is_attributed_fn", False):
        raise InvalidInputError("the semiring_* step functions are step scores, not attribution targets (their value "
                                "is not differentiable)", where="attributed_fn",
                                fix="use them in step_scores=[...] and attribute e.g. 'probability'")
    model = args.attribution_model
    inputs = _graph_inputs(args)
    key = _result_key(semiring)
    cache = _cache()
    if not cache.lookup(model, inputs, args.target_ids):
        cache.store(model, inputs, args.target_ids, tape=None, owner=args.forward_output)
    if key not in cache.results:
        result = run(_graph_root_fn(args), inputs, semiring, tape=cache.tape, model=getattr(model, "model", None))
        cache.tape = result.tape
        cache.results[key] = result
    return cache.results[key]


def _batch_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


def graph_scores(result, name: str) -> torch.Tensor:
    """Whole-graph value per batch row of a sweep ``result``: ``"entropy"`` (pooled over every input element),
    ``"top_path"`` (max over every input element), ``"total_flow"`` / ``"log_total_flow"`` (sum of Z)."""
    raws = [r for r in result.raw if r is not None]
    batch = result.tape.root.reshape(-1).shape[0]
    if name == "top_path":
        tops = [v.amax(dim=_batch_dims(v)) if v.dim() > 1 else v.reshape(1).expand(batch) for v in result.values]
        return torch.stack(tops).amax(0).double()
    if not raws:
        zero = torch.zeros(batch, dtype=torch.float64)
        return zero - math.inf if name == "log_total_flow" else zero
    top = torch.stack([r.log_scale for r in raws]).amax()
    zs = sum(r.z.double().sum(_batch_dims(r.z)) * torch.exp(r.log_scale - top) for r in raws)
    if name == "entropy":
        us = sum(r.u.double().sum(_batch_dims(r.u)) * torch.exp(r.log_scale - top) for r in raws)
        return entropy_of(zs, us, top)
    log_z = torch.log(zs) + top
    return log_z if name == "log_total_flow" else torch.exp(log_z)


def semiring_entropy_fn(args) -> torch.Tensor:
    """Entropy (nats) of the path distribution over every path of the step's gradient graph."""
    return graph_scores(_graph_result(args, "entropy"), "entropy").float()


def semiring_top_path_fn(args) -> torch.Tensor:
    """Value of the best (abs maxpath) path of the step's gradient graph."""
    return graph_scores(_graph_result(args, "maxpath"), "top_path").float()


def semiring_total_flow_fn(args) -> torch.Tensor:
    """Total flow Z (sum over every path of prod |w|) of the step's gradient graph; inf beyond float32."""
    return graph_scores(_graph_result(args, "flow"), "total_flow").float()


def semiring_log_total_flow_fn(args) -> torch.Tensor:
    """``log Z`` (nats) of the step's gradient graph."""
    return graph_scores(_graph_result(args, "flow"), "log_total_flow").float()


_STEP_FNS = {"semiring_entropy": semiring_entropy_fn, "semiring_top_path": semiring_top_path_fn,
             "semiring_total_flow": semiring_total_flow_fn, "semiring_log_total_flow": semiring_log_total_flow_fn}
for _fn in _STEP_FNS.values():
    setattr(_fn, _MARK, True)


# ------------------------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------------------------
_STATE: dict[str, Any] = {"classes": None}


def _ours(obj) -> bool:
    return bool(getattr(obj, _MARK, False))


def is_registered() -> bool:
    from inseq.attr.feat import FeatureAttribution

    methods = FeatureAttribution.available_classes()
    return all(_ours(methods.get(m)) for m in METHODS) and all(_ours(STEP_SCORES_MAP.get(s)) for s in STEP_FUNCTIONS)


def register() -> dict[str, type]:
    """Register the four methods and the step functions with Inseq (idempotent; returns ``{method_name: class}``).

    Methods already provided by another copy of this plugin (e.g. a reloaded module) are reused, never duplicated.
    """
    from inseq.attr.feat import FeatureAttribution

    if _STATE["classes"] is None:
        existing = FeatureAttribution.available_classes()
        clash = [m for m in METHODS if m in existing and not _ours(existing[m])]
        if clash:
            raise RuntimeError(f"Inseq already has methods named {clash} that are not inseq-semiring's; cannot "
                               "register the plugin's methods without duplicating names")
        # reuse classes still alive from an earlier registration (e.g. held by a model), define the others
        classes = {m: existing[m] if m in existing else _define_method(m) for m in METHODS}
        _STATE["classes"] = classes
        module = sys.modules[__name__]
        for cls in classes.values():
            setattr(module, cls.__name__, cls)
    for name, fn in _STEP_FNS.items():
        current = STEP_SCORES_MAP.get(name)
        if current is fn:
            continue
        if current is not None and not _ours(current):
            logger.warning("inseq-semiring: a step function named %r is already registered; not replacing it", name)
            continue
        STEP_SCORES_MAP.pop(name, None)
        register_step_function(fn, name, aggregate_map={"spans": STEP_FUNCTIONS[name]})
    from . import inseq_relevance  # relevance methods (attn_lrp, cp_lrp, lrp_epsilon, attention_tracing/rollout)

    if hasattr(inseq_relevance, "register"):
        inseq_relevance.register()
    else:  # that module is being imported (its Inseq import fired the autoload hook): it registers at its end
        inseq_relevance._register_when_imported = True
    try:  # the gradient methods (deeplift_shap, guided_backprop, ...); never at the cost of the four above
        from . import inseq_gradient_methods

        inseq_gradient_methods.register()
    except Exception as e:  # pragma: no cover - reported, not raised
        warnings.warn(f"inseq-semiring could not register its gradient methods: {type(e).__name__}: {e}",
                      stacklevel=2)
    return dict(_STATE["classes"])


def unregister() -> None:
    """Undo :func:`register`: drop the step functions and the method classes (a class stays listed while something,
    e.g. a model whose current method it is, still holds an instance of it)."""
    import gc

    for name, fn in _STEP_FNS.items():
        if STEP_SCORES_MAP.get(name) is fn:
            del STEP_SCORES_MAP[name]
            DEFAULT_ATTRIBUTION_AGGREGATE_DICT["step_scores"].get("spans", {}).pop(name, None)
    module = sys.modules[__name__]
    for name in [n for n, c in vars(module).items() if isinstance(c, type) and _ours(c)]:
        delattr(module, name)
    _STATE["classes"] = None
    _cache().clear()
    from . import inseq_relevance

    inseq_relevance.unregister()
    from . import inseq_gradient_methods

    inseq_gradient_methods.unregister()
    gc.collect()


# An autoload hook that fired while this module was being imported (importing Inseq above fired it) asked for this.
if globals().pop("_register_when_imported", False):
    register()

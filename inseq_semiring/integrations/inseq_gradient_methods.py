"""Inseq plugin, part 2: the gradient methods of :mod:`inseq_semiring.methods` as Inseq attribution methods.

* ``deeplift_shap``: DeepLift with exact secant multipliers, averaged over baselines (default: the zero embeddings
  and Inseq's UNK-token baseline);
* ``guided_backprop``: Guided Backprop with the backward signal clipped at every element-wise activation;
* ``guided_integrated_gradients``: adaptive-path IG (``steps``, ``fraction``, ``max_dist``; Inseq's baseline);
* ``greedy_pig``: IG in ``rounds``, each fixing the top ``k`` tokens (``steps`` per round; Inseq's baseline);
* ``pgd_attribution``: VaPGD / PGDInp (``epsilon``, ``steps``, ``step_size``, ``norm``, ``variant``).

Each gives Inseq's granular output (one value per embedding dimension, like ``deeplift``), so ``.show()``,
``.save()``, aggregation and batching behave as for Inseq's own gradient methods. The root of each generation step is
the attributed function (``probability`` by default, or e.g. ``contrast_prob_diff``); ``attribute_target=True`` and
encoder-decoder models attribute the decoder inputs as well. ``deeplift_shap`` options: ``baseline_set``
(``"zero+unk"`` default, ``"zero"``, ``"unk"``: Inseq's baseline embeddings, i.e. the UNK token's, EOS kept; or a
list of tuples of tensors shaped like the inputs) and ``n_baselines``. ``greedy_pig`` selects whole tokens
(``per_token=True``).

Registered by :func:`inseq_semiring.integrations.inseq.register` (idempotent; :func:`register` here).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch
from captum.attr import GradientAttribution
from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry

from .. import methods as _methods
from ..errors import InvalidInputError
from .captum import select_root

__all__ = ["register", "unregister", "GRADIENT_METHODS"]

_MARK = "_inseq_semiring_plugin"

#: Inseq name -> (function, its options with defaults, whether Inseq passes baselines, docstring)
GRADIENT_METHODS: dict[str, tuple[Callable, dict[str, Any], bool, str]] = {
    "deeplift_shap": (_methods.deeplift_shap, {"baseline_set": "zero+unk", "n_baselines": None, "seed": 0}, True,
                      "DeepLiftSHAP: DeepLift with exact secant multipliers, averaged over baselines."),
    "guided_backprop": (_methods.guided_backprop, {}, False,
                        "Guided Backprop with the backward signal clipped at every element-wise activation."),
    "guided_integrated_gradients": (_methods.guided_integrated_gradients,
                                    {"steps": 200, "fraction": 0.25, "max_dist": 0.02}, True,
                                    "Guided Integrated Gradients (Kapishnikov et al. 2021)."),
    "greedy_pig": (_methods.greedy_pig, {"rounds": 4, "k": 1, "steps": 32, "rank": "value", "per_token": True},
                   True, "Greedy PIG: IG in rounds, each fixing the top-k tokens (Axiotis et al. 2023)."),
    "pgd_attribution": (_methods.pgd_attribution,
                        {"epsilon": 0.1, "steps": 10, "step_size": None, "norm": "l2", "variant": "vapgd",
                         "random_start": False, "seed": 0}, False,
                        "VaPGD / PGDInp: the PGD adversarial perturbation of the embeddings (Yin et al. 2022)."),
}

_BASELINE_CHOICES = ("zero+unk", "zero", "unk")


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, tuple) else (x,)


def _deeplift_baselines(choice, inputs: tuple, given) -> list:
    if not isinstance(choice, str):
        return choice  # user-given tensors / list of tuples
    if choice not in _BASELINE_CHOICES:
        raise InvalidInputError(f"unknown baseline_set={choice!r} for deeplift_shap", where="deeplift_shap (Inseq)",
                                fix=f"use one of {', '.join(_BASELINE_CHOICES)} or give tensors shaped like the inputs")
    zero = tuple(torch.zeros_like(x) for x in inputs)
    unk = tuple(given) if given is not None and all(isinstance(b, torch.Tensor) for b in _as_tuple(given)) else None
    if unk is not None and len(unk) != len(inputs):
        unk = None
    if choice == "zero" or unk is None:
        return [zero]
    return [unk] if choice == "unk" else [zero, unk]


class _CaptumFront(GradientAttribution):
    """A Captum-style front end of one method of :mod:`inseq_semiring.methods` (``attribute`` lists its options, so
    Inseq routes ``model.attribute(..., steps=64)`` to it)."""

    method_name = ""

    def __init__(self, forward_func, model=None) -> None:
        super().__init__(forward_func)
        self.model = model

    @property
    def multiplies_by_inputs(self) -> bool:
        return self.method_name == "deeplift_shap"

    def has_convergence_delta(self) -> bool:
        return False

    def attribute(self, inputs, additional_forward_args=None, baselines=None, target=None, **options):
        fn_, defaults, _, _ = GRADIENT_METHODS[self.method_name]
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise InvalidInputError(f"unknown option(s) {unknown} for {self.method_name}",
                                    where=f"inseq attribution method '{self.method_name}'",
                                    fix=f"use {sorted(defaults)}")
        opts = {**defaults, **{k: v for k, v in options.items() if v is not None or k == "step_size"}}
        single = isinstance(inputs, torch.Tensor)
        inputs = _as_tuple(inputs)
        extra = _as_tuple(additional_forward_args)

        def root(*xs):
            return select_root(self.forward_func(*xs, *extra), target)

        if self.method_name == "deeplift_shap":
            opts["baselines"] = _deeplift_baselines(opts.pop("baseline_set"), inputs, baselines)
        elif baselines is not None and "steps" in defaults and self.method_name != "pgd_attribution":
            opts["baselines"] = tuple(baselines) if isinstance(baselines, tuple) else (baselines,)
        out = fn_(root, inputs, model=self.model, **opts)
        return out[0] if single else out


def _front(name: str) -> type:
    _, defaults, _, _ = GRADIENT_METHODS[name]
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              *(inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
                for a in ("inputs", "additional_forward_args", "baselines", "target")),
              *(inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in defaults.items())]

    def attribute(self, *args, **kwargs):
        return _CaptumFront.attribute(self, *args, **kwargs)

    attribute.__signature__ = inspect.Signature(params)
    return type(f"_{name}_front", (_CaptumFront,), {"method_name": name, "attribute": attribute})


def _define(name: str) -> type:
    _, _, use_baselines, doc = GRADIENT_METHODS[name]
    front = _front(name)

    def __init__(self, attribution_model, **kwargs):
        GradientAttributionRegistry.__init__(self, attribution_model)
        self.method = front(self.attribution_model, model=getattr(attribution_model, "model", None))
        self.use_baselines = use_baselines

    class_name = "".join(p.capitalize() for p in name.split("_")) + "Attribution"
    cls = type(class_name, (GradientAttributionRegistry,),
               {"__doc__": doc, "__module__": __name__, "method_name": name, "__init__": __init__})
    cls.__qualname__ = class_name
    setattr(cls, _MARK, True)
    return cls


_STATE: dict[str, Any] = {"classes": None}


def register() -> dict[str, type]:
    """Register the five methods with Inseq (idempotent; returns ``{method_name: class}``)."""
    from inseq.attr.feat import FeatureAttribution

    if _STATE["classes"] is None:
        existing = FeatureAttribution.available_classes()
        clash = [m for m in GRADIENT_METHODS if m in existing and not getattr(existing[m], _MARK, False)]
        if clash:
            raise RuntimeError(f"Inseq already has methods named {clash} that are not inseq-semiring's")
        classes = {m: existing[m] if m in existing else _define(m) for m in GRADIENT_METHODS}
        _STATE["classes"] = classes
        module = sys.modules[__name__]
        for cls in classes.values():
            setattr(module, cls.__name__, cls)
    return dict(_STATE["classes"])


def unregister() -> None:
    module = sys.modules[__name__]
    for name in [n for n, c in vars(module).items() if isinstance(c, type) and getattr(c, _MARK, False)]:
        delattr(module, name)
    _STATE["classes"] = None

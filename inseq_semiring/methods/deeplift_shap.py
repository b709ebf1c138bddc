"""DeepLiftSHAP on the engine: DeepLift's rescale multipliers, exact for every operator, averaged over baselines.

For one baseline ``x'`` (Shrikumar et al., ICML 2017, "Learning Important Features Through Propagating Activation
Differences"; the rescale rule) the attribution of input element ``j`` is ``Δx_j · m_j``, where ``m`` is the
multiplier of the root swept back through the graph with each operator's *secant* multipliers between the two
forward passes (:mod:`~inseq_semiring.methods.secant_rules`). Every rule satisfies ``Δy = Σ_p M_p Δx_p`` exactly,
so completeness holds per baseline: ``Σ_j Δx_j m_j = f(x) - f(x')``.

DeepLiftSHAP (Lundberg & Lee, NeurIPS 2017, "A Unified Approach to Interpreting Model Predictions") averages the
DeepLift attributions over a distribution of baselines: ``φ = (1/K) Σ_k DeepLift(x; x'_k)``, so
``Σ φ = f(x) - mean_k f(x'_k)``.

Cost per baseline: one recorded forward pass over the baseline, one over the input (shared by all baselines) and one
reverse sweep. Both passes must take the same graph (same operators, same constants such as masks); otherwise a
clear error is raised.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError
from .secant_rules import SecantRuleSet, check_same_graph, gate_ids
from ._engine import as_baselines, as_inputs, engine_sweep, positive_int, record_tape

_WHERE = "deeplift_shap"


def deeplift(fn, inputs, baseline, *, model=None, tape=None) -> tuple[torch.Tensor, ...]:
    """DeepLift (rescale rule, exact secants) against one baseline (a tuple shaped like ``inputs``)."""
    inputs = as_inputs(inputs, "deeplift")
    base, = as_baselines(baseline, inputs, "deeplift")
    if tape is None:
        tape = record_tape(fn, inputs, model=model)
    base_tape = record_tape(fn, base, model=model)
    check_same_graph(tape, base_tape)
    rules = SecantRuleSet(baseline=base_tape, gates=gate_ids(tape))
    rules.check_coverage(tape.records, tape.model_class)
    multipliers = engine_sweep(fn, inputs, rules, tape=tape)
    return tuple((x - b) * m for x, b, m in zip(inputs, base, multipliers))


def deeplift_shap(fn, inputs, *, baselines=None, n_baselines: int | None = None, seed: int = 0,
                  model: torch.nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """DeepLiftSHAP: the mean of :func:`deeplift` over ``baselines``.

    ``baselines``: ``None`` (zeros), one tensor per input (a tuple, shaped like the inputs or broadcasting to them),
    or a list of such tuples (a distribution). ``n_baselines``: use that many baselines drawn without replacement
    from the list (a generator seeded with ``seed``); default all of them.
    """
    inputs = as_inputs(inputs, _WHERE)
    dist = as_baselines(baselines, inputs, _WHERE)
    if n_baselines is not None:
        positive_int(n_baselines, "n_baselines", _WHERE)
        if n_baselines > len(dist):
            raise InvalidInputError(f"n_baselines={n_baselines} but only {len(dist)} baseline(s) were given",
                                    where=_WHERE, fix="pass more baselines or a smaller n_baselines")
        order = torch.randperm(len(dist), generator=torch.Generator().manual_seed(seed))[:n_baselines]
        dist = [dist[int(i)] for i in order]
    tape = record_tape(fn, inputs, model=model)
    total = None
    for base in dist:
        attr = deeplift(fn, inputs, base, model=model, tape=tape)
        total = attr if total is None else tuple(t + a for t, a in zip(total, attr))
    return tuple(t / len(dist) for t in total)

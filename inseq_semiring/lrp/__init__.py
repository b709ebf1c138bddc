"""Relevance propagation on the engine: LRP-epsilon, AttnLRP, CP-LRP (:mod:`.methods`, :mod:`.edited`),
attention tracing / rollout (:mod:`.attention`). Entry points: :func:`relevance`, :func:`explain`,
:func:`coverage`."""

from .attention import attention_maps, attention_rollout, attention_tracing
from .edited import DEFAULT_EPSILON
from .methods import METHODS, RULE_TABLE, UnsupportedRelevanceOpError
from .relevance import CoverageRow, RelevanceResult, coverage, explain, relevance, relevance_semiring

__all__ = ["relevance", "explain", "relevance_semiring", "coverage", "METHODS", "RULE_TABLE", "DEFAULT_EPSILON",
           "CoverageRow", "RelevanceResult", "UnsupportedRelevanceOpError", "attention_tracing", "attention_rollout",
           "attention_maps"]

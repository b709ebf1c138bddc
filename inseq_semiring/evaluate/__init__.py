"""Faithfulness and ground-truth evaluation of attribution methods (``inseq-semiring evaluate``).

``s(x)`` is the target score (:mod:`.scoring`); tokens are ranked by each method's per-token score
(:data:`TOKEN_SCORES`, :mod:`.methods`); the metrics are comprehensiveness / sufficiency and their AOPC
(:mod:`.faithfulness`), MoRF / LeRF curves and ABPC (:mod:`.curves`), Kendall tau-b against leave-one-out
(:mod:`.agreement`), hit@1 and reciprocal rank (:mod:`.ground_truth`) and seconds. :func:`evaluate` runs them all and
writes the tables (:mod:`.runner`); data format: :mod:`.data`.
"""

from .data import DataError, Example, read_examples
from .methods import ALIASES, TOKEN_SCORES, MethodNotApplicable, TokenScore
from .runner import DEFAULT_FRACTIONS, METRIC_NAMES, EvalSummary, evaluate, metric_names
from .scoring import TargetScorer

__all__ = ["evaluate", "read_examples", "METRIC_NAMES", "TOKEN_SCORES", "metric_names", "DEFAULT_FRACTIONS",
           "DataError", "Example", "EvalSummary", "MethodNotApplicable", "TokenScore", "TargetScorer", "ALIASES"]

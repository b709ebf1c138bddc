"""The rule table. Importing this package registers every rule family."""

from . import contractions, normalization, pointwise, reductions, structural  # noqa: F401  (register rules)
from .jacobians import IndexMap, MatMul, Pointwise, Reduction, RowDense
from .registry import CONSTANT_OPS, DEFAULT_RULES, FUNCTION_RULES, RULES, Edge, RuleSet, constant_op, function_rule, rule

__all__ = ["RULES", "CONSTANT_OPS", "DEFAULT_RULES", "Edge", "RuleSet", "rule", "constant_op",
           "FUNCTION_RULES", "function_rule",
           "Pointwise", "Reduction", "IndexMap", "MatMul", "RowDense"]

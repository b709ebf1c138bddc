"""inseq-semiring: semiring backpropagation over PyTorch / Hugging Face models.

Public API (imports no Inseq): :func:`semiring_backward`, :func:`run`, :data:`SEMIRINGS`, :func:`rule`,
:class:`RuleSet`.
"""

from .api import SemiringResult, run, semiring_backward
from .errors import InvalidInputError, SemiringError, UnsupportedModelError, UnsupportedOpError
from .rules import RULES, RuleSet, rule
from .semirings import SEMIRINGS

__all__ = ["semiring_backward", "run", "SemiringResult", "SEMIRINGS", "RULES", "RuleSet", "rule",
           "SemiringError", "InvalidInputError", "UnsupportedOpError", "UnsupportedModelError"]

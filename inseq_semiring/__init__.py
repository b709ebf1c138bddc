"""inseq-semiring: semiring backpropagation over PyTorch / Hugging Face models.

Public API (imports no Inseq): :func:`semiring_backward`, :func:`run`, :data:`SEMIRINGS`, :func:`rule`,
:class:`RuleSet`.

Importing this package also registers the Inseq plugin methods (``semiring_maxpath``, ``semiring_entropy``,
``semiring_flow``, ``semiring_gradient``): at once if Inseq is already imported, otherwise as soon as it is (see
:mod:`inseq_semiring.integrations._autoload`); without Inseq installed nothing happens.
"""

from .api import SemiringResult, run, semiring_backward
from .errors import InvalidInputError, SemiringError, UnsupportedModelError, UnsupportedOpError
from .rules import RULES, RuleSet, function_rule, rule
from .semirings import SEMIRINGS

__all__ = ["semiring_backward", "run", "SemiringResult", "SEMIRINGS", "RULES", "RuleSet", "rule", "function_rule",
           "SemiringError", "InvalidInputError", "UnsupportedOpError", "UnsupportedModelError"]


def _register_inseq_plugin() -> None:
    try:
        from .integrations._autoload import register_with_inseq
    except Exception:  # pragma: no cover - never let the optional plugin break the core API
        return
    register_with_inseq()


_register_inseq_plugin()

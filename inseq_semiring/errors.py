"""Errors that say what went wrong, where, and what to do about it."""

from __future__ import annotations


def format_message(what: str, where: str | None = None, fix: str | None = None) -> str:
    """One formatter for every user-facing error: ``what`` [``where``] [``fix``]."""
    parts = [what.rstrip(".") + "."]
    if where:
        parts.append(f"Where: {where}.")
    if fix:
        parts.append(f"What to do: {fix.rstrip('.')}.")
    return " ".join(parts)


class SemiringError(Exception):
    """Base class of every error raised on purpose by inseq-semiring."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(format_message(what, where, fix))


class InvalidInputError(SemiringError, ValueError):
    """The caller passed something the engine cannot attribute (bad option, NaN input, empty text, ...)."""


class UnsupportedOpError(SemiringError, NotImplementedError):
    """One or more ATen operators on the attribution path have no rule in the rule table."""


class UnsupportedModelError(SemiringError, NotImplementedError):
    """The model does something the graph cannot represent faithfully (e.g. an in-place write into a view)."""

"""What every experiment's ``run(config, **overrides)`` does first: apply overrides, make the output folder, and
run with a given number of torch threads (restored afterwards, also on error)."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch


def with_overrides(cfg, overrides: dict):
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def output_dir(path) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clear usage error otherwise, no traceback)."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def output_folder(text: str) -> str:
    """argparse type of ``--out``: a folder that exists or can be created (checked before any work)."""
    from ..output_files import OutputPathError, check_output_folder

    try:
        check_output_folder(text, "--out")
    except OutputPathError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text

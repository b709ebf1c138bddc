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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def output_folder(text: str) -> str:
    """argparse type of ``--out``: a folder that exists or can be created (checked before any work)."""
    from ..output_files import OutputPathError, check_output_folder

    try:
        check_output_folder(text, "--out")
    except OutputPathError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text

"""Output files of the command-line tools: checked before any work, written atomically.

* :func:`check_output_file` (``--save``, ``--png``): the parent folder exists and is writable, the path is not a
  folder, and the file does not exist unless ``overwrite``. The error names the path and the flag.
* :func:`check_output_folder` (``--out``): the folder exists or can be created (its nearest existing ancestor is a
  writable folder, not a file).
* :func:`atomic_output`: the writer writes a temporary file in the same folder (same suffix, so writers that pick
  the format from it still do), renamed onto the path only when the writer returned; an interrupted or failed write
  leaves no partial file and an existing file untouched.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class OutputPathError(ValueError):
    """An output path that cannot be written (the message names the path and the flag)."""


def check_output_file(path: str | os.PathLike, flag: str, *, overwrite: bool = False) -> Path:
    out = Path(path).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise OutputPathError(f"{flag} {str(path)!r} is a folder; give a file name")
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputPathError(f"{flag} {str(path)!r}: the parent folder {str(parent)!r} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable")
    if out.exists() and not overwrite:
        raise OutputPathError(f"{flag} {str(path)!r} already exists; pass --overwrite to replace it")
    return out


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{flag} {str(path)!r} exists and is not a folder")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {str(path)!r}: the folder {str(ancestor)!r} is not writable")
    return out


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block ends normally."""
    out = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.partial-", suffix=out.suffix, dir=out.parent if str(out.parent)
                               else ".")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

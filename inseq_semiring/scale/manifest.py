"""The output folder's manifest (``manifest.json``): what the rows were computed with, and what is done.

``{"fingerprint": JobSpec.fingerprint(), "status": "running"|"complete"|"stopped"|"interrupted", "rows_done",
"rows_failed", "shards": [...], "package_version", "created", "updated"}``. A run on a folder whose fingerprint
differs (another method, option, step score, model) is refused unless ``overwrite=True``, which deletes the previous
results first. The shards on disk are the truth about which rows are done (each is renamed into place whole); the
manifest is rewritten (atomically) after every commit as a record of them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .shards import ERRORS_FILE, INSEQ_DIR, SHARD_DIR, write_json_atomic
from .spec import JobSpec, package_version

__all__ = ["MANIFEST", "OutputMismatchError", "prepare_output", "read_manifest", "update_manifest"]

MANIFEST = "manifest.json"


class OutputMismatchError(InvalidInputError):
    """The output folder holds results computed with different settings."""


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _clear(out: Path) -> None:
    for name in (SHARD_DIR, INSEQ_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (ERRORS_FILE, MANIFEST):
        (out / name).unlink(missing_ok=True)


def prepare_output(out: str | Path, spec: JobSpec, overwrite: bool = False) -> Path:
    """Create or check ``out`` for ``spec``; returns the folder. Raises :class:`OutputMismatchError` on a mismatch."""
    out = Path(out)
    new = spec.fingerprint()
    old = read_manifest(out)
    if overwrite and old is not None:
        _clear(out)
        old = None
    if old is not None and old.get("fingerprint") != new:
        diff = "; ".join(_differences(old.get("fingerprint") or {}, new))
        raise OutputMismatchError(f"the output folder holds results computed with other settings ({diff})",
                                  str(out), "use the same settings to resume, another --out folder, or "
                                            "--overwrite (overwrite=True) to delete the old results")
    elif old is None and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputMismatchError("the output folder exists, is not empty and has no manifest.json", str(out),
                                      "pass an empty or new folder, or --overwrite to use it anyway")
        _clear(out)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for stale in list(out.rglob(".*.tmp")):  # a temp file left by a killed run (never renamed into place)
        stale.unlink(missing_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = old or {"fingerprint": new, "created": now, "rows_done": 0, "rows_failed": 0, "shards": []}
    manifest.update(status="running", updated=now, package_version=package_version())
    write_json_atomic(out / MANIFEST, manifest)
    return out


def update_manifest(out: Path, **fields) -> None:
    manifest = read_manifest(out) or {}
    manifest.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json_atomic(Path(out) / MANIFEST, manifest)

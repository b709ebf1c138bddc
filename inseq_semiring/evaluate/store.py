"""The output folder of an evaluation, resumable at (example, method) granularity.

``DIR/settings.json`` holds what the numbers depend on (model, fractions, removal, baseline, seed); a run with
other settings is refused unless ``overwrite`` (which deletes the old results). ``DIR/parts/examples/<key>.json``
holds an example's target, full score and leave-one-out scores, ``DIR/parts/<method>/<key>.json`` one method's
scores, curves and metrics on it (``<key>``: a hash of the example id), ``DIR/parts/<method>/_skipped.json`` a
method that does not apply. Every file is written to a temporary name and renamed into place, so a part is whole or
absent and an interrupted run redoes only what it had not written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..output_files import atomic_output

__all__ = ["Store", "SettingsMismatchError", "write_atomic"]

OUTPUT_FILES = ("examples.parquet", "attributions.parquet", "metrics.parquet", "curves.parquet", "skipped.csv",
                "errors.jsonl", "summary.csv", "summary.md")


class SettingsMismatchError(InvalidInputError):
    """The output folder holds an evaluation made with other settings."""


def write_atomic(path: Path, writer) -> None:
    """``writer(tmp_path)`` then rename onto ``path`` (:func:`~inseq_semiring.output_files.atomic_output`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        writer(tmp)


def _key(example_id: str) -> str:
    return hashlib.sha1(example_id.encode()).hexdigest()[:20]


class Store:
    def __init__(self, out: str | Path, settings: dict[str, Any], overwrite: bool = False):
        self.out = Path(out)
        self.parts = self.out / "parts"
        path = self.out / "settings.json"
        if overwrite and self.out.exists():
            shutil.rmtree(self.parts, ignore_errors=True)
            for name in (*OUTPUT_FILES, "settings.json"):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / "figures", ignore_errors=True)
        if path.exists():
            old = json.loads(path.read_text())
            if old != settings:
                diff = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                                 if old.get(k) != settings.get(k))
                raise SettingsMismatchError(f"the output folder holds an evaluation with other settings ({diff})",
                                            where=str(self.out), fix="use the same settings to resume, another "
                                            "--out folder, or --overwrite to delete the old results")
        elif self.out.exists() and any(self.out.iterdir()):
            raise SettingsMismatchError("the output folder is not empty and holds no evaluation (settings.json)",
                                        where=str(self.out), fix="give a new or empty folder, or --overwrite")
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.rglob(".*.partial-*"):  # atomic_output's temporary names
            stale.unlink(missing_ok=True)
        write_atomic(path, lambda p: p.write_text(json.dumps(settings, indent=1, sort_keys=True)))

    def _path(self, group: str, example_id: str) -> Path:
        return self.parts / group / f"{_key(example_id)}.json"

    def get(self, group: str, example_id: str) -> dict | None:
        p = self._path(group, example_id)
        return json.loads(p.read_text()) if p.exists() else None

    def put(self, group: str, example_id: str, record: dict) -> None:
        write_atomic(self._path(group, example_id), lambda p: p.write_text(json.dumps(record)))

    def method_skipped(self, method: str) -> str | None:
        p = self.parts / method / "_skipped.json"
        return json.loads(p.read_text())["reason"] if p.exists() else None

    def skip_method(self, method: str, reason: str) -> None:
        write_atomic(self.parts / method / "_skipped.json", lambda p: p.write_text(json.dumps({"reason": reason})))

"""The single writer of an output folder: commits batch results, each row exactly once.

The driver process alone writes; workers only return results. On start the committer reads which ids are already
done (the ``id`` column of every shard) or failed (``errors.jsonl``). :meth:`Committer.commit` drops every row or
error whose id is already recorded (a retried batch whose first attempt was committed, a batch of a resumed run),
then writes the new rows as one Parquet shard ``shards/part-NNNNNN.parquet`` and, when there are new errors,
rewrites ``errors.jsonl``, each atomically. A crash between the two writes loses nothing: the rows not yet
recorded are simply attributed again on the next run.
"""

from __future__ import annotations

import json
from pathlib import Path

from .shards import ERRORS_FILE, INSEQ_DIR, SHARD_DIR, read_jsonl, read_shard_ids, shard_files, write_bytes_atomic, \
    write_shard
from .worker import BatchResult

__all__ = ["Committer"]


class Committer:
    def __init__(self, out: Path, keep_inseq: bool = False):
        self.out, self.keep_inseq = Path(out), keep_inseq
        self.done: dict[str, dict] = {}
        shards = shard_files(self.out, SHARD_DIR, ".parquet")
        for path in shards:
            for rec in read_shard_ids(path, ("id", "input", "target", "contrast")):
                self.done[rec["id"]] = rec
        self.errors: list[dict] = list(read_jsonl(self.out / ERRORS_FILE)) if (self.out / ERRORS_FILE).exists() else []
        self.failed = {e["id"] for e in self.errors}
        self.next_part = 1 + max((int(p.stem.split("-")[1]) for p in shards), default=-1)
        self.shards = [p.name for p in shards]

    def is_recorded(self, row_id: str) -> bool:
        return row_id in self.done or row_id in self.failed

    def commit(self, result: BatchResult) -> tuple[int, int]:
        """Record ``result``; returns (new rows, new errors)."""
        keep = [i for i, r in enumerate(result.rows) if not self.is_recorded(r["id"])]
        rows = [result.rows[i] for i in keep]
        errors = [e for e in result.errors if not self.is_recorded(e["id"]) and e["id"] not in {r["id"] for r in rows}]
        if rows:
            name = f"part-{self.next_part:06d}"
            if self.keep_inseq and result.inseq:
                self._write_inseq(name, [result.inseq[i] for i in keep])
            write_shard(self.out / SHARD_DIR / f"{name}.parquet", rows)
            self.next_part += 1
            self.shards.append(f"{name}.parquet")
            for r in rows:
                self.done[r["id"]] = r
        if errors:
            self.errors.extend(errors)
            self.failed.update(e["id"] for e in errors)
            data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.errors)
            write_bytes_atomic(self.out / ERRORS_FILE, data.encode())
        return len(rows), len(errors)

    def _write_inseq(self, name: str, outputs: list) -> None:
        """``inseq/part-NNNNNN/<k>.json``: the k-th row of the shard as Inseq saved it (written aside, then the
        folder is renamed into place)."""
        import os
        import shutil
        import tempfile

        folder = self.out / INSEQ_DIR
        folder.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))
        tmp.chmod(0o755)
        try:
            for k, out in enumerate(outputs):
                out.save(str(tmp / f"{k}.json"), overwrite=True)
            target = folder / name
            if target.exists():  # left by a crash after the rename but before the shard: the shard decides
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

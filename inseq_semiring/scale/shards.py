"""The Parquet shards: one file per committed batch, written atomically (temp file, then ``os.replace``).

Stable schema (``SCHEMA_VERSION`` 1), one Parquet row per dataset row:

===================== ============================ ====================================================================
column                type                         meaning
===================== ============================ ====================================================================
``id``                string                       the input row's id
``input``             string                       the input text
``target``            string                       the attributed continuation (given, or generated when absent)
``contrast``          string (null)                the contrast continuation, when the row has one
``source_tokens``     list<string>                 encoder tokens (encoder-decoder models; empty for decoder-only)
``target_tokens``     list<string>                 decoder tokens: for decoder-only models prompt + continuation
``attr_pos_start``    int32                        index in ``target_tokens`` of the first attributed (generated) token
``source_scores``     list<list<double>> (null)    ``[source token][generated token]`` scores
``target_scores``     list<list<double>> (null)    ``[target token][generated token]``; NaN where a token comes after
                                                   the generated one (not attributable)
``step_scores``       map<string, list<double>>    step score name -> one value per generated token
``method``            string                       attribution method
``options``           string                       the method options, JSON with sorted keys
``model``             string                       the model id as given
``model_fingerprint`` string                       see :func:`~inseq_semiring.scale.spec.model_fingerprint`
``package_version``   string                       inseq-semiring version that wrote the row
``seconds``           double                       wall time of this row's attribution on its worker
``worker``            string                       host:pid of the worker process
===================== ============================ ====================================================================

Granular methods (``saliency``, ``semiring_gradient``: one score per hidden dimension) are reduced to one score per
token by the L2 norm over the hidden dimension (Inseq's own default aggregation, ``vnorm``). Scores are stored as
float64 copies of Inseq's float32 values (exact).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["SCHEMA", "write_shard", "read_shard_ids", "write_json_atomic", "write_bytes_atomic", "shard_files",
           "read_jsonl", "SHARD_DIR", "INSEQ_DIR", "ERRORS_FILE"]

SHARD_DIR, INSEQ_DIR, ERRORS_FILE = "shards", "inseq", "errors.jsonl"

_SCORES = pa.list_(pa.list_(pa.float64()))
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input", pa.string()),
    ("target", pa.string()),
    ("contrast", pa.string()),
    ("source_tokens", pa.list_(pa.string())),
    ("target_tokens", pa.list_(pa.string())),
    ("attr_pos_start", pa.int32()),
    ("source_scores", _SCORES),
    ("target_scores", _SCORES),
    ("step_scores", pa.map_(pa.string(), pa.list_(pa.float64()))),
    ("method", pa.string()),
    ("options", pa.string()),
    ("model", pa.string()),
    ("model_fingerprint", pa.string()),
    ("package_version", pa.string()),
    ("seconds", pa.float64()),
    ("worker", pa.string()),
])


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def write_shard(path: Path, rows: Sequence[dict]) -> None:
    """One Parquet file with ``rows`` (dicts with the schema's columns), written atomically."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def read_shard_ids(path: Path, columns=("id",)) -> list[dict]:
    return pq.read_table(path, columns=list(columns)).to_pylist()


def shard_files(out: Path, folder: str, suffix: str) -> list[Path]:
    d = Path(out) / folder
    return sorted(p for p in d.glob(f"part-*{suffix}")) if d.is_dir() else []


def read_jsonl(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)

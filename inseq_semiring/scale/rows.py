"""Reading a dataset: JSONL, CSV or a Hugging Face ``datasets`` dataset saved to disk, as a list of :class:`Row`.

A row is ``{"id", "input", "target"?, "contrast"?}``. ``id`` is kept as a string (``7`` and ``"7"`` are the same
row) and must be unique; a file without an ``id`` column gets the row number (0-based) as id. ``target`` is the
continuation to explain (for decoder-only models the text generated *after* ``input``); without it the model
generates one. ``contrast`` is an alternative continuation: the row is then attributed with Inseq's
``contrast_prob_diff`` (p(target) - p(contrast)).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import InvalidInputError

__all__ = ["Row", "read_rows", "rows_from_records"]

FIELDS = ("id", "input", "target", "contrast")


@dataclass(frozen=True)
class Row:
    id: str
    input: str
    target: str | None = None
    contrast: str | None = None

    @property
    def length(self) -> int:
        """Characters of input + target: the batching key (a cheap, tokenizer-free proxy for token count)."""
        return len(self.input) + len(self.target or "")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # pandas/CSV missing value
        return None
    return str(value)


def rows_from_records(records: Iterable[dict], where: str = "the dataset") -> list[Row]:
    """Rows from dicts (extra keys are ignored); checks the ``input`` column exists and ids are unique."""
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InvalidInputError(f"row {i} is a {type(rec).__name__}, not an object", where,
                                    'write one JSON object per line: {"id": ..., "input": ..., "target": ...}')
        if "input" not in rec:
            raise InvalidInputError(f"row {i} has no 'input' field (fields: {', '.join(map(str, rec)) or 'none'})",
                                    where, "name the text column 'input' (and optionally 'id', 'target', 'contrast')")
        rid = _text(rec.get("id"))
        rid = str(i) if rid is None else rid
        if rid in seen:
            raise InvalidInputError(f"id {rid!r} appears twice (rows {seen[rid]} and {i})", where,
                                    "give every row a unique id")
        seen[rid] = i
        rows.append(Row(rid, _text(rec["input"]) or "", _text(rec.get("target")), _text(rec.get("contrast"))))
    if not rows:
        raise InvalidInputError("the dataset has no rows", where, "pass a file with at least one row")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"line {n} is not valid JSON ({e.msg})", str(path),
                                        "write one JSON object per line") from e
    return out


def read_rows(data: str | Path) -> list[Row]:
    """The rows of ``data``: a ``.jsonl``/``.json`` file (one object per line), a ``.csv`` file with a header, or a
    folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` must have a single split)."""
    path = Path(data)
    if not path.exists():
        raise InvalidInputError(f"dataset {str(path)!r} does not exist", None,
                                "pass a .jsonl or .csv file, or a folder saved with datasets' save_to_disk")
    if path.is_dir():
        try:
            import datasets
        except ImportError as e:
            raise InvalidInputError("reading a saved dataset folder needs the 'datasets' package", str(path),
                                    "pip install datasets, or export the rows to JSONL") from e
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise InvalidInputError(f"the saved DatasetDict has {len(ds)} splits ({', '.join(ds)})", str(path),
                                        "save the one split to attribute (ds['test'].save_to_disk(...))")
            ds = next(iter(ds.values()))
        return rows_from_records(ds.to_list(), str(path))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return rows_from_records(_read_jsonl(path), str(path))
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            return rows_from_records([{k: (v if v != "" or k == "input" else None) for k, v in r.items()}
                                      for r in reader], str(path))
    raise InvalidInputError(f"unknown dataset format {suffix or '(no suffix)'!r}", str(path),
                            "use .jsonl, .csv or .tsv, or a folder saved with datasets' save_to_disk")

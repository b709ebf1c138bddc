"""Reading an output folder back: a pandas DataFrame (one row per attributed row) or the Inseq objects."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidInputError
from .manifest import MANIFEST
from .shards import ERRORS_FILE, INSEQ_DIR, SCHEMA, SHARD_DIR, read_jsonl, shard_files

__all__ = ["load_results", "load_errors"]


def _natural(ids):
    return sorted(ids, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))


def _check(out: Path) -> None:
    if not (out / MANIFEST).exists():
        raise InvalidInputError(f"{str(out)!r} is not an attribute-dataset output folder (no {MANIFEST})", None,
                                "pass the --out folder of a dataset run")


def load_results(path: str | Path, as_inseq: bool = False):
    """The results in ``path``, sorted by id (numerically when every id is an integer).

    ``as_inseq=False``: a pandas DataFrame with the columns of :data:`~.shards.SCHEMA` (``step_scores`` as a dict
    name -> list). ``as_inseq=True``: a dict id -> ``inseq.FeatureAttributionOutput`` (one sequence each), from the
    JSON files a run with ``save_inseq=True`` wrote."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(path)
    _check(out)
    shards = shard_files(out, SHARD_DIR, ".parquet")
    if as_inseq:
        return _load_inseq(out, shards)
    tables = [pq.read_table(p, schema=SCHEMA) for p in shards]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    df = table.to_pandas()
    df["step_scores"] = [dict(v) if v is not None else {} for v in df["step_scores"]]
    order = {rid: k for k, rid in enumerate(_natural(list(df["id"])))}
    df = df.iloc[sorted(range(len(df)), key=lambda i: order[df["id"].iat[i]])].reset_index(drop=True)
    return df


def _load_inseq(out: Path, shards) -> dict:
    import inseq
    import pyarrow.parquet as pq

    found = {}
    for shard in shards:
        folder = out / INSEQ_DIR / shard.stem
        if not folder.is_dir():
            raise InvalidInputError(f"shard {shard.name} has no Inseq outputs ({INSEQ_DIR}/{shard.stem}/)", str(out),
                                    "run with save_inseq=True (--save-inseq) to keep the Inseq objects")
        ids = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
        for k, rid in enumerate(ids):
            found[rid] = inseq.FeatureAttributionOutput.load(str(folder / f"{k}.json"))
    return {rid: found[rid] for rid in _natural(list(found))}


def load_errors(path: str | Path) -> list[dict]:
    """The rows that failed: ``{"id", "kind", "message", "worker"}`` each."""
    out = Path(path)
    _check(out)
    return list(read_jsonl(out / ERRORS_FILE)) if (out / ERRORS_FILE).exists() else []

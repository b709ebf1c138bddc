"""Dataset-scale attribution: every row of a JSONL/CSV/``datasets`` file, in-process or on a pool of Ray actors.

:func:`attribute_dataset` writes one result per input row to Parquet shards (schema: :mod:`.shards`) in an output
folder with a manifest (:mod:`.manifest`); a re-run resumes, a dead worker's batch is retried on another, a failing
row goes to ``errors.jsonl``. :func:`load_results` reads the folder back. Ray is optional
(``pip install 'inseq-semiring[scale]'``) and imported only when ``workers > 0``.

Modules: :mod:`.rows` (reading), :mod:`.batching` (length buckets), :mod:`.spec` (what decides the numbers),
:mod:`.worker` (one model, row-by-row attribution, per-row errors), :mod:`.shards` (Parquet schema, atomic writes),
:mod:`.manifest`, :mod:`.commit` (the single writer, dedupe by id), :mod:`.local` and :mod:`.ray_pool` (executors),
:mod:`.progress`, :mod:`.runner`, :mod:`.results`.
"""


__all__ = ["attribute_dataset", "load_results", "load_errors", "RunSummary"]

_HOMES = {"attribute_dataset": "runner", "load_results": "results", "load_errors": "results", "RunSummary": "progress"}


def __getattr__(name: str):
    """Lazy exports: importing the package (e.g. the CLI's parser) needs neither pyarrow nor pandas nor Ray."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

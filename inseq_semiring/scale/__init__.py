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

from .progress import RunSummary
from .results import load_errors, load_results
from .runner import attribute_dataset

__all__ = ["attribute_dataset", "load_results", "load_errors", "RunSummary"]

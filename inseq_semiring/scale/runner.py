"""``attribute_dataset``: read rows, skip those already recorded, batch, run (in-process or on Ray), commit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidInputError
from .batching import plan_batches
from .commit import Committer
from .manifest import OutputMismatchError, prepare_output, update_manifest
from .progress import Progress, RunSummary
from .rows import Row, read_rows, rows_from_records
from .spec import DEFAULT_MODEL, JobSpec

__all__ = ["attribute_dataset", "RunInterrupted"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`attribute_dataset`, after a clean stop; ``summary`` says what was committed."""

    def __init__(self, summary: RunSummary):
        super().__init__(summary.to_text())
        self.summary = summary


def _check_method(method: str, options: dict) -> None:
    import inseq

    from ..integrations.inseq import register

    registry = register()
    known = inseq.list_feature_attribution_methods()
    if method not in known:
        raise InvalidInputError(f"unknown attribution method {method!r}", "method",
                                f"use one of {', '.join(sorted(known))}")
    if method in registry:  # the package's own methods validate their options before any model is loaded
        registry[method].check_options({k: v for k, v in options.items()
                                        if k in ("sign", "granularity", "decomposition")})


def _gpus_default() -> float:
    try:
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    except Exception:  # pragma: no cover
        return 0.0


def _check_same_rows(committer: Committer, rows: Sequence[Row], out: Path) -> None:
    for row in rows:
        old = committer.done.get(row.id)
        if old is None:
            continue
        # a generated target is stored as generated: compare it only when the row gives one
        same = old["input"] == row.input and old["contrast"] == row.contrast and \
            (row.target is None or old["target"] == row.target)
        if not same:
            raise OutputMismatchError(f"row {row.id!r} was attributed with another text (stored input "
                                      f"{old['input']!r}, now {row.input!r})", str(out),
                                      "keep ids stable across runs, or use --overwrite / another --out folder")


def attribute_dataset(data: str | Path | Sequence[dict], out: str | Path, model: str = DEFAULT_MODEL,
                      method: str = "semiring_maxpath", *, workers: int = 0, address: str | None = None,
                      batch_size: int = 8, step_scores: Sequence[str] = (), options: dict[str, Any] | None = None,
                      max_new_tokens: int = 5, overwrite: bool = False, num_cpus: int | None = None,
                      num_gpus: float | None = None, threads: int | None = None, save_inseq: bool = False,
                      max_batches: int | None = None, progress: bool = True, warmup: bool = False,
                      _exit_during_batch: int | None = None, _exit_flag: str | None = None) -> RunSummary:
    """Attribute every row of ``data`` with ``method`` and write the results to ``out`` (resumable).

    ``data``: a JSONL/CSV path, a folder saved with ``datasets``' ``save_to_disk``, or a list of dicts with
    ``id``, ``input`` and optionally ``target`` / ``contrast``. ``workers=0``: in-process; ``workers=N``: N Ray
    actors (a local cluster with ``num_cpus`` CPUs, started and shut down here, unless Ray is initialised already
    or ``address`` names a cluster). ``num_gpus`` per actor defaults to 1 when CUDA is available here.
    ``threads``: torch threads per worker (Ray: CPUs reserved per actor, default 1). ``options``: method options,
    passed to ``model.attribute``. ``save_inseq``: also keep each shard's Inseq output as JSON under ``inseq/``.
    ``max_batches``: stop after committing that many batches (a re-run continues). ``warmup``: each worker
    attributes one throw-away row when it starts (timings then exclude first-call costs). Returns a
    :class:`~.progress.RunSummary`; Ctrl-C stops cleanly (committed batches stay, the rest is redone on a re-run)
    and raises :class:`RunInterrupted` (a ``KeyboardInterrupt`` carrying the summary). ``overwrite``: delete the
    results already in ``out`` first (otherwise a folder made with other settings is refused). The leading-underscore arguments are a fault-injection hook for tests.
    """
    options = dict(options or {})
    if workers < 0:
        raise InvalidInputError(f"workers={workers} is negative", "workers", "pass 0 (in-process) or more")
    _check_method(method, options)
    gpus = _gpus_default() if num_gpus is None else float(num_gpus)
    spec = JobSpec(model=model, method=method, options=options, step_scores=tuple(step_scores),
                   max_new_tokens=max_new_tokens, device="cuda" if gpus > 0 else "cpu")
    if workers == 0:
        from .local import LocalExecutor

        executor = LocalExecutor(spec, threads=threads, keep_inseq=save_inseq, warmup=warmup)
    else:
        from .ray_pool import RayExecutor

        executor = RayExecutor(spec, workers, address=address, num_cpus=num_cpus, num_gpus=gpus,
                               threads=threads or 1, keep_inseq=save_inseq, exit_during_batch=_exit_during_batch,
                               exit_flag=_exit_flag, warmup=warmup)
    rows = rows_from_records(list(data)) if isinstance(data, (list, tuple)) else read_rows(data)
    out = prepare_output(out, spec, overwrite=overwrite)
    committer = Committer(out, keep_inseq=save_inseq)
    _check_same_rows(committer, rows, out)
    todo = [r for r in rows if not committer.is_recorded(r.id)]
    skipped = len(rows) - len(todo)
    batches = plan_batches(todo, batch_size) if todo else []

    done = failed = committed = 0
    status, interrupted = "complete", None
    t_start = t_loop = time.perf_counter()
    startup = 0.0
    bar = None
    try:
        if batches:
            executor.start()
        startup = time.perf_counter() - t_start
        t_loop = time.perf_counter()
        bar = Progress(len(todo), enabled=progress)
        results = executor.map_unordered(batches)
        try:
            for result in results:
                n_rows, n_err = committer.commit(result)
                done, failed, committed = done + n_rows, failed + n_err, committed + 1
                bar.advance(n_rows, n_err)
                update_manifest(out, rows_done=len(committer.done), rows_failed=len(committer.failed),
                                shards=committer.shards)
                if max_batches is not None and committed >= max_batches and committed < len(batches):
                    status = "stopped"
                    break
        finally:
            results.close()
    except KeyboardInterrupt as e:
        status, interrupted = "interrupted", e
    except BaseException:
        status = "failed"
        raise
    finally:
        wall = time.perf_counter() - t_loop
        if bar is not None:
            bar.close()
        executor.close()
        update_manifest(out, status=status, rows_done=len(committer.done), rows_failed=len(committer.failed),
                        shards=committer.shards)
        summary = RunSummary(str(out), status, len(rows), done, failed, skipped, wall, startup,
                             max(workers, 1), getattr(executor, "deaths", 0))
    if interrupted is not None:
        raise RunInterrupted(summary) from interrupted
    return summary

"""In-process execution: one :class:`~.worker.AttributionWorker` in the calling process, batches in order."""

from __future__ import annotations

from typing import Iterable, Iterator

from .batching import Batch
from .spec import JobSpec
from .worker import AttributionWorker, BatchResult

__all__ = ["LocalExecutor"]


class LocalExecutor:
    workers = 1

    def __init__(self, spec: JobSpec, threads: int | None = None, keep_inseq: bool = False, warmup: bool = False):
        self.spec, self.threads, self.keep_inseq, self.warmup = spec, threads, keep_inseq, warmup

    def start(self) -> None:
        self.worker = AttributionWorker(self.spec, threads=self.threads, keep_inseq=self.keep_inseq,
                                        warmup=self.warmup)

    def map_unordered(self, batches: Iterable[Batch]) -> Iterator[BatchResult]:
        for batch in batches:
            yield self.worker.attribute_batch(batch)

    def close(self) -> None:
        self.worker = None

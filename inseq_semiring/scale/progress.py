"""Progress bar (rows/s, ETA) and the final summary of a dataset run."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

__all__ = ["Progress", "RunSummary"]


@dataclass
class RunSummary:
    """``status``: ``complete`` (every row recorded), ``stopped`` (``max_batches`` reached), ``interrupted``
    (Ctrl-C) or ``failed`` (an unexpected error; the committed rows stay)."""

    out: str
    status: str
    rows_total: int  # rows in the dataset
    rows_done: int  # attributed by this run
    rows_failed: int  # recorded as errors by this run
    rows_skipped: int  # already recorded before this run (resume)
    wall_seconds: float  # attribution loop only (after the workers are ready)
    startup_seconds: float  # starting Ray / the workers and loading the model
    workers: int
    worker_deaths: int = 0

    @property
    def rows_per_second(self) -> float:
        n = self.rows_done + self.rows_failed
        return n / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def rows_per_second_per_worker(self) -> float:
        return self.rows_per_second / max(self.workers, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "rows_per_second": self.rows_per_second,
                "rows_per_second_per_worker": self.rows_per_second_per_worker}

    def to_text(self) -> str:
        return (f"{self.status}: {self.rows_done} rows attributed, {self.rows_failed} failed, {self.rows_skipped} "
                f"skipped (already done) of {self.rows_total}; {self.wall_seconds:.1f} s "
                f"(+{self.startup_seconds:.1f} s start-up), {self.rows_per_second:.2f} rows/s, "
                f"{self.rows_per_second_per_worker:.2f} rows/s per worker ({self.workers})"
                + (f"; {self.worker_deaths} worker(s) died, their batches were retried" if self.worker_deaths else "")
                + f" -> {self.out}")


class Progress:
    """A tqdm bar over rows (``rows/s`` and ETA are tqdm's), or nothing when ``enabled`` is false."""

    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="row", desc="attributing", file=sys.stderr, dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def advance(self, rows: int, failed: int) -> None:
        if self.bar is not None:
            self.bar.update(rows + failed)
            if failed:
                self.bar.set_postfix_str(f"failed={failed}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

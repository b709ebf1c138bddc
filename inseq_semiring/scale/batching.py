"""Length-bucketed batches: rows sorted by length (ties keep input order), then cut into consecutive chunks.

Rows of similar length land in the same batch, so batches cost about the same (work balances across workers) and a
padded batch wastes little. The plan is a pure function of the rows and the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import InvalidInputError
from .rows import Row

__all__ = ["Batch", "plan_batches"]


@dataclass(frozen=True)
class Batch:
    index: int
    rows: tuple[Row, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rows)


def plan_batches(rows: Sequence[Row], batch_size: int) -> list[Batch]:
    if batch_size < 1:
        raise InvalidInputError(f"batch size {batch_size} is not positive", "batch_size", "pass 1 or more")
    order = sorted(range(len(rows)), key=lambda i: (rows[i].length, i))
    chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return [Batch(b, tuple(rows[i] for i in chunk)) for b, chunk in enumerate(chunks)]

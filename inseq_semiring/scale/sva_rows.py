"""Rows for a dataset run from the package's subject-verb agreement templates (the README's worked example).

    python -m inseq_semiring.scale.sva_rows [--per-cell 20] [--seed 0] > sva.jsonl

One JSON object per line: ``id`` (the item number), ``input`` (the prefix the model reads), ``target`` (" " + the
verb form that agrees with the subject), ``contrast`` (" " + the other form, so the row is attributed with
``contrast_prob_diff``: p(correct) - p(wrong)), plus ``condition`` and ``cell`` (ignored by the run; keep them to
join the results back: ``load_results(out).merge(pd.read_json("sva.jsonl", lines=True).astype({"id": str}))``).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..experiments.sva import generate_items

__all__ = ["sva_rows"]


def sva_rows(per_cell: int = 20, seed: int = 0) -> list[dict]:
    return [{"id": it.id, "input": it.prefix, "target": " " + it.correct, "contrast": " " + it.wrong,
             "condition": it.condition, "cell": it.cell} for it in generate_items(per_cell=per_cell, seed=seed)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write SVA template rows as JSONL (stdout).")
    ap.add_argument("--per-cell", type=int, default=20, help="items in each of the 10 cells (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for row in sva_rows(args.per_cell, args.seed):
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Dataset attribution throughput: a plain ``model.attribute`` loop vs ``attribute_dataset`` in-process and on Ray.

    python benchmarks/bench_dataset.py [--items 200] [--methods semiring_maxpath semiring_entropy saliency]
                                       [--workers 1 2] [--batch-size 4] [--json FILE]

Items: the package's subject-verb agreement templates (``inseq_semiring/data/sva_templates.json``), input = the
prefix, target = " " + the correct verb; model: the embedded SmolLM2-135M-Instruct; one torch thread per worker.
For each method, in this order and each with a freshly loaded model that first attributes one throw-away row:

* ``plain``: ``for row: model.attribute(row.input, row.input + row.target, method=...)`` in this process;
* ``in-process``: ``attribute_dataset(workers=0)`` (adds checks, Parquet commits, the manifest);
* ``ray N``: ``attribute_dataset(workers=N)`` on a local Ray cluster of N CPUs.

Printed per configuration: loop wall time (start-up - Ray, actors, model load - reported apart), rows/s, the
wall-time ratio to ``plain`` (wall / plain wall - 1), the median per-row attribution time (``model.attribute``
alone, measured inside the worker: the ``seconds`` column), the **framework overhead per row**
``(wall * N - sum of per-row attribution times) / rows``: the time a worker spends on anything but attributing
(scheduling, moving results, checks, Parquet commits, idling), and that overhead as a fraction of the median row
time; for N > 1 the scaling efficiency ``rows/s(N) / (N * rows/s(1))``. One run per configuration (a full pass is
long). On a shared machine the attribution time itself drifts with the load between configurations; the framework
overhead is measured within one run and does not depend on that drift.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from inseq_semiring.experiments.sva import generate_items  # noqa: E402
from inseq_semiring.scale import attribute_dataset, load_results  # noqa: E402
from inseq_semiring.scale.spec import JobSpec  # noqa: E402
from inseq_semiring.scale.worker import load_attribution_model  # noqa: E402


def sva_rows(n: int) -> list[dict]:
    items = generate_items(per_cell=max(1, -(-n // 10)))
    step = max(1, len(items) // n)
    picked = items[::step][:n]  # spread over the 10 cells
    return [{"id": it.id, "input": it.prefix, "target": " " + it.correct} for it in picked]


def plain_loop(rows: list[dict], method: str) -> tuple[float, list[float]]:
    am = load_attribution_model(JobSpec(method=method))
    am.attribute("The keys to the cabinet", "The keys to the cabinet are", show_progress=False)  # warm-up
    per_row = []
    t0 = time.perf_counter()
    for r in rows:
        t = time.perf_counter()
        am.attribute(r["input"], r["input"] + r["target"], method=method, show_progress=False)
        per_row.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    del am
    return wall, per_row


def dataset_run(rows, method, workers, batch_size):
    out = tempfile.mkdtemp(prefix="bench-dataset-")
    try:
        s = attribute_dataset(rows, out, method=method, workers=workers, num_cpus=max(workers, 1), threads=1,
                              batch_size=batch_size, progress=False, warmup=True)
        assert s.rows_done == len(rows) and s.rows_failed == 0, s.to_text()
        per_row = list(load_results(out)["seconds"])
        return s.wall_seconds, s.startup_seconds, per_row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--methods", nargs="*", default=["semiring_maxpath", "semiring_entropy", "saliency"])
    ap.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--items-saliency", type=int, default=None, help="items for saliency (default: --items)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per worker, batch size {args.batch_size}")
    results = []
    for method in args.methods:
        n = args.items_saliency if (method == "saliency" and args.items_saliency) else args.items
        rows = sva_rows(n)
        configs = [("plain", None), ("in-process", 0)] + [(f"ray {w}", w) for w in args.workers]
        base = rate1 = None
        for name, workers in configs:
            if workers is None:
                wall, per_row = plain_loop(rows, method)
                startup = float("nan")
            else:
                wall, startup, per_row = dataset_run(rows, method, workers, args.batch_size)
            rate = len(rows) / wall
            base = wall if base is None else base
            if workers == 1:
                rate1 = rate
            eff = rate / (workers * rate1) if workers and workers > 1 and rate1 else float("nan")
            med = statistics.median(per_row)
            framework = (wall * max(workers or 1, 1) - sum(per_row)) / len(rows)
            rec = {"method": method, "config": name, "items": len(rows), "wall_s": wall, "startup_s": startup,
                   "rows_per_s": rate, "wall_vs_plain": wall / base - 1, "median_row_s": med,
                   "framework_overhead_per_row_s": framework, "framework_overhead_fraction": framework / med,
                   "scaling_efficiency": eff}
            results.append(rec)
            print(f"{method:18s} {name:10s} n={len(rows):4d} wall {wall:8.1f} s  start-up {startup:6.1f} s  "
                  f"{rate:6.3f} rows/s  wall vs plain {100 * rec['wall_vs_plain']:+6.1f}%  median row {med:.3f} s  "
                  f"overhead/row {framework:.3f} s ({100 * framework / med:+.1f}%)"
                  + (f"  efficiency {eff:.2f}" if eff == eff else ""),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

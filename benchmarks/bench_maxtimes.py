"""Benchmark of max_times against torch.mm of the same shape (1 thread, float32).

    python benchmarks/bench_maxtimes.py [--repeats 7] [--threads 1] [--dtype float32]

Prints one row per (shape, backend, argmax): the median time of ``--repeats`` runs and its
ratio to the median time of ``torch.mm`` on the same operands, everything measured in this
process. The first line says how long loading the C++ extension took (a compile on the very
first use on a machine, a cache load afterwards).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from inseq_semiring.kernels import maxtimes as mt  # noqa: E402

SHAPES = [(64, 3072, 768), (64, 768, 3072)]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    backend = mt.active_backend()  # builds or loads the extension
    load_s = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, median of {args.repeats}")
    print(f"C++ extension: {backend!r} (first use in this process took {load_s:.1f} s)")
    backends = ["cpp", "torch"] if backend == "cpp" else ["torch"]

    g = torch.Generator().manual_seed(0)
    header = f"{'m x k x n':<16} {'backend':<7} {'argmax':<6} {'time ms':>9} {'mm ms':>7} {'x mm':>7}"
    print(header)
    print("-" * len(header))
    for m, k, n in SHAPES:
        a = torch.randn(m, k, generator=g, dtype=dtype)
        b = torch.randn(k, n, generator=g, dtype=dtype)
        for be in backends:
            reps = args.repeats if be == "cpp" else max(3, args.repeats // 2)
            for arg in (False, True):
                t_mm = median_time(lambda: torch.mm(a, b), args.repeats)
                t = median_time(lambda: mt.max_times(a, b, argmax=arg, _backend=be), reps)
                t_mm = (t_mm + median_time(lambda: torch.mm(a, b), args.repeats)) / 2
                shape = f"{m}x{k}x{n}"
                print(f"{shape:<16} {be:<7} {str(arg):<6} {t * 1e3:9.2f} {t_mm * 1e3:7.2f} {t / t_mm:7.2f}")


if __name__ == "__main__":
    main()

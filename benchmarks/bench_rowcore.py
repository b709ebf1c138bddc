"""Benchmark of the fused layer-norm core pulls (C++ kernel vs the torch fallback).

    python benchmarks/bench_rowcore.py [--rows 64] [--n 768] [--dtype float32] [--threads 1] [--repeats 7]

Times ``core_pull_sum(xh, p)``, ``core_pull_sum(xh, p, q, pb)`` and ``core_pull_max(xh, p)`` on
both backends, everything in this process. Each row shows the median wall time and the median
thread CPU time (``time.thread_time``: on a shared machine this leaves out the time the thread
waited for a core, so it is the steadier number) and the speed-up over the torch fallback. The
first line says how long loading the C++ extension took (a compile on the very first use on a
machine, a cache load afterwards).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from inseq_semiring.kernels import rowcore as rc  # noqa: E402


def median_times(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--n", type=int, default=768)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    backend = rc.active_backend()  # builds or loads the extension
    load_s = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, R={args.rows}, n={args.n}, "
          f"median of {args.repeats}")
    print(f"C++ extension: {backend!r} (first use in this process took {load_s:.1f} s)")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.n, generator=g, dtype=torch.float64)
    xh = torch.nn.functional.layer_norm(x, (args.n,)).to(dtype)
    p = torch.rand(args.rows, args.n, generator=g, dtype=torch.float64).to(dtype)
    q = torch.randn(args.rows, args.n, generator=g, dtype=torch.float64).to(dtype)
    pb = torch.rand(args.rows, args.n, generator=g, dtype=torch.float64).to(dtype)

    cases = [
        ("sum (p)", lambda be: rc.core_pull_sum(xh, p, _backend=be)),
        ("sum (p, q, pb)", lambda be: rc.core_pull_sum(xh, p, q, pb, _backend=be)),
        ("max (p)", lambda be: rc.core_pull_max(xh, p, _backend=be)),
    ]
    backends = ["cpp", "torch"] if backend == "cpp" else ["torch"]
    header = f"{'variant':<16} {'backend':<7} {'wall ms':>9} {'cpu ms':>9} {'x torch (cpu)':>14}"
    print(header)
    print("-" * len(header))
    for name, fn in cases:
        res = {be: median_times(lambda: fn(be), args.repeats) for be in backends}
        for be in backends:
            wall, cpu = res[be]
            speed = res["torch"][1] / cpu
            print(f"{name:<16} {be:<7} {wall * 1e3:>9.2f} {cpu * 1e3:>9.2f} {speed:>13.1f}x")


if __name__ == "__main__":
    main()

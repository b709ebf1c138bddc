"""The reverse sweep alone (no forward pass) of each semiring on the tiny models of ``bench_overhead.py``.

Same models, inputs and root as :mod:`bench_overhead` (imported from it). Per model: a first ``isr.run(...,
model=model)`` builds the shape's plan; one tape is then recorded with that plan, and each row times only the sweep
of that tape (``inseq_semiring.api.sweep_tape``: the tape's plan replayed, as ``isr.run`` does) against one
``torch.autograd.grad`` forward+backward in the same process. Median of ``--repeats`` of the process CPU time, rows
timed round-robin (one call of each per round, after a warm-up round); ``µs / record``: sweep CPU time per record.
``= run``: whether the sweep's values equal those of a full ``isr.run`` call, bit for bit.

    python benchmarks/bench_sweep.py [--tokens 16] [--repeats 5] [--threads 1] [--models 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_overhead import METHODS as OVERHEAD_METHODS  # noqa: E402
from bench_overhead import MODELS, median_times, prepare, recording  # noqa: E402

#: (row label, semiring, options); None = the autograd baseline: bench_overhead's rows up to the tensor granularity
#: ones (no one-off or compiled rows: the sweep of a recorded tape is the same for them).
METHODS = [("autograd.grad (forward + backward)" if ring is None else label, ring, options)
           for label, ring, options in OVERHEAD_METHODS[:9]]


def _sweeper():
    """``api.sweep_tape``, or on a tree without it (main before this benchmark) the same steps inline."""
    from inseq_semiring import api

    if hasattr(api, "sweep_tape"):
        return api.sweep_tape
    from inseq_semiring.rules.weight_cache import sweep_scope
    from inseq_semiring.traversal import sweep

    def sweep_tape(tape, inputs, semiring, *, sign="abs", granularity="scalar", backpointers=False, rules=None):
        ring = api.make_semiring(semiring, sign=sign, granularity=granularity, backpointers=backpointers)
        inputs = api._check_inputs(inputs)
        api._check_root(tape)
        trail = {}
        plan = tape.plan
        with torch.no_grad(), sweep_scope({} if plan is None else plan.memo()):
            env = sweep(tape, ring, ring.seed(tape.root), on_complete=trail.__setitem__ if backpointers else None,
                        plan_rules=None if plan is None else plan.rules)
            raw = tuple(env.get(tid) for tid in tape.input_ids)
            return api.SemiringResult(tuple(ring.finalize(r, x) for r, x in zip(raw, inputs)), raw, tape, ring,
                                      trail)
    return sweep_tape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(str(i) for i in range(len(MODELS))))
    ap.add_argument("--only", default="", help="comma-separated row labels to time (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import inseq_semiring as isr

    sweep_tape = _sweeper()
    methods = [m for m in METHODS if not args.only or m[0] in args.only.split(",") or m[1] is None]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"# sweep only, tiny models, {args.tokens} tokens, float32, CPU, threads={args.threads}, median of "
          f"{args.repeats} (process CPU time); load average {' '.join(load)}")
    print("| model | records | method | CPU ms | × autograd | µs / record | = run | wall ms |")
    print("|---|---:|---|---:|---:|---:|:-:|---:|")
    for i in (int(s) for s in args.models.split(",")):
        label, make = MODELS[i]
        model, emb, root = prepare(make, args.tokens)
        isr.run(root, emb, "gradient", model=model)  # builds the shape's plan
        tape = recording(model, emb, root)()
        assert tape.plan is not None, "the tape was not recorded with the shape's plan"
        records = len(tape.records)
        fns, same = {}, {}
        for name, semiring, options in methods:
            if semiring is None:
                def fn():
                    e = emb.clone().requires_grad_(True)
                    return torch.autograd.grad(root(e), e)[0]
            else:
                fn = (lambda s=semiring, o=options: sweep_tape(tape, emb, s, **o))
                full = isr.run(root, emb, semiring, model=model, **options).values
                same[name] = all(torch.equal(a, b) for a, b in zip(fn().values, full))
            fns[name] = fn
        times = median_times(fns, args.repeats)
        base = times[methods[0][0]][0]
        for name, semiring, _ in methods:
            cpu, wall = times[name]
            eq = "-" if semiring is None else ("yes" if same[name] else "NO")
            print(f"| {label} | {records} | {name} | {cpu * 1e3:.2f} | {cpu / base:.2f} | {cpu * 1e6 / records:.1f} "
                  f"| {eq} | {wall * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

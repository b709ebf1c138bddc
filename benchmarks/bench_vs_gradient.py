"""Time and peak memory of each semiring sweep relative to one ordinary gradient, in the same process.

Model: a GPT-2-small-shaped random model (12 layers, hidden 768, 12 heads, vocab 50257), eager attention.
Root: log-probability of one next token at the last position. Each timing includes the method's own forward pass;
the baseline is ``torch.autograd.grad`` of the same root w.r.t. ``inputs_embeds`` (forward + backward), called
alternately with each method (each ratio is against the baseline's median over the same stretch of time).
Memory: in a fresh subprocess per method (model built and the compiled kernels loaded first: their libraries are a
one-off per process, printed once below), the peak extra memory of one call: resident set size
sampled every millisecond on CPU minus the RSS just before the call; ``torch.cuda.max_memory_allocated`` on CUDA;
and the whole process's peak (model weights included). The recording columns time the forward pass under the recording
dispatch mode alone (``graph.recorder.record``, the same tape for every semiring) and give its share of each
method's time (as a ratio of the two ratios to the baseline). By default constant weights are mapped (``|W|``,
``-|W| log |W|``) block by block inside each pull and nothing is kept between calls; the last columns time the opt-in
cache of whole mapped weights (``INSEQ_SEMIRING_WEIGHT_CACHE_MB=3072``, warm) and give its size.

The signed max-path rows (``sign="positive"`` / ``"negative"``, scalar, and tensor granularity with back-pointers)
have no target against the gradient; their target is against the abs mode (``benchmarks/bench_signed_maxpath.py``).

``--compile``: every method runs with ``model=model, compile=True`` (the forward captured once by TorchDynamo and
replayed without the dispatch mode, :mod:`inseq_semiring.graph.compiled`); the recording columns then time that
replayed forward (``record_compiled``) instead.

``--cpu-time``: on CPU the seconds are the process's CPU time (with one thread, the call's own work; a shared
machine's other tenants then do not count), not the wall clock.

    python benchmarks/bench_vs_gradient.py [--tokens 16 64 256] [--layers 12] [--repeats 3] [--threads 1] [--compile]
        [--cpu-time]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import torch

#: (row label, semiring, options)
METHODS = [("gradient", "gradient", {}), ("flow", "flow", {}), ("entropy", "entropy", {}),
           ("maxpath", "maxpath", {"sign": "abs"}),
           ("maxpath positive", "maxpath", {"sign": "positive"}), ("maxpath negative", "maxpath", {"sign": "negative"}),
           ("maxpath positive, tensor + back-pointers", "maxpath",
            {"sign": "positive", "granularity": "tensor", "backpointers": True}),
           ("maxpath negative, tensor + back-pointers", "maxpath",
            {"sign": "negative", "granularity": "tensor", "backpointers": True})]
#: Issue 11's time targets (x one autograd.grad) at 64 tokens; at other lengths 0.3 more.
TARGETS = {"gradient": 1.15, "flow": 1.3, "entropy": 2.0, "maxpath": 1.6}
#: --compile: keyword arguments every method call gets (set in main / child)
RUN_OPTIONS: dict = {}


def target_for(name: str, tokens: int) -> float | None:
    t = TARGETS.get(name)
    return None if t is None else (t if tokens == 64 else t + 0.3)


def build(layers: int, device: str, dtype=torch.float32):
    import transformers

    cfg = transformers.GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_call(model, tokens: int, device: str):
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    emb = model.get_input_embeddings()(ids).detach()

    def root(e):
        logits = model(inputs_embeds=e, use_cache=False).logits
        return torch.log_softmax(logits[:, -1], -1)[:, 42].sum()

    return root, emb


def one_call(name: str, model, root, emb):
    import inseq_semiring as isr

    if name == "autograd":
        e = emb.clone().requires_grad_(True)
        return torch.autograd.grad(root(e), e)[0]
    semiring, opts = {label: (ring, o) for label, ring, o in METHODS}[name]
    extra = dict(RUN_OPTIONS, model=model) if RUN_OPTIONS else {}
    return isr.run(root, emb, semiring, **opts, **extra).values[0]


def record_only(model, root, emb):
    """The recording part of every semiring call: the forward pass under the dispatch mode (no sweep), or with
    --compile the replayed forward."""
    from inseq_semiring.graph.recorder import record

    if RUN_OPTIONS.get("compile"):
        from inseq_semiring.graph.compiled import record_compiled

        return record_compiled(root, [emb], model=model)
    return record(root, [emb])


def timed_against(fn, base, device: str, repeats: int) -> tuple[float, float]:
    """Medians of ``fn`` and of the baseline ``base``, called alternately (a shared machine's load drifts: each
    ratio is taken against the baseline measured in the same stretch of time)."""
    ts, bs = [], []
    for _ in range(repeats):
        bs.append(timed(base, device, 1))
        ts.append(timed(fn, device, 1))
    return statistics.median(ts), statistics.median(bs)


#: --cpu-time: time CPU calls by the process's CPU time (a shared machine's other tenants then cost nothing)
CLOCK = {"now": time.perf_counter}


def timed(fn, device: str, repeats: int) -> float:
    clock = CLOCK["now"] if device != "cuda" else time.perf_counter
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times)


CACHE_MB = "3072"


def peak_memory(name: str, tokens: int, layers: int, device: str, threads: int) -> dict:
    """Peak extra memory (MiB) of a first call, in a fresh subprocess (default settings: no mapped-weight cache)."""
    env = {k: v for k, v in os.environ.items() if k != "INSEQ_SEMIRING_WEIGHT_CACHE_MB"}
    out = subprocess.run([sys.executable, __file__, "--child", name, *(["--compile"] if RUN_OPTIONS else []),
                          "--tokens", str(tokens), "--layers",
                          str(layers), "--device", device, "--threads", str(threads)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextmanager
def weight_cache_on():
    from inseq_semiring.rules.weight_cache import cache_bytes, clear

    os.environ["INSEQ_SEMIRING_WEIGHT_CACHE_MB"] = CACHE_MB
    try:
        yield cache_bytes
    finally:
        del os.environ["INSEQ_SEMIRING_WEIGHT_CACHE_MB"]
        clear()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Peak resident set size while the block runs, sampled every millisecond by a thread (CPU)."""

    def __enter__(self):
        self.before = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def load_kernels() -> None:
    """Load every compiled kernel (a one-off per process: their shared libraries are ~20 MiB of resident memory)."""
    from inseq_semiring.kernels import maxtimes, rowcore, signed_rowcore, xlogx

    for kernel in (maxtimes, rowcore, xlogx, signed_rowcore):
        kernel.EXTENSION.load()


def child(args) -> None:
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.device)
    root, emb = make_call(model, args.tokens[0], args.device)
    before_libs = _rss_bytes()
    load_kernels()  # not part of a call's memory: once per process, for every method alike
    libs = (_rss_bytes() - before_libs) / 2**20
    if RUN_OPTIONS and args.child != "autograd":
        one_call(args.child, model, root, emb)  # the capture call: the measured call is a replay
        import ctypes
        import gc

        gc.collect()
        try:  # hand the capture's freed pages back, so that the replay's peak shows in the resident set size
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        one_call(args.child, model, root, emb)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        total = torch.cuda.max_memory_allocated() / 2**20
    else:
        import gc

        gc.collect()
        with _PeakRSS() as watch:
            one_call(args.child, model, root, emb)
        peak = (watch.peak - watch.before) / 2**20
        total = watch.peak / 2**20
    print(json.dumps({"peak_mib": peak, "total_mib": total, "kernel_libraries_mib": libs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--methods", nargs="+", default=None, help="only these rows (labels in METHODS; autograd always)")
    ap.add_argument("--compile", action="store_true", help="run every method with compile=True (see above)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="on CPU, time by the process's CPU time instead of the wall clock (1 thread: the call's own work)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile:
        RUN_OPTIONS["compile"] = True
    if args.child:
        return child(args)
    if args.cpu_time:
        CLOCK["now"] = time.process_time
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.device)
    from inseq_semiring.kernels.maxtimes import active_backend

    print(f"# GPT-2-small-shaped random model, {args.layers} layers, device={args.device}, threads={args.threads}, "
          f"max-times backend={active_backend(args.device)}{', compile=True' if args.compile else ''}"
          f"{', seconds of process CPU time' if args.cpu_time and args.device != 'cuda' else ''}")
    print("| tokens | method | seconds | × autograd | target | extra peak MiB | × autograd | process peak MiB | "
          "× autograd | recording s | recording share | opt-in weight cache: seconds | × autograd | cache MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    os.environ.pop("INSEQ_SEMIRING_WEIGHT_CACHE_MB", None)
    names = [m for m, _, _ in METHODS if args.methods is None or m in args.methods]
    for tokens in args.tokens:
        root, emb = make_call(model, tokens, args.device)
        for name in ["autograd"] + names:
            one_call(name, model, root, emb)  # warm-up (kernel build, allocator)
        grad = lambda: one_call("autograd", model, root, emb)  # noqa: E731
        base = timed(grad, args.device, args.repeats)
        record_only(model, root, emb)
        rec, rec_base = timed_against(lambda: record_only(model, root, emb), grad, args.device, args.repeats)
        mem = {}
        if not args.no_memory:
            for name in ["autograd"] + names:
                mem[name] = peak_memory(name, tokens, args.layers, args.device, args.threads)
            print(f"# {tokens} tokens: loading the compiled kernels (once per process, before the measured call) "
                  f"took {mem['autograd'].get('kernel_libraries_mib', 0):.0f} MiB resident", flush=True)
        for name in ["autograd"] + names:
            call = lambda n=name: one_call(n, model, root, emb)  # noqa: E731
            t, tb = (base, base) if name == "autograd" else timed_against(call, grad, args.device, args.repeats)
            cached = ["-"] * 3
            if name != "autograd":
                with weight_cache_on() as cache_bytes:
                    call()  # fills the cache
                    tc, bc = timed_against(call, grad, args.device, args.repeats)
                    cached = [f"{tc:.3f}", f"{tc / bc:.2f}", f"{cache_bytes() / 2**20:.0f}"]
            target = target_for(name, tokens)
            cells = ["-"] * 4
            if mem:
                m, b = mem[name], mem["autograd"]
                cells = [f"{m['peak_mib']:.0f}", f"{m['peak_mib'] / max(b['peak_mib'], 1):.2f}",
                         f"{m['total_mib']:.0f}", f"{m['total_mib'] / max(b['total_mib'], 1):.2f}"]
            label = "autograd.grad" if name == "autograd" else name
            cells += ["-", "-"] if name == "autograd" else [f"{rec:.3f}", f"{(rec / rec_base) / (t / tb):.2f}"]
            print(f"| {tokens} | {label} | {t:.3f} | {t / tb:.2f} | {'≤ %.2f' % target if target else '-'} | "
                  + " | ".join(cells + cached) + " |", flush=True)


if __name__ == "__main__":
    main()

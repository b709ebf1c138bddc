"""Time and peak memory of each semiring sweep relative to one ordinary gradient, in the same process.

Model: a GPT-2-small-shaped random model (12 layers, hidden 768, 12 heads, vocab 50257), eager attention.
Root: log-probability of one next token at the last position. Each timing includes the method's own forward pass;
the baseline is ``torch.autograd.grad`` of the same root w.r.t. ``inputs_embeds`` (forward + backward).
Memory: in a fresh subprocess per method (model built first), the peak extra memory of one call: resident set size
sampled every millisecond on CPU minus the RSS just before the call; ``torch.cuda.max_memory_allocated`` on CUDA.
Measured twice: with the mapped-weight cache (``|W|``, ``-|W| log |W|``; filled by that first call and kept for later
calls) and with it disabled (``INSEQ_SEMIRING_WEIGHT_CACHE_MB=0``); and the whole process's peak (model weights
included, cache on). Timings use the default (cache on, warm).

    python benchmarks/bench_vs_gradient.py [--tokens 16 64 256] [--layers 12] [--repeats 3] [--threads 1]
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

import torch

METHODS = [("gradient", {}), ("flow", {}), ("entropy", {}), ("maxpath", {"sign": "abs"})]
TARGETS = {"gradient": 1.5, "flow": 2.5, "entropy": 3.0, "maxpath": 5.0}


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
    opts = dict(METHODS)[name]
    return isr.semiring_backward(root, emb, name, **opts)[0]


def timed(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(name: str, tokens: int, layers: int, device: str, threads: int, cache: bool) -> dict:
    """Peak extra memory (MiB) of a first call and the mapped-weight cache size, in a fresh subprocess."""
    env = {**os.environ, "INSEQ_SEMIRING_WEIGHT_CACHE_MB": os.environ.get("INSEQ_SEMIRING_WEIGHT_CACHE_MB", "3072")
           if cache else "0"}
    out = subprocess.run([sys.executable, __file__, "--child", name, "--tokens", str(tokens), "--layers",
                          str(layers), "--device", device, "--threads", str(threads)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def child(args) -> None:
    from inseq_semiring.rules.weight_cache import cache_bytes

    torch.set_num_threads(args.threads)
    model = build(args.layers, args.device)
    root, emb = make_call(model, args.tokens[0], args.device)
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
    print(json.dumps({"peak_mib": peak, "cache_mib": cache_bytes() / 2**20, "total_mib": total}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.device)
    from inseq_semiring.kernels.maxtimes import active_backend

    print(f"# GPT-2-small-shaped random model, {args.layers} layers, device={args.device}, threads={args.threads}, "
          f"max-times backend={active_backend(args.device)}")
    print("| tokens | method | seconds | × gradient | target | extra peak MiB | × gradient | extra peak MiB, no weight "
          "cache | × gradient | mapped-weight cache MiB | process peak MiB (model included) | × gradient |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        root, emb = make_call(model, tokens, args.device)
        for name in ["autograd"] + [m for m, _ in METHODS]:
            one_call(name, model, root, emb)  # warm-up (kernel build, allocator, mapped-weight cache)
        base = timed(lambda: one_call("autograd", model, root, emb), args.device, args.repeats)
        mem = {}
        if not args.no_memory:
            for name in ["autograd"] + [m for m, _ in METHODS]:
                mem[name] = (peak_memory(name, tokens, args.layers, args.device, args.threads, True),
                             peak_memory(name, tokens, args.layers, args.device, args.threads, False))
        for name in ["autograd"] + [m for m, _ in METHODS]:
            t = base if name == "autograd" else timed(lambda n=name: one_call(n, model, root, emb), args.device,
                                                       args.repeats)
            target = TARGETS.get(name)
            cells = ["-"] * 7
            if mem:
                cached, uncached = mem[name]
                base_mem = mem["autograd"][0]["peak_mib"]
                cells = [f"{cached['peak_mib']:.0f}", f"{cached['peak_mib'] / max(base_mem, 1):.2f}",
                         f"{uncached['peak_mib']:.0f}", f"{uncached['peak_mib'] / max(base_mem, 1):.2f}",
                         f"{cached['cache_mib']:.0f}", f"{cached['total_mib']:.0f}",
                         f"{cached['total_mib'] / max(mem['autograd'][0]['total_mib'], 1):.2f}"]
            label = "autograd.grad" if name == "autograd" else name
            print(f"| {tokens} | {label} | {t:.3f} | {t / base:.2f} | {'≤ %.1f' % target if target else '-'} | "
                  + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

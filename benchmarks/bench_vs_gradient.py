"""Time and peak memory of each semiring sweep relative to one ordinary gradient, in the same process.

Model: a GPT-2-small-shaped random model (12 layers, hidden 768, 12 heads, vocab 50257), eager attention.
Root: log-probability of one next token at the last position. Each timing includes the method's own forward pass;
the baseline is ``torch.autograd.grad`` of the same root w.r.t. ``inputs_embeds`` (forward + backward).
Memory: peak resident set size of a fresh subprocess doing one call, minus the same process's RSS just before it.

    python benchmarks/bench_vs_gradient.py [--tokens 16 64 256] [--layers 12] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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


def peak_memory(name: str, tokens: int, layers: int, device: str, threads: int) -> float:
    """Peak extra memory (MiB) of one call, in a fresh subprocess."""
    out = subprocess.run([sys.executable, __file__, "--child", name, "--tokens", str(tokens), "--layers",
                          str(layers), "--device", device, "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def child(args) -> None:
    import resource

    torch.set_num_threads(args.threads)
    model = build(args.layers, args.device)
    root, emb = make_call(model, args.tokens[0], args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        one_call(args.child, model, root, emb)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        import psutil  # noqa: F401  (optional) -- fall back below

        before = psutil.Process().memory_info().rss
        one_call(args.child, model, root, emb)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20
    print(json.dumps({"peak_mib": peak}))


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
    print("| tokens | method | seconds | × gradient | target | peak MiB | × gradient mem |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        root, emb = make_call(model, tokens, args.device)
        for name in ["autograd"] + [m for m, _ in METHODS]:
            one_call(name, model, root, emb)  # warm-up (kernel build, allocator)
        base = timed(lambda: one_call("autograd", model, root, emb), args.device, args.repeats)
        base_mem = None if args.no_memory else peak_memory("autograd", tokens, args.layers, args.device, args.threads)
        rows = [("autograd.grad", base, None, base_mem)]
        for name, _ in METHODS:
            t = timed(lambda n=name: one_call(n, model, root, emb), args.device, args.repeats)
            mem = None if args.no_memory else peak_memory(name, tokens, args.layers, args.device, args.threads)
            rows.append((name, t, TARGETS[name], mem))
        for name, t, target, mem in rows:
            mem_s = "-" if mem is None else f"{mem:.0f}"
            ratio_mem = "-" if mem is None or base_mem is None else f"{mem / max(base_mem, 1e-9):.2f}"
            print(f"| {tokens} | {name} | {t:.3f} | {t / base:.2f} | {'≤ %.1f' % target if target else '-'} "
                  f"| {mem_s} | {ratio_mem} |", flush=True)


if __name__ == "__main__":
    main()

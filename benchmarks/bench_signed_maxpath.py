"""Signed scalar maxpath (M+ / M-) against the abs mode and a plain gradient, in the same process.

Models: the fixture BERT ``bert_2layer_s3_T16`` (``../shared/fixtures/brunoflow`` or ``tests/fixtures/brunoflow``:
2 layers, hidden 32, 4 heads; its position table is extended by repetition when more tokens than it has are asked
for) at 32 / 128 / 512 tokens, root ``logits[0, 0]``; and the GPT-2-small shape (12 layers, hidden 768, random
weights, eager attention) at 64 tokens, root the log-probability of one next token. Each timing is
``isr.run(..., model=m)`` with its own forward pass; the baseline is ``torch.autograd.grad`` (forward + backward).
float32, median of ``--repeats`` of the process CPU time (one thread: the call's own work, robust when other
processes share the cores), with the wall-clock median alongside; the modes and the baseline run round-robin.

``--profile``: seconds spent in the semiring's pulls per Jacobian kind (one extra run per mode).

    python benchmarks/bench_signed_maxpath.py [--tokens 32 128 512] [--gpt2-tokens 64] [--repeats 5] [--profile]
    python benchmarks/bench_signed_maxpath.py --tokens --gpt2-tokens 16 64 256 --modes abs "abs + back-pointers"
        (issue 11's maxpath rows against autograd, CPU time)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = "bert_2layer_s3_T16"
MODES = [("abs", {"sign": "abs"}), ("positive", {"sign": "positive"}), ("negative", {"sign": "negative"}),
         ("positive, tensor + back-pointers", {"sign": "positive", "granularity": "tensor", "backpointers": True}),
         ("abs + back-pointers", {"sign": "abs", "backpointers": True}),
         ("positive + back-pointers", {"sign": "positive", "backpointers": True})]
#: Modes run unless --modes names others (the back-pointer rows are asked for: issue 11's maxpath variants).
DEFAULT_MODES = ["abs", "positive", "negative", "positive, tensor + back-pointers"]


def fixture_dir() -> Path:
    for base in (ROOT.parent.parent / "shared" / "fixtures" / "brunoflow", ROOT.parent / "shared" / "fixtures"
                 / "brunoflow", ROOT / "tests" / "fixtures" / "brunoflow"):
        if (base / FIXTURE).is_dir():
            return base / FIXTURE
    raise SystemExit(f"fixture {FIXTURE} not found (looked in ../shared/fixtures/brunoflow and tests/fixtures)")


def bert(tokens: int):
    import transformers as tf

    model = tf.BertForSequenceClassification.from_pretrained(fixture_dir(), attn_implementation="eager").eval()
    pos = model.bert.embeddings.position_embeddings
    if tokens > pos.num_embeddings:  # extend the position table (repeat it): timing only, values are irrelevant
        reps = -(-tokens // pos.num_embeddings)
        new = torch.nn.Embedding(pos.num_embeddings * reps, pos.embedding_dim)
        new.weight.data.copy_(pos.weight.data.repeat(reps, 1))
        model.bert.embeddings.position_embeddings = new
        model.bert.embeddings.register_buffer("position_ids", torch.arange(new.num_embeddings).unsqueeze(0),
                                              persistent=False)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (1, tokens), generator=g)
    emb = model.get_input_embeddings()(ids).detach()
    return model, emb, (lambda e: model(inputs_embeds=e).logits[0, 0])


def gpt2_small(tokens: int):
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=g)
    emb = model.get_input_embeddings()(ids).detach()

    def root(e):
        logits = model(inputs_embeds=e, use_cache=False).logits
        return torch.log_softmax(logits[:, -1], -1)[:, 42].sum()

    return model, emb, root


def interleaved_times(calls: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median wall-clock and median process CPU seconds of ``repeats`` calls of each function (after one warm-up
    call each), run round-robin so that a slow phase of a shared machine hits every mode alike. With one thread the
    CPU time is the call's own work, also when other processes share the machine's cores."""
    for fn in calls.values():
        fn()  # warm-up
    wall = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in calls}


def autograd_call(fn, emb):
    e = emb.clone().requires_grad_(True)
    return torch.autograd.grad(fn(e), e)[0]


def profile(model, emb, fn, opts) -> dict[str, float]:
    """CPU seconds in the semiring's pulls per Jacobian kind, and of the whole sweep (the tape recorded once before)."""
    from inseq_semiring.graph.model_state import attribution_mode
    from inseq_semiring.graph.recorder import record
    from inseq_semiring.semirings.maxpath import MaxPath
    from inseq_semiring.traversal import sweep

    spent: dict[str, float] = defaultdict(float)

    class TimedMaxPath(MaxPath):
        def pull(self, kind, value, origin):
            t0 = time.process_time()
            out = super().pull(kind, value, origin)
            spent[type(kind).__name__] += time.process_time() - t0
            return out

    with attribution_mode(model):
        tape = record(fn, (emb,), model=model)
    ring = TimedMaxPath(**opts)
    with torch.no_grad():
        t0 = time.process_time()
        sweep(tape, ring, ring.seed(tape.root))
        spent["whole sweep"] = time.process_time() - t0
    return dict(spent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[32, 128, 512])
    ap.add_argument("--gpt2-tokens", type=int, nargs="*", default=[64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="*", default=DEFAULT_MODES, help=f"any of {[m for m, _ in MODES]}")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import inseq_semiring as isr

    modes = [(m, o) for m, o in MODES if m in args.modes]
    print(f"# signed maxpath, float32, CPU, threads={args.threads}, median of {args.repeats}; "
          f"inseq_semiring from {Path(isr.__file__).parent}")
    print("| model | tokens | mode | CPU ms | × abs | × autograd | wall ms |")
    print("|---|---:|---|---:|---:|---:|---:|")
    cases = [("fixture BERT", bert, t) for t in args.tokens] + [("GPT-2-small shape", gpt2_small, t)
                                                                 for t in args.gpt2_tokens]
    profiles = []
    for label, build, tokens in cases:
        model, emb, fn = build(tokens)
        calls = {"autograd": lambda: autograd_call(fn, emb)}
        for mode, opts in modes:
            calls[mode] = lambda o=opts: isr.run(fn, emb, "maxpath", model=model, **o)
        times = interleaved_times(calls, args.repeats)
        base = times.pop("autograd")
        if args.profile:
            profiles += [(label, tokens, mode, profile(model, emb, fn, opts)) for mode, opts in modes]
        print(f"| {label} | {tokens} | autograd.grad | {base[1] * 1e3:.1f} | - | 1.00 | {base[0] * 1e3:.1f} |",
              flush=True)
        for mode, (wall, cpu) in times.items():
            rel = f"{cpu / times['abs'][1]:.2f}" if "abs" in times else "-"
            print(f"| {label} | {tokens} | maxpath {mode} | {cpu * 1e3:.1f} | {rel} | {cpu / base[1]:.1f} | "
                  f"{wall * 1e3:.1f} |", flush=True)
    if profiles:
        print("\n| model | tokens | mode | seconds in pulls per kind |")
        print("|---|---:|---|---|")
        for label, tokens, mode, spent in profiles:
            cells = ", ".join(f"{k} {v:.3f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1]))
            print(f"| {label} | {tokens} | {mode} | {cells} |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

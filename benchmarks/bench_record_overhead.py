"""Cost of recording with grad mode on (the recorder now runs ``fn`` as autograd would, to see ``no_grad`` blocks and
custom Functions): ``record`` time and a gradient-semiring ``run`` relative to ``torch.autograd.grad`` of the same
root, in the same process. Median of ``--repeats``; run it with ``PYTHONPATH`` set to each tree to compare.

    python benchmarks/bench_record_overhead.py [--layers 4] [--tokens 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import inseq_semiring as isr
from inseq_semiring.graph.recorder import record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(cfg).eval()
    emb = model.get_input_embeddings()(torch.randint(0, 50257, (1, args.tokens))).detach()
    fn = lambda e: torch.log_softmax(model(inputs_embeds=e, use_cache=False).logits[0, -1], -1)[11]  # noqa: E731

    def grad():
        e = emb.clone().requires_grad_(True)
        torch.autograd.grad(fn(e), e)

    def timed(f):
        f()
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    g = timed(grad)
    r = timed(lambda: record(fn, (emb,), model=model))
    s = timed(lambda: isr.run(fn, emb, "gradient", model=model))
    print(f"{isr.__file__}: autograd.grad {g * 1e3:.0f} ms; record {r * 1e3:.0f} ms ({r / g:.2f}x); "
          f"run(gradient) {s * 1e3:.0f} ms ({s / g:.2f}x)  [{args.layers} layers, {args.tokens} tokens, 1 thread]")


if __name__ == "__main__":
    main()

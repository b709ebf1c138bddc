"""Time of each relevance method relative to one ordinary gradient, in the same process.

Model: a GPT-2-small-shaped random model (12 layers, hidden 768, 12 heads, vocab 50257), eager attention, float32.
Root: the logit of one next token at the last position. Each timing includes the method's own forward pass (the
recording); the baseline is ``torch.autograd.grad`` of the same root w.r.t. ``inputs_embeds`` (forward + backward).
Medians over ``--repeats`` rounds after one warm-up call each; every round times all methods one after the other
(round-robin), and ratios are against the baseline measured in the same process.

    python benchmarks/bench_relevance.py [--tokens 64] [--layers 12] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _gpt2_small import gpt2_small  # benchmarks/ is on sys.path when a script runs

#: method -> target ratio (issue 9)
TARGETS = {"lrp_epsilon": 1.3, "attn_lrp": 1.3, "cp_lrp": 1.3, "attention_tracing": 1.2, "attention_rollout": 1.2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import inseq_semiring.lrp as lrp

    model = gpt2_small(args.layers)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    emb = model.get_input_embeddings()(ids).detach()

    def root(e):
        return model(inputs_embeds=e, use_cache=False).logits[:, -1, 42].sum()

    def autograd():
        e = emb.clone().requires_grad_(True)
        return torch.autograd.grad(root(e), e)[0]

    import inseq_semiring as isr

    calls = {"autograd": autograd,
             "gradient semiring": lambda: isr.semiring_backward(root, emb, "gradient")}  # the engine, no LRP rules
    for m in ("lrp_epsilon", "attn_lrp", "cp_lrp"):
        calls[m] = lambda m=m: lrp.relevance(root, emb, m, model=model)
    calls["attention_tracing"] = lambda: lrp.attention_tracing(root, emb, model=model)
    calls["attention_rollout"] = lambda: lrp.attention_rollout(root, emb, model=model)
    from inseq_semiring.lrp.relevance import record_tape

    calls["record only"] = lambda: record_tape(root, (emb,), model)

    for fn in calls.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):  # round-robin, so that a change in the machine's load hits every method alike
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    times = {name: statistics.median(ts) for name, ts in samples.items()}
    base = times["autograd"]
    print(f"GPT-2-small shape, {args.layers} layers, {args.tokens} tokens, {args.threads} thread(s), "
          f"median of {args.repeats}; autograd.grad forward+backward = {base * 1e3:.0f} ms")
    print(f"{'method':<20s} {'ms':>8s} {'x gradient':>11s} {'target':>7s}")
    for name, t in times.items():
        if name == "autograd":
            continue
        target = TARGETS.get(name)
        mark = "" if target is None else ("  met" if t / base <= target else "  NOT met")
        print(f"{name:<20s} {t * 1e3:8.0f} {t / base:11.2f} {'' if target is None else f'<= {target}':>7s}{mark}")


if __name__ == "__main__":
    main()

"""Time of each gradient method of :mod:`inseq_semiring.methods` as a multiple of one plain gradient, in one process.

Model: a GPT-2-small-shaped random model (12 layers, hidden 768, 12 heads, vocab 50257), eager attention, float32,
``--tokens`` tokens (64), ``--threads`` CPU threads (1). Root: the log-probability of one next token at the last
position. The unit is ``torch.autograd.grad`` of that root w.r.t. ``inputs_embeds`` (forward + backward). Every
ratio is the median over ``--repeats`` (5) rounds of (method time / time of as many gradients as the method counts,
measured in the same round just before), which keeps the drift of a shared machine out of the ratios; each timing includes the method's own forward
passes. Targets (issue 10):
``guided_backprop`` <= 1.3x; ``deeplift`` (one baseline: two recorded forward passes, one sweep) <= 2.5x, and
``deeplift_shap`` with K baselines <= 2.5x per baseline; the path methods at most their number of gradients + 10%.

    python benchmarks/bench_methods.py [--tokens 64] [--layers 12] [--repeats 5] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _gpt2_small import gpt2_small  # benchmarks/ is on sys.path when a script runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from inseq_semiring import methods

    model = gpt2_small(args.layers)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    emb = model.get_input_embeddings()(ids).detach()
    unk = model.get_input_embeddings()(torch.zeros_like(ids)).detach()

    def root(e):
        logits = model(inputs_embeds=e, use_cache=False).logits
        return torch.log_softmax(logits[:, -1], -1)[:, 42]

    def gradient():
        e = emb.clone().requires_grad_(True)
        torch.autograd.grad(root(e).sum(), e)

    steps = 8
    import inseq_semiring as isr

    cases = [  # name, call, number of gradients (the target unit), target ratio
        ("engine gradient (semiring_backward)", lambda: isr.semiring_backward(root, (emb,), "gradient"), 1, None),
        ("guided_backprop", lambda: methods.guided_backprop(root, (emb,), model=model), 1, 1.3),
        ("deeplift (1 baseline)", lambda: methods.deeplift(root, (emb,), (unk,), model=model), 1, 2.5),
        ("deeplift_shap (2 baselines)", lambda: methods.deeplift_shap(
            root, (emb,), baselines=[(torch.zeros_like(emb),), (unk,)], model=model), 2, 2.5),
        (f"guided_integrated_gradients (steps={steps})", lambda: methods.guided_integrated_gradients(
            root, (emb,), baselines=(unk,), steps=steps, model=model), steps, 1.1),
        (f"greedy_pig (rounds=2, steps={steps // 2})", lambda: methods.greedy_pig(
            root, (emb,), baselines=(unk,), rounds=2, steps=steps // 2, per_token=True, model=model), steps, 1.1),
        (f"pgd_attribution (steps={steps})", lambda: methods.pgd_attribution(root, (emb,), steps=steps, model=model),
         steps, 1.1),
    ]

    def clock(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    gradient()
    units = []
    rows = []
    for name, fn, n_grads, target in cases:
        fn()  # warm-up
        pairs = []
        for _ in range(args.repeats):
            g = clock(lambda: [gradient() for _ in range(n_grads)])  # as many gradients as the method counts
            pairs.append((clock(fn), g))
            units.append(g / n_grads)
        per_unit = statistics.median(t / g for t, g in pairs)
        rows.append({"method": name, "seconds": statistics.median(t for t, _ in pairs), "ratio": per_unit * n_grads,
                     "per_unit": per_unit, "gradients": n_grads, "target": target})
    unit = statistics.median(units)
    rows.insert(0, {"method": "autograd.grad (unit)", "seconds": unit, "ratio": 1.0, "per_unit": 1.0,
                    "target": None})
    print(f"GPT-2-small shape, {args.layers} layers, {args.tokens} tokens, {args.threads} thread(s), median of "
          f"{args.repeats}")
    print("| method | seconds | × gradient | × per baseline / per gradient counted | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        tgt = "" if r["target"] is None else f"≤ {r['target']}"
        print(f"| {r['method']} | {r['seconds']:.3f} | {r['ratio']:.2f} | {r['per_unit']:.2f} | {tgt} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

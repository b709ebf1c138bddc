"""Cost of ``inseq-semiring evaluate`` per example: each method's seconds, and the evaluation's own overhead.

Model: the embedded SmolLM2-135M-Instruct on the ``text`` suite's prefixes (``--model smollm2``, default; methods
through Inseq, as the runner computes them), or a GPT-2-small-shaped random model on random ``--tokens`` token ids
(``--model gpt2-small``; methods through the direct backend). ``--threads`` torch threads (1).

Per example, in one process:

* ``forward``: one scoring forward of the unperturbed input (the unit of the ratios);
* ``method``: the method's per-token scores, timed exactly as the runner times its ``seconds`` metric
  (``_Evaluator.token_scores``);
* the **evaluation overhead**, the re-scored forward passes: ``loo`` (``s(x)`` and the ``n`` leave-one-out inputs:
  one batched forward, once per example) and ``curves`` (the ``2n - 1`` distinct MoRF / LeRF inputs of one
  ranking, which contain every comprehensiveness / sufficiency fraction: one batched forward per example and
  method), and for comparison ``curves_unbatched`` (the same inputs, one forward each).

Every number is the median over ``--examples`` examples x ``--repeats`` repeats (>= 5 measurements in all).

    python benchmarks/bench_evaluate.py [--model smollm2|gpt2-small] [--examples 5] [--repeats 1]
        [--methods saliency,semiring_maxpath,...] [--tokens 32] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DEFAULT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "semiring_gradient", "semiring_maxpath",
                   "semiring_entropy", "semiring_flow", "lrp_epsilon", "attn_lrp", "random")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "gpt2-small"))
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--tokens", type=int, default=32, help="input length of the gpt2-small examples")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.examples * args.repeats < 5:
        ap.error("--examples x --repeats must be >= 5 (median of at least 5)")

    from inseq_semiring.evaluate import TargetScorer
    from inseq_semiring.evaluate.curves import curve_sets
    from inseq_semiring.evaluate.data import Example
    from inseq_semiring.evaluate.methods import canonical_method, random_scores
    from inseq_semiring.evaluate.ranking import rank
    from inseq_semiring.evaluate.runner import _Evaluator

    methods = [canonical_method(m) for m in args.methods.split(",") if m.strip()]
    if args.model == "smollm2":
        from inseq_semiring.experiments.faithfulness import text_rows
        from inseq_semiring.models.smollm2 import load_smollm2

        model, tok = load_smollm2()
        scorer = TargetScorer(model, "causal", tokenizer=tok)
        examples = []
        for row in text_rows(args.examples):
            enc = tok(row["text"], return_special_tokens_mask=True)
            examples.append(Example(row["id"], 0, list(enc.input_ids), [bool(m) for m in enc.special_tokens_mask],
                                    tok.convert_ids_to_tokens(enc.input_ids), text=row["text"]))
        use_inseq = True
    else:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _gpt2_small import gpt2_small

        model = gpt2_small(args.layers)
        scorer = TargetScorer(model, "causal", tokenizer=None)
        g = torch.Generator().manual_seed(1)
        examples = []
        for i in range(args.examples):
            ids = torch.randint(0, model.config.vocab_size, (args.tokens,), generator=g).tolist()
            examples.append(Example(f"r{i}", 0, ids, [False] * len(ids), [str(t) for t in ids]))
        use_inseq = False
    ev = _Evaluator(scorer, (0.1, 0.2, 0.3, 0.4, 0.5), 0, use_inseq=use_inseq)

    times: dict[str, list[float]] = {k: [] for k in ("forward", "loo", "curves", "curves_unbatched", *methods)}
    rows_per: dict[str, list[int]] = {"loo": [], "curves": []}
    lengths = []
    for ex in examples:
        rec = ev.example_record(ex)  # target, s(x), loo (also warms up the model and Inseq)
        if use_inseq:
            ev.token_scores("saliency", ex, rec)
        lengths.append(rec["n"])
        for _ in range(args.repeats):
            times["forward"].append(_timed(lambda: scorer.scores([ex.input_ids], rec["target"]))[0])
            times["loo"].append(_timed(lambda: ev.example_record(ex))[0])
            order = rank(random_scores(len(ex.input_ids), 0, ex.id), ex.removable)
            morf, lerf = curve_sets(order)
            distinct = list(dict.fromkeys(morf[1:] + lerf[1:]))
            inputs = [scorer.perturb(ex.input_ids, s) for s in distinct]
            times["curves"].append(_timed(lambda: scorer.scores(inputs, rec["target"]))[0])
            times["curves_unbatched"].append(
                _timed(lambda: [scorer.scores([r], rec["target"]) for r in inputs])[0])
            rows_per["loo"].append(1 + rec["n"])
            rows_per["curves"].append(len(inputs))
            for m in methods:
                times[m].append(ev.token_scores(m, ex, rec)[1])

    med = {k: statistics.median(v) for k, v in times.items()}
    unit = med["forward"]
    print(f"model {args.model}, {len(examples)} examples (removable tokens: median {statistics.median(lengths)}, "
          f"range {min(lengths)}-{max(lengths)}), {args.repeats} repeat(s), {args.threads} thread(s); "
          f"medians over {len(times['forward'])} measurements")
    print(f"\n{'component':<28}{'seconds':>10}{'x forward':>11}  inputs")
    print(f"{'forward (s(x) only)':<28}{unit:>10.4f}{1.0:>11.2f}  1")
    print(f"{'loo (once per example)':<28}{med['loo']:>10.4f}{med['loo'] / unit:>11.2f}  "
          f"{statistics.median(rows_per['loo'])} in 1 batched forward")
    print(f"{'curves (per method)':<28}{med['curves']:>10.4f}{med['curves'] / unit:>11.2f}  "
          f"{statistics.median(rows_per['curves'])} in 1 batched forward")
    print(f"{'curves, one forward each':<28}{med['curves_unbatched']:>10.4f}"
          f"{med['curves_unbatched'] / unit:>11.2f}  (batching gains {med['curves_unbatched'] / med['curves']:.1f}x)")
    print(f"\n{'method':<30}{'method s':>10}{'x forward':>11}{'overhead s':>12}{'overhead / method':>19}")
    for m in methods:
        over = med["curves"] + med["loo"] / len(methods)
        ratio = f"{over / med[m]:>19.2f}" if med[m] >= 1e-3 else f"{'-':>19}"
        print(f"{m:<30}{med[m]:>10.4f}{med[m] / unit:>11.2f}{over:>12.4f}{ratio}")
    print("\noverhead per example and method = curves + loo / (number of methods): the loo forward is shared by "
          "every method of a run.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "median_seconds": med, "rows": rows_per, "lengths": lengths}, fh, indent=2)


if __name__ == "__main__":
    main()

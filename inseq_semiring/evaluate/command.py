"""``inseq-semiring evaluate --data F.jsonl --methods a,b,c --out DIR [--model M] [--fractions 0.1,0.2,...]
[--removal delete|replace] [--workers N] [--limit K] [--skip-bad] [--overwrite]``: :func:`~.runner.evaluate` from
the command line (progress with ETA on stderr; the summary line on stdout). ``--suite ftro|agreement|text`` instead
of ``--data`` runs a built-in suite (:mod:`inseq_semiring.experiments.faithfulness`: its data and model, its default
methods unless ``--methods``)."""

from __future__ import annotations

import argparse

from ..experiments._common import nonnegative_int, positive_int
from .methods import ALIASES, TOKEN_SCORES

__all__ = ["add_parser", "run"]


def _fractions(text: str) -> list[str]:
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give fractions in (0, 1], e.g. 0.1,0.2,0.3")
    return parts


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="faithfulness and ground-truth evaluation of attribution methods",
                       description="Evaluate attribution methods on a JSONL data set: comprehensiveness, "
                                   "sufficiency (AOPC), MoRF/LeRF curves (ABPC), Kendall tau-b against "
                                   "leave-one-out, hit@1 and reciprocal rank, seconds. Methods: "
                                   + ", ".join(TOKEN_SCORES) + " (aliases: "
                                   + ", ".join(f"{a}={b}" for a, b in ALIASES.items()) + ").")
    p.add_argument("--data", help="JSONL file: one example a line (text or input_ids, target, contrast, label, "
                                  "relevant)")
    p.add_argument("--suite", choices=("ftro", "agreement", "text"),
                   help="a built-in suite instead of --data (its own data and model; inputs in DIR/inputs, the "
                        "evaluation in DIR/results)")
    p.add_argument("--methods", help="comma-separated methods, e.g. loo,random,semiring_maxpath (required with "
                                     "--data; a suite has defaults)")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds the same evaluation)")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded, default) or a saved Hugging Face folder "
                                                      "(causal LM, seq2seq or *ForSequenceClassification)")
    p.add_argument("--fractions", type=_fractions, nargs="+", default=None,
                   help="fractions f in (0, 1] of comp@f / suff@f, comma- or space-separated "
                        "(default 0.1,0.2,0.3,0.4,0.5)")
    p.add_argument("--removal", choices=("delete", "replace"), default="delete",
                   help="delete the removed tokens (default) or replace them by --baseline-id")
    p.add_argument("--baseline-id", type=nonnegative_int, default=None,
                   help="token id of --removal replace (default: UNK, else pad, else EOS)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method (default 0)")
    p.add_argument("--workers", type=nonnegative_int, default=0, help="Ray actors (default 0: in this process)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first K good examples")
    p.add_argument("--batch-size", type=positive_int, default=64, help="perturbed inputs per scoring forward")
    p.add_argument("--skip-bad", action="store_true", help="log bad lines to DIR/errors.jsonl and go on")
    p.add_argument("--overwrite", action="store_true", help="delete an existing evaluation in --out first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidInputError
    from ..output_files import check_output_folder
    from .runner import DEFAULT_FRACTIONS, evaluate

    if (args.data is None) == (args.suite is None):
        raise InvalidInputError("give either --data F.jsonl or --suite NAME", where="inseq-semiring evaluate",
                                fix="--data with your JSONL file and --methods, or --suite ftro|agreement|text")
    if args.suite is not None:
        if args.model != "smollm2" or args.removal != "delete" or args.baseline_id is not None:
            raise InvalidInputError(f"suite {args.suite!r} brings its own model and removal", where="--suite",
                                    fix="drop --model / --removal / --baseline-id, or use --data with your model")
        return _run_suite(args)
    if not args.methods:
        raise InvalidInputError("--methods is required with --data", where="inseq-semiring evaluate",
                                fix="e.g. --methods loo,random,saliency,semiring_maxpath")
    check_output_folder(args.out)  # before the model loads
    summary = evaluate(args.data, args.methods, args.out, model=args.model,
                       fractions=[f for group in args.fractions for f in group] if args.fractions
                       else DEFAULT_FRACTIONS, removal=args.removal,
                       baseline_id=args.baseline_id, seed=args.seed, workers=args.workers, limit=args.limit,
                       skip_bad=args.skip_bad, overwrite=args.overwrite, batch_size=args.batch_size,
                       progress=not args.quiet)
    print(summary.to_text())
    return 0


def _run_suite(args: argparse.Namespace) -> int:
    """A built-in suite with this command's options (``--model``, ``--data`` and ``--removal`` are the suite's)."""
    from ..experiments.faithfulness import run_suite
    from .runner import DEFAULT_FRACTIONS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    res = run_suite(args.suite, args.out, args.limit, methods, args.workers, seed=args.seed,
                    fractions=[f for group in args.fractions for f in group] if args.fractions
                    else DEFAULT_FRACTIONS, skip_bad=args.skip_bad, overwrite=args.overwrite,
                    batch_size=args.batch_size, progress=not args.quiet)
    print(res["result"].to_text())
    return 0

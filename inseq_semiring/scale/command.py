"""``inseq-semiring attribute-dataset``: the command line front end of :func:`~inseq_semiring.scale.attribute_dataset`.

``inseq-semiring attribute-dataset --data items.jsonl --out results/ [--model smollm2] [--method semiring_maxpath]
[--workers N] [--address auto|ray://host:10001] [--batch-size B] [--step-scores NAME ...] [--overwrite]
[--sign ...] [--granularity ...] [--decomposition ...] [--option KEY=VALUE ...]``

Prints a progress bar (rows/s, ETA) on stderr and a one-line summary at the end. Exit status 0 when every row is
recorded (attributed or in ``errors.jsonl``), 2 for bad input (e.g. an output folder made with other settings,
without ``--overwrite``), 130 on Ctrl-C (committed batches stay; re-run the same command to continue).
(Inseq's own ``attribute-dataset``, which takes ``--dataset_name``, stays available as
``inseq-semiring inseq attribute-dataset ...``.)
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser", "run", "is_ours"]

NAME = "attribute-dataset"


def is_ours(argv) -> bool:
    """``attribute-dataset`` with Inseq's arguments (``--dataset_name``) goes to Inseq's command, otherwise here."""
    return not any(a == "--dataset_name" or a.startswith("--dataset_name=") for a in argv)


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option needs KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)  # numbers, booleans, lists; anything else stays a string
    except json.JSONDecodeError:
        return key, value


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="attribute every row of a JSONL/CSV/datasets file (resumable; Ray workers)",
                       description="Attribute every row {id, input, target?, contrast?} of a dataset and write one "
                                   "result per row to Parquet shards in --out. Re-running resumes; --workers N runs "
                                   "N Ray actors (pip install 'inseq-semiring[scale]').")
    p.add_argument("--data", required=True, help=".jsonl / .csv file, or a folder saved with datasets' save_to_disk")
    p.add_argument("--out", required=True, help="output folder (created; an existing one is resumed)")
    p.add_argument("-m", "--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M-Instruct, default) or a Hugging Face model name/folder")
    p.add_argument("-a", "--method", default="semiring_maxpath",
                   help="any Inseq attribution method: semiring_maxpath (default), semiring_entropy, semiring_flow, "
                        "semiring_gradient, saliency, integrated_gradients, ...")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray actors (default 0: in-process, no Ray needed)")
    p.add_argument("--address", default=None,
                   help="join an existing Ray cluster ('auto' or 'ray://host:10001') instead of starting a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: workers x threads)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per actor (default: 1 when CUDA is available, else 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (the unit of work and of commit)")
    p.add_argument("--step-scores", nargs="*", default=[], metavar="NAME",
                   help="step scores per generated token (e.g. probability semiring_entropy semiring_top_path)")
    p.add_argument("--max-new-tokens", type=int, default=5, help="tokens generated for rows without a target")
    p.add_argument("--sign", default=None, help="semiring_maxpath option: abs, positive or negative")
    p.add_argument("--granularity", default=None, help="semiring_maxpath option: scalar or tensor")
    p.add_argument("--decomposition", default=None, help="semiring option: aten, paper or primitive")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option, passed to model.attribute (e.g. n_steps=20); repeatable")
    p.add_argument("--save-inseq", action="store_true", help="also keep each row's Inseq output (JSON) under inseq/")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (re-run continues)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the results already in --out first (otherwise other settings are refused)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from . import attribute_dataset

    options = {k: v for k, v in (("sign", args.sign), ("granularity", args.granularity),
                                 ("decomposition", args.decomposition)) if v is not None}
    options.update(dict(args.option))
    try:
        summary = attribute_dataset(args.data, args.out, model=args.model, method=args.method, workers=args.workers,
                                    address=args.address, batch_size=args.batch_size, step_scores=args.step_scores,
                                    options=options, max_new_tokens=args.max_new_tokens, overwrite=args.overwrite,
                                    num_cpus=args.num_cpus, num_gpus=args.gpus_per_worker, threads=args.threads,
                                    save_inseq=args.save_inseq, max_batches=args.max_batches,
                                    progress=not args.quiet)
    except KeyboardInterrupt as e:
        if getattr(e, "summary", None) is not None:
            print(f"[inseq-semiring] {e.summary.to_text()}", file=sys.stderr)
        raise
    print(f"[inseq-semiring] {summary.to_text()}", file=sys.stderr)
    if summary.rows_failed:
        print(f"[inseq-semiring] {summary.rows_failed} row(s) failed: see {args.out}/errors.jsonl", file=sys.stderr)
    return 0

"""Built-in faithfulness suites: generate a data set, then evaluate every method on it (issue 14).

    python -m inseq_semiring.experiments.faithfulness --suite ftro|agreement|text --out DIR
        [--limit K] [--methods a,b,c] [--workers N] [--threads 1] [--ftro-quick]

Each suite writes its inputs into ``DIR/inputs/``: ``data.jsonl`` (the format of ``inseq-semiring evaluate``),
``items.jsonl`` (the same rows with the generator's extra fields, e.g. an agreement item's cell, subject and
attractor) and, for ``ftro``, the model folder; then it runs :func:`inseq_semiring.evaluate.evaluate` on them into
``DIR/results/`` (``examples.parquet``, ``attributions.parquet``, ``metrics.parquet``, ``curves.parquet``,
``summary.csv``/``summary.md``, ``figures/``; the evaluation's own folder, which it resumes: re-running the command
redoes nothing that is done). ``DIR/suite.json`` records the suite, the example count, the methods and the timing.

* ``ftro``: the §5.1 FirstTokenRepeatedOnce BERT classifier (1 layer, hidden 16, 2 heads, dropout 0) trained as
  :mod:`inseq_semiring.experiments.ftro` trains it (the paper's 10,000 examples, Adam 1e-3, batch 32, model seed 0,
  until validation accuracy 1.0), saved as a Hugging Face folder ``DIR/inputs/model`` (no tokenizer: rows carry
  ``input_ids``; reused when it is already there). Examples: the first validation rows. Target: the correct class
  (``label``; at validation accuracy 1.0 it is also the predicted class). Ground truth: in a positive row the first
  token and its repeat (``relevant = [0, r]``). **Negatives carry no ground truth** (no ``relevant`` field): with no
  repeat, whether the label is 0 depends on every token equally (each could have been the repeat), so no token set
  is "the" evidence; hit@1 and rr are therefore means over the positive rows only (random hit@1 = 2 / 10).
  There are no special tokens (the model pools position 0, which is a data token) and no BOS token to score an
  emptied input with, so this suite removes by **replacement** (``removal="replace"``) with the pad id 0, which the
  data never uses (ids 1..19): the input keeps its length and positions.
* ``agreement``: the embedded SmolLM2-135M-Instruct on prefixes from :func:`~inseq_semiring.experiments.sva.
  generate_items` with an attractor noun present (the ``pp`` and ``rc`` conditions, the 8 subject x attractor
  number cells taken round-robin). Target: " " + the agreeing verb form; contrast: " " + the other form (score
  ``p(target) - p(contrast)``). Ground truth: the subject's head noun (its character span in the prefix).
* ``text``: SmolLM2 next-token prediction on the 32 prefixes shipped in ``inseq_semiring/data/eval_text.json``
  (target: the model's greedy next token). No ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ._common import output_dir, output_folder, positive_int

SUITES = ("ftro", "agreement", "text")
TEXT_PATH = Path(__file__).resolve().parent.parent / "data" / "eval_text.json"

#: Examples per suite in a default run: sized so that a full run with the default methods takes about 15-25 min on
#: the shared 2-core CPU this was developed on (SmolLM2: ~60-70 s per example for the default methods at a load
#: average of ~8; the FTRO BERT: ~5 s per example for all 22 methods).
DEFAULT_COUNTS = {"ftro": 200, "agreement": 16, "text": 16}

_SEMIRING = ["semiring_gradient", "semiring_maxpath", "semiring_entropy", "semiring_flow"]
_LRP = ["lrp_epsilon", "attn_lrp", "cp_lrp", "attention_tracing", "attention_rollout"]
_GRADIENT_122 = ["deeplift_shap", "guided_backprop", "guided_integrated_gradients", "greedy_pig", "pgd_attribution"]
_INSEQ = ["saliency", "input_x_gradient", "integrated_gradients", "attention", "occlusion", "lime"]
_REFERENCE = ["loo", "random"]
#: ``--ftro-quick``: a smoke-test FTRO model (600 balanced examples, 2 epochs, no accuracy target): fast, not accurate
FTRO_QUICK = {"n_examples": 600, "sampling": "balanced", "epochs": 2, "target_val_accuracy": None}

#: left out of the SmolLM2 suites' defaults for time: seconds for one agreement item here (load ~8)
SLOW_ON_SMOLLM2 = {"guided_integrated_gradients": 209.2, "greedy_pig": 130.7, "pgd_attribution": 15.2}

#: The default methods of each suite (a method that does not apply to the model, e.g. an Inseq-only method on the
#: FTRO classifier, is reported as skipped by the runner, with its reason): every method on ``ftro``; on the SmolLM2
#: suites every method but the three of :data:`SLOW_ON_SMOLLM2` (give them with ``--methods`` to include them).
_ALL = _SEMIRING + _LRP + _GRADIENT_122 + _INSEQ + _REFERENCE
DEFAULT_METHODS = {"ftro": _ALL, **{s: [m for m in _ALL if m not in SLOW_ON_SMOLLM2] for s in ("agreement", "text")}}


# -- data --------------------------------------------------------------------------------------------------------

def ftro_model(folder: Path, *, seed: int = 0, n_examples: int = 10_000, sampling: str = "paper",
               epochs: int = 150, target_val_accuracy: float | None = 1.0, threads: int = 1):
    """Train (or load from ``folder``) the §5.1 classifier; returns ``(model, data, info)``.

    Training as in :func:`~inseq_semiring.experiments.ftro.train_and_analyze` (hidden dropout 0, Adam 1e-3, batch 32,
    until validation accuracy ``target_val_accuracy``, at most ``epochs``); the folder gets the HF model files and
    ``training.json``. An existing folder whose ``training.json`` has the same settings is loaded instead."""
    import torch
    from transformers import BertForSequenceClassification

    from ._common import torch_threads
    from .ftro import FTROConfig
    from .synthetic import first_token_repeated_once
    from .train import accuracy, tiny_bert, train_classifier

    cfg = FTROConfig()
    settings = {"seed": seed, "n_examples": n_examples, "sampling": sampling, "epochs": epochs,
                "target_val_accuracy": target_val_accuracy, "data_seed": cfg.data_seed,
                "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "hidden_size": cfg.hidden_size}
    with torch_threads(threads):
        data = first_token_repeated_once(n_examples, cfg.vocab_size, cfg.seq_len, seed=cfg.data_seed,
                                         sampling=sampling)
        meta = folder / "training.json"
        if meta.is_file() and json.loads(meta.read_text()).get("settings") == settings:
            model = BertForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
            return model, data, json.loads(meta.read_text())
        model = tiny_bert(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                          num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                          initializer_range=cfg.initializer_range, hidden_dropout=0.0, seed=seed)
        t0 = time.perf_counter()
        log = train_classifier(model, data.train, data.val, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                               seed=seed, target_val_accuracy=target_val_accuracy)
        model.eval()
        info = {"settings": settings, "epochs": log.epochs, "train_seconds": round(time.perf_counter() - t0, 2),
                "val_accuracy": accuracy(model, *data.val), "test_accuracy": accuracy(model, *data.test)}
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        meta.write_text(json.dumps(info, indent=2))
        del torch
        return model, data, info


def ftro_rows(data, limit: int) -> list[dict]:
    """The first ``limit`` validation rows: ``input_ids``, ``label`` = the class (the target), and for positives
    ``relevant`` = [0, position of the repeat]."""
    X, y = data.val
    rows = []
    for i in range(min(limit, len(y))):
        ids = [int(t) for t in X[i]]
        row = {"id": f"val{i}", "input_ids": ids, "label": int(y[i])}
        if int(y[i]) == 1:
            rep = [j for j in range(1, len(ids)) if ids[j] == ids[0]]
            if len(rep) != 1:
                raise AssertionError(f"FTRO positive row {i} has {len(rep)} repeats of its first token: {ids}")
            row["relevant"] = [0, rep[0]]
        rows.append(row)
    return rows


def agreement_rows(limit: int, seed: int = 0) -> list[dict]:
    """``limit`` agreement items with an attractor (pp, rc), the 8 cells round-robin: ``text`` = the prefix,
    ``target``/``contrast`` = " " + correct / wrong verb, ``relevant`` = the subject noun's character span."""
    from .sva import generate_items, select_for_analysis

    per_cell = max(30, -(-limit // 8))  # fixed pool: a smaller limit takes a prefix of a larger one
    items = [it for it in generate_items(per_cell=per_cell, seed=seed) if it.attractor is not None]
    rows = []
    for it in select_for_analysis(items, limit):
        assert it.prefix[it.subject_span[0]:it.subject_span[1]] == it.subject
        rows.append({"id": f"sva{it.id}", "text": it.prefix, "target": " " + it.correct, "contrast": " " + it.wrong,
                     "relevant": [list(it.subject_span)], "cell": it.cell, "subject": it.subject,
                     "attractor": it.attractor})
    return rows


def text_rows(limit: int) -> list[dict]:
    """The first ``limit`` shipped prefixes (no target: the model's greedy next token; no ground truth)."""
    prefixes = json.loads(TEXT_PATH.read_text())["prefixes"]
    return [{"id": f"text{i}", "text": p} for i, p in enumerate(prefixes[:limit])]


#: the fields of the evaluation data format; the others (``cell``, ``subject``, ...) go to ``items.jsonl`` only
DATA_FIELDS = ("id", "text", "input_ids", "target", "contrast", "label", "relevant")


def write_jsonl(rows: list[dict], path: Path, fields=None) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({k: v for k, v in r.items() if fields is None or k in fields}) + "\n"
                           for r in rows))
    tmp.replace(path)
    return path


# -- suites ------------------------------------------------------------------------------------------------------

def prepare(suite: str, out, limit: int | None = None, ftro_options: dict | None = None) -> dict:
    """Write ``out/data.jsonl`` and ``out/items.jsonl`` for ``suite`` (and, for ``ftro``, the model folder
    ``out/model``). Returns
    ``{"data": path, "model": model name or folder, "n": rows, ...}``."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    out = output_dir(out)
    n = limit or DEFAULT_COUNTS[suite]
    info: dict = {}
    if suite == "ftro":
        _, data, info = ftro_model(out / "model", **(ftro_options or {}))
        rows, model = ftro_rows(data, n), str(out / "model")
    elif suite == "agreement":
        rows, model = agreement_rows(n), None
    else:
        rows, model = text_rows(n), None
    path = write_jsonl(rows, out / "data.jsonl", DATA_FIELDS)
    write_jsonl(rows, out / "items.jsonl")
    return {"data": str(path), "model": model, "n": len(rows), "model_info": info}


def run_suite(suite: str, out, limit: int | None = None, methods=None, workers: int = 0,
              ftro_options: dict | None = None, threads: int = 1, **evaluate_kwargs) -> dict:
    """Prepare ``suite``'s data and evaluate ``methods`` (default :data:`DEFAULT_METHODS`) on it into ``out``, with
    ``threads`` torch threads (restored afterwards)."""
    from ._common import torch_threads

    with torch_threads(threads):
        return _run_suite(suite, out, limit, methods, workers, ftro_options, **evaluate_kwargs)


def _run_suite(suite, out, limit, methods, workers, ftro_options, **evaluate_kwargs) -> dict:
    from ..evaluate import evaluate

    t0 = time.perf_counter()
    prep = prepare(suite, Path(out) / "inputs", limit, ftro_options)
    t_prep = time.perf_counter() - t0
    methods = list(methods or DEFAULT_METHODS[suite])
    kwargs = dict(evaluate_kwargs)
    if suite == "ftro":
        kwargs.setdefault("removal", "replace")  # baseline: the pad id 0 (the model's config), unused by the data
    if prep["model"] is not None:
        kwargs["model"] = prep["model"]
    result = evaluate(prep["data"], methods, Path(out) / "results", workers=workers, **kwargs)
    record = {"suite": suite, "examples": prep["n"], "methods": methods, "model": prep["model"] or "smollm2",
              "model_info": prep["model_info"], "prepare_seconds": round(t_prep, 2),
              "evaluation": result.to_text(), "skipped": sorted({m for m, i, _ in result.skipped if not i}),
              "total_seconds": round(time.perf_counter() - t0, 2)}
    (Path(out) / "suite.json").write_text(json.dumps(record, indent=2))
    return {"record": record, "result": result}


def _methods(text: str) -> list[str]:
    names = [m.strip() for part in text.split(",") for m in part.split() if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of method names")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, choices=SUITES)
    p.add_argument("--out", required=True, type=output_folder)
    p.add_argument("--limit", type=positive_int, help="number of examples (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_COUNTS.items()) + ")")
    p.add_argument("--methods", type=_methods, nargs="+", help="comma-separated methods (default: all of them)")
    p.add_argument("--workers", type=int, default=0, help="Ray workers (0: in this process, the default)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--ftro-quick", action="store_true", help="ftro: a smoke-test model (600 balanced examples, "
                   "2 epochs; not trained to accuracy 1.0)")
    args = p.parse_args(argv)
    methods = [m for group in args.methods for m in group] if args.methods else None
    res = run_suite(args.suite, args.out, args.limit, methods, args.workers, threads=args.threads,
                    ftro_options=FTRO_QUICK if args.ftro_quick else None)
    rec = res["record"]
    print(f"{rec['suite']}: {rec['examples']} examples, {len(rec['methods'])} methods, "
          f"{rec['total_seconds']} s; written to {args.out}", file=sys.stderr)
    md = Path(args.out) / "results" / "summary.md"
    if md.is_file():
        print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

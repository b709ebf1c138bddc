"""``evaluate(data, methods, out, ...)``: every method on every example, every metric, resumable.

Per example (once): the target (given, or the greedy next token / predicted class), ``s(x)`` and the leave-one-out
scores, in one batched forward. Per (example, method): the method's per-token scores (timed: ``seconds``), the
ranking, then the MoRF and LeRF curves ``k = 0..n``, scored in one batched forward (comprehensiveness and
sufficiency at every fraction are points of these curves: :mod:`.faithfulness`), then the metrics.

Outputs (pandas-readable; the column names are part of the API):

* ``examples.parquet``: ``id, target_token_id, contrast_token_id`` (null if none), ``full_score, n_removable``;
* ``attributions.parquet``: ``id, method, position, token, token_id, special, score``;
* ``metrics.parquet``: ``id, method, metric, value`` with the metrics of :data:`METRIC_NAMES` (``comp@f`` /
  ``suff@f`` for each fraction; ``hit@1`` and ``rr`` only where the example marks relevant tokens);
* ``curves.parquet``: ``id, method, order`` (``"morf"`` / ``"lerf"``), ``k, fraction`` (``k / n``), ``score``
  (``k = 0`` is the full score);
* ``skipped.csv``: ``method, id, reason`` (``id`` empty: the method was skipped for the whole run; ``method`` ``*``:
  the example could not be scored at all, e.g. its contrast is the model's predicted target); a failure caused by
  the environment (:data:`ENVIRONMENT_ERRORS`: a missing package, memory, a file) is computed again on resume, other
  failures are kept;
* ``errors.jsonl`` (``skip_bad``): the bad data lines.

Then :func:`inseq_semiring.evaluate.report.write_reports` (summary, figures) when that module is installed.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidInputError, UnsupportedModelError, UnsupportedOpError
from .agreement import kendall_tau_b
from .curves import abpc, curve_sets
from .data import Example, read_examples
from .faithfulness import aopc, comprehensiveness, sufficiency
from .ground_truth import hit_at_1, reciprocal_rank
from .methods import MethodNotApplicable, canonical_method, direct_scores, inseq_scores, random_scores
from .ranking import check_fractions, rank
from .scoring import REMOVALS, TargetScorer
from .store import Store, write_atomic

__all__ = ["evaluate", "metric_names", "METRIC_NAMES", "DEFAULT_FRACTIONS", "EvalSummary"]

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
#: methods Inseq cannot run with a contrastive target: computed directly on such examples (:mod:`.methods`)
CONTRAST_DIRECT = ("integrated_gradients",)
#: methods always computed directly: the flow is ranked by ``log Z``, beyond Inseq's float32 storage (:mod:`.methods`)
ALWAYS_DIRECT = ("semiring_flow",)


def _fname(f: float) -> str:
    return format(f, "g")


def metric_names(fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[str, ...]:
    """The metric names, in order, for these fractions."""
    return (*(f"comp@{_fname(f)}" for f in fractions), "aopc_comp", *(f"suff@{_fname(f)}" for f in fractions),
            "aopc_suff", "abpc", "loo_tau", "hit@1", "rr", "seconds")


METRIC_NAMES = metric_names()
#: errors that mean "this method does not apply to this model": the method is skipped for the whole run
NOT_APPLICABLE = (MethodNotApplicable, UnsupportedOpError, UnsupportedModelError, NotImplementedError)


@dataclass
class EvalSummary:
    out: str
    examples: int
    methods: list[str]
    computed: int = 0  # (example, method) parts computed by this run
    reused: int = 0  # parts found on disk (resume)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (method, id or "", reason)
    forwards: int = 0  # batched scoring forwards of this run
    rows_scored: int = 0
    seconds: float = 0.0

    def to_text(self) -> str:
        run_skips = sorted({m for m, i, _ in self.skipped if not i})
        return (f"evaluated {self.examples} example(s) x {len(self.methods)} method(s): {self.computed} computed, "
                f"{self.reused} already done; {self.forwards} scoring forward(s) ({self.rows_scored} inputs); "
                f"{self.seconds:.1f} s" + (f"; skipped: {', '.join(run_skips)}" if run_skips else "")
                + f" -> {self.out}")


# ------------------------------------------------------------------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@contextmanager
def _no_leftover_hooks(model):
    """If the method fails, remove the module hooks it added and left (an Inseq method that failed half-way), so
    that the scoring forwards after it see the plain model. (Hooks left after a success are the method's own
    business: Inseq keeps some between calls.)"""
    before = {(id(m), name): set(getattr(m, name, {}) or {}) for m in model.modules() for name in _HOOK_DICTS}
    try:
        yield
    except BaseException:
        for m in model.modules():
            for name in _HOOK_DICTS:
                hooks = getattr(m, name, None)
                if hooks:
                    for key in set(hooks) - before.get((id(m), name), set()):
                        del hooks[key]
        raise


class _Evaluator:
    """The per-example and per-method work for one loaded model (also what a Ray worker runs)."""

    def __init__(self, scorer: TargetScorer, fractions, seed: int, use_inseq: bool):
        self.scorer, self.fractions, self.seed = scorer, tuple(fractions), seed
        self._am = None
        self.use_inseq = use_inseq

    def _inseq_model(self):
        if self._am is None:
            import inseq

            from ..integrations.inseq import register

            register()
            self._am = inseq.load_model(self.scorer.model, "saliency", tokenizer=self.scorer.tokenizer,
                                        device=str(self.scorer.device))  # keep the model where it is
        return self._am

    def example_record(self, ex: Example) -> dict:
        sc = self.scorer
        target = ex.target if ex.target is not None else sc.predict(ex.input_ids)
        if ex.contrast is not None and ex.contrast == target:
            raise InvalidInputError(f"example {ex.id!r}: the contrast is the model's predicted target",
                                    where=f"line {ex.line}, field 'contrast'", fix="give the target explicitly")
        removable = ex.removable
        t0 = time.perf_counter()
        rows = [list(ex.input_ids)] + [sc.perturb(ex.input_ids, [i]) for i in removable]
        s = sc.scores(rows, target, ex.contrast)
        loo = [0.0] * len(ex.input_ids)
        for j, i in enumerate(removable):
            loo[i] = s[0] - s[j + 1]
        return {"id": ex.id, "input_ids": list(ex.input_ids), "target": int(target), "contrast": ex.contrast,
                "full": s[0], "loo": loo, "loo_seconds": time.perf_counter() - t0, "n": len(removable)}

    def token_scores(self, method: str, ex: Example, rec: dict) -> tuple[list[float], float]:
        t0 = time.perf_counter()
        if method == "loo":
            return list(rec["loo"]), float(rec["loo_seconds"])
        if method == "random":
            return random_scores(len(ex.input_ids), self.seed, ex.id), time.perf_counter() - t0
        with _no_leftover_hooks(self.scorer.model):
            if self.use_inseq and ex.text is not None and method not in ALWAYS_DIRECT and not (
                    rec["contrast"] is not None and method in CONTRAST_DIRECT):
                try:
                    scores = inseq_scores(self._inseq_model(), self.scorer, method, ex, rec["target"],
                                          rec["contrast"])
                except Exception:
                    self._am = None  # a method that failed half-way may leave Inseq's wrapper in a bad state
                    raise
            else:
                scores = direct_scores(self.scorer, method, ex.input_ids, rec["target"], rec["contrast"])
        return scores, time.perf_counter() - t0

    def method_record(self, method: str, ex: Example, rec: dict) -> dict:
        scores, seconds = self.token_scores(method, ex, rec)
        if len(scores) != len(ex.input_ids):
            raise InvalidInputError(f"{method} gave {len(scores)} scores for {len(ex.input_ids)} tokens")
        removable = ex.removable
        order = rank(scores, removable)
        n = len(order)
        morf_sets, lerf_sets = curve_sets(order)
        distinct = {}
        for s in morf_sets[1:] + lerf_sets[1:]:
            distinct.setdefault(s, len(distinct))
        sc = self.scorer
        values = sc.scores([sc.perturb(ex.input_ids, s) for s in distinct], rec["target"], rec["contrast"]) \
            if distinct else []
        full = rec["full"]
        morf = [full] + [values[distinct[s]] for s in morf_sets[1:]]
        lerf = [full] + [values[distinct[s]] for s in lerf_sets[1:]]
        metrics: dict[str, float] = {}
        if n:
            comps = [comprehensiveness(full, morf, f) for f in self.fractions]
            suffs = [sufficiency(full, lerf, f) for f in self.fractions]
            metrics.update({f"comp@{_fname(f)}": v for f, v in zip(self.fractions, comps)})
            metrics["aopc_comp"] = aopc(comps)
            metrics.update({f"suff@{_fname(f)}": v for f, v in zip(self.fractions, suffs)})
            metrics["aopc_suff"] = aopc(suffs)
            metrics["abpc"] = abpc(morf, lerf)
            metrics["loo_tau"] = kendall_tau_b([scores[i] for i in removable], [rec["loo"][i] for i in removable])
            if ex.relevant is not None:
                metrics["hit@1"] = hit_at_1(order, ex.relevant)
                metrics["rr"] = reciprocal_rank(order, ex.relevant)
        metrics["seconds"] = seconds
        return {"id": ex.id, "method": method, "scores": scores, "morf": morf, "lerf": lerf, "metrics": metrics}


# ------------------------------------------------------------------------------------------------------------------
def _load(model, tokenizer):
    from .loading import load_model, model_kind

    if isinstance(model, str):
        return load_model(model)
    config = getattr(model, "config", None)
    kind = getattr(model, "evaluation_kind", None) or (model_kind(config) if config is not None else "causal")
    return model.eval(), tokenizer, kind


def _model_label(model) -> str:
    if isinstance(model, str):
        return model
    cfg = getattr(model, "config", None)
    return f"{type(model).__name__}:{getattr(cfg, '_name_or_path', '') or ''}"


def evaluate(data: str | Path, methods: Sequence[str] | str, out: str | Path, *, model: Any = "smollm2",
             tokenizer=None, fractions: Sequence = DEFAULT_FRACTIONS, removal: str = "delete",
             baseline_id: int | None = None, seed: int = 0, workers: int = 0, limit: int | None = None,
             skip_bad: bool = False, overwrite: bool = False, batch_size: int = 64, progress: bool = True,
             use_inseq: bool = True, reports: bool = True) -> EvalSummary:
    """Evaluate ``methods`` on the examples of ``data`` (JSONL, :mod:`.data`) and write the tables to ``out``.

    ``model``: ``"smollm2"`` (default), a saved HF folder, or a loaded model (with ``tokenizer=``; its kind from
    ``model.config``, or a ``model.evaluation_kind`` attribute). ``fractions``: in (0, 1]. ``removal``: ``"delete"``
    or ``"replace"`` (with ``baseline_id``, default the UNK / pad / EOS token). ``seed``: of ``random``.
    ``workers > 0``: that many Ray actors (each loads ``model``, which must then be a name). ``use_inseq=False``
    computes generation models' methods directly too. Returns an :class:`EvalSummary`."""
    t_start = time.perf_counter()
    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(canonical_method(m) for m in methods))
    if not methods:
        raise InvalidInputError("no methods given", where="--methods", fix="e.g. --methods loo,random,saliency")
    try:
        fractions = check_fractions(fractions)
    except ValueError as e:
        raise InvalidInputError(str(e), where="--fractions") from None
    if removal not in REMOVALS:
        raise InvalidInputError(f"unknown removal {removal!r}", where="--removal", fix="use delete or replace")
    if workers and not isinstance(model, str):
        raise InvalidInputError("workers > 0 needs the model as a name or folder (each worker loads it)")
    if not Path(data).is_file():
        raise InvalidInputError(f"no data file {str(data)!r}", where="--data",
                                fix="give a JSONL file, one example a line")
    from ..output_files import check_output_folder

    out = check_output_folder(out)
    settings = {"model": _model_label(model), "fractions": list(fractions), "removal": removal,
                "baseline_id": baseline_id, "seed": seed, "use_inseq": use_inseq,
                "data": str(Path(data).resolve())}
    store = Store(out, settings, overwrite=overwrite)
    (out / "errors.jsonl").unlink(missing_ok=True)
    was_training = None if isinstance(model, str) else bool(getattr(model, "training", False))
    hf_model, tok, kind = _load(model, tokenizer)
    try:
        return _evaluate_loaded(hf_model, tok, kind, data, methods, out, store, model=model, fractions=fractions,
                                removal=removal, baseline_id=baseline_id, seed=seed, workers=workers, limit=limit,
                                skip_bad=skip_bad, batch_size=batch_size, progress=progress, use_inseq=use_inseq,
                                reports=reports, t_start=t_start)
    finally:
        if was_training:  # a model the caller passed in is left in the mode it had
            hf_model.train()


def _evaluate_loaded(hf_model, tok, kind, data, methods, out, store, *, model, fractions, removal, baseline_id, seed,
                     workers, limit, skip_bad, batch_size, progress, use_inseq, reports, t_start) -> EvalSummary:
    errors_path = out / "errors.jsonl"
    scorer = TargetScorer(hf_model, kind, tokenizer=tok, removal=removal, baseline_id=baseline_id,
                          batch_size=batch_size)
    examples = read_examples(data, tok, config=getattr(hf_model, "config", None), kind=kind, skip_bad=skip_bad,
                             errors_path=errors_path, limit=limit)
    summary = EvalSummary(str(out), len(examples), methods)
    ev = _Evaluator(scorer, fractions, seed, use_inseq=use_inseq and kind != "classifier" and tok is not None)
    if workers:
        from .parallel import run_parallel

        run_parallel(examples, methods, store, summary, workers=workers, model=model, fractions=fractions,
                     removal=removal, baseline_id=baseline_id, seed=seed, batch_size=batch_size,
                     use_inseq=ev.use_inseq, progress=progress)
    else:
        _run_serial(ev, examples, methods, store, summary, progress)
    summary.forwards += scorer.forwards
    summary.rows_scored += scorer.rows_scored
    write_tables(out, examples, methods, store, summary)
    summary.seconds = time.perf_counter() - t_start
    if reports:
        _write_reports(out)
    return summary


def _check_same_example(rec: dict, ex: Example) -> None:
    if rec.get("input_ids") != list(ex.input_ids):
        raise InvalidInputError(f"example {ex.id!r} changed since the stored run (other tokens)",
                                where=f"line {ex.line}", fix="use --overwrite to start again")


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"


#: errors of the environment rather than of the example (a missing package, memory, a file): the failure is kept
#: for the report but the part is computed again when the run resumes
ENVIRONMENT_ERRORS = (ImportError, MemoryError, OSError)


def failed(e: BaseException, **fields) -> dict:
    """The stored record of a failure: ``fields`` plus ``skipped`` (the reason), and ``retry`` for an environment
    error."""
    rec = dict(fields, skipped=_reason(e))
    if isinstance(e, ENVIRONMENT_ERRORS):
        rec["retry"] = True
    return rec


def done(store: Store, table: str, key: str) -> dict | None:
    """The stored record of ``key`` if it counts as done (None: missing, or a failure to retry on resume)."""
    rec = store.get(table, key)
    return None if rec is None or rec.get("retry") else rec


def process_example(ev: _Evaluator, ex: Example, methods, store: Store, summary: EvalSummary) -> None:
    """Everything of one example not yet on disk (the unit of resume: example record, then each method)."""
    rec = done(store, "examples", ex.id)
    if rec is None:
        try:
            rec = ev.example_record(ex)
        except Exception as e:  # the example cannot be scored (e.g. the contrast is the predicted target)
            rec = failed(e, id=ex.id, input_ids=list(ex.input_ids))
            summary.computed += 1
        store.put("examples", ex.id, rec)
    else:
        _check_same_example(rec, ex)
    if "skipped" in rec:
        return
    for m in methods:
        if store.method_skipped(m) is not None:
            continue
        if done(store, m, ex.id) is not None:
            summary.reused += 1
            continue
        try:
            part = ev.method_record(m, ex, rec)
        except NOT_APPLICABLE as e:
            reason = " ".join(str(e).split())[:500] or type(e).__name__
            store.skip_method(m, f"{type(e).__name__}: {reason}")
            print(f"[inseq-semiring] evaluate: {m} skipped ({type(e).__name__}: {reason[:200]})", file=sys.stderr)
            continue
        except Exception as e:  # this example only
            part = failed(e, id=ex.id, method=m)
        store.put(m, ex.id, part)
        summary.computed += 1


def _run_serial(ev, examples, methods, store, summary, progress) -> None:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), unit="example", desc="evaluating", file=sys.stderr, dynamic_ncols=True)
    try:
        for ex in examples:
            process_example(ev, ex, methods, store, summary)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------------------------------
def write_tables(out: Path, examples: list[Example], methods, store: Store, summary: EvalSummary) -> None:
    """Assemble the parquet tables and ``skipped.csv`` from the parts (atomic writes)."""
    import pandas as pd

    ex_rows, attr_rows, metric_rows, curve_rows, skipped = [], [], [], [], []
    for m in methods:
        reason = store.method_skipped(m)
        if reason is not None:
            skipped.append((m, "", reason))
    for ex in examples:
        rec = store.get("examples", ex.id)
        if rec is None:
            continue
        if "skipped" in rec:
            skipped.append(("*", ex.id, rec["skipped"]))
            continue
        ex_rows.append({"id": ex.id, "target_token_id": rec["target"], "contrast_token_id": rec["contrast"],
                        "full_score": rec["full"], "n_removable": rec["n"]})
        for m in methods:
            part = store.get(m, ex.id)
            if part is None:
                continue
            if "skipped" in part:
                skipped.append((m, ex.id, part["skipped"]))
                continue
            for i, (tid, s) in enumerate(zip(ex.input_ids, part["scores"])):
                attr_rows.append({"id": ex.id, "method": m, "position": i, "token": ex.tokens[i], "token_id": tid,
                                  "special": ex.special[i], "score": s})
            for name, v in part["metrics"].items():
                metric_rows.append({"id": ex.id, "method": m, "metric": name, "value": v})
            n = rec["n"]
            for order in ("morf", "lerf"):
                for k, s in enumerate(part[order]):
                    curve_rows.append({"id": ex.id, "method": m, "order": order, "k": k,
                                       "fraction": k / n if n else float("nan"), "score": s})
    tables = {
        "examples.parquet": pd.DataFrame(ex_rows, columns=["id", "target_token_id", "contrast_token_id",
                                                           "full_score", "n_removable"]).astype(
            {"contrast_token_id": "Int64"}),
        "attributions.parquet": pd.DataFrame(attr_rows, columns=["id", "method", "position", "token", "token_id",
                                                                 "special", "score"]),
        "metrics.parquet": pd.DataFrame(metric_rows, columns=["id", "method", "metric", "value"]),
        "curves.parquet": pd.DataFrame(curve_rows, columns=["id", "method", "order", "k", "fraction", "score"]),
    }
    for name, df in tables.items():
        write_atomic(out / name, lambda p, df=df: df.to_parquet(p, index=False))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "id", "reason"])
    w.writerows(skipped)
    write_atomic(out / "skipped.csv", lambda p: p.write_text(buf.getvalue()))
    summary.skipped = skipped


def _write_reports(out: Path) -> None:
    try:
        from . import report
    except ImportError as e:
        if "report" not in str(e):
            raise
        print("[inseq-semiring] evaluate: no summary / figures (inseq_semiring.evaluate.report is not installed)",
              file=sys.stderr)
        return
    report.write_reports(out)

"""``workers > 0``: the (example, method) work on a pool of Ray actors, each loading the model once.

Actors compute and return records; only the driver writes (atomically, into the same :class:`~.store.Store`), so
the output and its resume behaviour are those of a serial run. One example (all of its missing methods) is one task;
the next task goes to the first free actor. A local Ray cluster is started (``num_cpus = workers``) if none is
running, and shut down at the end. Each actor uses one torch thread.
"""

from __future__ import annotations

import sys

from ..scale.ray_pool import require_ray

__all__ = ["run_parallel"]


def _worker_class(ray):
    @ray.remote(num_cpus=1)
    class EvaluationWorker:
        def __init__(self, model, fractions, removal, baseline_id, seed, batch_size, use_inseq):
            import torch

            torch.set_num_threads(1)
            from .loading import load_model
            from .runner import _Evaluator
            from .scoring import TargetScorer

            hf, tok, kind = load_model(model)
            self.scorer = TargetScorer(hf, kind, tokenizer=tok, removal=removal, baseline_id=baseline_id,
                                       batch_size=batch_size)
            self.ev = _Evaluator(self.scorer, fractions, seed, use_inseq=use_inseq)

        def run(self, ex, methods, rec):
            from .runner import NOT_APPLICABLE, failed

            f0, r0 = self.scorer.forwards, self.scorer.rows_scored
            if rec is None:
                try:
                    rec = self.ev.example_record(ex)
                except Exception as e:
                    rec = failed(e, id=ex.id, input_ids=list(ex.input_ids))
            parts = {}
            if "skipped" in rec:
                methods = []
            for m in methods:
                try:
                    parts[m] = self.ev.method_record(m, ex, rec)
                except NOT_APPLICABLE as e:
                    parts[m] = {"skip_method": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
                except Exception as e:
                    parts[m] = failed(e, id=ex.id, method=m)
            return ex.id, rec, parts, self.scorer.forwards - f0, self.scorer.rows_scored - r0

    return EvaluationWorker


def run_parallel(examples, methods, store, summary, *, workers, model, fractions, removal, baseline_id, seed,
                 batch_size, use_inseq, progress) -> None:
    ray = require_ray()
    from .runner import _check_same_example, done

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        started = True
    bar = None
    try:
        tasks = []
        for ex in examples:
            rec = done(store, "examples", ex.id)
            if rec is not None:
                _check_same_example(rec, ex)
                if "skipped" in rec:
                    continue
            todo = []
            for m in methods:
                if store.method_skipped(m) is not None:
                    continue
                if done(store, m, ex.id) is not None:
                    summary.reused += 1
                else:
                    todo.append(m)
            if todo or rec is None:
                tasks.append((ex, todo, rec))
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(examples), initial=len(examples) - len(tasks), unit="example", desc="evaluating",
                       file=sys.stderr, dynamic_ncols=True)
        if not tasks:
            return
        cls = _worker_class(ray)
        actors = [cls.remote(model, tuple(fractions), removal, baseline_id, seed, batch_size, use_inseq)
                  for _ in range(min(workers, len(tasks)))]
        from ray.util import ActorPool

        pool = ActorPool(actors)
        for ex_id, rec, parts, fw, rows in pool.map_unordered(lambda a, t: a.run.remote(*t), tasks):
            if done(store, "examples", ex_id) is None:
                store.put("examples", ex_id, rec)
                summary.computed += "skipped" in rec
            for m, part in parts.items():
                if "skip_method" in part:
                    if store.method_skipped(m) is None:
                        store.skip_method(m, part["skip_method"])
                        print(f"[inseq-semiring] evaluate: {m} skipped ({part['skip_method'][:200]})", file=sys.stderr)
                    continue
                store.put(m, ex_id, part)
                summary.computed += 1
            summary.forwards += fw
            summary.rows_scored += rows
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if started:
            ray.shutdown()

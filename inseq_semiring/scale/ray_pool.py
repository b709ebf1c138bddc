"""Ray execution: a pool of actors, each an :class:`~.worker.AttributionWorker` that loads the model once.

``ray.init`` is called only if Ray is not initialised yet: with ``address`` (``"auto"``, ``"ray://host:10001"``) it
joins an existing cluster, otherwise it starts a local one with ``num_cpus`` CPUs; what this module started it shuts
down on exit (also on Ctrl-C or an error). Each actor reserves ``threads`` CPUs (its torch thread count) and
``num_gpus`` GPUs (then it runs on ``cuda``).

Scheduling: one batch in flight per actor; the next batch goes to the first free actor. When an actor dies (its
process killed, out of memory, the node lost), Ray raises ``RayActorError`` for its batch: the batch goes back to
the front of the queue and runs on another actor, and a replacement actor is started (at most ``2 * workers``
replacements per run). A batch that kills ``max_attempts`` actors is given up: its rows are recorded as errors
(``worker_died``). Nothing is written by actors, so a batch that died half-way leaves no trace.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

from .batching import Batch
from .spec import JobSpec
from .worker import AttributionWorker, BatchResult

__all__ = ["RayExecutor", "require_ray", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'inseq-semiring[scale]'"


def require_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"running on Ray needs the 'ray' package, which is not installed; {INSTALL_HINT} "
                          "(or run in-process with workers=0 / --workers 0)") from e
    return ray


class RayExecutor:
    def __init__(self, spec: JobSpec, workers: int, address: str | None = None, num_cpus: int | None = None,
                 num_gpus: float = 0.0, threads: int = 1, keep_inseq: bool = False, max_attempts: int = 3,
                 exit_during_batch: int | None = None, exit_flag: str | None = None, warmup: bool = False):
        self.ray = require_ray()
        self.warmup = warmup
        self.spec, self.workers, self.address, self.num_cpus = spec, workers, address, num_cpus
        self.num_gpus, self.threads, self.keep_inseq, self.max_attempts = num_gpus, threads, keep_inseq, max_attempts
        self.hook = (exit_during_batch, exit_flag)
        self.started_ray = False
        self.actors: list = []
        self.deaths = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
            else:
                ray.init(num_cpus=self.num_cpus or max(self.workers * self.threads, 1), include_dashboard=False,
                         logging_level="WARNING", log_to_driver=False)
            self.started_ray = True
        self._actor_cls = ray.remote(num_cpus=self.threads, num_gpus=self.num_gpus, max_restarts=0,
                                     max_task_retries=0)(AttributionWorker)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        try:  # surface a model that fails to load now, with its message, rather than as a dead actor later
            ray.get([a.ready.remote() for a in self.actors])
        except self.ray.exceptions.RayActorError as e:
            raise RuntimeError(f"a Ray worker failed to start: {e}") from e

    def _new_actor(self):
        during, flag = self.hook
        return self._actor_cls.remote(self.spec, threads=self.threads, keep_inseq=self.keep_inseq,
                                      exit_during_batch=during, exit_flag=flag, warmup=self.warmup)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already dead
                pass
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False

    # -- scheduling --------------------------------------------------------------------------------------------
    def map_unordered(self, batches: Iterable[Batch]) -> Iterator[BatchResult]:
        ray = self.ray
        died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)
        queue = deque((b, 1) for b in batches)
        idle = deque(self.actors)
        in_flight: dict = {}
        replacements = 2 * self.workers
        try:
            while queue or in_flight:
                while queue and idle:
                    actor = idle.popleft()
                    batch, attempt = queue.popleft()
                    in_flight[actor.attribute_batch.remote(batch)] = (actor, batch, attempt)
                if not in_flight:
                    raise RuntimeError(f"every Ray worker died ({self.deaths} deaths); see the Ray logs "
                                       "(out of memory?) and retry with fewer workers or a smaller batch size")
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, batch, attempt = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except died as e:
                    self.deaths += 1
                    self.actors.remove(actor)
                    try:  # dead already, or unreachable: make sure it does not come back with the batch
                        ray.kill(actor)
                    except Exception:
                        pass
                    if replacements > 0:
                        replacements -= 1
                        fresh = self._new_actor()
                        self.actors.append(fresh)
                        idle.append(fresh)
                    if attempt < self.max_attempts:
                        queue.appendleft((batch, attempt + 1))
                    else:
                        msg = " ".join(str(e).split())[:300]
                        yield BatchResult(batch.index, errors=[
                            {"id": r.id, "kind": "worker_died", "worker": "", "message":
                             f"row {r.id!r}: its batch killed {attempt} workers in a row; last: {msg}"}
                            for r in batch.rows])
                    continue
                idle.append(actor)
                yield result
        finally:
            for ref in in_flight:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass

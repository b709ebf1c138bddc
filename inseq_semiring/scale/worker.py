"""A worker: loads the model once, then attributes batches row by row with Inseq's ``model.attribute``.

Each row is attributed on its own (one ``model.attribute`` call per row). Inseq attributes decoder-only batches one
sequence at a time anyway (constrained decoding is not batched), and a row on its own makes its numbers independent
of which batch, worker or run it lands in: that is what lets a resumed or retried run equal an uninterrupted one
exactly, and lets one bad row fail alone. A failing row becomes an error record (id, kind, message), never an
exception out of :meth:`AttributionWorker.attribute_batch`:

* ``empty_input``: the input text is empty or blank;
* ``too_long``: input + target tokens exceed the model's context;
* ``nan``: the attribution produced NaN where a score is defined (inf is kept: e.g. float32 flow of deep models);
* ``invalid_input``: the engine refused the row with its own message (e.g. the semiring methods on a NaN forward
  pass: "the model's output (the root) is NaN or inf");
* ``failed``: any other exception, with its message.

The same class runs in-process and as a Ray actor (:mod:`.ray_pool` wraps it).
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from .batching import Batch
from .rows import Row
from .spec import DEFAULT_MODEL, JobSpec, model_fingerprint, package_version

__all__ = ["AttributionWorker", "BatchResult", "RowError", "load_attribution_model"]


class RowError(InvalidInputError):
    """A row that cannot be attributed; ``kind`` names the reason (``empty_input``, ``too_long``, ``nan``)."""

    def __init__(self, kind: str, what: str, fix: str | None = None):
        self.kind = kind
        super().__init__(what, None, fix)


@dataclass
class BatchResult:
    index: int
    rows: list[dict] = field(default_factory=list)  # Parquet rows (schema: :data:`.shards.SCHEMA`)
    errors: list[dict] = field(default_factory=list)  # {"id", "kind", "message", "worker"}
    inseq: list[Any] = field(default_factory=list)  # per good row, the FeatureAttributionOutput (when kept)
    worker: str = ""


def load_attribution_model(spec: JobSpec):
    """The Inseq attribution model of ``spec`` (``"smollm2"``: the embedded SmolLM2-135M-Instruct)."""
    import inseq

    from ..integrations.inseq import register

    register()
    if spec.model == DEFAULT_MODEL:
        from ..models.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        return inseq.load_model(model, spec.method, tokenizer=tokenizer, device=spec.device)
    return inseq.load_model(spec.model, spec.method, device=spec.device)


def _max_positions(am) -> int | None:
    cfg = am.model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(am.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


def _per_token(scores):
    """A 2-D ``[token][generated]`` float64 list of lists; granular ``[token][generated][hidden]`` -> L2 norm."""
    import torch

    if scores is None:
        return None
    if scores.dim() == 3:
        scores = torch.linalg.vector_norm(scores.float(), dim=-1)
    return scores.double().tolist()


def _has_nan(seq, source, target) -> bool:
    if source is not None and any(math.isnan(v) for col in source for v in col):
        return True
    if target is not None:  # target[i][j] is defined for tokens before generated token j
        start = seq.attr_pos_start
        for i, col in enumerate(target):
            if any(math.isnan(v) for j, v in enumerate(col) if i < start + j):
                return True
    return any(math.isnan(v) for vals in (seq.step_scores or {}).values() for v in vals.reshape(-1).tolist())


class AttributionWorker:
    """Holds one attribution model; :meth:`attribute_batch` returns a :class:`BatchResult`.

    ``threads``: torch intra-op threads of this worker. ``keep_inseq``: also return each row's Inseq output.
    ``warmup``: attribute one throw-away row on start. ``exit_during_batch`` / ``exit_flag`` are a fault-injection hook for tests: during the worker's
    ``exit_during_batch``-th batch (1-based), after its first row, the process calls ``os._exit`` - once per
    ``exit_flag`` file (the first worker to create it)."""

    def __init__(self, spec: JobSpec, threads: int | None = None, keep_inseq: bool = False,
                 exit_during_batch: int | None = None, exit_flag: str | None = None, warmup: bool = False):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.spec, self.keep_inseq = spec, keep_inseq
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.am = load_attribution_model(spec)
        self.limit = _max_positions(self.am)
        self._fingerprint = model_fingerprint(spec.model)
        self._version = package_version()
        self._options_json = spec.options_json()
        self._batches = 0
        self._exit = (exit_during_batch, exit_flag)
        if warmup:  # one throw-away row, so that first-call costs (kernel loading, caches) count as start-up
            self._attribute_row(Row("warmup", "The keys to the cabinet", " are"))

    def ready(self) -> str:
        return self.name

    # -- one row -----------------------------------------------------------------------------------------------
    def _check(self, row: Row) -> None:
        if not row.input.strip():
            raise RowError("empty_input", f"row {row.id!r}: the input text is empty",
                           "give the row some input text, or drop it")
        if row.target is not None and not row.target.strip():
            raise RowError("empty_target", f"row {row.id!r}: the target text is empty",
                           "give the row a target, or omit the field to let the model generate")
        if self.limit is None:
            return
        tok = self.am.tokenizer
        n_in = len(tok(row.input).input_ids)
        n_tgt = len(tok(row.target, add_special_tokens=False).input_ids) if row.target else self.spec.max_new_tokens
        total = max(n_in, n_tgt) if self.am.is_encoder_decoder else n_in + n_tgt
        if total > self.limit:
            raise RowError("too_long", f"row {row.id!r}: input + target are {n_in} + {n_tgt} tokens, longer than "
                                       f"the model's context of {self.limit} tokens", "shorten the input or target")

    def _attribute_row(self, row: Row) -> tuple[dict, Any]:
        self._check(row)
        decoder_only = not self.am.is_encoder_decoder
        kwargs: dict[str, Any] = dict(self.spec.options)
        if row.target is not None:
            generated = row.input + row.target if decoder_only else row.target
        else:
            generated = None
            kwargs["generation_args"] = {"max_new_tokens": self.spec.max_new_tokens, "do_sample": False}
        if row.contrast is not None:
            kwargs["attributed_fn"] = "contrast_prob_diff"
            kwargs["contrast_targets"] = row.input + row.contrast if decoder_only else row.contrast
        t0 = time.perf_counter()
        out = self.am.attribute(row.input, generated, method=self.spec.method, step_scores=list(self.spec.step_scores),
                                show_progress=False, pretty_progress=False, **kwargs)
        seconds = time.perf_counter() - t0
        seq = out.sequence_attributions[0]
        source, target = _per_token(seq.source_attributions), _per_token(seq.target_attributions)
        if _has_nan(seq, source, target):
            raise RowError("nan", f"row {row.id!r}: the attribution contains NaN",
                           "check the input (e.g. a token the model maps to NaN) or try another method")
        text = out.info.get("generated_texts", [generated])[0] or ""
        cont = row.target if row.target is not None else (text[len(row.input):] if decoder_only and
                                                          text.startswith(row.input) else text)
        record = {
            "id": row.id, "input": row.input, "target": cont, "contrast": row.contrast,
            "source_tokens": [t.token for t in seq.source] if not decoder_only else [],
            "target_tokens": [t.token for t in seq.target], "attr_pos_start": int(seq.attr_pos_start),
            "source_scores": source, "target_scores": target,
            "step_scores": {k: v.double().reshape(-1).tolist() for k, v in (seq.step_scores or {}).items()},
            "method": self.spec.method, "options": self._options_json, "model": self.spec.model,
            "model_fingerprint": self._fingerprint, "package_version": self._version, "seconds": seconds,
            "worker": self.name,
        }
        return record, (out if self.keep_inseq else None)

    # -- one batch ---------------------------------------------------------------------------------------------
    def attribute_batch(self, batch: Batch) -> BatchResult:
        self._batches += 1
        result = BatchResult(batch.index, worker=self.name)
        for k, row in enumerate(batch.rows):
            if k == 1:
                self._maybe_exit()
            try:
                record, out = self._attribute_row(row)
            except RowError as e:
                result.errors.append({"id": row.id, "kind": e.kind, "message": str(e), "worker": self.name})
                continue
            except InvalidInputError as e:  # the engine refused the row (e.g. a NaN forward pass), with its message
                result.errors.append({"id": row.id, "kind": "invalid_input", "message": f"row {row.id!r}: {e}",
                                      "worker": self.name})
                continue
            except Exception as e:  # one row's failure never stops the batch
                msg = " ".join(str(e).split()) or type(e).__name__
                result.errors.append({"id": row.id, "kind": "failed", "message": f"row {row.id!r}: "
                                      f"{type(e).__name__}: {msg}", "worker": self.name})
                continue
            result.rows.append(record)
            if self.keep_inseq:
                result.inseq.append(out)
        return result

    def _maybe_exit(self) -> None:
        during, flag = self._exit
        if during is None or self._batches != during or flag is None:
            return
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, self.name.encode())
        os.close(fd)
        os._exit(17)

"""Evaluation data: JSONL, one example a line, checked field by field.

Fields of a line (a JSON object):

* ``id`` (optional; default: the 1-based line number, as a string). Ids are strings and must be unique.
* ``text`` (tokenized with the model's tokenizer, special tokens added) **or** ``input_ids`` (a list of token ids,
  for models with a custom vocabulary or a folder without a tokenizer).
* ``target`` (optional): the continuation text (its first token is the target) or a token id; for a sequence
  classifier a class index or label name. Default: ``label`` for a classifier, otherwise the model's greedy next
  token / predicted class (resolved by the runner).
* ``contrast`` (optional): like ``target``; the score becomes ``p(target) - p(contrast)``.
* ``label`` (optional, classification): the gold class (index or label name).
* ``relevant`` (optional): with ``text``, character spans ``[[start, end], ...]`` (``0 <= start < end <= len(text)``;
  a token is relevant if its character span overlaps one); with ``input_ids``, token positions.

A bad line raises :class:`DataError` naming the file, the line and the field; with ``skip_bad=True`` it is logged
(``{"file", "line", "field", "message"}``) to ``errors_path`` and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

__all__ = ["Example", "DataError", "read_examples", "parse_line"]

KNOWN_FIELDS = ("id", "text", "input_ids", "target", "contrast", "label", "relevant")


class DataError(InvalidInputError):
    """A bad line of an evaluation data file (``.file``, ``.line``, ``.field``)."""

    def __init__(self, file: str, line: int, fld: str, what: str, fix: str | None = None):
        self.file, self.line, self.field = str(file), line, fld
        super().__init__(what, where=f"{file}, line {line}, field '{fld}'", fix=fix)


@dataclass
class Example:
    """One checked example. ``input_ids``: the model input (special tokens included); ``special[i]``: never removed;
    ``relevant``: token positions (``None``: no ground truth); ``target`` and
    ``contrast``: token / class ids or ``None`` (resolved by the runner)."""

    id: str
    line: int
    input_ids: list[int]
    special: list[bool]
    tokens: list[str]
    text: str | None = None
    target: int | None = None
    contrast: int | None = None
    label: int | None = None
    relevant: tuple[int, ...] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def removable(self) -> list[int]:
        return [i for i, s in enumerate(self.special) if not s]


def _class_id(value, config, file, line, fld) -> int:
    """A class given as an index or as a label name of ``config.label2id``."""
    n = int(getattr(config, "num_labels", 0) or 0) if config is not None else 0
    if isinstance(value, bool):
        raise DataError(file, line, fld, f"{value!r} is not a class", "give a class index or a label name")
    if isinstance(value, int):
        if n and not 0 <= value < n:
            raise DataError(file, line, fld, f"class {value} is out of range (the model has {n} classes)",
                            f"give an index in 0..{n - 1}")
        return value
    if isinstance(value, str):
        table = dict(getattr(config, "label2id", None) or {}) if config is not None else {}
        if value in table:
            return int(table[value])
        raise DataError(file, line, fld, f"unknown label name {value!r}",
                        f"give a class index or one of {sorted(table) or 'the label names of config.label2id'}")
    raise DataError(file, line, fld, f"{value!r} is not a class", "give a class index or a label name")


def _token_id(value, tokenizer, vocab_size, file, line, fld) -> int:
    """The first token of a continuation text, or a token id."""
    if isinstance(value, bool):
        raise DataError(file, line, fld, f"{value!r} is not a token", "give a continuation text or a token id")
    if isinstance(value, int):
        if value < 0 or (vocab_size and value >= vocab_size):
            raise DataError(file, line, fld, f"token id {value} is outside the vocabulary (size {vocab_size})",
                            "give a token id of the model's vocabulary")
        return value
    if isinstance(value, str):
        if tokenizer is None:
            raise DataError(file, line, fld, "a text target needs a tokenizer and the model has none",
                            "give the target as a token id")
        ids = tokenizer(value, add_special_tokens=False).input_ids
        if not ids:
            raise DataError(file, line, fld, f"the target {value!r} tokenizes to nothing",
                            "give a non-empty continuation (e.g. ' are', with its leading space)")
        return int(ids[0])
    raise DataError(file, line, fld, f"{value!r} is not a continuation text or a token id")


def _special_ids(tokenizer, config) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
    if config is not None and not ids:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id",
                    "decoder_start_token_id"):
            v = getattr(config, key, None)
            if isinstance(v, int):
                ids.add(v)
    return ids


def parse_line(obj: Any, line: int, file: str, *, tokenizer=None, config=None, kind: str = "causal") -> Example:
    """One JSON object -> :class:`Example` (raises :class:`DataError`)."""
    if not isinstance(obj, dict):
        raise DataError(file, line, "(line)", f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(KNOWN_FIELDS))
    if unknown:
        raise DataError(file, line, unknown[0], f"unknown field {unknown[0]!r}",
                        f"use only {', '.join(KNOWN_FIELDS)}")
    ex_id = obj.get("id", line)
    if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool) or str(ex_id) == "":
        raise DataError(file, line, "id", f"{ex_id!r} is not a usable id", "give a non-empty string or integer")
    has_text, has_ids = "text" in obj, "input_ids" in obj
    if has_text == has_ids:
        raise DataError(file, line, "text", "give exactly one of 'text' and 'input_ids'"
                        + (" (both are present)" if has_text else " (neither is present)"))
    vocab = int(getattr(config, "vocab_size", 0) or 0) if config is not None else 0
    specials = _special_ids(tokenizer, config)
    text, offsets = None, None
    if has_text:
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(file, line, "text", f"expected a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(file, line, "text", "the text is empty", "give some text")
        if tokenizer is None:
            raise DataError(file, line, "text", "this model has no tokenizer", "give 'input_ids' instead of 'text'")
        enc = tokenizer(text, return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)),
                        return_special_tokens_mask=True)
        ids = list(enc.input_ids)
        special = [bool(m) for m in enc.special_tokens_mask]
        offsets = enc.get("offset_mapping")
        if not any(not s for s in special):
            raise DataError(file, line, "text", "the text has no token that is not a special token")
    else:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in ids):
            raise DataError(file, line, "input_ids", "expected a non-empty list of integer token ids")
        bad = [i for i in ids if i < 0 or (vocab and i >= vocab)]
        if bad:
            raise DataError(file, line, "input_ids", f"token id {bad[0]} is outside the vocabulary (size {vocab})")
        special = [i in specials for i in ids]
        if all(special):
            raise DataError(file, line, "input_ids", "every token is a special token; nothing can be removed")
    tokens = (tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids])
    ex = Example(id=str(ex_id), line=line, input_ids=[int(i) for i in ids], special=special,
                 tokens=[str(t) for t in tokens], text=text, raw=dict(obj))
    classifier = kind == "classifier"
    for fld in ("target", "contrast", "label"):
        if obj.get(fld) is None:
            continue
        if fld == "label" and not classifier:
            raise DataError(file, line, "label", "'label' is for sequence classifiers",
                            "give the continuation to explain as 'target'")
        value = (_class_id(obj[fld], config, file, line, fld) if classifier
                 else _token_id(obj[fld], tokenizer, vocab, file, line, fld))
        setattr(ex, fld, value)
    if classifier and ex.target is None and ex.label is not None:
        ex.target = ex.label
    if ex.contrast is not None and ex.contrast == ex.target:
        raise DataError(file, line, "contrast", "the contrast is the target itself", "give another token / class")
    if "relevant" in obj and obj["relevant"] is not None:
        ex.relevant = _relevant(obj["relevant"], ex, offsets, file, line)
    return ex


def _relevant(value, ex: Example, offsets, file, line) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise DataError(file, line, "relevant", "expected a list")
    if not value:
        raise DataError(file, line, "relevant", "the list of relevant tokens is empty",
                        "mark at least one token, or leave 'relevant' out (no ground truth)")
    if ex.text is None:  # token positions
        n = len(ex.input_ids)
        for p in value:
            if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < n:
                raise DataError(file, line, "relevant", f"token position {p!r} is out of range (0..{n - 1})",
                                "give token positions of input_ids")
        return tuple(sorted(set(value)))
    if offsets is None:
        raise DataError(file, line, "relevant", "character spans need a fast tokenizer (offset mapping)",
                        "use a fast tokenizer or give input_ids with token positions")
    n_chars, out = len(ex.text), set()
    for span in value:
        if (not isinstance(span, list) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise DataError(file, line, "relevant", f"{span!r} is not a [start, end] character span")
        s, e = span
        if not 0 <= s < e <= n_chars:
            raise DataError(file, line, "relevant", f"span {span} is out of range for a text of {n_chars} "
                            "characters", "give 0 <= start < end <= len(text)")
        hit = {i for i, (a, b) in enumerate(offsets) if not ex.special[i] and b > a and a < e and b > s}
        if not hit:
            raise DataError(file, line, "relevant", f"span {span} covers no token")
        out |= hit
    return tuple(sorted(out))


def read_examples(path: str | Path, tokenizer=None, *, config=None, kind: str = "causal", skip_bad: bool = False,
                  errors_path: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """Read and check a JSONL file; ``kind`` is ``"causal"``, ``"seq2seq"`` or ``"classifier"``. ``limit``: keep
    the first ``limit`` good examples. Bad lines raise :class:`DataError`, or with ``skip_bad`` are appended to
    ``errors_path`` (JSONL) and skipped."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"no data file {str(path)!r}", fix="give a JSONL file, one example a line")
    out: list[Example] = []
    seen: dict[str, int] = {}
    bad: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not text.strip():
                continue
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(str(path), line_no, "(line)", f"not valid JSON ({e.msg}, column {e.colno})") \
                        from None
                ex = parse_line(obj, line_no, str(path), tokenizer=tokenizer, config=config, kind=kind)
                if ex.id in seen:
                    raise DataError(str(path), line_no, "id", f"id {ex.id!r} repeats line {seen[ex.id]}",
                                    "give every example its own id")
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append({"file": e.file, "line": e.line, "field": e.field, "message": str(e)})
                continue
            seen[ex.id] = line_no
            out.append(ex)
    if bad and errors_path is not None:
        errors_path = Path(errors_path)
        errors_path.parent.mkdir(parents=True, exist_ok=True)
        with errors_path.open("a", encoding="utf-8") as fh:
            for row in bad:
                fh.write(json.dumps(row) + "\n")
    if not out:
        raise InvalidInputError(f"no usable example in {str(path)!r}"
                                + (f" ({len(bad)} bad line(s), see {errors_path})" if bad else ""),
                                fix="check the file: one JSON object a line with 'text' or 'input_ids'")
    return out

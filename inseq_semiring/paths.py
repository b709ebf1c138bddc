"""Decode the best gradient path from the back-pointers of the maxpath semiring.

``run(..., "maxpath", backpointers=True)`` leaves, for every node element, the edge its best value came through
(:mod:`~inseq_semiring.semirings.maxpath` states the tie rule). Following them from an input element to the root
gives the path: one :class:`Hop` per operator, with the operator, the module it ran in, the output element it
reached, the local weight of the edge and the running value (the best value from that element to the root).
The product of the local weights of a path equals the value reported for its input element.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import InvalidInputError
from .rules.registry import DEFAULT_RULES, RuleSet
from .semirings.maxpath import NO_PATH, MaxPath, decode_origin


@dataclass(frozen=True)
class Hop:
    op: str
    module_path: str
    shape: tuple[int, ...]
    index: tuple[int, ...]
    local_weight: float
    running_value: float

    @property
    def label(self) -> str:
        return module_label(self.module_path)


@dataclass(frozen=True)
class Path:
    input_position: int
    input_index: tuple[int, ...]
    value: float
    hops: tuple[Hop, ...]

    def product(self) -> float:
        """Signed product of the local weights; equals ``value`` (``|value|`` for ``sign="abs"``)."""
        return math.prod(h.local_weight for h in self.hops)

    def to_text(self) -> str:
        lines = [f"path from input {self.input_position}{list(self.input_index)}  value {self.value:.6g}"]
        for k, h in enumerate(self.hops):
            lines.append(f"  {k:3d}  {h.op:<32s} {h.label:<34s} -> {list(h.index)} of {list(h.shape)}"
                         f"  w={h.local_weight:+.4g}  best-to-root={h.running_value:.4g}")
        return "\n".join(lines)


def module_label(module_path: str) -> str:
    """``transformer.h.3.attn.c_attn`` -> ``layer 3 attn.c_attn``; ``lm_head`` stays."""
    if not module_path:
        return "<top level>"
    m = re.search(r"\.(\d+)\.(.+)$", module_path)
    if m:
        return f"layer {m.group(1)} {m.group(2)}"
    return module_path.split(".")[-1] if module_path.count(".") > 2 else module_path


def _unravel(flat: int, shape) -> tuple[int, ...]:
    out = []
    for size in reversed(tuple(shape)):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def _real(value, track: str, flat: int) -> float:
    m = value.hi if track == "hi" else value.lo
    return float(m.reshape(-1)[flat].double() * torch.exp(value.log_scale))


@torch.no_grad()
def decode_path(result, input_position: int = 0, element: int | tuple = 0, *,
                rules: RuleSet = DEFAULT_RULES) -> Path:
    """The best path from one input element to the root (scalar granularity, back-pointers kept)."""
    ring = result.semiring
    if not isinstance(ring, MaxPath) or not ring.backpointers:
        raise InvalidInputError("path decoding needs a maxpath result with back-pointers",
                                where="decode_path", fix="call run(..., 'maxpath', backpointers=True)")
    if not ring.scalar:
        raise InvalidInputError("granularity='tensor' keeps only the winning consumer, not element paths",
                                where="decode_path", fix="use granularity='scalar' to decode full paths")
    tape = result.tape
    tid = tape.input_ids[input_position]
    shape = tuple(result.values[input_position].shape)
    flat = _start_flat(element, shape)
    track = "lo" if ring.sign == "negative" else "hi"
    start_value = _real(result.trail[tid], track, flat)
    hops: list[Hop] = []
    edge_cache: dict[int, dict] = {}
    while tid != tape.root_id:
        value = result.trail[tid]
        src = value.pointers(track)
        code, out_flat = int(src[0].reshape(-1)[flat]), int(src[1].reshape(-1)[flat])
        if code == NO_PATH:
            raise InvalidInputError(f"element {list(_unravel(flat, shape))} has no path to the root",
                                    where="decode_path", fix="pick an element with a non-zero value")
        rec_index, out_slot, leaf = decode_origin(code)
        rec = tape.records[rec_index]
        if rec_index not in edge_cache:
            edge_cache[rec_index] = {(e.out, e.leaf): e.kind for e in rules.edges(rec)}
        weight = edge_cache[rec_index][(out_slot, leaf)].entry(flat, out_flat)
        if ring.signed and weight < 0:
            track = "lo" if track == "hi" else "hi"
        tid = rec.output_ids[out_slot]
        flat = out_flat
        shape = tuple(rec.outputs[out_slot].shape)
        running = _real(result.trail[tid], track, flat) if tid in result.trail else 1.0
        hops.append(Hop(str(rec.op).replace("aten.", ""), rec.module_path, shape, _unravel(flat, shape),
                        weight, running))
    start_shape = tuple(result.values[input_position].shape)
    return Path(input_position, _unravel(_start_flat(element, start_shape), start_shape), start_value, tuple(hops))


def _ravel(index, shape) -> int:
    flat = 0
    for i, size in zip(index, shape):
        flat = flat * size + int(i)
    return flat


def _start_flat(element, shape) -> int:
    return element if isinstance(element, int) else _ravel(element, shape)


def top_paths(result, k: int = 3, input_position: int = 0, *, rules: RuleSet = DEFAULT_RULES) -> list[Path]:
    """The best paths from the ``k`` input elements with the largest values (distinct start elements); ``k >= 1``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k={k!r}: the number of paths must be an integer >= 1", where="top_paths(k=...)",
                                fix="pass k=1 for the best path, k=3 for the top three")
    if not isinstance(getattr(result, "semiring", None), MaxPath):
        raise InvalidInputError(
            f"top_paths needs a maxpath result, got a {type(getattr(result, 'semiring', result)).__name__} one",
            where="top_paths", fix="call run(fn, inputs, 'maxpath', backpointers=True) and pass that result")
    values = result.values[input_position].reshape(-1)
    score = values.abs() if result.semiring.sign == "abs" else (values if result.semiring.sign == "positive" else -values)
    order = torch.argsort(score, descending=True, stable=True)[:k].tolist()
    return [decode_path(result, input_position, int(i), rules=rules) for i in order]

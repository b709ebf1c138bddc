"""What a dataset run computes: model, method, options, step scores, generation length; and its fingerprint.

The fingerprint is what the manifest compares on a re-run: two runs with the same fingerprint produce the same
numbers for the same row, so an output folder may be resumed only with an equal fingerprint. The model part of the
fingerprint is the model id plus, for a local folder, a hash of its ``config.json`` and of its files' names and
sizes (cheap, and changes when the weights are replaced); for the embedded ``smollm2`` the GGUF file's name and size.
Batch size, worker count and the cluster address are not in it: they do not change any row's numbers (each row is
attributed on its own, see :mod:`.worker`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["JobSpec", "model_fingerprint", "package_version", "SCHEMA_VERSION"]

#: bumped when the Parquet schema (see :mod:`.shards`) changes incompatibly
SCHEMA_VERSION = 1
DEFAULT_MODEL = "smollm2"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("inseq-semiring")
    except Exception:  # pragma: no cover - running from a source tree that is not installed
        return "0+unknown"


def model_fingerprint(model: str) -> str:
    if model == DEFAULT_MODEL:
        try:
            from ..models.smollm2 import find_gguf

            gguf = find_gguf()
            return f"smollm2:{gguf.name}:{gguf.stat().st_size}"
        except Exception:
            return "smollm2:unavailable"
    folder = Path(model)
    if not folder.is_dir():
        return f"name:{model}"  # a hub name: nothing local to hash
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return f"folder:{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class JobSpec:
    """Everything that decides a row's numbers. ``options`` go to ``model.attribute(**options)`` (e.g.
    ``sign="positive"`` for ``semiring_maxpath``, ``n_steps=20`` for ``integrated_gradients``)."""

    model: str = DEFAULT_MODEL
    method: str = "semiring_maxpath"
    options: dict[str, Any] = field(default_factory=dict)
    step_scores: tuple[str, ...] = ()
    max_new_tokens: int = 5  # rows without a target: how many tokens the model generates (greedy)
    device: str = "cpu"

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("device")  # the same numbers up to float differences; not a reason to refuse a resume
        d["step_scores"] = list(self.step_scores)
        d["options"] = json.loads(self.options_json())
        d["model_fingerprint"] = model_fingerprint(self.model)
        d["schema_version"] = SCHEMA_VERSION
        return d

    def options_json(self) -> str:
        return json.dumps(self.options, sort_keys=True, default=str)

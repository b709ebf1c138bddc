"""Build-on-first-use of a C++ CPU extension, with a per-CPU build cache and a one-time fallback warning."""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import torch

#: Set to 1 to skip every C++ build and use the PyTorch code paths.
NO_EXT_ENV = "INSEQ_SEMIRING_NO_EXT"


def _env_no_ext() -> bool:
    return os.environ.get(NO_EXT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _cpu_model() -> str:
    # -march=native code must not be reused on another CPU sharing the same home directory.
    seen: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen[key] = line.strip()
    except OSError:
        pass
    return "\n".join(seen.values()) or platform.processor()


def _short_reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # the compiler's own complaint beats ninja's echo of the (long) command line
    keys = ("error:", "not found", "no such file", "required", "error")
    pick = next(
        (ln for key in keys for ln in reversed(lines) if key in ln.lower() and len(ln) < 400),
        lines[0] if lines else repr(exc),
    )
    return f"{type(exc).__name__}: {pick[:300]}"


class CompiledExtension:
    """A C++ extension compiled with :func:`torch.utils.cpp_extension.load_inline` the first time it is needed and
    cached under ``~/.cache/inseq_semiring/ext/<name>_<hash of source, flags, torch, Python, CPU>`` (``-march=native``
    code is never reused on another CPU). :meth:`load` gives the module, or None after one warning when it cannot be
    built (no compiler, no ninja) or when ``$INSEQ_SEMIRING_NO_EXT=1``; callers then use their PyTorch code."""

    def __init__(self, name: str, source: str, cflags: list[str], what: str):
        self.name, self.source, self.cflags, self.what = name, source, list(cflags), what
        self.module = None
        self.failed = False
        self.build_seconds: float | None = None
        self._lock = threading.Lock()

    def build_dir(self) -> tuple[str, Path]:
        key = "\n".join([self.source, " ".join(self.cflags), torch.__version__, platform.python_version(),
                         platform.machine(), _cpu_model()])
        name = f"inseq_semiring_{self.name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return name, Path.home() / ".cache" / "inseq_semiring" / "ext" / name

    def load(self, stacklevel: int = 2):
        """``stacklevel``: frames from this method to the user code, for the one-time warning."""
        if self.module is not None or self.failed or _env_no_ext():
            return self.module
        with self._lock:
            if self.module is not None or self.failed:
                return self.module
            t0 = time.perf_counter()
            try:
                from torch.utils.cpp_extension import load_inline

                name, build_dir = self.build_dir()
                build_dir.mkdir(parents=True, exist_ok=True)
                self.module = load_inline(name=name, cpp_sources=[self.source], extra_cflags=self.cflags,
                                          build_directory=str(build_dir), verbose=False)
            except Exception as exc:  # no compiler, no ninja, compile error, ...
                self.failed = True
                warnings.warn(f"inseq_semiring: could not build the C++ {self.what} kernel ({_short_reason(exc)}); "
                              "using the slower pure-PyTorch code for the rest of this process. Set "
                              f"{NO_EXT_ENV}=1 to skip the build attempt (it needs a C++ compiler and ninja).",
                              RuntimeWarning, stacklevel=stacklevel + 1)
                return None
            self.build_seconds = time.perf_counter() - t0
            return self.module

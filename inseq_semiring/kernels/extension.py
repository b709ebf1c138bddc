"""Build-on-first-use of a C++ CPU extension, with a build cache keyed by everything that changes the build.

* Before a compile starts, one line on stderr says so (``building the max-times kernel (one time, about a minute;
  cached in ...)``); ``inseq-semiring build-kernels`` builds every kernel up front (``scripts/setup.sh`` runs it).
* ``$INSEQ_SEMIRING_NO_BUILD=1`` never compiles (a kernel already in the cache is still loaded), and a machine
  without a C++ compiler does not try: the pure-PyTorch code runs, after a one-line note.
  ``$INSEQ_SEMIRING_NO_EXT=1`` skips the compiled kernels altogether.
* The cache key holds the source, the compiler flags and compiler, torch's version, git revision, C++ ABI and install
  location (its include paths), the Python executable and version, the machine and the CPU (``-march=native``); each
  key is its own folder, so two environments sharing ``~/.cache/inseq_semiring/ext`` never rebuild each other's
  kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

#: Set to 1 to skip every C++ build and use the PyTorch code paths.
NO_EXT_ENV = "INSEQ_SEMIRING_NO_EXT"


#: Set to 1 to never compile (cached kernels are still used).
NO_BUILD_ENV = "INSEQ_SEMIRING_NO_BUILD"
_NOTED: set[str] = set()  # one note per reason and process


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_no_ext() -> bool:
    """The compiled kernels are off: ``$INSEQ_SEMIRING_NO_EXT=1``."""
    return _flag(NO_EXT_ENV)


#: Set (per thread / task) by :func:`kernels_visible`.
_VISIBLE: ContextVar[bool] = ContextVar("inseq_semiring_kernels_visible", default=False)

#: The dispatcher namespace of the kernel operators (``torch.ops.inseq_semiring``); defined once, at import.
_LIBRARY = torch.library.Library("inseq_semiring", "FRAGMENT")


@contextmanager
def kernels_visible():
    """Inside the block each compiled kernel call goes through its dispatcher operator
    (``torch.ops.inseq_semiring.<name>``, see :func:`dispatcher_op`), so a dispatch mode sees it as one call and a
    traced graph keeps it (:mod:`~inseq_semiring.traced_sweep`); outside, the kernel is called directly (the same
    values, without the dispatcher's ~10 µs)."""
    token = _VISIBLE.set(True)
    try:
        yield
    finally:
        _VISIBLE.reset(token)


def visible() -> bool:
    """Whether kernel calls go through their dispatcher operators here (inside :func:`kernels_visible`)."""
    return _VISIBLE.get()


def dispatcher_op(name: str, schema: str, kernel):
    """``kernel`` (tensors and flags in, a tuple of fresh tensors out; its CPU loops are opaque to PyTorch) as the
    CPU operator ``inseq_semiring::name`` of ``schema`` (e.g. ``"(Tensor a, bool f) -> (Tensor, Tensor)"``).
    Returns the function callers use: the operator inside :func:`kernels_visible`, ``kernel`` itself elsewhere."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, kernel, "CPU")
    op = getattr(torch.ops.inseq_semiring, name).default

    def call(*args):
        return op(*args) if _VISIBLE.get() else kernel(*args)

    call.__name__, call.__doc__, call.op = name, kernel.__doc__, op
    return call


def _note(reason: str) -> None:
    if reason not in _NOTED:
        _NOTED.add(reason)
        print(f"inseq-semiring: {reason}; using the pure-PyTorch kernels (slower, same values)", file=sys.stderr,
              flush=True)


def compiler() -> str | None:
    """The C++ compiler torch's extension builder would use (``$CXX``, default ``c++``), or None if absent."""
    return shutil.which(os.environ.get("CXX", "c++"))


def environment_key() -> list[str]:
    """Everything outside the source and flags that changes a build (see the module docstring)."""
    from torch.utils import cpp_extension

    return [torch.__version__, str(getattr(torch.version, "git_version", "")),
            f"cxx11abi={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", os.path.dirname(torch.__file__),
            *cpp_extension.include_paths(), sysconfig.get_paths().get("include", ""), sys.executable,
            platform.python_version(), platform.machine(), os.environ.get("CXX", "c++"), _cpu_model()]


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

    def op(self, function: str, schema: str):
        """The extension's ``function`` (whose result is a sequence of fresh tensors) as the dispatcher operator
        ``inseq_semiring::<function without _cpu>`` of ``schema`` (:func:`dispatcher_op`); callers load the
        extension first."""
        return dispatcher_op(function.removesuffix("_cpu"), schema,
                             lambda *args: tuple(getattr(self.load(), function)(*args)))

    def build_dir(self) -> tuple[str, Path]:
        key = "\n".join([self.source, " ".join(self.cflags), *environment_key()])
        name = f"inseq_semiring_{self.name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return name, Path.home() / ".cache" / "inseq_semiring" / "ext" / name

    def is_cached(self) -> bool:
        """Whether a build for this environment is in the cache (loading it compiles nothing)."""
        name, build_dir = self.build_dir()
        return (build_dir / f"{name}.so").exists()

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
                if not self.is_cached():
                    if _flag(NO_BUILD_ENV):
                        self.failed = True
                        _note(f"{NO_BUILD_ENV}=1: the compiled kernels are not built")
                        return None
                    if compiler() is None:
                        self.failed = True
                        _note(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) to build the compiled kernels")
                        return None
                    print(f"inseq-semiring: building the {self.what} kernel (one time, about a minute; cached in "
                          f"{build_dir})", file=sys.stderr, flush=True)
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

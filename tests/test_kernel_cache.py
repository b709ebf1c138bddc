"""Compiled kernels: one line before a build, a note instead of a build where none can happen, and a cache key per
environment, so two environments sharing ``~/.cache/inseq_semiring/ext`` never rebuild each other's kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from inseq_semiring.kernels import extension as ext

TINY = "#include <torch/extension.h>\nint64_t twice(int64_t x) { return 2 * x; }\n" \
       "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"twice\", &twice); }\n"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(ext, "_NOTED", set())
    return tmp_path


@pytest.fixture
def fake_builder(monkeypatch):
    """load_inline replaced by a stand-in that 'builds' by writing the .so file (no compiler run)."""
    calls = []

    def load_inline(name, cpp_sources, extra_cflags, build_directory, verbose):
        calls.append(name)
        Path(build_directory, f"{name}.so").write_bytes(b"")
        return object()

    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "load_inline", load_inline)
    return calls


def test_the_key_changes_with_the_python_executable_and_torch_location(home, monkeypatch):
    a = ext.CompiledExtension("tiny", TINY, ["-O2"], "tiny").build_dir()
    assert ext.CompiledExtension("tiny", TINY, ["-O2"], "tiny").build_dir() == a
    monkeypatch.setattr(sys, "executable", "/elsewhere/venv/bin/python")
    b = ext.CompiledExtension("tiny", TINY, ["-O2"], "tiny").build_dir()
    assert b[1] != a[1] and b[1].parent == a[1].parent
    monkeypatch.setattr(ext, "environment_key", lambda: ["another torch install"])
    assert ext.CompiledExtension("tiny", TINY, ["-O2"], "tiny").build_dir()[1] not in (a[1], b[1])
    assert ext.CompiledExtension("tiny", TINY, ["-O3"], "tiny").build_dir()[1] != a[1]  # flags


def test_one_line_before_a_build_and_none_for_a_cached_one(home, fake_builder, capsys):
    assert ext.CompiledExtension("tiny", TINY, [], "tiny test").load() is not None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("inseq-semiring: building the tiny test kernel (one time, about a "
                                               "minute; cached in ") and str(home) in err[0]
    assert ext.CompiledExtension("tiny", TINY, [], "tiny test").load() is not None  # a new process, say
    assert capsys.readouterr().err == "" and len(fake_builder) == 2


def test_no_build_env_var_notes_once_and_never_compiles(home, fake_builder, capsys, monkeypatch):
    monkeypatch.setenv(ext.NO_BUILD_ENV, "1")
    assert ext.CompiledExtension("tiny", TINY, [], "tiny").load() is None
    assert ext.CompiledExtension("other", TINY, [], "other").load() is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "INSEQ_SEMIRING_NO_BUILD=1" in err[0] and "pure-PyTorch" in err[0]
    assert fake_builder == []


def test_no_compiler_notes_and_falls_back(home, fake_builder, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "/no/such/compiler")
    assert ext.CompiledExtension("tiny", TINY, [], "tiny").load() is None
    err = capsys.readouterr().err
    assert "no C++ compiler (/no/such/compiler)" in err and fake_builder == []


def _second_venv(root: Path) -> Path:
    """Another virtual environment with the same packages, at another path (what two venvs, or one checkout reached
    through two paths, look like to the build): its own bin/python and a site-packages that points to ours."""
    import sysconfig

    env = root / "venv-b"
    (env / "bin").mkdir(parents=True)
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    if not cfg.exists():
        pytest.skip("not running in a virtual environment")
    (env / "pyvenv.cfg").write_text(cfg.read_text())
    os.symlink(os.path.realpath(sys.executable), env / "bin" / "python")
    purelib = Path(sysconfig.get_paths()["purelib"])
    target = env / purelib.relative_to(sys.prefix)
    target.parent.mkdir(parents=True)
    os.symlink(purelib, target)
    return env / "bin" / "python"


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from inseq_semiring.kernels.extension import CompiledExtension
    e = CompiledExtension("tiny", {src!r}, ["-O1"], "tiny test")
    print("cached" if e.is_cached() else "new", e.build_dir()[1], e.load().twice(21))
""")


@pytest.mark.skipif(ext.compiler() is None, reason="no C++ compiler")
def test_two_environments_sharing_a_cache_do_not_rebuild_each_others_kernels(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    envs = {"a": sys.executable, "b": str(_second_venv(tmp_path))}
    home = tmp_path / "home"
    home.mkdir()
    run_env = {**os.environ, "HOME": str(home), "PYTHONPATH": root}
    run_env.pop(ext.NO_BUILD_ENV, None)

    def call(which):
        proc = subprocess.run([envs[which], "-c", SCRIPT.format(root=root, src=TINY)], capture_output=True,
                              text=True, env=run_env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        state, folder, value = proc.stdout.split()
        assert value == "42"
        return state, Path(folder), "building the tiny test kernel" in proc.stderr

    a1, b1, a2, b2 = call("a"), call("b"), call("a"), call("b")
    assert a1[0] == "new" and a1[2] and b1[0] == "new" and b1[2]  # each environment builds once
    assert a1[1] != b1[1] and a1[1].parent == b1[1].parent  # its own folder in the shared cache
    so_a = a1[1] / f"{a1[1].name}.so"
    stamp = so_a.stat().st_mtime_ns
    assert a2 == ("cached", a1[1], False) and b2 == ("cached", b1[1], False)  # the second calls build nothing
    assert so_a.stat().st_mtime_ns == stamp


def test_build_kernels_covers_every_compiled_kernel(capsys):
    """Every module of ``inseq_semiring.kernels`` that defines a ``CompiledExtension`` is built by ``build-kernels``
    (setup.sh relies on it, so that no attribution compiles later)."""
    import importlib
    import pkgutil

    import inseq_semiring.kernels as pkg
    from inseq_semiring import cli

    kernels = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.endswith("_triton"):  # GPU kernels (Triton, compiled by Triton itself)
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if isinstance(getattr(mod, "EXTENSION", None), ext.CompiledExtension):
            kernels.append(mod.EXTENSION)
    assert len(kernels) >= 4
    assert cli.main(["build-kernels"]) == 0
    err = capsys.readouterr().err
    for k in kernels:
        assert f"{k.what} kernel:" in err, (k.what, err)

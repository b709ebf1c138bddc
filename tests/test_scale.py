"""Dataset-scale attribution (``inseq_semiring.scale``): in-process and on a real local Ray cluster (2 CPUs, 2 actors).

The Ray tests share one cluster (module fixture): ``attribute_dataset`` reuses an initialised Ray and leaves it up.
Every comparison is exact (``==`` on the stored float64 copies of Inseq's float32 scores), because each row is
attributed on its own whatever batch, worker or run it lands in.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

inseq = pytest.importorskip("inseq")
pa = pytest.importorskip("pyarrow")
pytest.importorskip("pandas")

from fixtures_inseq import *  # noqa: E402,F401,F403
from inseq_semiring.scale import attribute_dataset, load_errors, load_results  # noqa: E402
from inseq_semiring.scale.manifest import OutputMismatchError  # noqa: E402
from inseq_semiring.scale.rows import read_rows  # noqa: E402
from inseq_semiring.scale.shards import SCHEMA  # noqa: E402

WORDS = "keys cabinet author near guards pilot that likes cat mat dog table".split()
ROWS = [{"id": i, "input": "The " + " ".join(WORDS[: 1 + (i * 5) % 9]), "target": " are" if i % 3 else " is on"}
        for i in range(12)]
VOLATILE = ("seconds", "worker")  # timing and process id: the only columns that differ between runs


def _rows_equal(a, b) -> None:
    """Two results DataFrames hold the same rows with exactly the same values (NaN == NaN)."""
    assert list(a["id"]) == list(b["id"])
    for col in SCHEMA.names:
        if col in VOLATILE:
            continue
        for x, y in zip(a[col], b[col]):
            assert _same(x, y), (col, x, y)


def _same(x, y) -> bool:
    import numpy as np

    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, float) and isinstance(y, float):
        return x == y or (math.isnan(x) and math.isnan(y))
    if isinstance(x, (list, tuple, np.ndarray)):
        xs, ys = list(x), list(y)
        return len(xs) == len(ys) and all(_same(u, v) for u, v in zip(xs, ys))
    if isinstance(x, np.floating):
        return _same(float(x), float(y))
    return x == y


def _run(tiny_gpt2_dir, out, **kw):
    kw.setdefault("step_scores", ["probability"])
    kw.setdefault("batch_size", 2)
    return attribute_dataset(kw.pop("rows", ROWS), out, model=tiny_gpt2_dir, progress=False, **kw)


@pytest.fixture(scope="module")
def baseline(tiny_gpt2_dir, tmp_path_factory):
    """The uninterrupted in-process run (the reference every other run must equal)."""
    out = tmp_path_factory.mktemp("baseline")
    summary = _run(tiny_gpt2_dir, out)
    assert summary.status == "complete" and summary.rows_done == len(ROWS) and summary.rows_failed == 0
    return out, load_results(out)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


# ------------------------------------------------------------------------------------------------------------------
# in-process: results, schema, round trip
# ------------------------------------------------------------------------------------------------------------------
def test_results_equal_a_direct_inseq_call_and_schema_is_stable(tiny_gpt2_dir, baseline):
    out, df = baseline
    assert list(df["id"]) == [str(i) for i in range(len(ROWS))]
    shards = sorted((out / "shards").glob("part-*.parquet"))
    assert len(shards) == math.ceil(len(ROWS) / 2)
    import pyarrow.parquet as pq

    for shard in shards:
        assert pq.read_schema(shard).remove_metadata().equals(SCHEMA), shard
    import inseq_semiring.scale.shards as shards_mod

    documented = [line.split("``")[1] for line in shards_mod.__doc__.splitlines() if line.startswith("``")]
    assert documented == SCHEMA.names  # the docstring table documents exactly the schema, in order
    model = inseq.load_model(tiny_gpt2_dir, "semiring_maxpath")
    for k in (0, 7):
        row = ROWS[k]
        ref = model.attribute(row["input"], row["input"] + row["target"], step_scores=["probability"],
                              show_progress=False).sequence_attributions[0]
        got = df.iloc[k]
        assert list(got["target_tokens"]) == [t.token for t in ref.target]
        assert got["attr_pos_start"] == ref.attr_pos_start
        assert _same(got["target_scores"], ref.target_attributions.double().tolist())
        assert _same(got["step_scores"]["probability"], ref.step_scores["probability"].double().tolist())
        assert got["method"] == "semiring_maxpath" and json.loads(got["options"]) == {}
        assert got["model"] == tiny_gpt2_dir and got["seconds"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows_done"] == len(ROWS)
    assert manifest["fingerprint"]["method"] == "semiring_maxpath"
    assert not list(out.rglob("*.tmp"))


def test_inseq_objects_round_trip_and_builtin_method(tiny_gpt2_dir, tmp_path):
    """``save_inseq`` keeps Inseq's own objects; a built-in granular method (saliency) is reduced by the L2 norm."""
    rows = ROWS[:3]
    _run(tiny_gpt2_dir, tmp_path, rows=rows, method="saliency", save_inseq=True)
    df, objs = load_results(tmp_path), load_results(tmp_path, as_inseq=True)
    assert list(objs) == list(df["id"]) == ["0", "1", "2"]
    for k, rid in enumerate(df["id"]):
        seq = objs[rid].sequence_attributions[0]
        assert seq.target_attributions.dim() == 3  # granular: [token, generated, hidden]
        l2 = torch.linalg.vector_norm(seq.target_attributions.float(), dim=-1).double().tolist()
        assert _same(df["target_scores"].iat[k], l2)
        assert objs[rid].info["input_texts"] == [rows[k]["input"]]


def test_encoder_decoder_rows_have_source_scores(tiny_bart_dir, tmp_path):
    rows = [{"id": "a", "input": "the cat sat on the mat", "target": "le chat"}]
    attribute_dataset(rows, tmp_path, model=tiny_bart_dir, method="semiring_entropy", progress=False)
    got = load_results(tmp_path).iloc[0]
    assert len(got["source_tokens"]) == len(got["source_scores"]) > 0
    assert all(not math.isnan(v) for col in got["source_scores"] for v in col)


def test_rows_without_target_are_generated_and_contrast_rows_use_prob_diff(tiny_gpt2_dir, tmp_path):
    rows = [{"id": 1, "input": "The keys"}, {"id": 2, "input": "The keys", "target": " are", "contrast": " is"}]
    _run(tiny_gpt2_dir, tmp_path, rows=rows, max_new_tokens=3)
    df = load_results(tmp_path)
    gen = df.iloc[0]
    assert len(gen["target_tokens"]) - gen["attr_pos_start"] == 3 and gen["target"]
    model = inseq.load_model(tiny_gpt2_dir, "semiring_maxpath")
    ref = model.attribute("The keys", "The keys are", attributed_fn="contrast_prob_diff",
                          contrast_targets="The keys is", show_progress=False).sequence_attributions[0]
    assert _same(df.iloc[1]["target_scores"], ref.target_attributions.double().tolist())
    assert df.iloc[1]["contrast"] == " is"


def test_bad_rows_go_to_the_errors_file(tiny_gpt2_dir, tmp_path_factory):
    # a copy of the tiny model whose position embedding 20 is NaN: a row of more than 20 tokens attributes to NaN
    folder = tmp_path_factory.mktemp("nan-gpt2")
    shutil.copytree(tiny_gpt2_dir, folder, dirs_exist_ok=True)
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(folder))
    with torch.no_grad():
        model.transformer.wpe.weight[20] = float("nan")
    model.save_pretrained(str(folder))
    nan_input = "The keys" + " to the cabinet" * 7
    assert 20 < len(AutoTokenizer.from_pretrained(str(folder))(nan_input).input_ids) < 30
    good = ROWS[:4]
    bad = [{"id": "empty", "input": "  ", "target": " are"},
           {"id": "long", "input": "The keys", "target": " to the cabinet" * 12},
           {"id": "nan", "input": nan_input, "target": " are"}]
    out = tmp_path_factory.mktemp("bad")
    summary = attribute_dataset(good[:2] + bad + good[2:], out, model=str(folder), batch_size=3, progress=False)
    assert summary.status == "complete" and summary.rows_done == 4 and summary.rows_failed == 3
    assert sorted(load_results(out)["id"]) == sorted(str(r["id"]) for r in good)
    errors = {e["id"]: e for e in load_errors(out)}
    assert set(errors) == {"empty", "long", "nan"}
    assert errors["empty"]["kind"] == "empty_input" and "input text is empty" in errors["empty"]["message"]
    assert errors["long"]["kind"] == "too_long" and "context of 32 tokens" in errors["long"]["message"]
    # the semiring engine refuses a NaN forward pass itself; a built-in method returns NaN scores, caught by the check
    assert errors["nan"]["kind"] == "invalid_input" and "is NaN or inf" in errors["nan"]["message"]
    out_saliency = tmp_path_factory.mktemp("bad-saliency")
    attribute_dataset(bad[2:], out_saliency, model=str(folder), method="saliency", progress=False)
    (err,) = load_errors(out_saliency)
    assert err["kind"] == "nan" and "the attribution contains NaN" in err["message"]
    again = attribute_dataset(good[:2] + bad + good[2:], out, model=str(folder), batch_size=3, progress=False)
    assert again.rows_skipped == 7 and again.rows_done == again.rows_failed == 0  # errors are recorded, not redone


# ------------------------------------------------------------------------------------------------------------------
# resume and settings
# ------------------------------------------------------------------------------------------------------------------
def test_stopped_run_resumes_to_the_uninterrupted_result(tiny_gpt2_dir, baseline, tmp_path):
    first = _run(tiny_gpt2_dir, tmp_path, max_batches=2)
    assert first.status == "stopped" and first.rows_done == 4
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "stopped"
    assert len(load_results(tmp_path)) == 4
    second = _run(tiny_gpt2_dir, tmp_path, batch_size=3)  # another batch size: rows do not depend on batching
    assert second.status == "complete" and second.rows_skipped == 4 and second.rows_done == len(ROWS) - 4
    _rows_equal(load_results(tmp_path), baseline[1])


def test_changed_settings_are_refused_unless_overwrite(tiny_gpt2_dir, baseline, tmp_path):
    shutil.copytree(baseline[0], tmp_path, dirs_exist_ok=True)
    with pytest.raises(OutputMismatchError, match=r"options: \{\} -> \{'sign': 'positive'\}.*--overwrite"):
        _run(tiny_gpt2_dir, tmp_path, options={"sign": "positive"})
    with pytest.raises(OutputMismatchError, match="method: 'semiring_maxpath' -> 'semiring_flow'"):
        _run(tiny_gpt2_dir, tmp_path, method="semiring_flow")
    changed = [dict(r, input=r["input"] + " too") if r["id"] == 3 else r for r in ROWS]
    with pytest.raises(OutputMismatchError, match="row '3' was attributed with another text"):
        _run(tiny_gpt2_dir, tmp_path, rows=changed)
    _rows_equal(load_results(tmp_path), baseline[1])  # refused runs touched nothing
    redo = _run(tiny_gpt2_dir, tmp_path, options={"sign": "positive"}, overwrite=True)
    assert redo.rows_done == len(ROWS) and redo.rows_skipped == 0
    df = load_results(tmp_path)
    assert set(df["options"]) == {'{"sign": "positive"}'}


def test_dataset_formats_and_bad_files(tmp_path):
    import datasets

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    csv_lines = ["id,input,target"] + [f'{r["id"]},{r["input"]},{r["target"]}' for r in ROWS[:3]]
    (tmp_path / "a.csv").write_text("\n".join(csv_lines) + "\n")
    datasets.Dataset.from_list(ROWS[:3]).save_to_disk(str(tmp_path / "ds"))
    expected = read_rows(tmp_path / "a.jsonl")
    assert [r.id for r in expected] == ["0", "1", "2"] and expected[1].target == ROWS[1]["target"]
    assert read_rows(tmp_path / "a.csv") == expected == read_rows(tmp_path / "ds")
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "input": "a"}\n{"id": "1", "input": "b"}\n')
    with pytest.raises(ValueError, match="id '1' appears twice"):
        read_rows(tmp_path / "dup.jsonl")
    (tmp_path / "noin.jsonl").write_text('{"id": 1, "text": "a"}\n')
    with pytest.raises(ValueError, match="no 'input' field"):
        read_rows(tmp_path / "noin.jsonl")


def test_ray_is_optional(tiny_gpt2_dir, tmp_path):
    code = ("import sys; import inseq_semiring, inseq_semiring.scale; assert 'ray' not in sys.modules; "
            "sys.modules['ray'] = None\n"
            "from inseq_semiring.scale import attribute_dataset\n"
            "try:\n"
            f"    attribute_dataset([{{'id': 1, 'input': 'a'}}], {str(tmp_path / 'o')!r}, model={tiny_gpt2_dir!r}, "
            "workers=2)\n"
            "except ImportError as e:\n"
            "    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ERR" in res.stdout and "pip install 'inseq-semiring[scale]'" in res.stdout
    assert not (tmp_path / "o").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------------------------
# Ray: 2 actors on a local 2-CPU cluster
# ------------------------------------------------------------------------------------------------------------------
def test_two_ray_workers_equal_the_in_process_run(tiny_gpt2_dir, baseline, ray_cluster, tmp_path):
    summary = _run(tiny_gpt2_dir, tmp_path, workers=2)
    assert summary.status == "complete" and summary.workers == 2 and summary.worker_deaths == 0
    df = load_results(tmp_path)
    assert df["worker"].nunique() == 2  # both actors did work
    _rows_equal(df, baseline[1])
    assert ray_cluster.is_initialized()  # a cluster the call did not start is left running


def test_a_killed_ray_worker_loses_no_row_and_writes_none_twice(tiny_gpt2_dir, baseline, ray_cluster, tmp_path):
    flag = tmp_path / "exited"
    out = tmp_path / "out"
    summary = _run(tiny_gpt2_dir, out, workers=2, _exit_during_batch=2, _exit_flag=str(flag))
    assert flag.exists()  # an actor did call os._exit during its second batch
    dead = flag.read_text()
    assert summary.status == "complete" and summary.worker_deaths == 1
    df = load_results(out)
    assert df["id"].is_unique and len(df) == len(ROWS)
    _rows_equal(df, baseline[1])
    assert dead in set(df["worker"]) and len(set(df["worker"])) >= 2  # its first batch was committed
    assert not load_errors(out)


# ------------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------------
def test_cli_attribute_dataset_runs_resumes_and_refuses(tiny_gpt2_dir, baseline, tmp_path, capsys):
    from inseq_semiring import cli

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    common = ["attribute-dataset", "--data", str(data), "--out", str(out), "-m", tiny_gpt2_dir,
              "--batch-size", "2", "--step-scores", "probability", "-q"]
    assert cli.main(common + ["--max-batches", "3"]) == 0
    assert "stopped: 6 rows attributed" in capsys.readouterr().err
    assert cli.main(common) == 0
    assert "complete: 6 rows attributed, 0 failed, 6 skipped" in capsys.readouterr().err
    _rows_equal(load_results(out), baseline[1])
    assert cli.main(common + ["--sign", "positive"]) == 2
    err = capsys.readouterr().err
    assert "inseq-semiring: error:" in err and "--overwrite" in err and "Traceback" not in err
    assert cli.main(common + ["--option", "sign=\"positive\"", "--overwrite"]) == 0
    assert set(load_results(out)["options"]) == {'{"sign": "positive"}'}


def test_cli_ctrl_c_stops_cleanly_and_the_rerun_completes(tiny_gpt2_dir, baseline, tmp_path):
    """A real SIGINT to a running ``inseq-semiring attribute-dataset``: exit 130, nothing half-written, resumable."""
    import signal
    import time

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "inseq_semiring.cli", "attribute-dataset", "--data", str(data), "--out", str(out),
           "-m", tiny_gpt2_dir, "--batch-size", "1", "--step-scores", "probability", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((out / "shards").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert not list(out.rglob("*.tmp"))
    partial = load_results(out)  # every shard on disk is whole
    assert 2 <= len(partial) < len(ROWS)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    _rows_equal(load_results(out), baseline[1])


def test_sva_rows_module_writes_a_valid_dataset(tmp_path):
    res = subprocess.run([sys.executable, "-m", "inseq_semiring.scale.sva_rows", "--per-cell", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    (tmp_path / "sva.jsonl").write_text(res.stdout)
    rows = read_rows(tmp_path / "sva.jsonl")
    assert len(rows) == 20 and len({r.id for r in rows}) == 20
    assert all(r.target.startswith(" ") and r.contrast.startswith(" ") and r.target != r.contrast for r in rows)


def test_batches_group_rows_of_similar_length():
    from inseq_semiring.scale.batching import plan_batches
    from inseq_semiring.scale.rows import rows_from_records

    rows = rows_from_records([{"id": i, "input": "x" * n} for i, n in enumerate([9, 1, 5, 1, 9, 5, 3])])
    batches = plan_batches(rows, 2)
    assert [b.ids for b in batches] == [("1", "3"), ("6", "2"), ("5", "0"), ("4",)]
    assert sorted(i for b in batches for i in b.ids) == sorted(r.id for r in rows)
    with pytest.raises(ValueError, match="batch size 0 is not positive"):
        plan_batches(rows, 0)


def test_commit_writes_each_id_once(tmp_path):
    """A batch result that arrives twice (or overlaps committed rows) adds nothing the second time."""
    from inseq_semiring.scale.commit import Committer
    from inseq_semiring.scale.worker import BatchResult

    (tmp_path / "shards").mkdir()
    rows = [{"id": str(i), "input": "x", "target": " y", "seconds": 0.1} for i in range(3)]
    result = BatchResult(0, rows=rows[:2], errors=[{"id": "9", "kind": "too_long", "message": "m", "worker": "w"}])
    committer = Committer(tmp_path)
    assert committer.commit(result) == (2, 1)
    assert committer.commit(result) == (0, 0)
    assert Committer(tmp_path).commit(BatchResult(1, rows=rows[1:])) == (1, 0)  # a fresh committer reads the disk
    assert sorted(load_results_ids(tmp_path)) == ["0", "1", "2"]
    assert len((tmp_path / "errors.jsonl").read_text().splitlines()) == 1


def load_results_ids(out):
    import pyarrow.parquet as pq

    return [i for p in sorted((out / "shards").glob("part-*.parquet")) for i in pq.read_table(p)["id"].to_pylist()]


def test_cli_joins_an_existing_cluster_with_address(tiny_gpt2_dir, baseline, ray_cluster, tmp_path):
    """A second driver process (the CLI) joins this module's cluster with --address; the cluster stays up."""
    address = ray_cluster.get_runtime_context().gcs_address
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "inseq_semiring.cli", "attribute-dataset", "--data", str(data), "--out", str(out),
           "-m", tiny_gpt2_dir, "--batch-size", "2", "--step-scores", "probability", "-q", "--workers", "2",
           "--address", address]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "complete: 12 rows attributed" in res.stderr
    _rows_equal(load_results(out), baseline[1])
    assert ray_cluster.is_initialized() and ray_cluster.cluster_resources().get("CPU") == 2

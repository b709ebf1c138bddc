"""Evaluation metrics against hand-computed values on a model whose score is a known function of the tokens.

The additive model (tests/eval_models.py): ``s(x) = sum_i w[x_i]``. Example ``[BOS, 3, 4, 5, 6]`` with
``w = 0.1 (BOS), 0.3, 0.05, 0.2, 0.15``: ``s = 0.8``, ``n = 4`` removable tokens, leave-one-out ``loo_i = w_i``,
ranking ``3, 5, 6, 4`` (positions 1, 3, 4, 2).
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pandas as pd
import pytest
import torch

from eval_models import AdditiveModel
from inseq_semiring.evaluate import METRIC_NAMES, TOKEN_SCORES, evaluate
from inseq_semiring.evaluate.agreement import kendall_tau_b
from inseq_semiring.evaluate.ranking import check_fractions, k_of, rank

W = [0.1, 0.0, 0.05, 0.3, 0.05, 0.2, 0.15]  # ids 0 (BOS, special), 1 (pad), 2 (baseline), 3..6
IDS = [0, 3, 4, 5, 6]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metrics(out, method):
    df = pd.read_parquet(out / "metrics.parquet")
    df = df[df.method == method]
    return dict(zip(df.metric, df.value))


def test_k_is_exact_ceiling():
    assert 0.14 * 50 != 7 and math.ceil(0.14 * 50) == 8  # the floating-point trap the exact k avoids
    assert k_of(0.14, 50) == 7
    assert k_of(0.1, 4) == 1 and k_of(0.25, 4) == 1 and k_of(0.26, 4) == 2 and k_of(1, 4) == 4 and k_of(0.5, 0) == 0
    assert k_of(0.3, 10) == 3 and k_of(0.7, 10) == 7  # 0.3*10 = 3.0000000000000004, 0.7*10 = 7.000000000000001
    with pytest.raises(ValueError, match="outside"):
        check_fractions([0.1, 1.5])
    with pytest.raises(ValueError, match="twice"):
        check_fractions([0.1, 0.1])


def test_rank_descending_ties_by_position_nan_last():
    assert rank([9.0, 0.5, 1.0, 1.0, float("nan"), 2.0], [1, 2, 3, 4, 5]) == [5, 2, 3, 1, 4]


def _tau_brute(x, y):
    nc = nd = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        a, b = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
        tx += a == 0
        ty += b == 0
        nc += a * b > 0
        nd += a * b < 0
    n0 = len(x) * (len(x) - 1) // 2
    return (nc - nd) / math.sqrt((n0 - tx) * (n0 - ty))


def test_kendall_tau_b_hand_and_brute_force():
    assert kendall_tau_b([1, 2, 3, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(30), abs=1e-15)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 12)
        x = [rng.randint(0, 4) for _ in range(n)]
        y = [rng.randint(0, 4) for _ in range(n)]
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert kendall_tau_b(x, y) == pytest.approx(_tau_brute(x, y), abs=1e-12)
    try:
        from scipy.stats import kendalltau
    except ImportError:
        return
    x, y = [rng.random() for _ in range(30)], [rng.random() for _ in range(30)]
    assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize("kind", ["classifier", "causal"])
def test_every_metric_by_hand_delete(tmp_path, kind):
    data = _write(tmp_path / "d.jsonl", [{"id": "a", "input_ids": IDS, "relevant": [3]}])
    evaluate(data, ["loo"], tmp_path / "out", model=AdditiveModel(W, kind), fractions=(0.25, 0.5), progress=False)
    m = _metrics(tmp_path / "out", "loo")
    # MoRF (remove 3, then 5, 6, 4): 0.5, 0.3, 0.15, 0.1; LeRF (remove 4, then 6, 5, 3): 0.75, 0.6, 0.4, 0.1
    expect = {"comp@0.25": 0.3, "comp@0.5": 0.5, "aopc_comp": 0.4, "suff@0.25": 0.4, "suff@0.5": 0.2,
              "aopc_suff": 0.3, "abpc": (0.25 + 0.3 + 0.25 + 0) / 4, "loo_tau": 1.0, "hit@1": 0.0, "rr": 0.5}
    for name, value in expect.items():
        assert m[name] == pytest.approx(value, abs=1e-12), name
    assert m["seconds"] >= 0
    ex = pd.read_parquet(tmp_path / "out" / "examples.parquet")
    assert ex.full_score[0] == pytest.approx(0.8) and ex.n_removable[0] == 4 and ex.target_token_id[0] == 0
    cur = pd.read_parquet(tmp_path / "out" / "curves.parquet")
    morf = cur[cur.order == "morf"].sort_values("k").score.tolist()
    lerf = cur[cur.order == "lerf"].sort_values("k").score.tolist()
    assert morf == pytest.approx([0.8, 0.5, 0.3, 0.15, 0.1]) and lerf == pytest.approx([0.8, 0.75, 0.6, 0.4, 0.1])
    attr = pd.read_parquet(tmp_path / "out" / "attributions.parquet")
    assert attr.score.tolist() == pytest.approx([0.0, 0.3, 0.05, 0.2, 0.15])
    assert attr.special.tolist() == [True, False, False, False, False]


def test_replace_differs_from_delete_and_is_correct(tmp_path):
    """Replacing by token 2 (w = 0.05) adds 0.05 per removed token: loo_i = w_i - 0.05, comp(f) = sum - 0.05 k."""
    data = _write(tmp_path / "d.jsonl", [{"id": "a", "input_ids": IDS}])
    outs = {}
    for removal in ("delete", "replace"):
        evaluate(data, ["loo"], tmp_path / removal, model=AdditiveModel(W), fractions=(0.25, 0.5),
                 removal=removal, baseline_id=2, progress=False)
        outs[removal] = _metrics(tmp_path / removal, "loo")
    rep = outs["replace"]
    # ranking by loo (0.25, 0.0, 0.15, 0.1 at positions 1..4): 3, 5, 6, 4, the same as with delete
    assert rep["comp@0.25"] == pytest.approx(0.3 - 0.05) and rep["comp@0.5"] == pytest.approx(0.5 - 0.1)
    assert rep["suff@0.25"] == pytest.approx(0.8 - (0.1 + 0.3 + 3 * 0.05))
    assert rep["suff@0.5"] == pytest.approx(0.8 - (0.1 + 0.3 + 0.2 + 2 * 0.05))
    assert outs["delete"]["comp@0.25"] == pytest.approx(0.3)
    assert rep["comp@0.25"] != pytest.approx(outs["delete"]["comp@0.25"])
    attr = pd.read_parquet(tmp_path / "replace" / "attributions.parquet")
    assert attr.score.tolist() == pytest.approx([0.0, 0.25, 0.0, 0.15, 0.1])


def test_special_tokens_never_removed(tmp_path):
    """BOS in the middle and at the start: every scored input keeps both, in place."""
    ids = [0, 3, 4, 0, 5, 6]
    model = AdditiveModel(W)
    data = _write(tmp_path / "d.jsonl", [{"input_ids": ids}])
    for removal in ("delete", "replace"):
        model.calls.clear()
        evaluate(data, ["loo", "random", "saliency"], tmp_path / removal, model=model, removal=removal,
                 baseline_id=2, progress=False)
        rows = [r for call in model.calls for r in call]
        assert len(rows) > 10
        for r in rows:
            assert r.count(0) == 2, r
            if removal == "replace":
                assert len(r) == len(ids) and r[0] == 0 and r[3] == 0
        cur = pd.read_parquet(tmp_path / removal / "curves.parquet")
        everything_removed = cur[(cur.k == 4)].score
        assert everything_removed.tolist() == pytest.approx([0.2 + (0.2 if removal == "replace" else 0.0)] * 6)


def test_random_aopc_comp_matches_its_expectation(tmp_path):
    """Random ranking on an additive model: E[comp(f)] = (k(f)/n) * sum of the removable weights."""
    gen = torch.Generator().manual_seed(1)
    vocab = 40
    w = [0.02] + [0.0] + (torch.rand(vocab - 2, generator=gen, dtype=torch.float64) * 0.08).tolist()
    rows, expected = [], []
    fr = (0.1, 0.2, 0.3, 0.4, 0.5)
    for i in range(150):
        n = 6 + i % 5
        ids = [0] + torch.randint(2, vocab, (n,), generator=gen).tolist()
        rows.append({"id": f"r{i}", "input_ids": ids, "target": 0})  # class 0: p = a(x)
        expected.append(sum(k_of(f, n) / n for f in fr) / len(fr) * sum(w[t] for t in ids[1:]))
    data = _write(tmp_path / "d.jsonl", rows)
    evaluate(data, ["random"], tmp_path / "out", model=AdditiveModel(w), seed=3, progress=False)
    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    got = df[df.metric == "aopc_comp"].set_index("id").value.reindex([r["id"] for r in rows]).to_numpy()
    diff = got - torch.tensor(expected).numpy()
    se = diff.std() / math.sqrt(len(diff))
    assert abs(diff.mean()) < 4 * se + 1e-12, (diff.mean(), se)
    assert abs(diff.mean()) < 0.02 * float(torch.tensor(expected).mean())  # and small against the mean itself
    # the same seed gives the same scores; another seed others
    again = pd.read_parquet(tmp_path / "out" / "attributions.parquet")
    evaluate(data, ["random"], tmp_path / "seed4", model=AdditiveModel(w), seed=4, progress=False, limit=5)
    other = pd.read_parquet(tmp_path / "seed4" / "attributions.parquet")
    first = again[again.id == "r0"].score.tolist()
    assert first != other[other.id == "r0"].score.tolist()


def test_loo_tau_is_one_against_itself_and_metric_names(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"input_ids": [0, 3, 4, 5, 6, 2]}, {"input_ids": [0, 6, 5, 3]}])
    evaluate(data, ["loo", "random"], tmp_path / "out", model=AdditiveModel(W), progress=False)
    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert df[(df.method == "loo") & (df.metric == "loo_tau")].value.tolist() == [1.0, 1.0]
    assert set(df.metric) <= set(METRIC_NAMES) and "hit@1" not in set(df.metric)  # no ground truth given
    assert set(METRIC_NAMES) >= {"comp@0.1", "comp@0.5", "aopc_comp", "suff@0.3", "aopc_suff", "abpc", "loo_tau",
                                 "hit@1", "rr", "seconds"}
    assert {"loo", "random", "semiring_maxpath", "attn_lrp", "saliency", "greedy_pig"} <= set(TOKEN_SCORES)

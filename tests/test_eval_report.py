"""inseq_semiring.evaluate.report on hand-made Parquet inputs whose means and CIs are known."""

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

from inseq_semiring.evaluate.report import bootstrap_ci, mean_curves, summarize, write_reports  # noqa: E402


def _metrics(rows):
    return pd.DataFrame(rows, columns=["id", "method", "metric", "value"])


def test_constant_values_give_zero_width_ci():
    mean, lo, hi = bootstrap_ci([0.25] * 40, seed=3, n_boot=200)
    assert mean == lo == hi == 0.25


def test_seeded_ci_reproduces_and_matches_a_hand_bootstrap():
    v = np.arange(30, dtype=np.float64) ** 1.5
    a = bootstrap_ci(v, seed=7, n_boot=500)
    assert a == bootstrap_ci(v, seed=7, n_boot=500)
    assert a != bootstrap_ci(v, seed=8, n_boot=500)
    rng = np.random.default_rng(7)
    means = v[rng.integers(0, 30, size=(500, 30))].mean(1)
    assert a[0] == pytest.approx(v.mean())
    assert a[1] == pytest.approx(np.percentile(means, 2.5))
    assert a[2] == pytest.approx(np.percentile(means, 97.5))
    assert a[1] < v.mean() < a[2]


def test_ci_covers_the_mean_of_a_known_distribution_about_95_percent():
    # 200 independent samples of 50 N(0, 1) values: the 95 % CI should contain 0 in roughly 95 % of them
    rng = np.random.default_rng(0)
    hits = sum(lo <= 0 <= hi for _, lo, hi in (bootstrap_ci(rng.normal(size=50), seed=s, n_boot=400)
                                               for s in range(200)))
    assert 0.88 <= hits / 200 <= 0.99


def test_nulls_are_dropped_and_empty_cells_are_nan():
    mean, lo, hi = bootstrap_ci([1.0, np.nan, 3.0], seed=0, n_boot=100)
    assert mean == 2.0 and 1.0 <= lo <= hi <= 3.0
    assert all(np.isnan(bootstrap_ci([np.nan, np.nan])))
    assert bootstrap_ci([5.0]) == (5.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0], n_boot=0)


def test_summary_per_cell_does_not_depend_on_other_methods():
    rows = [(i, "a", "aopc_comp", float(i)) for i in range(20)]
    alone = summarize(_metrics(rows), seed=1, n_boot=300)
    rows_b = rows + [(i, "b", "aopc_comp", float(-i)) for i in range(20)] + [(i, "b", "rr", 1.0) for i in range(20)]
    both = summarize(_metrics(rows_b), seed=1, n_boot=300)
    ra = both[(both.method == "a") & (both.metric == "aopc_comp")].iloc[0]
    assert tuple(ra[["mean", "ci_low", "ci_high"]]) == tuple(alone.iloc[0][["mean", "ci_low", "ci_high"]])
    rb = both[(both.method == "b") & (both.metric == "rr")].iloc[0]
    assert (rb["n"], rb["mean"], rb["ci_low"], rb["ci_high"]) == (20, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="columns"):
        summarize(pd.DataFrame({"id": [0], "value": [1.0]}))


def test_mean_curves_interpolate_onto_the_grid():
    # example 0 has n = 2 (fractions 0, .5, 1), example 1 has n = 4; scores linear in the fraction: 1 - f and 1 - 2f
    rows = [(0, "a", "morf", k, k / 2, 1 - k / 2) for k in range(3)]
    rows += [(1, "a", "morf", k, k / 4, 1 - 2 * (k / 4)) for k in range(5)]
    curves = pd.DataFrame(rows, columns=["id", "method", "order", "k", "fraction", "score"])
    grid = np.array([0.0, 0.25, 0.5, 1.0])
    y, n = mean_curves(curves, grid)[("a", "morf")]
    assert n == 2
    np.testing.assert_allclose(y, ((1 - grid) + (1 - 2 * grid)) / 2)


def test_write_reports_files(tmp_path):
    rng = np.random.default_rng(0)
    rows, crows = [], []
    for i in range(12):
        for m in ("loo", "random", "gradient"):
            for metric in ("comp@0.1", "aopc_comp", "aopc_suff", "abpc", "loo_tau", "hit@1", "rr", "seconds"):
                val = 1.0 if metric == "loo_tau" and m == "loo" else float(rng.random())
                rows.append((f"ex{i}", m, metric, val))
            n = 3 + i % 4
            for order in ("morf", "lerf"):
                for k in range(n + 1):
                    crows.append((f"ex{i}", m, order, k, k / n, float(rng.random())))
    _metrics(rows).to_parquet(tmp_path / "metrics.parquet")
    pd.DataFrame(crows, columns=["id", "method", "order", "k", "fraction", "score"]).to_parquet(
        tmp_path / "curves.parquet")
    res = write_reports(tmp_path, seed=0, n_boot=200)
    s = pd.read_csv(tmp_path / "summary.csv")
    assert list(s.columns) == ["method", "metric", "n", "mean", "ci_low", "ci_high"]
    assert len(s) == 3 * 8
    loo = s[(s.method == "loo") & (s.metric == "loo_tau")].iloc[0]
    assert (loo["n"], loo["mean"], loo["ci_low"], loo["ci_high"]) == (12, 1.0, 1.0, 1.0)
    g = s[(s.method == "gradient") & (s.metric == "rr")].iloc[0]
    vals = [v for (_, m, met, v) in rows if m == "gradient" and met == "rr"]
    assert g["mean"] == pytest.approx(np.mean(vals)) and g["ci_low"] < g["mean"] < g["ci_high"]
    md = (tmp_path / "summary.md").read_text()
    assert "| loo |" in md and "1.000 [1.000, 1.000]" in md and "comp@0.1" not in md
    for f in ("curves.png", "aopc.png", "ground_truth.png"):
        assert (tmp_path / "figures" / f).stat().st_size > 1000
    assert len(res["files"]) == 5
    # a second call with the same seed writes the same numbers
    write_reports(tmp_path, seed=0, n_boot=200)
    pd.testing.assert_frame_equal(s, pd.read_csv(tmp_path / "summary.csv"))


def test_no_ground_truth_no_bars_and_missing_run(tmp_path):
    rows = [(i, "a", "aopc_comp", 0.5) for i in range(3)] + [(i, "a", "hit@1", None) for i in range(3)]
    _metrics(rows).to_parquet(tmp_path / "metrics.parquet")
    write_reports(tmp_path, n_boot=50)
    assert (tmp_path / "figures" / "aopc.png").exists()
    assert not (tmp_path / "figures" / "ground_truth.png").exists()
    assert not (tmp_path / "figures" / "curves.png").exists()
    with pytest.raises(FileNotFoundError, match="run the evaluation"):
        write_reports(tmp_path / "nothing")

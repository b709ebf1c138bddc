"""Summary tables and figures of an evaluation run, read back from its Parquet files.

:func:`write_reports` reads ``DIR/metrics.parquet`` (``id, method, metric, value``) and, where present,
``DIR/curves.parquet`` (``id, method, order, k, fraction, score``) and writes

* ``DIR/summary.csv``: one row per method x metric: ``method, metric, n, mean, ci_low, ci_high``;
* ``DIR/summary.md``: the same as a Markdown table (methods x headline metrics, ``mean [low, high]``);
* ``DIR/figures/curves.png``: the mean MoRF and LeRF curves per method against the fraction removed;
* ``DIR/figures/aopc.png``: AOPC comprehensiveness and sufficiency per method, with 95 % CIs;
* ``DIR/figures/ground_truth.png``: hit@1 and reciprocal rank per method with 95 % CIs (only when the run has
  ground truth, i.e. some ``hit@1`` value is not null).

Confidence intervals (:func:`bootstrap_ci`): the percentile bootstrap over examples. For one method x metric with
the ``n`` non-null per-example values ``v_1..v_n`` (mean ``m``), draw ``n_boot`` resamples of size ``n`` with
replacement, each with the mean ``m*_b``; the 95 % CI is the 2.5th and 97.5th percentiles of ``m*_1..m*_B``
(``numpy.percentile``, linear interpolation). Every cell uses its own ``numpy.random.default_rng(seed)``, so a
cell's CI does not depend on which other methods or metrics are in the run, and the same ``seed`` reproduces it.
With ``n = 1`` the CI is ``[m, m]``; with ``n = 0`` the row has ``mean`` and the bounds null.

Curves: each example's curve (points ``(fraction, score)``, ``fraction = k / n``) is linearly interpolated onto the
common grid ``0, 0.02, ..., 1`` (held constant beyond its first and last point), then averaged over examples.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

#: The metrics of the Markdown table, in order (all others are in summary.csv).
HEADLINE = ("aopc_comp", "aopc_suff", "abpc", "loo_tau", "hit@1", "rr", "seconds")
GRID = np.linspace(0.0, 1.0, 51)


def bootstrap_ci(values, seed: int = 0, n_boot: int = 1000, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite ``values`` and its percentile-bootstrap ``level`` CI.

    ``low``/``high`` are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the means of ``n_boot``
    resamples with replacement drawn by ``numpy.random.default_rng(seed)``. NaN (null) values are dropped first;
    no value left gives ``(nan, nan, nan)``."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    # the resampled means of constant values can differ from ``mean`` in the last bit; keep the CI around it
    return mean, float(min(lo, mean)), float(max(hi, mean))


def _pd():
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - the [scale] extra installs it
        raise ImportError("the evaluation reports need pandas and pyarrow: pip install 'inseq-semiring[scale]'") from err
    return pd


def _order(seq) -> list:
    """Unique values in order of first appearance."""
    return list(dict.fromkeys(seq))


def summarize(metrics, seed: int = 0, n_boot: int = 1000):
    """The summary table (a DataFrame ``method, metric, n, mean, ci_low, ci_high``) of a metrics table with columns
    ``id, method, metric, value``; methods and metrics in order of first appearance."""
    pd = _pd()
    missing = {"id", "method", "metric", "value"} - set(metrics.columns)
    if missing:
        raise ValueError(f"metrics table lacks the columns {sorted(missing)} (has {list(metrics.columns)})")
    rows = []
    for method in _order(metrics["method"]):
        sub = metrics[metrics["method"] == method]
        for metric in _order(sub["metric"]):
            vals = pd.to_numeric(sub.loc[sub["metric"] == metric, "value"], errors="coerce").to_numpy(np.float64)
            n = int(np.isfinite(vals).sum())
            mean, lo, hi = bootstrap_ci(vals, seed=seed, n_boot=n_boot)
            rows.append({"method": method, "metric": metric, "n": n, "mean": mean, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["method", "metric", "n", "mean", "ci_low", "ci_high"])


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "–"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.1e}"
    return f"{x:.3f}"


def markdown_table(summary, metrics=HEADLINE) -> str:
    """Methods x ``metrics`` (those present), each cell ``mean [ci_low, ci_high]``."""
    present = [m for m in metrics if m in set(summary["metric"])]
    head = "| method | " + " | ".join(present) + " |"
    lines = [head, "|---|" + "---:|" * len(present)]
    for method in _order(summary["method"]):
        cells = []
        for metric in present:
            row = summary[(summary["method"] == method) & (summary["metric"] == metric)]
            if row.empty or not np.isfinite(row["mean"].iloc[0]):
                cells.append("–")
                continue
            r = row.iloc[0]
            cells.append(f"{_fmt(r['mean'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curves(curves, grid=GRID) -> dict:
    """``{(method, order): (mean score on grid [G], number of examples)}`` from a curves table."""
    out = {}
    for (method, order), sub in curves.groupby(["method", "order"], sort=False):
        ys = []
        for _, ex in sub.groupby("id", sort=False):
            ex = ex.sort_values("fraction")
            x = ex["fraction"].to_numpy(np.float64)
            y = ex["score"].to_numpy(np.float64)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                ys.append(np.interp(grid, x[ok], y[ok]))
        if ys:
            out[(method, order)] = (np.mean(ys, axis=0), len(ys))
    return out


def _method_color(i: int):
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def _bars(ax, summary, methods, metric, title):
    rows = [summary[(summary["method"] == m) & (summary["metric"] == metric)] for m in methods]
    mean = np.array([r["mean"].iloc[0] if not r.empty else np.nan for r in rows])
    lo = np.array([r["ci_low"].iloc[0] if not r.empty else np.nan for r in rows])
    hi = np.array([r["ci_high"].iloc[0] if not r.empty else np.nan for r in rows])
    x = np.arange(len(methods))
    err = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)])
    ax.bar(x, np.nan_to_num(mean), yerr=err, capsize=2, color=[_method_color(i) for i in range(len(methods))])
    ax.set_xticks(x)
    ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)


def write_figures(out_dir, summary, curves=None) -> list[str]:
    """The PNGs of :func:`write_reports` (Agg canvas, no display needed). Returns the written paths."""
    from .. import viz

    fig_dir = Path(out_dir) / "figures"
    written = []
    methods = _order(summary["method"])
    if curves is not None and len(curves):
        mc = mean_curves(curves)
        fig = viz.new_figure((10, 4))
        for i, (order, title) in enumerate((("morf", "MoRF: most relevant removed first"),
                                            ("lerf", "LeRF: least relevant removed first"))):
            ax = fig.add_subplot(1, 2, i + 1)
            for j, m in enumerate(methods):
                if (m, order) in mc:
                    y, n = mc[(m, order)]
                    ax.plot(GRID, y, label=f"{m} (n={n})", color=_method_color(j), linewidth=1,
                            linestyle="-" if j < 10 else "--")
            ax.set_xlabel("fraction of tokens removed")
            ax.set_ylabel("mean target score" if i == 0 else "")
            ax.set_title(title, fontsize=9)
        fig.axes[-1].legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        written.append(str(viz.save(fig, fig_dir / "curves.png")))
    present = set(summary["metric"])
    for name, metrics in (("aopc", ("aopc_comp", "aopc_suff")), ("ground_truth", ("hit@1", "rr"))):
        metrics = [m for m in metrics if m in present
                   and np.isfinite(summary.loc[summary["metric"] == m, "mean"].to_numpy(np.float64)).any()]
        if not metrics:
            continue
        fig = viz.new_figure((4.5 * len(metrics), 3.8))
        for i, metric in enumerate(metrics):
            _bars(fig.add_subplot(1, len(metrics), i + 1), summary, methods, metric, f"{metric} (mean, 95% CI)")
        written.append(str(viz.save(fig, fig_dir / f"{name}.png")))
    return written


def write_reports(out_dir, seed: int = 0, n_boot: int = 1000) -> dict:
    """Write ``summary.csv``, ``summary.md`` and ``figures/`` of the evaluation run in ``out_dir`` (see the module
    docstring). Returns ``{"summary": DataFrame, "files": [paths]}``."""
    pd = _pd()
    out = Path(out_dir)
    mpath = out / "metrics.parquet"
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} does not exist: run the evaluation (inseq-semiring evaluate --out "
                                f"{out_dir}) before writing its reports")
    metrics = pd.read_parquet(mpath)
    summary = summarize(metrics, seed=seed, n_boot=n_boot)
    files = []
    summary.to_csv(out / "summary.csv", index=False)
    files.append(str(out / "summary.csv"))
    n_ex = metrics["id"].nunique()
    md = (f"# Evaluation summary\n\n{n_ex} examples; mean over examples with a 95 % percentile-bootstrap CI "
          f"({n_boot} resamples, seed {seed}).\n\n{markdown_table(summary)}\n")
    (out / "summary.md").write_text(md)
    files.append(str(out / "summary.md"))
    cpath = out / "curves.parquet"
    curves = pd.read_parquet(cpath) if cpath.is_file() else None
    files.extend(write_figures(out, summary, curves))
    return {"summary": summary, "files": files}

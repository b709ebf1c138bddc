"""Plots for component analyses, entropies and paths (matplotlib, Agg; no pyplot, no global backend change).

Every function draws into ``ax`` when given, else into a fresh :class:`matplotlib.figure.Figure` rendered by the
Agg canvas, and returns the figure; :func:`save` writes it (PNG/PDF/SVG by suffix).

* :func:`component_bars` — stacked bars of Query/Key/Value/Skip values (or shares) per category, e.g. per layer
  (:func:`layer_component_shares`) or per token type (the §5.1 figure).
* :func:`entropy_per_token` — bars of the path entropy per token (one series or several).
* :func:`path_grid` — a path drawn on a layers x positions grid from ``(layer, position, label)`` hops.
* :func:`entropy_vs_width` — mean +- std over seeds against width, with optional reference points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COMPONENT_COLORS = {"Query": "#4C72B0", "Key": "#DD8452", "Value": "#55A868", "Skip": "#8172B3", "Other": "#937860"}
_FALLBACK = ["#C44E52", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def new_figure(size=(6.0, 4.0)) -> Figure:
    """An empty figure on an Agg canvas (add axes with ``fig.add_subplot``)."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _figure(ax, size=(6.0, 4.0)):
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(size)
    return fig, fig.add_subplot(1, 1, 1)


def _color(label: str, i: int) -> str:
    return COMPONENT_COLORS.get(label, _FALLBACK[i % len(_FALLBACK)])


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def component_bars(
    table: Mapping[str, Mapping[str, float]],
    labels: Sequence[str] | None = None,
    *,
    normalize: bool = False,
    ax=None,
    title: str | None = None,
    ylabel: str | None = None,
    xlabel: str | None = None,
    annotate: bool = False,
    legend: str | None = "best",
):
    """Stacked bars: one bar per category (``table``'s keys, in order), one segment per component label.
    ``normalize``: divide each bar by its total (shares; bars with a zero total stay empty). ``legend``: a
    matplotlib location, ``"outside"`` (right of the axes) or ``None``."""
    cats = list(table)
    if labels is None:
        labels = []
        for row in table.values():
            labels += [k for k in row if k not in labels]
    vals = np.array([[float(table[c].get(lab, 0.0)) for lab in labels] for c in cats], dtype=float).reshape(
        len(cats), len(labels))
    if normalize:
        tot = vals.sum(1, keepdims=True)
        vals = np.divide(vals, tot, out=np.zeros_like(vals), where=tot != 0)
    fig, ax = _figure(ax, (max(4.0, 1.1 * len(cats) + 2), 4.0))
    x = np.arange(len(cats))
    pos_base, neg_base = np.zeros(len(cats)), np.zeros(len(cats))
    for i, lab in enumerate(labels):
        v = vals[:, i]
        base = np.where(v >= 0, pos_base, neg_base)
        ax.bar(x, v, bottom=base, color=_color(lab, i), label=lab, width=0.7)
        if annotate:
            for xi, (b, vi) in enumerate(zip(base, v)):
                if abs(vi) > 1e-12:
                    ax.text(xi, b + vi / 2, f"{vi:.3g}", ha="center", va="center", fontsize=7)
        pos_base += np.where(v >= 0, v, 0)
        neg_base += np.where(v < 0, v, 0)
    ax.set_xticks(x)
    crowded = sum(len(str(c)) for c in cats) > 30
    ax.set_xticklabels(cats, rotation=25 if crowded else 0, ha="right" if crowded else "center")
    ax.axhline(0, color="black", linewidth=0.5)
    top, bottom = float(pos_base.max(initial=0.0)), float(neg_base.min(initial=0.0))
    if top > bottom:  # headroom above the tallest bar (zero-height segments would pin the limit with sticky edges)
        pad = 0.06 * (top - bottom)
        ax.set_ylim(bottom - (pad if bottom < 0 else 0.0), top + pad)
    ax.set_ylabel(("share" if normalize else "value") if ylabel is None else ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    if legend == "outside":
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    elif legend is not None:
        ax.legend(fontsize=8, frameon=False, loc=legend)
    return fig


def layer_component_shares(per_layer: Sequence[Mapping[str, float]], labels: Sequence[str] | None = None, *,
                           normalize: bool = True, ax=None, title: str | None = None):
    """Per-layer stacked bars of the components' shares (``per_layer[k]``: label -> value of layer ``k``)."""
    table = {str(k): dict(row) for k, row in enumerate(per_layer)}
    return component_bars(table, labels, normalize=normalize, ax=ax, title=title, xlabel="layer",
                          ylabel="share of credited value" if normalize else "credited value")


def entropy_per_token(tokens: Sequence[str], entropies: Sequence[float] | Mapping[str, Sequence[float]], *,
                      ax=None, title: str | None = None, ylabel: str = "path entropy (nats)"):
    """Bars of the entropy per token; a mapping gives several series side by side."""
    series = dict(entropies) if isinstance(entropies, Mapping) else {"entropy": entropies}
    fig, ax = _figure(ax, (max(4.0, 0.5 * len(tokens) + 2), 3.5))
    x = np.arange(len(tokens))
    width = 0.8 / max(len(series), 1)
    for i, (name, vals) in enumerate(series.items()):
        vals = np.asarray([float(v) for v in vals], dtype=float)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width=width, label=name, color=_FALLBACK[i % 5]
               if len(series) > 1 else "#4C72B0")
    ax.set_xticks(x)
    ax.set_xticklabels([str(t) for t in tokens], rotation=45 if len(tokens) > 8 else 0, ha="right"
                       if len(tokens) > 8 else "center")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8, frameon=False)
    return fig


def path_grid(hops: Sequence[tuple[int, int, str]], *, n_layers: int | None = None,
              tokens: Sequence[str] | None = None, n_positions: int | None = None, ax=None,
              title: str | None = None, label_hops: bool = True):
    """Draw a path over a layers x positions grid. ``hops``: ``(layer, position, label)`` in path order (input
    side first); layer ``-1`` may stand for the embeddings. Consecutive hops are joined by arrows; a hop's label
    (e.g. the component it leaves through) is written next to it."""
    layers = [h[0] for h in hops]
    positions = [h[1] for h in hops]
    lo_layer = min(layers + [0])
    hi_layer = max(layers + [(n_layers - 1) if n_layers else 0])
    n_pos = n_positions or (len(tokens) if tokens is not None else (max(positions + [0]) + 1))
    fig, ax = _figure(ax, (max(4.0, 0.7 * n_pos + 1.5), max(3.0, 0.6 * (hi_layer - lo_layer + 1) + 1.5)))
    gx, gy = np.meshgrid(np.arange(n_pos), np.arange(lo_layer, hi_layer + 1))
    ax.scatter(gx.ravel(), gy.ravel(), s=18, color="#DDDDDD", zorder=1)
    for (l0, p0, _), (l1, p1, _) in zip(hops[:-1], hops[1:]):
        ax.annotate("", xy=(p1, l1), xytext=(p0, l0),
                    arrowprops=dict(arrowstyle="->", color="#C44E52", lw=1.6, shrinkA=4, shrinkB=4), zorder=2)
    if hops:
        ax.scatter(positions, layers, s=60, color="#C44E52", zorder=3)
        if label_hops:
            for layer, pos, lab in hops:
                if lab:
                    ax.annotate(str(lab), (pos, layer), textcoords="offset points", xytext=(6, 4), fontsize=8,
                                color="#333333", zorder=4)
    ax.set_xticks(np.arange(n_pos))
    ax.set_xticklabels([str(t) for t in tokens] if tokens is not None else [str(i) for i in range(n_pos)])
    ax.set_yticks(np.arange(lo_layer, hi_layer + 1))
    ax.set_yticklabels(["emb" if k == -1 else str(k) for k in range(lo_layer, hi_layer + 1)])
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    ax.set_xlim(-0.5, n_pos - 0.5)
    ax.set_ylim(lo_layer - 0.5, hi_layer + 0.5)
    if title:
        ax.set_title(title)
    return fig


def entropy_vs_width(widths: Sequence[int], series: Mapping[str, Sequence[Sequence[float]]], *,
                     reference: Mapping[str, Mapping[int, Sequence[float]]] | None = None,
                     guide=None, ax=None, title: str | None = None, ylabel: str = "entropy (nats)"):
    """``series[name][i]``: the values (one per seed) at ``widths[i]``, drawn as mean +- std with the seeds as
    dots; ``reference[name][width]``: points to compare with (e.g. the paper's); ``guide``: ``(label, f)`` to
    draw ``f(width)`` as a dashed line."""
    fig, ax = _figure(ax, (6.0, 4.0))
    w = np.asarray(widths, dtype=float)
    for i, (name, vals) in enumerate(series.items()):
        color = _FALLBACK[i % 5] if i else "#4C72B0"
        means = np.array([np.mean(v) for v in vals])
        stds = np.array([np.std(v) for v in vals])
        ax.errorbar(w, means, yerr=stds, marker="o", color=color, label=name, capsize=3)
        for wi, v in zip(w, vals):
            ax.scatter([wi] * len(v), v, s=10, color=color, alpha=0.5)
    for j, (name, pts) in enumerate((reference or {}).items()):
        xs = [k for k, v in pts.items() for _ in v]
        ys = [y for v in pts.values() for y in v]
        ax.scatter(xs, ys, marker="x", s=40, color="black" if j == 0 else _FALLBACK[(j + 2) % 5], label=name,
                   zorder=4)
    if guide is not None:
        name, f = guide
        grid = np.geomspace(w.min(), w.max(), 50)
        ax.plot(grid, [f(g) for g in grid], linestyle="--", color="#8C8C8C", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(w)
    ax.set_xticklabels([str(int(x)) for x in w])
    ax.set_xlabel("hidden width H")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    return fig

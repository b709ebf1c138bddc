"""Appendix B.1 of Du et al. (2023): gradient-path entropy of an MLP on FFOOM grows with its width.

FFOOM ("four features, only one matters"): ``x ~ U[0, 1)^4``, ``y = 1[x0 > 0.5]``. Model ``4 -> H -> 2`` with a
leaky ReLU (slope 0.01); Adam (lr 1e-3), batch 32, one epoch on the training split of ``N = 20,000`` examples
(70/10/20); ``H`` in {4, 8, 16, 32, 64, 128}, 3 seeds (the seed draws both the data and the initialisation).

Entropy, at the end of training: root = the batch-mean cross-entropy of a fixed batch of ``B = 32`` held-out
(test-split) rows, inputs = that ``[B, 4]`` batch, one ``"entropy"`` sweep. The loss is written as
``-log_softmax(z).gather(y).mean()`` — the same function and the same path products as ``F.cross_entropy``
(``tests/test_losses.py`` checks that equivalence); its graph is addmm -> leaky_relu -> addmm -> log_softmax ->
gather -> mean.

Per feature ``j`` we report two numbers:

* ``pooled`` (the primary number): the entropy of the distribution over *all* paths that start in column ``j``
  of the batch, i.e. ``pooled_entropy(raw, dims=0)`` (sum ``Z`` and ``U`` over the batch rows, then
  ``U/Z + log Z``). This treats "feature ``j``" as one input node of the batch graph, as the batch-mean root
  does. Since rows share no paths, it decomposes as ``sum_b p_b H_b + H(p)``, ``p_b = Z_b / sum Z``: the
  per-row entropies plus the entropy of how the path mass spreads over the rows (at most ``log B``).
* ``per_row``: the mean over the batch rows of the per-element entropy ``H_b`` (paths from ``x[b, j]`` only).
  A row has exactly ``2H`` paths (``H`` hidden units x 2 logits, each logit reaching the chosen log-prob once
  through the log-softmax), so ``H_b <= log(2H)``.

We also report ``H(p)`` (``row_mixing``) so the two can be related. The paper's table (relevant feature x0):
H=4: 2.55/2.17/2.20; 8: 2.79/2.67/3.02; 16: 3.59/3.82/3.83; 32: 4.56/4.44/4.41; 64: 5.10/5.12/5.09;
128: 5.76/5.78/5.83.

``run(config) -> dict`` writes ``summary.json`` and ``entropy_vs_width.png``. CLI::

    python -m inseq_semiring.experiments.ffoom --out outputs/ffoom [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ._common import output_dir, torch_threads, with_overrides
from .. import viz
from ..api import run as semiring_run
from ..semirings.scaled import entropy_of, pooled_entropy
from .synthetic import ffoom as make_ffoom
from .train import MLP, accuracy, set_seed, train_classifier

#: The paper's entropies of the relevant feature x0 (three seeds per width).
PAPER_X0 = {4: (2.55, 2.17, 2.20), 8: (2.79, 2.67, 3.02), 16: (3.59, 3.82, 3.83), 32: (4.56, 4.44, 4.41),
            64: (5.10, 5.12, 5.09), 128: (5.76, 5.78, 5.83)}


@dataclass
class FFOOMConfig:
    out: str = "outputs/ffoom"
    n_examples: int = 20_000
    widths: tuple = (4, 8, 16, 32, 64, 128)
    seeds: tuple = (0, 1, 2)
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    negative_slope: float = 0.01
    entropy_batch: int = 32
    threads: int = 1
    plots: bool = True

    @classmethod
    def quick(cls, **kw) -> "FFOOMConfig":
        base = dict(n_examples=4000, widths=(4, 16, 64), seeds=(0, 1))
        base.update(kw)
        return cls(**base)


def batch_loss(model: torch.nn.Module, y: torch.Tensor):
    """``x -> mean_b -log softmax(model(x))[b, y_b]`` (= ``F.cross_entropy``, mean reduction)."""
    def fn(x):
        return -F.log_softmax(model(x), dim=-1).gather(1, y[:, None]).mean()
    return fn


def feature_entropies(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """One entropy sweep of the batch-mean loss of ``(X, y)``; per feature: pooled, per-row mean, row mixing."""
    res = semiring_run(batch_loss(model, y), X, "entropy", model=model)
    raw = res.raw[0]
    pooled = pooled_entropy(raw, 0)  # [F]
    per_elem = entropy_of(raw.z, raw.u, raw.log_scale)  # [B, F]
    z = raw.z.double()
    p = z / z.sum(0, keepdim=True)
    mixing = -(torch.xlogy(p, p)).sum(0)
    return {"pooled": pooled.tolist(), "per_row_mean": per_elem.mean(0).tolist(),
            "per_row_std": per_elem.std(0).tolist(), "row_mixing": mixing.tolist(),
            "per_row_weighted": (p * per_elem).sum(0).tolist()}


def run_one(width: int, seed: int, cfg: FFOOMConfig) -> dict:
    data = make_ffoom(cfg.n_examples, seed=seed)
    set_seed(seed)
    model = MLP(4, width, 2, cfg.negative_slope)
    t0 = time.perf_counter()
    log = train_classifier(model, data.train, data.val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                           seed=seed)
    t1 = time.perf_counter()
    Xt, yt = data.test
    ent = feature_entropies(model, Xt[:cfg.entropy_batch], yt[:cfg.entropy_batch])
    return {"width": width, "seed": seed, "val_accuracy": accuracy(model, *data.val),
            "test_accuracy": accuracy(model, Xt, yt), "final_train_loss": log.loss[-1],
            "train_s": round(t1 - t0, 3), "entropy_s": round(time.perf_counter() - t1, 3),
            "log_2H": math.log(2 * width), **ent}


def run(config: FFOOMConfig | None = None, **overrides) -> dict:
    cfg = with_overrides(config or FFOOMConfig(), overrides)
    out = output_dir(cfg.out)
    t_start = time.perf_counter()
    with torch_threads(cfg.threads):
        runs = [run_one(w, s, cfg) for w in cfg.widths for s in cfg.seeds]
        table = {}
        for w in cfg.widths:
            rows = [r for r in runs if r["width"] == w]
            entry = {"log_2H": math.log(2 * w)}
            for key in ("pooled", "per_row_mean", "row_mixing"):
                x0 = [r[key][0] for r in rows]
                rest = [sum(r[key][1:]) / 3 for r in rows]
                entry[key] = {"x0": x0, "x0_mean": sum(x0) / len(x0), "x1_3_mean": sum(rest) / len(rest)}
            entry["val_accuracy"] = [r["val_accuracy"] for r in rows]
            if w in PAPER_X0:
                entry["paper_x0"] = list(PAPER_X0[w])
            table[str(w)] = entry
        summary = {
            "experiment": "FFOOM path entropy vs MLP width (Du et al. 2023, appendix B.1)",
            "config": asdict(cfg),
            "runs": runs,
            "by_width": table,
            "paper_x0": {str(k): list(v) for k, v in PAPER_X0.items()},
            "monotone_in_width": {
                key: all(table[str(a)][key]["x0_mean"] < table[str(b)][key]["x0_mean"]
                         for a, b in zip(cfg.widths[:-1], cfg.widths[1:]))
                for key in ("pooled", "per_row_mean")},
            "table": _table(table, cfg.widths),
            "fit_vs_log_2H": _fits(table, cfg.widths),
        }
        if cfg.plots:
            summary["plots"] = _plots(summary, cfg, out)
        summary["timing_s"] = round(time.perf_counter() - t_start, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _line_fit(xs, ys) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return {"slope": slope, "intercept": my - slope * mx}


def _fits(table: dict, widths) -> dict:
    """Least-squares ``entropy ~ slope * log(2H) + intercept`` of the seed means (x0), ours and the paper's."""
    xs = [math.log(2 * w) for w in widths]
    fits = {key: _line_fit(xs, [table[str(w)][key]["x0_mean"] for w in widths])
            for key in ("pooled", "per_row_mean")}
    paper_w = [w for w in widths if w in PAPER_X0]
    if len(paper_w) >= 2:
        fits["paper"] = _line_fit([math.log(2 * w) for w in paper_w],
                                  [sum(PAPER_X0[w]) / len(PAPER_X0[w]) for w in paper_w])
    return fits


def _table(table: dict, widths) -> str:
    lines = ["| H | log(2H) | pooled x0 (per seed) | per-row x0 (per seed) | row mixing x0 | paper x0 | "
             "pooled x1..x3 | val acc |", "|---|---|---|---|---|---|---|---|"]
    for w in widths:
        e = table[str(w)]
        fmt = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
        lines.append(f"| {w} | {e['log_2H']:.2f} | {fmt(e['pooled']['x0'])} | {fmt(e['per_row_mean']['x0'])} | "
                     f"{fmt(e['row_mixing']['x0'])} | {fmt(e.get('paper_x0', []))} | "
                     f"{e['pooled']['x1_3_mean']:.2f} | {fmt(e['val_accuracy'])} |")
    return "\n".join(lines)


def _plots(summary: dict, cfg: FFOOMConfig, out: Path) -> list[str]:
    widths = list(cfg.widths)
    tab = summary["by_width"]
    ref = {"paper (x0)": {w: PAPER_X0[w] for w in widths if w in PAPER_X0}}
    fig = viz.new_figure((12, 4.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    viz.entropy_vs_width(widths, {"pooled over batch, x0": [tab[str(w)]["pooled"]["x0"] for w in widths],
                                  "pooled, x1..x3 (mean)": [[tab[str(w)]["pooled"]["x1_3_mean"]] for w in widths]},
                         reference=ref, guide=("log(2H) + log(B)", lambda h: math.log(2 * h) +
                                               math.log(cfg.entropy_batch)),
                         ax=ax1, title=f"pooled over the batch rows (B={cfg.entropy_batch})")
    viz.entropy_vs_width(widths, {"per-row mean, x0": [tab[str(w)]["per_row_mean"]["x0"] for w in widths]},
                         reference=ref, guide=("log(2H)", lambda h: math.log(2 * h)), ax=ax2,
                         title="per row (mean over the batch)")
    return [str(viz.save(fig, out / "entropy_vs_width.png"))]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/ffoom")
    p.add_argument("--quick", action="store_true", help="reduced run (N=4000, widths 4/16/64, 2 seeds)")
    p.add_argument("--threads", type=int)
    p.add_argument("--n-examples", type=int)
    args = p.parse_args(argv)
    cfg = FFOOMConfig.quick() if args.quick else FFOOMConfig()
    cfg.out = args.out
    if args.threads is not None:
        cfg.threads = args.threads
    if args.n_examples is not None:
        cfg.n_examples = args.n_examples
    summary = run(cfg)
    print(summary["table"])
    print(f"\nmonotone in width (mean over seeds): {summary['monotone_in_width']}")
    for key, fit in summary["fit_vs_log_2H"].items():
        print(f"fit {key}: entropy = {fit['slope']:.3f} * log(2H) + {fit['intercept']:.3f}")
    print(f"total {summary['timing_s']} s; written to {cfg.out}")
    return summary


if __name__ == "__main__":
    main()

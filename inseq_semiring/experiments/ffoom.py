"""Appendix B.1 of Du et al. (2023): gradient-path entropy of an MLP on FFOOM grows with its width.

FFOOM ("four features, only one matters"): ``x ~ U[0, 1)^4``, ``y = 1[x0 > 0.5]``. Model ``4 -> H -> 2`` with a
leaky ReLU (slope 0.01); Adam (lr 1e-3), batch 32, one epoch on the training split of ``N = 20,000`` examples
(70/10/20); ``H`` in {4, 8, 16, 32, 64, 128}, 3 seeds (the seed draws both the data and the initialisation).
Root: the batch-mean cross-entropy (``F.cross_entropy``), inputs: the ``[B, 4]`` batch, one ``"entropy"`` sweep.

The graph matters here. Under ``decomposition="paper"`` (the paper's library) the cross-entropy is a log-softmax
built from a log-sum-exp with its max stabiliser: the stabiliser's paths cancel in the gradient but count in ``Z``
and ``U``, so a row has more than ``2H`` paths. Under ``"aten"`` (``_log_softmax`` + ``nll_loss_forward``) a row has
exactly ``2H`` paths (``H`` hidden units x 2 logits), so its entropy is at most ``log(2H)``.

Readouts of the relevant feature ``x0`` (and the mean of ``x1..x3``), each under every decomposition of the config:

* ``last_step`` (the paper's readout): at the last training step, on that step's training batch, before the
  parameter update, the per-element entropy ``H_b`` of ``x[b, 0]``, averaged over the batch rows (the paper logs
  ``mean_b H(x[b, j])`` at every step; its table is the last value). The last batch has
  ``n_train mod 32`` rows when that is not 0 (16 for the default 14,000 training rows), as in an unshuffled loader;
* ``per_row_mean``: the same per-row mean on a fixed batch of ``B = 32`` held-out (test-split) rows after training;
* ``pooled``: the entropy of the distribution over *all* paths that start in column ``j`` of that held-out batch
  (``pooled_entropy(raw, dims=0)``: ``Z`` and ``U`` summed over rows). Rows share no paths, so it decomposes as
  ``sum_b p_b H_b + H(p)``, ``p_b = Z_b / sum Z``, where ``H(p)`` (``row_mixing``, at most ``log B``) is the
  entropy of how the path mass spreads over the rows.

The paper's table (x0): H=4: 2.55/2.17/2.20; 8: 2.79/2.67/3.02; 16: 3.59/3.82/3.83; 32: 4.56/4.44/4.41;
64: 5.10/5.12/5.09; 128: 5.76/5.78/5.83.

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

from ._common import output_dir, output_folder, positive_int, torch_threads, with_overrides
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
    decompositions: tuple = ("paper", "aten")
    threads: int = 1
    plots: bool = True

    @classmethod
    def quick(cls, **kw) -> "FFOOMConfig":
        base = dict(widths=(4, 16, 64), seeds=(0, 1))
        base.update(kw)
        return cls(**base)


READOUTS = ("last_step", "per_row_mean", "pooled", "row_mixing")


def batch_loss(model: torch.nn.Module, y: torch.Tensor):
    """``x -> F.cross_entropy(model(x), y)`` (mean over the batch)."""
    def fn(x):
        return F.cross_entropy(model(x), y)
    return fn


def feature_entropies(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, decomposition: str = "aten") -> dict:
    """One entropy sweep of the batch-mean loss of ``(X, y)``; per feature: pooled, per-row mean, row mixing."""
    res = semiring_run(batch_loss(model, y), X, "entropy", model=model, decomposition=decomposition)
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
    X, y = data.train
    n_steps = math.ceil(len(y) / cfg.batch_size) * cfg.epochs
    last = {}

    def at_last_step(step: int, idx: torch.Tensor) -> None:
        if step + 1 == n_steps:  # the paper's readout, before the update
            with torch.no_grad():
                last.update({d: feature_entropies(model, X[idx], y[idx], d)["per_row_mean"]
                             for d in cfg.decompositions}, rows=len(idx))

    t0 = time.perf_counter()
    log = train_classifier(model, data.train, data.val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                           seed=seed, before_update=at_last_step)
    t1 = time.perf_counter()
    Xt, yt = data.test
    held_out = {d: feature_entropies(model, Xt[:cfg.entropy_batch], yt[:cfg.entropy_batch], d)
                for d in cfg.decompositions}
    return {"width": width, "seed": seed, "val_accuracy": accuracy(model, *data.val),
            "test_accuracy": accuracy(model, Xt, yt), "final_train_loss": log.loss[-1],
            "train_s": round(t1 - t0, 3), "entropy_s": round(time.perf_counter() - t1, 3),
            "log_2H": math.log(2 * width), "last_step_rows": last["rows"],
            **{d: {"last_step": last[d], **held_out[d]} for d in cfg.decompositions}}


def run(config: FFOOMConfig | None = None, **overrides) -> dict:
    cfg = with_overrides(config or FFOOMConfig(), overrides)
    out = output_dir(cfg.out)
    t_start = time.perf_counter()
    with torch_threads(cfg.threads):
        runs = [run_one(w, s, cfg) for w in cfg.widths for s in cfg.seeds]
        table = {}
        for w in cfg.widths:
            rows = [r for r in runs if r["width"] == w]
            entry = {"log_2H": math.log(2 * w), "val_accuracy": [r["val_accuracy"] for r in rows],
                     "last_step_rows": rows[0]["last_step_rows"]}
            for d in cfg.decompositions:
                entry[d] = {}
                for key in READOUTS:
                    x0 = [r[d][key][0] for r in rows]
                    rest = [sum(r[d][key][1:]) / 3 for r in rows]
                    entry[d][key] = {"x0": x0, "x0_mean": sum(x0) / len(x0), "x1_3_mean": sum(rest) / len(rest)}
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
                f"{d}/{key}": all(table[str(a)][d][key]["x0_mean"] < table[str(b)][d][key]["x0_mean"]
                                  for a, b in zip(cfg.widths[:-1], cfg.widths[1:]))
                for d in cfg.decompositions for key in ("last_step", "per_row_mean", "pooled")},
            "table": _table(table, cfg),
            "fit_vs_log_2H": _fits(table, cfg),
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


def _fits(table: dict, cfg: FFOOMConfig) -> dict:
    """Least-squares ``entropy ~ slope * log(2H) + intercept`` of the seed means (x0), ours and the paper's."""
    widths = cfg.widths
    xs = [math.log(2 * w) for w in widths]
    fits = {f"{d}/{key}": _line_fit(xs, [table[str(w)][d][key]["x0_mean"] for w in widths])
            for d in cfg.decompositions for key in ("last_step", "per_row_mean", "pooled")}
    paper_w = [w for w in widths if w in PAPER_X0]
    if len(paper_w) >= 2:
        fits["paper"] = _line_fit([math.log(2 * w) for w in paper_w],
                                  [sum(PAPER_X0[w]) / len(PAPER_X0[w]) for w in paper_w])
    return fits


def _table(table: dict, cfg: FFOOMConfig) -> str:
    fmt = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
    cols = [(d, key) for key in ("last_step", "per_row_mean", "pooled") for d in cfg.decompositions]
    names = {"last_step": "last step, per row", "per_row_mean": "held-out, per row", "pooled": "held-out, pooled"}
    lines = ["| H | log(2H) | " + " | ".join(f"{names[k]} ({d})" for d, k in cols) + " | paper | val acc |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for w in cfg.widths:
        e = table[str(w)]
        cells = " | ".join(fmt(e[d][k]["x0"]) for d, k in cols)
        lines.append(f"| {w} | {e['log_2H']:.2f} | {cells} | {fmt(e.get('paper_x0', []))} | "
                     f"{fmt(e['val_accuracy'])} |")
    return "\n".join(lines)


def _plots(summary: dict, cfg: FFOOMConfig, out: Path) -> list[str]:
    widths = list(cfg.widths)
    tab = summary["by_width"]
    ref = {"paper (x0)": {w: PAPER_X0[w] for w in widths if w in PAPER_X0}}
    fig = viz.new_figure((12, 4.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    per_row = {f"x0, {d} graph": [tab[str(w)][d]["last_step"]["x0"] for w in widths] for d in cfg.decompositions}
    viz.entropy_vs_width(widths, per_row, reference=ref, guide=("log(2H)", lambda h: math.log(2 * h)), ax=ax1,
                         title="the paper's readout: last step, mean over the batch rows")
    pooled = {f"x0, {d} graph": [tab[str(w)][d]["pooled"]["x0"] for w in widths] for d in cfg.decompositions}
    viz.entropy_vs_width(widths, pooled,
                         guide=("log(2H) + log(B)", lambda h: math.log(2 * h) + math.log(cfg.entropy_batch)),
                         ax=ax2, title=f"pooled over a held-out batch (B={cfg.entropy_batch}; not the paper's readout)")
    return [str(viz.save(fig, out / "entropy_vs_width.png"))]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/ffoom", type=output_folder)
    p.add_argument("--quick", action="store_true", help="reduced run (widths 4/16/64, 2 seeds)")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--n-examples", type=positive_int)
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

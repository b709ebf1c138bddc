"""§5.1 of Du et al. (2023): which attention component carries the best gradient path, FirstTokenRepeatedOnce.

Setup (paper): ``BertForSequenceClassification`` with 1 layer, hidden 16, 2 heads, intermediate 32, GELU,
vocabulary 20, 512 positions, 2 labels, dropout 0, eager attention; Adam (lr 1e-3), batch 32, trained until the
validation accuracy reaches 1.0 (at most 150 epochs: learning is a phase transition whose epoch depends on the seed)
on the paper's own 10,000 examples (:func:`~inseq_semiring.experiments.synthetic.first_token_repeated_once`, 70/10/20
split regenerated bit for bit). Analysis: the 1,000 validation sentences, eval mode, batch 1, root = the logit of
the *correct* class, inputs = the word embeddings (position and token-type embeddings are added inside the model).
At the layer-0 attention input (the tensor consumed by the query, key and value linears and by the residual add of
``attention.output``) the "oplus" readout of :mod:`inseq_semiring.components` credits each token's best value to
Query, Key, Value or Skip.

Analyses (``decomposition/granularity/sign``): ``paper/tensor/positive`` is the paper's quantity on the paper's
operator graph (softmax as ``exp(x - lse(x))``, layer norm and cross-entropy split as in its library, see
:mod:`inseq_semiring.decompositions.paper`); ``aten/tensor/positive`` is the same readout on PyTorch's graph (one
``_softmax`` operator, inside which the key branch's VJP cancels before any max); ``aten/scalar/abs`` is the exact
per-path readout (scalar granularity, where the decomposition does not matter for the max).

Token types: ``FirstToken`` (position 0), ``RepeatToken`` (a later position holding the first token: exactly one
in positives, none in negatives), ``OtherToken`` (the rest). Reported per analysis and seed: mean credited value per
token type and component (a token contributes 0 to the components that lost), the fraction of tokens each
component wins, and the largest ``|credit|`` (the structural zeros: in the last layer only the pooled position's
query and skip reach the root, so a later token's Query and Skip credit is exactly 0).

``run(config) -> dict`` trains one model per seed, writes ``summary.json`` and PNGs into ``config.out``. CLI::

    python -m inseq_semiring.experiments.ftro --out outputs/ftro [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._common import output_dir, output_folder, positive_int, torch_threads, with_overrides
from .. import viz
from ..api import run as semiring_run
from ..components import BERT_SPLIT, component_readout
from .synthetic import first_token_repeated_once
from .train import accuracy, tiny_bert, train_classifier

TOKEN_TYPES = ("FirstToken", "RepeatToken", "OtherToken")
COMPONENTS = ("Query", "Key", "Value", "Skip")

#: The paper's means (tensor granularity, signed M+, "oplus"); "≈0" entries are given as 0.0.
PAPER_TENSOR_POSITIVE = {
    "FirstToken": {"Query": 0.174, "Key": 0.095, "Value": 0.001, "Skip": 0.095},
    "RepeatToken": {"Query": 0.0, "Key": 0.27, "Value": 0.0, "Skip": 0.0},
    "OtherToken": {"Query": 0.0, "Key": 0.009, "Value": 0.001, "Skip": 0.0},
    "All": {"Query": 0.0174, "Key": 0.0301, "Value": 0.0010, "Skip": 0.0094},
}


#: The analyses of a full run: (decomposition, granularity, sign).
ANALYSES = (("paper", "tensor", "positive"), ("aten", "tensor", "positive"), ("aten", "scalar", "abs"))


def analysis_key(decomposition: str, granularity: str, sign: str) -> str:
    return f"{decomposition}/{granularity}/{sign}"


@dataclass
class FTROConfig:
    out: str = "outputs/ftro"
    n_examples: int = 10_000
    vocab_size: int = 20
    seq_len: int = 10
    sampling: str = "paper"  # the paper's data; "balanced": this package's own generator
    hidden_size: int = 16
    num_heads: int = 2
    intermediate_size: int = 32
    num_layers: int = 1
    initializer_range: float = 0.02
    hidden_dropout: float = 0.0
    epochs: int = 150  # at most; training stops at target_val_accuracy
    batch_size: int = 32
    lr: float = 1e-3
    data_seed: int = 0
    seeds: tuple = (0, 1, 2)  # model seeds (initialisation and batch order)
    time_budget_s: float | None = None  # stop training after the epoch that exceeds it
    target_val_accuracy: float | None = 1.0
    n_analysis: int = 1000
    analyses: tuple = ANALYSES
    threads: int = 1  # 2 OpenMP threads were many times slower than 1 on a shared 2-core machine
    plots: bool = True

    @classmethod
    def quick(cls, **kw) -> "FTROConfig":
        """A reduced run: the paper's data and hyper-parameters, one seed (0, which reaches validation accuracy 1.0
        in 12 epochs), stop after 150 s of training at the latest, 100 analysed sentences."""
        base = dict(seeds=(0,), n_analysis=100, time_budget_s=150.0)
        base.update(kw)
        return cls(**base)


def token_types(ids: torch.Tensor) -> torch.Tensor:
    """0 = FirstToken, 1 = RepeatToken, 2 = OtherToken, per position of each row of ``ids`` ``[N, L]``."""
    t = torch.full(ids.shape, 2, dtype=torch.long)
    t[:, 0] = 0
    rep = ids[:, 1:] == ids[:, :1]
    t[:, 1:][rep] = 1
    return t


def analyze(model, X: torch.Tensor, y: torch.Tensor, analyses=ANALYSES, split=BERT_SPLIT, layer: int = 0) -> dict:
    """Per-token credits of every sentence (batch 1, root = logit of class ``y[i]``) for each
    ``(decomposition, granularity, sign)``.

    Returns ``{"paper/tensor/positive": {"credit": [N, L, 4+1] float64, "winner": [N, L] long}, ...}`` plus
    ``"types"`` ``[N, L]`` and ``"seconds"`` per analysis (recording counted once per decomposition)."""
    model.eval()
    emb_layer = model.get_input_embeddings()
    keys = [analysis_key(*a) for a in analyses]
    credit = {k: [] for k in keys}
    winner = {k: [] for k in keys}
    seconds = {k: 0.0 for k in keys}
    labels = None
    with torch.no_grad():
        for i in range(len(y)):
            emb = emb_layer(X[i:i + 1]).detach()
            target = int(y[i])

            def fn(e, _t=target):
                return model(inputs_embeds=e).logits[0, _t]

            tapes = {}
            for (d, g, s), k in zip(analyses, keys):
                t0 = time.perf_counter()
                res = semiring_run(fn, emb, "maxpath", sign=s, granularity=g, backpointers=True, model=model,
                                   tape=tapes.get(d), decomposition=None if d in tapes else d)
                tapes[d] = res.tape
                ro = component_readout(res, split, layer)
                seconds[k] += time.perf_counter() - t0
                labels = ro.labels
                credit[k].append(ro.credit)
                winner[k].append(ro.winner)
    out = {k: {"credit": torch.stack(credit[k]), "winner": torch.stack(winner[k])} for k in keys}
    out["types"] = token_types(X)
    out["labels"] = labels
    out["seconds"] = seconds
    return out


def summarize(credit: torch.Tensor, winner: torch.Tensor, types: torch.Tensor, labels, y: torch.Tensor | None = None,
              components=COMPONENTS) -> dict:
    """Means / win fractions / max |credit| per token type (and over all tokens) per component."""
    cols = [labels.index(c) for c in components]
    extra = [i for i, lab in enumerate(labels) if lab not in components]

    def block(mask: torch.Tensor) -> dict:
        n = int(mask.sum())
        c = credit[mask]  # [n, n_labels]
        w = winner[mask]
        res = {"count": n}
        if n == 0:
            return res
        res["mean"] = {labels[j]: float(c[:, j].mean()) for j in cols + extra}
        res["win_fraction"] = {labels[j]: float((w == j).double().mean()) for j in cols + extra}
        res["win_fraction"]["none"] = float((w < 0).double().mean())
        res["max_abs"] = {labels[j]: float(c[:, j].abs().max()) for j in cols + extra}
        res["mean_total"] = float(c.sum(-1).mean())
        return res

    summary = {name: block(types == t) for t, name in enumerate(TOKEN_TYPES)}
    summary["All"] = block(torch.ones_like(types, dtype=torch.bool))
    if y is not None:
        by_label = {}
        for lab in (1, 0):
            rows = (y == lab)[:, None].expand_as(types)
            by_label["positive" if lab else "negative"] = {
                name: block((types == t) & rows).get("mean", {}) for t, name in enumerate(TOKEN_TYPES)}
        summary["by_gold_label"] = by_label
    return summary


def _num(v: float, fmt: str) -> str:
    """``fmt``, except that exact zeros read "0" and small means keep two significant digits (``4.1e-05``)."""
    if v == 0:
        return "0"
    return f"{v:.1e}" if fmt == "mean" and abs(v) < 0.001 else format(v, ".3f" if fmt == "mean" else fmt)


def _cell(values: list[float], fmt: str) -> str:
    return "/".join(_num(v, fmt) for v in values)


def _table(summary: dict, paper: dict | None = None, components=COMPONENTS, field: str = "mean") -> str:
    """Markdown: token types x components; one value per seed (``a/b/c``), the paper's mean in parentheses."""
    head = "| token type | n | " + " | ".join(components) + " |"
    lines = [head, "|" + "---|" * (len(components) + 2)]
    fmt = "mean" if field == "mean" else ".2f"
    for name in TOKEN_TYPES + ("All",):
        blk = summary.get(name, {})
        if field not in blk:
            continue
        cells = []
        for c in components:
            ours = _cell(blk[field + "_per_seed"][c], fmt)
            if paper is not None and name in paper:
                ours += f" ({paper[name][c]:.3g})"
            cells.append(ours)
        lines.append(f"| {name} | {blk['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine_seeds(per_seed: list[dict]) -> dict:
    """Per token type: each statistic as the mean over seeds, the per-seed values (``*_per_seed``), and the
    largest ``|credit|`` over all seeds."""
    out = {}
    for name in TOKEN_TYPES + ("All",):
        blocks = [s[name] for s in per_seed if "mean" in s.get(name, {})]
        if not blocks:
            out[name] = {"count": 0}
            continue
        blk = {"count": blocks[0]["count"]}
        for field in ("mean", "win_fraction"):
            keys = list(blocks[0][field])
            blk[field] = {k: sum(b[field][k] for b in blocks) / len(blocks) for k in keys}
            blk[field + "_per_seed"] = {k: [b[field][k] for b in blocks] for k in keys}
        blk["max_abs"] = {k: max(b["max_abs"][k] for b in blocks) for k in blocks[0]["max_abs"]}
        out[name] = blk
    return out


def train_and_analyze(cfg: FTROConfig, data, seed: int) -> tuple[dict, torch.nn.Module]:
    """One model: train until ``target_val_accuracy``, then analyse the first ``n_analysis`` validation rows."""
    t0 = time.perf_counter()
    model = tiny_bert(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                      num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                      initializer_range=cfg.initializer_range, hidden_dropout=cfg.hidden_dropout, seed=seed)
    log = train_classifier(model, data.train, data.val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                           seed=seed, time_budget_s=cfg.time_budget_s, target_val_accuracy=cfg.target_val_accuracy)
    t_trained = time.perf_counter()
    Xv, yv = data.val
    Xa, ya = Xv[:cfg.n_analysis], yv[:cfg.n_analysis]
    res = analyze(model, Xa, ya, cfg.analyses)
    with torch.no_grad():
        correct = (model(input_ids=Xa).logits.argmax(-1) == ya)
    analyses = {}
    for a in cfg.analyses:
        k = analysis_key(*a)
        summ = summarize(res[k]["credit"], res[k]["winner"], res["types"], list(res["labels"]), ya)
        summ["correct_only"] = {name: blk.get("mean", {}) for name, blk in summarize(
            res[k]["credit"][correct], res[k]["winner"][correct], res["types"][correct],
            list(res["labels"])).items() if name in TOKEN_TYPES + ("All",)}
        summ["seconds"] = round(res["seconds"][k], 2)
        analyses[k] = summ
    record = {"seed": seed, "training": log.as_dict(), "val_accuracy": accuracy(model, Xv, yv),
              "test_accuracy": accuracy(model, *data.test), "analysed_accuracy": float(correct.double().mean()),
              "timing_s": {"train": round(t_trained - t0, 2), "analysis": round(time.perf_counter() - t_trained, 2)},
              "analyses": analyses}
    return record, model


def run(config: FTROConfig | None = None, **overrides) -> dict:
    """Train and analyse one model per seed; write ``summary.json``, the models and plots to ``config.out``."""
    cfg = with_overrides(config or FTROConfig(), overrides)
    out = output_dir(cfg.out)
    t_start = time.perf_counter()
    with torch_threads(cfg.threads):
        data = first_token_repeated_once(cfg.n_examples, cfg.vocab_size, cfg.seq_len, seed=cfg.data_seed,
                                         sampling=cfg.sampling)
        models = []
        for seed in cfg.seeds:
            record, model = train_and_analyze(cfg, data, seed)
            models.append(record)
            torch.save(model.state_dict(), out / f"model_seed{seed}.pt")
        keys = [analysis_key(*a) for a in cfg.analyses]
        analyses = {k: combine_seeds([m["analyses"][k] for m in models]) for k in keys}
        paper = {k: PAPER_TENSOR_POSITIVE for k in keys if k.endswith("tensor/positive")}
        Xa, ya = data.val[0][:cfg.n_analysis], data.val[1][:cfg.n_analysis]
        summary = {
            "experiment": "FirstTokenRepeatedOnce component analysis (Du et al. 2023, §5.1)",
            "config": {**asdict(cfg), "analyses": [list(a) for a in cfg.analyses], "seeds": list(cfg.seeds)},
            "data": {"name": data.name, "sampling": cfg.sampling, "sizes": {k: len(v) for k, v in data.splits.items()},
                     "positives_in_analysis": int(ya.sum()), "analysed": len(ya), "val_first_row": Xa[0].tolist()},
            "models": models,
            "val_accuracy": min(m["val_accuracy"] for m in models),
            "epochs": [m["training"]["epochs"] for m in models],
            "analyses": analyses,
            "paper": paper,
            "tables": {k: _table(v, paper.get(k)) for k, v in analyses.items()},
            "win_tables": {k: _table(v, None, field="win_fraction") for k, v in analyses.items()},
            "timing_s": {"total": None},
        }
        if cfg.plots:
            summary["plots"] = _plots(summary, out)
        summary["timing_s"]["total"] = round(time.perf_counter() - t_start, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _plots(summary: dict, out: Path) -> list[str]:
    """Per statistic (mean credit, share of tokens won): one panel per analysis, plus the paper's means."""
    written = []
    cats = TOKEN_TYPES + ("All",)
    analyses = summary["analyses"]
    for field, ylabel, normalize in (("mean", "mean credited value", False),
                                     ("win_fraction", "share of tokens won", True)):
        panels = [(k, {c: analyses[k][c][field] for c in cats if field in analyses[k][c]}) for k in analyses]
        if field == "mean" and summary["paper"]:
            panels.append(("paper (Du et al. 2023)", next(iter(summary["paper"].values()))))
        fig = viz.new_figure((4.2 * len(panels), 4))
        for i, (title, table) in enumerate(panels):
            viz.component_bars(table, COMPONENTS, ax=fig.add_subplot(1, len(panels), i + 1), title=title,
                               ylabel=ylabel if i == 0 else "", normalize=normalize,
                               legend="outside" if i == len(panels) - 1 else None)
        fig.suptitle(f"FirstTokenRepeatedOnce, layer-0 attention input: {ylabel} "
                     f"(mean over seeds {', '.join(str(m['seed']) for m in summary['models'])})")
        written.append(str(viz.save(fig, out / f"components_{field}.png")))
    fig = viz.new_figure((6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    for m in summary["models"]:
        ax.plot(range(1, len(m["training"]["val_accuracy"]) + 1), m["training"]["val_accuracy"],
                label=f"seed {m['seed']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.legend(frameon=False)
    written.append(str(viz.save(fig, out / "training.png")))
    return written


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/ftro", type=output_folder)
    p.add_argument("--quick", action="store_true", help="reduced run (one seed, 100 analysed sentences)")
    p.add_argument("--seeds", type=int, nargs="+", help="model seeds (default 0 1 2)")
    p.add_argument("--epochs", type=positive_int, help="at most this many epochs (default 150)")
    p.add_argument("--n-examples", type=positive_int)
    p.add_argument("--n-analysis", type=positive_int)
    p.add_argument("--initializer-range", type=float)
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--sampling", choices=("paper", "balanced"), help="data generator (default: the paper's data)")
    p.add_argument("--time-budget", type=float, help="seconds of training after which to stop (per epoch check)")
    args = p.parse_args(argv)
    cfg = FTROConfig.quick() if args.quick else FTROConfig()
    cfg.out = args.out
    for name, attr in [("epochs", "epochs"), ("n_examples", "n_examples"), ("n_analysis", "n_analysis"),
                       ("initializer_range", "initializer_range"), ("threads", "threads"), ("sampling", "sampling"),
                       ("time_budget", "time_budget_s")]:
        if getattr(args, name) is not None:
            setattr(cfg, attr, getattr(args, name))
    if args.seeds:
        cfg.seeds = tuple(args.seeds)
    summary = run(cfg)
    for m in summary["models"]:
        print(f"seed {m['seed']}: trained {m['training']['epochs']} epochs in {m['timing_s']['train']} s; "
              f"val accuracy {m['val_accuracy']:.4f}, test accuracy {m['test_accuracy']:.4f}")
    for k, table in summary["tables"].items():
        print(f"\n{k}: mean credited value per seed (paper in parentheses where available)\n{table}")
        print(f"\n{k}: share of tokens won per seed\n{summary['win_tables'][k]}")
    print(f"\ntotal {summary['timing_s']['total']} s; written to {cfg.out}")
    return summary


if __name__ == "__main__":
    main()

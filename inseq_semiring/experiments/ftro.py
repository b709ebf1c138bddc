"""§5.1 of Du et al. (2023): which attention component carries the best gradient path, FirstTokenRepeatedOnce.

Setup (paper): ``BertForSequenceClassification`` with 1 layer, hidden 16, 2 heads, intermediate 32, GELU,
vocabulary 20, 512 positions, 2 labels, attention dropout 0, eager attention; Adam (lr 1e-3), batch 32, 42 epochs
on 10,000 examples (70/10/20 split). Analysis: for 1,000 validation sentences, eval mode, batch 1, root = the
logit of the *correct* class, inputs = the word embeddings (``inputs_embeds``; position and token-type
embeddings are added inside the model). At the layer-0 attention input (the tensor consumed by the query, key
and value linears and by the residual add of ``attention.output``) the "oplus" readout of
:mod:`inseq_semiring.components` credits each token's best value to Query, Key, Value or Skip.

Token types: ``FirstToken`` (position 0), ``RepeatToken`` (a later position holding the first token: exactly one
in positives, none in negatives), ``OtherToken`` (the rest). Reported per analysis (granularity/sign):
mean credited value per token type and component (a token contributes 0 to the components that lost), the
same over all tokens, the fraction of tokens each component wins, and the largest ``|credit|`` (to show the
structural zeros: in the last layer only the pooled position's query and skip reach the root, so an
``OtherToken``'s Query and Skip credit is exactly 0).

``run(config) -> dict`` writes ``summary.json`` and PNGs into ``config.out``. CLI::

    python -m inseq_semiring.experiments.ftro --out outputs/ftro [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._common import output_dir, torch_threads, with_overrides
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


@dataclass
class FTROConfig:
    out: str = "outputs/ftro"
    n_examples: int = 10_000
    vocab_size: int = 20
    seq_len: int = 10
    hidden_size: int = 16
    num_heads: int = 2
    intermediate_size: int = 32
    num_layers: int = 1
    initializer_range: float = 0.02
    hidden_dropout: float = 0.1
    epochs: int = 42
    batch_size: int = 32
    lr: float = 1e-3
    data_seed: int = 0
    model_seed: int = 0
    time_budget_s: float | None = None  # stop training after the epoch that exceeds it
    target_val_accuracy: float | None = None  # stop training once reached (None: train all epochs)
    n_analysis: int = 1000
    analyses: tuple = (("tensor", "positive"), ("scalar", "abs"))
    threads: int = 1  # 2 OpenMP threads were many times slower than 1 on a shared 2-core machine
    plots: bool = True

    @classmethod
    def quick(cls, **kw) -> "FTROConfig":
        """A reduced run: 4,000 examples, lr 3e-3 and ``initializer_range`` 0.1 (both speed up learning; about
        1,500-1,700 Adam steps reach 0.99 validation accuracy), stop at 0.99 or after 75 s; 100 sentences."""
        base = dict(n_examples=4000, epochs=40, initializer_range=0.1, lr=3e-3, n_analysis=100,
                    time_budget_s=75.0, target_val_accuracy=0.99)
        base.update(kw)
        return cls(**base)


def token_types(ids: torch.Tensor) -> torch.Tensor:
    """0 = FirstToken, 1 = RepeatToken, 2 = OtherToken, per position of each row of ``ids`` ``[N, L]``."""
    t = torch.full(ids.shape, 2, dtype=torch.long)
    t[:, 0] = 0
    rep = ids[:, 1:] == ids[:, :1]
    t[:, 1:][rep] = 1
    return t


def analyze(model, X: torch.Tensor, y: torch.Tensor, analyses=(("tensor", "positive"),), split=BERT_SPLIT,
            layer: int = 0) -> dict:
    """Per-token credits of every sentence (batch 1, root = logit of class ``y[i]``) for each (granularity, sign).

    Returns ``{"tensor/positive": {"credit": [N, L, 4+1] float64, "winner": [N, L] long}, ...}`` plus
    ``"types"`` ``[N, L]`` and ``"seconds"`` per analysis (recording counted once, in the first)."""
    model.eval()
    emb_layer = model.get_input_embeddings()
    keys = [f"{g}/{s}" for g, s in analyses]
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

            tape = None
            for (g, s), k in zip(analyses, keys):
                t0 = time.perf_counter()
                res = semiring_run(fn, emb, "maxpath", sign=s, granularity=g, backpointers=True, model=model,
                                   tape=tape)
                tape = res.tape
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


def _table(summary: dict, paper: dict | None = None, components=COMPONENTS) -> str:
    head = "| token type | n | " + " | ".join(components) + " |"
    lines = [head, "|" + "---|" * (len(components) + 2)]
    for name in TOKEN_TYPES + ("All",):
        blk = summary.get(name, {})
        if "mean" not in blk:
            continue
        cells = []
        for c in components:
            ours = f"{blk['mean'][c]:.4f}"
            if paper is not None and name in paper:
                ours += f" ({paper[name][c]:.3g})"
            cells.append(ours)
        lines.append(f"| {name} | {blk['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(config: FTROConfig | None = None, **overrides) -> dict:
    """Train, analyse, write ``summary.json`` and plots to ``config.out``; return the summary."""
    cfg = with_overrides(config or FTROConfig(), overrides)
    out = output_dir(cfg.out)
    t_start = time.perf_counter()
    with torch_threads(cfg.threads):
        data = first_token_repeated_once(cfg.n_examples, cfg.vocab_size, cfg.seq_len, seed=cfg.data_seed)
        model = tiny_bert(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                          num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                          initializer_range=cfg.initializer_range, hidden_dropout=cfg.hidden_dropout,
                          seed=cfg.model_seed)
        log = train_classifier(model, data.train, data.val, epochs=cfg.epochs, batch_size=cfg.batch_size,
                               lr=cfg.lr, seed=cfg.model_seed, time_budget_s=cfg.time_budget_s,
                               target_val_accuracy=cfg.target_val_accuracy)
        t_trained = time.perf_counter()
        Xv, yv = data.val
        val_acc = accuracy(model, Xv, yv)
        test_acc = accuracy(model, *data.test)
        Xa, ya = Xv[:cfg.n_analysis], yv[:cfg.n_analysis]
        res = analyze(model, Xa, ya, cfg.analyses)
        t_analysed = time.perf_counter()
        with torch.no_grad():
            correct = (model(input_ids=Xa).logits.argmax(-1) == ya)
        analyses = {}
        for g, s in cfg.analyses:
            k = f"{g}/{s}"
            summ = summarize(res[k]["credit"], res[k]["winner"], res["types"], list(res["labels"]), ya)
            summ["correct_only"] = {name: blk.get("mean", {}) for name, blk in summarize(
                res[k]["credit"][correct], res[k]["winner"][correct], res["types"][correct],
                list(res["labels"])).items() if name in TOKEN_TYPES + ("All",)}
            summ["seconds"] = round(res["seconds"][k], 2)
            analyses[k] = summ
        summary = {
            "experiment": "FirstTokenRepeatedOnce component analysis (Du et al. 2023, §5.1)",
            "config": {**asdict(cfg), "analyses": [list(a) for a in cfg.analyses]},
            "data": {"name": data.name, "sizes": {k: len(v) for k, v in data.splits.items()},
                     "positives_in_analysis": int(ya.sum()), "analysed": len(ya)},
            "training": log.as_dict(),
            "val_accuracy": val_acc,
            "test_accuracy": test_acc,
            "analysed_accuracy": float(correct.double().mean()),
            "timing_s": {"train": round(t_trained - t_start, 2), "analysis": round(t_analysed - t_trained, 2),
                         "total": None},
            "analyses": analyses,
            "paper": {"tensor/positive": PAPER_TENSOR_POSITIVE},
            "tables": {k: _table(v, PAPER_TENSOR_POSITIVE if k == "tensor/positive" else None)
                       for k, v in analyses.items()},
        }
        if cfg.plots:
            summary["plots"] = _plots(summary, out)
        summary["timing_s"]["total"] = round(time.perf_counter() - t_start, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        torch.save(model.state_dict(), out / "model.pt")
        return summary


def _plots(summary: dict, out: Path) -> list[str]:
    written = []
    cats = TOKEN_TYPES + ("All",)
    for k, summ in summary["analyses"].items():
        table = {c: summ[c]["mean"] for c in cats if "mean" in summ[c]}
        fig = viz.new_figure((11 if k in summary["paper"] else 6, 4))
        if k in summary["paper"]:
            ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
            viz.component_bars(table, COMPONENTS, ax=ax1, title=f"ours ({k})", ylabel="mean credited value")
            viz.component_bars(summary["paper"][k], COMPONENTS, ax=ax2, title="paper (Du et al. 2023)",
                               ylabel="mean credited value")
        else:
            viz.component_bars(table, COMPONENTS, ax=fig.add_subplot(1, 1, 1), title=f"ours ({k})",
                               ylabel="mean credited value")
        path = viz.save(fig, out / f"components_{k.replace('/', '_')}.png")
        written.append(str(path))
        shares = {c: summ[c]["win_fraction"] for c in cats if "win_fraction" in summ[c]}
        fig = viz.component_bars(shares, COMPONENTS, normalize=True, title=f"winning component, share of tokens ({k})")
        written.append(str(viz.save(fig, out / f"win_shares_{k.replace('/', '_')}.png")))
    tr = summary["training"]
    if tr["val_accuracy"]:
        fig = viz.new_figure((6, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(range(1, len(tr["loss"]) + 1), tr["loss"], label="train loss")
        ax.plot(range(1, len(tr["val_accuracy"]) + 1), tr["val_accuracy"], label="val accuracy")
        ax.set_xlabel("epoch")
        ax.legend(frameon=False)
        written.append(str(viz.save(fig, out / "training.png")))
    return written


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/ftro")
    p.add_argument("--quick", action="store_true", help="reduced run (small data, 100 analysed sentences)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--n-examples", type=int)
    p.add_argument("--n-analysis", type=int)
    p.add_argument("--initializer-range", type=float)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, help="model seed")
    p.add_argument("--time-budget", type=float, help="seconds of training after which to stop (per epoch check)")
    args = p.parse_args(argv)
    cfg = FTROConfig.quick() if args.quick else FTROConfig()
    cfg.out = args.out
    for name, attr in [("epochs", "epochs"), ("n_examples", "n_examples"), ("n_analysis", "n_analysis"),
                       ("initializer_range", "initializer_range"), ("threads", "threads"),
                       ("seed", "model_seed"), ("time_budget", "time_budget_s")]:
        if getattr(args, name) is not None:
            setattr(cfg, attr, getattr(args, name))
    summary = run(cfg)
    print(f"trained {summary['training']['epochs']} epochs in {summary['timing_s']['train']} s; "
          f"val accuracy {summary['val_accuracy']:.4f}, test accuracy {summary['test_accuracy']:.4f}")
    for k, table in summary["tables"].items():
        print(f"\n{k} (mean credited value; paper in parentheses where available)\n{table}")
    print(f"\ntotal {summary['timing_s']['total']} s; written to {cfg.out}")
    return summary


if __name__ == "__main__":
    main()

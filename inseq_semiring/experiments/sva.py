"""Subject-verb agreement (SVA) on a real language model: the embedded SmolLM2-135M-Instruct (Du et al. 2023, §5.2).

The paper used a pretrained BERT on the Linzen et al. (2016) agreement set, with the verb masked. Here the model is
causal (a 30-layer Llama-architecture SmolLM2), so an item is a *prefix* and the verb is the next token:

* ``simple``: "The author" -> smiles / smile
* ``pp`` (across a prepositional phrase): "The author near the guards" -> smiles / smile
* ``rc`` (across a subject relative clause): "The author that likes the guards" -> smiles / smile

Conditions are crossed with subject number (sg/pl) and, where there is one, attractor number (sg/pl): 10 cells.
Items come from ``inseq_semiring/data/sva_templates.json`` (nouns, verb pairs, prepositions, relative-clause verbs;
every noun/verb form is one SmolLM2 token after a space: checked again at run time, failures are dropped and
reported), generated deterministically from a seed (``per_cell`` items per cell, 300 by default).

Root: ``logit(correct form) - logit(wrong form)`` of the next-token logits after the prefix (``logits_to_keep=1``:
the LM head runs on the last position only, which leaves the root and every path to it unchanged). Inputs: the
token embeddings of the prefix (no BOS; SmolLM2's tokenizer adds none). Reported:

1. accuracy (root > 0) per condition and per cell, on *all* generated items (forward passes only);
2. on ``n_analysis`` items (stratified round-robin over the 10 cells) the component readout of
   :mod:`inseq_semiring.components` (Llama split: the residual stream entering ``input_layernorm`` fans out to
   ``q_proj``/``k_proj``/``v_proj`` (via the norm) and to the residual add = Skip), "oplus" readout, at every layer,
   for three analyses: the paper's semantics (``granularity="tensor"``, ``sign="positive"``, i.e. M+) on the
   paper's operator graph (``decomposition="paper"``: softmax as ``exp(x - lse(x))``) and on PyTorch's
   (``"aten"``: one ``_softmax`` operator), and ``granularity="scalar"``, ``sign="abs"``. Per layer and token category (subject noun, attractor noun, other
   tokens) we give the *win shares* (fraction of tokens whose best path leaves through each component; each token
   counts once) and the *value shares* (credited value summed per component / total);
3. path entropy (``run(..., "entropy")``): per token, pooled over the hidden dimension
   (:func:`~inseq_semiring.semirings.scaled.pooled_entropy` over the last dim), and for the whole prefix (pooled
   over every input element), by condition.

Caveat of the causal set-up: the root sits at the *last* prefix position, which is the subject in ``simple`` and
the attractor in ``pp``/``rc``. A non-final token reaches the root only through attention from later positions, so
at the last layer its Query and Skip shares are structurally 0 (Key vs Value only); this is the situation of the
paper's subject (BERT reads the verb at the [MASK] position), so the headline comparison with the paper's
"subject's last-layer flow 76% keys / 24% values" uses the ``pp``+``rc`` subjects.

``run(config) -> dict`` writes ``summary.json``, ``items.json`` and PNGs into ``config.out``. CLI::

    python -m inseq_semiring.experiments.sva --out outputs/sva [--quick] [--n N]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from ._common import output_dir, output_folder, positive_int, torch_threads, with_overrides
from .. import viz

CONDITIONS = ("simple", "pp", "rc")
NUMBERS = ("sg", "pl")
COMPONENTS = ("Query", "Key", "Value", "Skip")
LABELS = COMPONENTS + ("Other",)
CATEGORIES = ("subject", "attractor", "other")
#: condition groups the shares and entropies are reported for
GROUPS = {"simple": ("simple",), "pp": ("pp",), "rc": ("rc",), "pp+rc": ("pp", "rc"), "all": CONDITIONS}
TEMPLATES_PATH = Path(__file__).resolve().parent.parent / "data" / "sva_templates.json"

#: Du et al. (2023), §5.2, pretrained BERT on the Linzen et al. set (tensor granularity, M+, "oplus").
PAPER = {
    "subject_last_layer_shares": {"Key": 0.76, "Value": 0.24},
    "early_layers": "the skip connection dominates the early layers",
}


# -- items -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SVAItem:
    """One agreement item. ``prefix`` is what the model reads; ``correct``/``wrong`` are the verb forms (without
    the leading space). ``subject_span`` / ``attractor_span``: character spans of the nouns in ``prefix``."""

    id: int
    condition: str
    subject_number: str
    attractor_number: str | None
    prefix: str
    subject: str
    attractor: str | None
    correct: str
    wrong: str
    subject_span: tuple[int, int]
    attractor_span: tuple[int, int] | None = None
    filler: str | None = None  # the preposition or the relative-clause verb

    @property
    def cell(self) -> str:
        return cell_name(self.condition, self.subject_number, self.attractor_number)

    @property
    def mismatch(self) -> bool | None:
        return None if self.attractor_number is None else self.attractor_number != self.subject_number


def cell_name(condition: str, subject_number: str, attractor_number: str | None) -> str:
    return f"{condition}/{subject_number}" + (f"/{attractor_number}" if attractor_number else "")


def cells() -> list[tuple[str, str, str | None]]:
    """The 10 cells: condition x subject number (x attractor number where the condition has an attractor)."""
    out: list[tuple[str, str, str | None]] = []
    for cond in CONDITIONS:
        for s in NUMBERS:
            if cond == "simple":
                out.append((cond, s, None))
            else:
                out.extend((cond, s, a) for a in NUMBERS)
    return out


def load_templates(path: str | Path | None = None) -> dict:
    return json.loads(Path(path or TEMPLATES_PATH).read_text())


def single_token(tokenizer, word: str) -> bool:
    return len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1


def check_vocabulary(templates: dict, tokenizer) -> tuple[dict, dict]:
    """Drop noun and verb pairs with a form that is not one token after a space. Returns ``(clean templates,
    {list name: dropped pairs})``."""
    clean, dropped = dict(templates), {}
    for key in ("nouns", "verbs", "rc_verbs"):
        keep, bad = [], []
        for pair in templates[key]:
            (keep if all(single_token(tokenizer, w) for w in pair) else bad).append(pair)
        clean[key] = keep
        if bad:
            dropped[key] = bad
    return clean, dropped


def generate_items(templates: dict | None = None, per_cell: int = 30, seed: int = 0) -> list[SVAItem]:
    """``per_cell`` distinct items in each of the 10 cells, deterministic given ``seed`` (own ``random.Random``).

    Subject and attractor are different nouns; the main verb differs from the relative-clause verb; the
    relative-clause verb agrees with the subject."""
    t = templates or load_templates()
    nouns, verbs, rc_verbs, preps = t["nouns"], t["verbs"], t["rc_verbs"], t["prepositions"]
    det = t.get("determiner", "The")
    rng = random.Random(seed)
    items: list[SVAItem] = []
    for cond, sn, an in cells():
        seen: set[tuple[str, str]] = set()
        tries = 0
        while sum(1 for it in items if it.cell == cell_name(cond, sn, an)) < per_cell:
            tries += 1
            if tries > 1000 * per_cell:
                raise ValueError(f"cannot draw {per_cell} distinct items for cell {cell_name(cond, sn, an)}")
            s_i = rng.randrange(len(nouns))
            subject = nouns[s_i][NUMBERS.index(sn)]
            v = verbs[rng.randrange(len(verbs))]
            correct, wrong = (v[0], v[1]) if sn == "sg" else (v[1], v[0])
            s0 = len(det) + 1
            subj_span = (s0, s0 + len(subject))
            prefix = f"{det} {subject}"
            attractor, att_span, filler = None, None, None
            if cond != "simple":
                a_i = rng.randrange(len(nouns) - 1)
                a_i += a_i >= s_i  # a different noun
                attractor = nouns[a_i][NUMBERS.index(an)]
                if cond == "pp":
                    filler = preps[rng.randrange(len(preps))]
                    prefix += f" {filler} the "
                else:
                    rv = rc_verbs[rng.randrange(len(rc_verbs))]
                    filler = rv[0] if sn == "sg" else rv[1]
                    if filler in (v[0], v[1]):
                        continue
                    prefix += f" that {filler} the "
                att_span = (len(prefix), len(prefix) + len(attractor))
                prefix += attractor
            key = (prefix, correct)
            if key in seen:
                continue
            seen.add(key)
            items.append(SVAItem(len(items), cond, sn, an, prefix, subject, attractor, correct, wrong, subj_span,
                                 att_span, filler))
    return items


def select_for_analysis(items: Sequence[SVAItem], n: int) -> list[SVAItem]:
    """``n`` items stratified over the cells: round-robin, taking each cell's items in generation order."""
    by_cell: dict[str, list[SVAItem]] = {}
    for it in items:
        by_cell.setdefault(it.cell, []).append(it)
    order = [cell_name(*c) for c in cells() if cell_name(*c) in by_cell]
    out, k = [], 0
    while len(out) < min(n, len(items)):
        for name in order:
            if k < len(by_cell[name]) and len(out) < n:
                out.append(by_cell[name][k])
        k += 1
    return out


def encode(item: SVAItem, tokenizer) -> dict:
    """Token ids of the prefix, the positions of the subject/attractor tokens and the verb token ids."""
    enc = tokenizer(item.prefix, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc.input_ids), list(enc.offset_mapping)

    def position(span):
        if span is None:
            return None
        hits = [i for i, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
        return hits[-1]  # the noun's last token (they are single tokens by construction)

    c = tokenizer(" " + item.correct, add_special_tokens=False).input_ids
    w = tokenizer(" " + item.wrong, add_special_tokens=False).input_ids
    if len(c) != 1 or len(w) != 1:
        raise ValueError(f"verb forms {item.correct!r}/{item.wrong!r} are not single tokens: {c} / {w}")
    return {"ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids), "subject": position(item.subject_span),
            "attractor": position(item.attractor_span), "correct_id": c[0], "wrong_id": w[0]}


def token_categories(n_tokens: int, subject: int, attractor: int | None) -> list[str]:
    return ["subject" if i == subject else "attractor" if i == attractor else "other" for i in range(n_tokens)]


# -- accuracy ----------------------------------------------------------------------------------------------------

def accuracy_table(items: Sequence[SVAItem], roots: Sequence[float]) -> dict:
    """Accuracy (root > 0) overall, per condition, per cell and for matching vs mismatching attractors."""
    if len(items) != len(roots):
        raise ValueError("one root per item")

    def block(sel):
        r = [float(x) for it, x in zip(items, roots) if sel(it)]
        if not r:
            return {"n": 0}
        return {"n": len(r), "accuracy": sum(x > 0 for x in r) / len(r), "mean_root": sum(r) / len(r)}

    out = {"all": block(lambda it: True),
           "by_condition": {c: block(lambda it, c=c: it.condition == c) for c in CONDITIONS},
           "by_cell": {cell_name(*c): block(lambda it, c=c: (it.condition, it.subject_number, it.attractor_number)
                                            == c) for c in cells()},
           "by_attractor": {}}
    for cond in ("pp", "rc"):
        for m, name in ((False, "match"), (True, "mismatch")):
            out["by_attractor"][f"{cond}/{name}"] = block(lambda it, cond=cond, m=m: it.condition == cond
                                                         and it.mismatch is m)
    return out


@torch.no_grad()
def forward_roots(model, tokenizer, items: Sequence[SVAItem], batch_size: int = 64) -> list[float]:
    """``logit(correct) - logit(wrong)`` after each prefix (items of equal token length are batched)."""
    encs = [encode(it, tokenizer) for it in items]
    roots = [math.nan] * len(items)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encs):
        by_len.setdefault(len(e["ids"]), []).append(i)
    for idx in by_len.values():
        for j in range(0, len(idx), batch_size):
            chunk = idx[j:j + batch_size]
            ids = torch.tensor([encs[i]["ids"] for i in chunk])
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            for row, i in enumerate(chunk):
                roots[i] = float(logits[row, encs[i]["correct_id"]] - logits[row, encs[i]["wrong_id"]])
    return roots


# -- per-item analysis --------------------------------------------------------------------------------------------

#: (decomposition, granularity, sign) of each component analysis
ANALYSES = (("paper", "tensor", "positive"), ("aten", "tensor", "positive"), ("aten", "scalar", "abs"))


def analyze_item(model, tokenizer, item: SVAItem, analyses=ANALYSES, entropy: bool = True, split=None) -> dict:
    """One item: a maxpath sweep per (decomposition, granularity, sign) with every layer's component readout, and an
    entropy sweep on the ATen graph (sweeps of one decomposition share one recorded tape). Per analysis:
    ``winner[layer][pos]`` (a label or ``None``) and ``value[layer][pos]`` (the credited value, real units)."""
    from ..api import run as semiring_run
    from ..components import component_readout, layers_on_tape, split_for
    from ..semirings.scaled import pooled_entropy

    enc = encode(item, tokenizer)
    emb = model.get_input_embeddings()(torch.tensor([enc["ids"]])).detach()
    c, w = enc["correct_id"], enc["wrong_id"]

    def fn(e):
        lg = model(inputs_embeds=e, use_cache=False, logits_to_keep=1).logits[0, -1]
        return lg[c] - lg[w]

    split = split_for(model) if split is None else split
    out: dict[str, Any] = {"id": item.id, "cell": item.cell, "condition": item.condition, "prefix": item.prefix,
                           "correct": item.correct, "wrong": item.wrong, "tokens": enc["tokens"],
                           "subject_pos": enc["subject"], "attractor_pos": enc["attractor"],
                           "categories": token_categories(len(enc["ids"]), enc["subject"], enc["attractor"]),
                           "analyses": {}, "seconds": {}}
    tapes = {}
    for d, g, s in analyses:
        t0 = time.perf_counter()
        res = semiring_run(fn, emb, "maxpath", sign=s, granularity=g, backpointers=True, model=model,
                           tape=tapes.get(d), decomposition=None if d in tapes else d)
        tape = tapes.setdefault(d, res.tape)
        if d == "aten":
            out["root"] = float(tape.root)
        layers = layers_on_tape(tape, split)
        winners, values = [], []
        for k in layers:
            ro = component_readout(res, split, k)
            labels = ro.winner_labels()
            winners.append(labels)
            values.append([float(v) for v in ro.value])
        out["analyses"][f"{d}/{g}/{s}"] = {"winner": winners, "value": values, "labels": list(ro.labels)}
        out["seconds"][f"{d}/{g}/{s}"] = round(time.perf_counter() - t0, 3)
        del res
    if entropy:
        t0 = time.perf_counter()
        res = semiring_run(fn, emb, "entropy", model=model, tape=tapes.get("aten"))
        out["root"] = float(res.tape.root)
        raw = res.raw[0]
        per_token = pooled_entropy(raw, -1).reshape(-1)
        whole = pooled_entropy(raw, tuple(range(raw.z.dim())))
        out["entropy"] = {"per_token": [float(x) for x in per_token], "prefix": float(whole)}
        out["seconds"]["entropy"] = round(time.perf_counter() - t0, 3)
    return out


# -- aggregation -------------------------------------------------------------------------------------------------

def layer_shares(records: Sequence[dict], analysis: str, category: str, conditions: Sequence[str]) -> dict:
    """Per layer, over every token of ``category`` in the items of ``conditions``: the count of tokens each label
    wins (``none``: no path of that sign), the win shares (over tokens with a winner; sum 1 where any token has
    one) and the value shares (credited value per label / total; shares of |value| for safety)."""
    recs = [r for r in records if r["condition"] in conditions]
    if not recs:
        return {"n_tokens": 0, "win_share": [], "value_share": [], "count": []}
    n_layers = len(recs[0]["analyses"][analysis]["winner"])
    counts = [{lab: 0 for lab in LABELS + ("none",)} for _ in range(n_layers)]
    sums = [{lab: 0.0 for lab in LABELS} for _ in range(n_layers)]
    n_tokens = 0
    for r in recs:
        a = r["analyses"][analysis]
        pos = [i for i, cat in enumerate(r["categories"]) if cat == category]
        n_tokens += len(pos)
        for k in range(n_layers):
            for p in pos:
                lab = a["winner"][k][p]
                counts[k][lab if lab is not None else "none"] += 1
                if lab is not None:
                    sums[k][lab] += abs(a["value"][k][p])
    win, val = [], []
    for k in range(n_layers):
        tot = sum(counts[k][lab] for lab in LABELS)
        win.append({lab: (counts[k][lab] / tot if tot else 0.0) for lab in LABELS})
        vt = sum(sums[k].values())
        val.append({lab: (sums[k][lab] / vt if vt > 0 else 0.0) for lab in LABELS})
    return {"n_tokens": n_tokens, "n_items": len(recs), "count": counts, "win_share": win, "value_share": val}


def _dominant(row: dict) -> str | None:
    if not row or max(row.values()) <= 0:
        return None
    return max(row, key=row.get)


def early_skip(shares: dict, n_early: int) -> dict:
    """Is Skip the largest win share in the first ``n_early`` layers?"""
    rows = shares.get("win_share", [])[:n_early]
    dom = [_dominant(r) for r in rows]
    n_skip = sum(d == "Skip" for d in dom)
    return {"layers": list(range(len(rows))), "dominant": dom, "skip_largest_in": n_skip, "of": len(rows),
            "skip_dominates": bool(rows) and n_skip > len(rows) / 2,
            "mean_skip_share": (sum(r["Skip"] for r in rows) / len(rows)) if rows else None}


def _stats(xs: Sequence[float]) -> dict:
    xs = [float(x) for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"n": 0}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"n": len(xs), "mean": m, "std": sd, "min": min(xs), "max": max(xs)}


def entropy_table(records: Sequence[dict]) -> dict:
    """Mean (std) path entropy per condition: subject token, attractor token, other tokens (per-item mean), the
    final position, the whole prefix; also the prefix length and the whole-prefix entropy per token."""
    out = {}
    for name, conds in GROUPS.items():
        recs = [r for r in records if r["condition"] in conds and "entropy" in r]
        if not recs:
            continue
        per = {cat: [] for cat in CATEGORIES}
        final, whole, length = [], [], []
        for r in recs:
            h = r["entropy"]["per_token"]
            for cat in ("subject", "attractor"):
                vals = [h[i] for i, c in enumerate(r["categories"]) if c == cat]
                per[cat].extend(vals)
            others = [h[i] for i, c in enumerate(r["categories"]) if c == "other"]
            if others:
                per["other"].append(sum(others) / len(others))
            final.append(h[-1])
            whole.append(r["entropy"]["prefix"])
            length.append(len(h))
        out[name] = {**{cat: _stats(v) for cat, v in per.items()}, "final_position": _stats(final),
                     "prefix": _stats(whole), "n_tokens": _stats(length)}
    by_correct = {}
    for ok in (True, False):
        recs = [r for r in records if "entropy" in r and (r["root"] > 0) is ok]
        by_correct["correct" if ok else "incorrect"] = {
            "prefix": _stats([r["entropy"]["prefix"] for r in recs]),
            "subject": _stats([r["entropy"]["per_token"][r["subject_pos"]] for r in recs])}
    out["by_correctness"] = by_correct
    return out


def _fmt_shares(row: dict) -> str:
    return " ".join(f"{lab[0]}={row[lab]:.2f}" for lab in LABELS if lab in row)


# -- the experiment ----------------------------------------------------------------------------------------------

@dataclass
class SVAConfig:
    out: str = "outputs/sva"
    per_cell: int = 30  # 10 cells -> 300 items, all scored for accuracy
    seed: int = 0
    n_analysis: int = 100  # items that get the semiring sweeps (stratified: 10 per cell); ~7 min
    analyses: tuple = ANALYSES
    entropy: bool = True
    n_early: int = 10  # "early layers" = the first third of SmolLM2's 30
    threads: int = 1
    plots: bool = True
    progress: bool = True
    templates: str | None = None  # path of a templates JSON (default: the packaged one)
    model: Any = field(default=None, repr=False)  # (model, tokenizer) to use instead of loading SmolLM2

    @classmethod
    def quick(cls, **kw) -> "SVAConfig":
        """10 analysed items (one per cell): about a minute at one thread."""
        base = dict(n_analysis=10)
        base.update(kw)
        return cls(**base)


def _log(cfg: SVAConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[sva] {msg}", file=sys.stderr, flush=True)


def run(config: SVAConfig | None = None, **overrides) -> dict:
    """Generate the items, score all of them, analyse ``n_analysis``; write ``summary.json``, ``items.json`` and
    PNGs to ``config.out``; return the summary."""
    cfg = with_overrides(config or SVAConfig(), overrides)
    out = output_dir(cfg.out)
    t_start = time.perf_counter()
    with torch_threads(cfg.threads):
        if cfg.model is not None:
            model, tokenizer = cfg.model
        else:
            from ..models.smollm2 import load_smollm2
            _log(cfg, "loading SmolLM2-135M-Instruct ...")
            model, tokenizer = load_smollm2()
        model.eval()
        templates, dropped = check_vocabulary(load_templates(cfg.templates), tokenizer)
        if dropped:
            _log(cfg, f"dropped multi-token vocabulary: {dropped}")
        items = generate_items(templates, cfg.per_cell, cfg.seed)
        t0 = time.perf_counter()
        roots = forward_roots(model, tokenizer, items)
        acc = accuracy_table(items, roots)
        t_acc = time.perf_counter() - t0
        _log(cfg, f"scored {len(items)} items in {t_acc:.1f} s; accuracy {acc['all']['accuracy']:.3f} "
                  + " ".join(f"{c}={acc['by_condition'][c]['accuracy']:.3f}" for c in CONDITIONS))

        chosen = select_for_analysis(items, cfg.n_analysis)
        records = []
        t_an = time.perf_counter()
        for j, it in enumerate(chosen):
            rec = analyze_item(model, tokenizer, it, cfg.analyses, cfg.entropy)
            rec["root_forward"] = roots[it.id]
            records.append(rec)
            el = time.perf_counter() - t_an
            eta = el / (j + 1) * (len(chosen) - j - 1)
            _log(cfg, f"{j + 1}/{len(chosen)} items analysed ({it.cell}: {it.prefix!r} -> {it.correct}, "
                      f"root {rec['root']:+.2f}); elapsed {el:.0f} s, eta {eta:.0f} s")
        t_an = time.perf_counter() - t_an
        keys = ["/".join(a) for a in cfg.analyses]
        shares = {k: {grp: {cat: layer_shares(records, k, cat, conds) for cat in CATEGORIES}
                      for grp, conds in GROUPS.items()} for k in keys}
        last = {}
        for k in keys:
            last[k] = {}
            for grp in GROUPS:
                for cat in CATEGORIES:
                    sh = shares[k][grp][cat]
                    if sh["n_tokens"]:
                        last[k][f"{grp}/{cat}"] = {"win_share": sh["win_share"][-1],
                                                   "value_share": sh["value_share"][-1],
                                                   "n_tokens": sh["n_tokens"]}
        early = {k: {grp: early_skip(shares[k][grp]["subject"], cfg.n_early) for grp in GROUPS} for k in keys}
        analysed_acc = accuracy_table(chosen, [r["root"] for r in records]) if records else {}
        summary = {
            "experiment": "subject-verb agreement on SmolLM2-135M-Instruct (Du et al. 2023, §5.2 analogue)",
            "config": {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "model"} | {
                "analyses": [list(a) for a in cfg.analyses]},  # not asdict(): it would deep-copy cfg.model
            "model": {"class": type(model).__name__, "layers": getattr(model.config, "num_hidden_layers", None),
                      "name": getattr(model.config, "_name_or_path", None)},
            "semantics": {
                "root": "logit(correct verb) - logit(wrong verb), next-token logits after the prefix",
                "inputs": "token embeddings of the prefix (no BOS)",
                "readout": "components.component_readout, Llama split, agg='oplus', every layer",
                "analyses": {"paper/tensor/positive": "the paper's semantics: tensor granularity, signed M+, on "
                                                      "the paper's operator graph (softmax as exp(x - lse(x)))",
                             "aten/tensor/positive": "the same on PyTorch's graph (one _softmax operator)",
                             "aten/scalar/abs": "scalar granularity, max |prod w|"},
                "win_share": "fraction of tokens whose best path leaves through each component",
                "value_share": "credited value per component / total credited value",
                "entropy": "per token: pooled over the hidden dim; prefix: pooled over all input elements (nats)",
                "causal_caveat": "the root is at the last prefix position (the subject in 'simple', the attractor "
                                 "in 'pp'/'rc'); a non-final token's last-layer Query/Skip share is structurally 0",
            },
            "vocabulary": {"nouns": len(templates["nouns"]), "verbs": len(templates["verbs"]),
                           "rc_verbs": len(templates["rc_verbs"]), "prepositions": len(templates["prepositions"]),
                           "dropped_at_runtime": dropped,
                           "dropped_in_templates_file": load_templates(cfg.templates).get("dropped", {})},
            "n_items": len(items),
            "n_analysed": len(records),
            "accuracy": acc,
            "analysed_accuracy": analysed_acc,
            "root_forward_vs_tape_max_abs_diff": max((abs(r["root"] - r["root_forward"]) for r in records),
                                                     default=None),
            "last_layer": last,
            "early_layer_skip": early,
            "shares": shares,
            "entropy": entropy_table(records) if cfg.entropy else None,
            "paper": PAPER,
            "timing_s": {"accuracy": round(t_acc, 2), "analysis": round(t_an, 2),
                         "per_item": round(t_an / max(len(records), 1), 2), "total": None},
        }
        summary["tables"] = tables(summary)
        if cfg.plots and records:
            summary["plots"] = _plots(summary, out, records)
        summary["timing_s"]["total"] = round(time.perf_counter() - t_start, 2)
        (out / "items.json").write_text(json.dumps({"items": [asdict(it) | {"root": roots[it.id]} for it in items],
                                                    "analysed": records}))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def tables(summary: dict) -> dict:
    """Markdown tables: accuracy; last-layer shares of subject/attractor/other; early skip; entropy."""
    acc = summary["accuracy"]
    lines = ["| condition / cell | n | accuracy | mean root |", "|---|---|---|---|"]
    for c in CONDITIONS:
        b = acc["by_condition"][c]
        lines.append(f"| **{c}** | {b['n']} | {b['accuracy']:.3f} | {b['mean_root']:+.2f} |")
        for name, b in acc["by_cell"].items():
            if name.startswith(c + "/") and b["n"]:
                lines.append(f"| {name} | {b['n']} | {b['accuracy']:.3f} | {b['mean_root']:+.2f} |")
    b = acc["all"]
    lines.append(f"| **all** | {b['n']} | {b['accuracy']:.3f} | {b['mean_root']:+.2f} |")
    out = {"accuracy": "\n".join(lines)}
    for k, rows in summary["last_layer"].items():
        t = ["| group/token | n tokens | win: Q | K | V | Skip | Other | value: Q | K | V | Skip | Other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            w, v = r["win_share"], r["value_share"]
            t.append(f"| {name} | {r['n_tokens']} | " + " | ".join(f"{w[lab]:.2f}" for lab in LABELS) + " | "
                     + " | ".join(f"{v[lab]:.2f}" for lab in LABELS) + " |")
        out[f"last_layer {k}"] = "\n".join(t)
    for k, groups in summary["early_layer_skip"].items():
        t = ["| group | subject: dominant component in layers 0.. | Skip largest in | mean Skip win share |",
             "|---|---|---|---|"]
        for grp, e in groups.items():
            if e["of"]:
                t.append(f"| {grp} | {' '.join((d or '-')[0] for d in e['dominant'])} | {e['skip_largest_in']}/"
                         f"{e['of']} | {e['mean_skip_share']:.2f} |")
        out[f"early_layers {k}"] = "\n".join(t)
    ent = summary.get("entropy")
    if ent:
        t = ["| condition | n | subject | attractor | other (item mean) | final position | whole prefix | tokens |",
             "|---|---|---|---|---|---|---|---|"]

        def cell(s):
            return f"{s['mean']:.1f} ± {s['std']:.1f}" if s.get("n") else "–"

        for grp in GROUPS:
            if grp in ent:
                e = ent[grp]
                t.append(f"| {grp} | {e['prefix']['n']} | {cell(e['subject'])} | {cell(e['attractor'])} | "
                         f"{cell(e['other'])} | {cell(e['final_position'])} | {cell(e['prefix'])} | "
                         f"{e['n_tokens']['mean']:.1f} |")
        out["entropy"] = "\n".join(t)
    return out


def _plots(summary: dict, out: Path, records: Sequence[dict]) -> list[str]:
    written = []
    rows = [("subject", "simple", "subject (simple: final position)"),
            ("subject", "pp+rc", "subject (pp+rc: non-final)"),
            ("attractor", "pp+rc", "attractor (pp+rc: final position)"),
            ("other", "all", "other tokens (all conditions)")]
    for k, groups in summary["shares"].items():
        for kind in ("win_share", "value_share"):
            present = [r for r in rows if groups[r[1]][r[0]]["n_tokens"]]
            fig = viz.new_figure((15, 3.2 * len(present)))
            for i, (cat, grp, title) in enumerate(present):
                ax = fig.add_subplot(len(present), 1, i + 1)
                sh = groups[grp][cat]
                viz.layer_component_shares(sh[kind], LABELS, ax=ax,
                                           title=f"{title}, n={sh['n_tokens']} tokens — {kind.replace('_', ' ')} "
                                                 f"({k})")
                ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            fig.tight_layout()
            written.append(str(viz.save(fig, out / f"layer_shares_{kind}_{k.replace('/', '_')}.png")))
    ent = summary.get("entropy")
    if ent:
        fig = viz.new_figure((12, 4))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        cats = ["subject", "attractor", "other", "final_position"]
        series = {c: [ent[c][cat].get("mean", float("nan")) for cat in cats] for c in CONDITIONS if c in ent}
        viz.entropy_per_token(cats, series, ax=ax1, title="per-token path entropy (pooled over hidden), mean")
        vals = [v for s in series.values() for v in s if math.isfinite(v)]
        if vals:
            ax1.set_ylim(min(vals) - 5, max(vals) + 5)
        # whole-prefix entropy against prefix length (it grows with the number of paths)
        for i, c in enumerate(CONDITIONS):
            pts = [(len(r["entropy"]["per_token"]), r["entropy"]["prefix"]) for r in records
                   if r["condition"] == c and "entropy" in r]
            if pts:
                ax2.scatter([x + 0.1 * (i - 1) for x, _ in pts], [y for _, y in pts], s=14, alpha=0.7, label=c)
        ax2.set_xlabel("prefix length (tokens)")
        ax2.set_ylabel("whole-prefix path entropy (nats)")
        ax2.set_title("whole-prefix entropy per item")
        ax2.legend(fontsize=8, frameon=False)
        fig.tight_layout()
        written.append(str(viz.save(fig, out / "entropy_by_condition.png")))
    acc = summary["accuracy"]["by_cell"]
    fig = viz.new_figure((8, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    names = [n for n, b in acc.items() if b["n"]]
    ax.bar(range(len(names)), [acc[n]["accuracy"] for n in names], color="#4C72B0")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="black", linewidth=0.5, linestyle="--")
    ax.set_ylabel("accuracy (root > 0)")
    ax.set_title("agreement accuracy per cell (condition/subject/attractor)")
    fig.tight_layout()
    written.append(str(viz.save(fig, out / "accuracy.png")))
    return written


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/sva", type=output_folder)
    p.add_argument("--quick", action="store_true", help="10 analysed items (one per cell)")
    p.add_argument("--n", type=positive_int, help="number of analysed items (default 100; --quick: 10)")
    p.add_argument("--per-cell", type=positive_int, help="generated items per cell (default 30)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--no-entropy", action="store_true")
    args = p.parse_args(argv)
    cfg = SVAConfig.quick() if args.quick else SVAConfig()
    cfg.out = args.out
    for name, attr in [("n", "n_analysis"), ("per_cell", "per_cell"), ("seed", "seed"), ("threads", "threads")]:
        if getattr(args, name) is not None:
            setattr(cfg, attr, getattr(args, name))
    cfg.entropy = not args.no_entropy
    summary = run(cfg)
    for name, table in summary["tables"].items():
        print(f"\n{name}\n{table}")
    print(f"\npaper (BERT): subject last layer {PAPER['subject_last_layer_shares']}; {PAPER['early_layers']}")
    print(f"\n{summary['n_items']} items scored, {summary['n_analysed']} analysed; "
          f"total {summary['timing_s']['total']} s; written to {cfg.out}")
    return summary


if __name__ == "__main__":
    main()

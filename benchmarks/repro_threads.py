"""Issue 15's thread repros, counted over rounds: run with ``PYTHONPATH=<tree> python benchmarks/repro_threads.py``.

1. module labels of decoded paths while another thread runs another model (wrong rounds / rounds);
2. training flag and attention implementation after concurrent ``run(model=)`` calls (rounds left changed);
3. gradient of concurrent ``run(model=)`` calls vs the sequential one (max abs difference).
The Inseq step-score case needs an Inseq model; it is tested in tests/test_threads.py.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models as tm  # noqa: E402

import inseq_semiring as isr  # noqa: E402
from inseq_semiring.paths import top_paths  # noqa: E402

torch.set_num_threads(1)
ROUNDS = 20


def together(*jobs):
    barrier = threading.Barrier(len(jobs))
    out = [None] * len(jobs)

    def work(i, job):
        barrier.wait()
        out[i] = job()

    ts = [threading.Thread(target=work, args=(i, j)) for i, j in enumerate(jobs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def labels() -> str:
    case, other = tm.build("gpt2"), tm.build("llama")
    res = isr.run(case.fn, case.inputs, "maxpath", backpointers=True, model=case.model)
    want = [[h.module_path for h in p.hops] for p in top_paths(res, k=3)]
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            other.model(inputs_embeds=other.inputs[0])

    def attribute():
        bad = 0
        for _ in range(ROUNDS):
            r = isr.run(case.fn, case.inputs, "maxpath", backpointers=True, model=case.model)
            bad += [[h.module_path for h in p.hops] for p in top_paths(r, k=3)] != want
        stop.set()
        return bad

    return f"path labels wrong in {together(busy, attribute)[1]}/{ROUNDS} rounds"


def model_state() -> str:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=30, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(cfg).double()
    emb = torch.randn(1, 3, 8, dtype=torch.float64)
    fn = lambda e: model(inputs_embeds=e, use_cache=False).logits[:, -1, 3].sum()  # noqa: E731
    model.eval()
    e = emb.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(fn(e), e)
    changed, diff = 0, 0.0
    for _ in range(ROUNDS):
        model.train()
        model.config._attn_implementation = "sdpa"
        got = together(*[lambda: isr.run(fn, emb, "gradient", model=model).values[0] for _ in range(3)])
        changed += not (model.training and model.config._attn_implementation == "sdpa")
        diff = max(diff, max(float((g - ref).abs().max()) for g in got))
    return f"model left changed after {changed}/{ROUNDS} rounds; max |concurrent - sequential| gradient = {diff:.3g}"


if __name__ == "__main__":
    print(labels())
    print(model_state())

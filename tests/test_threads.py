"""Concurrent attributions give the sequential results and leave the model as the user had it. Each case is run
many times (races are intermittent): the Inseq step-score cache, module-path labels, and model-state switching."""

import threading

import torch
import transformers

import inseq_semiring as isr
import tiny_models as tm
from fixtures_inseq import *  # noqa: F401,F403
from inseq_semiring.paths import top_paths

torch.set_num_threads(1)
ROUNDS = 20


def _together(*jobs):
    """Run the jobs in threads released at the same instant; return their results (re-raise their errors)."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def work(i, job):
        try:
            barrier.wait()
            results[i] = job()
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


STEP_SCORES = ["semiring_top_path", "semiring_entropy", "semiring_log_total_flow"]
PAIRS = [("The keys to the cabinet", "The keys to the cabinet are on the"), ("hello world", "hello world the cat sat")]


def test_two_threads_on_one_inseq_model_give_the_sequential_step_scores(gpt2_model):
    def job(pair):
        out = gpt2_model.attribute(*pair, method="semiring_maxpath", show_progress=False, step_scores=STEP_SCORES)
        seq = out.sequence_attributions[0]
        return {k: v.clone() for k, v in seq.step_scores.items()}, seq.target_attributions.clone()

    want = [job(p) for p in PAIRS]
    for _ in range(ROUNDS):
        got = _together(*[lambda p=p: job(p) for p in PAIRS])
        for (scores, attr), (ref_scores, ref_attr) in zip(got, want):
            for k in STEP_SCORES:
                torch.testing.assert_close(scores[k], ref_scores[k], rtol=1e-6, atol=0)
            torch.testing.assert_close(attr, ref_attr, rtol=1e-6, atol=0, equal_nan=True)


def test_the_step_graph_cache_is_per_thread():
    """What made concurrent step scores wrong: one process-wide cache slot. Each thread (= each Inseq call) now has
    its own, so a graph stored by one call is never read by another."""
    import inseq_semiring.integrations.inseq as plugin

    mine = plugin._cache()
    (theirs,) = _together(plugin._cache)
    assert mine is plugin._cache() and theirs is not mine


def test_path_labels_are_this_models_while_another_thread_runs_another_model():
    case = tm.build("gpt2")
    other = tm.build("llama")
    names = {n for n, _ in case.model.named_modules()}
    res = isr.run(case.fn, case.inputs, "maxpath", backpointers=True, model=case.model)
    want = [[h.module_path for h in p.hops] for p in top_paths(res, k=3)]
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            isr.run(other.fn, other.inputs, "flow", model=other.model)
            other.model(inputs_embeds=other.inputs[0])

    def attribute():
        out = []
        for _ in range(ROUNDS):
            r = isr.run(case.fn, case.inputs, "maxpath", backpointers=True, model=case.model)
            out.append([[h.module_path for h in p.hops] for p in top_paths(r, k=3)])
        stop.set()
        return out

    _, got = _together(busy, attribute)
    for paths in got:
        assert paths == want
        assert all(m in names for p in paths for m in p)


def test_concurrent_runs_restore_training_flag_and_attention():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=30, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(cfg).double().train()
    emb = torch.randn(1, 3, 8, dtype=torch.float64)
    seen = []

    def fn(e):
        seen.append(model.training)
        return model(inputs_embeds=e, use_cache=False).logits[:, -1, 3].sum()

    model.eval()
    e = emb.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(fn(e), e)
    model.train()
    seen.clear()
    for _ in range(ROUNDS):
        got = _together(*[lambda: isr.run(fn, emb, "gradient", model=model).values[0] for _ in range(3)])
        assert model.config._attn_implementation == "sdpa"
        assert all(m.training for m in model.modules())
        for g in got:
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    assert seen and not any(seen)  # every forward ran in eval mode

"""Per-record overhead of each semiring sweep on tiny models, relative to one plain gradient in the same process.

Models (random weights, eager attention, float32): GPT-2 with 2 layers x hidden 64, GPT-2 with 12 layers x hidden
64, Llama with 4 layers x hidden 64 and grouped-query attention (4 query heads, 2 key/value heads); 16 tokens; root
the log-probability of one next token at the last position. Each timing is ``isr.run(...)`` including its own
forward pass (recording); the baseline is ``torch.autograd.grad`` of the same root w.r.t. the input embeddings
(forward + backward). One thread, median of ``--repeats`` of the process CPU time (the call's own work, robust on a
shared machine), wall-clock alongside. ``records``: operator records on the tape; ``µs / record``: CPU time per
record. ``recording``: the share of the figure spent recording (the forward pass under the dispatch mode, with the
plan of the shape, timed on its own in the same rounds); for the autograd row, the share of its forward pass. The
"floor" row is the forward pass under a dispatch mode that only calls through: no recording can cost less. Rows
marked "one-off path" run without plans (``plans=False``: every call records, looks up and plans from scratch).
Rows marked "compiled forward" run with ``compile=True``: the forward is captured once by TorchDynamo, checked against
the recorded tape, and replayed without the dispatch mode (:mod:`inseq_semiring.graph.compiled`); their recording
share is the replayed forward's ("compiled forward alone" row), which includes Dynamo's guard check. Rows marked
``compile='all'`` also replay the sweep of the shape's plan as a TorchScript graph traced once
(:mod:`inseq_semiring.traced_sweep`; its first calls, which trace and script it, fall in the warm-up round).
Methods are timed round-robin (one call of each per round), so that load changes hit every row alike.

    python benchmarks/bench_overhead.py [--tokens 16] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

#: (row label, semiring, options); None = the autograd baseline.
METHODS = [
    ("autograd.grad", None, {}),
    ("gradient", "gradient", {}),
    ("flow", "flow", {}),
    ("entropy", "entropy", {}),
    ("maxpath abs", "maxpath", {}),
    ("maxpath abs + back-pointers", "maxpath", {"backpointers": True}),
    ("maxpath positive", "maxpath", {"sign": "positive"}),
    ("maxpath negative", "maxpath", {"sign": "negative"}),
    ("maxpath positive, tensor + back-pointers", "maxpath",
     {"sign": "positive", "granularity": "tensor", "backpointers": True}),
    ("maxpath negative, tensor + back-pointers", "maxpath",
     {"sign": "negative", "granularity": "tensor", "backpointers": True}),
    ("gradient, one-off path", "gradient", {"plans": False}),
    ("entropy, one-off path", "entropy", {"plans": False}),
    ("gradient, compiled forward", "gradient", {"compile": True}),
    ("flow, compiled forward", "flow", {"compile": True}),
    ("entropy, compiled forward", "entropy", {"compile": True}),
    ("maxpath abs, compiled forward", "maxpath", {"compile": True}),
    ("maxpath abs + back-pointers, compiled forward", "maxpath", {"backpointers": True, "compile": True}),
    ("gradient, compile='all'", "gradient", {"compile": "all"}),
    ("flow, compile='all'", "flow", {"compile": "all"}),
    ("entropy, compile='all'", "entropy", {"compile": "all"}),
    ("maxpath abs, compile='all'", "maxpath", {"compile": "all"}),
    ("maxpath abs + back-pointers, compile='all'", "maxpath", {"backpointers": True, "compile": "all"}),
]


def gpt2(layers: int):
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0,
                        eos_token_id=0)
    cfg._attn_implementation = "eager"
    return tf.GPT2LMHeadModel(cfg)


def llama_gqa():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    return tf.LlamaForCausalLM(cfg)


MODELS = [("GPT-2 2x64", lambda: gpt2(2)), ("GPT-2 12x64", lambda: gpt2(12)), ("Llama 4x64 GQA", llama_gqa)]


def prepare(make, tokens: int):
    torch.manual_seed(0)
    model = make().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings()(ids).detach()

    def root(e):
        logits = model(inputs_embeds=e, use_cache=False).logits
        return torch.log_softmax(logits[:, -1], -1)[:, 42].sum()

    return model, emb, root


def call(model, emb, root, semiring, options):
    import inseq_semiring as isr

    if semiring is None:
        e = emb.clone().requires_grad_(True)
        return torch.autograd.grad(root(e), e)[0]
    return isr.run(root, emb, semiring, model=model, **options)


def recording(model, emb, root):
    """One recording of the root's tape (the forward pass under the dispatch mode), with the shape's plan."""
    from inseq_semiring import plan as plans
    from inseq_semiring.decompositions import resolve
    from inseq_semiring.graph.model_state import attribution_mode
    from inseq_semiring.graph.recorder import record
    from inseq_semiring.rules.registry import DEFAULT_RULES

    decomposition = resolve(None)
    plan = plans.PLANS.get(model, plans.key((emb,), DEFAULT_RULES, decomposition, "error"))

    def go():
        with attribution_mode(model):
            tape = record(root, (emb,), model=model, decomposition=decomposition, plan=plan)
        assert plan is None or tape.plan is plan
        return tape

    return go


def compiled_forward(model, emb, root):
    """One replayed forward (``compile=True``'s part of a call before the sweep), with the shape's plan."""
    from inseq_semiring import plan as plans
    from inseq_semiring.decompositions import resolve
    from inseq_semiring.graph.compiled import record_compiled
    from inseq_semiring.graph.model_state import attribution_mode
    from inseq_semiring.rules.registry import DEFAULT_RULES

    decomposition = resolve(None)

    def go():
        plan = plans.PLANS.get(model, plans.key((emb,), DEFAULT_RULES, decomposition, "error"))
        with attribution_mode(model):
            tape = record_compiled(root, (emb,), model=model, decomposition=decomposition, plan=plan)
        assert tape.forward == "compiled" or tape.plan is None
        return tape

    return go


def empty_mode_forward(emb, root):
    """The floor of any recording: the forward pass (grad mode on) under a dispatch mode that only calls through."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CallThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def go():
        e = emb.clone().requires_grad_(True)
        with CallThrough():
            return root(e)
    return go


def forward_only(emb, root):
    """The autograd baseline's forward pass alone (grad mode on, the graph built)."""
    def go():
        return root(emb.clone().requires_grad_(True))
    return go


def median_times(fns: dict, repeats: int) -> dict:
    """name -> (median CPU seconds, median wall seconds) of ``repeats`` rounds, one call of each per round, after
    one warm-up round."""
    for fn in fns.values():
        fn()
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="row labels to time, separated by ';' (default: all; autograd always)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import inseq_semiring as isr

    methods = [m for m in METHODS if not args.only or m[0] in args.only.split(";") or m[1] is None]
    print(f"# tiny models, {args.tokens} tokens, float32, CPU, threads={args.threads}, median of {args.repeats} "
          "(process CPU time)")
    print("| model | records | method | CPU ms | × autograd | µs / record | recording | wall ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for label, make in MODELS:
        model, emb, root = prepare(make, args.tokens)
        records = len(isr.run(root, emb, "gradient", model=model).tape.records)
        fns = {name: (lambda s=semiring, o=options: call(model, emb, root, s, o))
               for name, semiring, options in methods}
        fns["<recording>"] = recording(model, emb, root)
        fns["<compiled>"] = compiled_forward(model, emb, root)
        fns["<forward>"] = forward_only(emb, root)
        fns["<empty mode>"] = empty_mode_forward(emb, root)
        times = median_times(fns, args.repeats)
        base = times["autograd.grad"][0]
        for name, semiring, options in methods:
            cpu, wall = times[name]
            part = times["<forward>" if semiring is None else
                         "<compiled>" if options.get("compile") else "<recording>"][0]
            print(f"| {label} | {records} | {name} | {cpu * 1e3:.1f} | {cpu / base:.2f} | {cpu * 1e6 / records:.1f} "
                  f"| {100 * part / cpu:.0f}% | {wall * 1e3:.1f} |", flush=True)
        print(f"| {label} | {records} | recording alone | {times['<recording>'][0] * 1e3:.1f} | "
              f"{times['<recording>'][0] / base:.2f} | {times['<recording>'][0] * 1e6 / records:.1f} | 100% | "
              f"{times['<recording>'][1] * 1e3:.1f} |", flush=True)
        comp = times["<compiled>"]
        print(f"| {label} | {records} | compiled forward alone | {comp[0] * 1e3:.1f} | {comp[0] / base:.2f} | "
              f"{comp[0] * 1e6 / records:.1f} | 100% | {comp[1] * 1e3:.1f} |", flush=True)
        floor = times["<empty mode>"]
        print(f"| {label} | {records} | forward under an empty dispatch mode (floor) | {floor[0] * 1e3:.1f} | "
              f"{floor[0] / base:.2f} | {floor[0] * 1e6 / records:.1f} | - | {floor[1] * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

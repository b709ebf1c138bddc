"""Per-record overhead of each semiring sweep on tiny models, relative to one plain gradient in the same process.

Models (random weights, eager attention, float32): GPT-2 with 2 layers x hidden 64, GPT-2 with 12 layers x hidden
64, Llama with 4 layers x hidden 64 and grouped-query attention (4 query heads, 2 key/value heads); 16 tokens; root
the log-probability of one next token at the last position. Each timing is ``isr.run(...)`` including its own
forward pass (recording); the baseline is ``torch.autograd.grad`` of the same root w.r.t. the input embeddings
(forward + backward). One thread, median of ``--repeats`` of the process CPU time (the call's own work, robust on a
shared machine), wall-clock alongside. ``records``: operator records on the tape; ``µs / record``: CPU time per
record.

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


def median_time(fn, repeats: int) -> tuple[float, float]:
    """(median CPU seconds, median wall seconds) of ``repeats`` calls after one warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import inseq_semiring as isr

    print(f"# tiny models, {args.tokens} tokens, float32, CPU, threads={args.threads}, median of {args.repeats} "
          "(process CPU time)")
    print("| model | records | method | CPU ms | × autograd | µs / record | wall ms |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for label, make in MODELS:
        model, emb, root = prepare(make, args.tokens)
        records = len(isr.run(root, emb, "gradient", model=model).tape.records)
        base = None
        for name, semiring, options in METHODS:
            cpu, wall = median_time(lambda s=semiring, o=options: call(model, emb, root, s, o), args.repeats)
            base = cpu if semiring is None else base
            print(f"| {label} | {records} | {name} | {cpu * 1e3:.1f} | {cpu / base:.2f} | {cpu * 1e6 / records:.1f} "
                  f"| {wall * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

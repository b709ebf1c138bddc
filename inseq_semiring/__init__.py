"""inseq-semiring: semiring backpropagation over PyTorch / Hugging Face models.

Public API (imports no Inseq):
    semiring_backward(fn, inputs, semiring, *, sign="abs", granularity="scalar")
"""

"""Re-implementations of the experiments of Du et al. (ACL 2023), "Generalizing Backpropagation for
Gradient-Based Interpretability".

* :mod:`.synthetic` — the appendix-A data generators (FirstTokenRepeatedOnce, ..., FFOOM), seeded, balanced,
  split 70/10/20.
* :mod:`.train` — the small BERT classifier of §5.1, an MLP, and a deterministic Adam training loop.
* :mod:`.ftro` — §5.1: which attention component (Query/Key/Value/Skip) carries the best gradient path.
  ``python -m inseq_semiring.experiments.ftro --out outputs/ftro [--quick]``
* :mod:`.ffoom` — appendix B.1: gradient-path entropy of an MLP grows with its width.
  ``python -m inseq_semiring.experiments.ffoom --out outputs/ffoom [--quick]``

Modules are imported lazily (``transformers`` is only needed by :mod:`.ftro`).
"""

__all__ = ["synthetic", "train", "ftro", "ffoom"]

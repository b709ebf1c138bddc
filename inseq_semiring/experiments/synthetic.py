"""Synthetic data sets of Du et al. (ACL 2023), appendix A, re-implemented.

Token ids are ``1 .. V-1`` (``0`` is reserved for padding; no ``[CLS]``/``[SEP]``: a sequence classifier pools
position 0). Every generator is seeded (``numpy.random.default_rng(seed)``), class-balanced (the first half of the
draws are positives, then everything is shuffled) and split 70/10/20 into train/val/test by a seeded permutation.

Notation in the one-line definitions: ``x`` is one sequence of length ``L``, ``x[0]`` its first token; ``~ V``
means drawn uniformly (with replacement) from the vocabulary ``1 .. V-1``, ``~ V-{a}`` the same without token
``a``; "pos"/"neg" are the positive/negative halves (negatives redrawn where a definition says "no pair"/"not").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass
class SyntheticDataset:
    """Inputs ``X`` (long ``[N, L]`` token ids, or float ``[N, F]`` features), labels ``y`` (long ``[N]``) and the
    index sets of the train/val/test splits. ``info`` holds the generator's parameters."""

    name: str
    X: torch.Tensor
    y: torch.Tensor
    splits: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.splits[which]
        return self.X[idx], self.y[idx]

    @property
    def train(self):
        return self.split("train")

    @property
    def val(self):
        return self.split("val")

    @property
    def test(self):
        return self.split("test")

    def __len__(self) -> int:
        return len(self.y)


# -- helpers ---------------------------------------------------------------------------------------------------

def _uniform_except(rng: np.random.Generator, vocab_size: int, excluded: np.ndarray, size) -> np.ndarray:
    """Uniform over ``1 .. V-1`` minus ``excluded`` (broadcast against ``size``): draw from ``V-2`` values, shift
    the ones at or above the excluded token up by one."""
    r = rng.integers(1, vocab_size - 1, size=size)
    return r + (r >= excluded)


def _finish(name: str, X: np.ndarray, y: np.ndarray, rng: np.random.Generator, info: dict,
            fractions=SPLIT_FRACTIONS) -> SyntheticDataset:
    order = rng.permutation(len(y))
    X, y = X[order], y[order]
    n = len(y)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    perm = torch.from_numpy(rng.permutation(n))
    splits = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    Xt = torch.from_numpy(X).long() if np.issubdtype(X.dtype, np.integer) else torch.from_numpy(X).float()
    return SyntheticDataset(name, Xt, torch.from_numpy(y).long(), splits, info)


def _labels(n: int) -> np.ndarray:
    y = np.zeros(n, dtype=np.int64)
    y[: n // 2] = 1
    return y


def _check(vocab_size: int, seq_len: int, min_len: int = 2) -> None:
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (ids 1..V-1 with one excluded), got {vocab_size}")
    if seq_len < min_len:
        raise ValueError(f"seq_len must be >= {min_len}, got {seq_len}")


def _first_token_start(n: int, vocab_size: int, seq_len: int, seed: int):
    """Shared start of the FirstToken* tasks: rng, balanced labels, the first tokens and X with column 0 set."""
    _check(vocab_size, seq_len)
    rng = np.random.default_rng(seed)
    y = _labels(n)
    first = rng.integers(1, vocab_size, size=n)
    X = np.empty((n, seq_len), dtype=np.int64)
    X[:, 0] = first
    return rng, y, first, X


# -- generators ------------------------------------------------------------------------------------------------

def first_token_repeated_once(n: int = 10_000, vocab_size: int = 20, seq_len: int = 10,
                              seed: int = 0, *, sampling: str = "paper") -> SyntheticDataset:
    """y=1 iff x[0] recurs; pos: one copy at a uniform i in 1..L-1, rest ~ V-{x[0]}; neg: x[1:] ~ V-{x[0]}.

    ``sampling="paper"`` (default): the paper's data, bit for bit (:func:`_paper_first_token_repeated_once`);
    ``"balanced"``: this module's vectorised generator (``default_rng``, balanced 70/10/20 split)."""
    if sampling == "paper":
        return _paper_first_token_repeated_once(n, vocab_size, seq_len, seed)
    if sampling != "balanced":
        raise ValueError(f"sampling must be 'paper' or 'balanced', got {sampling!r}")
    rng, y, first, X = _first_token_start(n, vocab_size, seq_len, seed)
    X[:, 1:] = _uniform_except(rng, vocab_size, first[:, None], (n, seq_len - 1))
    pos = np.flatnonzero(y == 1)
    where = rng.integers(1, seq_len, size=len(pos))
    X[pos, where] = first[pos]
    return _finish("FirstTokenRepeatedOnce", X, y, rng, dict(n=n, vocab_size=vocab_size, seq_len=seq_len, seed=seed))


def _paper_first_token_repeated_once(n: int, vocab_size: int, seq_len: int, seed: int) -> SyntheticDataset:
    """The paper's FirstTokenRepeatedOnce data, regenerated from the facts of its generator.

    One ``numpy.random.RandomState(seed)`` draws, in this order: the first tokens of all ``n`` rows
    (``choice`` over ``1..V-1``); then row by row, where rows ``< n // 2`` are the positives: a positive draws its
    repeat position (``choice`` over ``1..L-1``) and then each other position one ``choice`` over ``V-{x[0]}`` (in
    ascending order), a negative draws its ``L-1`` tokens in one ``choice`` over ``V-{x[0]}``; last a permutation of
    the rows. The split is ``torch.utils.data.random_split`` into ``int(0.7 n)``, ``int(0.1 n)``, ``int(0.2 n)``
    rows with ``torch.Generator().manual_seed(seed)``. With the defaults the validation set has 476 positives and
    ``val[0] = [4, 10, 1, 9, 16, 2, 9, 11, 8, 6]`` (label 0)."""
    _check(vocab_size, seq_len)
    rs = np.random.RandomState(seed)
    vocab = list(range(1, vocab_size))
    y = _labels(n)
    X = np.zeros((n, seq_len), dtype=np.int64)
    first = rs.choice(vocab, size=n, replace=True)
    for i, tok in enumerate(first):
        others = [v for v in vocab if v != tok]
        X[i, 0] = tok
        if y[i] == 0:
            X[i, 1:] = rs.choice(others, size=seq_len - 1, replace=True)
            continue
        where = rs.choice(np.arange(1, seq_len))
        X[i, where] = tok
        for j in range(1, seq_len):
            if j != where:
                X[i, j] = rs.choice(others)
    order = rs.permutation(n)
    X, y = X[order], y[order]
    sizes = [int(f * n) for f in SPLIT_FRACTIONS]
    parts = torch.utils.data.random_split(range(sum(sizes)), sizes, generator=torch.Generator().manual_seed(seed))
    splits = {name: torch.tensor(list(part.indices), dtype=torch.long)
              for name, part in zip(("train", "val", "test"), parts)}
    info = dict(n=n, vocab_size=vocab_size, seq_len=seq_len, seed=seed, sampling="paper")
    return SyntheticDataset("FirstTokenRepeatedOnce", torch.from_numpy(X), torch.from_numpy(y), splits, info)


def first_token_repeated_immediately(n: int = 10_000, vocab_size: int = 20, seq_len: int = 10,
                                     seed: int = 0) -> SyntheticDataset:
    """y=1 iff x[1]==x[0]; pos: x[1]=x[0], x[2:] ~ V-{x[0]}; neg: x[1] ~ V-{x[0]}, x[2:] ~ V."""
    rng, y, first, X = _first_token_start(n, vocab_size, seq_len, seed)
    pos = y == 1
    X[:, 1] = np.where(pos, first, _uniform_except(rng, vocab_size, first, n))
    rest_pos = _uniform_except(rng, vocab_size, first[:, None], (n, seq_len - 2))
    rest_neg = rng.integers(1, vocab_size, size=(n, seq_len - 2))
    X[:, 2:] = np.where(pos[:, None], rest_pos, rest_neg)
    return _finish("FirstTokenRepeatedImmediately", X, y, rng,
                   dict(n=n, vocab_size=vocab_size, seq_len=seq_len, seed=seed))


def first_token_repeated_last(n: int = 10_000, vocab_size: int = 20, seq_len: int = 10,
                              seed: int = 0) -> SyntheticDataset:
    """y=1 iff x[L-1]==x[0]; x[1:L-1] ~ V; pos: x[L-1]=x[0]; neg: x[L-1] ~ V-{x[0]}."""
    rng, y, first, X = _first_token_start(n, vocab_size, seq_len, seed)
    X[:, 1:-1] = rng.integers(1, vocab_size, size=(n, seq_len - 2))
    X[:, -1] = np.where(y == 1, first, _uniform_except(rng, vocab_size, first, n))
    return _finish("FirstTokenRepeatedLast", X, y, rng, dict(n=n, vocab_size=vocab_size, seq_len=seq_len, seed=seed))


def _has_adjacent_duplicate(X: np.ndarray) -> np.ndarray:
    return (X[:, 1:] == X[:, :-1]).any(axis=1)


def adjacent_duplicate(n: int = 10_000, vocab_size: int = 20, seq_len: int = 10,
                       seed: int = 0) -> SyntheticDataset:
    """y=1 iff some x[i]==x[i+1]; pos: a token ~ V at a uniform pair (i, i+1), rest ~ V; neg: x ~ V, no pair."""
    _check(vocab_size, seq_len)
    rng = np.random.default_rng(seed)
    y = _labels(n)
    X = rng.integers(1, vocab_size, size=(n, seq_len))
    neg = np.flatnonzero(y == 0)
    bad = neg[_has_adjacent_duplicate(X[neg])]
    while len(bad):
        X[bad] = rng.integers(1, vocab_size, size=(len(bad), seq_len))
        bad = bad[_has_adjacent_duplicate(X[bad])]
    pos = np.flatnonzero(y == 1)
    i = rng.integers(0, seq_len - 1, size=len(pos))
    tok = rng.integers(1, vocab_size, size=len(pos))
    X[pos, i] = tok
    X[pos, i + 1] = tok
    return _finish("AdjacentDuplicate", X, y, rng, dict(n=n, vocab_size=vocab_size, seq_len=seq_len, seed=seed))


def contains_1(n: int = 10_000, vocab_size: int = 20, seq_len: int = 10, seed: int = 0) -> SyntheticDataset:
    """y=1 iff token 1 occurs; pos: a 1 at a uniform position, rest ~ V; neg: x ~ V-{1}."""
    _check(vocab_size, seq_len, 1)
    rng = np.random.default_rng(seed)
    y = _labels(n)
    X = rng.integers(1, vocab_size, size=(n, seq_len))
    neg = y == 0
    X[neg] = rng.integers(2, vocab_size, size=(int(neg.sum()), seq_len))
    pos = np.flatnonzero(y == 1)
    X[pos, rng.integers(0, seq_len, size=len(pos))] = 1
    return _finish("Contains1", X, y, rng, dict(n=n, vocab_size=vocab_size, seq_len=seq_len, seed=seed))


def contains_token_set(n: int = 10_000, token_set=(1, 2, 3), vocab_size: int = 20, seq_len: int = 15,
                       seed: int = 0) -> SyntheticDataset:
    """y=1 iff every token of token_set occurs; pos: the set at distinct uniform positions, rest ~ V; neg: not."""
    tokens = np.array(sorted(set(int(t) for t in token_set)), dtype=np.int64)
    if len(tokens) != len(tuple(token_set)) or len(tokens) == 0:
        raise ValueError(f"token_set must be non-empty and without duplicates, got {token_set}")
    if tokens.min() < 1 or tokens.max() >= vocab_size:
        raise ValueError(f"token_set must lie in 1..{vocab_size - 1}, got {token_set}")
    _check(vocab_size, seq_len, len(tokens))
    rng = np.random.default_rng(seed)
    y = _labels(n)
    X = rng.integers(1, vocab_size, size=(n, seq_len))

    def has_all(rows: np.ndarray) -> np.ndarray:
        return np.stack([(rows == t).any(axis=1) for t in tokens], axis=1).all(axis=1)

    neg = np.flatnonzero(y == 0)
    bad = neg[has_all(X[neg])]
    while len(bad):
        X[bad] = rng.integers(1, vocab_size, size=(len(bad), seq_len))
        bad = bad[has_all(X[bad])]
    for i in np.flatnonzero(y == 1):
        X[i, rng.choice(seq_len, size=len(tokens), replace=False)] = tokens
    return _finish("ContainsTokenSet", X, y, rng, dict(n=n, token_set=tokens.tolist(), vocab_size=vocab_size,
                                                       seq_len=seq_len, seed=seed))


def bin_count_ones(n: int = 10_000, num_classes: int = 2, vocab_size: int = 20, seq_len: int = 12,
                   seed: int = 0) -> SyntheticDataset:
    """y=c iff the count of 1s is in (cL/C, (c+1)L/C]; count uniform in the bin, rest ~ V-{1}, shuffled."""
    if seq_len % num_classes:
        raise ValueError(f"seq_len ({seq_len}) must be divisible by num_classes ({num_classes})")
    _check(vocab_size, seq_len, 1)
    rng = np.random.default_rng(seed)
    width = seq_len // num_classes
    y = np.repeat(np.arange(num_classes), [n // num_classes + (c < n % num_classes) for c in range(num_classes)])
    ones = rng.integers(y * width + 1, (y + 1) * width + 1)  # inclusive upper bound
    X = rng.integers(2, vocab_size, size=(n, seq_len))
    X[np.arange(seq_len)[None, :] < ones[:, None]] = 1
    X = rng.permuted(X, axis=1)
    return _finish("BinCountOnes", X, y.astype(np.int64), rng,
                   dict(n=n, num_classes=num_classes, vocab_size=vocab_size, seq_len=seq_len, seed=seed))


def ffoom(n: int = 20_000, num_features: int = 4, seed: int = 0) -> SyntheticDataset:
    """Four features, only one matters: x ~ U[0, 1)^4, y = 1[x[0] > 0.5]."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, num_features))
    y = (X[:, 0] > 0.5).astype(np.int64)
    return _finish("FFOOM", X.astype(np.float32), y, rng, dict(n=n, num_features=num_features, seed=seed))


GENERATORS: dict[str, Callable[..., SyntheticDataset]] = {
    "FirstTokenRepeatedOnce": first_token_repeated_once,
    "FirstTokenRepeatedImmediately": first_token_repeated_immediately,
    "FirstTokenRepeatedLast": first_token_repeated_last,
    "AdjacentDuplicate": adjacent_duplicate,
    "Contains1": contains_1,
    "ContainsTokenSet": contains_token_set,
    "BinCountOnes": bin_count_ones,
    "FFOOM": ffoom,
}


def make_dataset(name: str, **kwargs) -> SyntheticDataset:
    """``make_dataset("FirstTokenRepeatedOnce", n=10_000, seed=0)``."""
    if name not in GENERATORS:
        raise KeyError(f"unknown synthetic data set {name!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[name](**kwargs)

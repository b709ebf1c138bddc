"""Small, deterministic training loops for the paper's toy models (CPU friendly).

* :func:`tiny_bert` builds the ``BertForSequenceClassification`` of §5.1 (1 layer, hidden 16, 2 heads, ...).
* :func:`train_classifier` trains any ``model(X) -> logits`` with Adam + cross-entropy, mini-batches drawn
  from a seeded permutation each epoch, and reports per-epoch loss / validation accuracy and wall time.
* :func:`accuracy` evaluates in eval mode, batched.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tiny_bert(*, vocab_size: int = 20, hidden_size: int = 16, num_layers: int = 1, num_heads: int = 2,
              intermediate_size: int = 32, max_positions: int = 512, num_labels: int = 2,
              initializer_range: float = 0.02, hidden_dropout: float = 0.1, seed: int = 0):
    """The paper's BERT classifier: GELU, attention dropout 0, eager attention (so the attention is recorded as
    plain matmul/softmax operators)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size, hidden_act="gelu",
        max_position_embeddings=max_positions, num_labels=num_labels, attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=hidden_dropout, classifier_dropout=None, initializer_range=initializer_range,
        pad_token_id=0, attn_implementation="eager",
    )
    set_seed(seed)
    return BertForSequenceClassification(config)


class MLP(nn.Module):
    """``in -> hidden -> out`` with a leaky ReLU (the FFOOM model of appendix B.1)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, negative_slope: float = 0.01):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.LeakyReLU(negative_slope)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def logits_of(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Logits for token ids (HF sequence classifiers) or float features (plain modules)."""
    if X.dtype == torch.long and hasattr(model, "config"):
        return model(input_ids=X).logits
    return model(X)


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((logits_of(model, X[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


@dataclass
class TrainLog:
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)  # mean training loss per epoch
    val_accuracy: list[float] = field(default_factory=list)
    stopped_early: str = ""

    def as_dict(self) -> dict:
        return dict(epochs=self.epochs, steps=self.steps, seconds=round(self.seconds, 3), loss=self.loss,
                    val_accuracy=self.val_accuracy, stopped_early=self.stopped_early)


def train_classifier(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    time_budget_s: float | None = None,
    target_val_accuracy: float | None = None,
    on_epoch: Callable[[int, TrainLog], None] | None = None,
    before_update: Callable[[int, torch.Tensor], None] | None = None,
) -> TrainLog:
    """Adam + cross-entropy. Stops after ``epochs``, or early when the ``time_budget_s`` is spent (checked after
    every epoch) or when validation accuracy reaches ``target_val_accuracy`` (both recorded in the log).
    ``before_update(step, idx)``: called with the step's training-row indices after the backward pass and before
    the parameter update (where the paper logs its per-step statistics)."""
    X, y = train
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log = TrainLog()
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(logits_of(model, X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if before_update is not None:
                before_update(log.steps, idx)
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            log.steps += 1
        log.epochs = epoch + 1
        log.loss.append(total / max(count, 1))
        if val is not None:
            log.val_accuracy.append(accuracy(model, *val))
        log.seconds = time.perf_counter() - start
        if on_epoch is not None:
            on_epoch(epoch, log)
        if not math.isfinite(log.loss[-1]):
            log.stopped_early = "non-finite loss"
            break
        if target_val_accuracy is not None and log.val_accuracy and log.val_accuracy[-1] >= target_val_accuracy:
            log.stopped_early = f"val accuracy {log.val_accuracy[-1]:.4f} >= target {target_val_accuracy}"
            break
        if time_budget_s is not None and log.seconds >= time_budget_s and epoch + 1 < epochs:
            log.stopped_early = f"time budget {time_budget_s:.0f}s spent"
            break
    model.eval()
    return log

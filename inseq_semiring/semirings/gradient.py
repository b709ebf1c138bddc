"""The (+, x) semiring on signed local derivatives: ordinary backpropagation. Must equal ``torch.autograd.grad``."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Semiring, linear_pull


class Gradient(Semiring):
    name = "gradient"

    def seed(self, root: Tensor) -> Tensor:
        return torch.ones_like(root)

    def pull(self, kind, value: Tensor, origin) -> Tensor:
        return linear_pull(kind, value)

    def plus(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def finalize(self, value: Tensor | None, like: Tensor) -> Tensor:
        return torch.zeros_like(like) if value is None else value.to(like.dtype)

"""Repros of issue 15's silent-wrong-number cases: max |engine - autograd| of the gradient, or the error raised.

Run: ``PYTHONPATH=. python benchmarks/repro_silent_numbers.py``. Each line: case, then the max absolute difference
between the gradient semiring and ``torch.autograd.grad`` (0 = equal), or the error class and its first words.
"""

from __future__ import annotations

import torch

import inseq_semiring as isr

torch.set_num_threads(1)


class StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class TripleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return 3 * g


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


def custom(fn_cls):
    return lambda x: (fn_cls.apply(torch.tanh(x)) * x).sum()


def no_grad_block(x):
    h = torch.tanh(x)
    with torch.no_grad():
        c = h * 3
    return (c * h).sum()


def inplace(kind):
    def f(x):
        h = torch.tanh(x) * 2
        g = h + x  # add saves nothing, so autograd accepts the overwrite below
        if kind == "fill_":
            h.fill_(0.5)
        elif kind == "zero_":
            h.zero_()
        elif kind == "uniform_":
            h.uniform_()
        elif kind == "normal_":
            h.normal_()
        elif kind == "copy_(constant)":
            h.copy_(torch.full_like(h, 0.25))
        return (g * x).sum() + (h * x).sum()
    return f


CASES = {
    "custom Function: straight-through round": custom(StraightThroughRound),
    "custom Function: 3x gradient": custom(TripleGradient),
    "custom Function: gradient reversal": custom(GradientReversal),
    "no_grad block inside the forward": no_grad_block,
    **{f"in-place {k}": inplace(k) for k in ("fill_", "zero_", "uniform_", "normal_", "copy_(constant)")},
}


def main() -> None:
    for name, fn in CASES.items():
        x = torch.randn(4, 5, dtype=torch.float64)
        torch.manual_seed(1)
        xr = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(fn(xr), xr)
        torch.manual_seed(1)
        try:
            (got,) = isr.semiring_backward(fn, x, "gradient")
            print(f"{name:45s} max|engine-autograd| = {float((got - ref).abs().max()):.4g}")
        except Exception as err:  # noqa: BLE001 - the point is to show which error
            print(f"{name:45s} raises {type(err).__name__}: {str(err)[:110]}")
    try:
        with torch.inference_mode():
            isr.semiring_backward(lambda x: torch.tanh(x).sum(), torch.randn(3), "gradient")
        print(f"{'inference mode':45s} no error")
    except Exception as err:  # noqa: BLE001
        print(f"{'inference mode':45s} raises {type(err).__name__}: {str(err)[:110]}")


if __name__ == "__main__":
    main()

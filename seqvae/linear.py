"""Linear maps applied at every step of a time loop, with their weight gradients batched.

Dimensions: b batch, t time steps, i inputs, o outputs.

Autograd computes a weight's gradient at every step, as a small (o x b) @ (b x i) product,
and adds it into the running gradient: 2T small products and T full-size additions per
weight. `Affine(weight, bias)` computes the same value (sum_t g_t^T x_t) with one large
product, once the backward pass has visited every step:

    step_map = Affine(weight, bias)   # once per sequence; weight may be any (o, i) tensor,
    for t in range(T):                # e.g. columns of several modules' weights concatenated
        y = step_map(x_t)             # x_t W^T + b; backward: only dL/dx_t per step
    loss.backward()                   # at the end: dW = G^T X with G, X stacked over steps

How: `Affine` passes the weight and bias once through `_Tap`, an identity whose backward
runs after all of its consumers' (autograd's topological order). The per-step function
`_StepAffine` returns no weight gradient; it keeps (x_t, g_t) on the tap's list, and the
tap's backward turns the list into the weight and bias gradients. With gradients off, or
when the weight needs none, an Affine is a plain addmm.

Batching pays only for large weights: `_StepAffine` is a Python-level autograd Function, and
its overhead (tens of microseconds per call on a 2-core CPU) outweighs the gain for small
products. Measured on that machine (process CPU time, one thread): DRAW's LSTM weights
(1024 x 818 and 1024 x 356, batch 64) train 10% faster batched; a VRNN's maps of 400 x 100
and smaller (batch 128) 10% faster unbatched. So weights below BATCH_MIN_WEIGHTS elements
keep autograd's per-step gradient.

Under torch.compile the batching is left out: the compiled graph schedules the weight
gradients itself, and the stash (Python state mutated in backward) cannot be traced.

`StepLinear` is a module holding (weight, bias) like torch.nn.Linear (weight (o, i)); inside
`with unrolled(model):` every StepLinear of the model batches its weight gradient this way.

`BlockLinear` is a StepLinear over several inputs [x_0, ..., x_{n-1}] laid side by side
(one weight (o, sum of widths)): `block(i, x_i)` is input i's contribution alone. A model
uses it to compute the part that sees the observations for all steps at once, outside the
time loop, and the part that sees the recurrent state inside it, without touching the
layer's weights itself. Inside `unrolled(...)` the weight is sliced once per sequence.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.autograd import Function

from .gemm import affine, linear

__all__ = ["Affine", "StepLinear", "BlockLinear", "unrolled", "BATCH_MIN_WEIGHTS"]

BATCH_MIN_WEIGHTS = 1 << 18  # batch the gradient of weights with at least this many elements


class _Tap(Function):
    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, stash: list) -> tuple[Tensor, Tensor]:
        ctx.stash = stash
        ctx.dtype = weight.dtype
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), bias.view_as(bias)

    @staticmethod
    def backward(ctx, *_unused):
        stash = ctx.stash
        if not stash:
            return None, None, None
        # in the weight's dtype: under mixed precision the steps' x and g may be bfloat16 or float16
        xs = torch.cat([x.to(ctx.dtype) for x, _ in stash])  # (t*b, i)
        gs = torch.cat([g.to(ctx.dtype) for _, g in stash])  # (t*b, o)
        stash.clear()
        return gs.t() @ xs, gs.sum(0), None  # (o, i), like torch.nn.Linear's weight


class _StepAffine(Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, extra: Tensor | None, stash: list) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stash = stash
        ctx.has_extra = extra is not None
        y = affine(x, weight, bias)  # the kernel measured fastest for this shape (gemm.py)
        return y if extra is None else y.add_(extra)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        ctx.stash.append((x, g))
        gx = affine(g, weight.to(g.dtype).t()) if ctx.needs_input_grad[0] else None  # autocast may have run forward in bf16
        return gx, None, None, (g if ctx.has_extra else None), None


class Affine:
    """x W^T + b (+ extra) at every step of a loop, with the weight gradient batched.

    weight (o, i) and bias (o,) may be any tensors (parameters, slices or concatenations
    of parameters); create the Affine once per sequence, call it at every step with
    x (b, i) and an optional extra (b, o) term added to the result. batch_grad: force the
    batched weight gradient on or off; None batches weights of BATCH_MIN_WEIGHTS or more.
    """

    def __init__(self, weight: Tensor, bias: Tensor, *, batch_grad: bool | None = None):
        if batch_grad is None:
            batch_grad = weight.numel() >= BATCH_MIN_WEIGHTS
        self.batched = batch_grad and torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad)
        if self.batched:
            self.stash: list = []
            self.weight, self.bias = _Tap.apply(weight, bias, self.stash)
        else:
            self.weight, self.bias = weight, bias

    def __call__(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        if self.batched and torch.is_grad_enabled():
            return _StepAffine.apply(x, self.weight, self.bias, extra, self.stash)
        return torch.addmm(self.bias if extra is None else extra + self.bias, x, self.weight.t())


class StepLinear(nn.Module):
    """y = x W^T + b (+ extra), with W stored (out, in) like torch.nn.Linear.

    Inside `unrolled(...)` its weight gradient is batched over the steps of the loop
    (see the module docstring); elsewhere it is an ordinary linear layer, also for inputs
    with leading time dimensions (..., in).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0  # torch.nn.Linear's init
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        self._affine: Affine | None = None

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        """x (..., in) -> (..., out); extra (..., out), if given, is added."""
        if x.dim() == 2:
            if self._affine is not None:
                return self._affine(x, extra)
            return torch.addmm(self.bias if extra is None else extra + self.bias, x, self.weight.t())
        y = linear(x, self.weight, self.bias)  # batched over steps: measured kernels for large products
        return y if extra is None else y + extra

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BlockLinear(StepLinear):
    """y = [x_0, ..., x_{n-1}] W^T + b over inputs of widths in_sizes; W is (out, sum in_sizes).

    Initialised exactly as a StepLinear(sum(in_sizes), out). forward(x) takes the inputs
    concatenated; block(i, x_i, bias=False) = x_i W_i^T (+ b), so that the blocks of all the
    inputs, plus b once, add up to forward.
    """

    def __init__(self, in_sizes: list[int] | tuple[int, ...], out_features: int):
        super().__init__(sum(in_sizes), out_features)
        self.in_sizes = tuple(int(n) for n in in_sizes)
        ends = [sum(self.in_sizes[: i + 1]) for i in range(len(self.in_sizes))]
        self._slices = [slice(e - n, e) for e, n in zip(ends, self.in_sizes)]
        self._block_weights: list[Tensor] | None = None

    def block(self, i: int, x: Tensor, *, bias: bool = False) -> Tensor:
        """Input i's contribution x_i W_i^T, (..., out); with bias=True plus b."""
        w = self._block_weights[i] if self._block_weights is not None else self.weight[:, self._slices[i]]
        if x.dim() == 2:
            return torch.addmm(self.bias, x, w.t()) if bias else x @ w.t()
        return linear(x, w, self.bias if bias else None)

    def extra_repr(self) -> str:
        return f"in_sizes={self.in_sizes}, out_features={self.out_features}"


@contextmanager
def unrolled(*modules: nn.Module) -> Iterator[None]:
    """Batch the weight gradients of every StepLinear in `modules` for the loop inside."""
    if torch.compiler.is_compiling():  # a compiled graph accumulates weight gradients itself
        yield
        return
    layers = [m for module in modules for m in module.modules() if isinstance(m, StepLinear)]
    try:
        for layer in layers:
            layer._affine = Affine(layer.weight, layer.bias)
            if isinstance(layer, BlockLinear):  # slice once per sequence, not once per step
                layer._block_weights = [layer.weight[:, s] for s in layer._slices]
        yield
    finally:
        for layer in layers:
            layer._affine = None
            if isinstance(layer, BlockLinear):
                layer._block_weights = None

"""Small feed-forward networks: feature extractors and the nets that parameterise densities.

Dimensions: b batch, t time, i inputs, f features, z latent units.

A network whose first layer sees several inputs side by side (for example [phi_x(x_t),
h_{t-1}]) takes `in_sizes` and exposes its first layer in pieces: `project(i, x_i)` is
input i's contribution to the first layer's pre-activation and `finish(pre)` runs the rest
of the network from the summed pre-activation. A model computes the pieces that see only
the observations for all steps at once, outside its time loop:

    pre_x = net.project(0, features, bias=True)        # (t, b, f), once per sequence
    out_t = net.finish(pre_x[t] + net.project(1, h))   # inside the loop
          = net(torch.cat([features[t], h], -1))       # the same value
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from . import native
from .gemm import affine
from .linear import BlockLinear, StepLinear

__all__ = ["MLP", "MLPHead", "GaussianNet", "MIN_STD"]

MIN_STD = 1e-4  # added to every softplus standard deviation, so that it never reaches zero


def first_order_only(backward):
    """For a hand-written backward (the CPU fast path's: _Chain, fused.py's passes): run it without
    recording a graph, as torch's once_differentiable does, and, where the backward itself records
    one (create_graph=True), return gradients that refuse to be differentiated again, always
    (once_differentiable does so only when the incoming gradients require grad; otherwise autograd
    would take the gradients for constants, and second derivatives would come out silently wrong)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        refuse = torch._C._functions.DelayedError(
            b"seqvae: trying to differentiate twice through the hand-written backward of the CPU fast path; "
            b"set SEQVAE_FUSED=0 for autograd's own step loop", len(outputs))
        return refuse(*[None if v is None else v.detach().requires_grad_() for v in outputs])

    return wrapper


class _Chain(Function):
    """A network's layers over inputs batched over steps, (..., in), as one Function.

    relu(...relu([x_0, x_1, ...] W_0^T + b_0)...) W_L^T + b_L (and a last ReLU with last_relu),
    the first layer's inputs given one tensor each (their blocks of W_0's columns). Autograd
    would keep each layer's product, bias sum, ReLU and (for several inputs) their sum as
    separate nodes with separate outputs; here the ReLUs act in place on the products'
    outputs, the inputs' products add into one output, and the backward reuses its gradient
    buffer for the ReLUs' gradients. Forward products and the inputs' gradients use the
    kernels gemm.py measured fastest (`affine`).
    """

    @staticmethod
    def forward(ctx, slices: tuple, last_relu: bool, *args: Tensor) -> Tensor:
        n = len(slices)  # the first layer's inputs: their columns of W_0
        inputs, params = args[:n], args[n:]
        xs = [x.reshape(-1, x.shape[-1]) for x in inputs]
        native = _native(xs[0])
        weights, biases = params[0::2], params[1::2]
        acts = []  # each hidden layer's ReLU output (the next layer's input)
        for i, (w, b) in enumerate(zip(weights, biases)):
            relu = last_relu or i < len(weights) - 1
            bias = None if native is not None else b  # C++: added after the product, in one pass with the ReLU
            if i == 0:
                a = affine(xs[0], w[:, slices[0]], bias)
                for x, s in zip(xs[1:], slices[1:]):
                    torch.addmm(a, x, w[:, s].t(), out=a)  # (= a.addmm_, in place; as addmm, FLOP counters see it)
            else:
                acts.append(a)
                a = affine(a, w, bias)
            if native is not None:
                native.bias_act(a, b.contiguous(), relu)
            elif relu:
                a.relu_()
        ctx.slices, ctx.last_relu, ctx.shapes, ctx.native = slices, last_relu, [x.shape for x in inputs], native
        ctx.save_for_backward(*xs, *acts, *weights, *([a] if last_relu else []))
        return a  # (rows, out): viewed (..., out) outside, so that the view may be changed in place

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        n, native = len(ctx.slices), ctx.native
        saved = ctx.saved_tensors
        layers = (len(ctx.needs_input_grad) - 2 - n) // 2
        xs, acts, ws = saved[:n], saved[n : n + layers - 1], saved[n + layers - 1 : n + 2 * layers - 1]
        needs = ctx.needs_input_grad[2:]
        g = grad.reshape(-1, grad.shape[-1])
        if ctx.last_relu:
            g = torch.ops.aten.threshold_backward(g, saved[-1], 0)
        gb = g.sum(0) if needs[n + 2 * layers - 1] else None  # the last layer's bias
        param_grads: list = []
        for i in reversed(range(1, layers)):
            w, act = ws[i], acts[i - 1]
            gw = g.t() @ act if needs[n + 2 * i] else None
            param_grads = [gw, gb] + param_grads
            if not any(needs[: n + 2 * i]):  # nothing below this layer needs a gradient (frozen layers)
                return None, None, *([None] * (n + 2 * i)), *param_grads
            g = affine(g, w.t())
            if native is not None:  # ReLU's gradient in place and the bias's gradient, in one pass
                gb = native.grad_colsum(g, act)
            else:
                torch.ops.aten.threshold_backward.grad_input(g, act, 0, grad_input=g)  # in place
                gb = g.sum(0)
            gb = gb if needs[n + 2 * i - 1] else None
        gw0 = None
        if needs[n]:
            gw0 = g.t() @ xs[0] if n == 1 else torch.cat([g.t() @ x for x in xs], 1)
        gxs = [affine(g, ws[0][:, s].t()).view(shape) if needs[i] else None
               for i, (s, shape) in enumerate(zip(ctx.slices, ctx.shapes))]
        return None, None, *gxs, gw0, gb, *param_grads


def _native(x: Tensor):
    """The C++ helpers for a plain float CPU tensor, or None (ATen's operations)."""
    return native.helpers_for(x)


def _chained(inputs: tuple, layers, last_relu: bool) -> bool:
    """Whether to run the layers as one _Chain: inputs batched over steps (3-D or more) with the
    same leading dimensions (the layers' own path broadcasts others), at least one layer, and
    neither autocast (which casts per operation), a compiled graph (which fuses itself), a
    torch.func transform (vmap, grad, jvp) nor forward-mode AD (_Chain has a hand-written
    first-order backward only, whose gradients refuse to be differentiated again, and no
    forward-mode rule), nor SEQVAE_FUSED=0 (autograd's own path)."""
    x = inputs[0]
    return (x.dim() >= 3 and len(layers) > 0 and all(t.shape[:-1] == x.shape[:-1] for t in inputs[1:])
            and os.environ.get("SEQVAE_FUSED", "1") != "0"
            and not torch.is_autocast_enabled(x.device.type) and native.hand_written_ok()
            and all(isinstance(layer, StepLinear) for layer in layers))


def _chain(inputs: tuple, layers, last_relu: bool) -> Tensor:
    """The layers as one _Chain; the first layer's inputs as BlockLinear splits its columns."""
    first = layers[0]
    slices = tuple(first._slices) if isinstance(first, BlockLinear) and len(inputs) > 1 else (slice(None),)
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    out = _Chain.apply(slices, last_relu, *inputs, *params)
    return out.view(*inputs[0].shape[:-1], out.shape[-1])


class MLP(nn.Module):
    """Linear layers with a ReLU after each: sizes [in, h1, h2, ...]."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(StepLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        if _chained((x,), self.layers, True):
            return _chain((x,), self.layers, True)
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


class MLPHead(nn.Module):
    """ReLU hidden layers then a linear output: inputs of widths in_sizes, then sizes [h1, ..., out]."""

    def __init__(self, in_sizes: list[int], sizes: list[int]):
        super().__init__()
        first = BlockLinear(in_sizes, sizes[0])
        self.layers = nn.ModuleList([first, *(StepLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))])

    def forward(self, x: Tensor) -> Tensor:
        """x (..., sum in_sizes), the inputs concatenated."""
        if _chained((x,), self.layers, False):
            return _chain((x,), self.layers, False)
        return self.finish(self.layers[0](x))

    def project(self, i: int, x: Tensor, *, bias: bool = False) -> Tensor:
        """Input i's contribution to the first layer's pre-activation (with its bias if bias=True)."""
        return self.layers[0].block(i, x, bias=bias)

    def over(self, *inputs: Tensor) -> Tensor:
        """The network on its inputs given one tensor each, (..., in_sizes[i]): forward(cat(inputs))
        without the concatenated copy (for inputs batched over every step, a sizeable one)."""
        if _chained(inputs, self.layers, False):
            return _chain(inputs, self.layers, False)
        first = self.project(0, inputs[0], bias=True)
        for i, x in enumerate(inputs[1:], 1):
            first = first + self.project(i, x)
        return self.finish(first)

    def finish(self, first: Tensor) -> Tensor:
        """The rest of the network given the first layer's pre-activation."""
        x = first
        for layer in self.layers[1:]:
            x = layer(F.relu(x))
        return x


class GaussianNet(nn.Module):
    """An MLP whose output is the mean and standard deviation of a diagonal Gaussian:
    [loc, softplus(.) + MIN_STD]; `project`/`finish` as for MLPHead."""

    def __init__(self, in_sizes: list[int], hidden: list[int], z_size: int):
        super().__init__()
        self.net = MLPHead(in_sizes, [*hidden, 2 * z_size])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.net(x))

    def project(self, i: int, x: Tensor, *, bias: bool = False) -> Tensor:
        return self.net.project(i, x, bias=bias)

    def finish(self, first: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.net.finish(first))

    @staticmethod
    def _split(out: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw = out.chunk(2, dim=-1)
        # softplus on a contiguous copy of the half: on the strided half ATen's kernel took 11x
        # as long (a (28, 128, 16) half on a 2-core Intel Xeon VM: 800 vs 70 us)
        return loc, F.softplus(raw.contiguous()) + MIN_STD

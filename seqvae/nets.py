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

__all__ = ["MLP", "MLPHead", "GaussianNet", "heads_over", "MIN_STD"]

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
    """Networks' layers over inputs batched over steps, (..., in), as one Function.

    `plan` gives each network as (uses, last_relu, layers): relu(...relu([x_i, x_j, ...] W_0^T
    + b_0)...) W_L^T + b_L (and a last ReLU with last_relu), its first layer reading the inputs
    `uses` names, (input index, the block of W_0's columns that reads it), one tensor each (an
    index at most once per network: a network reading one tensor twice is given it as two inputs).
    Autograd would keep each layer's product, bias sum, ReLU and (for several inputs) their sum
    as separate nodes with separate outputs; here the ReLUs act in place on the products'
    outputs, the inputs' products add into one output, and the backward reuses its gradient
    buffers for the ReLUs' gradients. Networks that read the same input (a VRNN's decoder and
    prior both read h_{t-1}) share its products: one for all their first layers' blocks of it
    in the forward, one for its gradient and one for those blocks' weights' gradient in the
    backward, their first layers' outputs and gradients side by side in one buffer (a product
    each, and autograd's sum of the two gradients of h, took ~0.5 ms more of a T = 28 VRNN
    step's 3,584-row products: measured). Forward products and the inputs' gradients use the
    kernels gemm.py measured fastest (`affine`) where they make a new tensor.
    """

    @staticmethod
    def forward(ctx, plan: tuple, *args: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # (an unused network's output gets no gradient)
        n_in = 1 + max(j for uses, _, _ in plan for j, _ in uses)
        assert all(len({j for j, _ in uses}) == len(uses) for uses, _, _ in plan), "an input read twice by one network"
        xs = [x.reshape(-1, x.shape[-1]) for x in args[:n_in]]
        native = _native(xs[0])
        nets = _split_params(plan, args[n_in:])  # each network's [(W, b), ...]
        blocks = _blocks([net[0][0].shape[0] for net in nets])  # their columns of the first layers' outputs
        groups = _groups(plan, n_in)
        pre, written, stacks = None, [False] * len(plan), []
        for j, readers in groups:  # the first layers: a product per input and run of networks reading it
            ks = [k for k, _ in readers]
            w = torch.cat([nets[k][0][0][:, s] for k, s in readers]) if len(ks) > 1 else nets[ks[0]][0][0][:, readers[0][1]]
            stacks.append(w)
            cols = slice(blocks[ks[0]].start, blocks[ks[-1]].stop)
            if pre is None and cols == slice(0, blocks[-1].stop):
                pre = affine(xs[j], w)  # (the first product spans every network's columns: a new tensor)
            else:
                pre = xs[0].new_empty(xs[0].shape[0], blocks[-1].stop) if pre is None else pre
                if all(written[k] for k in ks):
                    pre[:, cols].addmm_(xs[j], w.t())
                elif not any(written[k] for k in ks):
                    torch.mm(xs[j], w.t(), out=pre[:, cols])
                else:  # some of the run's columns written already: network by network
                    for k, s in readers:
                        x_w = nets[k][0][0][:, s].t()
                        pre[:, blocks[k]].addmm_(xs[j], x_w) if written[k] else torch.mm(xs[j], x_w, out=pre[:, blocks[k]])
            for k in ks:
                written[k] = True
        outs, saved, lasts = [], [], []
        for k, (uses, last_relu, layers) in enumerate(plan):
            a = pre if len(plan) == 1 else pre[:, blocks[k]]
            for i, (w, b) in enumerate(nets[k]):
                relu = last_relu or i < layers - 1
                if i > 0:
                    saved.append(a)  # each hidden layer's ReLU output (the next layer's input)
                    a = affine(a, w, None if native is not None else b)
                if native is not None:  # C++: the bias added after the product, in one pass with the ReLU
                    native.bias_act(a, b.contiguous(), relu)
                else:
                    if i == 0:
                        a.add_(b)
                    if relu:
                        a.relu_()
            if layers == 1 and len(plan) > 1:  # an output is no view of the shared buffer (it may be changed in place)
                a = a.clone()
            if last_relu:
                lasts.append(a)
            outs.append(a)
        ctx.plan, ctx.native, ctx.shapes, ctx.blocks, ctx.groups = plan, native, [x.shape for x in args[:n_in]], blocks, groups
        ctx.save_for_backward(*xs, *saved, *[w for net in nets for w, _ in net], *stacks, *lasts)
        return tuple(outs)  # (rows, out) each: viewed (..., out) outside, so that the view may be changed in place

    @staticmethod
    @first_order_only
    def backward(ctx, *grads: Tensor | None):
        plan, native, blocks, groups = ctx.plan, ctx.native, ctx.blocks, ctx.groups
        n_in = len(ctx.shapes)
        saved = iter(ctx.saved_tensors)
        xs = [next(saved) for _ in range(n_in)]
        acts = [[next(saved) for _ in range(layers - 1)] for _, _, layers in plan]
        ws = [[next(saved) for _ in range(layers)] for _, _, layers in plan]
        stacks = [next(saved) for _ in groups]
        lasts = [next(saved) if last_relu else None for _, last_relu, _ in plan]
        needs_x, needs_p = ctx.needs_input_grad[1 : 1 + n_in], ctx.needs_input_grad[1 + n_in :]
        firsts = [sum(2 * layers for *_, layers in plan[:k]) for k in range(len(plan))]  # each network's W_0's index
        gpre = None  # the first layers' pre-activations' gradients, side by side (blocks)
        param_grads: list = [None] * len(needs_p)
        reached = [False] * len(plan)  # whether a network's gradient reaches its first layer
        for k, (uses, last_relu, layers) in enumerate(plan):
            g, p0 = grads[k], firsts[k]
            need = needs_p[p0 : p0 + 2 * layers]
            below = any(needs_x[j] for j, _ in uses)  # an input below the first layer needs a gradient
            if g is None:
                continue
            g = g.reshape(-1, g.shape[-1])
            if last_relu and native is not None and g.stride(-1) == 1:  # C++: ReLU's gradient and the bias's in one pass
                out = g.new_empty(g.shape)  # (autograd's incoming gradient is not changed in place)
                gb = native.grad_colsum(g, lasts[k], out)
                g = out
            else:
                if last_relu:
                    g = torch.ops.aten.threshold_backward(g, lasts[k], 0)
                gb = g.sum(0) if need[-1] else None  # the last layer's bias
            for i in reversed(range(1, layers)):
                param_grads[p0 + 2 * i] = g.t() @ acts[k][i - 1] if need[2 * i] else None
                param_grads[p0 + 2 * i + 1] = gb if need[2 * i + 1] else None
                if not (below or any(need[: 2 * i])):  # nothing below this layer needs a gradient (frozen layers)
                    break
                if i == 1 and len(plan) > 1:  # the first layer's gradient into its block of the shared buffer
                    gpre = xs[0].new_empty(xs[0].shape[0], blocks[-1].stop) if gpre is None else gpre
                    g = torch.mm(g, ws[k][1], out=gpre[:, blocks[k]])
                else:
                    g = affine(g, ws[k][i].t())
                if native is not None:  # ReLU's gradient in place and the bias's gradient, in one pass
                    gb = native.grad_colsum(g, acts[k][i - 1])
                else:
                    torch.ops.aten.threshold_backward.grad_input(g, acts[k][i - 1], 0, grad_input=g)  # in place
                    gb = g.sum(0)
            else:  # the loop reached the first layer
                if len(plan) == 1:  # (one network: its gradient is the buffer; it is only read below)
                    gpre = g
                elif layers == 1:
                    gpre = xs[0].new_empty(xs[0].shape[0], blocks[-1].stop) if gpre is None else gpre
                    gpre[:, blocks[k]] = g
                param_grads[p0 + 1] = gb if need[1] else None
                reached[k] = True
        if gpre is None:
            return None, *([None] * n_in), *param_grads
        for k in range(len(plan)):
            if not reached[k]:
                gpre[:, blocks[k]] = 0  # (read by the products of an input it shares)
        # each input's gradient and its first-layer blocks' weights': a product each per run of networks
        gxs: list = [None] * n_in
        w_grads: dict = {}  # (network, input) -> the gradient of the network's W_0 block reading it
        for (j, readers), w in zip(groups, stacks):
            ks = [k for k, _ in readers]
            if not any(reached[k] for k in ks):
                continue
            g = gpre[:, blocks[ks[0]].start : blocks[ks[-1]].stop]
            if needs_x[j]:
                gx = affine(g, w.t())
                gxs[j] = gx if gxs[j] is None else gxs[j].add_(gx)
            if any(reached[k] and needs_p[firsts[k]] for k in ks):
                gw = g.t() @ xs[j]
                start = 0
                for k in ks:
                    n = ws[k][0].shape[0]
                    w_grads[k, j] = gw[start : start + n]
                    start += n
        for k, (uses, _, _) in enumerate(plan):
            if reached[k] and needs_p[firsts[k]]:
                parts = [w_grads[k, j] for j, _ in uses]
                param_grads[firsts[k]] = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return None, *[None if g is None else g.view(shape) for g, shape in zip(gxs, ctx.shapes)], *param_grads


def _split_params(plan: tuple, params) -> list[list[tuple[Tensor, Tensor]]]:
    """Each network's [(W, b), ...] from the flat parameters."""
    nets, i = [], 0
    for _, _, layers in plan:
        nets.append([(params[i + 2 * l], params[i + 2 * l + 1]) for l in range(layers)])
        i += 2 * layers
    return nets


def _blocks(widths: list[int]) -> list[slice]:
    """Each network's columns of the first layers' outputs (or their gradients), side by side."""
    ends = [sum(widths[: k + 1]) for k in range(len(widths))]
    return [slice(end - width, end) for width, end in zip(widths, ends)]


def _groups(plan: tuple, n_in: int) -> list[tuple[int, list[tuple[int, slice]]]]:
    """The first layers' products: for each input, each run of consecutive networks reading it,
    [(network, its W_0 columns for the input)] (one product over their blocks, side by side),
    the longest runs first (a run's product writes its networks' blocks, later ones add to them)."""
    groups = []
    for j in range(n_in):
        run: list = []
        for k, (uses, _, _) in enumerate(plan):
            s = next((s for i, s in uses if i == j), None)
            if s is not None and (not run or run[-1][0] == k - 1):
                run.append((k, s))
            elif s is not None:
                groups.append((j, run))
                run = [(k, s)]
        if run:
            groups.append((j, run))
    return sorted(groups, key=lambda group: -len(group[1]))


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


def _chain(calls: tuple, last_relu: bool = False) -> list[Tensor]:
    """Networks [(layers, inputs)] as one _Chain (inputs given as the same tensor shared); the
    first layer's inputs as BlockLinear splits its columns."""
    inputs: list[Tensor] = []
    plan, params = [], []
    for layers, xs in calls:
        first = layers[0]
        slices = tuple(first._slices) if isinstance(first, BlockLinear) and len(xs) > 1 else (slice(None),)
        ids = []
        for x in xs:
            j = next((i for i, t in enumerate(inputs) if t is x and i not in ids), None)  # (read twice: two inputs)
            if j is None:
                j = len(inputs)
                inputs.append(x)
            ids.append(j)
        plan.append((tuple(zip(ids, slices)), last_relu, len(layers)))
        params += [p for layer in layers for p in (layer.weight, layer.bias)]
    outs = _Chain.apply(tuple(plan), *inputs, *params)
    return [out.view(*inputs[0].shape[:-1], out.shape[-1]) for out in outs]


def heads_over(*calls: tuple) -> list[Tensor]:
    """Several MLPHeads each over its inputs, [(head, (x_0, x_1, ...))] -> their outputs: as one
    _Chain where it applies, in which heads given the same tensor (a VRNN's decoder and prior,
    both over h_{t-1}) share its products; otherwise head.over(*inputs) each."""
    if all(_chained(xs, head.layers, False) for head, xs in calls) and all(
            xs[0].shape[:-1] == calls[0][1][0].shape[:-1] for _, xs in calls):
        return _chain(tuple((head.layers, xs) for head, xs in calls))
    return [head.over(*xs) for head, xs in calls]


class MLP(nn.Module):
    """Linear layers with a ReLU after each: sizes [in, h1, h2, ...]."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(StepLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        if _chained((x,), self.layers, True):
            return _chain(((self.layers, (x,)),), True)[0]
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
            return _chain(((self.layers, (x,)),))[0]
        return self.finish(self.layers[0](x))

    def project(self, i: int, x: Tensor, *, bias: bool = False) -> Tensor:
        """Input i's contribution to the first layer's pre-activation (with its bias if bias=True)."""
        return self.layers[0].block(i, x, bias=bias)

    def over(self, *inputs: Tensor) -> Tensor:
        """The network on its inputs given one tensor each, (..., in_sizes[i]): forward(cat(inputs))
        without the concatenated copy (for inputs batched over every step, a sizeable one)."""
        if _chained(inputs, self.layers, False):
            return _chain(((self.layers, inputs),))[0]
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
        return self.split(self.net(x))

    def project(self, i: int, x: Tensor, *, bias: bool = False) -> Tensor:
        return self.net.project(i, x, bias=bias)

    def finish(self, first: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.net.finish(first))

    @staticmethod
    def split(out: Tensor) -> tuple[Tensor, Tensor]:
        """[loc, softplus(.) + MIN_STD] from the network's output."""
        loc, raw = out.chunk(2, dim=-1)
        # softplus on a contiguous copy of the half: on the strided half ATen's kernel took 11x
        # as long (a (28, 128, 16) half on a 2-core Intel Xeon VM: 800 vs 70 us)
        return loc, F.softplus(raw.contiguous()) + MIN_STD

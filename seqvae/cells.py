"""Recurrent cells whose gates come from one matrix product per step.

Dimensions: b batch, t time, i input features, d hidden units, g gate pre-activations.

A cell follows one contract: `cell(inputs, state) -> state`, with the state a
`CellState(h, c)` (c is None for the GRU). The maths are the standard cells, equal to
torch.nn.LSTMCell / torch.nn.GRUCell (see the tests):

    LSTM: i, f, o = sigmoid(.), g = tanh(.), c' = f c + i g, h' = o tanh(c')
    GRU:  r, u = sigmoid(W_ir x + W_hr h + b), n = tanh(W_in x + b_in + r (W_hn h + b_hn)),
          h' = (1 - u) n + u h

A cell's input may be several blocks side by side (`input_sizes`, e.g. [phi_x, phi_z] for
the VRNN). For models that keep only the state-dependent work inside the time loop, the
gate pre-activations come in pieces that add up to the whole:

    gi = sum_j cell.input_gates(j, x_j, bias=(j == 0))   # a block that does not depend on the
                                                          # state can be computed for all steps
    gh = cell.hidden_gates(h)                             # inside the loop
    state = cell.update(gi, gh, state)                    # the elementwise update

Their linear maps are `BlockLinear`/`StepLinear`s, so inside `unrolled(...)` the large weight
gradients are computed once per sequence (linear.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .linear import BlockLinear, StepLinear

__all__ = ["CellState", "LSTMCell", "GRUCell", "lstm_update", "gru_update", "make_cell", "CELLS"]

CELLS = ("lstm", "gru")


class CellState(NamedTuple):
    h: Tensor  # (b, d)
    c: Tensor | None = None  # (b, d) LSTM memory; None for a GRU


def lstm_update(gates: Tensor, c: Tensor) -> CellState:
    """The LSTM's elementwise update from gate pre-activations (b, 4d) = (i, f, o, g)."""
    d = c.shape[-1]
    sig, g = gates.split([3 * d, d], dim=-1)
    i, f, o = torch.sigmoid(sig).chunk(3, dim=-1)
    c = torch.addcmul(f * c, i, torch.tanh(g))
    return CellState(o * torch.tanh(c), c)


def gru_update(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """The GRU's update from gi = W_i x + b_i and gh = W_h h + b_h, each (b, 3d) = (r, u, n)."""
    d = h.shape[-1]
    gi_ru, gi_n = gi.split([2 * d, d], dim=-1)
    gh_ru, gh_n = gh.split([2 * d, d], dim=-1)
    r, u = torch.sigmoid(gi_ru + gh_ru).chunk(2, dim=-1)
    n = torch.tanh(torch.addcmul(gi_n, r, gh_n))
    # (1 - u) n + u h, in the state's dtype: under mixed precision the gates may be bfloat16
    # while the state stays float32, and a state keeps one dtype from step to step
    return torch.lerp(n.to(h.dtype), h, u.to(h.dtype))


def _uniform_init_(layer: StepLinear, hidden_size: int) -> None:
    bound = 1.0 / math.sqrt(hidden_size)  # torch.nn.LSTMCell's / GRUCell's initialisation
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.uniform_(layer.bias, -bound, bound)


def _sizes(input_sizes: int | Sequence[int]) -> list[int]:
    return [int(input_sizes)] if isinstance(input_sizes, int) else [int(n) for n in input_sizes]


class LSTMCell(nn.Module):
    """LSTM cell with forget gate; gates in the order (input, forget, output, cell).

    One linear map over [inputs..., h]: weight (4d, i + d), input columns first.
    """

    def __init__(self, input_sizes: int | Sequence[int], hidden_size: int):
        super().__init__()
        sizes = _sizes(input_sizes)
        self.input_size, self.hidden_size = sum(sizes), hidden_size
        self.linear = BlockLinear([*sizes, hidden_size], 4 * hidden_size)
        _uniform_init_(self.linear, hidden_size)

    def initial_state(self, batch_size: int, like: Tensor) -> CellState:
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return CellState(zeros, zeros)

    def forward(self, inputs: Tensor | list[Tensor], state: CellState) -> CellState:
        """inputs (b, i), or a list of tensors whose widths add up to i (concatenated once, with h)."""
        parts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        return lstm_update(self.linear(torch.cat([*parts, state.h], dim=1)), state.c)

    def input_gates(self, i: int, x: Tensor, *, bias: bool = False) -> Tensor:
        """Input block i's share of the gate pre-activations (the cell's bias with bias=True)."""
        return self.linear.block(i, x, bias=bias)

    def hidden_gates(self, h: Tensor) -> Tensor:
        return self.linear.block(len(self.linear.in_sizes) - 1, h)

    def update(self, gi: Tensor, gh: Tensor, state: CellState) -> CellState:
        return lstm_update(gi + gh, state.c)


class GRUCell(nn.Module):
    """GRU cell (Cho et al. 2014, the torch.nn.GRUCell variant); gates (reset, update, new)."""

    def __init__(self, input_sizes: int | Sequence[int], hidden_size: int):
        super().__init__()
        sizes = _sizes(input_sizes)
        self.input_size, self.hidden_size = sum(sizes), hidden_size
        self.ih = BlockLinear(sizes, 3 * hidden_size)
        self.hh = StepLinear(hidden_size, 3 * hidden_size)
        _uniform_init_(self.ih, hidden_size)
        _uniform_init_(self.hh, hidden_size)

    def initial_state(self, batch_size: int, like: Tensor) -> CellState:
        return CellState(like.new_zeros(batch_size, self.hidden_size))

    def forward(self, inputs: Tensor | list[Tensor], state: CellState) -> CellState:
        x = torch.cat(list(inputs), dim=1) if isinstance(inputs, (list, tuple)) else inputs
        return CellState(gru_update(self.ih(x), self.hh(state.h), state.h))

    def input_gates(self, i: int, x: Tensor, *, bias: bool = False) -> Tensor:
        """Input block i's share of W_i x + b_i (b_i with bias=True)."""
        return self.ih.block(i, x, bias=bias)

    def hidden_gates(self, h: Tensor) -> Tensor:
        return self.hh(h)

    def update(self, gi: Tensor, gh: Tensor, state: CellState) -> CellState:
        return CellState(gru_update(gi, gh, state.h))


def make_cell(name: str, input_sizes: int | Sequence[int], hidden_size: int) -> nn.Module:
    """A recurrent cell by name: "lstm" or "gru"."""
    if name not in CELLS:
        raise ValueError(f"unknown recurrent cell {name!r}: expected one of {', '.join(CELLS)}")
    return (LSTMCell if name == "lstm" else GRUCell)(input_sizes, hidden_size)

"""Recurrent cells whose gates come from one matrix product per step.

Dimensions: b batch, t time, i input features, d hidden units, g gate pre-activations.

Every cell follows one contract: `cell(inputs, state, extra=None) -> state` with the state a
`CellState(h, c)` (c is None for the GRU). `extra` (b, g) is an optional pre-computed
contribution to the gate pre-activations. The maths are the standard cells, equal to
torch.nn.LSTMCell / torch.nn.GRUCell (see the tests):

    LSTM: i, f, o = sigmoid(.), g = tanh(.), c' = f c + i g, h' = o tanh(c')
    GRU:  r, u = sigmoid(W_ir x + W_hr h + b), n = tanh(W_in x + b_in + r (W_hn h + b_hn)),
          h' = (1 - u) n + u h

For models that keep only the state-dependent work inside the time loop, a cell exposes its
weights in pieces: `cell.parts(n_outside)` splits the input columns into the first
`n_outside` inputs (to be projected for all steps at once, outside the loop), the remaining
inputs (projected inside the loop) and the hidden state; `cell.update(gi, gh, state)`
applies the elementwise update to the two projections. Their linear maps are `StepLinear`s,
so inside `unrolled(...)` their weight gradients are computed once per sequence (linear.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .linear import StepLinear

__all__ = ["CellState", "CellParts", "LSTMCell", "GRUCell", "lstm_update", "gru_update", "make_cell", "CELLS"]

CELLS = ("lstm", "gru")


class CellState(NamedTuple):
    h: Tensor  # (b, d)
    c: Tensor | None = None  # (b, d) LSTM memory; None for a GRU


class CellParts(NamedTuple):
    """gates = x_out W_out^T + b_out + x_in W_in^T, and h W_h^T + b_h (see update)."""

    w_outside: Tensor  # (g, n_outside)
    b_outside: Tensor  # (g,)
    w_inside: Tensor  # (g, i - n_outside)
    w_hidden: Tensor  # (g, d)
    b_hidden: Tensor  # (g,)


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
    return torch.lerp(n, h, u)  # (1 - u) n + u h


def _uniform_init_(layer: StepLinear, hidden_size: int) -> None:
    bound = 1.0 / math.sqrt(hidden_size)  # torch.nn.LSTMCell's / GRUCell's initialisation
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.uniform_(layer.bias, -bound, bound)


class LSTMCell(nn.Module):
    """LSTM cell with forget gate; gates in the order (input, forget, output, cell).

    One linear map over [inputs, h]: weight (4d, i + d), input columns first.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.linear = StepLinear(input_size + hidden_size, 4 * hidden_size)
        _uniform_init_(self.linear, hidden_size)

    def initial_state(self, batch_size: int, like: Tensor) -> CellState:
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return CellState(zeros, zeros)

    def forward(self, inputs: Tensor | list[Tensor], state: CellState, extra: Tensor | None = None) -> CellState:
        """inputs (b, i), or a list of tensors whose widths add up to i (concatenated once, with h)."""
        parts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        return lstm_update(self.linear(torch.cat([*parts, state.h], dim=1), extra), state.c)

    def parts(self, n_outside: int) -> CellParts:
        w, i = self.linear.weight, self.input_size
        return CellParts(w[:, :n_outside], self.linear.bias, w[:, n_outside:i], w[:, i:], w.new_zeros(w.shape[0]))

    def update(self, gi: Tensor, gh: Tensor, state: CellState) -> CellState:
        return lstm_update(gi + gh, state.c)


class GRUCell(nn.Module):
    """GRU cell (Cho et al. 2014, the torch.nn.GRUCell variant); gates (reset, update, new)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.ih = StepLinear(input_size, 3 * hidden_size)
        self.hh = StepLinear(hidden_size, 3 * hidden_size)
        _uniform_init_(self.ih, hidden_size)
        _uniform_init_(self.hh, hidden_size)

    def initial_state(self, batch_size: int, like: Tensor) -> CellState:
        return CellState(like.new_zeros(batch_size, self.hidden_size))

    def forward(self, inputs: Tensor, state: CellState, extra: Tensor | None = None) -> CellState:
        return CellState(gru_update(self.ih(inputs, extra), self.hh(state.h), state.h))

    def parts(self, n_outside: int) -> CellParts:
        w = self.ih.weight
        return CellParts(w[:, :n_outside], self.ih.bias, w[:, n_outside:], self.hh.weight, self.hh.bias)

    def update(self, gi: Tensor, gh: Tensor, state: CellState) -> CellState:
        return CellState(gru_update(gi, gh, state.h))


def make_cell(name: str, input_size: int, hidden_size: int) -> nn.Module:
    """A recurrent cell by name: "lstm" or "gru"."""
    if name not in CELLS:
        raise ValueError(f"unknown recurrent cell {name!r}: expected one of {', '.join(CELLS)}")
    return (LSTMCell if name == "lstm" else GRUCell)(input_size, hidden_size)

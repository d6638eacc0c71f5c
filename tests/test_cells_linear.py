"""Recurrent cells equal torch.nn's; batched weight gradients equal autograd's."""

import contextlib

import pytest
import torch

from seqvae.cells import CellState, GRUCell, LSTMCell
from seqvae.linear import Affine, BlockLinear, StepLinear, unrolled


def test_lstm_cell_equals_torch():
    torch.manual_seed(0)
    ours = LSTMCell(5, 4).double()
    ref = torch.nn.LSTMCell(5, 4).double()
    w, b = ours.linear.weight, ours.linear.bias
    order = torch.cat([torch.arange(0, 8), torch.arange(12, 16), torch.arange(8, 12)])  # torch: i f g o; ours: i f o g
    with torch.no_grad():
        ref.weight_ih.copy_(w[order, :5])
        ref.weight_hh.copy_(w[order, 5:])
        ref.bias_ih.copy_(b[order])
        ref.bias_hh.zero_()
    x, h, c = (torch.randn(3, n, dtype=torch.float64) for n in (5, 4, 4))
    got = ours(x, CellState(h, c))
    want_h, want_c = ref(x, (h, c))
    torch.testing.assert_close(got.h, want_h)
    torch.testing.assert_close(got.c, want_c)


def test_gru_cell_equals_torch():
    torch.manual_seed(1)
    ours = GRUCell(5, 4).double()
    ref = torch.nn.GRUCell(5, 4).double()
    with torch.no_grad():
        ref.weight_ih.copy_(ours.ih.weight)
        ref.weight_hh.copy_(ours.hh.weight)
        ref.bias_ih.copy_(ours.ih.bias)
        ref.bias_hh.copy_(ours.hh.bias)
    x, h = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x, CellState(h)).h, ref(x, h))


@pytest.mark.parametrize("cell_cls", [LSTMCell, GRUCell])
@pytest.mark.parametrize("inside", [False, True])
def test_gate_pieces_recompose_the_cell(cell_cls, inside):
    """input_gates per input block + hidden_gates, through update, equal the cell on the whole input."""
    torch.manual_seed(2)
    cell = cell_cls([2, 4], 4).double()
    x, h = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    state = CellState(h, torch.randn(3, 4, dtype=torch.float64) if cell_cls is LSTMCell else None)
    with unrolled(cell) if inside else contextlib.nullcontext():  # weights sliced once per sequence inside
        gi = cell.input_gates(0, x[:, :2], bias=True) + cell.input_gates(1, x[:, 2:])
        got = cell.update(gi, cell.hidden_gates(h), state)
    want = cell([x[:, :2], x[:, 2:]], state)
    torch.testing.assert_close(got.h, want.h)
    torch.testing.assert_close(want.h, cell(x, state).h)


def test_block_linear_blocks_add_up_to_the_layer():
    torch.manual_seed(5)
    layer = BlockLinear([3, 2, 4], 5).double()
    xs = [torch.randn(6, n, dtype=torch.float64) for n in (3, 2, 4)]
    whole = layer(torch.cat(xs, 1))
    torch.testing.assert_close(layer.block(0, xs[0], bias=True) + layer.block(1, xs[1]) + layer.block(2, xs[2]), whole)
    seq = [torch.randn(7, 6, n, dtype=torch.float64) for n in (3, 2, 4)]  # leading time dimension
    torch.testing.assert_close(sum(layer.block(i, s) for i, s in enumerate(seq)) + layer.bias, layer(torch.cat(seq, -1)))
    torch.manual_seed(6)
    a = BlockLinear([3, 2, 4], 5)
    torch.manual_seed(6)
    b = StepLinear(9, 5)
    torch.testing.assert_close(a.weight, b.weight)  # initialised like one layer over the concatenation
    torch.testing.assert_close(a.bias, b.bias)


def test_batched_weight_gradient_equals_autograd():
    torch.manual_seed(3)
    layer = StepLinear(5, 3).double()
    xs = [torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(6)]
    extra = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def run():
        h = torch.zeros(4, 3, dtype=torch.float64)
        for x in xs:
            h = torch.tanh(layer(x + torch.cat([h, h[:, :2]], 1), extra))  # the output feeds the next input
        return (h**2).sum()

    run().backward()
    plain = [p.grad.clone() for p in (layer.weight, layer.bias, xs[0], extra)]
    for t in (layer.weight, layer.bias, xs[0], extra):
        t.grad = None
    import seqvae.linear as L

    old, L.BATCH_MIN_WEIGHTS = L.BATCH_MIN_WEIGHTS, 1  # batch even this small weight
    try:
        with unrolled(layer):
            assert layer._affine.batched
            loss = run()
    finally:
        L.BATCH_MIN_WEIGHTS = old
    loss.backward()
    for got, want in zip((layer.weight.grad, layer.bias.grad, xs[0].grad, extra.grad), plain):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_affine_on_a_concatenated_weight_reaches_both_parts():
    torch.manual_seed(4)
    a, b = StepLinear(4, 2).double(), StepLinear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    loss = lambda y1, y2: (y1.sin().sum() + (y2**2).sum())  # noqa: E731
    loss(a(x), b(x)).backward()
    want = [p.grad.clone() for p in (a.weight, a.bias, b.weight, b.bias)]
    for p in (a.weight, a.bias, b.weight, b.bias):
        p.grad = None
    both = Affine(torch.cat([a.weight, b.weight]), torch.cat([a.bias, b.bias]), batch_grad=True)
    y = both(x)
    loss(y[:, :2], y[:, 2:]).backward()
    for got, w in zip((a.weight.grad, a.bias.grad, b.weight.grad, b.bias.grad), want):
        torch.testing.assert_close(got, w)


def test_affine_without_gradients_is_plain():
    layer = StepLinear(3, 2)
    x = torch.randn(4, 3)
    with torch.no_grad(), unrolled(layer):
        y = layer(x)
    torch.testing.assert_close(y, x @ layer.weight.t() + layer.bias)
    assert layer._affine is None  # the context cleans up after itself

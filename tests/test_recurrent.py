"""The one time loop: reversal by length, masking, stacking, chunks and the step contract."""

from typing import NamedTuple

import torch

from seqvae.recurrent import RecurrentModel, generate, map_state, reverse_by_length, stack_steps, unroll, where_state
from seqvae.terms import Terms


def test_reverse_by_length_reverses_the_real_steps_and_leaves_padding():
    x = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1) + 1
    lengths = torch.tensor([5, 3])
    r = reverse_by_length(x, lengths)
    assert r[0, :, 0].tolist() == [5, 4, 3, 2, 1]
    assert r[1, :, 0].tolist() == [8, 7, 6, 9, 10]  # the first 3 reversed, padding where it was
    torch.testing.assert_close(reverse_by_length(r, lengths), x)
    torch.testing.assert_close(reverse_by_length(x, None), x.flip(1))


class Count(NamedTuple):
    total: torch.Tensor  # (b, 1)


class Out(NamedTuple):
    before: torch.Tensor  # (b, 1) the state the step started from
    x: torch.Tensor | None = None


class Accumulator(RecurrentModel):
    """s_t = s_{t-1} + x_t; scores log p(x_t) = -s_{t-1} (a known answer for every step)."""

    def initial_state(self, n):
        return Count(torch.zeros(n, 1))

    def step(self, x_t, state):
        if x_t is None:  # generating: the observation is always 1
            x_t = torch.ones_like(state.total)
            return Out(state.total, x_t), Count(state.total + x_t)
        return Out(state.total), Count(state.total + x_t)

    def score(self, x, outs, state):
        return Terms(-outs.before[..., 0])


def test_unroll_masks_padded_steps_and_keeps_their_state():
    model = Accumulator()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, float("nan"), float("nan")]])[..., None]
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    run = unroll(model, x, mask=mask, keep_states=True)
    assert run.state.total[:, 0].tolist() == [10.0, 2.0]  # the NaN padding never reached the state
    assert run.terms.log_px.tolist() == [[0.0, -1.0, -3.0, -6.0], [0.0, -1.0, 0.0, 0.0]]
    assert run.states.total[1, :, 0].tolist() == [1.0, 2.0, 2.0, 2.0]
    assert run.outs.before.shape == (2, 4, 1)


def test_chunks_with_a_carried_state_equal_one_pass():
    model = Accumulator()
    x = torch.randn(3, 9, 1)
    whole = unroll(model, x).terms.log_px
    state, parts = None, []
    for start in range(0, 9, 4):
        run = unroll(model, x[:, start : start + 4], state=state)
        parts.append(run.terms.log_px)
        state = run.state
    torch.testing.assert_close(torch.cat(parts, 1), whole)


def test_between_sees_every_step_and_may_replace_the_state():
    model = Accumulator()
    x = torch.ones(2, 3, 1)
    seen = []

    def between(t, terms, state):
        seen.append((t, terms.log_px.tolist()))
        return map_state(torch.zeros_like, state) if t == 1 else state  # a reset after step 1

    run = unroll(model, x, between=between)
    assert run.terms is None and run.state.total[:, 0].tolist() == [1.0, 1.0]
    assert seen == [(0, [[0.0], [0.0]]), (1, [[-1.0], [-1.0]]), (2, [[0.0], [0.0]])]


def test_generate_and_stack_and_where():
    run = generate(Accumulator(), 2, 3, keep_states=True)
    assert run.outs.x.shape == (2, 3, 1) and run.states.total[0, :, 0].tolist() == [1.0, 2.0, 3.0]
    stacked = stack_steps([Out(torch.zeros(2, 1)), Out(torch.ones(2, 1))])
    assert stacked.before.shape == (2, 2, 1) and stacked.x is None
    kept = where_state(torch.tensor([True, False]), Count(torch.ones(2, 3)), Count(torch.zeros(2, 3)))
    assert kept.total.sum(1).tolist() == [3.0, 0.0]

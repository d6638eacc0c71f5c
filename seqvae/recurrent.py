"""The recurrent contract and the one time loop that every model, bound and figure runs on.

Dimensions: b batch (examples, or particles x examples), t time steps, s state features.

A model states its recurrence once, as a step (in the manner of dm-haiku's `recurrent.py`):

    initial_state(b) -> S            the state before the first step: a NamedTuple of (b, ...)
                                     tensors (a field may be None, or a nested NamedTuple)
    precompute(x, state, mask)       the inputs of every step, [I_1, .., I_T], from the
                                     observations x: the work that does not depend on the
                                     sampled latents (feature networks of x, their products
                                     with weights, deterministic RNNs over x) is done here,
                                     batched over all steps; the default is x_t itself. state
                                     is the state the pass starts from (for models whose
                                     precomputation continues over chunks), mask the (b, t)
                                     real steps (for RNNs that run backwards; None: all real)
    step(I_t, S) -> (O_t, S)         one step: what must be sequential (sampling z_t, the cell).
                                     I_t = None means generating: the step samples its own
                                     observation (and returns it in O_t)
    score(x, O, S_T) -> Terms        the per-step terms (terms.py) of the steps in O, batched:
                                     O holds each field of O_t stacked over steps, (b, t, ...);
                                     S_T is the state after the last of them
    sequential: bool                 True: x is (b, t, ...) and observation t is scored by step
                                     t (masks, carried states and FIVO apply); False: the whole
                                     x is scored once, from the final state (DRAW)
    continues_chunks: bool           whether a sequence may be scored chunk by chunk from a
                                     carried state (truncated BPTT); False for a posterior
                                     that reads the future (a smoothing SRNN)
    fused_unroll(x, S, mask)         optional speed behind the contract: the whole pass as one
                                     hand-written kernel (fused.py), returning what the step loop
                                     would (O stacked over steps, S_T), or None where it does not
                                     apply (DRAW and the VRNN have one for CPU training)

`RecurrentModel` is a base class with the defaults, `terms()` and `check_input()`.

`unroll(model, x)` runs the loop: training, IWAE (samples folded into the batch), truncated
BPTT (a carried state), log-likelihood estimates and traces for figures all call it.
Masking lives here: x is zeroed on padded steps before anything sees it, a padded step
keeps the state it was given, and log p(x_t) is zeroed there. FIVO passes `between`, a
function called after every step with that step's terms (scored one step at a time) that
may replace the state (resampling). `generate(model, n, steps)` runs the step with no
observation. The loop holds no host synchronisation and no Python branch on tensor
values, so that it can be traced (torch.compile, CUDA graphs).

Multi-sample bounds fold k particles into the batch (rows ordered (particle, example)) and
say so with `unroll(..., particles=k)`; a model's dropout goes through `dropout(h, p,
training, dim)`, which draws one mask per example and gives it to all of that example's
particles, so that the k samples of z are weighed under one dropped-out network (with a
mask per row the log-mean-exp of the weights would also pick the luckiest masks).

`reverse_by_length(x, lengths)` reverses each padded sequence's real steps in place of
the padding-first flip, for backward RNNs: padding stays at the end and never reaches a
real step. `scan(cell, gates, state)` runs a deterministic cell over precomputed input
gates (a model's precompute uses it for RNNs over x, forwards or, reversed, backwards).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .linear import unrolled
from .terms import Terms

__all__ = [
    "RecurrentModel",
    "Unrolled",
    "unroll",
    "generate",
    "stack_steps",
    "map_state",
    "where_state",
    "reverse_by_length",
    "scan",
    "dropout",
]

_PARTICLES = [1]  # particles per example in the batch that unroll is running (rows: (particle, example))


def dropout(h: Tensor, p: float, training: bool, dim: int) -> Tensor:
    """Dropout of a model's units h inside `unroll`, one mask per example shared by its
    particles (`dim`: h's row dimension, ordered (particle, example))."""
    k = _PARTICLES[0]
    if k == 1 or not training or p == 0:
        return torch.nn.functional.dropout(h, p, training)
    shape = list(h.shape)
    shape[dim] //= k
    keep = torch.nn.functional.dropout(h.new_ones(shape), p, training)  # 0 or 1 / (1 - p), per example
    return h * torch.cat([keep] * k, dim)


class Unrolled(NamedTuple):
    """What one pass of the loop returns."""

    terms: Terms | None  # the per-step terms (None when `between` scored step by step)
    state: Any  # the state after the last step
    outs: Any  # each field of the step outputs stacked over time, (b, t, ...) (None with `between`)
    states: Any = None  # the state after each step, stacked over time, when keep_states=True


def map_state(fn: Callable[[Tensor], Tensor], state: Any) -> Any:
    """Apply fn to every tensor of a (nested) NamedTuple state; None fields stay None."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return fn(state)
    return type(state)(*(map_state(fn, s) for s in state))


def where_state(mask: Tensor, new: Any, old: Any) -> Any:
    """Per row, the new state where mask (b,) is True and the old one elsewhere."""
    if new is None:
        return None
    if isinstance(new, Tensor):
        return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)
    return type(new)(*(where_state(mask, n, o) for n, o in zip(new, old)))


def stack_steps(items: Sequence[Any], dim: int = 1) -> Any:
    """Stack a list of per-step outputs (tensors or nested NamedTuples) along `dim`."""
    first = items[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        if len(items) == 1:  # one step (FIVO scores step by step): a view, no copy
            return first.unsqueeze(dim)
        if dim == 1 and first.dim() >= 1:
            # stacked time-major (one contiguous copy per step) and viewed as (b, t, ...): on the
            # development CPU 5.7x faster than stacking along dim 1 (500 steps of 128 x 100)
            return torch.stack(list(items), dim=0).transpose(0, 1)
        return torch.stack(list(items), dim=dim)
    return type(first)(*(stack_steps([item[i] for item in items], dim) for i in range(len(first))))


def reverse_by_length(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of x (b, t, ...) over its first lengths[i] steps; padding stays put.

    Applying it twice gives x back. lengths None: every sequence is t steps long (a flip).
    """
    steps = x.shape[1]
    if lengths is None:
        return x.flip(1)
    t = torch.arange(steps, device=x.device)[None, :]  # (1, t)
    lengths = lengths.to(x.device)[:, None]  # (b, 1)
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (b, t)
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def scan(cell, gates: Tensor, state: Any) -> tuple[Tensor, Tensor | None]:
    """Run a deterministic cell (cells.py) over input gates (t, b, g) computed beforehand for
    every step, from `state`: its h (t, b, d) after each step, and its c (or None for a GRU)."""
    hs, cs = [], []
    for gates_t in gates.unbind(0):
        state = cell.update(gates_t, cell.hidden_gates(state.h), state)
        hs.append(state.h)
        cs.append(state.c)
    return torch.stack(hs), None if cs[0] is None else torch.stack(cs)


def _mask_terms(terms: Terms, mask: Tensor | None) -> Terms:
    if mask is None:
        return terms
    return dataclasses.replace(terms, log_px=terms.log_px * mask, mask=mask)


def unroll(
    model,
    x: Tensor,
    *,
    mask: Tensor | None = None,
    state: Any = None,
    between: Callable[[int, Terms, Any], Any] | None = None,
    keep_states: bool = False,
    particles: int = 1,
) -> Unrolled:
    """Run the model over x from `state` (None: the initial state); see the module docstring.

    mask (b, t): True on real steps (sequence models only). between(t, terms_t, state) -> state
    is called after each step t with that step's terms (scored by `model.score` on the one
    step); the terms of the whole pass are then not assembled. particles: x's rows are this
    many particles of each example, ordered (particle, example) (dropout masks are shared).
    """
    previous, _PARTICLES[0] = _PARTICLES[0], particles
    try:
        return _unroll(model, x, mask, state, between, keep_states)
    finally:
        _PARTICLES[0] = previous


def _unroll(model, x, mask, state, between, keep_states) -> Unrolled:
    b = x.shape[0]
    if mask is not None:  # padded steps are zeroed so that nothing there can leak into a result
        x = x.masked_fill(~mask.view(*mask.shape, *([1] * (x.dim() - 2))), 0.0)
    state = model.initial_state(b) if state is None else state
    if between is None and not keep_states:
        fused = model.fused_unroll(x, state, mask)
        if fused is not None:  # the model's whole pass as one hand-written kernel (fused.py)
            outs, state = fused
            return Unrolled(_mask_terms(model.score(x, outs, state), mask), state, outs)
    inputs = model.precompute(x, state=state, mask=mask)
    outs, states = [], []
    with unrolled(model):  # large weight gradients once per sequence, not once per step (linear.py)
        for t, step_input in enumerate(inputs):
            out, new = model.step(step_input, state)
            if mask is not None:
                new = where_state(mask[:, t], new, state)  # a padded step keeps its state
            if between is not None:
                terms = model.score(x[:, t : t + 1], stack_steps([out]), new)
                new = between(t, _mask_terms(terms, None if mask is None else mask[:, t : t + 1]), new)
            else:
                outs.append(out)
            state = new
            if keep_states:
                states.append(state)
    kept = stack_steps(states) if keep_states else None
    if between is not None:
        return Unrolled(None, state, None, kept)
    outs = stack_steps(outs)
    return Unrolled(_mask_terms(model.score(x, outs, state), mask), state, outs, kept)


def generate(model, n: int, steps: int, *, keep_states: bool = False) -> Unrolled:
    """Run the step `steps` times with no observation (sampling) from the initial state of n."""
    if n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    if steps < 1:
        raise ValueError(f"steps must be a positive number of time steps, got {steps}")
    state = model.initial_state(n)
    outs, states = [], []
    for _ in range(steps):
        out, state = model.step(None, state)
        outs.append(out)
        if keep_states:
            states.append(state)
    return Unrolled(None, state, stack_steps(outs), stack_steps(states) if keep_states else None)


class RecurrentModel(nn.Module):
    """Base class of the models: the contract's defaults (see the module docstring).

    A subclass defines initial_state, step and score, and precompute when some of the
    per-step work can be batched over all steps.
    """

    sequential = True
    continues_chunks = True

    def initial_state(self, batch_size: int) -> Any:
        raise NotImplementedError

    def precompute(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> Sequence[Any]:
        """The inputs of each step: by default the observation x_t (b, ...) of a (b, t, ...) x."""
        return x.unbind(1)

    def step(self, inputs: Any, state: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def fused_unroll(self, x: Tensor, state: Any, mask: Tensor | None) -> tuple[Any, Any] | None:
        """The whole pass over x (masked x zeroed) from `state` as one hand-written kernel (fused.py):
        (the step outputs stacked (b, t, ...), the final state), equal to the step loop's; None
        where the model has none or it does not apply, and the step loop runs."""
        return None

    def score(self, x: Tensor, outs: Any, state: Any) -> Terms:
        raise NotImplementedError

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Raise ValueError unless x is data this model can score (called once, where data enter)."""

    def terms(self, x: Tensor, *, mask: Tensor | None = None, state: Any = None) -> tuple[Terms, Any]:
        """Per-step terms of x and the state after the last step (state carries over chunks)."""
        out = unroll(self, x, mask=mask, state=state)
        return out.terms, out.state

    def forward(self, x: Tensor, *, mask: Tensor | None = None, state: Any = None) -> tuple[Terms, Any]:
        return self.terms(x, mask=mask, state=state)

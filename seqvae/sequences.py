"""Padded batches of variable-length sequences: masks, lengths and their checks.

Dimensions: b batch, t time, d features.

A batch of sequences is a (b, t, d) tensor padded at the end, with either the lengths (b,)
or a mask (b, t) that is True on the real steps. A mask must mark a prefix of each row
(real steps first, padding after); lengths must lie in 1..t.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mask_from_lengths", "resolve_mask", "check_sequences"]


def mask_from_lengths(lengths: Tensor, steps: int) -> Tensor:
    """(b,) lengths -> (b, steps) bool mask, True where t < length."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def resolve_mask(x: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor | None:
    """The (b, t) mask for a padded batch x (b, t, d), from lengths or mask (None: all real).

    Raises ValueError for lengths outside 1..t (a sequence of length zero included), a mask
    of the wrong shape or not a prefix mask, or a mask that disagrees with the lengths.
    """
    b, t = x.shape[:2]
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=x.device)
        if lengths.shape != (b,):
            raise ValueError(f"lengths must have shape (batch,) = ({b},), got {tuple(lengths.shape)}")
        if lengths.is_floating_point() and not torch.equal(lengths, lengths.round()):
            raise ValueError("lengths must be whole numbers of time steps")
        lengths = lengths.long()
        if (lengths < 1).any():
            raise ValueError(
                f"every sequence needs at least one step: got length {int(lengths.min())}; "
                "drop empty sequences before batching"
            )
        if (lengths > t).any():
            raise ValueError(f"a length of {int(lengths.max())} exceeds the padded time dimension {t}")
    if mask is not None:
        mask = torch.as_tensor(mask, device=x.device)
        if mask.shape != (b, t):
            raise ValueError(f"mask must have shape (batch, time) = ({b}, {t}), got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("mask must be boolean (or 0/1): True on real steps, False on padding")
            mask = mask.bool()
        implied = mask.sum(1)
        if not torch.equal(mask, mask_from_lengths(implied, t)):
            raise ValueError("mask must mark a prefix of each sequence: real steps first, then padding")
        if (implied < 1).any():
            raise ValueError("every sequence needs at least one step: the mask has an all-False row")
        if lengths is not None and not torch.equal(implied, lengths):
            bad = int((implied != lengths).nonzero()[0, 0])
            raise ValueError(
                f"the mask disagrees with the lengths: sequence {bad} has length {int(lengths[bad])} "
                f"but its mask marks {int(implied[bad])} steps"
            )
        return mask
    if lengths is not None:
        return mask_from_lengths(lengths, t) if (lengths < t).any() else None
    return None


def check_sequences(x: Tensor, x_dim: int, head, mask: Tensor | None, where: str = "the sequences") -> None:
    """Raise ValueError unless x (b, t, x_dim) suits a model with this output head."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of sequences, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"expected sequences of shape (batch, time, features), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("expected at least one sequence, got an empty batch")
    if x.shape[1] == 0:
        raise ValueError("sequences of length zero: expected at least one time step")
    if x.shape[2] != x_dim:
        raise ValueError(f"the model expects {x_dim} features per time step, the data has {x.shape[2]}")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point sequences, got dtype {x.dtype}; convert with x.float()")
    head.check(x if mask is None else x[mask], where)

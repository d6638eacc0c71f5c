"""Evaluation: a bound or the log-likelihood estimate over a data set.

Dimensions: b batch, t time, k samples.

Results are nats per example (`nats`); for sequences also nats per time step
(`nats_per_step`: the sum over sequences divided by the number of real steps, as the music
literature reports), for images of discrete (binary) pixels bits per dimension: a code length,
since the model's likelihood is checked to be discrete for them (a density on discrete data is
refused). Under torch.distributed each rank scores
every world_size-th batch and the sums are reduced across ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .data import describe
from .logs import progress_bar
from .distributed import all_sum, rank_and_world
from .graphs import STATIC_SPAN, Graphed
from .objectives import bound, importance_log_likelihood
from .sequences import mask_from_lengths

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    *,
    name: str = "elbo",
    k: int = 1,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    max_rows: int = 8192,
    progress: bool = False,
    cuda_graphs: bool = False,
) -> dict[str, float]:
    """A registered bound ("elbo", "iwae", "fivo") or the log-likelihood estimate ("ll") over
    `data` (an ImageData or SequenceData, already validated by its loader). progress=True
    shows a bar with the rate and the time left on a terminal (examples x samples scored).
    cuda_graphs=True replays the bound of each batch shape from a CUDA graph (graphs.py) on a
    CUDA device (not for "ll", whose batches of samples vary)."""
    check_data = getattr(getattr(model, "config", None), "check_data", None)
    if check_data is not None:  # the data fit the model, and its likelihood is a code length for them
        check_data(describe(data))
    rank, world = rank_and_world()
    model.eval()
    total, examples, steps = 0.0, 0, 0
    n = len(data)
    starts = list(range(0, n, batch_size))[rank::world]
    score = lambda x, mask: bound(model, x, name=name, k=k, mask=mask)[0]  # noqa: E731
    if cuda_graphs and torch.device(device).type == "cuda" and name != "ll":
        score = Graphed(score, name=f"{name} bound")
    bar = progress_bar(total=sum(min(batch_size, n - s) for s in starts) * k, unit="sample", unit_scale=True, leave=False,
               desc=f"{name} k={k}", disable=None if progress and rank == 0 else True, dynamic_ncols=True)
    for start in starts:
        index = torch.arange(start, min(start + batch_size, n))
        batch = data.batch(index, torch.Generator().manual_seed(start))  # fixed draws for dynamic binarization
        x = batch.x.to(device)
        if isinstance(score, Graphed) and batch.lengths is not None:  # pad (masked) so that batch shapes repeat
            x = torch.nn.functional.pad(x, (0, 0, 0, -x.shape[1] % STATIC_SPAN))
        lengths = None if batch.lengths is None else batch.lengths.to(device)
        mask = None if lengths is None else mask_from_lengths(lengths, x.shape[1])
        if name == "ll":
            values = importance_log_likelihood(model, x, k=k, max_rows=max_rows, mask=mask, progress=bar.update)
        else:
            values = score(x, mask)
            bar.update(x.shape[0] * k)
        total += float(values.double().sum())
        examples += x.shape[0]
        steps += int(lengths.sum()) if lengths is not None else 0
        bar.set_postfix(nll=f"{-total / examples:.2f} nats" if lengths is None else f"{-total / steps:.3f} nats/step")
    bar.close()
    total, examples, steps = all_sum([total, examples, steps], torch.device(device))
    out = {"bound": name, "k": k, "examples": int(examples), "nats": total / examples}
    if data.kind == "sequences":
        out["nats_per_step"] = total / steps
        out["steps"] = int(steps)
    elif data.binary:  # a code length only for discrete data (continuous heads on binary data are refused)
        dims = int(np.prod(data.image_shape))
        out["bits_per_dim"] = -total / examples / (dims * math.log(2))
    return out

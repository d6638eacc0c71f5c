"""Objectives: bounds on log p(x) built from a model's per-step terms (terms.py).

Dimensions: b batch, k importance samples (particles), t time, z latent units.

Every public function returns per-example values in nats, shape (b,), higher is better;
for sequences, x is (b, t, features) with optional `lengths` (b,) or `mask` (b, t):

    elbo(model, x)               E_q[log p(x|z)] - KL(q || p), the KL analytic per step
    iwae_bound(model, x, k)      Burda et al. 2015: E log (1/k) sum_i p(x, z_i) / q(z_i | x),
                                 k whole-sequence particles each with its own recurrent state;
                                 equals the ELBO (with a Monte Carlo KL) at k = 1, rises with k
    fivo_bound(model, x, k)      Maddison et al. 2017: a particle filter over the k particles
                                 that resamples (multinomially) whenever the effective sample
                                 size falls below resample_threshold * k; the resampling itself
                                 is not differentiated (the usual choice)
    log_likelihood(model, x)     the importance-sampling estimate log (1/k) sum_i w_i of log p(x)
                                 with k = 5000 samples, in chunks so that memory stays bounded

All of them go through `bound`, which also evaluates one chunk of a sequence given the
`Carry` of the chunks before it: the recurrent state of every particle, the log-weights
accumulated since the last resampling, and the bound's value so far. A chunk returns its
contribution, so that the contributions of consecutive chunks add up to the value of the
whole sequence in one pass (truncated backpropagation through time; see train.py).

Training options: KL warm-up multiplies the latent terms by beta (the KL for the ELBO, the
log-ratio log p(z) - log q(z) inside the weights for IWAE and FIVO); free bits (Kingma et
al. 2016, ELBO only) clamp each latent unit's batch-averaged KL per step below at lambda
nats. With beta = 1 and no free bits, every value is the true bound. Reduction over the
batch happens once, in the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from einops import rearrange, repeat
from torch import Tensor

from .configs import check
from .sequences import resolve_mask, where_state
from .terms import Terms

__all__ = [
    "elbo",
    "iwae_bound",
    "fivo_bound",
    "log_likelihood",
    "bound",
    "Carry",
    "log_mean_exp",
    "free_bits_kl",
    "ObjectiveConfig",
    "OBJECTIVES",
]

OBJECTIVES = ("elbo", "iwae", "fivo")


def log_mean_exp(values: Tensor, dim: int = 0) -> Tensor:
    """log (1/k) sum_i exp(values_i) along dim, computed stably."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def _check_k(k: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive integer number of samples, got {k!r}")


def free_bits_kl(terms: Terms, free_bits: float) -> Tensor:
    """Per-example KL with free bits (Kingma et al. 2016), (b, s).

    For each step s and unit j the batch-averaged KL is compared with lambda = free_bits;
    where it is below, every example's term becomes the constant lambda, so the sum over
    the batch is sum_{s,j} max(lambda, mean_b KL_{b,s,j}) times the number of examples
    (and no gradient pushes that unit's KL lower).
    """
    if free_bits <= 0:
        return terms.kl()
    kl = terms.kl_per_unit()  # (b, s, z)
    if terms.mask is None:
        weight = None
        count = kl.new_full(kl.shape[1:2], kl.shape[0])
    else:
        weight = terms.mask.to(kl.dtype)
        count = weight.sum(0)
    mean = kl.sum(0) / count.clamp_min(1)[:, None]  # (s, z)
    clamped = torch.where(mean >= free_bits, kl, torch.full_like(kl, free_bits))
    if weight is not None:
        clamped = clamped * weight[..., None]
    return clamped.sum(-1)


class Carry(NamedTuple):
    """What one chunk of a sequence hands to the next (batch of b examples, k particles)."""

    state: Any  # the model's recurrent state for the k*b particle rows (None: start afresh)
    log_w: Tensor  # (k, b) log-weights accumulated since the last resampling
    acc: Tensor  # (b,) FIVO: sum of log mean weights at the resampling steps so far

    @staticmethod
    def start(b: int, k: int, like: Tensor) -> "Carry":
        return Carry(None, like.new_zeros(k, b), like.new_zeros(b))

    def detach(self) -> "Carry":
        """Cut the graph between chunks (truncated backpropagation through time)."""
        state = None if self.state is None else type(self.state)(*(None if s is None else s.detach() for s in self.state))
        return Carry(state, self.log_w.detach(), self.acc.detach())

    def value(self) -> Tensor:
        """The bound's value so far, (b,): acc + log mean_k exp(log_w)."""
        return self.acc + log_mean_exp(self.log_w, 0)


def _rows(t: Tensor | None, k: int) -> Tensor | None:
    """Repeat a per-example tensor for k particles: rows ordered (particle, example)."""
    return None if t is None else repeat(t, "b ... -> (k b) ...", k=k)


def bound(
    model,
    x: Tensor,
    *,
    name: str = "elbo",
    k: int = 1,
    mask: Tensor | None = None,
    carry: Carry | None = None,
    beta: float = 1.0,
    free_bits: float = 0.0,
    resample_threshold: float = 0.5,
) -> tuple[Tensor, Carry | None]:
    """The contribution of x (a whole input, or one chunk of a sequence) to a bound, (b,) nats.

    name: "elbo", "iwae" or "fivo". For sequence models pass the previous chunk's carry
    to continue a sequence (None starts one); the returned carry continues it. For images
    (DRAW) there is no carry and FIVO does not apply.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    _check_k(k)
    if name == "elbo" and k != 1:
        raise ValueError("the ELBO uses one sample per example; for k > 1 use iwae or fivo")
    if free_bits and name != "elbo":
        raise ValueError("free bits apply to the ELBO's analytic KL term only")
    sequential = getattr(model, "sequential", False)
    if not sequential:
        if name == "fivo":
            raise ValueError(
                f"FIVO needs a sequence model that scores x step by step; {type(model).__name__} "
                "scores the whole image from its final canvas (use elbo or iwae)"
            )
        if carry is not None or mask is not None:
            raise ValueError(f"{type(model).__name__} scores whole images: masks and carries do not apply")
    b = x.shape[0]
    carry = Carry.start(b, k, x) if carry is None else carry

    if name == "elbo":
        terms, state = model.terms(x, mask=mask, state=carry.state)
        value = terms.log_px.sum(-1) - beta * free_bits_kl(terms, free_bits).sum(-1)
        return value, Carry(state, carry.log_w, carry.acc) if sequential else None

    if name == "iwae":
        terms, state = model.terms(_rows(x, k), mask=_rows(mask, k), state=carry.state)
        log_w = carry.log_w + rearrange(terms.log_weight(beta), "(k b) -> k b", k=k)
        value = log_mean_exp(log_w, 0) - log_mean_exp(carry.log_w, 0)
        return value, Carry(state, log_w, carry.acc) if sequential else None

    return _fivo_chunk(model, x, k, mask, carry, beta, resample_threshold)


def _fivo_chunk(model, x, k, mask, carry, beta, threshold):
    b, steps = x.shape[:2]
    model.check_input(x, mask)
    xr, mr = _rows(x, k), _rows(mask, k)
    if mask is not None:
        xr = xr.masked_fill(~mr[..., None], 0.0)
    state = model.initial_state(k * b) if carry.state is None else carry.state
    log_w, acc = carry.log_w, carry.acc
    start = acc + log_mean_exp(log_w, 0)
    columns = torch.arange(b, device=x.device)
    for t in range(steps):
        out, new = model.step(xr[:, t], state)
        inc = out.log_px + beta * (out.log_pz - out.log_qz)  # (k*b,)
        if mr is not None:
            inc = inc * mr[:, t]
            new = where_state(mr[:, t], new, state)
        state = new
        log_w = log_w + rearrange(inc, "(k b) -> k b", k=k)
        # effective sample size (sum w)^2 / sum w^2, per example, in log space
        log_ess = 2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)
        need = log_ess < math.log(threshold * k) if threshold > 0 else torch.zeros_like(log_ess, dtype=torch.bool)
        if mask is not None:
            need = need & mask[:, t]
        if need.any():
            acc = acc + torch.where(need, log_mean_exp(log_w, 0), torch.zeros_like(acc))
            with torch.no_grad():
                ancestors = torch.multinomial(log_w.detach().t().softmax(-1), k, replacement=True)  # (b, k)
                keep = torch.arange(k, device=x.device).expand(b, k)
                ancestors = torch.where(need[:, None], ancestors, keep)
                index = rearrange(ancestors * b + columns[:, None], "b k -> (k b)")
            state = type(state)(*(None if s is None else s[index] for s in state))
            log_w = torch.where(need, torch.zeros_like(log_w), log_w)
    end = acc + log_mean_exp(log_w, 0)
    return end - start, Carry(state, log_w, acc)


def _prepare(model, x: Tensor, lengths, mask) -> Tensor | None:
    if getattr(model, "sequential", False):
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected sequences of shape (batch, time, features), got {shape}")
        return resolve_mask(x, lengths, mask)
    if lengths is not None or mask is not None:
        raise ValueError(f"{type(model).__name__} scores whole images: lengths and mask do not apply")
    return None


def elbo(model, x: Tensor, *, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The evidence lower bound per example, (b,) nats: sum_t log p(x_t|..) - sum_t KL_t."""
    return bound(model, x, name="elbo", mask=_prepare(model, x, lengths, mask))[0]


def iwae_bound(model, x: Tensor, *, k: int = 50, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The importance-weighted bound L_k of Burda et al. (2015) per example, (b,) nats."""
    return bound(model, x, name="iwae", k=k, mask=_prepare(model, x, lengths, mask))[0]


def fivo_bound(
    model,
    x: Tensor,
    *,
    k: int = 8,
    lengths: Tensor | None = None,
    mask: Tensor | None = None,
    resample_threshold: float = 0.5,
) -> Tensor:
    """The filtering variational objective of Maddison et al. (2017) per sequence, (b,) nats."""
    if not 0 <= resample_threshold <= 1:
        raise ValueError(f"resample_threshold must lie in [0, 1], got {resample_threshold}")
    return bound(
        model, x, name="fivo", k=k, mask=_prepare(model, x, lengths, mask), resample_threshold=resample_threshold
    )[0]


@torch.no_grad()
def log_likelihood(
    model,
    x: Tensor,
    *,
    k: int = 5000,
    max_rows: int = 8192,
    lengths: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Estimate log p(x) per example, (b,) nats, by importance sampling with k samples from q.

    The samples are drawn in chunks of at most `max_rows` rows (examples x samples) and
    combined with a running logsumexp, so memory does not grow with k. The estimate is L_k:
    a stochastic lower bound on log p(x) that converges to it as k grows. (For the RNN
    baseline, which has no latent variables, it is exact for any k.)
    """
    _check_k(k)
    _check_k(max_rows, "max_rows")
    mask = _prepare(model, x, lengths, mask)
    per_example = max(1, min(k, max_rows // max(1, x.shape[0])))
    batch = max(1, max_rows // per_example)
    out = []
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch]
        mb = None if mask is None else mask[start : start + batch]
        total, done = None, 0
        while done < k:
            kc = min(per_example, k - done)
            terms, _ = model.terms(_rows(xb, kc), mask=_rows(mb, kc))
            lse = torch.logsumexp(rearrange(terms.log_weight(), "(k b) -> k b", k=kc), dim=0)  # (b,)
            total = lse if total is None else torch.logaddexp(total, lse)
            done += kc
        out.append(total - math.log(k))
    return torch.cat(out)


# ---------------------------------------------------------------------------- training


@dataclass
class ObjectiveConfig:
    """The training objective: which bound, how many samples, and guards against collapse."""

    name: str = "elbo"  # elbo | iwae | fivo
    k: int = 1  # importance samples (iwae) or particles (fivo)
    kl_warmup: int = 0  # optimiser steps over which beta rises linearly from 0 to 1; 0 = off
    free_bits: float = 0.0  # nats per latent unit and step below which KL is not penalised (elbo)
    resample_threshold: float = 0.5  # fivo: resample when ESS < threshold * k

    def validate(self) -> "ObjectiveConfig":
        check(self.name in OBJECTIVES, f"objective.name must be one of {', '.join(OBJECTIVES)}, got {self.name!r}")
        check(self.k >= 1, f"objective.k must be a positive number of samples, got {self.k}")
        check(self.name != "elbo" or self.k == 1, "objective.k > 1 needs objective.name=iwae or fivo")
        check(self.kl_warmup >= 0, f"objective.kl_warmup must be >= 0 steps, got {self.kl_warmup}")
        check(self.free_bits >= 0, f"objective.free_bits must be >= 0 nats, got {self.free_bits}")
        check(
            self.free_bits == 0 or self.name == "elbo",
            "objective.free_bits applies to the ELBO's analytic KL term only; use objective.name=elbo",
        )
        check(
            0 <= self.resample_threshold <= 1,
            f"objective.resample_threshold must lie in [0, 1], got {self.resample_threshold}",
        )
        return self

    def beta(self, step: int) -> float:
        """The KL weight after `step` optimiser steps: a linear warm-up, then 1."""
        return 1.0 if self.kl_warmup <= 0 else min(1.0, step / self.kl_warmup)

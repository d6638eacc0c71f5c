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

Objectives are registered by name (`register_objective`); all of them go through `bound`, which also evaluates one chunk of a sequence given the
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
from typing import Any, Callable, NamedTuple

import torch
from einops import rearrange, repeat
from torch import Tensor

from .configs import check
from .recurrent import map_state, unroll
from .sequences import resolve_mask
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
    "ObjectiveSpec",
    "OBJECTIVES",
    "register_objective",
    "get_objective",
    "importance_log_likelihood",
]


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
        return Carry(map_state(Tensor.detach, self.state), self.log_w.detach(), self.acc.detach())

    def value(self) -> Tensor:
        """The bound's value so far, (b,): acc + log mean_k exp(log_w)."""
        return self.acc + log_mean_exp(self.log_w, 0)


def _rows(t: Tensor | None, k: int) -> Tensor | None:
    """Repeat a per-example tensor for k particles: rows ordered (particle, example)."""
    return None if t is None else repeat(t, "b ... -> (k b) ...", k=k)


# An objective's chunk function: (model, x, mask, carry, options) -> (value (b,), carry).
ChunkFn = Callable[..., "tuple[Tensor, Carry]"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: its chunk function and what it needs of a model."""

    name: str
    chunk: ChunkFn
    stepwise: bool = False  # scores one step at a time: needs a sequential model
    multi_sample: bool = False  # k > 1 allowed
    description: str = ""


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, chunk: ChunkFn, *, stepwise: bool = False, multi_sample: bool = False,
                       description: str = "") -> ObjectiveSpec:
    """Make `name` usable wherever an objective is named (bound, the trainer, the CLI)."""
    spec = ObjectiveSpec(name, chunk, stepwise, multi_sample, description)
    OBJECTIVES[name] = spec
    return spec


def get_objective(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def _check_model_fits(spec: ObjectiveSpec, model) -> None:
    if spec.stepwise and not getattr(model, "sequential", False):
        raise ValueError(
            f"{spec.name.upper()} needs a sequence model that scores x step by step; {type(model).__name__} "
            "scores the whole input from its final state (use elbo or iwae)"
        )


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

    name: a registered objective ("elbo", "iwae", "fivo"). For sequence models pass the
    previous chunk's carry to continue a sequence (None starts one); the returned carry
    continues it. For images (DRAW) there is no carry and FIVO does not apply. x is used as
    given: validate data where they enter (the public functions below do).
    """
    spec = get_objective(name)
    _check_k(k)
    if k != 1 and not spec.multi_sample:
        raise ValueError(f"the {name.upper()} uses one sample per example; for k > 1 use iwae or fivo")
    if free_bits and name != "elbo":
        raise ValueError("free bits apply to the ELBO's analytic KL term only")
    _check_model_fits(spec, model)
    sequential = getattr(model, "sequential", False)
    if not sequential:
        if carry is not None or mask is not None:
            raise ValueError(f"{type(model).__name__} scores whole images: masks and carries do not apply")
    elif carry is not None and carry.state is not None and not getattr(model, "continues_chunks", True):
        raise ValueError(
            f"{type(model).__name__} cannot continue a sequence from a carried state (its posterior reads the "
            "whole sequence): score whole sequences, without truncated BPTT"
        )
    carry = Carry.start(x.shape[0], k, x) if carry is None else carry
    value, carry = spec.chunk(model, x, k=k, mask=mask, carry=carry, beta=beta, free_bits=free_bits,
                              resample_threshold=resample_threshold)
    return value, carry if sequential else None


def _elbo_chunk(model, x, *, mask, carry, beta, free_bits, **_):
    run = unroll(model, x, mask=mask, state=carry.state)
    value = run.terms.log_px.sum(-1) - beta * free_bits_kl(run.terms, free_bits).sum(-1)
    return value, Carry(run.state, carry.log_w, carry.acc)


def _iwae_chunk(model, x, *, k, mask, carry, beta, **_):
    run = unroll(model, _rows(x, k), mask=_rows(mask, k), state=carry.state, particles=k)
    log_w = carry.log_w + rearrange(run.terms.log_weight(beta), "(k b) -> k b", k=k)
    value = log_mean_exp(log_w, 0) - log_mean_exp(carry.log_w, 0)
    return value, Carry(run.state, log_w, carry.acc)


def _fivo_chunk(model, x, *, k, mask, carry, beta, resample_threshold, **_):
    """A particle filter over the k particles: weights per step, resampling between steps.

    Whether an example resamples is decided with tensor operations (ancestors are drawn at
    every step and kept only where the effective sample size is low), so nothing here reads
    a tensor's value on the host. With resample_threshold = 0 it never resamples (= IWAE).
    """
    b = x.shape[0]
    columns = torch.arange(b, device=x.device)
    keep = torch.arange(k, device=x.device).expand(b, k)
    # one particle: resampling changes nothing (and is left out, so no draw is made)
    log_threshold = math.log(resample_threshold * k) if resample_threshold > 0 and k > 1 else None
    filt = {"log_w": carry.log_w, "acc": carry.acc}

    def between(t: int, terms: Terms, state):
        log_w = filt["log_w"] + rearrange(terms.log_weight(beta), "(k b) -> k b", k=k)
        filt["log_w"] = log_w
        if log_threshold is None:
            return state
        # effective sample size (sum w)^2 / sum w^2, per example, in log space
        log_ess = 2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)
        need = log_ess < log_threshold  # (b,)
        if mask is not None:
            need = need & mask[:, t]
        filt["acc"] = filt["acc"] + torch.where(need, log_mean_exp(log_w, 0), torch.zeros_like(filt["acc"]))
        with torch.no_grad():  # the resampling itself is not differentiated
            probs = torch.nan_to_num(log_w.detach().t().softmax(-1), nan=0.0)  # (b, k)
            # an example whose weights are all NaN or -inf draws uniformly: its value is already
            # non-finite (the trainer skips such a step); drawing must not fail on it
            probs = torch.where(probs.sum(-1, keepdim=True) > 0, probs, torch.full_like(probs, 1.0 / k))
            ancestors = torch.multinomial(probs, k, replacement=True)  # (b, k)
            ancestors = torch.where(need[:, None], ancestors, keep)
            index = rearrange(ancestors * b + columns[:, None], "b k -> (k b)")
        filt["log_w"] = torch.where(need, torch.zeros_like(log_w), log_w)
        return map_state(lambda s: s.index_select(0, index), state)

    start = carry.acc + log_mean_exp(carry.log_w, 0)
    run = unroll(model, _rows(x, k), mask=_rows(mask, k), state=carry.state, between=between, particles=k)
    end = filt["acc"] + log_mean_exp(filt["log_w"], 0)
    return end - start, Carry(run.state, filt["log_w"], filt["acc"])


register_objective("elbo", _elbo_chunk, description="E_q[log p(x|z)] - KL(q || p), the KL analytic per step")
register_objective("iwae", _iwae_chunk, multi_sample=True, description="the importance-weighted bound of Burda et al. (2015)")
register_objective("fivo", _fivo_chunk, stepwise=True, multi_sample=True,
                   description="the filtering variational objective of Maddison et al. (2017)")


def _prepare(model, x: Tensor, lengths, mask) -> Tensor | None:
    """Validate user data once, where it enters; the (b, t) mask for sequences."""
    if getattr(model, "sequential", False):
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected sequences of shape (batch, time, features), got {shape}")
        mask = resolve_mask(x, lengths, mask)
    elif lengths is not None or mask is not None:
        raise ValueError(f"{type(model).__name__} scores whole images: lengths and mask do not apply")
    check_input = getattr(model, "check_input", None)
    if check_input is not None:
        check_input(x, mask)
    return mask


def elbo(model, x: Tensor, *, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The evidence lower bound per example, (b,) nats: sum_t log p(x_t|..) - sum_t KL_t."""
    return bound(model, x, name="elbo", mask=_prepare(model, x, lengths, mask))[0]


def iwae_bound(model, x: Tensor, *, k: int = 50, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The importance-weighted bound L_k of Burda et al. (2015) per example, (b,) nats."""
    _check_k(k)
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
    _check_k(k)
    if not 0 <= resample_threshold <= 1:
        raise ValueError(f"resample_threshold must lie in [0, 1], got {resample_threshold}")
    _check_model_fits(OBJECTIVES["fivo"], model)  # before the data checks: the clearer message
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
    return importance_log_likelihood(model, x, k=k, max_rows=max_rows, mask=mask)


@torch.no_grad()
def importance_log_likelihood(model, x: Tensor, *, k: int, max_rows: int = 8192, mask: Tensor | None = None,
                              progress=None) -> Tensor:
    """`log_likelihood` on data already validated (the evaluation loop's entry); `progress`,
    if given, is called with the number of (example, sample) pairs scored after each chunk."""
    per_example = max(1, min(k, max_rows // max(1, x.shape[0])))
    batch = max(1, max_rows // per_example)
    out = []
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch]
        mb = None if mask is None else mask[start : start + batch]
        total, done = None, 0
        while done < k:
            kc = min(per_example, k - done)
            terms = unroll(model, _rows(xb, kc), mask=_rows(mb, kc), particles=kc).terms
            lse = torch.logsumexp(rearrange(terms.log_weight(), "(k b) -> k b", k=kc), dim=0)  # (b,)
            total = lse if total is None else torch.logaddexp(total, lse)
            done += kc
            if progress is not None:
                progress(kc * xb.shape[0])
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
        multi = [n for n, spec in OBJECTIVES.items() if spec.multi_sample]
        check(OBJECTIVES[self.name].multi_sample or self.k == 1, f"objective.k > 1 needs objective.name={' or '.join(multi)}")
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

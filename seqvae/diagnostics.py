"""Latent usage: active units and KL per unit and per step, over a data set.

Dimensions: n examples, s latent steps (DRAW glimpses or sequence time steps), z latent units.

Active units (Burda, Grosse & Salakhutdinov 2015, "Importance Weighted Autoencoders",
section 5.2): unit u is active when A_u = Cov_x( E_{q(u | x)}[u] ) > 0.01, the variance over
the data set of the unit's posterior mean. VAEs "tend to use only a small subset of the
dimensions of z"; this measures how many.

    DRAW: per glimpse step t and unit u (a (T, z) table) and the total over steps. The
          posterior at step t depends on the z_<t sampled before it; E_q[z_t | x] is
          estimated by the posterior mean mu_t averaged over `samples` sampled paths.
          The paths add noise: the variance over x of that average is Cov_x(E_q[u]) +
          E_x[Var_path(mu_t)] / S, so a single path overcounts active units. The path noise
          is estimated from the spread of each example's S paths and subtracted (unbiased
          for S >= 2). A unit whose corrected variance lies within two standard errors of
          the threshold (a normal-theory error of the variance and of the noise estimate)
          is counted as `undecided`: more examples or paths are needed to call it.
    VRNN: per unit, pooled over time steps: the variance of mu_t,u over every real
          (sequence, step) pair of the data set; the per-step table is also returned,
          each step over the sequences long enough to have it.

KL per unit and per step: the analytic KL(q || p) of each unit at each step, averaged over
the examples that have that step (per-unit values sum to the model's per-step KL).

With a learned prior p(z_t | h_{t-1}) (VRNN), a posterior mean can move with h_{t-1} while
the prior moves with it, carrying no information: Burda's criterion, written for a fixed
prior, then counts the unit as active although its KL is zero. So we also report the same
criterion on E_q[u] - E_p[u] (`prior_relative_*`), which equals Burda's for the fixed
N(0, I) prior of DRAW and VRNN-I and tracks the KL for a learned prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sequences import mask_from_lengths

__all__ = ["LatentUsage", "latent_usage", "ACTIVE_THRESHOLD", "SAMPLES"]

ACTIVE_THRESHOLD = 0.01
SAMPLES = 8  # posterior paths per example (see the module docstring)


@dataclass
class LatentUsage:
    """Latent usage over a data set. Tables are (s, z): steps x units."""

    variance: Tensor  # (s, z) Cov_x(E_q[u]) per step and unit
    active: Tensor  # (s, z) bool: variance > threshold
    kl: Tensor  # (s, z) mean KL per step and unit, nats
    count: Tensor  # (s,) examples that have each step
    pooled_variance: Tensor  # (z,) over all (example, step) pairs (the VRNN criterion)
    pooled_active: Tensor  # (z,) bool
    prior_relative_variance: Tensor  # (z,) pooled Cov(E_q[u] - E_p[u]) (see the module docstring)
    threshold: float
    sequential: bool
    samples: int = 1  # posterior paths per example
    path_noise: Tensor | None = None  # (s, z) E_x[Var_path(mu)] / samples, already subtracted (None: 1 path)
    pooled_path_noise: Tensor | None = None  # (z,) the same pooled over steps
    undecided_steps: Tensor | None = None  # (s, z) bool: within two standard errors of the threshold
    undecided_pooled: Tensor | None = None  # (z,) bool

    @property
    def undecided(self) -> Tensor:
        """Units (sequences: (z,) pooled) or (step, unit) pairs (DRAW: (s, z)) whose variance lies
        within two standard errors of the threshold: more examples or paths are needed to call them."""
        flags = self.undecided_pooled if self.sequential else self.undecided_steps
        if flags is None:
            return torch.zeros_like(self.pooled_active if self.sequential else self.active)
        return flags

    @property
    def kl_per_step(self) -> Tensor:
        return self.kl.sum(-1)

    @property
    def kl_per_unit(self) -> Tensor:
        """KL per unit: DRAW, summed over glimpses (nats per image); sequences, averaged
        over every real (sequence, step) pair (nats per time step)."""
        if not self.sequential:
            return self.kl.sum(0)
        return (self.kl * self.count[:, None]).sum(0) / self.count.sum()

    @property
    def kl_total(self) -> float:
        """DRAW: nats per image; sequences: nats per time step."""
        return float(self.kl_per_unit.sum())

    @property
    def active_units(self) -> int:
        """DRAW: active (step, unit) pairs; sequences: active units pooled over time."""
        return int(self.pooled_active.sum()) if self.sequential else int(self.active.sum())

    def to_dict(self) -> dict:
        out = {
            "criterion": "Cov_x(E_q[u]) > %g (Burda et al. 2015)" % self.threshold,
            "pooled_over_time": self.sequential,
            "active_units": self.active_units,
            "latent_units": int(self.active.shape[1]),
            "steps": int(self.active.shape[0]),
            "active_per_step": self.active.sum(1).tolist(),
            "kl_per_step": self.kl_per_step.tolist(),
            "kl_per_unit": self.kl_per_unit.tolist(),
            "kl_total": self.kl_total,
            "kl_units": "nats per time step" if self.sequential else "nats per image",
            "variance_per_unit": self.pooled_variance.tolist(),
        }
        if not self.sequential:
            out["active_per_unit"] = self.active.sum(0).tolist()
        out["active_units_relative_to_prior"] = int((self.prior_relative_variance > self.threshold).sum())
        out["prior_relative_variance_per_unit"] = self.prior_relative_variance.tolist()
        out["posterior_paths"] = self.samples
        out["path_noise_corrected"] = self.path_noise is not None
        if self.path_noise is not None:
            out["path_noise_per_unit"] = self.pooled_path_noise.tolist()
            out["undecided_units"] = int(self.undecided.sum())
        return out


@torch.no_grad()
def latent_usage(
    model,
    data,
    *,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    samples: int = SAMPLES,
    threshold: float = ACTIVE_THRESHOLD,
) -> LatentUsage:
    """Active units and KL per unit and step of `model` over `data` (an ImageData or SequenceData),
    from `samples` posterior paths per example (>= 2 to remove the path noise; see above)."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    model.eval()
    sequential = getattr(model, "sequential", False)
    if sequential and not hasattr(model, "z_size"):
        raise ValueError(f"{type(model).__name__} has no latent variables: there is no latent usage to measure")
    sums = sq = kl_sum = count = None
    pooled_n, pooled_s, pooled_sq = 0, 0.0, 0.0
    rel_s, rel_sq = 0.0, 0.0
    noise = pooled_noise = rel_noise = None  # sums of the spread between paths
    examples = 0
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        batch = data.batch(index, torch.Generator().manual_seed(start))
        x = batch.x.to(device)
        mask = None
        if batch.lengths is not None:
            lengths = batch.lengths.to(device)
            mask = mask_from_lengths(lengths, x.shape[1]) if bool((lengths < x.shape[1]).any()) else None
        mus, kls, rels = [], [], []
        for _ in range(samples):
            terms, _ = model.terms(x, mask=mask) if sequential else model.terms(x)
            mus.append(terms.posterior.base_dist.loc)
            rels.append(terms.posterior.base_dist.loc - terms.prior.base_dist.loc)
            kls.append(terms.kl_per_unit())
        mus, rels = torch.stack(mus).double(), torch.stack(rels).double()  # (S, b, s, z)
        mu, rel = mus.mean(0), rels.mean(0)  # (b, s, z) estimates of E_q[z | x]
        kl = torch.stack(kls).mean(0).double()
        w = torch.ones(mu.shape[:2], dtype=torch.float64, device=mu.device) if mask is None else mask.double()
        steps = mu.shape[1]
        if sums is None or steps > sums.shape[0]:
            sums, sq, kl_sum, count, noise = (_grow(t, steps, mu.shape[2]) for t in (sums, sq, kl_sum, count, noise))
        if samples > 1:  # the variance of a mean of S paths: (unbiased variance between paths) / S
            spread, rel_spread = mus.var(0) / samples * w[..., None], rels.var(0) / samples * w[..., None]
            noise[:steps] += spread.sum(0).cpu()
            pooled_noise = spread.sum((0, 1)).cpu() + (0.0 if pooled_noise is None else pooled_noise)
            rel_noise = rel_spread.sum((0, 1)).cpu() + (0.0 if rel_noise is None else rel_noise)
        sums[:steps] += (mu * w[..., None]).sum(0).cpu()
        sq[:steps] += (mu.square() * w[..., None]).sum(0).cpu()
        kl_sum[:steps] += kl.sum(0).cpu()  # kl_per_unit is already zero on padded steps
        count[:steps] += w.sum(0)[:, None].cpu()
        pooled_n += float(w.sum())
        examples += x.shape[0]
        pooled_s = pooled_s + (mu * w[..., None]).sum((0, 1)).cpu()
        pooled_sq = pooled_sq + (mu.square() * w[..., None]).sum((0, 1)).cpu()
        rel_s = rel_s + (rel * w[..., None]).sum((0, 1)).cpu()
        rel_sq = rel_sq + (rel.square() * w[..., None]).sum((0, 1)).cpu()
    n = count[:, 0].clamp_min(1)
    mean = sums / n[:, None]
    variance = sq / n[:, None] - mean.square()
    pooled_mean = pooled_s / pooled_n
    pooled_var = pooled_sq / pooled_n - pooled_mean.square()
    rel_var = rel_sq / pooled_n - (rel_s / pooled_n).square()
    if samples > 1:  # remove the path noise (see the module docstring)
        noise = noise / n[:, None]
        variance = variance - noise
        pooled_noise = pooled_noise / pooled_n
        pooled_var, rel_var = pooled_var - pooled_noise, rel_var - rel_noise / pooled_n
        undecided_steps = _undecided(variance, noise, n[:, None], samples, threshold)
        # steps of one sequence are not independent: the pooled error counts sequences, not steps
        undecided_pooled = _undecided(pooled_var, pooled_noise, examples, samples, threshold)
    variance, pooled_var, rel_var = variance.clamp_min(0), pooled_var.clamp_min(0), rel_var.clamp_min(0)
    return LatentUsage(
        variance=variance.float(),
        active=variance > threshold,
        kl=(kl_sum / n[:, None]).float(),
        count=count[:, 0].long(),
        pooled_variance=pooled_var.float(),
        pooled_active=pooled_var > threshold,
        prior_relative_variance=rel_var.float(),
        threshold=threshold,
        sequential=sequential,
        samples=samples,
        path_noise=None if samples == 1 else noise.float(),
        pooled_path_noise=None if samples == 1 else pooled_noise.float(),
        undecided_steps=None if samples == 1 else undecided_steps,
        undecided_pooled=None if samples == 1 else undecided_pooled,
    )


def _undecided(corrected: Tensor, noise: Tensor, n, samples: int, threshold: float) -> Tensor:
    """Within two standard errors of the threshold: the error of a variance over n examples
    (sqrt(2 / n) times the variance measured) plus that of the noise estimate (S - 1 degrees
    of freedom per example)."""
    n = torch.as_tensor(n, dtype=torch.float64).clamp_min(1)
    error = (2 / n).sqrt() * (corrected + noise).clamp_min(0) + noise * (2 / (n * (samples - 1))).sqrt()
    return (corrected - threshold).abs() < 2 * error


def _grow(t: Tensor | None, steps: int, units: int) -> Tensor:
    out = torch.zeros(steps, units, dtype=torch.float64)
    if t is not None:
        out[: t.shape[0]] = t
    return out

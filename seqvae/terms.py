"""What a model hands to the objectives: per-step terms, never a loss.

Dimensions: b batch, t observed steps, s latent steps, z latent units.

A model's `terms(x, ...)` returns a `Terms`: the log-likelihood of the observations per
step, and the approximate posterior q and prior p of the latent variables it sampled, per
step, as `Independent(Normal(loc, scale), 1)` distributions with batch shape (b, s). The
objectives (`seqvae.objectives`) turn these into bounds; a model knows nothing of them.

For DRAW, t = 1 (the image is scored once, from the final canvas) and s = T glimpses.
For sequence models t = s = sequence length and `mask` marks the real (unpadded) steps.
A model without latent variables (the RNN baseline) has posterior = prior = z = None.
`output` is the observation model's distribution p(x_t | ...) itself (batch (b, t)), for
looking inside (its mean is what a reconstruction shows); objectives use log_px only.

Distributions built by the models skip torch.distributions' argument validation
(`validate_args=False`): validating reads tensor values back to the host at every step,
which the time loop must never do. Data are validated once, where they enter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

__all__ = ["Terms", "standard_normal_like", "diagonal_normal"]


@dataclass
class Terms:
    log_px: Tensor  # (b, t) log p(x_t | ...) of the observations, zero on padded steps
    posterior: Independent | None = None  # q(z_s | ...), batch (b, s), event (z,)
    prior: Independent | None = None  # p(z_s | ...), batch (b, s), event (z,)
    z: Tensor | None = None  # (b, s, z) the sample drawn from q
    mask: Tensor | None = None  # (b, s) True on real steps; None = all real
    output: Distribution | None = None  # p(x_t | ...), batch (b, t): for looking inside

    def _masked(self, values: Tensor) -> Tensor:
        return values if self.mask is None else values * self.mask

    def kl(self) -> Tensor:
        """Analytic KL(q || p) per example and step, (b, s); zeros without latents."""
        if self.posterior is None:
            return self.log_px.new_zeros(self.log_px.shape[:2])
        return self._masked(self._unit_kl().sum(-1))

    def kl_per_unit(self) -> Tensor:
        """Analytic KL per latent unit, (b, s, z) (the diagonal Gaussians factorise)."""
        if self.posterior is None:
            return self.log_px.new_zeros(*self.log_px.shape[:2], 0)
        kl = self._unit_kl()
        return kl if self.mask is None else kl * self.mask[..., None]

    def _unit_kl(self) -> Tensor:
        """KL(N(m_q, s_q^2) || N(m_p, s_p^2)) per unit, (b, s, z), written out: torch's
        kl_divergence dispatch cannot be traced by torch.compile; tested equal to it."""
        q, p = self.posterior.base_dist, self.prior.base_dist
        ratio = (q.scale / p.scale).square()
        return 0.5 * (ratio + ((q.loc - p.loc) / p.scale).square() - 1 - ratio.log())

    def log_ratio(self) -> Tensor:
        """log p(z_s | ...) - log q(z_s | ...) at the sampled z, (b, s): the Monte Carlo KL's negative."""
        if self.posterior is None:
            return self.log_px.new_zeros(self.log_px.shape[:2])
        return self._masked(self.prior.log_prob(self.z) - self.posterior.log_prob(self.z))

    def log_weight(self, beta: float = 1.0) -> Tensor:
        """Per-example log importance weight log p(x, z) - log q(z | x), summed over steps: (b,).

        beta scales the latent part (KL warm-up); beta = 1 is the true weight.
        """
        lw = self.log_px.sum(-1)
        if self.posterior is not None:
            lw = lw + beta * self.log_ratio().sum(-1)
        return lw

    def detach(self) -> "Terms":
        """A copy with every tensor detached (for diagnostics that must not hold the graph)."""

        def d(dist: Independent | None) -> Independent | None:
            if dist is None:
                return None
            base = dist.base_dist
            return diagonal_normal(base.loc.detach(), base.scale.detach())

        return Terms(
            self.log_px.detach(),
            d(self.posterior),
            d(self.prior),
            None if self.z is None else self.z.detach(),
            self.mask,
        )


def diagonal_normal(loc: Tensor, scale: Tensor) -> Independent:
    """N(loc, diag(scale^2)) over the last dimension (..., z), without argument validation."""
    return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


def standard_normal_like(loc: Tensor) -> Independent:
    """N(0, I) with the batch shape of loc (..., z): the fixed prior of DRAW and VRNN-I."""
    zeros = torch.zeros((), dtype=loc.dtype, device=loc.device).expand_as(loc)
    ones = torch.ones((), dtype=loc.dtype, device=loc.device).expand_as(loc)
    return diagonal_normal(zeros, ones)

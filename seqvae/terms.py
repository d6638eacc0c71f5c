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
from torch.autograd import Function
from torch.distributions import Distribution, Independent, Normal

from . import native

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
        q, p = self.posterior.base_dist, self.prior.base_dist
        args = (q.loc, q.scale, p.loc, p.scale)
        if all(a.shape == args[0].shape for a in args[1:]) and native.hand_written_ok():  # (else the formula)
            return self._masked(_NormalKL.apply(*args))
        return self._masked(self._unit_kl().sum(-1))

    def kl_per_unit(self) -> Tensor:
        """Analytic KL per latent unit, (b, s, z) (the diagonal Gaussians factorise)."""
        if self.posterior is None:
            return self.log_px.new_zeros(*self.log_px.shape[:2], 0)
        kl = self._unit_kl()
        return kl if self.mask is None else kl * self.mask[..., None]

    def _unit_kl(self) -> Tensor:
        """KL(N(m_q, s_q^2) || N(m_p, s_p^2)) per unit, (b, s, z), written out: torch's
        kl_divergence dispatch cannot be traced by torch.compile; tested equal to it. (kl() sums
        it over units through _NormalKL, with its gradients written out.)"""
        q, p = self.posterior.base_dist, self.prior.base_dist
        return _kl_units(q.loc, q.scale, p.loc, p.scale)

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


class _NormalKL(Function):
    """sum_z KL(N(m_q, s_q^2) || N(m_p, s_p^2)) over the last dimension, for four tensors of one
    shape, with its gradients written out: with r = s_q / s_p and d = (m_q - m_p) / s_p,
        KL = sum_z 0.5 (r^2 + d^2 - 1) - log r,
        dKL/dm_q = d / s_p = -dKL/dm_p,  dKL/ds_q = (r - 1/r) / s_p,  dKL/ds_p = (1 - r^2 - d^2) / s_p.
    Autograd through Terms._unit_kl records ~13 operations and differentiates each (a T=28,
    batch 128, z 16 VRNN's KL: 1.2 ms forward and backward on a 2-core Intel Xeon VM, 0.45 ms
    here); for plain float CPU tensors with contiguous units the C++ helpers (native.py's build)
    take one pass each way, otherwise ATen's operations without a graph. A backward that is to
    be differentiated again (create_graph=True) computes the same gradients with autograd
    operations from the inputs, so that second derivatives are right."""

    @staticmethod
    def forward(ctx, m_q: Tensor, s_q: Tensor, m_p: Tensor, s_p: Tensor) -> Tensor:
        native = _native(m_q, s_q, m_p, s_p)
        ctx.native = native
        ctx.save_for_backward(m_q, s_q, m_p, s_p)
        if native is not None:
            return native.normal_kl(m_q, s_q, m_p, s_p)
        return _kl_units(m_q, s_q, m_p, s_p).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        m_q, s_q, m_p, s_p = ctx.saved_tensors
        if ctx.native is not None and not torch.is_grad_enabled():
            grads = ctx.native.normal_kl_backward(grad, m_q, s_q, m_p, s_p)
        else:  # ATen's operations, differentiable again when the backward records a graph
            need_mq, need_sq, need_mp, need_sp = ctx.needs_input_grad
            g = grad.unsqueeze(-1)  # times each factor divided by s_p (1 / s_p alone may overflow)
            r, d = s_q / s_p, (m_q - m_p) / s_p
            g_m = g * (d / s_p) if need_mq or need_mp else None
            grads = (g_m, g * ((r - 1 / r) / s_p) if need_sq else None, -g_m if need_mp else None,
                     g * ((1 - r * r - d * d) / s_p) if need_sp else None)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def _kl_units(m_q: Tensor, s_q: Tensor, m_p: Tensor, s_p: Tensor) -> Tensor:
    """The KL per unit, 0.5 (r^2 + d^2 - 1) - log r (each unit's terms together, before the sum
    over units: a sum of the units' 0.5 (r^2 + d^2) less 0.5 z would cancel badly for small KLs)."""
    r, d = s_q / s_p, (m_q - m_p) / s_p
    return torch.addcmul(r * r - 1, d, d).mul_(0.5).sub_(r.log())


def _native(*ts: Tensor):
    """The C++ helpers for 3-D plain float CPU tensors of one dtype with contiguous units (the last
    dimension of size 1 or stride 1), or None. (A standard-normal prior, expanded with stride 0,
    takes ATen's operations.)"""
    if ts[0].dim() != 3 or any(u.shape[-1] > 1 and u.stride(-1) != 1 for u in ts):
        return None
    return native.helpers_for(*ts)


def diagonal_normal(loc: Tensor, scale: Tensor) -> Independent:
    """N(loc, diag(scale^2)) over the last dimension (..., z), without argument validation."""
    return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


def standard_normal_like(loc: Tensor) -> Independent:
    """N(0, I) with the batch shape of loc (..., z): the fixed prior of DRAW and VRNN-I."""
    zeros = torch.zeros((), dtype=loc.dtype, device=loc.device).expand_as(loc)
    ones = torch.ones((), dtype=loc.dtype, device=loc.device).expand_as(loc)
    return diagonal_normal(zeros, ones)

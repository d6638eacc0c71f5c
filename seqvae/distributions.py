"""Likelihood heads: map a flat parameter vector to a distribution over a flat data vector.

Dimensions: b batch, t time, d data features, k mixture components, p parameters.

Every head is an `nn.Module` with
    num_params(d) -> int      how many raw parameters it needs for d data features
    forward(params) -> dist   params (..., num_params(d)) -> a torch.distributions object
                              with event shape (d,), so log_prob sums over the features
    mean(params) -> (..., d)  the mean, without building the distribution (fast path)
    check(x, where)           raise ValueError if x cannot come from this head's support

Heads are chosen by name with `make_head`: "bernoulli", "gaussian", "mixture" (a mixture of
diagonal Gaussians) and "strokes" (a mixture of bivariate Gaussians with correlation for
pen offsets, plus a Bernoulli end-of-stroke bit; Graves 2013, "Generating sequences with
recurrent neural networks", eqs 18-25).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.autograd import Function
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    constraints,
)

from .native import hand_written_ok, helpers_for
from .terms import diagonal_normal

__all__ = [
    "BernoulliHead",
    "GaussianHead",
    "MixtureHead",
    "StrokeHead",
    "StrokeDistribution",
    "make_head",
    "HEAD_NAMES",
    "check_finite",
]

HEAD_NAMES = ("bernoulli", "gaussian", "mixture", "strokes")


def check_finite(x: Tensor, where: str) -> None:
    """Raise ValueError naming `where` if x holds NaN or infinite values."""
    # A finite sum has no NaN or infinite term (IEEE arithmetic carries them into the sum): one
    # reduction, where the element-wise test takes five passes (13 vs 0.5 ms for a (128, 500, 88)
    # batch on a 2-core Intel Xeon VM). A sum that overflows is decided by the exact test.
    if x.is_floating_point() and torch.isfinite(x.sum()):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{where} holds {bad} NaN or infinite value(s); expected finite numbers")


def _scale(raw: Tensor, min_scale: float) -> Tensor:
    # softplus keeps the scale positive with gradients everywhere; the floor stops a
    # density from collapsing onto a single point (an unbounded likelihood).
    return F.softplus(raw) + min_scale


class BernoulliLogits(Independent):
    """Independent(Bernoulli(logits), 1), whose log_prob for (b, t, d) CPU float logits and values
    takes one C++ pass each way (_BernoulliLogProb); torch's otherwise (and for values that need a
    gradient; values are not validated, as the heads build it with validate_args=False)."""

    def log_prob(self, value: Tensor) -> Tensor:
        logits = self.base_dist.logits
        if (self.reinterpreted_batch_ndims == 1 and logits.dim() == 3 and value.shape == logits.shape
                and not value.requires_grad and logits.stride(-1) == 1 and value.stride(-1) == 1
                and helpers_for(logits, value) is not None and hand_written_ok()):
            return _BernoulliLogProb.apply(logits, value)
        return super().log_prob(value)


class _BernoulliLogProb(Function):
    """sum_d x_d l_d - softplus(l_d) for logits l and values x (b, t, d): log p(x) under
    Bernoulli(sigmoid(l)), as torch's binary_cross_entropy_with_logits then the sum over d (for a
    T=28, batch 128, 28-feature VRNN output ~0.65 ms forward and backward on a 2-core Intel Xeon
    VM, several passes each way); its gradient for l is grad (x - sigmoid(l)). The C++ helpers
    take one pass each way; a backward that is to be differentiated again (create_graph=True)
    computes the gradient with autograd operations."""

    @staticmethod
    def forward(ctx, logits: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(logits, x)
        return helpers_for(logits, x).bernoulli_log_prob(logits, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, x = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiable again
            return grad.unsqueeze(-1) * (x - torch.sigmoid(logits)), None
        return helpers_for(logits, x).bernoulli_log_prob_backward(grad, logits, x), None


class BernoulliHead(nn.Module):
    """p(x) = prod_d Bernoulli(x_d; sigmoid(l_d)) on logits l: binary data."""

    def __init__(self, **_: object):
        super().__init__()

    def num_params(self, d: int) -> int:
        return d

    def forward(self, params: Tensor) -> Distribution:
        return BernoulliLogits(Bernoulli(logits=params, validate_args=False), 1, validate_args=False)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def check(self, x: Tensor, where: str = "data") -> None:
        check_finite(x, where)
        native = helpers_for(x)  # C++: one pass over x, where ATen's operations take four
        if not (native.is_binary(x) if native is not None else ((x == 0) | (x == 1)).all()):
            lo, hi = x.min().item(), x.max().item()
            raise ValueError(
                f"{where} is not binary (values range over [{lo:g}, {hi:g}]): a Bernoulli "
                "likelihood needs every value to be exactly 0 or 1; binarize the data or choose "
                "a continuous likelihood"
            )


class GaussianHead(nn.Module):
    """p(x) = prod_d N(x_d; mu_d, s_d^2), s_d = softplus(.) + min_scale.

    params are [mu-part (d), scale-part (d)]. With mean="sigmoid" the mean is sigmoid(mu-part),
    for data in [0, 1] such as grey or colour images; with "identity" it is unconstrained.
    """

    def __init__(self, *, min_scale: float = 1e-3, mean: str = "identity", **_: object):
        super().__init__()
        if mean not in ("identity", "sigmoid"):
            raise ValueError(f"Gaussian mean transform must be 'identity' or 'sigmoid', got {mean!r}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale!r}")
        self.min_scale = float(min_scale)
        self.mean_transform = mean

    def num_params(self, d: int) -> int:
        return 2 * d

    def _loc(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw) if self.mean_transform == "sigmoid" else raw

    def forward(self, params: Tensor) -> Distribution:
        loc, raw_scale = params.chunk(2, dim=-1)
        return diagonal_normal(self._loc(loc), _scale(raw_scale, self.min_scale))

    def mean(self, params: Tensor) -> Tensor:
        return self._loc(params.chunk(2, dim=-1)[0])

    def check(self, x: Tensor, where: str = "data") -> None:
        check_finite(x, where)
        if self.mean_transform == "sigmoid" and ((x < 0) | (x > 1)).any():
            raise ValueError(f"{where} lies outside [0, 1]; this image likelihood expects values in [0, 1]")


class MixtureHead(nn.Module):
    """p(x) = sum_k pi_k prod_d N(x_d; mu_kd, s_kd^2): a mixture of K diagonal Gaussians.

    params are [logits (K), means (K*d), scales (K*d)].
    """

    def __init__(self, *, components: int = 5, min_scale: float = 1e-3, **_: object):
        super().__init__()
        if components < 1:
            raise ValueError(f"a mixture needs at least one component, got {components}")
        self.k = int(components)
        self.min_scale = float(min_scale)

    def num_params(self, d: int) -> int:
        return self.k * (1 + 2 * d)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = self.k
        d = (params.shape[-1] - k) // (2 * k)
        logits = params[..., :k]
        loc = rearrange(params[..., k : k + k * d], "... (k d) -> ... k d", k=k)
        scale = _scale(rearrange(params[..., k + k * d :], "... (k d) -> ... k d", k=k), self.min_scale)
        return logits, loc, scale

    def forward(self, params: Tensor) -> Distribution:
        logits, loc, scale = self._split(params)
        return MixtureSameFamily(Categorical(logits=logits, validate_args=False), diagonal_normal(loc, scale), validate_args=False)

    def mean(self, params: Tensor) -> Tensor:
        logits, loc, _ = self._split(params)
        return (logits.softmax(-1)[..., None] * loc).sum(-2)

    def check(self, x: Tensor, where: str = "data") -> None:
        check_finite(x, where)


class StrokeDistribution(Distribution):
    """Pen offsets (dx, dy) from a mixture of bivariate Gaussians with correlation, and an
    end-of-stroke bit from a Bernoulli (Graves 2013, eqs 18-25). Event shape (3,)."""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor, corr: Tensor, eos_logits: Tensor):
        # logits (..., k), loc and scale (..., k, 2), corr (..., k), eos_logits (...)
        s1, s2 = scale.unbind(-1)
        zeros = torch.zeros_like(s1)
        # Cholesky factor of [[s1^2, r s1 s2], [r s1 s2, s2^2]].
        tril = torch.stack(
            [torch.stack([s1, zeros], -1), torch.stack([corr * s2, s2 * torch.sqrt(1 - corr**2)], -1)], -2
        )
        self.offsets = MixtureSameFamily(
            Categorical(logits=logits, validate_args=False), MultivariateNormal(loc, scale_tril=tril, validate_args=False), validate_args=False
        )
        self.eos = Bernoulli(logits=eos_logits, validate_args=False)
        super().__init__(batch_shape=eos_logits.shape, event_shape=torch.Size([3]), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.offsets.log_prob(value[..., :2]) + self.eos.log_prob(value[..., 2])

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.offsets.sample(sample_shape), self.eos.sample(sample_shape)[..., None]], -1)

    @property
    def mean(self) -> Tensor:
        return torch.cat([self.offsets.mean, self.eos.mean[..., None]], -1)


class StrokeHead(nn.Module):
    """Pen strokes (dx, dy, end-of-stroke): params are [logits (K), means (2K), scales (2K),
    correlations (K, through tanh), end-of-stroke logit (1)]."""

    def __init__(self, *, components: int = 20, min_scale: float = 1e-3, **_: object):
        super().__init__()
        if components < 1:
            raise ValueError(f"a mixture needs at least one component, got {components}")
        self.k = int(components)
        self.min_scale = float(min_scale)

    def num_params(self, d: int) -> int:
        if d != 3:
            raise ValueError(f"the strokes head models (dx, dy, end-of-stroke): expected 3 features, got {d}")
        return 6 * self.k + 1

    def forward(self, params: Tensor) -> StrokeDistribution:
        k = self.k
        logits = params[..., :k]
        loc = rearrange(params[..., k : 3 * k], "... (k two) -> ... k two", two=2)
        scale = _scale(rearrange(params[..., 3 * k : 5 * k], "... (k two) -> ... k two", two=2), self.min_scale)
        # keep |rho| < 1 strictly so that the Cholesky factor stays finite
        corr = torch.tanh(params[..., 5 * k : 6 * k]) * (1 - 1e-5)
        return StrokeDistribution(logits, loc, scale, corr, params[..., 6 * k])

    def mean(self, params: Tensor) -> Tensor:
        return self.forward(params).mean

    def check(self, x: Tensor, where: str = "data") -> None:
        check_finite(x, where)
        if x.shape[-1] != 3:
            raise ValueError(f"{where} must have 3 features (dx, dy, end-of-stroke), got {x.shape[-1]}")
        eos = x[..., 2]
        if not ((eos == 0) | (eos == 1)).all():
            raise ValueError(f"{where}: the end-of-stroke feature (the third) must be 0 or 1")


_HEADS = {"bernoulli": BernoulliHead, "gaussian": GaussianHead, "mixture": MixtureHead, "strokes": StrokeHead}


def make_head(name: str, **options: object) -> nn.Module:
    """A likelihood head by name; options (components, min_scale, mean) go to its constructor."""
    if name not in _HEADS:
        raise ValueError(f"unknown output distribution {name!r}: expected one of {', '.join(HEAD_NAMES)}")
    return _HEADS[name](**options)

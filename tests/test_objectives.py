"""Bounds on models whose log p(x) is exact: ELBO <= IWAE_k <= log p(x), IWAE rises with k,
log_likelihood approaches log p(x), FIVO is a lower bound; chunked (TBPTT) == one pass."""

import math
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

import seqvae
from seqvae.objectives import Carry, bound
from seqvae.recurrent import RecurrentModel
from seqvae.terms import Terms, diagonal_normal, standard_normal_like



@pytest.fixture(autouse=True)
def _float64():
    """These known-answer tests run in float64; the default is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Draw(NamedTuple):
    z: torch.Tensor  # (b, m)
    loc: torch.Tensor
    scale: torch.Tensor


class LinearGaussian(RecurrentModel):
    """z ~ N(0, I_m), x | z ~ N(W z + b, s^2 I_d); q(z | x) = N(A x + c, diag(e^2)).

    log p(x) = log N(x; b, W W^T + s^2 I) exactly. On the recurrent contract: one step, no state.
    """

    sequential = False

    def __init__(self, W, b, s, A, c, e):
        super().__init__()
        self.W, self.b, self.s, self.A, self.c, self.e = W, b, s, A, c, e

    @classmethod
    def exact_posterior(cls, W, b, s):
        # with orthogonal columns W^T W is diagonal, so the exact posterior is a diagonal Gaussian
        cov = torch.linalg.inv(torch.eye(W.shape[1]) + W.t() @ W / s**2)
        A = cov @ W.t() / s**2
        return cls(W, b, s, A, -A @ b, cov.diagonal().sqrt())

    def initial_state(self, n):
        return None

    def precompute(self, x, state=None, mask=None):
        return [x]

    def step(self, x, state):
        loc = x @ self.A.t() + self.c
        scale = self.e.expand_as(loc)
        return Draw(loc + scale * torch.randn_like(loc), loc, scale), None

    def score(self, x, outs, state):
        z = outs.z[:, 0]
        log_px = Normal(z @ self.W.t() + self.b, self.s).log_prob(x).sum(-1, keepdim=True)  # (b, 1)
        return Terms(log_px, diagonal_normal(outs.loc, outs.scale), standard_normal_like(outs.loc), outs.z)

    def log_marginal(self, x):
        cov = self.W @ self.W.t() + self.s**2 * torch.eye(self.W.shape[0])
        return MultivariateNormal(self.b, cov).log_prob(x)


def make_linear_gaussian(exact: bool):
    torch.manual_seed(0)
    d, m = 5, 3
    q, _ = torch.linalg.qr(torch.randn(d, m))
    W = q * torch.tensor([2.0, 1.0, 0.5])  # orthogonal columns
    b, s = torch.randn(d), 0.7
    model = LinearGaussian.exact_posterior(W, b, s)
    if not exact:  # a deliberately imperfect encoder
        model.A = model.A + 0.15 * torch.randn_like(model.A)
        model.e = model.e * 1.4
    x = torch.randn(4, d) * 2
    return model, x


def _mean_and_error(fn, x, reps):
    """Mean and standard error over `reps` independent draws of fn(x) per example, drawn in one
    batch (x repeated reps times)."""
    values = fn(x.repeat(reps, *([1] * (x.dim() - 1)))).view(reps, *x.shape[:1])
    return values.mean(0), values.std(0) / math.sqrt(reps)


def test_exact_posterior_makes_every_bound_exact():
    model, x = make_linear_gaussian(exact=True)
    logp = model.log_marginal(x)
    # with q = p(z | x) every importance weight equals p(x): no variance at all
    torch.testing.assert_close(seqvae.iwae_bound(model, x, k=7), logp, rtol=0, atol=1e-10)
    torch.testing.assert_close(seqvae.log_likelihood(model, x, k=50, max_rows=16), logp, rtol=0, atol=1e-10)
    # the ELBO with an analytic KL still samples log p(x | z); it equals log p(x) in expectation
    mean, err = _mean_and_error(lambda xs: seqvae.elbo(model, xs), x, 4000)
    assert ((mean - logp).abs() < 4 * err + 1e-9).all()


def test_elbo_below_iwae_below_log_p_and_iwae_rises_with_k():
    model, x = make_linear_gaussian(exact=False)
    logp = model.log_marginal(x)
    torch.manual_seed(1)
    elbo, elbo_err = _mean_and_error(lambda xs: seqvae.elbo(model, xs), x, 20000)
    iwae = {k: _mean_and_error(lambda xs: seqvae.iwae_bound(model, xs, k=k), x, 4000) for k in (1, 5, 50)}
    assert (logp - elbo).min() > 0.5  # the imperfect encoder leaves a visible gap
    assert (elbo < iwae[5][0]).all() and (iwae[5][0] < iwae[50][0]).all() and (iwae[50][0] < logp).all()
    # L_1 is the ELBO with a Monte Carlo KL: equal in expectation
    assert ((iwae[1][0] - elbo).abs() < 4 * (iwae[1][1] + elbo_err)).all()
    ll = seqvae.log_likelihood(model, x, k=5000, max_rows=4096)
    assert ((logp - ll).abs() < (logp - elbo) / 10).all()


def test_analytic_kl_equals_monte_carlo_kl_and_the_constant_is_right():
    model, x = make_linear_gaussian(exact=False)
    terms, _ = model.terms(x)
    loc, scale = terms.posterior.base_dist.loc, terms.posterior.base_dist.scale
    # KL(N(mu, s^2) || N(0, 1)) = 1/2 sum_j (mu^2 + s^2 - 1 - log s^2): the constant is -|z|/2 per step
    by_hand = 0.5 * (loc**2 + scale**2 - 1 - torch.log(scale**2)).sum(-1)
    torch.testing.assert_close(terms.kl(), by_hand)
    torch.manual_seed(2)
    mc, err = _mean_and_error(lambda xs: -model.terms(xs)[0].log_ratio()[:, 0], x, 20000)
    assert ((mc - terms.kl()[:, 0]).abs() < 4 * err).all()
    # and KL = 0 when q is the prior
    same = Terms(terms.log_px, standard_normal_like(loc), standard_normal_like(loc), terms.z)
    assert same.kl().abs().max() == 0


class SSMState(NamedTuple):
    z: torch.Tensor  # (n, 1)
    first: torch.Tensor  # (n, 1) 1.0 before the first step


class SSMDraw(NamedTuple):
    z: torch.Tensor  # (n, 1)
    p_loc: torch.Tensor
    p_scale: torch.Tensor
    q_loc: torch.Tensor
    q_scale: torch.Tensor


class LinearGaussianSSM(RecurrentModel):
    """z_1 ~ N(0, q0), z_t = a z_{t-1} + N(0, q), x_t = c z_t + N(0, r), with a Gaussian
    proposal q(z_t | x_t, z_{t-1}) = N(alpha z_{t-1} + beta x_t, e^2); log p(x) by a Kalman filter."""

    sequential = True

    def __init__(self, a=0.9, q=0.5, q0=1.0, c=1.2, r=0.4, alpha=0.5, beta=0.4, e=0.8):
        super().__init__()
        self.__dict__.update(a=a, q=q, q0=q0, c=c, r=r, alpha=alpha, beta=beta, e=e)

    def initial_state(self, n):
        return SSMState(torch.zeros(n, 1), torch.ones(n, 1))

    def step(self, x_t, state):
        p_loc = self.a * state.z * (1 - state.first)
        p_scale = torch.where(state.first > 0, math.sqrt(self.q0), math.sqrt(self.q)).expand_as(p_loc)
        q_loc = self.alpha * state.z + self.beta * x_t
        q_scale = torch.full_like(q_loc, self.e)
        z = Normal(q_loc, q_scale, validate_args=False).sample()
        return SSMDraw(z, p_loc, p_scale, q_loc, q_scale), SSMState(z, torch.zeros_like(state.first))

    def score(self, x, outs, state):
        log_px = Normal(self.c * outs.z, math.sqrt(self.r), validate_args=False).log_prob(x).sum(-1)  # (b, t)
        return Terms(log_px, diagonal_normal(outs.q_loc, outs.q_scale), diagonal_normal(outs.p_loc, outs.p_scale), outs.z)

    def log_marginal(self, x, lengths):
        out = []
        for i in range(x.shape[0]):
            m, v, total = 0.0, self.q0, 0.0
            for t in range(int(lengths[i])):
                if t > 0:
                    m, v = self.a * m, self.a**2 * v + self.q
                s = self.c**2 * v + self.r  # predictive variance of x_t
                xt = x[i, t, 0].item()
                total += -0.5 * (math.log(2 * math.pi * s) + (xt - self.c * m) ** 2 / s)
                gain = v * self.c / s
                m, v = m + gain * (xt - self.c * m), (1 - gain * self.c) * v
            out.append(total)
        return torch.tensor(out)


def ssm_data():
    torch.manual_seed(3)
    x = torch.randn(3, 20, 1) * 1.5
    lengths = torch.tensor([20, 14, 9])
    return LinearGaussianSSM(), x, lengths


def test_fivo_and_iwae_are_lower_bounds_on_an_exact_sequence_model():
    model, x, lengths = ssm_data()
    logp = model.log_marginal(x, lengths)
    torch.manual_seed(4)
    reps = 60
    fivo = torch.stack([seqvae.fivo_bound(model, x, k=16, lengths=lengths) for _ in range(reps)])
    iwae = torch.stack([seqvae.iwae_bound(model, x, k=16, lengths=lengths) for _ in range(reps)])
    elbo = torch.stack([seqvae.elbo(model, x, lengths=lengths) for _ in range(reps)])
    for est in (fivo, iwae, elbo):
        mean, err = est.mean(0), est.std(0) / math.sqrt(reps)
        assert (mean <= logp + 3 * err + 1e-6).all()
    # resampling keeps the particle filter close on long sequences: FIVO is much tighter than IWAE here
    assert ((logp - fivo.mean(0)) < 0.5 * (logp - iwae.mean(0))).all()
    # and with many particles FIVO approaches log p(x)
    big = torch.stack([seqvae.fivo_bound(model, x, k=512, lengths=lengths) for _ in range(5)]).mean(0)
    assert ((logp - big).abs() < 0.25).all()


class LookaheadSSM(LinearGaussianSSM):
    """The same model with a proposal that reads the future: q(z_t | z_{t-1}, x_t, x_{t+1}) =
    N(alpha z_{t-1} + beta x_t + gamma x_{t+1}, e^2) (x_{t+1} = 0 after a sequence's end)."""

    gamma = 0.3

    def precompute(self, x, state=None, mask=None):
        nxt = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)
        if mask is not None:
            nxt = nxt * torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)[..., None]
        return list(zip(x.unbind(1), nxt.unbind(1)))

    def step(self, inputs, state):
        x_t, x_next = inputs
        out, new = super().step(x_t + self.gamma / self.beta * x_next, state)
        return out, new


def test_fivo_with_a_proposal_that_reads_the_future_stays_a_lower_bound():
    model, x, lengths = ssm_data()
    model = LookaheadSSM()
    logp = model.log_marginal(x, lengths)
    torch.manual_seed(7)
    reps = 40
    fivo = torch.stack([seqvae.fivo_bound(model, x, k=16, lengths=lengths) for _ in range(reps)])
    mean, err = fivo.mean(0), fivo.std(0) / math.sqrt(reps)
    assert (mean <= logp + 3 * err + 1e-6).all()
    big = torch.stack([seqvae.fivo_bound(model, x, k=1000, lengths=lengths) for _ in range(4)])
    mean, err = big.mean(0), big.std(0) / 2
    assert (mean <= logp + 3 * err + 1e-6).all()  # a stochastic lower bound: below log p(x) in expectation
    assert ((logp - mean).abs() / lengths < 0.05).all()  # and within 0.05 nats per step at k = 1000


def test_fivo_with_non_finite_weights_returns_non_finite_values_instead_of_failing():
    """A NaN in the weights (a diverged model) must reach the trainer's non-finite guard as a
    value, not stop the run inside the resampling."""
    model, x, lengths = ssm_data()
    x = x.clone()
    x[1, 3, 0] = float("nan")  # a real step of sequence 1
    mask = torch.arange(20)[None] < lengths[:, None]
    value, _ = bound(model, x, name="fivo", k=8, mask=mask)
    assert torch.isnan(value[1]) and torch.isfinite(value[[0, 2]]).all()


def test_fivo_without_resampling_is_iwae():
    model, x, lengths = ssm_data()
    torch.manual_seed(5)
    a = seqvae.fivo_bound(model, x, k=4, lengths=lengths, resample_threshold=0.0)
    torch.manual_seed(5)
    b = seqvae.iwae_bound(model, x, k=4, lengths=lengths)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,k", [("elbo", 1), ("iwae", 4), ("fivo", 4)])
def test_chunked_bound_equals_one_pass(name, k):
    model, x, lengths = ssm_data()
    mask = torch.arange(20)[None] < lengths[:, None]
    torch.manual_seed(6)
    full, _ = bound(model, x, name=name, k=k, mask=mask)
    torch.manual_seed(6)
    carry, total = None, torch.zeros(3)
    for start in range(0, 20, 6):
        value, carry = bound(model, x[:, start : start + 6], name=name, k=k, mask=mask[:, start : start + 6], carry=carry)
        total = total + value
        carry = carry.detach()
    torch.testing.assert_close(total, full, rtol=0, atol=1e-10)


def test_bad_arguments_are_clear_errors():
    model, x, lengths = ssm_data()
    with pytest.raises(ValueError, match="positive integer"):
        seqvae.iwae_bound(model, x, k=0)
    with pytest.raises(ValueError, match="positive integer"):
        seqvae.log_likelihood(model, x, k=-5)
    img_model, img = make_linear_gaussian(exact=True)
    with pytest.raises(ValueError, match="FIVO needs a sequence model"):
        seqvae.fivo_bound(img_model, img, k=2)
    with pytest.raises(ValueError, match="lengths and mask do not apply"):
        seqvae.elbo(img_model, img, lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="ELBO uses one sample"):
        bound(img_model, img, name="elbo", k=3)


def test_carry_start_and_value():
    carry = Carry.start(3, 4, torch.zeros(1))
    assert carry.log_w.shape == (4, 3) and carry.value().abs().max() == 0

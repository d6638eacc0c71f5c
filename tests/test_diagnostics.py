"""Active units and KL per unit against models whose posterior means are known exactly."""

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

from seqvae.data import ImageData, SequenceData
from seqvae.diagnostics import latent_usage
from seqvae.terms import Terms, standard_normal_like


class LinearEncoder(nn.Module):
    """q(z_s | x) = N(scale_s * A x, 0.5^2): unit u of step s has posterior mean scale_s * (A x)_u."""

    def __init__(self, A, step_scales, sequential=False):
        super().__init__()
        self.A, self.step_scales, self.sequential = A, step_scales, sequential
        if sequential:
            self.z_size = A.shape[0]

    def terms(self, x, *, mask=None, state=None):
        if self.sequential:  # x (b, t, d): step t's mean depends on x_t
            loc = torch.einsum("btd,zd->btz", x, self.A) * self.step_scales[: x.shape[1], None]
        else:  # x (b, 1, h, w): every step sees the whole image
            loc = (x.flatten(1) @ self.A.t())[:, None] * self.step_scales[:, None]
        scale = torch.full_like(loc, 0.5)
        q = Independent(Normal(loc, scale), 1)
        log_px = loc.new_zeros(loc.shape[:2])
        return Terms(log_px, q, standard_normal_like(loc), loc, mask), None


def test_image_model_active_units_and_kl():
    torch.manual_seed(0)
    images = (torch.rand(300, 1, 2, 3) > 0.5).to(torch.uint8)
    A = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0.1, 0, 0, 0, 0], [0.5, 0, 0, 0, 0, -0.5]])
    scales = torch.tensor([1.0, 0.0, 2.0])  # step 2 ignores the data
    model = LinearEncoder(A, scales)
    usage = latent_usage(model, ImageData(images, binarize="fixed", name="toy"), batch_size=64)
    x = images.float().flatten(1)
    mu = (x @ A.t())[:, None] * scales[:, None]  # (n, s, z)
    want_var = mu.var(0, unbiased=False)
    torch.testing.assert_close(usage.variance, want_var, rtol=1e-5, atol=1e-7)
    # unit 0 (var 0.25) and unit 3 are active at steps 1 and 3; unit 2 only at step 3 (4 * 0.0025 = 0.01 -> no,
    # since 0.1^2 * 0.25 * 4 = 0.01 is not > 0.01); unit 1 never; nothing at step 2
    assert usage.active.tolist() == [[True, False, False, True], [False, False, False, False], [True, False, False, True]]
    assert usage.active_units == 4
    # KL(N(mu, 0.25) || N(0, 1)) = 0.5 (mu^2 + 0.25 - 1 - log 0.25), averaged over the data
    want_kl = (0.5 * (mu**2 + 0.25 - 1 - torch.log(torch.tensor(0.25)))).mean(0)
    torch.testing.assert_close(usage.kl, want_kl, rtol=1e-5, atol=1e-6)
    assert usage.kl_total == pytest.approx(float(want_kl.sum()), rel=1e-5)
    summary = usage.to_dict()
    assert summary["active_units"] == 4 and summary["active_per_step"] == [2, 0, 2]


def test_sequence_model_pools_over_real_steps_only():
    torch.manual_seed(1)
    lengths = [5, 2, 4, 1]
    seqs = [torch.randn(n, 3) for n in lengths]
    A = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0.05, 0]])
    model = LinearEncoder(A, torch.ones(10), sequential=True)
    usage = latent_usage(model, SequenceData(seqs, name="toy"), batch_size=3)
    real = torch.cat(seqs)  # every real (sequence, step) pair, padding excluded
    mu = real @ A.t()
    torch.testing.assert_close(usage.pooled_variance, mu.var(0, unbiased=False), rtol=1e-5, atol=1e-7)
    assert usage.pooled_active.tolist() == [True, False, False]
    assert usage.active_units == 1 and usage.count.tolist() == [4, 3, 2, 2, 1]
    kl = 0.5 * (mu**2 + 0.25 - 1 - torch.log(torch.tensor(0.25)))
    torch.testing.assert_close(usage.kl_per_unit, kl.mean(0), rtol=1e-5, atol=1e-6)  # nats per time step


def test_prior_relative_criterion_ignores_units_that_only_follow_the_prior():
    class FollowsPrior(LinearEncoder):
        """Posterior mean = prior mean = a function of x: Burda's criterion says active, KL says nothing."""

        def terms(self, x, *, mask=None, state=None):
            terms, _ = super().terms(x, mask=mask)
            loc = terms.posterior.base_dist.loc
            prior = Independent(Normal(loc.clone(), torch.full_like(loc, 0.5)), 1)
            return Terms(terms.log_px, terms.posterior, prior, terms.z, mask), None

    torch.manual_seed(2)
    seqs = [torch.randn(4, 2) for _ in range(6)]
    usage = latent_usage(FollowsPrior(torch.eye(2), torch.ones(4), sequential=True), SequenceData(seqs, name="toy"))
    assert usage.active_units == 2  # Burda: the means vary with x
    assert usage.to_dict()["active_units_relative_to_prior"] == 0 and usage.kl_total == 0


def test_path_noise_is_removed_so_a_unit_that_only_follows_the_sampled_path_is_not_active():
    class PathDependent(LinearEncoder):
        """The posterior mean carries noise from the sampled path: loc = A x + 0.3 eps, fresh eps per call.
        Cov_x(E_q[u]) is Var(A x) exactly: 0.25 for unit 0, 0 for unit 1 (whose one-path variance is 0.09)."""

        def terms(self, x, *, mask=None, state=None):
            terms, _ = super().terms(x, mask=mask)
            loc = terms.posterior.base_dist.loc + 0.3 * torch.randn_like(terms.posterior.base_dist.loc)
            q = Independent(Normal(loc, torch.full_like(loc, 0.5)), 1)
            return Terms(terms.log_px, q, terms.prior, terms.z, mask), None

    torch.manual_seed(3)
    images = (torch.rand(4000, 1, 1, 2) > 0.5).to(torch.uint8)
    model = PathDependent(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(1))
    data = ImageData(images, binarize="fixed", name="toy")
    one = latent_usage(model, data, batch_size=500, samples=1)
    assert one.variance[0, 1] == pytest.approx(0.09, abs=0.01) and one.active_units == 2  # overcounted
    usage = latent_usage(model, data, batch_size=500, samples=8)
    assert usage.variance[0, 0] == pytest.approx(0.25, abs=0.01) and usage.variance[0, 1] == pytest.approx(0.0, abs=0.003)
    assert usage.active_units == 1 and not usage.undecided.any()
    assert usage.path_noise[0].tolist() == pytest.approx([0.09 / 8, 0.09 / 8], rel=0.1)
    summary = usage.to_dict()
    assert summary["posterior_paths"] == 8 and summary["undecided_units"] == 0 and summary["path_noise_corrected"]
    close = latent_usage(model, data, batch_size=500, samples=8, threshold=0.25)  # unit 0 sits on the threshold
    assert close.undecided.tolist() == [[True, False]] and close.to_dict()["undecided_units"] == 1

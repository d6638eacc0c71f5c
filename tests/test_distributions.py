"""Likelihood heads against their densities written out by hand."""

import math

import pytest
import torch

from seqvae.distributions import check_finite, make_head


def test_bernoulli_log_prob_by_hand():
    head = make_head("bernoulli")
    logits = torch.tensor([[0.3, -2.0, 1.5]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    p = torch.sigmoid(logits)
    want = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    torch.testing.assert_close(head(logits).log_prob(x), want)
    torch.testing.assert_close(head.mean(logits), p)
    assert head.num_params(3) == 3


def test_gaussian_log_prob_by_hand_with_scale_floor():
    head = make_head("gaussian", min_scale=0.01)
    loc = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    raw = torch.tensor([[-50.0, 0.3]], dtype=torch.float64)  # the first scale hits the floor
    x = torch.tensor([[0.52, 0.0]], dtype=torch.float64)
    s = torch.nn.functional.softplus(raw) + 0.01
    want = (-0.5 * ((x - loc) / s) ** 2 - s.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(head(torch.cat([loc, raw], -1)).log_prob(x), want)
    assert s[0, 0].item() == pytest.approx(0.01)


def test_gaussian_sigmoid_mean_for_images():
    head = make_head("gaussian", mean="sigmoid")
    params = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(head.mean(params), torch.sigmoid(torch.tensor([[0.0, 2.0]])))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        head.check(torch.tensor([[0.5, 1.5]]))


def test_mixture_log_prob_by_hand():
    head = make_head("mixture", components=2, min_scale=1e-3)
    d = 2
    torch.manual_seed(0)
    params = torch.randn(3, head.num_params(d), dtype=torch.float64)
    x = torch.randn(3, d, dtype=torch.float64)
    logits, loc, raw = params[:, :2], params[:, 2:6].view(3, 2, d), params[:, 6:].view(3, 2, d)
    scale = torch.nn.functional.softplus(raw) + 1e-3
    comp = (-0.5 * ((x[:, None] - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    want = torch.logsumexp(logits.log_softmax(-1) + comp, -1)
    torch.testing.assert_close(head(params).log_prob(x), want)
    torch.testing.assert_close(head.mean(params), (logits.softmax(-1)[..., None] * loc).sum(1))


def test_strokes_bivariate_density_by_hand():
    # Graves (2013) eqs 24-25: N(x | mu, s1, s2, rho) = exp(-Z / (2 (1 - rho^2))) / (2 pi s1 s2 sqrt(1 - rho^2))
    head = make_head("strokes", components=2, min_scale=1e-3)
    torch.manual_seed(1)
    params = torch.randn(4, head.num_params(3), dtype=torch.float64)
    x = torch.cat([torch.randn(4, 2, dtype=torch.float64), torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64)], -1)
    k = 2
    logits, mu = params[:, :k], params[:, k : 3 * k].view(4, k, 2)
    s = torch.nn.functional.softplus(params[:, 3 * k : 5 * k].view(4, k, 2)) + 1e-3
    rho = torch.tanh(params[:, 5 * k : 6 * k]) * (1 - 1e-5)
    eos = params[:, 6 * k]
    d1 = (x[:, None, 0] - mu[..., 0]) / s[..., 0]
    d2 = (x[:, None, 1] - mu[..., 1]) / s[..., 1]
    z = d1**2 + d2**2 - 2 * rho * d1 * d2
    log_n = -z / (2 * (1 - rho**2)) - torch.log(2 * math.pi * s[..., 0] * s[..., 1] * torch.sqrt(1 - rho**2))
    log_offsets = torch.logsumexp(logits.log_softmax(-1) + log_n, -1)
    p_eos = torch.sigmoid(eos)
    want = log_offsets + x[:, 2] * p_eos.log() + (1 - x[:, 2]) * (1 - p_eos).log()
    dist = head(params)
    torch.testing.assert_close(dist.log_prob(x), want)
    assert dist.sample().shape == (4, 3) and dist.event_shape == (3,)


def test_heads_refuse_data_they_cannot_score():
    with pytest.raises(ValueError, match="not binary"):
        make_head("bernoulli").check(torch.tensor([[0.0, 0.5]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        make_head("gaussian").check(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="end-of-stroke"):
        make_head("strokes").check(torch.tensor([[0.1, 0.2, 0.5]]))
    with pytest.raises(ValueError, match="unknown output distribution"):
        make_head("poisson")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_finite_check_finds_one_bad_value_among_values_whose_sum_overflows(bad):
    """check_finite first sums (a finite sum has no NaN or infinite term); huge finite values
    whose sum overflows go to the element-wise test, which passes them and finds one bad value."""
    huge = torch.full((2, 5), 3e38)
    check_finite(huge, "huge")  # the sum is inf, every value finite: no error
    check_finite(torch.tensor([1.0, -1.0, 0.0]), "small")
    huge[1, 3] = bad
    with pytest.raises(ValueError, match="huge holds 1 NaN or infinite value"):
        check_finite(huge, "huge")
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_finite(torch.tensor([0.0, bad, 1.0]), "small")


@pytest.mark.parametrize("path", ["C++", "ATen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_check_finds_one_value_that_is_not_0_or_1_anywhere(path, dtype, monkeypatch):
    """The binary-data check (a C++ pass for CPU float tensors, ATen's operations otherwise) passes
    0/1 data, strided too, and refuses a single other value wherever it lies, in blocks of every thread."""
    from seqvae import distributions, native

    if path == "ATen":
        monkeypatch.setattr(distributions, "helpers_for", lambda x: None)
    elif native.helpers_for(torch.zeros(1)) is None:
        pytest.skip("the C++ extension could not be built here (see the warning); the ATen case runs")
    head = make_head("bernoulli")
    x = (torch.rand(64, 50, 41, generator=torch.Generator().manual_seed(0)) > 0.5).to(dtype)  # 131,200 values
    head.check(x)
    head.check(x.transpose(0, 1))
    head.check(torch.ones(3, 1, dtype=dtype))
    for value in (0.5, 2.0, -1.0, 1e-30, 1 - 1e-7, float("inf"), float("nan")):
        for pos in (0, 65_535, 65_536, x.numel() - 1):
            y = x.clone()
            y.view(-1)[pos] = value
            if dtype == torch.float32 and value == 1 - 1e-7:
                assert y.view(-1)[pos] != 1  # (still not 1 in float32)
            with pytest.raises(ValueError, match="not binary|NaN or infinite"):
                head.check(y)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's forward-mode AD uses it)
@pytest.mark.parametrize("path", ["C++", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bernoulli_log_prob_and_its_gradient_equal_torchs(path, dtype, monkeypatch):
    """BernoulliLogits.log_prob (one C++ pass each way for (b, t, d) CPU tensors, in tiles of rows)
    against torch's Bernoulli: time-major logits over many tiles with a partial last one, extreme
    logits, and second derivatives (create_graph=True computes the gradient with autograd operations)."""
    from torch.distributions import Bernoulli, Independent

    from seqvae import distributions, native

    if path == "torch":
        monkeypatch.setattr(distributions, "helpers_for", lambda *ts: None)
    elif native.helpers_for(torch.zeros(1)) is None:
        pytest.skip("the C++ extension could not be built here (see the warning); the torch case runs")
    g = torch.Generator().manual_seed(0)
    b, t, d = 61, 29, 28  # 1769 rows of 28: tiles of 73 rows, the last partial
    logits = (torch.randn(t, b, d, generator=g, dtype=torch.float64) * 8).transpose(0, 1)  # a (b, t, d) view
    logits[0, 0, :6] = torch.tensor([100.0, -100.0, 30.0, -30.0, 0.0, 1e-8])
    x = (torch.rand(b, t, d, generator=g) > 0.5).to(dtype)
    got_logits = logits.to(dtype).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    exact = logits.clone().requires_grad_()
    dist = make_head("bernoulli")(got_logits)
    lp = dist.log_prob(x)
    want = Independent(Bernoulli(logits=exact), 1).log_prob(x.double())
    assert (lp.grad_fn.name() == "_BernoulliLogProbBackward") == (path == "C++")
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-4)
    torch.testing.assert_close(lp.double(), want.detach(), **tol)
    weights = torch.randn(b, t, generator=g, dtype=torch.float64)
    grad_tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    (plain,) = torch.autograd.grad((lp * weights.to(dtype)).sum(), got_logits, retain_graph=True)  # the C++ backward
    (grad,) = torch.autograd.grad((lp * weights.to(dtype)).sum(), got_logits, create_graph=True)  # autograd's formula
    (want_grad,) = torch.autograd.grad((want * weights).sum(), exact, create_graph=True)
    torch.testing.assert_close(plain.double(), want_grad.detach(), **grad_tol)
    torch.testing.assert_close(grad.double(), want_grad.detach(), **grad_tol)
    (second,) = torch.autograd.grad(grad.square().sum(), got_logits)
    (want_second,) = torch.autograd.grad(want_grad.square().sum(), exact)
    scale = want_second.abs().max().item()  # (float32: sigmoid' of large logits loses digits either way)
    torch.testing.assert_close(second.double(), want_second, rtol=1e-4 if dtype == torch.float32 else 1e-12,
                               atol=(1e-5 if dtype == torch.float32 else 1e-12) * scale)
    if path == "C++":  # infinite logits give the limits, 0 for the certain value and -inf for the
        inf = float("inf")  # impossible one (torch's Bernoulli gives NaN for some of them)
        edge = torch.tensor([[[inf, -inf, inf, -inf]]], dtype=dtype)
        for values, want_lp in (([1.0, 0.0, 1.0, 0.0], 0.0), ([0.0, 0.0, 1.0, 0.0], -inf), ([1.0, 1.0, 1.0, 0.0], -inf)):
            got = make_head("bernoulli")(edge).log_prob(torch.tensor([[values]], dtype=dtype)).item()
            assert got == want_lp or abs(got - want_lp) < 1e-30, (values, got)  # (float32: exp(-inf) is ~1e-38)
    # a 2-D batch, values that need a gradient, other event dimensions and forward-mode AD take torch's path
    assert make_head("bernoulli")(got_logits[0]).log_prob(x[0]).shape == (t,)
    xg = x.clone().requires_grad_()
    assert make_head("bernoulli")(got_logits).log_prob(xg).grad_fn.name() != "_BernoulliLogProbBackward"
    two = distributions.BernoulliLogits(Bernoulli(logits=got_logits.detach()), 2)
    torch.testing.assert_close(two.log_prob(x), Independent(Bernoulli(logits=got_logits.detach()), 2).log_prob(x))
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(got_logits.detach(), torch.ones_like(got_logits))
        tangent = forward_ad.unpack_dual(make_head("bernoulli")(dual).log_prob(x)).tangent
    torch.testing.assert_close(tangent.double(), (x.double() - torch.sigmoid(logits)).sum(-1), **grad_tol)

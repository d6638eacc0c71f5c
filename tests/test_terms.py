"""Terms.kl(): the analytic KL of diagonal Gaussians summed over units (terms._NormalKL, with its
C++ pass and with ATen's operations) against torch.distributions' kl_divergence: values,
gradients, layouts, and float32 edge values of the scales."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from seqvae import terms
from seqvae.terms import Terms, diagonal_normal, standard_normal_like


@pytest.fixture(params=["C++ pass", "ATen"])
def path(request, monkeypatch):
    if request.param == "ATen":
        monkeypatch.setattr(terms, "_native", lambda *ts: None)
    elif terms._native(torch.zeros(1, 1, 1)) is None:
        pytest.skip("the C++ extension could not be built here (see the warning); the ATen case runs")
    return request.param


def _gaussians(b=5, s=4, z=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m_q, m_p = (torch.randn(b, s, z, generator=g, dtype=dtype) for _ in range(2))
    s_q, s_p = (torch.rand(b, s, z, generator=g, dtype=dtype) * 2 + 0.05 for _ in range(2))
    return [t.requires_grad_() for t in (m_q, s_q, m_p, s_p)]


def _reference(m_q, s_q, m_p, s_p):
    return kl_divergence(Independent(Normal(m_q, s_q), 1), Independent(Normal(m_p, s_p), 1))


def _terms(m_q, s_q, m_p, s_p, mask=None):
    return Terms(m_q.new_zeros(m_q.shape[:2]), diagonal_normal(m_q, s_q), diagonal_normal(m_p, s_p), mask=mask)


def test_kl_and_its_gradients_equal_torch_distributions(path):
    args = _gaussians()
    kl = _terms(*args).kl()
    expected = _reference(*args)
    assert torch.allclose(kl, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(kl.shape, generator=torch.Generator().manual_seed(1), dtype=kl.dtype)
    got = torch.autograd.grad((kl * weights).sum(), args)
    want = torch.autograd.grad((expected * weights).sum(), args)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)


def test_kl_passes_gradcheck(path):
    assert torch.autograd.gradcheck(terms._NormalKL.apply, tuple(_gaussians(b=2, s=3, z=2)))


def test_kl_of_strided_time_major_views_and_masks(path):
    """The models hand over (b, t, z) views of time-major buffers; padded steps are zeroed."""
    g = torch.Generator().manual_seed(2)
    m_q, s_q, m_p, s_p = (x.detach() for x in _gaussians(b=4, s=6, z=5, seed=3))
    time_major = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (m_p, s_p)]
    assert not time_major[0].is_contiguous()
    mask = torch.rand(4, 6, generator=g) > 0.3
    kl = _terms(m_q, s_q, *time_major, mask=mask).kl()
    assert torch.allclose(kl, _reference(m_q, s_q, m_p, s_p) * mask, rtol=1e-12, atol=1e-12)
    assert (kl[~mask] == 0).all()


def test_kl_against_a_standard_normal_prior_and_unit_latents(path):
    """An expanded N(0, I) prior (stride 0), and z of one unit."""
    m_q, s_q, _, _ = _gaussians()
    prior = standard_normal_like(m_q)
    kl = Terms(m_q.new_zeros(5, 4), diagonal_normal(m_q, s_q), prior).kl()
    expected = 0.5 * (s_q**2 + m_q**2 - 1 - 2 * s_q.log()).sum(-1)
    assert torch.allclose(kl, expected, rtol=1e-12, atol=1e-12)
    grad = torch.autograd.grad(kl.sum(), [m_q, s_q])
    assert torch.allclose(grad[0], m_q, rtol=1e-12) and torch.allclose(grad[1], s_q - 1 / s_q, rtol=1e-11)
    one = [t[..., :1] for t in _gaussians(seed=4)]
    assert torch.allclose(_terms(*one).kl(), _reference(*one), rtol=1e-12, atol=1e-12)


def test_float32_kl_at_edge_scales(path):
    """In float32 the C++ pass computes log r by a polynomial with every case selected without
    branches: ordinary, tiny and subnormal ratios (2^-140), a zero posterior scale (KL = inf) and
    NaN must come out as float64's formula says."""
    s_q = torch.tensor([[[1.0, 3e-30, 2.0 ** -140, 0.0, float("nan"), 1e-4, 7.5, 1e15]]])
    s_p = torch.tensor([[[0.5, 1.0, 1.0, 1.0, 1.0, 2.0, 1e-3, 1.0]]])
    m_q = torch.tensor([[[0.3, -1.0, 0.0, 0.0, 0.0, 0.25, 2.0, 0.0]]])
    m_p = torch.zeros_like(m_q)
    for i in range(s_q.shape[-1]):
        args = [t[..., i : i + 1] for t in (m_q, s_q, m_p, s_p)]
        got = _terms(*args).kl().item()
        r = args[1].double() / args[3].double()
        d = (args[0].double() - args[2].double()) / args[3].double()
        want = (0.5 * (r * r + d * d - 1) - r.log()).item()
        if math.isnan(want):
            assert math.isnan(got)
        elif math.isinf(want):
            assert got == want
        else:
            assert got == pytest.approx(want, rel=1e-6), (i, got, want)


def test_second_derivatives_of_the_kl_are_right(path):
    """A backward that records a graph (create_graph=True: Hessians, gradient penalties) gets the
    gradients from autograd operations on the inputs, so that differentiating them again is exact."""
    m_q, s_q, m_p, s_p = _gaussians(b=2, s=2, z=2, seed=5)

    def hessian_of(kl_fn):
        return torch.autograd.functional.hessian(lambda sq: kl_fn(m_q.detach(), sq, m_p.detach(), s_p.detach()).sum(),
                                                 s_q.detach())

    got = hessian_of(lambda *a: _terms(*a).kl())
    want = hessian_of(lambda *a: _reference(*a))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12) and want.abs().sum() > 0
    assert torch.autograd.gradgradcheck(terms._NormalKL.apply, (m_q, s_q, m_p, s_p))


def test_kl_under_torch_func_transforms(path):
    m_q, s_q, m_p, s_p = (t.detach() for t in _gaussians(seed=6))
    got = torch.func.grad(lambda sq: _terms(m_q, sq, m_p, s_p).kl().sum())(s_q)
    want = torch.autograd.grad(_reference(m_q, s_q.requires_grad_(), m_p, s_p).sum(), s_q)[0]
    assert torch.allclose(got, want, rtol=1e-11, atol=1e-12)
    batched = torch.func.vmap(lambda mq: _terms(mq, s_q, m_p, s_p).kl())(m_q[None].expand(3, -1, -1, -1))
    assert torch.allclose(batched[1], _reference(m_q, s_q, m_p, s_p), rtol=1e-12, atol=1e-12)


def test_float32_kl_of_tiny_scales_and_small_kls(path):
    """A prior scale far below 1 / float32's max (1 / s_p would overflow) with an equal posterior
    scale: KL 0 and finite gradients. A small KL keeps the accuracy of summing per unit."""
    tiny = torch.full((1, 1, 2), 1e-39)
    args = [torch.zeros(1, 1, 2, requires_grad=True), tiny.clone().requires_grad_(), torch.zeros(1, 1, 2),
            tiny.clone().requires_grad_()]
    kl = _terms(*args).kl()
    assert kl.item() == 0.0
    grads = torch.autograd.grad(kl.sum(), [args[0], args[1], args[3]])
    assert all(torch.isfinite(g).all() for g in grads)
    m_q, s_q, m_p, s_p = (t.detach() for t in _gaussians(b=64, s=8, z=16, seed=7))
    s_q, m_q = s_p * (1 + 1e-3 * torch.randn_like(s_p)), m_p + 1e-3 * s_p * torch.randn_like(s_p)  # KL ~1e-5
    exact = _reference(m_q, s_q, m_p, s_p)
    got = _terms(*(t.float() for t in (m_q, s_q, m_p, s_p))).kl().double()
    assert ((got - exact).abs() / exact).median() < 2e-2


def test_plain_tensors_only_take_the_cpp_helpers():
    """FakeTensors (shapes only, no data) and other tensor subclasses take ATen's operations."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from seqvae.nets import MLP

    with FakeTensorMode():
        m_q, s_q, m_p, s_p = (torch.ones(2, 3, 4) for _ in range(4))
        assert terms._native(m_q, s_q, m_p, s_p) is None
        assert _terms(m_q, s_q, m_p, s_p).kl().shape == (2, 3)
        assert MLP([4, 5])(torch.ones(2, 3, 4)).shape == (2, 3, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_over_many_tiles_of_rows(path, dtype):
    """The C++ pass takes the rows in tiles (~2048 units each, copied from strided rows): a batch of
    many tiles and a partial last one, of time-major views, against the formula in float64."""
    b, s, z = 67, 29, 16  # 1943 rows of 16 units: tiles of 128 rows, the last partial
    m_q, s_q, m_p, s_p = (t.detach() for t in _gaussians(b=b, s=s, z=z, seed=7))
    args = [t.transpose(0, 1).contiguous().transpose(0, 1).to(dtype).requires_grad_() for t in (m_q, s_q, m_p, s_p)]
    kl = _terms(*args).kl()
    exact = [t.detach().double().requires_grad_() for t in args]
    expected = _reference(*exact)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(kl.double(), expected.detach(), **tol)
    weights = torch.randn(b, s, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    got = torch.autograd.grad((kl * weights.to(dtype)).sum(), args)
    want = torch.autograd.grad((expected * weights).sum(), exact)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=tol["rtol"], atol=tol["atol"] * w.abs().max().item())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's forward-mode AD uses it)
def test_kl_under_forward_mode_ad(path):
    """Dual tensors (torch.autograd.forward_ad) take the formula: the pass has no forward-mode rule."""
    from torch.autograd import forward_ad

    m_q, s_q, m_p, s_p = (t.detach() for t in _gaussians())
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(m_q, torch.ones_like(m_q))
        tangent = forward_ad.unpack_dual(_terms(dual, s_q, m_p, s_p).kl()).tangent
    assert torch.allclose(tangent, ((m_q - m_p) / s_p**2).sum(-1), rtol=1e-12, atol=1e-12)

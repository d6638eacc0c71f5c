"""The filterbank against the paper's equations (Gregor et al. 2015, eqs 19-29), written here
independently, in float64."""

import math

import pytest
import torch

from seqvae import attention as A


def paper_filterbank(g, delta, sigma2, n, size):
    """Eqs 19-20 and 25-26, element by element: mu_i = g + (i - N/2 - 0.5) delta for i = 1..N,
    F[i, a] = exp(-(a - mu_i)^2 / (2 sigma^2)) / Z_i over pixels a = 1..size."""
    b = g.shape[0]
    out = torch.zeros(b, n, size, dtype=torch.float64)
    for k in range(b):
        for i in range(1, n + 1):
            mu = g[k].item() + (i - n / 2 - 0.5) * delta[k].item()
            row = [math.exp(-((a - mu) ** 2) / (2 * sigma2[k].item())) for a in range(1, size + 1)]
            z = sum(row)
            out[k, i - 1] = torch.tensor([r / z for r in row], dtype=torch.float64)
    return out


def test_filterbank_matches_paper_equations():
    g = torch.tensor([14.5, 3.0, 20.25], dtype=torch.float64)
    delta = torch.tensor([2.0, 0.7, 3.3], dtype=torch.float64)
    sigma2 = torch.tensor([1.0, 0.4, 5.0], dtype=torch.float64)
    for n in (1, 2, 5):
        got = A.filterbank(g, delta, sigma2, n, 28)
        assert got.shape == (3, n, 28)
        torch.testing.assert_close(got, paper_filterbank(g, delta, sigma2, n, 28), rtol=1e-12, atol=1e-12)


def test_filter_centres_are_one_indexed_and_symmetric():
    # at the image centre (size+1)/2 = 14.5 with an odd N, the middle filter peaks between pixels 14 and 15
    f = A.filterbank(torch.tensor([14.5]), torch.tensor([1.0]), torch.tensor([0.01]), 3, 28)
    peaks = f[0].argmax(-1) + 1  # back to 1-based pixel numbers
    # the filters are at 13.5, 14.5, 15.5: each splits its mass between two neighbouring pixels
    assert torch.allclose(f[0, 1, 13], f[0, 1, 14])
    assert peaks.tolist() in ([13, 14, 15], [14, 15, 16])
    # an integer centre with N=1 puts all mass on that pixel
    f1 = A.filterbank(torch.tensor([7.0]), torch.tensor([1.0]), torch.tensor([1e-4]), 1, 10)
    assert f1[0, 0, 6].item() == pytest.approx(1.0)


def test_rows_sum_to_one_and_never_nan():
    g = torch.tensor([-500.0, 14.5, 1e4])
    delta = torch.tensor([1.0, 1.0, 1.0])
    sigma2 = torch.tensor([1e-30, 1e-30, 1e-30])  # vanishing variance, far outside the image
    f = A.filterbank(g, delta, sigma2, 5, 28)
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f.sum(-1), torch.ones(3, 5))


def test_full_resolution_read_returns_the_image():
    # N = image size, delta = 1, tiny sigma, gamma = 1: F is the identity, so the glimpse is x
    x = torch.rand(2, 3, 28, 28, dtype=torch.float64)
    centre = torch.full((2,), 14.5, dtype=torch.float64)
    f = A.filterbank(centre, torch.ones(2, dtype=torch.float64), torch.full((2,), 1e-3, dtype=torch.float64), 28, 28)
    torch.testing.assert_close(f[0], torch.eye(28, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(A.glimpse(x, f, f), x, atol=1e-12, rtol=0)
    # and writing the image back through the transposed filters is the identity too
    torch.testing.assert_close(A.paste(x, f, f), x, atol=1e-12, rtol=0)


def test_attention_params_equations():
    raw = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, math.log(2.0), math.log(0.5), math.log(3.0)]], dtype=torch.float64)
    p = A.attention_params(raw, height=20, width=28, n=5)
    # gX = (A+1)/2 (g~X + 1), gY = (B+1)/2 (g~Y + 1), delta = (max(A,B)-1)/(N-1) delta~
    torch.testing.assert_close(p.gx, torch.tensor([14.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p.gy, torch.tensor([10.5, 21.0], dtype=torch.float64))
    torch.testing.assert_close(p.delta, torch.tensor([27 / 4, 27 / 8], dtype=torch.float64))
    torch.testing.assert_close(p.sigma2, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(p.gamma, torch.tensor([1.0, 3.0], dtype=torch.float64))
    # N = 1: a single filter at the centre; no division by N - 1 = 0
    p1 = A.attention_params(raw, height=20, width=28, n=1)
    assert torch.isfinite(p1.delta).all()


def test_filterbank_gradcheck():
    g = torch.tensor([10.3, 17.9], dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([1.7, 0.9], dtype=torch.float64, requires_grad=True)
    sigma2 = torch.tensor([0.8, 2.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: A.filterbank(a, b, c, 4, 12), (g, delta, sigma2))


def test_glimpse_and_paste_gradcheck():
    torch.manual_seed(1)
    fy = torch.rand(2, 3, 7, dtype=torch.float64).softmax(-1).requires_grad_()
    fx = torch.rand(2, 3, 6, dtype=torch.float64).softmax(-1).requires_grad_()
    img = torch.rand(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    patch = torch.rand(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(A.glimpse, (img, fy, fx))
    assert torch.autograd.gradcheck(A.paste, (patch, fy, fx))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 20, 32)])
def test_filterbanks_module_equals_pure_functions(shape):
    c, h, w = shape
    torch.manual_seed(2)
    raw = torch.randn(4, 5, dtype=torch.float64)
    fb = A.Filterbanks(h, w, 5).double()
    fy, fx, att = fb(raw)
    ref = A.attention_params(raw, h, w, 5)
    for got, want in zip(att, ref):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(fy, A.filterbank(ref.gy, ref.delta, ref.sigma2, 5, h))
    torch.testing.assert_close(fx, A.filterbank(ref.gx, ref.delta, ref.sigma2, 5, w))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 20, 32)])
def test_read_head_is_gamma_times_glimpse_of_x_and_error(shape):
    c, h, w = shape
    torch.manual_seed(3)
    head = A.FilterbankRead(image_shape=shape, hidden_size=6, n=4).double()
    x, x_hat, h_dec = torch.rand(2, c, h, w, dtype=torch.float64), torch.randn(2, c, h, w, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    r, att = head(x, x_hat, h_dec)
    fy = A.filterbank(att.gy, att.delta, att.sigma2, 4, h)
    fx = A.filterbank(att.gx, att.delta, att.sigma2, 4, w)
    want = att.gamma[:, None, None, None] * A.glimpse(torch.cat([x, x_hat], 1), fy, fx)  # (b, 2c, n, n)
    # the head lists the values in (i, channel, j) order
    torch.testing.assert_close(r, want.permute(0, 2, 1, 3).reshape(2, -1))
    assert r.shape == (2, head.out_size) == (2, 2 * c * 16)


@pytest.mark.parametrize("shape", [(1, 28, 28), (2, 20, 32)])
def test_write_head_is_paste_over_gamma(shape):
    c, h, w = shape
    head = A.FilterbankWrite(canvas_shape=shape, hidden_size=6, n=3).double()
    h_dec = torch.randn(2, 6, dtype=torch.float64)
    canvas, att = head(h_dec)
    out = h_dec @ head.proj.weight.t() + head.proj.bias
    patch = out[:, : c * 9].view(2, c, 3, 3)
    fy = A.filterbank(att.gy, att.delta, att.sigma2, 3, h)
    fx = A.filterbank(att.gx, att.delta, att.sigma2, 3, w)
    torch.testing.assert_close(canvas, A.paste(patch, fy, fx) / att.gamma[:, None, None, None])


def test_read_and_write_heads_have_their_own_parameters():
    r = A.make_read_head("filterbank", image_shape=(1, 28, 28), hidden_size=8, n=2)
    w = A.make_write_head("filterbank", canvas_shape=(1, 28, 28), hidden_size=8, n=5)
    assert not set(map(id, r.parameters())) & set(map(id, w.parameters()))
    assert r.n == 2 and w.n == 5


def test_glimpse_box_known_answer():
    params = A.AttentionParams(
        gx=torch.tensor([14.5]), gy=torch.tensor([10.0]), delta=torch.tensor([2.0]), sigma2=torch.tensor([1.0]), gamma=torch.tensor([1.0])
    )
    # N = 3, delta = 2: centres at g-2, g, g+2; cells of width 2 -> the box is g -/+ 3
    torch.testing.assert_close(A.glimpse_box(params, 3), torch.tensor([[11.5, 7.0, 17.5, 13.0]]))


def test_bad_heads_are_clear_errors():
    with pytest.raises(ValueError, match="unknown read head 'gaussian'"):
        A.make_read_head("gaussian", image_shape=(1, 28, 28), hidden_size=4, n=2)
    with pytest.raises(ValueError, match="larger than the image"):
        A.make_write_head("filterbank", canvas_shape=(1, 28, 28), hidden_size=4, n=29)
    with pytest.raises(ValueError, match="positive integer"):
        A.make_read_head("filterbank", image_shape=(1, 28, 28), hidden_size=4, n=0)

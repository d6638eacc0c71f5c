"""Read and write heads for DRAW (Gregor et al. 2015, section 3).

Dimensions: b batch, c channels, h w image height and width (B and A in the paper),
n glimpse size (N), i j filter indices along y and x.

Coordinates follow the paper: pixel columns a = 1..A (width), rows b = 1..B (height), so
the centre of the image is ((A + 1) / 2, (B + 1) / 2); filters are numbered i = 1..N.
The same filters are applied to every channel of a C-channel image.

The filterbank maths are pure functions (`attention_params`, `filterbank`, `glimpse`,
`paste`, `glimpse_box`); the heads are small modules around them, chosen by name with
`make_read_head` / `make_write_head` ("none" or "filterbank").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .linear import StepLinear

__all__ = [
    "AttentionParams",
    "attention_params",
    "filterbank",
    "glimpse",
    "paste",
    "glimpse_box",
    "Filterbanks",
    "NoRead",
    "FilterbankRead",
    "NoWrite",
    "FilterbankWrite",
    "make_read_head",
    "make_write_head",
    "HEADS",
]

HEADS = ("none", "filterbank")


class AttentionParams(NamedTuple):
    """The five attention parameters of one glimpse, each of shape (b,), in pixel units.

    gx, gy: grid centre (1-based pixel coordinates); delta: stride between filter centres;
    sigma2: variance of each Gaussian filter; gamma: intensity.
    """

    gx: Tensor
    gy: Tensor
    delta: Tensor
    sigma2: Tensor
    gamma: Tensor


def attention_params(raw: Tensor, height: int, width: int, n: int) -> AttentionParams:
    """Map the linear output (g~X, g~Y, log sigma^2, log delta~, log gamma) to pixel units.

    Paper eqs 21-24 for an A x B image (A = width, B = height):
        gX = (A + 1) / 2 * (g~X + 1),  gY = (B + 1) / 2 * (g~Y + 1),
        delta = (max(A, B) - 1) / (N - 1) * delta~.
    With N = 1 there is a single filter at the grid centre and the stride is irrelevant;
    the factor then uses N - 1 := 1 instead of dividing by zero.

    raw: (b, 5). Returns AttentionParams of (b,) tensors.
    """
    if raw.shape[-1] != 5:
        raise ValueError(f"attention parameters need 5 values per example, got shape {tuple(raw.shape)}")
    gx_, gy_, log_sigma2, log_delta_, log_gamma = raw.unbind(-1)
    gx = (width + 1) / 2 * (gx_ + 1)
    gy = (height + 1) / 2 * (gy_ + 1)
    delta = (max(width, height) - 1) / max(n - 1, 1) * log_delta_.clamp(max=_LOG_MAX).exp()
    return AttentionParams(gx, gy, delta, log_sigma2.clamp(max=_LOG_MAX).exp(), log_gamma.clamp(max=_LOG_MAX).exp())


_FAR = 1e15  # pixels: filter means and strides are kept within +-_FAR (see filterbank)
_SIGMA2_MIN = 1e-12  # squared pixels: variances are floored here (see filterbank)
_LOG_MAX = 80.0  # log sigma^2, log delta~, log gamma are clamped here before exp (exp(89) is inf in float32)


def filterbank(center: Tensor, delta: Tensor, sigma2: Tensor, n: int, size: int) -> Tensor:
    """The normalised Gaussian filterbank along one image axis (paper eqs 19-20, 25-26).

    Filter i = 1..n has mean mu_i = center + (i - n/2 - 0.5) * delta; its row over pixels
    a = 1..size is exp(-(a - mu_i)^2 / (2 sigma2)) normalised to sum to 1. The
    normalisation is a softmax over a: the largest term is subtracted before exponentiating,
    so the denominator is at least 1 and can never be zero, even for a filter that lies far
    outside the image or has a vanishing variance. For any finite input the filters and
    their gradients are finite: sigma2 is floored at 1e-12, the stride and the means are kept
    within +-1e15 pixels (float32 cannot tell pixels apart that far out anyway).

    center, delta, sigma2: (b,). Returns (b, n, size).
    """
    dtype, device = center.dtype, center.device
    work = torch.promote_types(dtype, torch.float32)  # half precision would overflow the squares below
    center, delta, sigma2 = center.to(work), delta.to(work), sigma2.to(work)
    i = torch.arange(1, n + 1, dtype=work, device=device)  # (n,)
    a = torch.arange(1, size + 1, dtype=work, device=device)  # (size,)
    # Means beyond +-1e15 pixels are moved to +-1e15: float32 cannot tell pixels apart that far
    # out anyway (its spacing there is ~1e8), and the squares stay finite.
    mu = (center[:, None] + (i - n / 2 - 0.5) * delta.clamp(-_FAR, _FAR)[:, None]).clamp(-_FAR, _FAR)  # (b, n)
    sq = (a - mu[:, :, None]) ** 2  # (b, n, size)
    sq = sq - sq.amin(dim=-1, keepdim=True)  # the nearest pixel's logit is exactly 0 (softmax is shift-invariant)
    # A variance below 1e-12 px^2 (exp(log sigma^2) underflows to 0 below -88.7 in float32) is
    # floored there: the filter is one-hot either way, and the forward (-sq * coef, finite or
    # -inf) and the backward (1 / sigma^4 stays finite) never meet 0 * inf.
    coef = (2 * sigma2.clamp_min(_SIGMA2_MIN)).reciprocal()[:, None, None]
    return (-sq * coef).softmax(dim=-1).to(dtype)


def glimpse(image: Tensor, fy: Tensor, fx: Tensor) -> Tensor:
    """F_Y x F_X^T for every channel (paper eq 27 without gamma): (b,c,h,w) -> (b,c,n,n)."""
    return torch.einsum("bih,bchw,bjw->bcij", fy, image, fx)


def paste(patch: Tensor, fy: Tensor, fx: Tensor) -> Tensor:
    """F_Y^T w F_X for every channel (paper eq 29 without 1/gamma): (b,c,n,n) -> (b,c,h,w)."""
    return torch.einsum("bih,bcij,bjw->bchw", fy, patch, fx)


def glimpse_box(params: AttentionParams, n: int) -> Tensor:
    """The rectangle a glimpse covers, as (b, 4) edges (x0, y0, x1, y1) in pixel units.

    Filter centres run from g - (n-1)/2 delta to g + (n-1)/2 delta; each filter stands for a
    cell of width delta around its centre, so the box is g -/+ n * delta / 2 on each axis.
    Pixel a (1-based) covers [a - 1/2, a + 1/2]; subtract 1 to draw over a 0-based image
    (matplotlib's imshow puts pixel centres at 0, 1, ...).
    """
    half = n * params.delta / 2
    return torch.stack([params.gx - half, params.gy - half, params.gx + half, params.gy + half], dim=-1)


def _init_attention_linear(linear: StepLinear, rows: slice, height: int, width: int, n: int) -> None:
    """Start every glimpse centred with its N filters tiling the whole image.

    The paper does not say how the attention parameters start. With delta~ = 1 and sigma^2 = 1
    a 2x2 read would put its two filters on the image border with pinpoint width, and read
    almost nothing. Here delta~ = (N-1)/N, so that the N cells of width delta span the image,
    sigma = delta / 2 so that neighbouring cells blur into each other, gamma = 1 and g~ = 0
    (the centre): zero weights would fix these values; small weights let the decoder move them.
    """
    size = max(height, width)
    delta_tilde = (n - 1) / n if n > 1 else 1.0
    delta = (size - 1) / max(n - 1, 1) * delta_tilde if n > 1 else (size - 1) / 2
    bias = torch.tensor([0.0, 0.0, math.log((delta / 2) ** 2), math.log(delta_tilde), 0.0])
    with torch.no_grad():
        linear.bias[rows].copy_(bias)
        linear.weight[rows].mul_(0.1)


class Filterbanks(nn.Module):
    """Both axes' filterbanks of one head, from the raw linear output, in a handful of ops.

    Numerically the same as `attention_params` followed by `filterbank` on each axis (the
    tests compare them), but the x and y filters are built together over a precomputed
    pixel grid; this runs at every glimpse, so it is written for few tensor operations.
    Returns fy (b, n, h), fx (b, n, w) and the AttentionParams.
    """

    def __init__(self, height: int, width: int, n: int):
        super().__init__()
        self.height, self.width, self.n = height, width, n
        size = max(height, width)
        self.stride = (size - 1) / max(n - 1, 1)
        self.register_buffer("half_size", torch.tensor([[(width + 1) / 2, (height + 1) / 2]]), persistent=False)  # (1, 2)
        self.register_buffer("offsets", torch.arange(1, n + 1, dtype=torch.float32) - n / 2 - 0.5, persistent=False)
        self.register_buffer("grid", torch.arange(1, size + 1, dtype=torch.float32), persistent=False)  # (size,)
        # For a non-square image the shorter axis is padded with pixels of zero weight.
        pad = torch.zeros(2, 1, size)
        pad[0, :, width:] = float("-inf")
        pad[1, :, height:] = float("-inf")
        self.register_buffer("pad", pad if height != width else None, persistent=False)

    def params(self, raw: Tensor) -> AttentionParams:
        """The attention parameters (..., ) in pixel units of raw (..., 5) = (g~X, g~Y, log sigma^2,
        log delta~, log gamma) (eqs 22-24); the same values `forward` returns."""
        g, logs = raw.split([2, 3], dim=-1)
        centre = torch.addcmul(self.half_size, g, self.half_size)  # (..., 2): gx, gy  (eqs 22-23)
        e = logs.clamp(max=_LOG_MAX).exp()  # (..., 3): sigma2, delta~, gamma; finite (see _LOG_MAX)
        sigma2, delta, gamma = e.unbind(-1)
        gx, gy = centre.unbind(-1)
        return AttentionParams(gx, gy, delta * self.stride, sigma2, gamma)  # delta: eq 24

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor, AttentionParams]:
        fy, fx, att, _ = self.forward_saving(raw)
        return fy, fx, att

    def forward_saving(self, raw: Tensor) -> tuple[Tensor, Tensor, AttentionParams, tuple]:
        """forward, and what `backward` needs. raw (b, 5)."""
        att = self.params(raw)
        centre = torch.stack([att.gx, att.gy], dim=1)  # (b, 2)
        mu = torch.addcmul(centre.unsqueeze(-1), att.delta.clamp(max=_FAR).view(-1, 1, 1), self.offsets)  # (b, 2, n)  (eqs 19-20)
        diff = self.grid - mu.clamp(-_FAR, _FAR).unsqueeze(-1)  # (b, 2, n, size)
        sq = diff.square()
        # the nearest real pixel's logit is exactly 0; coef is finite (see filterbank)
        sq = sq - (sq if self.pad is None else sq - self.pad).amin(dim=-1, keepdim=True)
        coef = (att.sigma2.clamp_min(_SIGMA2_MIN) * -2).reciprocal().view(-1, 1, 1, 1)  # -1 / (2 sigma^2)
        logits = sq * coef  # (b, 2, n, size)
        if self.pad is not None:
            logits = logits + self.pad
        both = logits.softmax(dim=-1)  # rows sum to 1; denominator >= 1 (see filterbank)
        fx, fy = both.unbind(1)
        if self.pad is not None:
            fx, fy = fx[..., : self.width], fy[..., : self.height]
        return fy, fx, att, (raw, att, mu, diff, sq, coef, both)

    def backward(self, saved: tuple, dfy: Tensor, dfx: Tensor, dgamma: Tensor) -> Tensor:
        """The gradient of raw (b, 5) given those of fy, fx and gamma (the hand-written backward
        of forward_saving, for fused.py; equal to autograd's, see the tests):

            F = softmax(l):              dl = F (dF - sum_a dF F)
            l = coef (a - mu)^2 + const: dmu = -2 coef sum_a dl (a - mu),  dcoef = sum dl (a - mu)^2
                                         (the row's shift cancels in the softmax)
            coef = -1 / (2 sigma^2):     dsigma^2 = 2 coef^2 dcoef
            mu = g + offset_i delta:     dg = sum_i dmu, ddelta = sum_i offset_i dmu
            then through g = (s+1)/2 (g~ + 1) and the exponentials of the logs.
        """
        raw, att, mu, diff, sq, coef, both = saved
        if self.pad is None:
            dboth = torch.stack([dfx, dfy], dim=1)  # (b, 2, n, size)
        else:
            dboth = both.new_zeros(both.shape)
            dboth[:, 0, :, : self.width] = dfx
            dboth[:, 1, :, : self.height] = dfy
        dlogits = both * (dboth - (dboth * both).sum(-1, keepdim=True))
        dcoef = (dlogits * sq).sum((1, 2, 3))  # (b,)
        dmu = (dlogits * diff).sum(-1).mul_(-2 * coef.view(-1, 1, 1)).masked_fill_(mu.abs() > _FAR, 0)  # (b, 2, n)
        ddelta = (dmu * self.offsets).sum((1, 2)).masked_fill_(att.delta > _FAR, 0)
        dsigma2 = (dcoef * 2 * coef.view(-1).square()).masked_fill_(att.sigma2 < _SIGMA2_MIN, 0)
        logs = raw[:, 2:]
        de = torch.stack([dsigma2, ddelta * self.stride, dgamma], dim=1)  # (b, 3)
        dlogs = (de * logs.clamp(max=_LOG_MAX).exp()).masked_fill_(logs > _LOG_MAX, 0)
        return torch.cat([dmu.sum(-1) * self.half_size, dlogs], dim=1)


class NoRead(nn.Module):
    """read(x, x_hat, h_dec) = [x, x_hat]: the whole image and error image (paper eq 17)."""

    def __init__(self, *, image_shape: tuple[int, int, int], hidden_size: int):
        super().__init__()
        c, h, w = image_shape
        self.out_size = 2 * c * h * w

    def forward(self, x: Tensor, x_hat: Tensor, h_dec: Tensor) -> tuple[Tensor, None]:
        return torch.cat([x.flatten(1), x_hat.flatten(1)], dim=1), None


class FilterbankRead(nn.Module):
    """read = gamma [F_Y x F_X^T, F_Y x_hat F_X^T] with its own (N, W) (paper eq 27).

    The glimpse is `glimpse` computed as two batched matrix products over the image laid out
    as (b, h, 2c, w), so that no channel needs its own product; the output vector lists the
    values in (i, channel, j) order, which is only the encoder's input convention.
    """

    def __init__(self, *, image_shape: tuple[int, int, int], hidden_size: int, n: int):
        super().__init__()
        self.channels, self.height, self.width = image_shape
        self.n = n
        self.to_params = StepLinear(hidden_size, 5)
        _init_attention_linear(self.to_params, slice(0, 5), self.height, self.width, n)
        self.filters = Filterbanks(self.height, self.width, n)
        self.out_size = 2 * self.channels * n * n

    def forward(self, x: Tensor, x_hat: Tensor, h_dec: Tensor) -> tuple[Tensor, AttentionParams]:
        b, c, h, w = x.shape
        fy, fx, att = self.filters(self.to_params(h_dec))
        both = torch.cat([x.transpose(1, 2), x_hat.transpose(1, 2)], dim=2)  # (b, h, 2c, w)
        u = torch.bmm(fy, both.view(b, h, 2 * c * w))  # (b, n, 2c*w)
        r = torch.bmm(u.view(b, self.n * 2 * c, w), fx.transpose(1, 2))  # (b, n*2c, n)
        return r.view(b, -1) * att.gamma.unsqueeze(-1), att


class NoWrite(nn.Module):
    """write(h_dec) = W(h_dec): a whole canvas update from a linear layer (paper eq 18)."""

    def __init__(self, *, canvas_shape: tuple[int, int, int], hidden_size: int):
        super().__init__()
        self.canvas_shape = canvas_shape
        c, h, w = canvas_shape
        self.to_canvas = StepLinear(hidden_size, c * h * w)

    def forward(self, h_dec: Tensor) -> tuple[Tensor, None]:
        return self.to_canvas(h_dec).view(-1, *self.canvas_shape), None


class FilterbankWrite(nn.Module):
    """write = 1/gamma^ F^_Y^T w_t F^_X with w_t = W(h_dec) an N x N patch per channel (eqs 28-29).

    The write head has its own attention parameters (its own linear layer, its own N),
    independent of the read head. One linear layer gives the patch and the five parameters.
    """

    def __init__(self, *, canvas_shape: tuple[int, int, int], hidden_size: int, n: int):
        super().__init__()
        self.channels, self.height, self.width = canvas_shape
        self.n = n
        self.patch_size = self.channels * n * n
        self.proj = StepLinear(hidden_size, self.patch_size + 5)  # [patch (c n n), attention (5)]
        _init_attention_linear(self.proj, slice(self.patch_size, self.patch_size + 5), self.height, self.width, n)
        self.filters = Filterbanks(self.height, self.width, n)

    def forward(self, h_dec: Tensor) -> tuple[Tensor, AttentionParams]:
        b, c, n = h_dec.shape[0], self.channels, self.n
        patch, raw = self.proj(h_dec).split([self.patch_size, 5], dim=1)
        fy, fx, att = self.filters(raw)
        patch = patch / att.gamma.unsqueeze(-1)  # (b, c*n*n)
        u = torch.bmm(patch.view(b, c * n, n), fx)  # (b, c*n, w)
        if c == 1:
            return torch.bmm(fy.transpose(1, 2), u).unsqueeze(1), att  # (b, 1, h, w)
        canvas = torch.matmul(fy.transpose(1, 2).unsqueeze(1), u.view(b, c, n, self.width))  # (b, c, h, w)
        return canvas, att


def _check_head(kind: str, name: str, n: int, height: int, width: int) -> None:
    if name not in HEADS:
        raise ValueError(f"unknown {kind} head {name!r}: expected one of {', '.join(HEADS)}")
    if name == "filterbank":
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{kind} glimpse size N must be a positive integer, got {n!r}")
        if n > max(height, width):
            raise ValueError(
                f"{kind} glimpse size N={n} is larger than the image ({height}x{width}): "
                f"expected 1 <= N <= {max(height, width)}"
            )


def make_read_head(name: str, *, image_shape: tuple[int, int, int], hidden_size: int, n: int) -> nn.Module:
    """A read head by name: "none" (eq 17) or "filterbank" (eq 27, glimpse size n)."""
    _check_head("read", name, n, image_shape[1], image_shape[2])
    if name == "none":
        return NoRead(image_shape=image_shape, hidden_size=hidden_size)
    return FilterbankRead(image_shape=image_shape, hidden_size=hidden_size, n=n)


def make_write_head(name: str, *, canvas_shape: tuple[int, int, int], hidden_size: int, n: int) -> nn.Module:
    """A write head by name: "none" (eq 18) or "filterbank" (eq 29, patch size n)."""
    _check_head("write", name, n, canvas_shape[1], canvas_shape[2])
    if name == "none":
        return NoWrite(canvas_shape=canvas_shape, hidden_size=hidden_size)
    return FilterbankWrite(canvas_shape=canvas_shape, hidden_size=hidden_size, n=n)

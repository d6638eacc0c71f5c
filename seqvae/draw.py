"""DRAW: a recurrent VAE that draws an image on a canvas, glimpse by glimpse.

Gregor, Danihelka, Graves, Rezende & Wierstra (2015), "DRAW: A Recurrent Neural Network
For Image Generation", section 2. For t = 1..T (paper eqs 3-8):

    x^_t    = x - sigmoid(c_{t-1})                       error image
    r_t     = read(x, x^_t, h^dec_{t-1})                 read head (attention.py)
    h^enc_t = LSTM^enc(h^enc_{t-1}, [r_t, h^dec_{t-1}])
    z_t     ~ q(z_t | h^enc_t) = N(mu_t, sigma_t^2 I),   mu_t = W h^enc_t, sigma_t = exp(W' h^enc_t)
    h^dec_t = LSTM^dec(h^dec_{t-1}, z_t)
    c_t     = c_{t-1} + write(h^dec_t)                   write head (attention.py)

and x is scored once, by D(x | c_T) (a Bernoulli on the logits c_T for binary images, or a
Gaussian for grey/colour images in [0, 1]). The prior is p(z_t) = N(0, I) at every step; the
KL term is analytic per step (see terms.py). Generation runs the decoder alone: z_t ~ N(0, I),
h^dec_t = LSTM^dec(h^dec_{t-1}, z_t), c_t = c_{t-1} + write(h^dec_t).

On the recurrent contract (recurrent.py) a glimpse is one `step(x, state)`; with no image
(`step(None, state)`) the step generates. `score(x, outs, state)` gives the terms: log D(x | c_T)
from the final state and the per-glimpse q(z_t | x, z_<t) and p(z_t). DRAW is not
`sequential`: every step sees the whole image, which is scored once (no masks, no FIVO).
On a CPU, passes that need gradients run the T glimpses as one hand-written kernel
(`fused_unroll`, fused.py), tested equal to the step loop.

The initial canvas c_0 and initial LSTM states are learned biases (initialised at zero).
The sigmoid in x^_t is applied to the mean channels of the canvas; for a Gaussian likelihood
the canvas has two channels per image channel (mean logits, then scale), written by the
same write head.

Dimensions: b batch, t glimpse steps, c channels, h w image height and width,
z latent units, d hidden units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import fused
from .attention import HEADS, AttentionParams, make_read_head, make_write_head
from .cells import CellState, LSTMCell
from .configs import check, configure
from .distributions import make_head
from .linear import StepLinear
from .recurrent import RecurrentModel, generate, unroll
from .terms import Terms, diagonal_normal, standard_normal_like

__all__ = ["DRAW", "DrawConfig", "DrawState", "DrawStep", "DrawTrace", "IMAGE_LIKELIHOODS"]

IMAGE_LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass
class DrawConfig:
    """Everything that defines a DRAW network; `DRAW.from_config(cfg)` rebuilds it."""

    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W); set from the data unless given
    steps: int = 64  # glimpses T (the canvas is written T times)
    hidden_size: int = 256  # units of the encoder and decoder LSTMs
    z_size: int = 100  # latent units per glimpse
    read: str = "filterbank"  # read head: none (the whole image, eq 17) | filterbank (an N x N Gaussian glimpse, eqs 19-27)
    write: str = "filterbank"  # write head: none (eq 18) | filterbank (eq 29)
    read_size: int = 2  # N of the read filterbank
    write_size: int = 5  # N of the write filterbank
    likelihood: str = "bernoulli"  # bernoulli (binary images) | gaussian (grey or colour values in [0, 1])

    def validate(self) -> "DrawConfig":
        check(len(self.image_shape) == 3, f"model.image_shape must be 3 sizes (C, H, W), got {self.image_shape}")
        self.image_shape = tuple(int(s) for s in self.image_shape)
        c, h, w = self.image_shape
        check(c >= 1 and h >= 1 and w >= 1, f"model.image_shape must be 3 positive sizes (C, H, W), got {self.image_shape}")
        check(self.steps >= 1, f"model.steps (T) must be at least 1, got {self.steps}")
        check(self.hidden_size >= 1, f"model.hidden_size must be at least 1, got {self.hidden_size}")
        check(self.z_size >= 1, f"model.z_size must be at least 1, got {self.z_size}")
        for key in ("read", "write"):
            value = getattr(self, key)
            check(value in HEADS, f"model.{key} must be one of {', '.join(HEADS)}, got {value!r}")
            if value == "filterbank":
                n = getattr(self, f"{key}_size")
                check(
                    1 <= n <= max(h, w),
                    f"model.{key}_size (N) must lie in 1..{max(h, w)} for a {h}x{w} image, got {n}",
                )
        check(
            self.likelihood in IMAGE_LIKELIHOODS,
            f"model.likelihood must be one of {', '.join(IMAGE_LIKELIHOODS)}, got {self.likelihood!r}",
        )
        return self

    def fit_data(self, info) -> dict[str, Any]:
        """The fields a data set decides (unless set explicitly): the image shape."""
        return {"image_shape": tuple(int(s) for s in info.shape)}

    def check_data(self, info) -> None:
        check(
            tuple(self.image_shape) == tuple(info.shape),
            f"model.image_shape={tuple(self.image_shape)} but {info.name} images are {tuple(info.shape)}",
        )
        check(
            self.likelihood == "bernoulli" or not info.binary,
            f"the {info.name} images are binary but model.likelihood={self.likelihood} is a density: on discrete data its "
            "log-likelihood is not a code length (bits/dim could fall below 0); use model.likelihood=bernoulli",
        )


class DrawState(NamedTuple):
    """The recurrent state between glimpses (every tensor has the batch first)."""

    canvas: Tensor  # (b, p*c, h, w) canvas c_t (p = likelihood parameters per pixel)
    h_enc: Tensor  # (b, d)
    c_enc: Tensor  # (b, d)
    h_dec: Tensor  # (b, d)
    c_dec: Tensor  # (b, d)


class DrawStep(NamedTuple):
    """What one glimpse produced."""

    z: Tensor  # (b, z)
    loc: Tensor  # (b, z) posterior mean (zeros when generating from the prior)
    scale: Tensor  # (b, z) posterior standard deviation (ones when generating)
    read: AttentionParams | None  # None for the "none" head and when generating
    write: AttentionParams | None


@dataclass
class DrawTrace:
    """A whole reconstruction or generation, step by step, for looking inside.

    canvases: (b, t, c, h, w) the mean image sigmoid(c_t) after each step t = 1..T;
    read / write: AttentionParams of (b, t) tensors (None for a "none" head; read is None
    when generating); loc, scale: (b, t, z) posterior parameters (prior's when generating).
    """

    canvases: Tensor
    read: AttentionParams | None
    write: AttentionParams | None
    loc: Tensor
    scale: Tensor

    @property
    def images(self) -> Tensor:
        """The final mean images, (b, c, h, w)."""
        return self.canvases[:, -1]


class DRAW(RecurrentModel):
    """DRAW with read and write heads chosen by name ("none" or "filterbank"):
    `DRAW(config)` or `DRAW(**fields of DrawConfig)`; each head has its own parameters and N."""

    sequential = False  # one image per example, not a sequence: no lengths, no masks

    def __init__(self, config: DrawConfig | None = None, /, **options):
        super().__init__()
        self.config = cfg = configure(DrawConfig, config, options)
        c, h, w = self.image_shape = cfg.image_shape
        self.steps = cfg.steps
        self.z_size = cfg.z_size
        self.likelihood = make_head(cfg.likelihood, mean="sigmoid", min_scale=1.0 / 256)
        self.params_per_pixel = self.likelihood.num_params(1)
        canvas_shape = (c * self.params_per_pixel, h, w)
        d = cfg.hidden_size

        self.read_head = make_read_head(cfg.read, image_shape=self.image_shape, hidden_size=d, n=cfg.read_size)
        self.encoder = LSTMCell([self.read_head.out_size, d], d)
        self.posterior_net = StepLinear(d, 2 * cfg.z_size)  # q(z_t | h^enc_t): mu, log sigma
        self.decoder = LSTMCell(cfg.z_size, d)
        self.write_head = make_write_head(cfg.write, canvas_shape=canvas_shape, hidden_size=d, n=cfg.write_size)

        # learned initial states c_0, h^enc_0, h^dec_0 (and the LSTM cells' c)
        self.canvas0 = nn.Parameter(torch.zeros(canvas_shape))
        self.state0 = nn.Parameter(torch.zeros(4, d))

    @classmethod
    def from_config(cls, config: DrawConfig) -> "DRAW":
        return cls(config)

    def describe(self) -> str:
        """A one-line name for figures."""
        return f"DRAW (T={self.steps}, read {self.config.read}, write {self.config.write})"

    # ------------------------------------------------------------------ recurrent contract
    def initial_state(self, batch_size: int) -> DrawState:
        canvas = self.canvas0.expand(batch_size, *self.canvas0.shape)
        h_enc, c_enc, h_dec, c_dec = (s.expand(batch_size, -1) for s in self.state0)
        return DrawState(canvas, h_enc, c_enc, h_dec, c_dec)

    def precompute(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> list[Tensor]:
        """Every glimpse sees the whole image."""
        return [x] * self.steps

    def step(self, x: Tensor | None, state: DrawState) -> tuple[DrawStep, DrawState]:
        """One glimpse: read x, encode, z_t ~ q, decode, write (eqs 3-8); with x None, z_t ~ N(0, I)
        through the decoder alone (generation)."""
        if x is None:
            z = torch.randn(state.h_dec.shape[0], self.z_size, device=state.h_dec.device, dtype=state.h_dec.dtype)
            loc, scale, read_att = torch.zeros_like(z), torch.ones_like(z), None
            h_enc, c_enc = state.h_enc, state.c_enc
        else:
            x_hat = x - self.mean_image(state.canvas)
            r, read_att = self.read_head(x, x_hat, state.h_dec)
            h_enc, c_enc = self.encoder([r, state.h_dec], CellState(state.h_enc, state.c_enc))
            loc, log_scale = self.posterior_net(h_enc).chunk(2, dim=-1)
            scale = log_scale.exp()
            z = torch.addcmul(loc, scale, torch.randn_like(loc))  # fresh noise at every step
        h_dec, c_dec = self.decoder(z, CellState(state.h_dec, state.c_dec))
        update, write_att = self.write_head(h_dec)
        step = DrawStep(z, loc, scale, read_att, write_att)
        return step, DrawState(state.canvas + update, h_enc, c_enc, h_dec, c_dec)

    def fused_unroll(self, x: Tensor, state: DrawState, mask: Tensor | None) -> tuple[DrawStep, DrawState] | None:
        """All T glimpses as one Function with a hand-written backward (fused.py), when it applies."""
        if not fused.enabled(x, *self.parameters()):
            return None
        canvas, he, ce, hd, cd, q, z, raw_read, raw_write = fused.draw_unroll(self, x, state)
        loc, log_scale = q.transpose(0, 1).chunk(2, dim=-1)  # (b, t, z) views, as the step loop's stacking
        read = self.read_head.filters.params(raw_read.transpose(0, 1)) if self.config.read == "filterbank" else None
        write = self.write_head.filters.params(raw_write.transpose(0, 1)) if self.config.write == "filterbank" else None
        return DrawStep(z.transpose(0, 1), loc, log_scale.exp(), read, write), DrawState(canvas, he, ce, hd, cd)

    def score(self, x: Tensor, outs: DrawStep, state: DrawState) -> Terms:
        """log D(x | c_T) (b, 1) from the final canvas, and q(z_t | ..) and p(z_t) = N(0, I) per glimpse."""
        output = self.likelihood(state.canvas.flatten(1))
        log_px = output.log_prob(x.flatten(1))[:, None]  # (b, 1)
        return Terms(log_px, diagonal_normal(outs.loc, outs.scale), standard_normal_like(outs.loc), outs.z, output=output)

    def mean_image(self, canvas: Tensor) -> Tensor:
        """The likelihood's mean image for a canvas: sigmoid(c) of the mean channels, (b, c, h, w)."""
        b = canvas.shape[0]
        return self.likelihood.mean(canvas.reshape(b, -1)).view(b, *self.image_shape)

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Raise ValueError unless x is a batch of images this model can score."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        c, h, w = self.image_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            hint = ""
            if x.dim() == 4 and x.shape[2:] == (h, w) and x.shape[1] != c:
                hint = f" (the model was built for {c} channel(s), the data has {x.shape[1]})"
            raise ValueError(
                f"expected images of shape (batch, {c}, {h}, {w}), got {tuple(x.shape)}{hint}"
            )
        if x.shape[0] == 0:
            raise ValueError("expected at least one image, got an empty batch")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point images, got dtype {x.dtype}; convert with x.float()")
        self.likelihood.check(x, "the images")

    # ------------------------------------------------------------------ looking inside
    def _trace(self, run) -> DrawTrace:
        outs, states = run.outs, run.states
        b, t = states.canvas.shape[:2]
        canvases = self.mean_image(states.canvas.flatten(0, 1)).view(b, t, *self.image_shape)
        return DrawTrace(canvases=canvases, read=outs.read, write=outs.write, loc=outs.loc, scale=outs.scale)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> DrawTrace:
        """Canvases, read/write attention and posteriors of x, step by step."""
        self.check_input(x)
        return self._trace(unroll(self, x, keep_states=True))

    @torch.no_grad()
    def generate(self, n: int) -> DrawTrace:
        """n samples from the prior, step by step (canvases and write attention)."""
        return self._trace(generate(self, n, self.steps, keep_states=True))

    @torch.no_grad()
    def sample(self, n: int, *, mean: bool = True) -> Tensor:
        """n images from the model, (n, c, h, w): the mean image sigmoid(c_T) by default, or a
        draw from D(x | c_T) with mean=False."""
        state = generate(self, n, self.steps).state
        if mean:
            return self.mean_image(state.canvas)
        return self.likelihood(state.canvas.flatten(1)).sample().view(n, *self.image_shape)

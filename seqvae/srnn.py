"""The stochastic recurrent network (SRNN; Fraccaro, Sønderby, Paquet & Winther 2016).

"Sequential Neural Models with Stochastic Layers", eqs 2-3 and 10-13. A deterministic RNN
over the past observations, and a state-space model on top of it. For t = 1..T, with
d_0 = 0, x_0 = 0 and z_0 = 0:

    deterministic  d_t = f_d(d_{t-1}, x_{t-1})                           an LSTM or GRU cell
    prior          p(z_t | z_{t-1}, d_t)     = N(mu_p,t, sigma_p,t^2)    [mu_p, sigma_p] = prior_net(z_{t-1}, d_t)
    emission       p(x_t | z_t, d_t)         = head(decoder(z_t, d_t))
    inference      a_t = g(a_{t+1}, [d_t, x_t])                          a backward RNN (posterior="smoothing")
                   q(z_t | z_{t-1}, a_t)     = N(mu_p,t + mu~_q,t, sigma_q,t^2),
                   [mu~_q, sigma_q] = posterior_net(z_{t-1}, a_t)       the paper's residual parameterisation:
                                                                         the posterior mean is the prior mean
                                                                         plus a learned correction

With posterior="filtering" the backward RNN is left out and a_t = [d_t, x_t]: q(z_t) then
sees x only up to t. The smoothing posterior reads every later x, so it cannot continue a
sequence from a carried state: truncated BPTT is refused for it (the filtering variant
supports it). FIVO stays a lower bound with either proposal.

On the recurrent contract (recurrent.py): `precompute(x)` runs the deterministic RNN d over
x_{0..T-1} and the backward RNN a over [d, x] (reversed by length, so that padding never
reaches a real step) for all steps at once, with their contributions to the prior's and the
posterior's first layers; `step` samples z_t (from q, or from the prior when generating, in
which case it also advances d with the sampled x_{t-1}); `score` runs the decoder over all
steps. Standard deviations come through a softplus (plus 1e-4).

Dimensions: b batch, t time, d hidden units (of both RNNs), f features, x data features,
z latents, g gate pre-activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from .cells import CellState, make_cell
from .configs import check
from .nets import GaussianNet, MLPHead
from .recurrent import reverse_by_length, scan
from .terms import Terms, diagonal_normal
from .vrnn import SequenceModel, _check_common, _check_sequences_fit, _fit_sequences

__all__ = ["SRNN", "SRNNConfig", "SRNNState", "SRNNStep", "POSTERIORS"]

POSTERIORS = ("smoothing", "filtering")


@dataclass
class SRNNConfig:
    """Everything that defines an SRNN; `SRNN(cfg)` rebuilds it."""

    x_dim: int = 88  # features per time step; set from the data unless given
    hidden_size: int = 100  # units of the deterministic RNN d and of the backward RNN a
    z_size: int = 16  # latent units per time step
    cell: str = "gru"  # gru | lstm
    output: str = "bernoulli"  # output head p(x_t | ...): bernoulli | gaussian | mixture | strokes (a density only for real-valued data)
    posterior: str = "smoothing"  # smoothing (a backward RNN over [d_t, x_t]) | filtering (a_t = [d_t, x_t])
    feature_size: int | None = None  # width of the MLPs; None = hidden_size
    prior_layers: int = 1  # hidden layers of p(z_t | z_{t-1}, d_t)
    posterior_layers: int = 1  # hidden layers of q(z_t | z_{t-1}, a_t)
    decoder_layers: int = 2  # hidden layers of p(x_t | z_t, d_t)
    components: int = 5  # mixture components (output=mixture or strokes)
    min_scale: float = 1e-3  # floor on the output Gaussians' standard deviations
    output_bias_from_data: bool = False  # Bernoulli output: start the output bias at the logit of the training mean
    dropout: float = 0.0  # training: dropout on d_t where the prior, the decoder and q read it (0 = none)

    def validate(self) -> "SRNNConfig":
        _check_common(self)
        check(self.z_size >= 1, f"model.z_size must be at least 1, got {self.z_size}")
        check(self.posterior in POSTERIORS, f"model.posterior must be one of {', '.join(POSTERIORS)}, got {self.posterior!r}")
        check(self.prior_layers >= 0, f"model.prior_layers must be at least 0, got {self.prior_layers}")
        check(self.posterior_layers >= 0, f"model.posterior_layers must be at least 0, got {self.posterior_layers}")
        return self

    chunks_hint = " or use model.posterior=filtering"

    @property
    def continues_chunks(self) -> bool:
        """Whether a sequence can be scored chunk by chunk (truncated BPTT): not when q reads the future."""
        return self.posterior == "filtering"

    def fit_data(self, info) -> dict[str, Any]:
        return _fit_sequences(info)

    def check_data(self, info) -> None:
        _check_sequences_fit(self, info)


class SRNNState(NamedTuple):
    z: Tensor  # (b, z) z_{t-1}
    d: Tensor  # (b, d) d_{t-1}
    c: Tensor | None  # (b, d) the LSTM memory of d (None for a GRU)
    x: Tensor  # (b, x) x_{t-1}


class SRNNInput(NamedTuple):
    """One step's inputs, precomputed for all steps."""

    d: Tensor  # (b, d) d_t
    c: Tensor | None  # (b, d) its LSTM memory
    x: Tensor  # (b, x) x_t (carried, so that the next chunk's d_t starts from it)
    prior_d: Tensor  # (b, f) the prior's first layer, d_t part and bias
    posterior_a: Tensor  # (b, f) the posterior's first layer, a_t part and bias
    decoder_d: Tensor  # (b, f) the decoder's first layer, d_t part (so that a step-by-step score need not compute it)


class SRNNStep(NamedTuple):
    z: Tensor  # (b, z) the sample z_t
    loc: Tensor  # (b, z) the mean and standard deviation it was drawn with (q; p when generating)
    scale: Tensor
    prior_loc: Tensor  # (b, z) p(z_t | z_{t-1}, d_t)
    prior_scale: Tensor
    d: Tensor  # (b, d) d_t
    x: Tensor | None = None  # generating: the sampled x_t
    params: Tensor | None = None  # generating: the output head's parameters
    decoder_d: Tensor | None = None  # (b, f) scoring: the decoder's first layer, d_t part (SRNNInput.decoder_d)


class SRNN(SequenceModel):
    """The SRNN: `SRNN(config)` or `SRNN(**fields of SRNNConfig)`."""

    reconstruction_label = "decoder mean p(x_t | z_t, d_t) with z_t drawn from q"

    def __init__(self, config: SRNNConfig | None = None, /, **options):
        super().__init__()
        f, d = self._configure(SRNNConfig, config, options)
        cfg, z = self.config, self.config.z_size
        self.z_size = z
        self.continues_chunks = cfg.continues_chunks
        self.d_cell = make_cell(cfg.cell, cfg.x_dim, d)  # d_t = f_d(d_{t-1}, x_{t-1})
        smoothing = cfg.posterior == "smoothing"
        self.a_cell = make_cell(cfg.cell, [d, cfg.x_dim], d) if smoothing else None  # a_t = g(a_{t+1}, [d_t, x_t])
        a_size = d if smoothing else d + cfg.x_dim
        self.prior_net = GaussianNet([z, d], [f] * cfg.prior_layers, z)  # p(z_t | z_{t-1}, d_t)
        self.posterior_net = GaussianNet([z, a_size], [f] * cfg.posterior_layers, z)  # mu~_q, sigma_q from (z_{t-1}, a_t)
        self.decoder = MLPHead([z, d], [f] * cfg.decoder_layers + [self.head.num_params(cfg.x_dim)])  # p(x_t | z_t, d_t)

    def initial_state(self, batch_size: int) -> SRNNState:
        like = next(self.parameters())
        d = self.d_cell.initial_state(batch_size, like)
        return SRNNState(like.new_zeros(batch_size, self.z_size), d.h, d.c, like.new_zeros(batch_size, self.config.x_dim))

    def precompute(self, x: Tensor, state: SRNNState = None, mask: Tensor | None = None) -> list[SRNNInput]:
        """d over x_{0..T-1} from the carried state, a over [d, x] backwards, and their first-layer products."""
        xt = x.transpose(0, 1)  # (t, b, x)
        x_prev = torch.cat([state.x[None], xt[:-1]])  # (t, b, x): x_{t-1}
        d, c = scan(self.d_cell, self.d_cell.input_gates(0, x_prev, bias=True), CellState(state.d, state.c))  # (t, b, d)
        carried = d  # the recurrence carries d_t itself; its uses below see it through dropout (training only)
        d = self.dropped(d, dim=1)  # (t, b, d)
        if self.a_cell is not None:
            lengths = None if mask is None else mask.sum(1)
            back = lambda t: rearrange(reverse_by_length(rearrange(t, "t b f -> b t f"), lengths), "b t f -> t b f")  # noqa: E731
            gates = self.a_cell.input_gates(0, back(d), bias=True) + self.a_cell.input_gates(1, back(xt))
            a_rev, _ = scan(self.a_cell, gates, self.a_cell.initial_state(x.shape[0], d))
            a = back(a_rev)  # (t, b, d): a_t from x_{t..T} of each sequence's real steps
        else:
            a = torch.cat([d, xt], dim=-1)  # (t, b, d + x)
        prior_d = self.prior_net.project(1, d, bias=True)  # (t, b, f)
        posterior_a = self.posterior_net.project(1, a, bias=True)  # (t, b, f)
        decoder_d = self.decoder.project(1, d)  # (t, b, f)
        cs = [None] * xt.shape[0] if c is None else c.unbind(0)
        return [SRNNInput(*parts) for parts in zip(carried.unbind(0), cs, xt.unbind(0), prior_d.unbind(0), posterior_a.unbind(0),
                                                   decoder_d.unbind(0))]

    def step(self, inputs: SRNNInput | None, state: SRNNState) -> tuple[SRNNStep, SRNNState]:
        """z_t ~ q(z_t | z_{t-1}, a_t) (or, generating, d_t from the sampled x_{t-1} and z_t ~ p)."""
        if inputs is None:  # generating: advance d with the x_{t-1} this loop sampled
            gates = self.d_cell.input_gates(0, state.x, bias=True)
            d, c = self.d_cell.update(gates, self.d_cell.hidden_gates(state.d), CellState(state.d, state.c))
            prior_d = self.prior_net.project(1, d, bias=True)
        else:
            d, c, prior_d = inputs.d, inputs.c, inputs.prior_d
        prior_loc, prior_scale = self.prior_net.finish(prior_d + self.prior_net.project(0, state.z))
        if inputs is None:
            loc, scale = prior_loc, prior_scale
            z = torch.addcmul(loc, scale, torch.randn_like(loc))
            params = self.decoder.over(z, d)
            x = self.head(params).sample()
            return SRNNStep(z, loc, scale, prior_loc, prior_scale, d, x, params), SRNNState(z.to(state.z.dtype), d, c, x)
        correction, scale = self.posterior_net.finish(inputs.posterior_a + self.posterior_net.project(0, state.z))
        loc = prior_loc + correction  # the residual parameterisation
        z = torch.addcmul(loc, scale, torch.randn_like(loc))
        # the carried state keeps its dtype (under autocast z may come out in bfloat16)
        return (SRNNStep(z, loc, scale, prior_loc, prior_scale, d, decoder_d=inputs.decoder_d),
                SRNNState(z.to(state.z.dtype), d, c, inputs.x))

    def score(self, x: Tensor, outs: SRNNStep, state: Any = None) -> Terms:
        """log p(x_t | z_t, d_t), q and p per step; the decoder batched over all steps."""
        decoder_d = self.decoder.project(1, outs.d) if outs.decoder_d is None else outs.decoder_d
        output = self.head(self.decoder.finish(self.decoder.project(0, outs.z, bias=True) + decoder_d))  # batch (b, t)
        posterior = diagonal_normal(outs.loc, outs.scale)
        prior = diagonal_normal(outs.prior_loc, outs.prior_scale)
        return Terms(output.log_prob(x), posterior, prior, outs.z, output=output)

"""Variational RNN (Chung et al. 2015) and an RNN baseline with the same output heads.

Chung, Kastner, Dinh, Goel, Courville & Bengio (2015), "A Recurrent Latent Variable Model
for Sequential Data", eqs 5-9. For t = 1..T, with h_0 = 0:

    prior      p(z_t | h_{t-1})         = N(mu_0,t, sigma_0,t^2),  [mu_0,t, sigma_0,t] = prior_net(h_{t-1})
    posterior  q(z_t | x_t, h_{t-1})    = N(mu_z,t, sigma_z,t^2),  [mu_z,t, sigma_z,t] = posterior_net(phi_x(x_t), h_{t-1})
    decoder    p(x_t | z_t, h_{t-1})    = head(decoder(phi_z(z_t), h_{t-1}))
    recurrence h_t = f([phi_x(x_t), phi_z(z_t)], h_{t-1}),  f an LSTM or GRU cell

VRNN-I is the same model with p(z_t) = N(0, I) at every step (prior="standard"). The
standard deviations come through a softplus (plus 1e-4 so they never reach zero).

The RNN baseline has no latent variables: p(x_t | h_{t-1}) = head(decoder(h_{t-1})) and
h_t = f(phi_x(x_t), h_{t-1}); its log-likelihood is exact.

Two paths compute the same numbers (tested):
  * `terms(x)`, the batched path used for training: only what depends on the recurrent
    state runs inside the time loop (the posterior, phi_z, the cell). phi_x runs over all
    steps at once; so do the parts of the posterior's first layer and of the cell's input
    projection that see phi_x(x_t); the posterior's first layer and the cell's recurrent
    weights are applied to h_{t-1} as one matrix product; the prior and the decoder run
    over all steps after the loop, from the stacked h_{t-1} and phi_z(z_t).
  * `initial_state(b)` / `step(x_t, state)`, one step at a time, used by FIVO (which
    resamples particles between steps) and by anything that needs per-step control.

Dimensions: b batch, t time, d hidden units, f features, x data features (x_dim), z latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.distributions import Independent, Normal, kl_divergence

from .cells import CELLS, CellState, make_cell
from .configs import check
from .distributions import HEAD_NAMES, make_head
from .linear import Affine, StepLinear, unrolled
from .sequences import check_sequences, where_state
from .terms import Terms, standard_normal_like

__all__ = ["VRNN", "RNN", "VRNNConfig", "RNNConfig", "SeqStep", "SequenceSample", "SequenceTrace", "PRIORS"]

PRIORS = ("learned", "standard")
MIN_STD = 1e-4


@dataclass
class VRNNConfig:
    """Everything that defines a VRNN; `VRNN.from_config(cfg)` rebuilds it."""

    x_dim: int = 88
    hidden_size: int = 100
    z_size: int = 16
    cell: str = "gru"
    output: str = "bernoulli"
    prior: str = "learned"  # learned (VRNN) | standard (VRNN-I)
    feature_size: int | None = None  # width of phi_x, phi_z and the MLPs; None = hidden_size
    x_layers: int = 2  # layers of phi_x
    z_layers: int = 1  # layers of phi_z
    posterior_layers: int = 2
    prior_layers: int = 1
    decoder_layers: int = 2
    components: int = 5  # mixture components (output=mixture or strokes)
    min_scale: float = 1e-3  # floor on the output Gaussians' standard deviations

    def validate(self) -> "VRNNConfig":
        _check_common(self)
        check(self.z_size >= 1, f"model.z_size must be at least 1, got {self.z_size}")
        check(self.prior in PRIORS, f"model.prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        check(self.z_layers >= 1, f"model.z_layers must be at least 1, got {self.z_layers}")
        check(self.posterior_layers >= 1, f"model.posterior_layers must be at least 1, got {self.posterior_layers}")
        check(self.prior_layers >= 0, f"model.prior_layers must be at least 0, got {self.prior_layers}")
        return self


@dataclass
class RNNConfig:
    """An RNN with no latent variables, the same feature network and output heads."""

    x_dim: int = 88
    hidden_size: int = 100
    cell: str = "gru"
    output: str = "bernoulli"
    feature_size: int | None = None
    x_layers: int = 2
    decoder_layers: int = 2
    components: int = 5
    min_scale: float = 1e-3

    def validate(self) -> "RNNConfig":
        _check_common(self)
        return self


def _check_common(cfg) -> None:
    check(cfg.x_dim >= 1, f"model.x_dim must be at least 1, got {cfg.x_dim}")
    check(cfg.hidden_size >= 1, f"model.hidden_size must be at least 1, got {cfg.hidden_size}")
    check(cfg.cell in CELLS, f"model.cell must be one of {', '.join(CELLS)}, got {cfg.cell!r}")
    check(cfg.output in HEAD_NAMES, f"model.output must be one of {', '.join(HEAD_NAMES)}, got {cfg.output!r}")
    check(cfg.output != "strokes" or cfg.x_dim == 3, "model.output=strokes models (dx, dy, end-of-stroke): needs x_dim=3")
    check(cfg.feature_size is None or cfg.feature_size >= 1, f"model.feature_size must be at least 1, got {cfg.feature_size}")
    check(cfg.x_layers >= 1, f"model.x_layers must be at least 1, got {cfg.x_layers}")
    check(cfg.decoder_layers >= 1, f"model.decoder_layers must be at least 1, got {cfg.decoder_layers}")
    check(cfg.components >= 1, f"model.components must be at least 1, got {cfg.components}")
    check(cfg.min_scale > 0, f"model.min_scale must be positive, got {cfg.min_scale}")


class SeqStep(NamedTuple):
    """One step's terms, each (b,): log p(x_t|.), log p(z_t|.), log q(z_t|.), KL(q||p);
    z (b, z) the sample (None without latents); params (b, p) the output head's parameters."""

    log_px: Tensor
    log_pz: Tensor
    log_qz: Tensor
    kl: Tensor
    z: Tensor | None
    params: Tensor | None = None


@dataclass
class SequenceTrace:
    """A reconstruction, step by step: mean (b, t, x) the output distribution's mean at each
    step (VRNN: p(x_t | z_t, h_{t-1}) with z_t from q; RNN: the prediction p(x_t | x_<t));
    kl (b, t, z) KL(q || p) per unit (zeros without latents); loc (b, t, z) the posterior means."""

    mean: Tensor
    kl: Tensor
    loc: Tensor

@dataclass
class SequenceSample:
    """Sequences drawn from the model: x (n, t, x) the samples, mean (n, t, x) the output
    distributions' means at each step (the probabilities, for a Bernoulli head)."""

    x: Tensor
    mean: Tensor


class MLP(nn.Module):
    """Linear layers with a ReLU after each: sizes [in, h1, h2, ...]."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(StepLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


class MLPHead(nn.Module):
    """ReLU hidden layers then a linear output: sizes [in, h1, ..., out]."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(StepLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        return self.finish(self.layers[0](x))

    def finish(self, first: Tensor) -> Tensor:
        """The rest of the network given the first layer's pre-activation."""
        x = first
        for layer in self.layers[1:]:
            x = layer(F.relu(x))
        return x


class GaussianNet(nn.Module):
    """An MLP whose output is the mean and standard deviation of a diagonal Gaussian."""

    def __init__(self, in_size: int, hidden: list[int], z_size: int):
        super().__init__()
        self.net = MLPHead([in_size, *hidden, 2 * z_size])

    @property
    def first(self) -> StepLinear:
        return self.net.layers[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.net(x))

    def finish(self, first: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.net.finish(first))

    @staticmethod
    def _split(out: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw = out.chunk(2, dim=-1)
        return loc, F.softplus(raw) + MIN_STD


def _time_major(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:  # padded steps are zeroed so that nothing there can leak into a result
        x = x.masked_fill(~mask[..., None], 0.0)
    return x.transpose(0, 1).contiguous()  # (t, b, x)


class _SequenceModel(nn.Module):
    """What VRNN and RNN share: config round trip, input checks, initial state, sampling."""

    sequential = True

    @classmethod
    def from_config(cls, config):
        return cls(**vars(config))

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        check_sequences(x, self.config.x_dim, self.head, mask)

    def initial_state(self, batch_size: int) -> CellState:
        """h_0 = 0 (and c_0 = 0 for an LSTM) for a batch."""
        return self.cell.initial_state(batch_size, next(self.parameters()))

    def forward(self, x: Tensor, *, mask: Tensor | None = None, state: CellState | None = None):
        return self.terms(x, mask=mask, state=state)

    def terms(self, x: Tensor, *, mask: Tensor | None = None, state: CellState | None = None):
        """Per-step terms of x (b, t, x) and the final state; state carries over chunks (TBPTT)."""
        terms, state, _ = self._run(x, mask, state)
        return terms, state

    @torch.no_grad()
    def reconstruct(self, x: Tensor, *, lengths: Tensor | None = None) -> SequenceTrace:
        """x (b, t, x) through the model once: output means, KL per unit and posterior means
        at every step (zero after each sequence's end)."""
        from .sequences import resolve_mask

        mask = resolve_mask(x, lengths)
        terms, _, params = self._run(x, mask, None)
        keep = 1.0 if mask is None else mask[..., None].to(x.dtype)
        mean = rearrange(self.head.mean(params), "t b x -> b t x") * keep
        if terms.posterior is None:
            empty = x.new_zeros(*x.shape[:2], 0)
            return SequenceTrace(mean, empty, empty)
        return SequenceTrace(mean, terms.kl_per_unit(), terms.posterior.base_dist.loc * keep)


class VRNN(_SequenceModel):
    """The variational RNN; keyword arguments mirror `VRNNConfig`."""

    def __init__(
        self,
        *,
        x_dim: int = 88,
        hidden_size: int = 100,
        z_size: int = 16,
        cell: str = "gru",
        output: str = "bernoulli",
        prior: str = "learned",
        feature_size: int | None = None,
        x_layers: int = 2,
        z_layers: int = 1,
        posterior_layers: int = 2,
        prior_layers: int = 1,
        decoder_layers: int = 2,
        components: int = 5,
        min_scale: float = 1e-3,
    ):
        super().__init__()
        self.config = VRNNConfig(
            x_dim, hidden_size, z_size, cell, output, prior, feature_size, x_layers, z_layers,
            posterior_layers, prior_layers, decoder_layers, components, min_scale,
        ).validate()
        f, d = feature_size or hidden_size, hidden_size
        self.feature_size, self.z_size = f, z_size
        self.head = make_head(output, components=components, min_scale=min_scale)
        self.phi_x = MLP([x_dim] + [f] * x_layers)  # phi^x
        self.phi_z = MLP([z_size] + [f] * z_layers)  # phi^z
        self.posterior_net = GaussianNet(f + d, [f] * posterior_layers, z_size)  # q(z_t | x_t, h_{t-1})
        self.prior_net = GaussianNet(d, [f] * prior_layers, z_size) if prior == "learned" else None  # p(z_t | h_{t-1})
        self.decoder = MLPHead([f + d] + [f] * decoder_layers + [self.head.num_params(x_dim)])  # p(x_t | z_t, h_{t-1})
        self.cell = make_cell(cell, 2 * f, d)  # h_t = f([phi_x, phi_z], h_{t-1})

    def _prior(self, h: Tensor) -> Independent:
        if self.prior_net is None:
            return standard_normal_like(h.new_zeros(*h.shape[:-1], self.z_size))
        return Independent(Normal(*self.prior_net(h)), 1)

    # ------------------------------------------------------------------ batched path
    def _run(self, x: Tensor, mask: Tensor | None, state: CellState | None):
        """The batched path: (Terms, final state, output parameters (t, b, p))."""
        self.check_input(x, mask)
        b, steps, _ = x.shape
        f = self.feature_size
        state = self.initial_state(b) if state is None else state
        xt = _time_major(x, mask)  # (t, b, x)
        fx = self.phi_x(xt)  # (t, b, f), all steps at once
        first = self.posterior_net.first
        f_post = first.out_features
        post_x = F.linear(fx, first.weight[:, :f], first.bias)  # (t, b, f_post): posterior's first layer, phi_x part
        parts = self.cell.parts(f)
        cell_x = F.linear(fx, parts.w_outside, parts.b_outside)  # (t, b, g): cell input, phi_x part
        g = cell_x.shape[-1]
        # h_{t-1} enters the posterior's first layer and the cell's gates: one product per step.
        h_map = Affine(torch.cat([first.weight[:, f:], parts.w_hidden]), torch.cat([first.bias.new_zeros(f_post), parts.b_hidden]))
        z_map = Affine(parts.w_inside, parts.b_outside.new_zeros(g))  # phi_z part of the cell input
        padded = None if mask is None else rearrange(mask, "b t -> t b")
        # unbind once: indexing a batched tensor at every step would make autograd allocate a
        # sequence-sized zero gradient per step (quadratic in t); unbind's backward is one stack
        post_x, cell_x = post_x.unbind(0), cell_x.unbind(0)
        hs, zs, fzs, locs, scales = [], [], [], [], []
        with unrolled(self.posterior_net, self.phi_z):
            for t in range(steps):
                h_post, gh = h_map(state.h).split([f_post, g], dim=1)
                loc, scale = self.posterior_net.finish(post_x[t] + h_post)
                z = torch.addcmul(loc, scale, torch.randn_like(loc))
                fz = self.phi_z(z)
                new = self.cell.update(z_map(fz, cell_x[t]), gh, state)
                hs.append(state.h)
                zs.append(z)
                fzs.append(fz)
                locs.append(loc)
                scales.append(scale)
                state = new if padded is None else where_state(padded[t], new, state)
        h_prev = torch.stack(hs)  # (t, b, d): h_{t-1} at each step
        z = torch.stack(zs)  # (t, b, z)
        params = self.decoder(torch.cat([torch.stack(fzs), h_prev], dim=-1))  # (t, b, p), all steps at once
        log_px = self.head(params).log_prob(xt)  # (t, b)
        posterior = Independent(Normal(torch.stack(locs), torch.stack(scales)), 1)
        log_px = log_px.t() if mask is None else log_px.t() * mask
        terms = Terms(log_px, _batch_first(posterior), _batch_first(self._prior(h_prev)), rearrange(z, "t b z -> b t z"), mask)
        return terms, state, params

    # ------------------------------------------------------------------ stepwise path
    def step(self, x_t: Tensor, state: CellState) -> tuple[SeqStep, CellState]:
        """One step for x_t (b, x): sample z_t from q, score x_t, advance the state."""
        fx = self.phi_x(x_t)
        loc, scale = self.posterior_net(torch.cat([fx, state.h], dim=1))
        z = torch.addcmul(loc, scale, torch.randn_like(loc))
        fz = self.phi_z(z)
        q = Independent(Normal(loc, scale), 1)
        p = self._prior(state.h)
        params = self.decoder(torch.cat([fz, state.h], dim=1))
        log_px = self.head(params).log_prob(x_t)
        new = self.cell(torch.cat([fx, fz], dim=1), state)
        return SeqStep(log_px, p.log_prob(z), q.log_prob(z), kl_divergence(q, p), z, params), new

    @torch.no_grad()
    def generate(self, n: int, steps: int) -> SequenceSample:
        """Ancestral sampling: z_t ~ p(z_t | h_{t-1}), x_t ~ p(x_t | z_t, h_{t-1}), fed back."""
        _check_sample_args(n, steps)
        state = self.initial_state(n)
        xs, means = [], []
        for _ in range(steps):
            prior = self._prior(state.h)
            z = prior.sample()
            fz = self.phi_z(z)
            params = self.decoder(torch.cat([fz, state.h], dim=1))
            x_t = self.head(params).sample()
            xs.append(x_t)
            means.append(self.head.mean(params))
            state = self.cell(torch.cat([self.phi_x(x_t), fz], dim=1), state)
        return SequenceSample(torch.stack(xs, 1), torch.stack(means, 1))

    def sample(self, n: int, steps: int) -> Tensor:
        """n sequences of `steps` steps, (n, steps, x)."""
        return self.generate(n, steps).x


class RNN(_SequenceModel):
    """The RNN baseline without latent variables; keyword arguments mirror `RNNConfig`."""

    def __init__(
        self,
        *,
        x_dim: int = 88,
        hidden_size: int = 100,
        cell: str = "gru",
        output: str = "bernoulli",
        feature_size: int | None = None,
        x_layers: int = 2,
        decoder_layers: int = 2,
        components: int = 5,
        min_scale: float = 1e-3,
    ):
        super().__init__()
        self.config = RNNConfig(
            x_dim, hidden_size, cell, output, feature_size, x_layers, decoder_layers, components, min_scale
        ).validate()
        f, d = feature_size or hidden_size, hidden_size
        self.feature_size = f
        self.head = make_head(output, components=components, min_scale=min_scale)
        self.phi_x = MLP([x_dim] + [f] * x_layers)
        self.decoder = MLPHead([d] + [f] * decoder_layers + [self.head.num_params(x_dim)])  # p(x_t | h_{t-1})
        self.cell = make_cell(cell, f, d)  # h_t = f(phi_x(x_t), h_{t-1})

    def _run(self, x: Tensor, mask: Tensor | None, state: CellState | None):
        self.check_input(x, mask)
        b, steps, _ = x.shape
        state = self.initial_state(b) if state is None else state
        xt = _time_major(x, mask)
        parts = self.cell.parts(self.feature_size)
        cell_x = F.linear(self.phi_x(xt), parts.w_outside, parts.b_outside).unbind(0)  # t x (b, g)
        h_map = Affine(parts.w_hidden, parts.b_hidden)
        padded = None if mask is None else rearrange(mask, "b t -> t b")
        hs = []
        for t in range(steps):
            new = self.cell.update(cell_x[t], h_map(state.h), state)
            hs.append(state.h)
            state = new if padded is None else where_state(padded[t], new, state)
        params = self.decoder(torch.stack(hs))  # (t, b, p)
        log_px = self.head(params).log_prob(xt).t()  # (b, t)
        return Terms(log_px if mask is None else log_px * mask, mask=mask), state, params

    def step(self, x_t: Tensor, state: CellState) -> tuple[SeqStep, CellState]:
        params = self.decoder(state.h)
        log_px = self.head(params).log_prob(x_t)
        zero = torch.zeros_like(log_px)
        return SeqStep(log_px, zero, zero, zero, None, params), self.cell(self.phi_x(x_t), state)

    @torch.no_grad()
    def generate(self, n: int, steps: int) -> SequenceSample:
        _check_sample_args(n, steps)
        state = self.initial_state(n)
        xs, means = [], []
        for _ in range(steps):
            params = self.decoder(state.h)
            x_t = self.head(params).sample()
            xs.append(x_t)
            means.append(self.head.mean(params))
            state = self.cell(self.phi_x(x_t), state)
        return SequenceSample(torch.stack(xs, 1), torch.stack(means, 1))

    def sample(self, n: int, steps: int) -> Tensor:
        return self.generate(n, steps).x


def _batch_first(dist: Independent) -> Independent:
    """A (t, b, z) diagonal Gaussian as a (b, t, z) one."""
    loc, scale = (rearrange(p, "t b z -> b t z") for p in (dist.base_dist.loc, dist.base_dist.scale))
    return Independent(Normal(loc, scale), 1)


def _check_sample_args(n: int, steps: int) -> None:
    if n < 1:
        raise ValueError(f"n must be a positive number of sequences, got {n}")
    if steps < 1:
        raise ValueError(f"steps must be a positive number of time steps, got {steps}")

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

Each model states its recurrence once, on the recurrent contract (recurrent.py):

  * `precompute(x)`: phi_x(x_t) for all steps at once, and its contributions to the
    posterior's first layer and to the cell's gates (the nets' and the cell's `project` /
    `input_gates`, batched over time);
  * `step(inputs_t, state)`: only what depends on h_{t-1}: the posterior, z_t ~ q, phi_z(z_t)
    and the cell. Given no inputs (generating), z_t comes from the prior and x_t from the
    decoder, and x_t's features are computed in the step;
  * `score(x, outs)`: the prior and the decoder over all steps at once, from the stacked
    h_{t-1} and phi_z(z_t), and log p(x_t | z_t, h_{t-1}), q and p per step.

Training, IWAE, FIVO (which scores one step at a time and resamples between steps),
truncated BPTT, sampling and reconstructions all run this one step through
`recurrent.unroll` / `recurrent.generate`. On a CPU, passes that need gradients run the same
step as one hand-written kernel (`fused_unroll`, fused.py), tested equal to the step loop.

Dimensions: b batch, t time, d hidden units, f features, x data features (x_dim), z latents,
g gate pre-activations, p output-head parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import fused
from .cells import CELLS, CellState, make_cell
from .configs import check, configure
from .distributions import HEAD_NAMES, make_head
from .nets import MLP, GaussianNet, MLPHead, heads_over
from .recurrent import RecurrentModel, dropout, generate, unroll
from .sequences import check_sequences, resolve_mask
from .terms import Terms, diagonal_normal, standard_normal_like

__all__ = ["VRNN", "RNN", "VRNNConfig", "RNNConfig", "VRNNStep", "RNNStep", "SequenceModel", "SequenceSample", "SequenceTrace",
           "PRIORS"]

PRIORS = ("learned", "standard")


@dataclass
class VRNNConfig:
    """Everything that defines a VRNN; `VRNN.from_config(cfg)` rebuilds it."""

    x_dim: int = 88  # features per time step; set from the data unless given
    hidden_size: int = 100  # units of the recurrent cell
    z_size: int = 16  # latent units per time step
    cell: str = "gru"  # gru | lstm
    output: str = "bernoulli"  # output head p(x_t | ...): bernoulli | gaussian | mixture | strokes (a density only for real-valued data)
    prior: str = "learned"  # learned (VRNN) | standard (VRNN-I)
    feature_size: int | None = None  # width of phi_x, phi_z and the MLPs; None = hidden_size
    x_layers: int = 2  # layers of phi_x
    z_layers: int = 1  # layers of phi_z
    posterior_layers: int = 2  # hidden layers of the posterior network
    prior_layers: int = 1  # hidden layers of the learned prior network
    decoder_layers: int = 2  # hidden layers of the decoder network
    components: int = 5  # mixture components (output=mixture or strokes)
    min_scale: float = 1e-3  # floor on the output Gaussians' standard deviations
    output_bias_from_data: bool = False  # Bernoulli output: start the output bias at the logit of the training mean
    dropout: float = 0.0  # training: dropout on h_{t-1} where the decoder and the prior read it (0 = none)

    def validate(self) -> "VRNNConfig":
        _check_common(self)
        check(self.x_layers >= 1, f"model.x_layers must be at least 1, got {self.x_layers}")
        check(self.z_size >= 1, f"model.z_size must be at least 1, got {self.z_size}")
        check(self.prior in PRIORS, f"model.prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        check(self.z_layers >= 1, f"model.z_layers must be at least 1, got {self.z_layers}")
        check(self.posterior_layers >= 1, f"model.posterior_layers must be at least 1, got {self.posterior_layers}")
        check(self.prior_layers >= 0, f"model.prior_layers must be at least 0, got {self.prior_layers}")
        return self

    def fit_data(self, info) -> dict[str, Any]:
        return _fit_sequences(info)

    def check_data(self, info) -> None:
        _check_sequences_fit(self, info)


@dataclass
class RNNConfig:
    """An RNN with no latent variables, the same feature network and output heads."""

    x_dim: int = 88  # features per time step; set from the data unless given
    hidden_size: int = 100  # units of the recurrent cell
    cell: str = "gru"  # gru | lstm
    output: str = "bernoulli"  # output head p(x_t | ...): bernoulli | gaussian | mixture | strokes (a density only for real-valued data)
    feature_size: int | None = None  # width of phi_x and the decoder MLP; None = hidden_size
    x_layers: int = 2  # layers of phi_x
    decoder_layers: int = 2  # hidden layers of the decoder network
    components: int = 5  # mixture components (output=mixture or strokes)
    min_scale: float = 1e-3  # floor on the output Gaussians' standard deviations
    output_bias_from_data: bool = False  # Bernoulli output: start the output bias at the logit of the training mean
    dropout: float = 0.0  # training: dropout on h_{t-1} where the decoder reads it (0 = none)

    def validate(self) -> "RNNConfig":
        _check_common(self)
        check(self.x_layers >= 1, f"model.x_layers must be at least 1, got {self.x_layers}")
        return self

    def fit_data(self, info) -> dict[str, Any]:
        return _fit_sequences(info)

    def check_data(self, info) -> None:
        _check_sequences_fit(self, info)


def _fit_sequences(info) -> dict[str, Any]:
    """The fields a data set decides (unless set explicitly): the features per step."""
    return {"x_dim": int(info.shape[-1])}


def _check_sequences_fit(cfg, info) -> None:
    check(cfg.x_dim == info.shape[-1], f"model.x_dim={cfg.x_dim} but {info.name} has {info.shape[-1]} features per step")
    check(
        cfg.output != "bernoulli" or info.binary,
        f"the {info.name} data are not binary but model.output=bernoulli; choose --model.output=gaussian or mixture",
    )
    check(
        cfg.output == "bernoulli" or not info.binary,
        f"the {info.name} data are binary but model.output={cfg.output} is a density: on discrete data its log-likelihood "
        "is not a code length (it can exceed 0); use model.output=bernoulli",
    )


def _check_common(cfg) -> None:
    check(cfg.x_dim >= 1, f"model.x_dim must be at least 1, got {cfg.x_dim}")
    check(cfg.hidden_size >= 1, f"model.hidden_size must be at least 1, got {cfg.hidden_size}")
    check(cfg.cell in CELLS, f"model.cell must be one of {', '.join(CELLS)}, got {cfg.cell!r}")
    check(cfg.output in HEAD_NAMES, f"model.output must be one of {', '.join(HEAD_NAMES)}, got {cfg.output!r}")
    check(cfg.output != "strokes" or cfg.x_dim == 3, "model.output=strokes models (dx, dy, end-of-stroke): needs x_dim=3")
    check(cfg.feature_size is None or cfg.feature_size >= 1, f"model.feature_size must be at least 1, got {cfg.feature_size}")
    check(cfg.decoder_layers >= 1, f"model.decoder_layers must be at least 1, got {cfg.decoder_layers}")
    check(cfg.components >= 1, f"model.components must be at least 1, got {cfg.components}")
    check(cfg.min_scale > 0, f"model.min_scale must be positive, got {cfg.min_scale}")
    check(0 <= cfg.dropout < 1, f"model.dropout must lie in [0, 1), got {cfg.dropout}")


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




class VRNNInput(NamedTuple):
    """One step's inputs, precomputed from x_t: what the step adds to terms of h_{t-1}."""

    posterior_x: Tensor  # (b, f) the posterior's first layer, phi_x(x_t) part and bias
    cell_x: Tensor  # (b, g) the cell's gates, phi_x(x_t) part and input bias


class VRNNStep(NamedTuple):
    """One step's outputs (stacked over time by the unroll: (b, t, ...))."""

    h: Tensor  # (b, d) h_{t-1}, the state the step started from
    z: Tensor  # (b, z) the sample z_t
    fz: Tensor  # (b, f) phi_z(z_t)
    loc: Tensor  # (b, z) the mean and standard deviation z_t was drawn with
    scale: Tensor  # (q when scoring x; p when generating)
    x: Tensor | None = None  # (b, x) generating: the sampled x_t
    params: Tensor | None = None  # (b, p) generating: the output head's parameters


class RNNInput(NamedTuple):
    cell_x: Tensor  # (b, g) the cell's gates from phi_x(x_t), with the input bias


class RNNStep(NamedTuple):
    h: Tensor  # (b, d) h_{t-1}
    x: Tensor | None = None  # generating: the sampled x_t
    params: Tensor | None = None  # generating: the output head's parameters


class SequenceModel(RecurrentModel):
    """What VRNN and RNN share: input checks, the initial state, sampling and reconstructions."""

    sequential = True

    @classmethod
    def from_config(cls, config):
        return cls(config)

    def _configure(self, config_cls: type, config, options: dict) -> tuple[int, int]:
        """Set self.config (validated) and the output head; return (feature width f, hidden size d)."""
        self.config = cfg = configure(config_cls, config, options)
        self.head = make_head(cfg.output, components=cfg.components, min_scale=cfg.min_scale)
        return cfg.feature_size or cfg.hidden_size, cfg.hidden_size

    def check_input(self, x: Tensor, mask: Tensor | None = None) -> None:
        check_sequences(x, self.config.x_dim, self.head, mask)

    def dropped(self, h: Tensor, dim: int = 0) -> Tensor:
        """h (rows along `dim`) as the output networks see it: through dropout (model.dropout) in
        training, one mask per example shared by its particles; as it is otherwise."""
        return dropout(h, self.config.dropout, self.training, dim)

    def initial_state(self, batch_size: int) -> CellState:
        """h_0 = 0 (and c_0 = 0 for an LSTM) for a batch."""
        return self.cell.initial_state(batch_size, next(self.parameters()))

    @torch.no_grad()
    def initialise_from_data(self, data) -> None:
        """With config.output_bias_from_data and a Bernoulli output: set the decoder's output bias
        to the logit of each feature's mean over the training steps, so that training starts from
        the marginal note probabilities (what Maddison et al. 2017 found helps on piano rolls)."""
        if not self.config.output_bias_from_data or self.config.output != "bernoulli":
            return
        total = sum(s.double().sum(0) for s in data.sequences)
        steps = sum(s.shape[0] for s in data.sequences)
        mean = (total / steps).clamp(1e-5, 1 - 1e-5).float()
        self.decoder.layers[-1].bias.copy_(torch.logit(mean))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, *, lengths: Tensor | None = None) -> SequenceTrace:
        """x (b, t, x) through the model once: output means, KL per unit and posterior means
        at every step (zero after each sequence's end)."""
        mask = resolve_mask(x, lengths)
        self.check_input(x, mask)
        terms = unroll(self, x, mask=mask).terms
        keep = 1.0 if mask is None else mask[..., None].to(x.dtype)
        mean = terms.output.mean * keep
        if terms.posterior is None:
            empty = x.new_zeros(*x.shape[:2], 0)
            return SequenceTrace(mean, empty, empty)
        return SequenceTrace(mean, terms.kl_per_unit(), terms.posterior.base_dist.loc * keep)

    @torch.no_grad()
    def generate(self, n: int, steps: int) -> SequenceSample:
        """Ancestral sampling of n sequences of `steps` steps: the samples and the output means."""
        outs = generate(self, n, steps).outs
        return SequenceSample(outs.x, self.head.mean(outs.params))

    def sample(self, n: int, steps: int) -> Tensor:
        """n sequences of `steps` steps, (n, steps, x)."""
        return self.generate(n, steps).x


class VRNN(SequenceModel):
    """The variational RNN: `VRNN(config)` or `VRNN(**fields of VRNNConfig)`."""

    reconstruction_label = "decoder mean p(x_t | z_t, h_t-1) with z_t drawn from q"

    def __init__(self, config: VRNNConfig | None = None, /, **options):
        super().__init__()
        f, d = self._configure(VRNNConfig, config, options)
        cfg = self.config
        self.feature_size, self.z_size = f, cfg.z_size
        self.phi_x = MLP([cfg.x_dim] + [f] * cfg.x_layers)  # phi^x
        self.phi_z = MLP([cfg.z_size] + [f] * cfg.z_layers)  # phi^z
        self.posterior_net = GaussianNet([f, d], [f] * cfg.posterior_layers, cfg.z_size)  # q(z_t | x_t, h_{t-1})
        learned = cfg.prior == "learned"
        self.prior_net = GaussianNet([d], [f] * cfg.prior_layers, cfg.z_size) if learned else None  # p(z_t | h_{t-1})
        self.decoder = MLPHead([f, d], [f] * cfg.decoder_layers + [self.head.num_params(cfg.x_dim)])  # p(x_t | z_t, h_{t-1})
        self.cell = make_cell(cfg.cell, [f, f], d)  # h_t = f([phi_x, phi_z], h_{t-1})

    def prior(self, h: Tensor):
        """p(z_t | h_{t-1}) for h (..., d): learned, or N(0, I) for VRNN-I."""
        if self.prior_net is None:
            return standard_normal_like(h.new_zeros(*h.shape[:-1], self.z_size))
        return diagonal_normal(*self.prior_net(h))

    def precompute(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> list[VRNNInput]:
        fx = self.phi_x(x.transpose(0, 1))  # (t, b, f), all steps at once, time-major so that steps are contiguous
        posterior_x = self.posterior_net.project(0, fx, bias=True)  # (t, b, f)
        cell_x = self.cell.input_gates(0, fx, bias=True)  # (t, b, g)
        # unbind once: indexing a batched tensor at every step would make autograd allocate a
        # sequence-sized zero gradient per step (quadratic in t); unbind's backward is one stack
        return [VRNNInput(*parts) for parts in zip(posterior_x.unbind(0), cell_x.unbind(0))]

    def step(self, inputs: VRNNInput | None, state: CellState) -> tuple[VRNNStep, CellState]:
        """z_t ~ q(z_t | x_t, h_{t-1}) (or ~ p(z_t | h_{t-1}) when generating), then h_t."""
        h = state.h
        if inputs is None:  # generating: z_t from the prior, x_t from the decoder
            prior = self.prior(h)
            z = prior.sample()
            loc, scale = prior.base_dist.loc, prior.base_dist.scale
            fz = self.phi_z(z)
            params = self.decoder.over(fz, h)
            x = self.head(params).sample()
            cell_x = self.cell.input_gates(0, self.phi_x(x), bias=True)
            out = VRNNStep(h, z, fz, loc, scale, x, params)
        else:
            loc, scale = self.posterior_net.finish(inputs.posterior_x + self.posterior_net.project(1, h))
            z = torch.addcmul(loc, scale, torch.randn_like(loc))
            fz = self.phi_z(z)
            cell_x = inputs.cell_x
            out = VRNNStep(h, z, fz, loc, scale)
        gates = cell_x + self.cell.input_gates(1, fz)
        return out, self.cell.update(gates, self.cell.hidden_gates(h), state)

    def fused_unroll(self, x: Tensor, state: CellState, mask: Tensor | None) -> tuple[VRNNStep, CellState] | None:
        """All steps as one Function with a hand-written backward (fused.py), when it applies."""
        params = fused.vrnn_params(self)  # (the step's parameters; phi_x's and these are all the pass uses)
        if not fused.enabled(x, *params, *(p for layer in self.phi_x.layers for p in (layer.weight, layer.bias))):
            return None
        fx = self.phi_x(x.transpose(0, 1))  # (t, b, f); the pass applies its first products itself
        h_prev, z, fz, loc, scale, h, c = fused.vrnn_unroll(self, fx, state, mask, params)
        outs = VRNNStep(*(s.transpose(0, 1) for s in (h_prev, z, fz, loc, scale)))  # (b, t, ...) views
        return outs, CellState(h, c if state.c is not None else None)

    def score(self, x: Tensor, outs: VRNNStep, state: Any = None) -> Terms:
        """log p(x_t | z_t, h_{t-1}), q and p for x (b, t, x), the decoder and prior batched over t.

        The unroll stores the step outputs time-major and views them as (b, t, ...)
        (recurrent.stack_steps); the networks run on the time-major tensors, which their products
        read in place (a (b, t, ...) view would be copied first, and the copy kept for the
        backward: measured ~85 MB of the peak of a T=500, batch 128 step), and their results are viewed back as (b, t, ...)."""
        h = self.dropped(outs.h.transpose(0, 1), dim=1)  # (t, b, d)
        fz = outs.fz.transpose(0, 1)
        if self.prior_net is None:
            params, prior = self.decoder.over(fz, h), self.prior(h).base_dist
            loc, scale = prior.loc, prior.scale
        else:  # the decoder and the prior both over h: as one Function that reads h once (nets.heads_over)
            params, prior_out = heads_over((self.decoder, (fz, h)), (self.prior_net.net, (h,)))
            loc, scale = self.prior_net.split(prior_out)
        output = self.head(params.transpose(0, 1))  # batch (b, t)
        prior = diagonal_normal(loc.transpose(0, 1), scale.transpose(0, 1))  # (t, b) steps viewed (b, t)
        posterior = diagonal_normal(outs.loc, outs.scale)
        return Terms(output.log_prob(x), posterior, prior, outs.z, output=output)


class RNN(SequenceModel):
    """The RNN baseline without latent variables: `RNN(config)` or `RNN(**fields of RNNConfig)`."""

    reconstruction_label = "prediction p(x_t | x_<t)"

    def __init__(self, config: RNNConfig | None = None, /, **options):
        super().__init__()
        f, d = self._configure(RNNConfig, config, options)
        cfg = self.config
        self.feature_size = f
        self.phi_x = MLP([cfg.x_dim] + [f] * cfg.x_layers)
        self.decoder = MLPHead([d], [f] * cfg.decoder_layers + [self.head.num_params(cfg.x_dim)])  # p(x_t | h_{t-1})
        self.cell = make_cell(cfg.cell, f, d)  # h_t = f(phi_x(x_t), h_{t-1})

    def precompute(self, x: Tensor, state: Any = None, mask: Tensor | None = None) -> list[RNNInput]:
        cell_x = self.cell.input_gates(0, self.phi_x(x.transpose(0, 1)), bias=True)  # (t, b, g)
        return [RNNInput(g) for g in cell_x.unbind(0)]

    def step(self, inputs: RNNInput | None, state: CellState) -> tuple[RNNStep, CellState]:
        """h_t from x_t (x_t sampled from p(x_t | h_{t-1}) when generating)."""
        h = state.h
        if inputs is None:
            params = self.decoder(h)
            x = self.head(params).sample()
            cell_x = self.cell.input_gates(0, self.phi_x(x), bias=True)
            out = RNNStep(h, x, params)
        else:
            cell_x = inputs.cell_x
            out = RNNStep(h)
        return out, self.cell.update(cell_x, self.cell.hidden_gates(h), state)

    def score(self, x: Tensor, outs: RNNStep, state: Any = None) -> Terms:
        h = self.dropped(outs.h.transpose(0, 1), dim=1)  # (t, b, d), as stored (see VRNN.score)
        output = self.head(self.decoder(h).transpose(0, 1))  # p(x_t | h_{t-1}), batch (b, t)
        return Terms(output.log_prob(x), output=output)

"""SRNN (Fraccaro et al. 2016): the equations step by step, masking, a posterior that reads the
future (smoothing) or not (filtering), the residual parameterisation, sampling, TBPTT."""

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import seqvae
from seqvae.cells import CellState
from seqvae.configs import ConfigError
from seqvae.data import SequenceData
from seqvae.objectives import bound
from seqvae.recurrent import unroll
from seqvae.run import build_config
from seqvae.srnn import SRNN

LENGTHS = torch.tensor([7, 5, 2, 7])


def data(b=4, t=7, x_dim=6, output="bernoulli"):
    torch.manual_seed(0)
    x = (torch.rand(b, t, x_dim) > 0.5).double() if output == "bernoulli" else torch.randn(b, t, x_dim).double()
    mask = torch.arange(t)[None] < LENGTHS[:, None]
    return x.masked_fill(~mask[..., None], 0.0), mask


def model_for(posterior="smoothing", cell="gru", output="bernoulli"):
    torch.manual_seed(1)
    return SRNN(x_dim=6, hidden_size=8, z_size=3, cell=cell, posterior=posterior, output=output, components=2).double()


def by_hand(model, x, mask, drop=lambda d, i: d):
    """The paper's equations, one sequence and one step at a time, with whole-input networks:
    (log p(x_t), KL_t, posterior means), each (b, t). `drop(d, i)` is what the prior, the decoder
    and the backward RNN see of sequence i's d (t, d) (its dropout); the recurrence carries d itself."""
    b, steps, _ = x.shape
    log_px, kl, locs = torch.zeros(b, steps, dtype=x.dtype), torch.zeros(b, steps, dtype=x.dtype), torch.zeros(b, steps, 3, dtype=x.dtype)
    # the deterministic RNN over x_{t-1} and the backward RNN over [d_t, x_t], per sequence over its real steps only
    ds, as_ = [], []
    for i in range(b):
        n = int(mask[i].sum())
        state = model.d_cell.initial_state(1, x)
        d = []
        for t in range(steps):
            prev = x[i : i + 1, t - 1] if t > 0 else torch.zeros_like(x[i : i + 1, 0])
            state = model.d_cell(prev, state)
            d.append(state.h)
        d = drop(torch.cat(d), i)  # (t, d)
        a = torch.zeros_like(d) if model.a_cell is not None else torch.cat([d, x[i]], -1)
        if model.a_cell is not None:
            back = model.a_cell.initial_state(1, x)
            for t in reversed(range(n)):
                back = model.a_cell([d[t : t + 1], x[i : i + 1, t]], back)
                a[t] = back.h[0]
        ds.append(d)
        as_.append(a)
    d, a = torch.stack(ds), torch.stack(as_)  # (b, t, .)
    z = torch.zeros(b, 3, dtype=x.dtype)
    for t in range(steps):
        p_loc, p_scale = model.prior_net(torch.cat([z, d[:, t]], -1))
        residual, q_scale = model.posterior_net(torch.cat([z, a[:, t]], -1))
        q_loc = p_loc + residual
        new_z = q_loc + q_scale * torch.randn_like(q_loc)
        p, q = Independent(Normal(p_loc, p_scale), 1), Independent(Normal(q_loc, q_scale), 1)
        kl[:, t] = kl_divergence(q, p)
        log_px[:, t] = model.head(model.decoder(torch.cat([new_z, d[:, t]], -1))).log_prob(x[:, t])
        locs[:, t] = q_loc
        z = torch.where(mask[:, t, None], new_z, z)
    return log_px * mask, kl * mask, locs


@pytest.mark.parametrize("posterior,cell", [("smoothing", "gru"), ("smoothing", "lstm"), ("filtering", "gru"), ("filtering", "lstm")])
def test_the_unroll_equals_the_equations(posterior, cell):
    model = model_for(posterior, cell)
    x, mask = data()
    torch.manual_seed(2)
    log_px, kl, locs = by_hand(model, x, mask)
    torch.manual_seed(2)
    terms = unroll(model, x, mask=mask).terms
    torch.testing.assert_close(terms.log_px, log_px, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl(), kl, rtol=1e-10, atol=1e-10)
    real = mask[..., None].expand_as(locs)
    torch.testing.assert_close(terms.posterior.base_dist.loc[real], locs[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("posterior", ["smoothing", "filtering"])
def test_dropout_drops_d_where_it_is_used_and_not_in_the_recurrence_and_only_in_training(posterior, monkeypatch):
    model = model_for(posterior)
    model.config.dropout = 0.5
    x, mask = data()
    keep = (torch.rand(4, 7, 8, generator=torch.Generator().manual_seed(9)) > 0.5).double()
    torch.manual_seed(2)
    log_px, kl, _ = by_hand(model, x, mask, drop=lambda d, i: d * keep[i] * 2.0)  # a known mask, scaled by 1 / (1 - p)
    seen = []

    def dropout(d, p, training):
        seen.append((p, training))
        return d * keep.transpose(0, 1) * 2.0  # the model's d is (t, b, d)

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    torch.manual_seed(2)
    terms = unroll(model.train(), x, mask=mask).terms
    assert seen == [(0.5, True)]
    torch.testing.assert_close(terms.log_px, log_px, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.kl(), kl, rtol=1e-10, atol=1e-10)
    monkeypatch.undo()
    # evaluation: no dropout, the same terms as the model without it
    torch.manual_seed(2)
    evaluated = unroll(model.eval(), x, mask=mask).terms
    model.config.dropout = 0.0
    torch.manual_seed(2)
    plain = unroll(model.train(), x, mask=mask).terms
    torch.testing.assert_close(evaluated.log_px, plain.log_px, rtol=0, atol=0)
    assert (evaluated.log_px - log_px).abs().max() > 1e-3  # the mask above did change the terms


def test_an_examples_particles_share_one_dropout_mask():
    """The prior of the first step, p(z_1 | z_0 = 0, d_1), reads only the dropped-out d_1: equal
    for the particles of one example (rows (particle, example)), different between examples."""
    model = model_for("smoothing").train()
    model.config.dropout = 0.5
    x, _ = data()
    x = torch.cat([x[:1]] * 4)
    torch.manual_seed(2)
    loc = unroll(model, x.repeat(3, 1, 1), particles=3).terms.prior.base_dist.loc[:, 0].view(3, 4, -1)
    assert torch.equal(loc[0], loc[1]) and torch.equal(loc[0], loc[2])
    assert (loc[0, 0] - loc[0, 1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["elbo", "iwae", "fivo"])
def test_padding_changes_nothing(name):
    model = model_for("smoothing", output="gaussian")
    x, _ = data(output="gaussian")
    other = x.clone()
    for i, n in enumerate(LENGTHS.tolist()):
        other[i, n:] = float("nan")
    fn = {"elbo": seqvae.elbo, "iwae": lambda m, x, lengths: seqvae.iwae_bound(m, x, k=3, lengths=lengths),
          "fivo": lambda m, x, lengths: seqvae.fivo_bound(m, x, k=3, lengths=lengths)}[name]
    torch.manual_seed(3)
    a = fn(model, x, lengths=LENGTHS)
    torch.manual_seed(3)
    b = fn(model, other, lengths=LENGTHS)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("posterior", ["smoothing", "filtering"])
def test_the_smoothing_posterior_reads_the_future_and_the_filtering_one_does_not(posterior):
    model = model_for(posterior)
    x, _ = data()
    changed = x.clone()
    changed[:, 5] = 1 - changed[:, 5]  # a different x_6
    locs = []
    for inputs in (x, changed):
        torch.manual_seed(4)
        locs.append(unroll(model, inputs).terms.posterior.base_dist.loc)
    before_5 = (locs[0][:, :5] - locs[1][:, :5]).abs().max()
    if posterior == "smoothing":
        assert before_5 > 1e-4  # q(z_t) for t < 6 moved with x_6
    else:
        assert before_5 == 0  # q(z_t) sees x only up to t
    assert (locs[0][:, 5] - locs[1][:, 5]).abs().max() > 1e-4


def test_the_posterior_mean_is_the_prior_mean_plus_a_correction():
    model = model_for("smoothing")
    x, mask = data()
    last = model.posterior_net.net.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()  # no correction: q's mean is p's mean, and q's scale softplus(0) + 1e-4
    terms = unroll(model, x, mask=mask).terms
    torch.testing.assert_close(terms.posterior.base_dist.loc, terms.prior.base_dist.loc, rtol=0, atol=0)
    expected = torch.nn.functional.softplus(torch.zeros((), dtype=x.dtype)) + 1e-4
    assert torch.allclose(terms.posterior.base_dist.scale, expected)


@pytest.mark.parametrize("output", ["bernoulli", "gaussian", "mixture"])
def test_sampling_shapes_and_ranges(output):
    model = model_for(output=output)
    torch.manual_seed(5)
    sample = model.generate(3, 9)
    assert sample.x.shape == sample.mean.shape == (3, 9, 6)
    assert torch.isfinite(sample.x).all()
    if output == "bernoulli":
        assert set(sample.x.unique().tolist()) <= {0.0, 1.0} and ((sample.mean > 0) & (sample.mean < 1)).all()
    # generation advances d with the sampled x_{t-1}: the same step, fed back by hand, gives the same samples
    torch.manual_seed(5)
    state, xs = model.initial_state(3), []
    for _ in range(9):
        d = model.d_cell(state.x, CellState(state.d, state.c))
        p_loc, p_scale = model.prior_net(torch.cat([state.z, d.h], -1))
        z = p_loc + p_scale * torch.randn_like(p_loc)
        x_t = model.head(model.decoder(torch.cat([z, d.h], -1))).sample()
        state = type(state)(z, d.h, d.c, x_t)
        xs.append(x_t)
    torch.testing.assert_close(sample.x, torch.stack(xs, 1))


def test_tbptt_is_refused_for_the_smoothing_posterior_and_exact_for_the_filtering_one():
    with pytest.raises(ConfigError, match="posterior reads the whole sequence"):
        build_config("srnn", None, ["train.tbptt=10"], "jsb_chorales", None)
    assert build_config("srnn", None, ["train.tbptt=10", "model.posterior=filtering"], "jsb_chorales", None).train.tbptt == 10
    x, mask = data()
    smoothing = model_for("smoothing")
    _, carry = bound(smoothing, x[:, :4], mask=mask[:, :4])
    with pytest.raises(ValueError, match="cannot continue a sequence from a carried state"):
        bound(smoothing, x[:, 4:], mask=mask[:, 4:], carry=carry)
    filtering = model_for("filtering", cell="lstm")
    for name, k in (("elbo", 1), ("iwae", 3), ("fivo", 3)):
        torch.manual_seed(6)
        whole, _ = bound(filtering, x, name=name, k=k, mask=mask)
        torch.manual_seed(6)
        first, carry = bound(filtering, x[:, :4], name=name, k=k, mask=mask[:, :4])
        second, _ = bound(filtering, x[:, 4:], name=name, k=k, mask=mask[:, 4:], carry=carry)
        torch.testing.assert_close(first + second, whole, rtol=1e-10, atol=1e-10)


def test_output_bias_starts_at_the_logit_of_the_training_mean():
    seqs = [torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])]
    model = SRNN(x_dim=3, hidden_size=4, z_size=2, output_bias_from_data=True)
    model.initialise_from_data(SequenceData(seqs, name="toy", binary=True))
    expected = torch.logit(torch.tensor([0.75, 1e-5, 0.75]))
    torch.testing.assert_close(model.decoder.layers[-1].bias.data, expected)
    untouched = SRNN(x_dim=3, hidden_size=4, z_size=2)
    before = untouched.decoder.layers[-1].bias.clone()
    untouched.initialise_from_data(SequenceData(seqs, name="toy", binary=True))
    assert torch.equal(untouched.decoder.layers[-1].bias, before)

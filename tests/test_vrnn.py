"""VRNN and RNN: the batched path equals the stepwise path, masks, shapes and gradients across
cells x outputs x objectives, bad input."""

import itertools

import pytest
import torch

import seqvae
from torch.distributions import Independent, Normal, kl_divergence

from seqvae.recurrent import unroll
from seqvae.vrnn import RNN, VRNN


def data_for(output, b=4, t=7, x_dim=6):
    torch.manual_seed(0)
    if output == "bernoulli":
        return (torch.rand(b, t, x_dim) > 0.5).float()
    if output == "strokes":
        return torch.cat([torch.randn(b, t, 2), (torch.rand(b, t, 1) > 0.8).float()], -1)
    return torch.randn(b, t, x_dim)


def model_for(kind, output, cell="gru", prior="learned", x_dim=6):
    x_dim = 3 if output == "strokes" else x_dim
    common = dict(x_dim=x_dim, hidden_size=8, cell=cell, output=output, components=3)
    return VRNN(z_size=3, prior=prior, **common) if kind == "vrnn" else RNN(**common)


LENGTHS = torch.tensor([7, 5, 2, 7])


def _by_hand(model, x, mask, drop=lambda h, t: h):
    """The VRNN / RNN equations written out directly, one step at a time, from the model's
    own networks applied to whole inputs (no precompute, no blocks): (log p(x_t), KL_t, h_T).
    `drop(h, t)` is what the decoder and the prior see of h_{t-1} (its dropout)."""
    state = model.initial_state(x.shape[0])
    log_px, kl = [], []
    for t in range(x.shape[1]):
        h = state.h
        fx = model.phi_x(x[:, t])
        if isinstance(model, VRNN):
            loc, scale = model.posterior_net(torch.cat([fx, h], -1))
            z = loc + scale * torch.randn_like(loc)
            fz = model.phi_z(z)
            q = Independent(Normal(loc, scale), 1)
            kl.append(kl_divergence(q, model.prior(drop(h, t))))
            params = model.decoder(torch.cat([fz, drop(h, t)], -1))
            new = model.cell([fx, fz], state)
        else:
            params = model.decoder(drop(h, t))
            kl.append(torch.zeros(x.shape[0], dtype=x.dtype))
            new = model.cell(fx, state)
        log_px.append(model.head(params).log_prob(x[:, t]))
        m = mask[:, t]
        state = type(state)(*(None if n is None else torch.where(m[:, None], n, o) for n, o in zip(new, state)))
    return torch.stack(log_px, 1) * mask, torch.stack(kl, 1) * mask, state.h


@pytest.mark.parametrize("kind,cell,prior", [("vrnn", c, p) for c in ("gru", "lstm") for p in ("learned", "standard")] + [("rnn", "gru", None), ("rnn", "lstm", None)])
def test_the_unroll_equals_the_equations_step_by_step(kind, cell, prior):
    """precompute + step + batched score (training) and step-by-step scoring (FIVO's path)
    both equal the model's equations evaluated one step at a time."""
    model = model_for(kind, "bernoulli", cell, prior or "learned").double()
    x = data_for("bernoulli").double()
    mask = torch.arange(7)[None] < LENGTHS[:, None]
    x = x.masked_fill(~mask[..., None], 0.0)
    torch.manual_seed(1)
    log_px, kl, h = _by_hand(model, x, mask)
    torch.manual_seed(1)
    run = unroll(model, x, mask=mask)
    torch.testing.assert_close(run.terms.log_px, log_px, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run.terms.kl(), kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run.state.h, h, rtol=1e-12, atol=1e-12)
    torch.manual_seed(1)
    steps = []
    final = unroll(model, x, mask=mask, between=lambda t, terms, state: steps.append(terms) or state).state
    torch.testing.assert_close(torch.cat([s.log_px for s in steps], 1), log_px, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([s.kl() for s in steps], 1), kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final.h, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["vrnn", "rnn"])
def test_dropout_drops_h_where_the_decoder_and_prior_read_it_and_only_in_training(kind, monkeypatch):
    model = model_for(kind, "bernoulli").double()
    model.config.dropout = 0.5
    x = data_for("bernoulli").double()
    mask = torch.arange(7)[None] < LENGTHS[:, None]
    keep = (torch.rand(4, 7, 8, generator=torch.Generator().manual_seed(9)) > 0.5).double()
    torch.manual_seed(1)
    log_px, kl, h = _by_hand(model, x, mask, drop=lambda h, t: h * keep[:, t] * 2.0)  # a known mask, scaled by 1 / (1 - p)
    seen = []

    def dropout(h, p, training):  # h (t, b, d): score reads the steps' outputs time-major, as stored
        seen.append((p, training))
        return h * keep.transpose(0, 1) * 2.0

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    torch.manual_seed(1)
    run = unroll(model.train(), x, mask=mask)
    assert seen == [(0.5, True)]
    torch.testing.assert_close(run.terms.log_px, log_px, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run.terms.kl(), kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run.state.h, h, rtol=1e-12, atol=1e-12)  # the recurrence carries h itself
    monkeypatch.undo()
    torch.manual_seed(1)
    evaluated = unroll(model.eval(), x, mask=mask).terms
    model.config.dropout = 0.0
    torch.manual_seed(1)
    plain = unroll(model.train(), x, mask=mask).terms
    torch.testing.assert_close(evaluated.log_px, plain.log_px, rtol=0, atol=0)
    assert (evaluated.log_px - log_px).abs().max() > 1e-3  # the mask above did change the terms


def test_an_examples_particles_share_one_dropout_mask(monkeypatch):
    """IWAE and FIVO fold k particles into the batch: a mask per row would give each particle its
    own network. The RNN has no latents, so particles of one example that share a mask have
    equal terms; the masks still differ between examples and between training steps."""
    model = model_for("rnn", "bernoulli").double().train()
    model.config.dropout = 0.5
    x = data_for("bernoulli").double()
    x = torch.cat([x[:1]] * 4)  # four copies of one sequence: only the masks tell them apart
    rows = x.repeat(3, 1, 1)  # (particle, example) rows, as the bounds make them
    torch.manual_seed(1)
    log_px = unroll(model, rows, particles=3).terms.log_px.view(3, 4, 7)
    assert torch.equal(log_px[0], log_px[1]) and torch.equal(log_px[0], log_px[2])
    assert (log_px[0, 0] - log_px[0, 1]).abs().max() > 1e-3  # each example its own mask
    torch.manual_seed(1)
    per_row = unroll(model, rows).terms.log_px.view(3, 4, 7)
    assert (per_row[0] - per_row[1]).abs().max() > 1e-3  # (without particles=3: a mask per row)
    # the bounds say that their rows are particles: every mask is drawn per example (4 rows), not per row (12)
    rows_seen = []
    real = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda h, p, training: rows_seen.append(h.shape[1]) or real(h, p, training))  # h (t, rows, d)
    for value in (seqvae.iwae_bound(model, x, k=3), seqvae.fivo_bound(model, x, k=3), seqvae.log_likelihood(model, x, k=3)):
        assert torch.isfinite(value).all()
    assert len(rows_seen) == 1 + 7 + 1 and set(rows_seen) == {4}  # IWAE's batched score, FIVO's 7 steps, the estimate


def test_generation_runs_the_same_step_from_the_prior():
    """generate() draws z_t from p(z_t | h_{t-1}) and x_t from the decoder, and feeds x_t back."""
    model = model_for("vrnn", "bernoulli").double()
    torch.manual_seed(3)
    sample = model.generate(2, 5)
    torch.manual_seed(3)
    state, xs = model.initial_state(2), []
    for _ in range(5):
        z = model.prior(state.h).sample()
        fz = model.phi_z(z)
        x_t = model.head(model.decoder(torch.cat([fz, state.h], -1))).sample()
        state = model.cell([model.phi_x(x_t), fz], state)
        xs.append(x_t)
    torch.testing.assert_close(sample.x, torch.stack(xs, 1))
    assert set(sample.x.unique().tolist()) <= {0.0, 1.0} and ((sample.mean > 0) & (sample.mean < 1)).all()


@pytest.mark.parametrize("name", ["elbo", "iwae", "fivo"])
def test_padding_changes_nothing(name):
    model = model_for("vrnn", "gaussian").double()
    x = data_for("gaussian").double()
    other = x.clone()
    for i, n in enumerate(LENGTHS.tolist()):
        other[i, n:] = torch.randn_like(other[i, n:]) * 100  # different padding
    other[2, 4:] = float("nan")  # even NaN in the padding is never touched
    fn = {"elbo": seqvae.elbo, "iwae": lambda m, x, lengths: seqvae.iwae_bound(m, x, k=3, lengths=lengths), "fivo": lambda m, x, lengths: seqvae.fivo_bound(m, x, k=3, lengths=lengths)}[name]
    torch.manual_seed(2)
    a = fn(model, x, lengths=LENGTHS)
    torch.manual_seed(2)
    b = fn(model, other, lengths=LENGTHS)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()


def test_rnn_log_likelihood_is_exact_and_equals_its_bounds():
    model = model_for("rnn", "bernoulli").double()
    x = data_for("bernoulli").double()
    exact = seqvae.elbo(model, x, lengths=LENGTHS)
    for value in (seqvae.iwae_bound(model, x, k=5, lengths=LENGTHS), seqvae.fivo_bound(model, x, k=5, lengths=LENGTHS), seqvae.log_likelihood(model, x, k=3, lengths=LENGTHS)):
        torch.testing.assert_close(value, exact)


@pytest.mark.parametrize(
    "kind,cell,output,objective",
    [(k, c, o, j) for k, c, o, j in itertools.product(["vrnn", "rnn"], ["gru", "lstm"], ["bernoulli", "gaussian", "mixture", "strokes"], ["elbo", "iwae", "fivo"]) if not (k == "rnn" and j != "elbo")],
)
def test_shapes_and_backward(kind, cell, output, objective):
    model = model_for(kind, output, cell)
    x = data_for(output, x_dim=model.config.x_dim)
    fn = {"elbo": lambda: seqvae.elbo(model, x, lengths=LENGTHS), "iwae": lambda: seqvae.iwae_bound(model, x, k=2, lengths=LENGTHS), "fivo": lambda: seqvae.fivo_bound(model, x, k=2, lengths=LENGTHS)}[objective]
    value = fn()
    assert value.shape == (4,) and torch.isfinite(value).all()
    value.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # phi_x's and the posterior's first layers feed both paths; every parameter gets a gradient
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    sample = model.sample(3, 5)
    assert sample.shape == (3, 5, model.config.x_dim)


def test_vrnn_i_has_no_prior_network_and_a_standard_prior():
    model = model_for("vrnn", "bernoulli", prior="standard")
    assert model.prior_net is None
    terms, _ = model.terms(data_for("bernoulli"))
    assert torch.all(terms.prior.base_dist.loc == 0) and torch.all(terms.prior.base_dist.scale == 1)


def test_bad_input_is_a_clear_error():
    model = model_for("vrnn", "bernoulli")
    x = data_for("bernoulli")
    with pytest.raises(ValueError, match="at least one step"):
        seqvae.elbo(model, x, lengths=torch.tensor([7, 0, 2, 7]))
    with pytest.raises(ValueError, match="sequences of length zero"):
        seqvae.elbo(model, torch.zeros(4, 0, 6))
    mask = torch.arange(7)[None] < LENGTHS[:, None]
    with pytest.raises(ValueError, match="disagrees with the lengths"):
        seqvae.elbo(model, x, lengths=torch.tensor([7, 4, 2, 7]), mask=mask)
    with pytest.raises(ValueError, match="prefix"):
        bad = mask.clone()
        bad[0, 3] = False
        seqvae.elbo(model, x, mask=bad)
    with pytest.raises(ValueError, match="expects 6 features per time step, the data has 5"):
        seqvae.elbo(model, x[..., :5])
    with pytest.raises(ValueError, match="NaN or infinite"):
        y = x.clone()
        y[0, 0, 0] = float("inf")
        seqvae.elbo(model, y)
    with pytest.raises(ValueError, match="not binary"):
        seqvae.elbo(model, x * 0.5)
    with pytest.raises(ValueError, match=r"\(batch, time, features\)"):
        seqvae.elbo(model, x[0])
    with pytest.raises(ValueError, match="exceeds"):
        seqvae.elbo(model, x, lengths=torch.tensor([8, 5, 2, 7]))


def test_constructor_arguments_land_in_the_right_config_fields():
    from dataclasses import asdict

    from seqvae.vrnn import RNNConfig, VRNNConfig

    v = VRNNConfig(x_dim=7, hidden_size=9, z_size=3, cell="lstm", output="mixture", prior="standard", feature_size=11,
                   x_layers=3, z_layers=2, posterior_layers=3, prior_layers=0, decoder_layers=4, components=2, min_scale=0.05)
    assert asdict(VRNN(**asdict(v)).config) == asdict(v)
    assert asdict(VRNN(v).config) == asdict(v) and asdict(VRNN(v, z_size=5).config) == {**asdict(v), "z_size": 5}
    r = RNNConfig(x_dim=7, hidden_size=9, cell="lstm", output="gaussian", feature_size=11, x_layers=3, decoder_layers=4, components=2, min_scale=0.05)
    assert asdict(RNN(**asdict(r)).config) == asdict(r)
    with pytest.raises(TypeError, match="unknown option.*z_sise"):
        VRNN(z_sise=3)

"""DRAW: shapes and gradients across heads x objectives x channels, known answers, bad input."""

import itertools

import pytest
import torch

import seqvae
from seqvae.configs import ConfigError
from seqvae.draw import DRAW, DrawConfig


def small(**kw):
    args = dict(image_shape=(1, 12, 10), steps=3, hidden_size=16, z_size=4, read_size=2, write_size=3)
    args.update(kw)
    return DRAW(**args)


def images(b, shape, binary=True):
    x = torch.rand(b, *shape)
    return (x > 0.5).float() if binary else x


@pytest.mark.parametrize(
    "read,write,objective,channels,likelihood",
    [
        (r, w, o, c, lk)
        for r, w, o, c, lk in itertools.product(["none", "filterbank"], ["none", "filterbank"], ["elbo", "iwae"], [1, 3], ["bernoulli", "gaussian"])
        if not (lk == "gaussian" and o == "iwae" and r == "none")  # keep the grid small
    ],
)
def test_shapes_and_backward(read, write, objective, channels, likelihood):
    shape = (channels, 12, 10)
    model = small(image_shape=shape, read=read, write=write, likelihood=likelihood)
    x = images(5, shape, binary=likelihood == "bernoulli")
    value = seqvae.elbo(model, x) if objective == "elbo" else seqvae.iwae_bound(model, x, k=3)
    assert value.shape == (5,) and torch.isfinite(value).all()
    value.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("write_head"))
    trace = model.reconstruct(x)
    assert trace.canvases.shape == (5, 3, *shape)
    assert ((trace.canvases >= 0) & (trace.canvases <= 1)).all()
    if read == "filterbank":
        assert trace.read.gx.shape == (5, 3)
    else:
        assert trace.read is None
    assert model.sample(4).shape == (4, *shape)


def test_elbo_terms_add_up():
    torch.manual_seed(0)
    model = small()
    x = images(4, (1, 12, 10))
    torch.manual_seed(1)
    terms, state = model.terms(x)
    # log D(x | c_T): a Bernoulli on the final canvas's logits, written out
    logits = state.canvas.flatten(1)
    want = (x.flatten(1) * torch.nn.functional.logsigmoid(logits) + (1 - x.flatten(1)) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    torch.testing.assert_close(terms.log_px[:, 0], want)
    # the KL: one analytic term per glimpse, with the constant -|z|/2 per step (not -T/2)
    loc, scale = terms.posterior.base_dist.loc, terms.posterior.base_dist.scale
    assert loc.shape == (4, 3, 4)
    by_hand = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum(-1)
    torch.testing.assert_close(terms.kl(), by_hand)
    torch.manual_seed(1)
    torch.testing.assert_close(seqvae.elbo(model, x), want - by_hand.sum(-1))


def test_fresh_noise_at_every_step():
    model = small(steps=4)
    x = images(2, (1, 12, 10))
    terms, _ = model.terms(x)
    eps = (terms.z - terms.posterior.base_dist.loc) / terms.posterior.base_dist.scale  # (b, t, z)
    for t in range(1, 4):
        assert not torch.allclose(eps[:, 0], eps[:, t])


def test_generation_uses_the_decoder_alone_from_the_prior():
    model = small()
    trace = model.generate(6)
    assert trace.read is None and trace.write.gx.shape == (6, 3)
    assert torch.all(trace.loc == 0) and torch.all(trace.scale == 1)
    # the last canvas is the sample
    torch.manual_seed(3)
    a = model.sample(6)
    torch.manual_seed(3)
    torch.testing.assert_close(a, model.generate(6).images)
    binary = model.sample(6, mean=False)
    assert ((binary == 0) | (binary == 1)).all()


def test_config_round_trip_and_validation():
    model = small(read="none")
    again = DRAW.from_config(model.config)
    assert again.config == model.config
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
    for bad, message in [
        (dict(steps=0), "steps"),
        (dict(read="gaussian"), "model.read"),
        (dict(write_size=13), "write_size"),
        (dict(likelihood="mixture"), "likelihood"),
        (dict(image_shape=(0, 28, 28)), "image_shape"),
    ]:
        with pytest.raises(ConfigError, match=message):
            small(**bad)
    assert DrawConfig().validate().steps == 64


def test_bad_input_is_a_clear_error():
    model = small()
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 1, 12, 10\), got \(2, 120\)"):
        seqvae.elbo(model, torch.zeros(2, 120))
    with pytest.raises(ValueError, match="built for 1 channel"):
        seqvae.elbo(model, torch.zeros(2, 3, 12, 10))
    with pytest.raises(ValueError, match="not binary"):
        seqvae.elbo(model, torch.full((2, 1, 12, 10), 0.5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        x = images(2, (1, 12, 10))
        x[0, 0, 0, 0] = float("nan")
        seqvae.elbo(model, x)
    with pytest.raises(ValueError, match="empty batch"):
        seqvae.elbo(model, torch.zeros(0, 1, 12, 10))
    with pytest.raises(ValueError, match="floating-point"):
        seqvae.elbo(model, torch.zeros(2, 1, 12, 10, dtype=torch.long))


def test_constructor_arguments_land_in_the_right_config_fields():
    from dataclasses import asdict

    cfg = DrawConfig(image_shape=(3, 9, 11), steps=4, hidden_size=12, z_size=5, read="none", write="filterbank", read_size=3, write_size=4, likelihood="gaussian")
    assert asdict(DRAW(**asdict(cfg)).config) == asdict(cfg)

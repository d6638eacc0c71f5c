"""Slow: each model memorises one small batch of real data (run with ``pytest -m slow``).

A model that can fit anything must be able to fit 16 examples almost perfectly: the
negative ELBO on that batch should fall far below what any model reaches on held-out data
(about 80-100 nats for binarized MNIST, about 7-8 nats per step for JSB chorales).
"""

import pytest
import torch

import seqvae
from seqvae import data


def _fit(model, x, steps, lr, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = -seqvae.elbo(model, x, **kw).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    with torch.no_grad():
        return -seqvae.elbo(model, x, **kw).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("read", ["none", "filterbank"])
def test_draw_overfits_one_batch(data_dir, read):
    torch.manual_seed(0)
    x = data.load_dataset("binarized_mnist", "train", data_dir=data_dir, download=False).batch(torch.arange(16)).x
    # A 5x5 write patch needs many more steps and updates to paint 16 digits exactly (the
    # paper trains for days), so the write head is the full canvas here; the read head is
    # the filterbank in one of the two cases.
    model = seqvae.DRAW(image_shape=(1, 28, 28), steps=8, hidden_size=128, z_size=16, read=read, read_size=5, write="none")
    with torch.no_grad():
        before = -seqvae.elbo(model, x).mean().item()
    after = _fit(model, x, steps=600, lr=3e-3)
    assert before > 400, before
    assert after < 25, (before, after)


@pytest.mark.slow
def test_vrnn_overfits_one_batch(data_dir):
    torch.manual_seed(0)
    x, lengths = data.load_dataset("jsb_chorales", "train", data_dir=data_dir, download=False).batch(torch.arange(16))
    x, lengths = x[:, :48], lengths.clamp(max=48)  # the first 48 steps of 16 chorales
    model = seqvae.VRNN(x_dim=88, hidden_size=128, z_size=16, cell="gru", output="bernoulli")
    per_step = _fit(model, x, steps=400, lr=1e-2, lengths=lengths) * 16 / lengths.sum().item()
    assert per_step < 1.5, per_step  # nats per time step; held-out chorales cost about 7.4

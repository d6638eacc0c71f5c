"""Figures: attention boxes sit on the pixels they cover; every figure renders and saves."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import seqvae
import seqvae.data
from seqvae import viz
from seqvae.attention import AttentionParams
from seqvae.diagnostics import latent_usage


def att(**values):
    fields = {k: torch.tensor([[float(values.get(k, 1.0))]]) for k in AttentionParams._fields}
    return AttentionParams(**fields)


def test_box_edges_follow_g_delta_and_n():
    # N=3, delta=2 around g=(10, 5): 1-based edges 7..13 and 2..8; imshow coordinates are 1 lower
    assert viz._box_geometry(att(gx=10, gy=5, delta=2), 3, 0, 0) == pytest.approx((6.0, 1.0, 6.0, 6.0))
    # a full-resolution glimpse (N = 28, delta = 1, centred) is exactly the image's extent
    fig = viz._figure(2, 2)
    ax = fig.add_subplot()
    viz._image_panel(ax, torch.zeros(1, 28, 28))
    rect = viz.add_glimpse_box(ax, att(gx=14.5, gy=14.5, delta=1), 28, 0, 0, viz.READ_COLOUR)
    x0, y0 = rect.get_xy()
    assert (x0, y0, x0 + rect.get_width(), y0 + rect.get_height()) == pytest.approx((-0.5, -0.5, 27.5, 27.5))
    left, right, bottom, top = ax.get_images()[0].get_extent()
    assert (left, right, top, bottom) == pytest.approx((-0.5, 27.5, -0.5, 27.5))


def test_box_lands_on_the_right_pixels_when_rendered(tmp_path):
    # render a white 1-pixel-wide square where the box should be, draw the box over a black image,
    # and check that the box's colour falls on the pixel boundary the geometry predicts
    fig = viz._figure(2.8, 2.8)
    fig.set_layout_engine("none")  # the axes fill the figure exactly
    ax = fig.add_axes([0, 0, 1, 1])
    viz._image_panel(ax, torch.zeros(1, 28, 28))
    viz.add_glimpse_box(ax, att(gx=10.5, gy=20.5, delta=1, sigma2=100), 4, 0, 0, "#ff0000")
    path = viz.save_figure(fig, tmp_path / "box.png", dpi=100)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 100)
    ys, xs = np.nonzero(red)
    scale = img.shape[1] / 28  # rendered pixels per image pixel
    # the box spans 1-based pixels 9..12 in x and 19..22 in y: edges at 8.5..12.5 and 18.5..22.5,
    # i.e. image-pixel boundaries 8 and 12 (x), 18 and 22 (y) counted from the left/top edge
    assert xs.min() / scale == pytest.approx(8, abs=0.3) and (xs.max() + 1) / scale == pytest.approx(12, abs=0.3)
    assert ys.min() / scale == pytest.approx(18, abs=0.3) and (ys.max() + 1) / scale == pytest.approx(22, abs=0.3)


def small_draw():
    torch.manual_seed(0)
    return seqvae.DRAW(image_shape=(1, 16, 16), steps=5, hidden_size=16, z_size=4, read_size=2, write_size=3)


def test_attention_figures_and_animation(tmp_path):
    model = small_draw()
    x = (torch.rand(3, 1, 16, 16) > 0.5).float()
    trace = model.reconstruct(x)
    fig = viz.glimpse_grid(trace, x, read_size=2, write_size=3, n=3, steps=4, title="test")
    assert len(fig.axes) == 3 * 2 * 4
    assert sum(len(ax.patches) for ax in fig.axes) == 3 * 2 * 4  # one box per panel
    viz.save_figure(fig, tmp_path / "glimpses.png")
    sample = model.generate(5)
    fig = viz.canvas_grid(sample, n=5, write_size=3)
    assert len(fig.axes) == 25 and all(len(ax.patches) == 1 for ax in fig.axes)
    gif = viz.glimpse_animation(trace, tmp_path / "g.gif", x, read_size=2, write_size=3, n=2)
    with Image.open(gif) as im:
        assert im.n_frames == 5


def test_latent_and_sequence_figures(tmp_path):
    model = small_draw()
    data = seqvae.data.ImageData((torch.rand(30, 1, 16, 16) > 0.5).to(torch.uint8), binarize="fixed", name="toy")
    usage = latent_usage(model, data, batch_size=7)
    viz.save_figure(viz.latent_usage(usage), tmp_path / "latents.png")
    vrnn = seqvae.VRNN(x_dim=10, hidden_size=8, z_size=3)
    seq = (torch.rand(20, 10) > 0.7).float()
    terms, _ = vrnn.terms(seq[None])
    fig = viz.sequence_kl(seq, terms.kl_per_unit()[0], mean=torch.rand(20, 10), title="t")
    assert len(fig.axes) == 5  # three panels, a colour bar, and a hidden one that keeps the panels aligned
    viz.save_figure(fig, tmp_path / "seq.png")
    records = [{"kind": "train", "step": s, "loss": 10.0 - s} for s in range(1, 5)] + [
        {"kind": "valid", "epoch": e, "step": e, "valid_elbo": -5.0 + e, "valid_elbo_per_step": -1.0} for e in (1, 2)
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    viz.save_figure(viz.training_curves(path), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_a_long_title_over_a_small_grid_is_wrapped_not_cut():
    """16 samples make a 2-inch grid; 'DRAW (T=8, read none, write none) samples' (41 characters) was
    drawn on one line wider than the figure and cut at both ends."""
    title = "DRAW (T=8, read none, write none) samples"
    fig = viz.image_grid(torch.rand(16, 1, 28, 28), title=title)
    shown = fig.axes[0].get_title()
    assert "\n" in shown and shown.replace("\n", " ") == title
    width_px = fig.get_size_inches()[0] * fig.dpi
    fig.canvas.draw()
    extent = fig.axes[0].title.get_window_extent()
    assert extent.x0 >= 0 and extent.x1 <= width_px  # the whole title lies inside the figure

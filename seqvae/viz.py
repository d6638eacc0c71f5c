"""Figures and animations (matplotlib only; nothing here imports the trainer).

Dimensions: n examples, t steps, c h w image channels and size, k piano keys.

Functions take tensors and return `matplotlib.figure.Figure`s (built without pyplot, so
they never touch global plotting state); `save_figure` and `save_gif` write them
atomically. matplotlib is imported when a function is called, not when seqvae is.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from pathlib import Path

import numpy as np
from torch import Tensor

from .checkpoint import atomic_write_bytes

__all__ = [
    "image_grid",
    "grid_array",
    "piano_rolls",
    "save_figure",
    "save_gif",
    "canvas_frames",
    "add_glimpse_box",
    "glimpse_grid",
    "canvas_grid",
    "glimpse_animation",
    "sequence_kl",
    "latent_usage",
    "training_curves",
    "READ_COLOUR",
    "WRITE_COLOUR",
]

READ_COLOUR = "#e8453c"  # red: where the encoder reads
WRITE_COLOUR = "#2bb673"  # green: where the decoder writes


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def grid_array(images: Tensor, nrow: int | None = None, pad: int = 1, pad_value: float = 0.5) -> np.ndarray:
    """Tile images (n, c, h, w) in [0, 1] into one (H, W, c) array with `pad` pixels between."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = nrow
    nrows = math.ceil(n / ncol)
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y : y + h, x : x + w] = images[i].permute(1, 2, 0).numpy()
    return out


def image_grid(images: Tensor, *, nrow: int | None = None, title: str | None = None, scale: float = 0.6):
    """A figure of images (n, c, h, w) in [0, 1] tiled in a grid (grey for one channel)."""
    arr = grid_array(images, nrow)
    h, w = arr.shape[:2]
    width = max(2.0, w / 28 * scale)
    # a title wider than a small grid is wrapped (about 13 characters per inch at 9 points), not cut off
    title = textwrap.fill(title, width=max(16, int(width * 13))) if title else None
    lines = title.count("\n") + 1 if title else 0
    fig = _figure(width, max(2.0, h / 28 * scale) + 0.3 * lines)
    ax = fig.add_subplot()
    ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def _note_range(rolls: list, low_note: int) -> tuple[float, float]:
    """The y-limits covering the notes that sound (with a margin), not the whole keyboard."""
    keys = [int(k) for r in rolls for k in (r.detach().float().cpu() > 0.05).any(0).nonzero().flatten().tolist()]
    if not keys:
        return low_note - 0.5, low_note + rolls[0].shape[-1] - 0.5
    return low_note + min(keys) - 3.5, low_note + max(keys) + 3.5


def piano_rolls(rolls: Tensor | list[Tensor], *, titles: list[str] | None = None, suptitle: str | None = None, low_note: int = 21):
    """Piano rolls (n, t, k) (or a list of (t_i, k)), one panel each: time across, MIDI note up.

    Values in [0, 1] are shown as grey levels (1 = note on), so a model's note
    probabilities and binary samples read the same way.
    """
    rolls = list(rolls)
    n = len(rolls)
    longest = max(r.shape[0] for r in rolls)
    y_range = _note_range(rolls, low_note)
    fig = _figure(min(14.0, 2 + longest / 14), 1.6 * n + 0.6)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for i, (ax, roll) in enumerate(zip(axes, rolls)):
        roll = roll.detach().float().cpu().numpy()
        ax.imshow(
            roll.T, origin="lower", aspect="auto", cmap="gray_r", vmin=0, vmax=1, interpolation="nearest",
            extent=(-0.5, roll.shape[0] - 0.5, low_note - 0.5, low_note + roll.shape[1] - 0.5),
        )
        ax.set_xlim(-0.5, longest - 0.5)
        ax.set_ylim(*y_range)
        ax.set_ylabel("MIDI note", fontsize=8)
        if titles:
            ax.set_title(titles[i], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("time step", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def sequence_lines(seqs: Tensor | list[Tensor], *, suptitle: str | None = None, max_features: int = 8):
    """Real-valued sequences (n, t, d) (or a list of (t_i, d)), one panel each: a line per
    feature over time (the first max_features features)."""
    seqs = list(seqs)
    fig = _figure(8.0, 1.5 * len(seqs) + 0.6)
    axes = fig.subplots(len(seqs), 1, squeeze=False)[:, 0]
    for ax, seq in zip(axes, seqs):
        seq = seq.detach().float().cpu().numpy()
        for j in range(min(seq.shape[1], max_features)):
            ax.plot(np.arange(1, seq.shape[0] + 1), seq[:, j], lw=1, label=f"feature {j}")
        ax.set_ylabel("value", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, ncol=min(4, seqs[0].shape[1]), loc="upper right")
    axes[-1].set_xlabel("time step", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def _figure_bytes(fig, fmt: str, dpi: int | None = None) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi)
    return buffer.getvalue()


def save_figure(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Save a figure atomically (format from the suffix: .png, .pdf, .svg)."""
    path = Path(path)
    atomic_write_bytes(path, _figure_bytes(fig, path.suffix.lstrip(".") or "png", dpi))
    return path


def canvas_frames(canvases: Tensor, nrow: int | None = None) -> list[np.ndarray]:
    """Canvases (n, t, c, h, w) -> t tiled frames (H, W, c) in [0, 1]."""
    return [grid_array(canvases[:, t], nrow) for t in range(canvases.shape[1])]


def save_gif(frames: list, path: str | os.PathLike, *, title: str | None = None, duration_ms: int = 500,
             hold_last_ms: int = 3000, scale: int = 3) -> Path:
    """Write frames (arrays in [0, 1], (H, W) or (H, W, c), or matplotlib figures) as a looping GIF:
    two frames per second by default, the last one held for 3 s; with `title`, array frames get a
    header with the title and "step t/T"."""
    from PIL import Image, ImageDraw

    images = []
    for frame in frames:
        if hasattr(frame, "savefig"):
            images.append(Image.open(io.BytesIO(_figure_bytes(frame, "png"))).convert("RGB"))
            continue
        arr = np.asarray(frame, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        img = Image.fromarray((arr.clip(0, 1) * 255).astype(np.uint8))
        if scale != 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        images.append(img.convert("RGB"))
    if not images:
        raise ValueError("no frames to write")
    if title is not None:
        images = [_with_header(img, f"{title}: step {t + 1}/{len(images)}" if len(images) > 1 else title, ImageDraw)
                  for t, img in enumerate(images)]
    durations = [duration_ms] * (len(images) - 1) + [hold_last_ms]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _with_header(image, text: str, image_draw):
    """The image below a white strip holding `text` (PIL's built-in font, wrapped to the width)."""
    from PIL import Image

    lines = textwrap.wrap(text, max(8, image.width // 6), break_long_words=True) or [""]
    out = Image.new("RGB", (image.width, image.height + 12 * len(lines) + 4), "white")
    out.paste(image, (0, 12 * len(lines) + 4))
    draw = image_draw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((3, 2 + 12 * i), line, fill="black")
    return out


# ---------------------------------------------------------------------------- attention


def _box_geometry(att, n: int, i: int, t: int) -> tuple[float, float, float, float]:
    """(x0, y0, width, height) of example i's glimpse at step t, in imshow coordinates.

    glimpse_box gives edges in the paper's 1-based pixel units, where pixel a covers
    [a - 1/2, a + 1/2]; imshow draws pixel a (0-based index a - 1) over [a - 3/2, a - 1/2],
    so the edges shift by -1.
    """
    from .attention import AttentionParams, glimpse_box

    one = AttentionParams(*(f[i, t : t + 1].detach().float().cpu() for f in att))
    x0, y0, x1, y1 = glimpse_box(one, n)[0].tolist()
    return x0 - 1, y0 - 1, x1 - x0, y1 - y0


def add_glimpse_box(ax, att, n: int, i: int, t: int, colour: str, *, label: str | None = None):
    """Draw example i's glimpse at step t on an imshow axis; the border is thicker when the
    filters are sharper (smaller sigma relative to the stride), as in the paper's Figure 1."""
    from matplotlib.patches import Rectangle

    x0, y0, w, h = _box_geometry(att, n, i, t)
    sigma = float(att.sigma2[i, t].sqrt())
    delta = float(att.delta[i, t])
    sharpness = delta / max(sigma, 1e-6)
    width = float(np.clip(0.6 + 0.6 * sharpness, 0.6, 3.0))
    rect = Rectangle((x0, y0), w, h, fill=False, edgecolor=colour, linewidth=width, label=label, clip_on=True)
    ax.add_patch(rect)
    return rect


def _image_panel(ax, img: Tensor, title: str | None = None) -> None:
    img = img.detach().float().cpu().clamp(0, 1)
    arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
    ax.imshow(arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlim(-0.5, img.shape[-1] - 0.5)
    ax.set_ylim(img.shape[-2] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _steps_to_show(total: int, steps: int | None) -> list[int]:
    if steps is None or steps >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / (steps - 1)) for i in range(steps)}) if steps > 1 else [total - 1]


def glimpse_grid(trace, images: Tensor | None = None, *, read_size: int | None = None, write_size: int | None = None,
                 n: int = 4, steps: int | None = 8, title: str | None = None):
    """Attention over time: one column per step; for each example a row of the input with the
    read box (red) when `images` are given, and a row of the canvas sigmoid(c_t) with the
    write box (green).

    trace: a DrawTrace from model.reconstruct(images) (read and write) or model.generate(n)
    (write only); read_size / write_size: the heads' N (model.read_head.n, model.write_head.n).
    """
    n = min(n, trace.canvases.shape[0])
    cols = _steps_to_show(trace.canvases.shape[1], steps)
    show_read = images is not None and trace.read is not None and read_size is not None
    rows_per = 2 if show_read else 1
    fig = _figure(1.05 * len(cols) + 0.6, 1.15 * n * rows_per + 0.7)
    axes = fig.subplots(n * rows_per, len(cols), squeeze=False)
    for i in range(n):
        for j, t in enumerate(cols):
            if show_read:
                ax = axes[i * 2, j]
                _image_panel(ax, images[i], f"t={t + 1}" if i == 0 else None)
                add_glimpse_box(ax, trace.read, read_size, i, t, READ_COLOUR)
                if j == 0:
                    ax.set_ylabel("input + read", fontsize=7)
            ax = axes[i * rows_per + rows_per - 1, j]
            _image_panel(ax, trace.canvases[i, t], f"t={t + 1}" if (i == 0 and not show_read) else None)
            if trace.write is not None and write_size is not None:
                add_glimpse_box(ax, trace.write, write_size, i, t, WRITE_COLOUR)
            if j == 0:
                ax.set_ylabel("canvas + write", fontsize=7)
    legend = f"red: read glimpse ({read_size}x{read_size})" if show_read else ""
    if trace.write is not None and write_size is not None:
        legend += ("; " if legend else "") + f"green: write patch ({write_size}x{write_size})"
    if legend:
        legend += "\nthicker border = sharper filters; boxes larger than the image are clipped at its border"
    fig.suptitle((title + "\n" if title else "") + legend, fontsize=8)
    return fig


def canvas_grid(trace, *, n: int = 8, steps: int | None = None, write_size: int | None = None, title: str | None = None):
    """Patch-by-patch generation: rows = samples, columns = steps, each cell sigmoid(c_t),
    with the write box (green) when write_size is given and the trace has write attention."""
    n = min(n, trace.canvases.shape[0])
    cols = _steps_to_show(trace.canvases.shape[1], steps)
    fig = _figure(0.9 * len(cols) + 0.4, 0.95 * n + 0.6)
    axes = fig.subplots(n, len(cols), squeeze=False)
    for i in range(n):
        for j, t in enumerate(cols):
            ax = axes[i, j]
            _image_panel(ax, trace.canvases[i, t], f"t={t + 1}" if i == 0 else None)
            if trace.write is not None and write_size is not None:
                add_glimpse_box(ax, trace.write, write_size, i, t, WRITE_COLOUR)
    if title or (trace.write is not None and write_size is not None):
        note = f"green: write patch ({write_size}x{write_size}), clipped at the image border" if write_size else ""
        fig.suptitle("\n".join(t for t in (title, note) if t), fontsize=9)
    return fig


def glimpse_animation(trace, path, images: Tensor | None = None, *, read_size: int | None = None,
                      write_size: int | None = None, n: int = 4, duration_ms: int = 500, title: str | None = None):
    """A GIF of the canvas being drawn, one frame per step, boxes moving with the attention;
    with `images`, each example's input and read box is shown beside its canvas."""
    n = min(n, trace.canvases.shape[0])
    show_read = images is not None and trace.read is not None and read_size is not None
    frames = []
    for t in range(trace.canvases.shape[1]):
        fig = _figure(1.3 * n, 2.7 if show_read else 1.5)
        axes = fig.subplots(2 if show_read else 1, n, squeeze=False)
        for i in range(n):
            if show_read:
                _image_panel(axes[0, i], images[i], "input" if i == 0 else None)
                add_glimpse_box(axes[0, i], trace.read, read_size, i, t, READ_COLOUR)
            ax = axes[-1, i]
            _image_panel(ax, trace.canvases[i, t], "canvas" if (i == 0 and show_read) else None)
            if trace.write is not None and write_size is not None:
                add_glimpse_box(ax, trace.write, write_size, i, t, WRITE_COLOUR)
        fig.suptitle(f"{title + ': ' if title else ''}step {t + 1}/{trace.canvases.shape[1]}", fontsize=8)
        frames.append(fig)
    return save_gif(frames, path, duration_ms=duration_ms)


# ---------------------------------------------------------------------------- sequences and latents


def sequence_kl(x: Tensor, kl: Tensor, *, mean: Tensor | None = None, title: str | None = None,
                binary: bool = True, low_note: int = 21, mean_label: str = "the model's output mean at each step"):
    """A sequence (t, d) above its per-step KL per unit (t, z) as a heat map.

    Binary data are drawn as a piano roll (MIDI notes up, from low_note), other data as one
    line per feature; `mean`, if given, is drawn as a second panel (the model's predictions).
    """
    x = x.detach().float().cpu()
    kl = kl.detach().float().cpu()
    panels = 3 if mean is not None else 2
    fig = _figure(min(14.0, 2.5 + x.shape[0] / 12), 1.9 * panels + 0.4)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    extent = (-0.5, x.shape[0] - 0.5, low_note - 0.5, low_note + x.shape[1] - 0.5)
    y_range = _note_range([x] if mean is None else [x, mean.detach()], low_note)

    def draw(ax, values, label):
        if binary:
            ax.imshow(values.T.numpy(), origin="lower", aspect="auto", cmap="gray_r", vmin=0, vmax=1, interpolation="nearest", extent=extent)
            ax.set_ylim(*y_range)
            ax.set_ylabel("MIDI note", fontsize=8)
        else:
            ax.plot(values.numpy(), linewidth=0.8)
            ax.set_ylabel("value", fontsize=8)
        ax.set_title(label, fontsize=9, loc="left")

    draw(axes[0], x, "data")
    if mean is not None:
        draw(axes[1], mean.detach().float().cpu(), mean_label)
    ax = axes[-1]
    im = ax.imshow(kl.T.numpy(), origin="lower", aspect="auto", cmap="magma", interpolation="nearest", extent=(-0.5, x.shape[0] - 0.5, -0.5, kl.shape[1] - 0.5))
    fig.colorbar(im, ax=list(axes[:-1]), fraction=0.03, pad=0.01).ax.set_visible(False)  # keep the panels aligned
    ax.set_ylabel("latent unit", fontsize=8)
    ax.set_xlabel("time step", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"KL(q || p) per unit and step (nats); total {float(kl.sum()):.1f}", fontsize=9, loc="left")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    for a in axes:
        a.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def latent_usage(usage, *, title: str | None = None, kl_max: float | None = None):
    """Active units (bars against the 0.01 threshold) and KL per unit and step; kl_max fixes the top of
    the heat map's colour scale (give several runs' figures the same one to compare them)."""
    fig = _figure(9.0, 3.6)
    ax_bar, ax_heat = fig.subplots(1, 2, width_ratios=[1, 1.4])
    # For sequences the bars and the headline use the prior-relative criterion (the same as
    # Burda's for a fixed N(0, I) prior; for a learned prior the one that tracks the KL).
    var = usage.prior_relative_variance if usage.sequential else usage.variance.max(0).values
    active = var > usage.threshold
    units = np.arange(var.shape[0])
    ax_bar.bar(units, var.numpy(), color=np.where(active.numpy(), "#2b6cb0", "#b0b0b0"))
    ax_bar.axhline(usage.threshold, color="k", linestyle="--", linewidth=0.8)
    ax_bar.set_yscale("log")
    ax_bar.set_xlabel("latent unit", fontsize=8)
    ax_bar.set_ylabel("Cov_x(E_q[u] - E_p[u])" if usage.sequential else "Cov_x(E_q[u]), max over steps", fontsize=8)
    if usage.sequential:
        burda = int(usage.pooled_active.sum())
        bar_title = (f"{int(active.sum())} of {var.shape[0]} units active relative to the prior\n"
                     f"(pooled over time; {burda} by Cov_x(E_q[u]) alone)")
    else:
        bar_title = (f"{int(active.sum())} of {var.shape[0]} units active at some glimpse\n"
                     f"({usage.active_units} of {usage.active.numel()} (step, unit) pairs)")
    ax_bar.set_title(bar_title + f"; dashed: {usage.threshold}", fontsize=9)
    kl = usage.kl.numpy()
    steps = kl.shape[0]
    im = ax_heat.imshow(kl.T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest", vmin=0, vmax=kl_max,
                        extent=(0.5, steps + 0.5, -0.5, kl.shape[1] - 0.5))
    ax_heat.set_xlabel("time step" if usage.sequential else "glimpse step", fontsize=8)
    ax_heat.set_ylabel("latent unit", fontsize=8)
    units_label = "nats per time step" if usage.sequential else "nats per image"
    ax_heat.set_title(f"mean KL per unit and step; total {usage.kl_total:.2f} {units_label}", fontsize=9)
    fig.colorbar(im, ax=ax_heat, fraction=0.04, pad=0.01, label="nats")
    for a in (ax_bar, ax_heat):
        a.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def training_curves(records, *, title: str | None = None):
    """Training loss against optimiser steps and validation bounds against epochs, from a
    run's metrics.jsonl (a path) or its list of records."""
    import json

    if isinstance(records, (str, os.PathLike)):
        records = [json.loads(line) for line in Path(records).read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    valid = [r for r in records if r.get("kind") == "valid"]
    fig = _figure(9.0, 3.2)
    ax_t, ax_v = fig.subplots(1, 2)
    if train:
        ax_t.plot([r["step"] for r in train], [r["loss"] for r in train], color="#2b6cb0", linewidth=1)
    ax_t.set_xlabel("optimiser step", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax_t.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_t.set_ylabel("training loss (negative bound)", fontsize=8)
    ax_t.set_title("training", fontsize=9)
    keys = sorted({k for r in valid for k in r if k.startswith("valid_")})
    per_step = [k for k in keys if k.endswith("_per_step")]
    shown = per_step or keys
    for k in shown:
        values = [math.nan if r.get(k) is None else r[k] for r in valid]  # null: not finite (a gap)
        ax_v.plot([r["epoch"] for r in valid], values, marker="o", markersize=3, linewidth=1, label=k.replace("valid_", ""))
    ax_v.set_xlabel("epoch", fontsize=8)
    ax_v.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_v.set_ylabel("nats per time step" if per_step else "nats per example", fontsize=8)
    ax_v.set_title("validation bounds (higher is better)", fontsize=9)
    if shown:
        ax_v.legend(fontsize=7)
    for a in (ax_t, ax_v):
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig

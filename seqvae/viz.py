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
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write_bytes

__all__ = ["image_grid", "grid_array", "piano_rolls", "save_figure", "save_gif", "canvas_frames"]


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
    fig = _figure(max(2.0, w / 28 * scale), max(2.0, h / 28 * scale) + (0.3 if title else 0))
    ax = fig.add_subplot()
    ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def piano_rolls(rolls: Tensor | list[Tensor], *, titles: list[str] | None = None, suptitle: str | None = None, low_note: int = 21):
    """Piano rolls (n, t, k) (or a list of (t_i, k)), one panel each: time across, MIDI note up.

    Values in [0, 1] are shown as grey levels (1 = note on), so a model's note
    probabilities and binary samples read the same way.
    """
    rolls = list(rolls)
    n = len(rolls)
    longest = max(r.shape[0] for r in rolls)
    fig = _figure(min(14.0, 2 + longest / 14), 1.6 * n + 0.6)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for i, (ax, roll) in enumerate(zip(axes, rolls)):
        roll = roll.detach().float().cpu().numpy()
        ax.imshow(
            roll.T, origin="lower", aspect="auto", cmap="gray_r", vmin=0, vmax=1, interpolation="nearest",
            extent=(-0.5, roll.shape[0] - 0.5, low_note - 0.5, low_note + roll.shape[1] - 0.5),
        )
        ax.set_xlim(-0.5, longest - 0.5)
        ax.set_ylabel("MIDI note", fontsize=8)
        if titles:
            ax.set_title(titles[i], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
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


def save_gif(frames: list, path: str | os.PathLike, *, duration_ms: int = 120, hold_last_ms: int = 1200, scale: int = 3) -> Path:
    """Write frames (arrays in [0, 1], (H, W) or (H, W, c), or matplotlib figures) as a looping GIF."""
    from PIL import Image

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
    durations = [duration_ms] * (len(images) - 1) + [hold_last_ms]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path

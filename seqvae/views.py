"""Figures of a trained model, by name: what `seqvae viz` / `seqvae sample` and the trainer draw.

A view is chosen by name ("glimpses", "canvas", "sequences", "latents"; models.VIEWS) and a
model offers the views its registry entry lists; training curves come from any run folder.
How examples and samples look is decided by the data set's `display` (data.py), never by
the model's or the data set's name. The drawing itself is in viz.py (tensors in, figures out).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import viz
from .data import DataInfo, model_data_info

__all__ = ["sample_figure", "write_samples", "draw_view", "ViewError"]


class ViewError(ValueError):
    """A view that this run cannot draw (the message says which it can)."""


def _title(model, kind: str) -> str:
    describe = getattr(model, "describe", None)
    return describe() if describe is not None else kind


@torch.no_grad()
def sample_figure(model, info: DataInfo, n: int, *, steps: int | None = None, title: str | None = None):
    """A figure of n samples, drawn the way the data set shows its examples."""
    model.eval()
    if info.kind == "images":
        return viz.image_grid(model.sample(n).cpu(), title=title)
    steps = steps or info.length or 100
    sample = model.generate(n, steps)
    if info.display == "rows":
        return viz.image_grid(sample.mean.cpu()[:, None], title=title)
    if info.display == "lines":
        return viz.sequence_lines(sample.x.cpu(), suptitle=title)
    return viz.piano_rolls(sample.x.cpu(), suptitle=title)


def _check_midi(info: DataInfo) -> None:
    if info.display != "piano":
        raise ViewError(f"--midi writes piano rolls; the {info.name} data are not piano rolls (binary 88-key sequences)")


def write_samples(model, spec, info: DataInfo, n: int, out_dir: Path, *, steps: int | None = None,
                  midi: Path | None = None) -> list[Path]:
    """samples.png (and samples.gif, the canvas step by step, for models with a canvas view;
    with `midi`, the same samples as a MIDI file, for piano-roll data)."""
    if midi is not None:
        _check_midi(info)
        from .music import write_midi

        steps = steps or info.length or 100
        sample = model.generate(n, steps)
        what = f"{spec.name} samples ({steps} steps)"
        return [viz.save_figure(viz.piano_rolls(sample.x.cpu(), suptitle=what), out_dir / "samples.png"),
                write_midi(sample.x, midi)]
    if "canvas" in spec.views:
        trace = model.generate(n)
        return [
            viz.save_figure(viz.image_grid(trace.images.cpu(), title=f"{_title(model, spec.name)} samples"), out_dir / "samples.png"),
            viz.save_gif(viz.canvas_frames(trace.canvases.cpu()), out_dir / "samples.gif", title=f"{spec.name} samples"),
        ]
    if info.kind == "sequences":
        steps = steps or info.length or 100
        what = f"{spec.name} samples ({steps} steps)" if info.display != "rows" else f"{spec.name} samples (rows as steps)"
    else:
        what = f"{spec.name} samples"
    return [viz.save_figure(sample_figure(model, info, n, steps=steps, title=what), out_dir / "samples.png")]


def draw_view(what: str, model, spec, config, load_split, out: Path, *, n: int = 4, steps: int = 8, limit: int = 1000,
              split: str = "valid", device="cpu", midi: Path | None = None) -> Path:
    """Draw view `what` of a model into `out` (.png/.pdf/.svg, or .gif for glimpses and canvas).

    load_split() returns the data split to look at (called only by the views that need data).
    With `midi` ("sequences" of piano-roll data), the reconstructions of the first n sequences
    (notes whose probability under the model exceeds 0.5) are also written as a MIDI file.
    """
    if midi is not None:
        if what != "sequences":
            raise ViewError("--midi writes reconstructions of sequences: use it with --what sequences")
        _check_midi(model_data_info(config.data, config.model))  # before any work
    if what not in spec.views:
        offered = ", ".join([*spec.views, "curves"])
        raise ViewError(f"--what {what} is not a view of {spec.name} runs: it offers {offered}")
    gif = out.suffix.lower() == ".gif"
    if gif and what not in ("glimpses", "canvas"):
        raise ViewError(f"--what {what} makes a still figure: use .png, .pdf or .svg")
    title = _title(model, spec.name)
    data_name = config.data.name
    if what in ("glimpses", "canvas"):
        read_n = getattr(model.read_head, "n", None)
        write_n = getattr(model.write_head, "n", None)
        if what == "glimpses":
            x = load_split().batch(torch.arange(n)).x.to(device)
            trace = model.reconstruct(x)
            if gif:
                return viz.glimpse_animation(trace, out, x.cpu(), read_size=read_n, write_size=write_n, n=n,
                                             title=f"{title}, reconstructions (read red, write green)")
            fig = viz.glimpse_grid(trace, x.cpu(), read_size=read_n, write_size=write_n, n=n, steps=steps,
                                   title=title + ", reconstructions")
        else:
            trace = model.generate(n)
            if gif:
                return viz.glimpse_animation(trace, out, write_size=write_n, n=n, title=f"{title}, samples")
            fig = viz.canvas_grid(trace, n=n, steps=steps, write_size=write_n, title=title + ", samples drawn step by step")
    elif what == "sequences":
        data = load_split()
        batch = data.batch(torch.arange(min(n, len(data))))
        trace = model.reconstruct(batch.x.to(device), lengths=batch.lengths.to(device))
        length = int(batch.lengths[0])
        kl = trace.kl[0, :length] if trace.kl.shape[-1] else torch.zeros(length, 1)
        fig = viz.sequence_kl(batch.x[0, :length], kl, mean=trace.mean[0, :length], binary=data.binary,
                              mean_label=getattr(model, "reconstruction_label", "the model's output mean at each step"),
                              title=f"{spec.name} on {data_name}/{split}, sequence 0")
        if midi is not None:
            from .music import write_midi

            write_midi([trace.mean[i, : int(n_i)].cpu() for i, n_i in enumerate(batch.lengths)], midi)
    else:  # latents
        from .diagnostics import latent_usage

        data = load_split().subset(limit)
        usage = latent_usage(model, data, device=device)
        fig = viz.latent_usage(usage, title=f"{spec.name} on {data_name}/{split} ({len(data)} examples)")
    return viz.save_figure(fig, out)

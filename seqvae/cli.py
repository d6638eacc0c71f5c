"""The `seqvae` command line: train, eval, sample.

    seqvae train draw [--preset quick|paper] [--data NAME] [--name NAME] [--section.key=value ...]
    seqvae train vrnn --data jsb_chorales [--preset quick|paper] ...
    seqvae train draw --name NAME --resume            continue a run from its last checkpoint
    seqvae eval RUN [--k 5000] [--split test]         test log-likelihood estimate
    seqvae sample RUN [--n 64]                        samples as PNG (and a GIF for DRAW)
    seqvae viz RUN --what glimpses|canvas|sequences|latents|curves --out FILE

Every override is checked against the config dataclasses (an unknown key or a value of the
wrong type or range is an error); errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .configs import ConfigError, apply_override

__all__ = ["main"]

KNOWN_X_DIM = {"jsb_chorales": 88, "seq_mnist": 28}


class CLIError(Exception):
    pass


def _run_dir(run: str, runs_dir: str) -> Path:
    path = Path(run)
    if path.exists():
        return path
    candidate = Path(runs_dir) / run
    if candidate.exists():
        return candidate
    raise CLIError(f"no run {run!r}: neither {path} nor {candidate} exists")


def _split_overrides(extra: list[str]) -> list[str]:
    """['--model.steps=10', '--train.lr', '0.1'] -> ['model.steps=10', 'train.lr=0.1']."""
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise CLIError(f"unrecognised argument {arg!r}: overrides look like --section.key=value (e.g. --train.epochs=5)")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{arg[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise CLIError(f"override {arg!r} has no value: write {arg}=VALUE")
    return out


def _peek_x_dim(config) -> int | None:
    from .data import load_dataset

    name = config.data.name
    if name in KNOWN_X_DIM:
        return KNOWN_X_DIM[name]
    if name == "npz" and config.data.data_path:
        return load_dataset("npz", "train", data_path=config.data.data_path).x_dim
    return None


def build_config(kind: str, preset: str | None, overrides: list[str], data: str | None, data_dir: str | None):
    from .presets import preset_overrides
    from .train import MODELS, RunConfig

    if kind not in MODELS:
        raise CLIError(f"unknown model {kind!r}: expected one of {', '.join(MODELS)}")
    config = RunConfig(kind, MODELS[kind][1]())
    if kind != "draw":
        config = apply_override(config, "data.name=jsb_chorales")
    settings = preset_overrides(kind, preset) if preset else []
    if data:
        settings.append(f"data.name={data}")
    if data_dir:
        settings.append(f"data.data_dir={data_dir}")
    for assignment in settings + overrides:
        config = apply_override(config, assignment)
    user_keys = {o.split("=", 1)[0].strip() for o in overrides}
    if kind != "draw" and "model.x_dim" not in user_keys:
        x_dim = _peek_x_dim(config)
        if x_dim is not None:
            config = apply_override(config, f"model.x_dim={x_dim}")
    return config.validate()


def cmd_train(args, extra: list[str]) -> int:
    from .train import RunConfig, Trainer

    overrides = _split_overrides(extra)
    if args.resume:
        if not args.name:
            raise CLIError("--resume needs --name NAME (the run to continue)")
        run_dir = Path(args.runs_dir) / args.name
        config_path = run_dir / "config.json"
        if not config_path.exists():
            raise CLIError(f"cannot resume: {config_path} does not exist")
        try:
            config = RunConfig.from_dict(json.loads(config_path.read_text()))
        except json.JSONDecodeError as err:
            raise CLIError(f"{config_path} is not valid JSON ({err})") from None
        if config.model_kind != args.kind:
            raise CLIError(f"run {args.name} trains {config.model_kind}, not {args.kind}")
        if args.preset or args.data:
            raise CLIError("--preset and --data cannot change a run being resumed")
        for assignment in overrides:
            config = apply_override(config, assignment)
        config = config.validate()
    else:
        config = build_config(args.kind, args.preset, overrides, args.data, args.data_dir)
        name = args.name or f"{args.kind}-{config.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.runs_dir) / name
    if args.data_dir and args.resume:
        config = apply_override(config, f"data.data_dir={args.data_dir}")
    _init_distributed(config)
    trainer = Trainer(config, run_dir, resume=args.resume, log=_log)
    trainer.fit()
    if trainer.main:
        _log(f"run folder: {run_dir}")
    _finish_distributed()
    return 0


def _init_distributed(config) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    use_cuda = config.train.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")


def _finish_distributed() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _log(message: str) -> None:
    print(message, flush=True)


def cmd_eval(args, extra: list[str]) -> int:
    import torch

    from .checkpoint import atomic_write_bytes
    from .data import load_dataset
    from .train import _device, evaluate, load_run

    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    if args.k < 1:
        raise CLIError(f"--k must be a positive number of samples, got {args.k}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    run_dir = _run_dir(args.run, args.runs_dir)
    device = _device(args.device)
    config, model, payload = load_run(run_dir, which=args.checkpoint, map_location=device)
    torch.manual_seed(args.seed)
    dc = config.data
    data = load_dataset(dc.name, args.split, data_dir=args.data_dir or dc.data_dir, data_path=dc.data_path, download=dc.download)
    data = data.subset(args.limit)
    started = time.time()
    result = evaluate(model, data, name=args.bound, k=args.k, batch_size=args.batch_size, device=device)
    result.update(split=args.split, seconds=round(time.time() - started, 1), epoch=payload.get("epoch"), step=payload.get("step"))
    what = "log-likelihood estimate" if args.bound == "ll" else f"{args.bound} bound"
    lines = [f"{config.model_kind} on {dc.name}/{args.split} ({result['examples']} examples), {what} with k={args.k}:"]
    if "nats_per_step" in result:
        lines.append(f"  log p(x) per sequence  {result['nats']:.3f} nats")
        lines.append(f"  log p(x) per time step {result['nats_per_step']:.4f} nats   ({result['steps']} steps)")
    else:
        lines.append(f"  NLL {-result['nats']:.2f} nats   ({result['bits_per_dim']:.4f} bits/dim)")
    if args.diagnostics and _has_latents(model):
        from .diagnostics import latent_usage

        usage = latent_usage(model, data, batch_size=args.batch_size, device=device)
        result["latents"] = usage.to_dict()
        lines.append(_usage_lines(usage))
    print("\n".join(lines))
    if run_dir.is_dir():
        out = run_dir / f"eval_{args.split}_{args.bound}_k{args.k}.json"
        atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"written to {out}")
    return 0


def _has_latents(model) -> bool:
    return not getattr(model, "sequential", False) or hasattr(model, "z_size")


def _usage_lines(usage) -> str:
    units = usage.active.shape[1]
    if usage.sequential:
        relative = int((usage.prior_relative_variance > usage.threshold).sum())
        head = (f"  active units: {usage.active_units} of {units} (Cov_x(E_q[u]) > {usage.threshold}, pooled over time steps); "
                f"{relative} of {units} relative to the prior mean (Cov(E_q[u] - E_p[u]) > {usage.threshold})")
        kl = f"  KL: {usage.kl_total:.3f} nats per time step; per unit: " + " ".join(f"{v:.2f}" for v in usage.kl_per_unit.tolist())
    else:
        per_step = usage.active.sum(1).tolist()
        head = (f"  active units: {usage.active_units} of {usage.active.numel()} (step, unit) pairs "
                f"(Cov_x(E_q[u]) > {usage.threshold}); per glimpse step: {per_step}")
        kl = f"  KL: {usage.kl_total:.2f} nats per image; per step: " + " ".join(f"{v:.1f}" for v in usage.kl_per_step.tolist())
    return head + "\n" + kl


def cmd_viz(args, extra: list[str]) -> int:
    import torch

    from . import viz
    from .data import load_dataset
    from .diagnostics import latent_usage
    from .draw import DRAW
    from .train import _device, load_run

    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    if args.n < 1:
        raise CLIError(f"--n must be at least 1, got {args.n}")
    run_dir = _run_dir(args.run, args.runs_dir)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".gif"):
        raise CLIError(f"--out must end in .png, .pdf, .svg or .gif, got {out.name!r}")
    gif = out.suffix.lower() == ".gif"
    if args.what == "curves":
        metrics = (run_dir if run_dir.is_dir() else run_dir.parent) / "metrics.jsonl"
        if not metrics.exists():
            raise CLIError(f"{metrics} does not exist: training curves need a run folder")
        viz.save_figure(viz.training_curves(metrics, title=run_dir.name), out)
        print(f"written {out}")
        return 0
    device = _device(args.device)
    config, model, _ = load_run(run_dir, which=args.checkpoint, map_location=device)
    torch.manual_seed(args.seed)
    is_draw = isinstance(model, DRAW)
    if args.what in ("glimpses", "canvas") and not is_draw:
        raise CLIError(f"--what {args.what} shows DRAW's attention; this run is a {config.model_kind}")
    if args.what == "sequences" and is_draw:
        raise CLIError("--what sequences is for sequence models; for DRAW use glimpses or canvas")
    if gif and args.what not in ("glimpses", "canvas"):
        raise CLIError(f"--what {args.what} makes a still figure: use .png, .pdf or .svg")
    if args.what == "latents" and not _has_latents(model):
        raise CLIError("the RNN baseline has no latent variables: --what latents needs draw or vrnn")
    dc = config.data
    data = lambda: load_dataset(dc.name, args.split, data_dir=args.data_dir or dc.data_dir, data_path=dc.data_path, download=dc.download)  # noqa: E731
    if is_draw:
        read_n = getattr(model.read_head, "n", None)
        write_n = getattr(model.write_head, "n", None)
        title = f"DRAW (T={model.steps}, read {config.model.read}, write {config.model.write})"
    if args.what == "glimpses":
        x = data().batch(torch.arange(args.n)).x.to(device)
        trace = model.reconstruct(x)
        if gif:
            viz.glimpse_animation(trace, out, x.cpu(), read_size=read_n, write_size=write_n, n=args.n)
        else:
            fig = viz.glimpse_grid(trace, x.cpu(), read_size=read_n, write_size=write_n, n=args.n, steps=args.steps, title=title + ", reconstructions")
            viz.save_figure(fig, out)
    elif args.what == "canvas":
        trace = model.generate(args.n)
        if gif:
            viz.glimpse_animation(trace, out, write_size=write_n, n=args.n)
        else:
            viz.save_figure(viz.canvas_grid(trace, n=args.n, steps=args.steps, write_size=write_n, title=title + ", samples drawn step by step"), out)
    elif args.what == "sequences":
        d = data()
        batch = d.batch(torch.arange(min(args.n, len(d))))
        trace = model.reconstruct(batch.x.to(device), lengths=batch.lengths.to(device))
        i, length = 0, int(batch.lengths[0])
        binary = getattr(d, "binary", True)
        kl = trace.kl[i, :length] if trace.kl.shape[-1] else torch.zeros(length, 1)
        what = "decoder mean p(x_t | z_t, h_t-1) with z_t drawn from q" if config.model_kind == "vrnn" else "prediction p(x_t | x_<t)"
        fig = viz.sequence_kl(batch.x[i, :length], kl, mean=trace.mean[i, :length], binary=binary, mean_label=what,
                              title=f"{config.model_kind} on {dc.name}/{args.split}, sequence 0")
        viz.save_figure(fig, out)
    else:  # latents
        d = data().subset(args.limit)
        usage = latent_usage(model, d, device=device)
        viz.save_figure(viz.latent_usage(usage, title=f"{config.model_kind} on {dc.name}/{args.split} ({len(d)} examples)"), out)
    print(f"written {out}")
    return 0


def cmd_sample(args, extra: list[str]) -> int:
    import torch

    from . import viz
    from .draw import DRAW
    from .train import _device, load_run

    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    if args.n < 1:
        raise CLIError(f"--n must be at least 1, got {args.n}")
    run_dir = _run_dir(args.run, args.runs_dir)
    config, model, _ = load_run(run_dir, which=args.checkpoint, map_location=_device(args.device))
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir) if args.out_dir else (run_dir if run_dir.is_dir() else Path("."))
    written = []
    if isinstance(model, DRAW):
        trace = model.generate(args.n)
        written.append(viz.save_figure(viz.image_grid(trace.images.cpu(), title=f"DRAW samples (T={model.steps})"), out_dir / "samples.png"))
        written.append(viz.save_gif(viz.canvas_frames(trace.canvases.cpu()), out_dir / "samples.gif"))
    else:
        steps = args.steps or (28 if config.data.name == "seq_mnist" else 100)
        gen = model.generate(args.n, steps)
        if config.data.name == "seq_mnist":
            fig = viz.image_grid(gen.mean.cpu()[:, None], title=f"{config.model_kind} samples (28 rows as steps)")
        else:
            fig = viz.piano_rolls(gen.x.cpu(), suptitle=f"{config.model_kind} samples ({steps} steps)")
        written.append(viz.save_figure(fig, out_dir / "samples.png"))
    for path in written:
        print(f"written {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqvae", description="Recurrent latent-variable generative models: DRAW and variational RNNs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model", description="Train DRAW, a VRNN or an RNN baseline. Extra arguments --section.key=value override the config.")
    t.add_argument("kind", help="draw | vrnn | rnn")
    t.add_argument("--preset", help="quick | paper (draw also: attention)")
    t.add_argument("--data", help="data set name (same as --data.name=NAME)")
    t.add_argument("--name", help="run name (folder under --runs-dir); default KIND-DATA-TIMESTAMP")
    t.add_argument("--runs-dir", default="runs", help="where runs live (default: runs)")
    t.add_argument("--data-dir", help="data root (default: $SEQVAE_DATA, else data/)")
    t.add_argument("--resume", action="store_true", help="continue the run --name from its last checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="estimate the test log-likelihood of a trained run")
    e.add_argument("run", help="run folder, run name under --runs-dir, or checkpoint file")
    e.add_argument("--k", type=int, default=5000, help="importance samples per example (default 5000)")
    e.add_argument("--bound", default="ll", choices=["ll", "elbo", "iwae", "fivo"], help="ll = importance-sampling estimate of log p(x)")
    e.add_argument("--split", default="test", choices=["train", "valid", "test"])
    e.add_argument("--limit", type=int, help="use only the first N examples of the split")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--checkpoint", default="best", choices=["best", "last"])
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--runs-dir", default="runs")
    e.add_argument("--data-dir")
    e.add_argument("--no-diagnostics", dest="diagnostics", action="store_false", help="skip active units and KL per unit")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run folder, run name under --runs-dir, or checkpoint file")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--steps", type=int, help="sequence models: time steps per sample")
    s.add_argument("--out-dir", help="where to write (default: the run folder)")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"])
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--runs-dir", default="runs")
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("viz", help="figures from a trained run", description="Figures of a run: attention glimpses, canvases, sequences with per-step KL, latent usage, training curves.")
    v.add_argument("run", help="run folder, run name under --runs-dir, or checkpoint file")
    v.add_argument("--what", required=True, choices=["glimpses", "canvas", "sequences", "latents", "curves"])
    v.add_argument("--out", required=True, help="output file: .png/.pdf/.svg, or .gif for an animation (glimpses, canvas)")
    v.add_argument("--n", type=int, default=4, help="examples (glimpses, canvas, sequences)")
    v.add_argument("--steps", type=int, default=8, help="steps shown as columns (glimpses, canvas)")
    v.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    v.add_argument("--limit", type=int, default=1000, help="examples for --what latents")
    v.add_argument("--checkpoint", default="best", choices=["best", "last"])
    v.add_argument("--device", default="auto")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--runs-dir", default="runs")
    v.add_argument("--data-dir")
    v.set_defaults(func=cmd_viz)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import TrainingError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return args.func(args, extra)
    except (CLIError, ConfigError, DataError, CheckpointError, TrainingError, ValueError) as err:
        message = str(err).strip() or type(err).__name__
        print(f"seqvae: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqvae: interrupted (the last checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

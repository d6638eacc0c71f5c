"""The `seqvae` command line: train, eval, sample.

    seqvae train MODEL [--preset NAME] [--data NAME] [--name NAME] [--section.key=value ...]
                     (models, presets and data sets come from their registries; see --help)
    seqvae train draw --name NAME --resume            continue a run from its last checkpoint
    seqvae eval RUN [--k 5000] [--split test]         test log-likelihood estimate
    seqvae sample RUN [--n 64] [--midi out.mid]       samples as PNG (a GIF for DRAW, MIDI for piano rolls)
    seqvae viz RUN --what glimpses|canvas|sequences|latents|curves --out FILE

Every override is checked against the config dataclasses (an unknown key or a value of the
wrong type or range is an error); errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .configs import ConfigError, apply_override

__all__ = ["main"]


class CLIError(Exception):
    pass


def _run_dir(run: str, runs_dir: str) -> Path:
    if run.startswith("pretrained:"):  # a model shipped with the package (seqvae.zoo)
        from .zoo import pretrained_path

        return pretrained_path(run)
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


def cmd_train(args, extra: list[str]) -> int:
    from .distributed import finish, init_from_env
    from .run import build_config, load_run_config, run_folder
    from .train import Trainer

    overrides = _split_overrides(extra)
    if args.resume:
        if not args.name:
            raise CLIError("--resume needs --name NAME (the run to continue)")
        run_dir = run_folder(args.runs_dir, args.name)
        config = load_run_config(run_dir)
        if config.model_kind != args.kind:
            raise CLIError(f"run {args.name} trains {config.model_kind}, not {args.kind}")
        if args.preset or args.data:
            raise CLIError("--preset and --data cannot change a run being resumed")
        for assignment in overrides + ([f"data.data_dir={args.data_dir}"] if args.data_dir else []):
            config = apply_override(config, assignment)
        config = config.validate()
    else:
        config = build_config(args.kind, args.preset, overrides, args.data, args.data_dir)
        name = args.name or f"{args.kind}-{config.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = run_folder(args.runs_dir, name)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    init_from_env(use_cuda=config.train.device != "cpu")
    trainer = Trainer(config, run_dir, resume=args.resume, log=_log)
    trainer.fit()
    if trainer.main:
        _log(f"run folder: {run_dir}")
    finish()
    return 0


MAX_FIGURE_EXAMPLES = 64  # examples drawn in one figure (seqvae viz --n)
MAX_SAMPLES = 4096  # samples in one call of seqvae sample


def _check_count(flag: str, value: int, most: int) -> None:
    if not 1 <= value <= most:
        raise CLIError(f"{flag} must lie in 1..{most}, got {value}")


def _log(message: str) -> None:
    print(message, flush=True)


def _load(args):
    """(spec, config, model, payload, device) of the run named on the command line."""
    from .models import get_model
    from .run import load_run
    from .train import resolve_device

    device = resolve_device(args.device)
    run_dir = _run_dir(args.run, args.runs_dir)
    config, model, payload = load_run(run_dir, which=args.checkpoint, map_location=device)
    return run_dir, get_model(config.model_kind), config, model, payload, device


def _split_loader(config, split: str, data_dir: str | None):
    from .data import load_dataset

    dc = config.data
    return lambda: load_dataset(dc.name, split, data_dir=data_dir or dc.data_dir, data_path=dc.data_path, download=dc.download)


def cmd_eval(args, extra: list[str]) -> int:
    import torch

    from .checkpoint import atomic_write_bytes
    from .evaluate import evaluate

    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    if args.k is None:
        args.k = {"ll": 5000, "elbo": 1}.get(args.bound, 50)
    if args.k < 1:
        raise CLIError(f"--k must be a positive number of samples, got {args.k}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    run_dir, spec, config, model, payload, device = _load(args)
    if not spec.latents and args.k != 1:  # every sample would be the same computation
        print(f"{config.model_kind} has no latent variables: its {args.bound} equals its exact likelihood and is computed once (k=1, not {args.k})")
        args.k = 1
    torch.manual_seed(args.seed)
    dc = config.data
    data = _split_loader(config, args.split, args.data_dir)().subset(args.limit)
    started = time.time()  # (evaluate checks that the split fits the model first)
    result = evaluate(model, data, name=args.bound, k=args.k, batch_size=args.batch_size, device=device, progress=True)
    result.update(split=args.split, seconds=round(time.time() - started, 1), epoch=payload.get("epoch"), step=payload.get("step"))
    what = "log-likelihood estimate" if args.bound == "ll" else f"{args.bound} bound"
    lines = [f"{config.model_kind} on {dc.name}/{args.split} ({result['examples']} examples), {what} with k={args.k}:"]
    if "nats_per_step" in result:
        lines.append(f"  log p(x) per sequence  {result['nats']:.3f} nats")
        lines.append(f"  log p(x) per time step {result['nats_per_step']:.4f} nats   ({result['steps']} steps)")
    else:
        bits = f"   ({result['bits_per_dim']:.4f} bits/dim)" if "bits_per_dim" in result else "   (a density: not a code length)"
        lines.append(f"  NLL {-result['nats']:.2f} nats{bits}")
    if args.diagnostics and spec.latents:
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
    undecided = int(usage.undecided.sum())
    paths = (f"  from {usage.samples} posterior paths per example, path noise removed"
             + (f"; {undecided} undecided (within two standard errors of the threshold: use more examples or paths)" if undecided else "")
             if usage.samples > 1 else "  from 1 posterior path per example (path noise not removed)")
    return head + "\n" + kl + "\n" + paths


def cmd_viz(args, extra: list[str]) -> int:
    import torch

    from . import viz
    from .views import draw_view

    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    _check_count("--n", args.n, MAX_FIGURE_EXAMPLES)
    _check_count("--steps", args.steps, 1000)
    _check_count("--limit", args.limit, 1_000_000)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".gif"):
        raise CLIError(f"--out must end in .png, .pdf, .svg or .gif, got {out.name!r}")
    if args.what == "curves":
        run_dir = _run_dir(args.run, args.runs_dir)
        if out.suffix.lower() == ".gif":
            raise CLIError("--what curves makes a still figure: use .png, .pdf or .svg")
        from .logs import read_metrics

        try:
            if run_dir.is_dir():
                records = read_metrics(run_dir)
            else:  # a checkpoint file: a shipped model carries its records; else its folder's files
                from .checkpoint import load_checkpoint

                records = load_checkpoint(run_dir).get("metrics") or read_metrics(run_dir.parent)
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
        viz.save_figure(viz.training_curves(records, title=run_dir.name), out)
        print(f"written {out}")
        return 0
    _, spec, config, model, _, device = _load(args)
    torch.manual_seed(args.seed)
    midi = Path(args.midi) if args.midi else None
    if midi is not None and midi.suffix.lower() not in (".mid", ".midi"):
        raise CLIError(f"--midi must name a .mid file, got {midi.name!r}")
    draw_view(args.what, model, spec, config, _split_loader(config, args.split, args.data_dir), out, n=args.n,
              steps=args.steps, limit=args.limit, split=args.split, device=device, midi=midi)
    print(f"written {out}")
    if midi is not None:
        print(f"written {midi}")
    return 0


def cmd_sample(args, extra: list[str]) -> int:
    import torch

    from .data import model_data_info
    from .views import write_samples

    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    _check_count("--n", args.n, MAX_SAMPLES)
    if args.steps is not None:
        _check_count("--steps", args.steps, 100_000)
    run_dir, spec, config, model, _, _ = _load(args)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir) if args.out_dir else (run_dir if run_dir.is_dir() else Path("."))
    midi = Path(args.midi) if args.midi else None
    if midi is not None and midi.suffix.lower() not in (".mid", ".midi"):
        raise CLIError(f"--midi must name a .mid file, got {midi.name!r}")
    for path in write_samples(model, spec, model_data_info(config.data, config.model), args.n, out_dir, steps=args.steps, midi=midi):
        print(f"written {path}")
    return 0


def _config_help(kind: str | None) -> str:
    """Every config key (type, default, help) and the presets, for `seqvae train [KIND] --help`."""
    from .configs import describe_fields
    from .data import DATASETS, DataConfig
    from .models import MODELS
    from .objectives import ObjectiveConfig
    from .train import TrainConfig

    def table(section: str, cls: type) -> list[str]:
        rows = [(f"--{section}.{n}", t, d, h) for n, t, d, h in describe_fields(cls)]
        width = max(len(r[0]) for r in rows)
        kinds = max(len(r[1]) for r in rows)
        return [f"  {a:<{width}}  {t:<{kinds}}  default {d}: {h}" for a, t, d, h in rows]

    kinds = [kind] if kind in MODELS else list(MODELS)
    lines = ["config keys (override any with --section.key=VALUE):", ""]
    for name in kinds:
        spec = MODELS[name]
        lines += [f"model section of {name} ({spec.description}):", *table("model", spec.config), ""]
    for section, cls in (("objective", ObjectiveConfig), ("data", DataConfig), ("train", TrainConfig)):
        lines += [f"{section} section:", *table(section, cls), ""]
    lines.append("presets (--preset NAME; your overrides apply after them):")
    for name in kinds:
        for preset, settings in MODELS[name].presets.items():
            lines.append(f"  {name} {preset}: {' '.join(settings)}")
    lines += ["", "data sets (--data NAME):"]
    lines += [f"  {n} ({d.kind}): {d.description}" for n, d in DATASETS.items()]
    if kind not in MODELS:
        lines += ["", "seqvae train KIND --help lists the model keys and presets of one model."]
    return "\n".join(lines)


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from .models import MODELS, VIEWS
    from .objectives import OBJECTIVES

    from .data import DATASETS

    presets = "; ".join(f"{name}: {', '.join(spec.presets) or '(none)'}" for name, spec in MODELS.items())
    splits = sorted({split for spec in DATASETS.values() for split in spec.splits})
    from . import __version__

    p = argparse.ArgumentParser(prog="seqvae", description="Recurrent latent-variable generative models: DRAW, variational RNNs, SRNN.")
    p.add_argument("--version", action="version", version=f"seqvae {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    argv = sys.argv[1:] if argv is None else argv
    asked = next((a for a in argv[argv.index("train") + 1:] if not a.startswith("-")), None) if "train" in argv else None
    t = sub.add_parser("train", help="train a model", description="Train a registered model. Extra arguments --section.key=value override the config.",
                       epilog=_config_help(asked) if {"-h", "--help"} & set(argv) else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("kind", help=" | ".join(MODELS))
    t.add_argument("--preset", help=f"named settings ({presets})")
    t.add_argument("--data", help="data set name (same as --data.name=NAME)")
    t.add_argument("--name", help="run name (folder under --runs-dir); default KIND-DATA-TIMESTAMP")
    t.add_argument("--runs-dir", default="runs", help="where runs live (default: runs)")
    t.add_argument("--data-dir", help="data root (default: $SEQVAE_DATA, else data/)")
    t.add_argument("--resume", action="store_true", help="continue the run --name from its last checkpoint")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit without training")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="estimate the test log-likelihood of a trained run")
    e.add_argument("run", help="run folder, run name under --runs-dir, checkpoint file, or pretrained:NAME (a shipped model)")
    e.add_argument("--k", type=int, help="samples (particles) per example (default: 5000 for ll, 1 for elbo, 50 otherwise)")
    e.add_argument("--bound", default="ll", choices=["ll", *OBJECTIVES], help="ll = importance-sampling estimate of log p(x)")
    e.add_argument("--split", default="test", choices=splits, help="a split of the run's data set")
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
    s.add_argument("run", help="run folder, run name under --runs-dir, checkpoint file, or pretrained:NAME (a shipped model)")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--steps", type=int, help="sequence models: time steps per sample")
    s.add_argument("--out-dir", help="where to write (default: the run folder)")
    s.add_argument("--midi", help="piano-roll data: also write the samples as this MIDI file (one step = one beat at 100 bpm; needs mido)")
    s.add_argument("--checkpoint", default="best", choices=["best", "last"])
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--runs-dir", default="runs")
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("viz", help="figures from a trained run", description="Figures of a run: attention glimpses, canvases, sequences with per-step KL, latent usage, training curves.")
    v.add_argument("run", help="run folder, run name under --runs-dir, checkpoint file, or pretrained:NAME (a shipped model)")
    v.add_argument("--what", required=True, choices=[*VIEWS, "curves"], help="which figure; each model offers some of them")
    v.add_argument("--out", required=True, help="output file: .png/.pdf/.svg, or .gif for an animation (glimpses, canvas)")
    v.add_argument("--n", type=int, default=4, help="examples (glimpses, canvas, sequences)")
    v.add_argument("--steps", type=int, default=8, help="steps shown as columns (glimpses, canvas)")
    v.add_argument("--split", default="valid", choices=splits, help="a split of the run's data set")
    v.add_argument("--limit", type=int, default=1000, help="examples for --what latents")
    v.add_argument("--checkpoint", default="best", choices=["best", "last"])
    v.add_argument("--device", default="auto")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--runs-dir", default="runs")
    v.add_argument("--data-dir")
    v.add_argument("--midi", help="--what sequences of piano-roll data: also write the n reconstructions as this MIDI file")
    v.set_defaults(func=cmd_viz)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import TrainingError, TrainingInterrupted
    from .views import ViewError

    parser = _parser(argv)
    args, extra = parser.parse_known_args(argv)
    try:
        return args.func(args, extra)
    except TrainingInterrupted as err:
        print(f"seqvae: {err}", file=sys.stderr)
        return 128 + err.signal_number
    except (CLIError, ConfigError, DataError, CheckpointError, TrainingError, ViewError, ValueError, ImportError) as err:
        message = str(err).strip() or type(err).__name__
        print(f"seqvae: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqvae: interrupted (the last checkpoint is kept)", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, read-only, no permission: the file system's word, and which file
        where = f": {err.filename}" if err.filename else ""
        print(f"seqvae: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Training: the trainer (batches, epochs, truncated BPTT, checkpoints, logs) and its config.

Dimensions: b batch, t time, k samples.

The trainer sees a model, an objective (objectives.bound) and batches; it never looks
inside the model. One optimiser step per batch for images; for sequences with
train.tbptt = L > 0, the time axis is split into chunks of L steps, the recurrent state
(and, for IWAE and FIVO, the particles' states and accumulated log-weights: the objective's
Carry) is carried from chunk to chunk and detached between them, with one optimiser step
per chunk; everything resets with the next batch. Gradients are clipped before each
optimiser step. A step whose loss or gradient norm is not finite is skipped and counted;
after train.max_nonfinite such steps in a row the run stops, keeping its last checkpoint.

Losses: images, -(bound per image) averaged over the batch (nats per image); sequences,
-(sum of the bound over real steps) / (number of real steps in the chunk) (nats per time
step). Under torch.distributed each rank's normaliser is the global count, so that the
averaged gradients equal those of one process on the whole global batch.

A run lives in runs/<name>/: config.json, config_history.jsonl (one record per start and
resume), metrics.jsonl (one JSON record per line) and metrics.csv (the same as a table),
tensorboard/ (event files, when the tensorboard package is installed),
checkpoint.pt (everything needed to resume), best.pt (the model with the best validation
bound), samples/epoch_NNN.png.

The trainer takes a run config (run.py builds one) and finds the model, the data and the
objective through their registries; it never names a model or a data set. Evaluation is in
evaluate.py, process groups in distributed.py, generator states in checkpoint.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .checkpoint import atomic_write_bytes, load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from .configs import ConfigError, check
from .data import batches, check_splits_agree, dataset_info, load_dataset, num_batches
from .distributed import all_sum, rank_and_world
from .evaluate import evaluate
from .graphs import STATIC_SPAN, Graphed
from .logs import RunLog, progress_bar
from .models import get_model
from .objectives import bound
from .runlock import LOCK_NAME, RunBusy, RunLock
from .sequences import mask_from_lengths
from .views import sample_figure
from . import viz

__all__ = ["TrainConfig", "Trainer", "TrainingError", "TrainingInterrupted", "resolve_device", "RESUMABLE"]

AMP = ("none", "bf16", "fp16")

# What --resume may change: how long and how fast to go on, where to run, what to log. The
# rest (the model, the data and its batching, the objective, the optimiser, the seed, mixed
# precision, TBPTT) fixes what the checkpoint holds and how it continues: refused on resume.
RESUMABLE = frozenset({
    "train.epochs", "train.lr", "train.lr_decay", "train.clip_grad", "train.patience", "train.time_limit",
    "train.log_every", "train.checkpoint_every", "train.samples", "train.samples_every", "train.progress",
    "train.threads", "train.device", "train.cuda_graphs", "train.compile", "train.max_nonfinite", "train.eval_k", "data.data_dir", "data.data_path", "data.download",
})


class TrainingError(Exception):
    """A run that cannot start or continue (the message says why)."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped the run after a step; a checkpoint was written first."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


@dataclass
class TrainConfig:
    """How to optimise."""

    epochs: int = 10  # passes over the training data (at most 100000)
    optimizer: str = "adam"  # adam | sgd (plain gradient descent, for checks that need a scale-sensitive step)
    lr: float = 1e-3  # learning rate
    lr_decay: float = 1.0  # multiply the learning rate by this after every epoch
    weight_decay: float = 0.0  # decoupled weight decay (AdamW; with sgd, added to the gradient); 0 = none
    clip_grad: float = 10.0  # maximum global gradient norm; 0 = no clipping
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    amp: str = "none"  # mixed precision: none | bf16 | fp16 (fp16 on CUDA only)
    cuda_graphs: bool = True  # on CUDA: replay each training step from a CUDA graph (one process, no compile)
    compile: bool = False  # compile the bound (forward and backward) with torch.compile
    seed: int = 0  # seed of every random generator (rank r uses seed + r)
    tbptt: int = 0  # sequences: chunk length L for truncated BPTT; 0 = whole sequences
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    progress: bool = True  # progress bar
    log_every: int = 50  # write a training record every N optimiser steps
    checkpoint_every: int = 0  # also checkpoint every N batches within an epoch; 0 = at epoch ends only
    max_nonfinite: int = 20  # stop after this many non-finite steps in a row
    eval_k: int = 0  # validation: also compute the training bound with this many samples (0 = the objective's k)
    samples: int = 64  # samples drawn into samples/epoch_NNN.png
    samples_every: int = 1  # write that figure every N epochs (and after the last)
    patience: int = 0  # stop after this many epochs without a better validation bound; 0 = never
    time_limit: float = 0.0  # minutes of training (this session); stop before an epoch that would overrun. 0 = none

    def validate(self) -> "TrainConfig":
        check(1 <= self.epochs <= 100_000, f"train.epochs must lie in 1..100000, got {self.epochs}")
        check(self.optimizer in ("adam", "sgd"), f"train.optimizer must be adam or sgd, got {self.optimizer!r}")
        check(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        check(0 < self.lr_decay <= 1, f"train.lr_decay must lie in (0, 1], got {self.lr_decay}")
        check(0 <= self.weight_decay < 1, f"train.weight_decay must lie in [0, 1), got {self.weight_decay}")
        check(self.clip_grad >= 0, f"train.clip_grad must be >= 0 (0 = off), got {self.clip_grad}")
        check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        check(self.amp in AMP, f"train.amp must be one of {', '.join(AMP)}, got {self.amp!r}")
        check(self.tbptt >= 0, f"train.tbptt must be >= 0 (0 = whole sequences), got {self.tbptt}")
        check(self.threads >= 0, f"train.threads must be >= 0, got {self.threads}")
        check(self.log_every >= 1, f"train.log_every must be at least 1, got {self.log_every}")
        check(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        check(self.max_nonfinite >= 1, f"train.max_nonfinite must be at least 1, got {self.max_nonfinite}")
        check(self.eval_k >= 0, f"train.eval_k must be >= 0, got {self.eval_k}")
        check(1 <= self.samples <= 1024, f"train.samples must lie in 1..1024, got {self.samples}")
        check(self.samples_every >= 1, f"train.samples_every must be at least 1, got {self.samples_every}")
        check(self.patience >= 0, f"train.patience must be >= 0 epochs (0 = off), got {self.patience}")
        check(self.time_limit >= 0, f"train.time_limit must be >= 0 minutes (0 = none), got {self.time_limit}")
        return self


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when present), cpu, cuda or cuda:N; a clear error when CUDA is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = name[5:] if name.startswith("cuda:") else ""
    if name not in ("cpu", "cuda") and not index.isdigit():
        raise TrainingError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {name} but CUDA is not available on this machine; use cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise TrainingError(f"device {name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"train": {"lr": 0.1}, "model_kind": "draw"} -> {"train.lr": 0.1, "model_kind": "draw"}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


class _Bound(nn.Module):
    """The objective as a module, so that DistributedDataParallel sees a forward call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, **kwargs):
        return bound(self.model, x, **kwargs)


class Trainer:
    """Trains one run; `fit()` runs it to the configured number of epochs."""

    def __init__(self, config, run_dir: str | os.PathLike, *, resume: bool = False, log=print):
        self.config = config.validate()
        self.run_dir = Path(run_dir)
        self.log = log
        self.rank, self.world = rank_and_world()
        self.main = self.rank == 0
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = resolve_device(tc.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        if tc.amp == "fp16" and self.device.type != "cuda":
            raise TrainingError("train.amp=fp16 needs a CUDA device; use bf16 on CPU or amp=none")
        if config.data.batch_size % self.world:
            raise TrainingError(
                f"data.batch_size={config.data.batch_size} (the global batch) must divide evenly over {self.world} processes"
            )
        self.local_batch = config.data.batch_size // self.world

        checkpoint = self.run_dir / "checkpoint.pt"
        if resume and not (self.run_dir / "config.json").exists() and not checkpoint.exists():
            raise TrainingError(f"cannot resume: {self.run_dir} holds no run (no config.json, no checkpoint.pt)")
        self._lock = RunLock(self.run_dir)
        created, new_lock = not self.run_dir.exists(), not self._lock.path.exists()
        self._take_lock()  # before looking at the folder: two trainers never both see it free
        try:
            self._setup(config, resume, checkpoint)
        except BaseException:  # a run that could not start leaves the folder free and as it found it
            if self.main and new_lock:  # (removed while still held, so no other trainer can have opened it)
                self._lock.path.unlink(missing_ok=True)
            self.close()
            if self.main and created:
                try:
                    self.run_dir.rmdir()  # only if empty
                except OSError:
                    pass
            raise

    def _setup(self, config, resume: bool, checkpoint: Path) -> None:
        tc = config.train
        self.logs = RunLog(self.run_dir, self._valid_keys(config))
        unstarted = resume and not checkpoint.exists()
        if unstarted:  # stopped before its first checkpoint: nothing to continue, so start it afresh
            if self.main:
                self.log(f"{self.run_dir} has no checkpoint yet (it stopped before its first one): starting the run from its beginning")
                for name in ("metrics.jsonl", "metrics.csv"):
                    (self.run_dir / name).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
            resume = False
        elif not resume and self.main and any(p.name != LOCK_NAME for p in self.run_dir.iterdir()):
            raise TrainingError(
                f"run folder {self.run_dir} already exists and is not empty; resume it with --resume or choose another --name"
            )
        if self.main:
            for name in ("checkpoint.pt", "best.pt", "config.json", "metrics.jsonl", "metrics.csv"):
                for orphan in self.run_dir.glob(f".{name}.*.tmp"):  # left by a kill in the middle of a save
                    orphan.unlink(missing_ok=True)

        seed_everything(tc.seed + self.rank)  # each rank draws its own noise
        dc = config.data
        self.train_data = load_dataset(dc.name, "train", data_dir=dc.data_dir, data_path=dc.data_path, download=dc.download and self.main).subset(dc.limit)
        self.valid_data = load_dataset(dc.name, "valid", data_dir=dc.data_dir, data_path=dc.data_path, download=dc.download and self.main).subset(dc.valid_limit)
        check_splits_agree(self.train_data, self.valid_data)  # found now, not after an epoch
        self.data_info = dataset_info(dc, self.train_data)
        check_data = getattr(config.model, "check_data", None)
        if check_data is not None:
            try:
                check_data(self.data_info)
                check_data(dataset_info(dc, self.valid_data))
            except ConfigError as err:
                raise TrainingError(str(err)) from None
        self.model = get_model(config.model_kind).build(config.model)
        initialise = getattr(self.model, "initialise_from_data", None)
        if initialise is not None and not resume:
            initialise(self.train_data)  # a hook of the model's: a start that depends on the training data
        self.model.to(self.device)
        self.objective = _Bound(self.model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        # the training step (see _step): the bound, compiled or not; the step replayed from CUDA graphs or not
        self.forward = torch.compile(self.objective, dynamic=False) if tc.compile else self.objective
        graphs = tc.cuda_graphs and self.device.type == "cuda" and self.world == 1 and not tc.compile
        self.graphed = Graphed(self._step, name="training step", reset=self._reset_step) if graphs else None
        self.static_shapes = graphs or tc.compile  # pad batches to fixed shapes (see train_batch)
        self.params = list(self.model.parameters())
        self.steps_taken = torch.zeros((), dtype=torch.long, device=self.device)  # steps not skipped, on the device
        self.optimizer = self._make_optimizer(tc)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=tc.lr_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16")
        self.step, self.epoch, self.position = 0, 0, 0
        self.best, self.best_epoch = -math.inf, 0
        self.nonfinite_in_row, self.nonfinite_total = 0, 0
        self.running: list[float] = []  # training losses since the last metrics record
        self.stop_signal: int | None = None  # SIGTERM / SIGINT received: stop after the current step
        self.batches_per_epoch = num_batches(len(self.train_data), config.data.batch_size, 1)
        if resume:
            changes = self._restore(load_checkpoint(checkpoint, map_location="cpu"))
            if changes:  # the checkpoint, config.json and the history say the same from here on
                self.save()
            self._record_config("resume", changes)
        else:
            self._record_config("start", {})

    def _take_lock(self) -> None:
        """Rank 0 locks the run folder; every rank learns whether it could."""
        busy = ""
        if self.main:
            try:
                self._lock.acquire()
            except RunBusy as err:
                busy = str(err)
        if self.world > 1:
            (failed,) = all_sum([float(bool(busy))], self.device)
            busy = busy or ("rank 0 could not lock the run folder; see its message" if failed else "")
        if busy:
            raise TrainingError(busy)

    def _record_config(self, event: str, changes: dict[str, tuple[Any, Any]]) -> None:
        """config.json (the config in force) and config_history.jsonl (one record per start or resume)."""
        if not self.main:
            return
        atomic_write_bytes(self.run_dir / "config.json", (json.dumps(self.config.to_dict(), indent=2) + "\n").encode())
        record = {"event": event, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": self.step, "epoch": self.epoch,
                  "changed": {k: list(v) for k, v in changes.items()}}
        with open(self.run_dir / "config_history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Let go of the run folder (fit() does this when it ends)."""
        logs = getattr(self, "logs", None)
        if logs is not None:
            logs.close()
        self._lock.release()

    def _state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": json.dumps(self.config.to_dict()),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
            "running": list(self.running),
            "metrics_records": self.logs.records,  # records in metrics.jsonl when this was written
            "annealing": {"beta": self.config.objective.beta(self.step), "kl_warmup": self.config.objective.kl_warmup},
            "world_size": self.world,
            "rng": self._gather_rng(),
        }

    def _gather_rng(self) -> list[dict[str, Any]]:
        """Every rank's generator states, in rank order (collected on rank 0)."""
        state = rng_state()
        if self.world == 1:
            return [state]
        states = [None] * self.world
        torch.distributed.all_gather_object(states, state)
        return states

    def _restore(self, payload: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Load the checkpoint; returns the config changes made on resume (see RESUMABLE)."""
        try:
            saved = _flatten(json.loads(payload["config"]))
        except (KeyError, TypeError, ValueError) as err:
            raise TrainingError(f"the checkpoint in {self.run_dir} holds no readable config ({type(err).__name__}: {err})") from None
        now = _flatten(self.config.to_dict())
        defaults = _flatten(type(self.config)(self.config.model_kind, type(self.config.model)()).to_dict())
        # a key the checkpoint does not have (added to seqvae since) counts as its default
        changes = {k: (saved.get(k, defaults.get(k)), now.get(k)) for k in sorted(set(saved) | set(now))
                   if saved.get(k, defaults.get(k)) != now.get(k)}
        refused = [f"{k} ({old!r} -> {new!r})" for k, (old, new) in changes.items() if k not in RESUMABLE]
        if refused:
            raise TrainingError(
                f"cannot resume {self.run_dir} with a different {', '.join(refused)}: the checkpoint was trained with the "
                f"old value(s); on resume only {', '.join(sorted(RESUMABLE))} may change; start a new run (--name) to "
                "change the rest"
            )
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(self._as_built(payload["optimizer"]))
            self.scheduler.load_state_dict(payload["scheduler"])
            self.scaler.load_state_dict(payload["scaler"])
            self.step, self.epoch, self.position = payload["step"], payload["epoch"], payload["position"]
            self.best, self.nonfinite_total = payload["best"], payload["nonfinite_total"]
            self.best_epoch = payload["best_epoch"]
            self.nonfinite_in_row = payload["nonfinite_in_row"]
            self.running = list(payload["running"])
            self.steps_taken.fill_(self.step)
            states = payload["rng"]
            if len(states) == self.world:
                set_rng_state(states[self.rank])
            elif self.main:
                self.log(f"note: the checkpoint was written by {len(states)} process(es), this run has {self.world}; "
                         "random generators start afresh (seed + rank), so the continuation will differ from an uninterrupted run")
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise TrainingError(f"the checkpoint in {self.run_dir} does not fit this run ({type(err).__name__}: {err})") from None
        tc = self.config.train
        if "train.lr" in changes:  # the new rate applies from here on; the per-epoch decay continues from it
            for group in self.optimizer.param_groups:
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(tc.lr)
                else:
                    group["lr"] = tc.lr
        if "train.lr_decay" in changes:
            self.scheduler.gamma = tc.lr_decay
        if self.main:
            self.logs.truncate(self.step, payload.get("metrics_records"))  # drop records a killed run wrote after it
            if changes:
                self.log("resuming with " + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        return changes

    @staticmethod
    def _valid_keys(config) -> list[str]:
        """The validation metrics this run records (the columns of metrics.csv after COLUMNS)."""
        sequences = getattr(get_model(config.model_kind).model, "sequential", True)
        names = ["elbo"] + ([config.objective.name] if config.objective.name != "elbo" else [])
        return [f"valid_{n}{suffix}" for n in names for suffix in ([""] + (["_per_step"] if sequences else []))]

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.main:
            self.logs.write(record)  # metrics.jsonl, metrics.csv, TensorBoard (see logs.py)

    def save(self) -> None:
        state = self._state()  # every rank takes part (the random states are gathered)
        if self.main:
            save_checkpoint(self.run_dir / "checkpoint.pt", state)

    # -------------------------------------------------------------- training
    def _autocast(self):
        amp = self.config.train.amp
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        # no autocast weight cache: a CUDA graph must not capture casts cached by an earlier call
        return torch.autocast(self.device.type, dtype=dtype, enabled=amp != "none", cache_enabled=False)

    def _make_optimizer(self, tc: TrainConfig) -> torch.optim.Optimizer:
        """Adam or SGD with the fused kernels: they skip a step on the device when told that the
        gradient is not finite (found_inf), so the step never reads a value back to the host.
        Under CUDA graphs the optimiser is capturable, with its learning rate a tensor that the
        schedule updates in place."""
        graphs = self.graphed is not None
        lr = torch.tensor(tc.lr, device=self.device) if graphs else tc.lr
        kwargs = dict(fused=True, capturable=True) if graphs else dict(fused=True)
        if tc.optimizer == "adam":
            adam = torch.optim.AdamW if tc.weight_decay else torch.optim.Adam
            return adam(self.model.parameters(), lr=lr, weight_decay=tc.weight_decay, **kwargs)
        return torch.optim.SGD(self.model.parameters(), lr=lr, weight_decay=tc.weight_decay, fused=True)

    def _as_built(self, state: dict[str, Any]) -> dict[str, Any]:
        """A saved optimiser state with this run's kernel options (fused; capturable and a tensor
        learning rate under CUDA graphs): the run that wrote it may have run elsewhere."""
        built = self.optimizer.param_groups[0]
        groups = []
        for group in state["param_groups"]:
            group = dict(group, fused=True, foreach=None)
            if "capturable" in built:
                group["capturable"] = built["capturable"]
            # a tensor learning rate under CUDA graphs; a number otherwise (a CPU tensor would be read every step)
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device) if isinstance(built["lr"], Tensor) else float(group["lr"])
            groups.append(group)
        return dict(state, param_groups=groups)

    def _reset_step(self) -> None:
        """After a failed capture: drop what the aborted step left (gradients, the scaler's unscaled mark)."""
        self.optimizer.zero_grad(set_to_none=True)
        state, self.scaler = self.scaler.state_dict(), torch.amp.GradScaler("cuda", enabled=self.scaler.is_enabled())
        self.scaler.load_state_dict(state)  # the same scale, without the aborted step's per-optimiser marks

    def _step(self, x: Tensor, mask: Tensor | None, carry, count: Tensor):
        """One optimiser step on one piece (a batch, or a TBPTT chunk), static: no host read and
        no Python branch on a tensor's value, so torch.compile and CUDA graphs take it whole.

        count: the global number of examples (images) or real time steps (sequences) of the
        piece, the loss's normaliser. A piece whose loss or gradient norm is not finite leaves
        the parameters and the optimiser's state as they were (the fused optimiser's found_inf).
        Returns (the bound summed over the piece, the gradient norm before clipping, 1.0 if the
        step was skipped else 0.0, the carry for the next chunk, detached).
        """
        oc, tc = self.config.objective, self.config.train
        self.optimizer.zero_grad(set_to_none=True)
        beta = (self.steps_taken / oc.kl_warmup).clamp(max=1.0) if oc.kl_warmup > 0 else 1.0
        with self._autocast():
            value, carry = self.forward(x, mask=mask, carry=carry, name=oc.name, k=oc.k, beta=beta,
                                        free_bits=oc.free_bits, resample_threshold=oc.resample_threshold)
        total = value.float().sum()
        loss = -total * self.world / count
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, tc.clip_grad if tc.clip_grad > 0 else math.inf, foreach=True)
        skipped = (~(torch.isfinite(norm) & torch.isfinite(loss))).float()
        if self.world > 1:  # the ranks skip together
            torch.distributed.all_reduce(skipped, op=torch.distributed.ReduceOp.MAX)
        self.optimizer.found_inf = skipped
        self.optimizer.step()
        self.scaler.update()
        self.steps_taken += 1 - skipped.long()
        return total.detach(), norm.detach(), skipped, None if carry is None else carry.detach()

    def _count(self, stepped: bool) -> None:
        if stepped:
            self.nonfinite_in_row = 0
            self.step += 1
            return
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        limit = self.config.train.max_nonfinite
        if self.nonfinite_in_row >= limit:
            raise TrainingError(
                f"stopped: {self.nonfinite_in_row} optimiser steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite={limit}); the last good checkpoint is {self.run_dir / 'checkpoint.pt'}. "
                "Try a lower train.lr, gradient clipping (train.clip_grad) or check the data"
            )

    def train_batch(self, batch) -> dict[str, float]:
        """One batch: one optimiser step (images, whole sequences) or one per TBPTT chunk.

        The loss is -(the bound summed over the batch) / (examples, or real time steps of
        the chunk for sequences), with the global count under torch.distributed. The pieces'
        counts come from the batch's lengths (on the host); the steps' results are read back
        once, after the batch. Under CUDA graphs or train.compile, shapes are made static: a
        batch's time axis is padded to a multiple of train.tbptt (STATIC_SPAN steps without
        it) and a short batch with empty rows, all masked (exact: masked steps add nothing).
        """
        x = batch.x.to(self.device, non_blocking=True)
        if batch.lengths is None:  # whole inputs, scored once
            pieces, counts = [(x, None)], all_sum([float(x.shape[0])], self.device)
        else:
            tc, lengths = self.config.train, batch.lengths
            if self.static_shapes:  # fixed shapes, so that one graph (or compiled program) serves every full chunk
                span = tc.tbptt or STATIC_SPAN
                rows, steps = self.local_batch - x.shape[0], -x.shape[1] % span
                x = F.pad(x, (0, 0, 0, steps, 0, rows))  # padded steps and rows are masked: they add nothing
                lengths = F.pad(lengths, (0, rows))
            chunk = tc.tbptt or x.shape[1]
            starts = range(0, x.shape[1], chunk)
            widths = [min(chunk, x.shape[1] - s) for s in starts]
            real = [(lengths - s).clamp(0, w) for s, w in zip(starts, widths)]  # real steps per chunk and sequence
            counts = all_sum([float(r.sum()) for r in real], self.device)
            mask = mask_from_lengths(lengths.to(self.device), x.shape[1])
            pieces = [(x[:, s : s + w], None if not self.static_shapes and bool((r == w).all()) else mask[:, s : s + w])
                      for s, w, r in zip(starts, widths, real)]
        normalisers = torch.tensor(counts)  # to the device in one copy, not one (waiting) copy per chunk
        normalisers = (normalisers.pin_memory() if self.device.type == "cuda" else normalisers).to(self.device, non_blocking=True)
        carry, results = None, []
        step = self._step if self.graphed is None else self.graphed
        for (xc, mc), n_global, normaliser in zip(pieces, counts, normalisers):
            if n_global == 0:
                break  # every sequence of the batch has ended
            total, norm, skipped, carry = step(xc, mc, carry, normaliser)
            results.append(torch.stack([total, norm.float(), skipped]))
        read = torch.stack(results).double().cpu().tolist() if results else []
        for _, _, skipped in read:
            self._count(not skipped)
        (total,) = all_sum([sum(r[0] for r in read)], self.device)
        count = sum(counts[: len(read)])
        loss = -total / max(count, 1) if any(not r[2] for r in read) else math.nan
        return {"loss": loss, "grad_norm": max(r[1] for r in read) if read else math.nan}

    def validate(self) -> dict[str, float]:
        oc, tc = self.config.objective, self.config.train
        metrics = {}
        graphs = self.graphed is not None
        result = evaluate(self.model, self.valid_data, name="elbo", k=1, batch_size=self.local_batch, device=self.device,
                          cuda_graphs=graphs)
        metrics["valid_elbo"] = result["nats"]
        if "nats_per_step" in result:
            metrics["valid_elbo_per_step"] = result["nats_per_step"]
        if oc.name != "elbo":
            k = tc.eval_k or oc.k
            result = evaluate(self.model, self.valid_data, name=oc.name, k=k, batch_size=self.local_batch, device=self.device,
                              cuda_graphs=graphs)
            metrics[f"valid_{oc.name}"] = result["nats"]
            if "nats_per_step" in result:
                metrics[f"valid_{oc.name}_per_step"] = result["nats_per_step"]
        self.model.train()
        return metrics

    def _samples(self) -> None:
        if not self.main:
            return
        n = self.config.train.samples
        if self.data_info.display in ("piano", "lines"):
            n = min(n, 4)  # a panel per sample: a few are readable
        fig = sample_figure(self.model, self.data_info, n, title=f"{self.config.model_kind} samples, epoch {self.epoch}")
        viz.save_figure(fig, self.run_dir / "samples" / f"epoch_{self.epoch:03d}.png")
        self.model.train()

    def fit(self) -> dict[str, float]:
        """Train to train.epochs; returns the last validation metrics."""
        tc = self.config.train
        if self.epoch >= tc.epochs:
            self.log(f"nothing to do: the run has finished {self.epoch} of train.epochs={tc.epochs} epochs")
            self.close()
            return {}
        if self.main:
            n_params = sum(p.numel() for p in self.model.parameters())
            self.log(
                f"training {self.config.model_kind} ({n_params:,} parameters) on {self.config.data.name} "
                f"({len(self.train_data)} train / {len(self.valid_data)} valid) with {self.config.objective.name}, "
                f"device {self.device}" + (f", {self.world} processes" if self.world > 1 else "")
            )
        self.model.train()
        self._take_lock()
        previous = self._catch_signals()
        try:
            return self._fit()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            self.close()

    def _catch_signals(self) -> dict:
        """SIGTERM and SIGINT set a flag that the loop reads after each step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(number, frame):
            if self.stop_signal is not None and number == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step
            self.stop_signal = number

        return {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGINT)}

    def _stop_if_asked(self) -> None:
        """After a step: if a stop was requested (on any rank), checkpoint and raise TrainingInterrupted."""
        asked = float(self.stop_signal is not None)
        if self.world > 1:
            (asked,) = all_sum([asked], self.device)  # every rank stops at the same step
        if not asked:
            return
        self.save()
        number = self.stop_signal or signal.SIGTERM
        name = signal.Signals(number).name
        raise TrainingInterrupted(
            f"stopped by {name} after step {self.step} (epoch {self.epoch + 1}, batch {self.position}); the checkpoint "
            f"{self.run_dir / 'checkpoint.pt'} holds it: continue with --resume (exit status {128 + number})",
            number,
        )

    def _fit(self) -> dict[str, float]:
        tc = self.config.train
        last = {}
        started, longest = time.time(), 0.0
        while self.epoch < tc.epochs:
            self._stop_if_asked()
            if tc.time_limit and time.time() - started + longest > tc.time_limit * 60:
                if self.main:
                    self.log(f"stopping after {self.epoch} epochs: another would pass train.time_limit={tc.time_limit:g} minutes")
                    if self.epoch % tc.samples_every:
                        self._samples()
                break
            begin = time.time()
            last = self._epoch()
            longest = max(longest, time.time() - begin)
            if tc.patience and self.epoch - self.best_epoch >= tc.patience and self.epoch < tc.epochs:
                if self.main:
                    self.log(f"stopping early after {self.epoch} epochs: no better validation bound since epoch "
                             f"{self.best_epoch} (train.patience={tc.patience}); best.pt holds that epoch's model")
                    if self.epoch % tc.samples_every:
                        self._samples()
                break
        diverged = [k for k, v in last.items() if k.startswith("valid_") and not math.isfinite(v)]
        if self.step == 0 or diverged:
            what = "no optimiser step had a finite loss and gradient" if self.step == 0 else \
                f"training diverged: the validation bound is not finite after epoch {self.epoch} ({', '.join(diverged)})"
            raise TrainingError(
                f"{what} ({self.nonfinite_total} non-finite steps skipped); the checkpoints in {self.run_dir} are kept, "
                "but they hold no usable model; try a lower train.lr, gradient clipping (train.clip_grad) or check the data"
            )
        return last

    def _shown_loss(self, loss: float) -> str:
        """The training loss as the progress bar shows it: nats per step, or nats and bits/dim per image."""
        if self.data_info.kind == "sequences":
            return f"loss {loss:.3f} nats/step"
        dims = math.prod(self.data_info.shape)
        return f"loss {loss:.2f} nats ({loss / (dims * math.log(2)):.4f} bits/dim)"

    def _epoch(self) -> dict[str, float]:
        tc = self.config.train
        started = time.time()
        per_step = self.config.data.batch_size  # examples per batch, over all processes
        bar = progress_bar(
            total=self.batches_per_epoch * per_step, initial=self.position * per_step, desc=f"epoch {self.epoch + 1}/{tc.epochs}",
            unit="ex", disable=None if (tc.progress and self.main) else True, leave=False, dynamic_ncols=True,
        )
        for position, batch in batches(
            self.train_data, self.local_batch, seed=tc.seed, epoch=self.epoch, start=self.position,
            rank=self.rank, world_size=self.world,
        ):
            stats = self.train_batch(batch)
            self.position = position + 1
            self.running.append(stats["loss"])
            bar.update(per_step)
            bar.set_postfix_str(self._shown_loss(stats["loss"]))
            if self.step % tc.log_every == 0:
                finite = [v for v in self.running if math.isfinite(v)]
                self._write_metrics({"kind": "train", "epoch": self.epoch, "step": self.step, "loss": float(np.mean(finite)) if finite else None, "grad_norm": stats["grad_norm"], "beta": self.config.objective.beta(self.step), "lr": float(self.optimizer.param_groups[0]["lr"]), "nonfinite_total": self.nonfinite_total})
                self.running = []
            if tc.checkpoint_every and self.position % tc.checkpoint_every == 0 and self.position < self.batches_per_epoch:
                self.save()
            if self.position < self.batches_per_epoch:
                self._stop_if_asked()  # (at an epoch's end the epoch is finished and checkpointed first)
        bar.close()
        self.epoch += 1
        self.position = 0
        self.scheduler.step()
        metrics = self.validate()
        metrics.update(kind="valid", epoch=self.epoch, step=self.step, seconds=round(time.time() - started, 2))
        self._write_metrics(metrics)
        key = next(k for k in (f"valid_{self.config.objective.name}", "valid_elbo") if k in metrics)
        if metrics[key] > self.best:
            self.best, self.best_epoch = metrics[key], self.epoch
            if self.main:
                save_checkpoint(self.run_dir / "best.pt", {"format": 1, "config": json.dumps(self.config.to_dict()), "model": self.model.state_dict(), "epoch": self.epoch, "step": self.step, key: metrics[key]})
        tc = self.config.train
        if self.epoch % tc.samples_every == 0 or self.epoch == tc.epochs:
            self._samples()
        self.save()
        if self.main:
            shown = ", ".join(f"{k} {v:.4f}" + ("" if math.isfinite(v) else " (not finite)")
                              for k, v in metrics.items() if k.startswith("valid_"))
            self.log(f"epoch {self.epoch}/{tc.epochs}: {shown} ({metrics['seconds']:.0f}s)")
        return metrics

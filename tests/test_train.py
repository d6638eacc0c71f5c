"""Trainer behaviour: truncated BPTT, early stopping, time limit, gradient clipping before the step."""

import math

import pytest
import torch

import seqvae.train as T
from seqvae.data import batches
from seqvae.run import build_config
from seqvae.checkpoint import load_checkpoint
from seqvae.configs import ConfigError


def vrnn_config(data_dir, *extra):
    return build_config("vrnn", "quick", ["data.limit=16", "data.valid_limit=4", "train.progress=false", "train.samples_every=1000", *extra], "jsb_chorales", str(data_dir))


def test_early_stopping_keeps_the_best_epoch(tmp_path, data_dir, monkeypatch):
    scores = iter([-5.0, -4.0, -4.5, -4.6, -4.7, -4.8, -4.9])
    monkeypatch.setattr(T.Trainer, "validate", lambda self: {"valid_elbo": next(scores)})
    log = []
    trainer = T.Trainer(vrnn_config(data_dir, "train.epochs=20", "train.patience=3"), tmp_path / "r", log=log.append)
    trainer.fit()
    assert trainer.epoch == 5 and trainer.best_epoch == 2  # no better bound in epochs 3, 4, 5
    assert any("stopping early after 5 epochs" in m for m in log)
    assert load_checkpoint(tmp_path / "r" / "best.pt")["epoch"] == 2


def test_time_limit_stops_before_an_epoch_that_would_overrun(tmp_path, data_dir):
    log = []
    trainer = T.Trainer(vrnn_config(data_dir, "train.epochs=50", "train.time_limit=0.0001"), tmp_path / "r", log=log.append)
    trainer.fit()
    assert trainer.epoch == 1 and any("train.time_limit" in m for m in log)


def test_tbptt_takes_one_step_per_chunk_and_reports_the_whole_sequence(tmp_path, data_dir):
    trainer = T.Trainer(vrnn_config(data_dir, "train.epochs=1", "train.tbptt=10"), tmp_path / "r", log=lambda m: None)
    batch = next(batches(trainer.train_data, trainer.local_batch, seed=0))[1]
    chunks = math.ceil(int(batch.lengths.max()) / 10)
    counts = []
    real = trainer._step

    def counting(x, mask, carry, count):
        counts.append(float(count))
        return real(x, mask, carry, count)

    trainer._step = counting
    stats = trainer.train_batch(batch)
    assert len(counts) == chunks and trainer.step == chunks
    # each step's normaliser is the real steps in its chunk; together, every real step of the batch
    assert counts[0] == 10 * batch.x.shape[0] and sum(counts) == float(batch.lengths.sum())
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0  # nats per step over the whole batch


def test_gradients_are_clipped_before_the_optimiser_step(tmp_path, data_dir, monkeypatch):
    trainer = T.Trainer(vrnn_config(data_dir, "train.epochs=1", "train.clip_grad=0.01"), tmp_path / "r", log=lambda m: None)
    seen = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainer.model.parameters() if p.grad is not None))
        seen.append(float(norm))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", step)
    stats = trainer.train_batch(next(batches(trainer.train_data, trainer.local_batch, seed=0))[1])
    assert stats["grad_norm"] > 0.01  # the raw norm, reported
    assert seen and all(n <= 0.01 * (1 + 1e-4) for n in seen)  # what the optimiser saw


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_shrinks_each_parameter_by_lr_times_decay(tmp_path, data_dir, optimizer):
    """Decoupled for Adam (AdamW: p <- p (1 - lr wd) - lr adam(g)); for SGD, wd p added to the
    gradient (p <- p - lr (g + wd p)): either way, against the same step without decay, each
    parameter ends lower by lr * wd * p (no clipping, so that the gradients are the same)."""
    after = {}
    for wd in (0.0, 0.1):
        trainer = T.Trainer(vrnn_config(data_dir, "train.epochs=1", "train.clip_grad=0", "train.lr=0.01",
                                        f"train.optimizer={optimizer}", f"train.weight_decay={wd}"), tmp_path / f"r{wd}", log=lambda m: None)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train_batch(next(batches(trainer.train_data, trainer.local_batch, seed=0))[1])
        after[wd] = [p.detach().clone() for p in trainer.model.parameters()]
    for p0, plain, decayed in zip(before, after[0.0], after[0.1]):
        torch.testing.assert_close(plain - decayed, 0.01 * 0.1 * p0, rtol=1e-3, atol=1e-6)


def test_model_and_data_must_match(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="model.x_dim=30 but jsb_chorales has 88"):
        vrnn_config(data_dir, "model.x_dim=30")


def test_a_diverged_run_is_an_error_and_its_metrics_say_so(tmp_path, data_dir):
    """A huge learning rate: the distributions take NaN parameters without a ValueError dump,
    the steps are skipped as non-finite, NaN is written as null with a note, and the run ends
    with an error instead of exit status 0."""
    import json

    cfg = vrnn_config(data_dir, "train.epochs=2", "train.lr=1e6", "train.clip_grad=0")
    trainer = T.Trainer(cfg, tmp_path / "r", log=lambda m: None)
    with pytest.raises(T.TrainingError, match="training diverged: the validation bound is not finite"):
        trainer.fit()
    assert trainer.nonfinite_total > 0
    valid = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    assert valid[-1]["valid_elbo"] is None and "valid_elbo" in valid[-1]["nonfinite"]

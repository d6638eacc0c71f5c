"""A static step: the bounds trace as one graph (no host synchronisation, no Python branch on a
tensor's value), and mixed precision (bfloat16 autocast on the CPU) trains and agrees with float32."""

import json
import math
from typing import NamedTuple

import pytest
import torch

import seqvae
import seqvae.linear as L
from seqvae.objectives import bound
from seqvae.recurrent import RecurrentModel
from seqvae.run import build_config
from seqvae.terms import Terms
from seqvae.train import Trainer

MASK = torch.arange(5)[None] < torch.tensor([5, 3, 2, 5])[:, None]


def models():
    torch.manual_seed(0)
    draw = seqvae.DRAW(image_shape=(1, 12, 12), steps=3, hidden_size=16, z_size=4, read="filterbank", write="filterbank",
                       read_size=3, write_size=3)
    images = (torch.rand(3, 1, 12, 12) > 0.5).float()
    seqs = (torch.rand(4, 5, 6) > 0.5).float()
    return {
        "draw": (draw, images, None),
        "vrnn-gru": (seqvae.VRNN(x_dim=6, hidden_size=8, z_size=3, cell="gru"), seqs, MASK),
        "vrnn-lstm": (seqvae.VRNN(x_dim=6, hidden_size=8, z_size=3, cell="lstm"), seqs, MASK),
        "srnn": (seqvae.SRNN(x_dim=6, hidden_size=8, z_size=3), seqs, MASK),
    }


CASES = [("draw", "elbo"), ("draw", "iwae"), ("vrnn-gru", "elbo"), ("vrnn-gru", "iwae"), ("vrnn-gru", "fivo"),
         ("vrnn-lstm", "fivo"), ("srnn", "elbo"), ("srnn", "fivo")]


@pytest.mark.parametrize("kind,name", CASES)
def test_the_bounds_trace_as_one_graph(kind, name):
    """torch.compile(fullgraph=True) refuses any graph break: a host read (.item(), bool(tensor))
    or a Python branch on a tensor's value anywhere in the bound, the unroll or the model."""
    model, x, mask = models()[kind]
    k = 1 if name == "elbo" else 2
    torch._dynamo.reset()
    traced = torch.compile(lambda x: bound(model, x, name=name, k=k, mask=mask)[0], fullgraph=True, backend="eager")
    torch.manual_seed(1)
    value = traced(x)
    torch.manual_seed(1)
    torch.testing.assert_close(value, bound(model, x, name=name, k=k, mask=mask)[0])
    value.sum().backward()


class Peeking(RecurrentModel):
    """A step that reads a value back to the host: what the trace must refuse."""

    class Out(NamedTuple):
        y: torch.Tensor

    def initial_state(self, n):
        return self.Out(torch.zeros(n, 1))

    def step(self, x_t, state):
        y = state.y + x_t if float(x_t.sum()) > 0 else state.y
        return self.Out(y), self.Out(y)

    def score(self, x, outs, state):
        return Terms(-outs.y[..., 0])


def test_the_trace_check_catches_a_host_read():
    torch._dynamo.reset()
    traced = torch.compile(lambda x: bound(Peeking(), x)[0], fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="(?i)data-dependent|item|graph break|Unsupported"):
        traced(torch.ones(2, 3, 1))


@pytest.mark.parametrize("kind", ["draw", "vrnn-gru", "vrnn-lstm", "srnn"])
def test_bf16_autocast_agrees_with_float32(kind, monkeypatch):
    """Under bfloat16 autocast the ELBO (same noise) stays within 1% of float32, and every
    bound backpropagates to finite gradients, also through the batched weight gradients."""
    monkeypatch.setattr(L, "BATCH_MIN_WEIGHTS", 1)  # exercise linear.py's batched gradient too
    model, x, mask = models()[kind]
    torch.manual_seed(2)
    exact = bound(model, x, mask=mask)[0]
    for name in ("elbo", "iwae") + (("fivo",) if mask is not None else ()):
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = bound(model, x, name=name, k=1 if name == "elbo" else 3, mask=mask)[0]
        model.zero_grad()
        value.float().sum().backward()
        assert torch.isfinite(value).all() and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if name == "elbo":
            assert ((value.float() - exact).abs() / exact.abs()).max() < 0.01


@pytest.mark.parametrize("kind,extra", [
    ("draw", ["model.read=filterbank", "model.write=filterbank", "model.read_size=3", "model.write_size=3", "data.limit=256", "data.valid_limit=64"]),
    ("vrnn", ["data.limit=16", "data.valid_limit=4", "model.cell=lstm", "train.tbptt=30"]),
    ("vrnn", ["data.limit=16", "data.valid_limit=4", "model.cell=gru", "objective.name=fivo", "objective.k=2"]),
])
def test_training_with_bf16_autocast_reaches_finite_bounds(kind, extra, tmp_path, data_dir):
    cfg = build_config(kind, "quick", ["train.amp=bf16", "train.epochs=1", "train.progress=false", "train.samples=4", *extra],
                       None, str(data_dir))
    trainer = Trainer(cfg, tmp_path / "r", log=lambda m: None)
    metrics = trainer.fit()
    assert trainer.step > 0 and trainer.nonfinite_total == 0
    assert all(v == v and abs(v) < float("inf") for k, v in metrics.items() if k.startswith("valid_"))


@pytest.mark.parametrize("kind,extra", [
    ("draw", ["model.read=filterbank", "model.write=filterbank", "model.read_size=3", "model.write_size=3", "model.steps=3",
              "model.hidden_size=32", "model.z_size=4", "data.limit=64", "data.valid_limit=32", "data.batch_size=32"]),
    pytest.param("vrnn", ["data.limit=16", "data.valid_limit=4", "data.batch_size=8", "model.hidden_size=16", "model.z_size=4",
                          "train.tbptt=8"], marks=pytest.mark.slow),  # ~90 s of compiling on 2 cores
])
def test_train_compile_trains_like_eager(kind, extra, tmp_path, data_dir):
    """train.compile=true: the compiled bound (inductor; its random draws as eager's) trains to the
    same losses as the eager one, DRAW with filterbank heads and a VRNN with truncated BPTT."""
    import torch._inductor.config as inductor

    runs = {}
    for compiled in ("false", "true"):
        torch._dynamo.reset()
        cfg = build_config(kind, "quick", [f"train.compile={compiled}", "train.epochs=1", "train.progress=false",
                                           "train.samples=4", "train.log_every=1", *extra], None, str(data_dir))
        torch.manual_seed(0)
        trainer = Trainer(cfg, tmp_path / compiled, log=lambda m: None)
        trainer.static_shapes = True  # the same padded shapes in both runs (compile pads; eager need not)
        with inductor.patch(fallback_random=True):
            metrics = trainer.fit()
        records = [json.loads(line) for line in (tmp_path / compiled / "metrics.jsonl").read_text().splitlines()]
        runs[compiled] = [r["loss"] for r in records if r["kind"] == "train"], metrics
    (eager_losses, _), (compiled_losses, metrics) = runs["false"], runs["true"]
    assert len(compiled_losses) == len(eager_losses) >= 2
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=2e-3, atol=0)
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("valid_"))

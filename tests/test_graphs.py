"""CUDA graphs (seqvae/graphs.py) and the trainer's static step.

On any machine: the bookkeeping of `Graphed` (which call runs eagerly, which captures, which
replays; inputs through static tensors; outputs fresh) with a stand-in capture that behaves
like a graph (replay reruns the captured function on the static inputs and writes into the
capture's outputs); the trainer's step reads no tensor value on the host; the trainer driven
through `Graphed` trains exactly as it does eagerly. On CUDA (skipped without a GPU): the real
capture, graph-replayed training steps against eager ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._pytree import tree_map

import seqvae.train as T
from seqvae.data import batches
from seqvae.graphs import Graphed
from seqvae.run import build_config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


class Capture:
    """Stands in for CUDA's capture where there is no GPU: like a graph, it runs nothing when it
    captures, and each replay runs the captured function on the static inputs and writes the
    results into the same output tensors."""

    def __init__(self, fail: bool = False):
        self.fail, self.captures = fail, 0

    def __call__(self, fn, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        static = []

        def replay():  # writes into the same output tensors every time, as a graph does
            out = fn()
            if not static:
                static.append(out)
            tree_map(lambda dst, src: dst.copy_(src) if isinstance(dst, torch.Tensor) else dst, static[0], out)
            return static[0]

        return replay


def test_first_call_eager_second_captures_then_replays_from_static_inputs():
    seen = []

    def fn(x, y):
        seen.append((x.data_ptr(), float(x.sum())))
        return x * 2 + y, {"sum": x.sum()}

    capture = Capture()
    g = Graphed(fn, capture=capture)
    for i in range(4):
        x, y = torch.full((3,), float(i)), torch.ones(3)
        out, extra = g(x, y)
        torch.testing.assert_close(out, x * 2 + 1)
        assert float(extra["sum"]) == 3 * i
    assert capture.captures == 1 and g.replays == 3
    assert seen[0][0] != seen[1][0] and len({p for p, _ in seen[1:]}) == 1  # after the first call: one static input


def test_outputs_are_fresh_tensors_not_the_graphs_own():
    g = Graphed(lambda x: x + 1, capture=Capture())
    g(torch.zeros(2))
    first = g(torch.zeros(2))
    second = g(torch.ones(2))
    assert first.tolist() == [1.0, 1.0] and second.tolist() == [2.0, 2.0]  # the second replay did not overwrite the first


def test_each_signature_has_its_own_graph_and_python_values_are_part_of_it():
    capture = Capture()
    g = Graphed(lambda x, scale: x * scale, capture=capture)
    for _ in range(3):
        assert g(torch.ones(4), 2.0).tolist() == [2.0] * 4
        assert g(torch.ones(3), 2.0).tolist() == [2.0] * 3  # a short last batch
        assert g(torch.ones(3), 3.0).tolist() == [3.0] * 3
    assert capture.captures == 3 and g.replays == 6


def test_beyond_max_graphs_and_after_a_failed_capture_calls_run_eagerly():
    g = Graphed(lambda x: x + 1, capture=Capture(), max_graphs=1)
    for n in (1, 2, 1, 2, 1, 2):
        assert g(torch.zeros(n)).tolist() == [1.0] * n
    assert len(g.graphs) == 1 and g.replays == 2
    resets = []
    failing = Graphed(lambda x: x + 1, capture=Capture(fail=True), reset=lambda: resets.append(1))
    failing(torch.zeros(2))
    with pytest.warns(RuntimeWarning, match="capture of the step failed .*runs eagerly"):
        assert failing(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert failing(torch.zeros(2)).tolist() == [1.0, 1.0] and failing.replays == 0 and resets == [1]


def config(data_dir, kind, *extra):
    if kind == "draw":
        return build_config("draw", "quick", ["model.steps=3", "model.hidden_size=32", "model.z_size=4", "data.limit=96",
                                              "data.valid_limit=8", "data.batch_size=32", "train.progress=false", *extra],
                            None, str(data_dir))
    return build_config("vrnn", "quick", ["data.limit=24", "data.valid_limit=4", "data.batch_size=8", "train.tbptt=25",
                                          "train.progress=false", *extra], "jsb_chorales", str(data_dir))


CASES = [("draw", "objective.name=elbo"), ("vrnn", "objective.name=fivo", "objective.k=2"),
         ("vrnn", "objective.name=iwae", "objective.k=2", "objective.kl_warmup=5")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_the_training_step_reads_no_value_on_the_host(case, tmp_path, data_dir, monkeypatch):
    """item(), bool(), float(), tolist() of a tensor raise inside the step: it would run on a GPU
    without waiting for it (and so can be captured as a CUDA graph)."""
    trainer = T.Trainer(config(data_dir, *case), tmp_path / "r", log=lambda m: None)
    batch = next(batches(trainer.train_data, trainer.local_batch, seed=0))[1]
    x = batch.x
    mask = None if batch.lengths is None else torch.arange(x.shape[1])[None] < batch.lengths[:, None]
    pieces = [(x, mask)] if mask is None else [(x[:, :25], mask[:, :25]), (x[:, 25:50], mask[:, 25:50])]

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host inside the step")

    carry, before = None, [p.detach().clone() for p in trainer.params]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for xc, mc in pieces:
        total, norm, skipped, carry = trainer._step(xc, mc, carry, torch.tensor(10.0))
    monkeypatch.undo()
    assert math.isfinite(float(total)) and float(norm) > 0 and float(skipped) == 0
    assert all(not torch.equal(b, p) for b, p in zip(before, trainer.params) if p.grad is not None)  # it did step


@pytest.mark.parametrize("fail", [False, True], ids=["captured", "capture-fails"])
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: "-".join(c))
@pytest.mark.filterwarnings("ignore:CUDA graph capture")
def test_the_trainer_through_graphed_trains_exactly_as_eagerly(case, fail, tmp_path, data_dir):
    """The trainer's plumbing through Graphed (static inputs, the carry from chunk to chunk, a
    short last batch, fresh outputs) changes nothing: same parameters and losses as eager; and
    where capture fails, the trainer goes on eagerly as if nothing had happened."""
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        trainer = T.Trainer(config(data_dir, *case, "train.epochs=2"), tmp_path / f"r{graphed}", log=lambda m: None)
        trainer.static_shapes = True  # as under CUDA graphs: padded to fixed shapes, in both runs
        if graphed:
            trainer.graphed = Graphed(trainer._step, capture=Capture(fail=fail), reset=trainer._reset_step)
        losses = [trainer.train_batch(b)["loss"] for epoch in range(2)
                  for _, b in batches(trainer.train_data, trainer.local_batch, seed=0, epoch=epoch)]
        results.append((losses, [p.detach().clone() for p in trainer.params], trainer.graphed))
        trainer.close()
    (eager_losses, eager_params, _), (graph_losses, graph_params, graphed) = results
    assert graphed.replays == 0 if fail else graphed.replays >= 2  # the full batches were replayed, not run eagerly
    if case[0] == "vrnn" and not fail:  # every chunk (fixed length) and the short last batch (padded) came from two graphs
        assert len(graphed.graphs) == 2
    assert eager_losses == graph_losses
    assert all(torch.equal(a, b) for a, b in zip(eager_params, graph_params))


@CUDA
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: "-".join(c))
def test_cuda_graph_replayed_steps_equal_eager_ones(case, tmp_path, data_dir):
    results = []
    for graphs in ("false", "true"):
        torch.manual_seed(0)
        trainer = T.Trainer(config(data_dir, *case, "train.device=cuda", f"train.cuda_graphs={graphs}"),
                            tmp_path / f"r{graphs}", log=lambda m: None)
        trainer.static_shapes = True  # the same padded shapes (and so the same noise draws) in both runs
        losses = [trainer.train_batch(b)["loss"] for epoch in range(2)
                  for _, b in batches(trainer.train_data, trainer.local_batch, seed=0, epoch=epoch)]
        results.append((losses, [p.detach().cpu() for p in trainer.params], trainer.graphed))
        trainer.close()
    (eager_losses, eager_params, _), (graph_losses, graph_params, graphed) = results
    assert graphed is not None and graphed.replays >= 2
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-4)
    for a, b in zip(eager_params, graph_params):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@CUDA
def test_cuda_graphed_evaluation_equals_eager(data_dir):
    from seqvae.evaluate import evaluate
    from seqvae.data import load_dataset
    import seqvae

    data = load_dataset("jsb_chorales", "valid", data_dir=str(data_dir)).subset(20)
    torch.manual_seed(0)
    model = seqvae.VRNN(x_dim=88, hidden_size=32, z_size=4).cuda()
    values = []
    for graphs in (False, True):
        torch.manual_seed(1)
        values.append(evaluate(model, data, name="iwae", k=3, batch_size=6, device="cuda", cuda_graphs=graphs)["nats"])
    assert values[1] == pytest.approx(values[0], rel=1e-5)


def test_static_shapes_change_nothing_but_the_shapes(tmp_path, data_dir):
    """Padding a batch's time axis and rows (all masked) leaves a deterministic model's losses
    and updates as they were (the RNN: no noise, whose draws the padding would change)."""
    results = []
    for static in (False, True):
        torch.manual_seed(0)
        cfg = build_config("rnn", "quick", ["data.limit=24", "data.valid_limit=4", "data.batch_size=8", "train.tbptt=25",
                                            "train.progress=false"], "jsb_chorales", str(data_dir))
        trainer = T.Trainer(cfg, tmp_path / f"r{static}", log=lambda m: None)
        trainer.static_shapes = static
        losses = [trainer.train_batch(b)["loss"] for _, b in batches(trainer.train_data, 7, seed=0)]
        results.append((losses, [p.detach().clone() for p in trainer.params]))
        trainer.close()
    (plain_losses, plain), (static_losses, padded) = results
    assert len(plain_losses) == 3  # batches of 7 sequences: static shapes pad each with an eighth row
    torch.testing.assert_close(torch.tensor(static_losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)
    for a, b in zip(plain, padded):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)

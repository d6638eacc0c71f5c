"""Whole-sequence kernels (seqvae/fused.py, csrc/fused.cpp): the same values, random numbers and
gradients as the step loop (recurrent.unroll), in C++ and in Python, and the step loop wherever
they do not apply."""

from __future__ import annotations

import warnings

import pytest
import torch

import seqvae
from seqvae import fused, gemm, native
from seqvae.attention import Filterbanks
from seqvae.draw import DRAW
from seqvae.recurrent import unroll
from seqvae.vrnn import VRNN

LOOPS = ["native", "native-blocks", "python"]


@pytest.fixture(params=LOOPS)
def loops(request, monkeypatch):
    """Run the fused loops in C++ (skipped, saying why, where it cannot be built), in C++ with the
    batch in 3 blocks of rows of unequal sizes on the threads (where the model splits its batch),
    or in Python."""
    monkeypatch.setenv("SEQVAE_BLOCKS", "3" if request.param == "native-blocks" else "1")
    if request.param == "native-blocks":  # blocks on two threads, whatever the machine
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    if request.param == "python":
        monkeypatch.setenv("SEQVAE_NATIVE", "0")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fused._native() is None:
                pytest.skip("the C++ loops could not be built here (no compiler?); the Python loops are tested")
    return request.param


def _made_by(t: torch.Tensor, name: str, depth: int = 4) -> bool:
    """Whether the autograd graph of t reaches a node called `name` within `depth` steps."""
    nodes = [t.grad_fn]
    for _ in range(depth):
        if any(node is not None and type(node).__name__ == name for node in nodes):
            return True
        nodes = [n for node in nodes if node is not None for n, _ in node.next_functions]
    return False


def _weighted(t: torch.Tensor) -> torch.Tensor:
    """A fixed random weighting of t's entries, read through a permuted (non-contiguous) view, so
    that the gradient arriving at the fused pass has an unusual layout."""
    view = t.permute(*reversed(range(t.dim())))
    weights = torch.randn(view.shape, generator=torch.Generator().manual_seed(t.numel()), dtype=t.dtype)
    return (view * weights).sum()


def _loss_and_grads(model, x, *, fused_on: bool, seed: int = 3, monkeypatch=None, **terms_kw):
    """The ELBO's gradients plus gradients through every output of the pass: the final state
    (each field) and, for DRAW, the attention parameters of every glimpse."""
    monkeypatch.setenv("SEQVAE_FUSED", "1" if fused_on else "0")
    torch.manual_seed(seed)
    model.zero_grad()
    if model.sequential:
        terms, state = model.terms(x, **terms_kw)
        extra = [s for s in state if s is not None]
    else:
        run = unroll(model, x)
        terms, state = run.terms, run.state
        extra = list(state) + [p for att in (run.outs.read, run.outs.write) if att is not None for p in att]
    loss = -(terms.log_px.sum() - terms.kl().sum()) + sum(_weighted(t) for t in extra)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, terms


def _assert_same_gradients(g_loop, g_fused, tol):
    assert g_loop.keys() == g_fused.keys()
    for name in g_loop:
        scale = g_loop[name].abs().max().clamp_min(1e-30)
        assert ((g_fused[name] - g_loop[name]).abs().max() / scale).item() < tol, name


def _jitter(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize(
    "read,write,likelihood,shape",
    [
        ("filterbank", "filterbank", "bernoulli", (1, 12, 12)),
        ("none", "none", "bernoulli", (1, 6, 7)),
        ("filterbank", "none", "gaussian", (2, 9, 11)),
        ("none", "filterbank", "gaussian", (3, 10, 8)),
    ],
)
def test_draw_pass_equals_the_step_loop(loops, monkeypatch, read, write, likelihood, shape):
    """Value, noise and every parameter's gradient of the ELBO, in float64, to 1e-9 relative."""
    torch.manual_seed(0)
    model = _jitter(DRAW(image_shape=shape, steps=5, hidden_size=16, z_size=4, read=read, write=write,
                         read_size=3, write_size=2, likelihood=likelihood).double())
    x = torch.rand(7, *shape, dtype=torch.float64)
    if likelihood == "bernoulli":
        x = (x > 0.5).double()
    loss0, g0, _ = _loss_and_grads(model, x, fused_on=False, monkeypatch=monkeypatch)
    loss1, g1, terms = _loss_and_grads(model, x, fused_on=True, monkeypatch=monkeypatch)
    assert _made_by(terms.z, "_DrawSequenceBackward")
    assert abs(loss1.item() - loss0.item()) <= 1e-9 * abs(loss0.item())
    _assert_same_gradients(g0, g1, 1e-9)


@pytest.mark.parametrize(
    "cell,posterior_layers,z_layers,masked,prior,dropout",
    [
        ("gru", 2, 1, False, "learned", 0.0),
        ("lstm", 1, 2, True, "standard", 0.0),
        ("gru", 3, 2, True, "learned", 0.3),
        ("lstm", 2, 1, False, "learned", 0.3),
    ],
)
@pytest.mark.parametrize("chunk", [64, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vrnn_pass_equals_the_step_loop(loops, monkeypatch, cell, posterior_layers, z_layers, masked, prior, dropout, chunk,
                                        dtype):
    """From a carried state, with padded steps and dropout, in one block of steps or in blocks of 4
    (11 steps: 4 + 4 + 3): the same loss and gradients (float64 to 1e-9; float32 to 1e-5, where the
    C++ backward pads its per-step products' weights to 16 columns: widths 9, 6 and 3 here)."""
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    monkeypatch.setattr(fused, "CHUNK", chunk)
    torch.manual_seed(0)
    model = _jitter(VRNN(x_dim=7, hidden_size=9, z_size=3, cell=cell, posterior_layers=posterior_layers,
                         z_layers=z_layers, prior=prior, feature_size=6, dropout=dropout).to(dtype))
    x = (torch.rand(5, 11, 7) > 0.5).to(dtype)
    mask = torch.arange(11)[None] < torch.tensor([11, 3, 7, 1, 11])[:, None] if masked else None
    start = model.initial_state(5)
    state = type(start)(*(None if s is None else torch.randn_like(s) for s in start))
    loss0, g0, _ = _loss_and_grads(model, x, fused_on=False, monkeypatch=monkeypatch, mask=mask, state=state)
    loss1, g1, terms = _loss_and_grads(model, x, fused_on=True, monkeypatch=monkeypatch, mask=mask, state=state)
    assert _made_by(terms.z, "_VRNNSequenceBackward")
    assert abs(loss1.item() - loss0.item()) <= tol * abs(loss0.item())
    _assert_same_gradients(g0, g1, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # (ATen's normal_ has a kernel of its own for float)
@pytest.mark.parametrize("batch, z_size", [(4, 4), (5, 3), (2, 16)])
def test_vrnn_pass_draws_the_step_loops_random_numbers(loops, monkeypatch, batch, z_size, dtype):
    """The pass draws every step's noise at once where a step's b z values are a multiple of 16
    (ATen then fills them in the same order as one draw per step) and step by step otherwise:
    either way the samples are the step loop's."""
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.manual_seed(0)
    model = VRNN(x_dim=5, hidden_size=8, z_size=z_size).to(dtype)
    x = (torch.rand(batch, 6, 5) > 0.5).to(dtype)
    *_, loop = _loss_and_grads(model, x, fused_on=False, monkeypatch=monkeypatch)
    *_, fused_terms = _loss_and_grads(model, x, fused_on=True, monkeypatch=monkeypatch)
    assert _made_by(fused_terms.z, "_VRNNSequenceBackward")
    torch.testing.assert_close(fused_terms.z, loop.z, rtol=tol, atol=tol)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_vrnn_pass_takes_gradients_of_any_layout_with_one_unit(loops, monkeypatch, cell):
    """z_size=1 and hidden_size=1, a loss that also reads every step output and the final state
    through permuted views: the gradients reaching the pass have size-1 unit dimensions with odd
    strides (which .contiguous() leaves as they are); the same loss and gradients (float64)."""
    torch.manual_seed(0)
    model = _jitter(VRNN(x_dim=4, hidden_size=1, z_size=1, cell=cell, feature_size=3).double())
    x = (torch.rand(5, 6, 4, dtype=torch.float64) > 0.5).double()
    results = []
    for on in ("0", "1"):
        monkeypatch.setenv("SEQVAE_FUSED", on)
        torch.manual_seed(3)
        model.zero_grad()
        run = unroll(model, x)
        reads = [t for t in (*run.outs, *run.state) if t is not None]
        loss = -(run.terms.log_px.sum() - run.terms.kl().sum()) + sum(_weighted(t) for t in reads)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, run.outs.z))
    assert _made_by(results[1][2], "_VRNNSequenceBackward")
    assert abs(results[1][0].item() - results[0][0].item()) <= 1e-9 * abs(results[0][0].item())
    _assert_same_gradients(results[0][1], results[1][1], 1e-9)


@pytest.mark.parametrize("kind", ["draw", "vrnn"])
@pytest.mark.parametrize("kernel", ["measured", "aten", "packed"])
def test_float32_gradients_equal_the_step_loop_to_1e_5(loops, monkeypatch, kind, kernel):
    """The benchmark's models in float32 (smaller): every gradient within 1e-5 of the step loop's,
    relative to its largest entry, through the public API (seqvae.elbo) with nothing switched on;
    the loops' products by the kernel gemm.py measures, or forced to ATen's or to oneDNN's packed."""
    if kernel == "packed" and not gemm._packed_ok():
        pytest.skip("this PyTorch has no oneDNN (mkldnn) linear with packed weights")
    if kernel != "measured":
        monkeypatch.setenv("SEQVAE_GEMM", kernel)
    torch.manual_seed(1)
    if kind == "draw":
        model = DRAW(image_shape=(1, 28, 28), steps=8, hidden_size=64, z_size=10, read_size=5, write_size=5)
        x = (torch.rand(16, 1, 28, 28) > 0.5).float()
    else:
        model = VRNN(x_dim=28, hidden_size=32, z_size=8)
        x = (torch.rand(16, 20, 28) > 0.5).float()
    grads = []
    for on in (False, True):
        monkeypatch.setenv("SEQVAE_FUSED", "1" if on else "0")
        torch.manual_seed(2)
        model.zero_grad()
        (-seqvae.elbo(model, x).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    _assert_same_gradients(grads[0], grads[1], 1e-5)


def test_iwae_runs_the_fused_pass_and_equals_the_step_loop(monkeypatch):
    """IWAE (k particles folded into the batch, dropout masks shared by particles): the same bound
    and gradients."""
    torch.manual_seed(0)
    model = _jitter(VRNN(x_dim=5, hidden_size=8, z_size=3, dropout=0.2).double())
    x = (torch.rand(4, 6, 5, dtype=torch.float64) > 0.5).double()
    values, grads = [], []
    for on in ("0", "1"):
        monkeypatch.setenv("SEQVAE_FUSED", on)
        torch.manual_seed(4)
        model.zero_grad()
        bound = seqvae.iwae_bound(model, x, k=3, lengths=torch.tensor([6, 2, 5, 1]))
        (-bound.sum()).backward()
        values.append(bound.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(values[0], values[1], rtol=1e-12, atol=0)
    _assert_same_gradients(grads[0], grads[1], 1e-9)


def test_the_step_loop_runs_where_the_fused_pass_does_not_apply(monkeypatch):
    """No gradients, x needing one, half precision, autocast, or SEQVAE_FUSED=0: no fused node."""
    model = VRNN(x_dim=5, hidden_size=8, z_size=3)
    x = (torch.rand(4, 6, 5) > 0.5).float()
    assert _made_by(unroll(model, x).outs.z, "_VRNNSequenceBackward")
    with torch.no_grad():
        assert unroll(model, x).outs.z.grad_fn is None  # and it ran (no error)
    assert not _made_by(unroll(model, x.clone().requires_grad_()).outs.z, "_VRNNSequenceBackward")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _made_by(unroll(model, x).outs.z, "_VRNNSequenceBackward")
    half = VRNN(x_dim=5, hidden_size=8, z_size=3).to(torch.bfloat16)
    assert not _made_by(unroll(half, x.to(torch.bfloat16)).outs.z, "_VRNNSequenceBackward")
    monkeypatch.setenv("SEQVAE_FUSED", "0")
    assert not _made_by(unroll(model, x).outs.z, "_VRNNSequenceBackward")


def test_workspaces_are_reused_and_two_passes_in_flight_get_their_own(monkeypatch):
    """Two passes before one backward: each keeps its buffers (the gradient is that of the two
    passes done one after the other); a pass's workspace goes back to the pool after backward."""
    torch.manual_seed(0)
    model = VRNN(x_dim=5, hidden_size=8, z_size=3).double()
    x1, x2 = ((torch.rand(4, 6, 5, dtype=torch.float64) > 0.5).double() for _ in range(2))

    def grads(together: bool):
        model.zero_grad()
        torch.manual_seed(5)
        if together:
            loss = -(seqvae.elbo(model, x1).sum() + seqvae.elbo(model, x2).sum())
            loss.backward()
        else:
            (-seqvae.elbo(model, x1).sum()).backward()
            (-seqvae.elbo(model, x2).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    _assert_same_gradients(grads(False), grads(True), 1e-12)
    pool = fused._POOLS[model]
    assert len(pool) == 1  # the two workspaces had one shape: one is kept
    kept = next(iter(pool.values()))
    seqvae.elbo(model, x1).sum().backward()
    assert next(iter(pool.values())) is kept  # leased again and handed back


def test_a_second_backward_after_the_workspace_was_reused_is_refused():
    model = VRNN(x_dim=5, hidden_size=8, z_size=3)
    x = (torch.rand(4, 6, 5) > 0.5).float()
    loss = -seqvae.elbo(model, x).sum()
    loss.backward(retain_graph=True)
    seqvae.elbo(model, x).sum().backward()  # a later pass leases the same buffers
    with pytest.raises(RuntimeError, match="reused its buffers"):
        loss.backward()


def test_a_failed_build_falls_back_to_the_python_loops_with_a_warning(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(native, "_NATIVE", [])
    with pytest.warns(UserWarning, match="could not be built.*no compiler here"):
        assert fused._native() is None
    model = VRNN(x_dim=5, hidden_size=8, z_size=3)
    x = (torch.rand(4, 6, 5) > 0.5).float()
    (-seqvae.elbo(model, x).mean()).backward()  # trains, in Python
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("height,width,n", [(12, 12, 3), (9, 14, 4), (14, 9, 1), (5, 5, 5)])
def test_filterbank_backward_equals_autograd(height, width, n):
    """Filterbanks.backward (hand-written) against autograd through forward_saving, float64,
    including parameters far outside the usual range (clamped variances, huge strides)."""
    torch.manual_seed(0)
    filters = Filterbanks(height, width, n).double()
    raw = torch.randn(9, 5, dtype=torch.float64)
    raw[0, 2:] = torch.tensor([85.0, -3.0, 0.5])  # log sigma^2 past the clamp
    raw[1, 2:] = torch.tensor([-40.0, 4.0, -1.0])  # a vanishing variance, a wide stride
    raw[2, :2] = torch.tensor([30.0, -25.0])  # a glimpse far off the image
    raw[3, 4] = 85.0  # log gamma past the clamp: no gradient
    raw[4, 0] = 1e16  # a centre beyond the +-1e15 pixels the filter means are kept within
    raw.requires_grad_()
    fy, fx, att, saved = filters.forward_saving(raw)
    gy, gx, gg = torch.randn_like(fy), torch.randn_like(fx), torch.randn_like(att.gamma)
    (expected,) = torch.autograd.grad((fy * gy).sum() + (fx * gx).sum() + (att.gamma * gg).sum(), raw)
    got = filters.backward(saved, gy, gx, gg)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())


def test_draw_pass_with_attention_far_outside_its_range_equals_the_step_loop(loops, monkeypatch):
    """Read and write parameters past the clamps (log sigma^2 and log gamma above 80, a vanishing
    variance, a centre far off the image): the same gradients as the step loop."""
    torch.manual_seed(0)
    model = _jitter(DRAW(image_shape=(1, 9, 11), steps=3, hidden_size=8, z_size=3, read_size=3, write_size=2).double())
    with torch.no_grad():
        model.read_head.to_params.bias.copy_(torch.tensor([40.0, -3.0, 85.0, 1.0, 85.0]))
        model.write_head.proj.bias[-5:] = torch.tensor([0.5, 1e3, -40.0, 4.0, -2.0])
    x = (torch.rand(5, 1, 9, 11, dtype=torch.float64) > 0.5).double()
    loss0, g0, _ = _loss_and_grads(model, x, fused_on=False, monkeypatch=monkeypatch)
    loss1, g1, terms = _loss_and_grads(model, x, fused_on=True, monkeypatch=monkeypatch)
    assert _made_by(terms.z, "_DrawSequenceBackward")
    assert torch.isfinite(loss0) and abs(loss1.item() - loss0.item()) <= 1e-9 * abs(loss0.item())
    _assert_same_gradients(g0, g1, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_cpp_filterbank_equals_attention_filterbanks(dtype):
    """csrc/fused.cpp's filterbank (one pass per example) against attention.Filterbanks, forward and
    backward, for a non-square image and rows past every clamp."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = fused._native()
    if native is None:
        pytest.skip("the C++ loops could not be built here (no compiler?)")
    torch.manual_seed(0)
    filters = Filterbanks(9, 11, 3).to(dtype)
    head = type("Head", (), {"filters": filters})()
    raw = torch.randn(6, 5, dtype=dtype)
    raw[0] = torch.tensor([0.5, 1e3, -40.0, 4.0, -2.0])  # far off the image, a vanishing variance
    raw[1] = torch.tensor([40.0, -3.0, 85.0, 1.0, 85.0])  # past the clamps of log sigma^2 and log gamma
    got = native.filters_forward(*fused._filters_spec(head), raw)
    fy, fx, att, saved = filters.forward_saving(raw)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for a, b in ((got[0], fy), (got[1], fx), (got[2], att.gamma)):
        assert torch.allclose(a, b, rtol=tol, atol=tol)
    gy, gx, gg = torch.randn_like(fy), torch.randn_like(fx), torch.randn_like(att.gamma)
    expected = filters.backward(saved, gy, gx, gg)
    assert torch.allclose(native.filters_backward(*fused._filters_spec(head), got, gy, gx, gg), expected,
                          rtol=1e-9 if dtype == torch.float64 else 1e-4, atol=tol * expected.abs().max().item())


def test_a_parameter_changed_between_forward_and_backward_is_refused():
    """The step loop's autograd would refuse it (a saved tensor modified in place); so does the pass,
    for every parameter matrix, those the pass takes and those the networks around it use."""
    for model, x in ((VRNN(x_dim=5, hidden_size=8, z_size=3), (torch.rand(4, 6, 5) > 0.5).float()),
                     (VRNN(x_dim=5, hidden_size=8, z_size=3, cell="lstm"), (torch.rand(4, 6, 5) > 0.5).float()),
                     (DRAW(image_shape=(1, 8, 8), steps=3, hidden_size=8, z_size=2), (torch.rand(4, 1, 8, 8) > 0.5).float())):
        weights = [(name, p) for name, p in model.named_parameters() if p.dim() >= 2]
        assert len(weights) >= 5
        for name, p in weights:
            loss = -seqvae.elbo(model, x).sum()
            with torch.no_grad():
                p.add_(1.0)
            with pytest.raises(RuntimeError, match="modified in place|modified by an inplace operation"):
                loss.backward()


def test_double_backward_is_refused_clearly():
    model = VRNN(x_dim=5, hidden_size=8, z_size=3)
    x = (torch.rand(4, 6, 5) > 0.5).float()
    loss = -seqvae.elbo(model, x).sum()
    (grad,) = torch.autograd.grad(loss, [model.cell.hh.weight], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        grad.sum().backward()


_UNDER_A_MODE = """
import torch, seqvae
from torch.utils._python_dispatch import TorchDispatchMode
from seqvae import fused
assert fused._native() is not None
torch.set_num_threads(2)

class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))

for model, x in ((seqvae.DRAW(image_shape=(1, 12, 12), steps=3, hidden_size=16, z_size=4), (torch.rand(32, 1, 12, 12) > 0.5).float()),
                 (seqvae.VRNN(x_dim=5, hidden_size=8, z_size=3), (torch.rand(32, 6, 5) > 0.5).float())):
    values = []
    for mode in (None, PassThrough()):
        torch.manual_seed(0)
        if mode is None:
            values.append(seqvae.elbo(model, x).sum().item())
        else:
            with mode:
                values.append(seqvae.elbo(model, x).sum().item())
    assert values[0] == values[1], values
print("ok")
"""


def test_blocks_run_under_a_python_dispatch_mode(tmp_path):
    """An operation under a Python dispatch mode (FlopCounterMode, a user's mode) runs Python code
    on the blocks' threads: the loops must not hold the GIL (they hung before). In a subprocess,
    so that a hang fails the test instead of the suite."""
    import os
    import subprocess
    import sys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fused._native() is None:
            pytest.skip("the C++ loops could not be built here (no compiler?)")
    env = {**os.environ, "SEQVAE_BLOCKS": "2", "SEQVAE_FUSED": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _UNDER_A_MODE], env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("a fused pass under a dispatch mode did not finish in 300 s (a GIL deadlock?)")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]

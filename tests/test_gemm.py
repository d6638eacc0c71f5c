"""Measured matrix-product kernels (seqvae/gemm.py): every kernel gives x W^T + b, choices are
measured once and kept, and the models' gradients equal plain autograd's whatever is chosen."""

from __future__ import annotations

import json

import pytest
import torch

import seqvae
from seqvae import gemm

KERNELS = [k for k in gemm.KERNELS if k != "onednn" or gemm._onednn_ok()]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_every_kernel_computes_the_affine_map(kernel, bias):
    x = torch.randn(gemm.ROWS + 300, 37)  # more rows than one block of "rows"
    w = torch.randn(23, 37)
    b = torch.randn(23) if bias else None
    expected = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert _rel(gemm._run(kernel, x, w, b).double(), expected) < 1e-6
    # a transposed (strided) weight, as the backward passes it
    w_t = torch.randn(37, 23).t()
    assert _rel(gemm._run(kernel, x, w_t, b).double(), x.double() @ w_t.double().t() + (b.double() if bias else 0)) < 1e-6


def test_small_products_and_other_dtypes_use_aten_without_measuring(monkeypatch):
    monkeypatch.setattr(gemm, "_measure", lambda *a: pytest.fail("measured a product below MEASURE_MIN"))
    assert gemm.choose(torch.randn(64, 100), torch.randn(100, 100)) == "aten"
    big_x, big_w = torch.randn(4096, 100, dtype=torch.float64), torch.randn(100, 100, dtype=torch.float64)
    assert gemm.choose(big_x, big_w) == "aten"


def test_measuring_skips_onednn_for_a_strided_weight_and_drops_a_kernel_far_slower_than_aten(monkeypatch):
    """oneDNN with a transposed or sliced weight took ~14 s per call (a first training step took
    minutes): it is not a candidate there; and a kernel whose first call is SLOW x ATen's is not
    timed again."""
    import time

    ran = []
    real = gemm._run

    def run(kernel, x, w, b):
        ran.append(kernel)
        if kernel == "rows":
            time.sleep(0.2)  # a pathological kernel
        return real(kernel, x, w, b)

    monkeypatch.setattr(gemm, "_run", run)
    monkeypatch.setattr(gemm, "SLOW", 2)
    x, w = torch.randn(4096, 256), torch.randn(256, 512)
    assert gemm._measure(x, w.t(), None) == "aten"  # a transposed (strided) weight
    assert "onednn" not in ran and ran.count("rows") == 1 and ran.count("aten") == 1 + gemm.REPEATS


def test_a_choice_is_measured_once_and_stored_for_other_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQVAE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SEQVAE_GEMM", raising=False)
    monkeypatch.setattr(gemm, "_choices", None)
    calls = []

    def fake_measure(x, w, b):
        calls.append(tuple(x.shape))
        return "rows"

    monkeypatch.setattr(gemm, "_measure", fake_measure)
    x, w = torch.randn(3000, 100), torch.randn(100, 100)
    assert gemm.choose(x, w) == "rows" and gemm.choose(x, w) == "rows"
    assert calls == [(3000, 100)]
    stored = json.loads((tmp_path / "gemm.json").read_text())
    assert list(stored["choices"].values()) == ["rows"] and stored["machine"] == gemm._machine()
    monkeypatch.setattr(gemm, "_choices", None)  # a new process reads the file instead of measuring
    assert gemm.choose(torch.randn(2100, 100), w) == "rows" and len(calls) == 1  # 2100 rows round up to 4096 as 3000 do
    (tmp_path / "gemm.json").write_text("{not json")  # a damaged file is ignored, not fatal
    monkeypatch.setattr(gemm, "_choices", None)
    assert gemm.choose(x, w) == "rows" and len(calls) == 2


def test_forced_kernel_and_fallback_without_onednn(monkeypatch):
    x, w = torch.randn(3000, 100), torch.randn(100, 100)
    monkeypatch.setenv("SEQVAE_GEMM", "rows")
    assert gemm.choose(x, w) == "rows"
    monkeypatch.setenv("SEQVAE_GEMM", "onednn")
    monkeypatch.setattr(gemm, "_onednn_ok", lambda: False)
    assert gemm.choose(x, w) == "aten"
    monkeypatch.setenv("SEQVAE_GEMM", "")
    monkeypatch.setattr(gemm, "_choices", {})
    monkeypatch.setenv("SEQVAE_CACHE_DIR", "/proc/no-such-dir")  # unwritable: measured, not stored, no error
    assert gemm._measure(x, w, None) in ("aten", "rows")


@pytest.mark.parametrize("kernel", KERNELS)
def test_linear_gradients_equal_plain_autograd(kernel, monkeypatch):
    monkeypatch.setenv("SEQVAE_GEMM", kernel)
    x = torch.randn(40, 64, 100, dtype=torch.float64)
    w = torch.randn(300, 100, dtype=torch.float64) / 10
    b = torch.randn(300, dtype=torch.float64)
    g = torch.randn(40, 64, 300, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    ours = [t.float().requires_grad_() for t in (x, w, b)]
    torch.autograd.backward(torch.nn.functional.linear(*ref), g)
    y = gemm.linear(*ours)
    torch.autograd.backward(y, g.float())
    assert _rel(y.double(), torch.nn.functional.linear(x, w, b)) < 1e-6
    for a, r in zip(ours, ref):
        assert _rel(a.grad.double(), r.grad) < 1e-5


def _grads(model, x, loss):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss(model, x).backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["draw", "vrnn"])
def test_model_gradients_equal_plain_autograd_with_any_kernel(kind, kernel, monkeypatch):
    """The fast path (measured kernels forward and backward, batched weight gradients) against
    the same model run with torch.nn.functional.linear and per-step autograd everywhere."""
    torch.manual_seed(0)
    if kind == "draw":  # per-step products 64 x 562 x 1024: above MEASURE_MIN
        model = seqvae.DRAW(steps=3, hidden_size=256, z_size=100, read_size=5, write_size=5)
        x = (torch.rand(64, 1, 28, 28) > 0.5).float()
    else:  # sequence-long products (32 x 64 = 2048 rows) x 100 x 100
        model = seqvae.VRNN(x_dim=88, hidden_size=100, z_size=16)
        x = (torch.rand(32, 64, 88) > 0.5).float()

    def loss(m, data):
        return -seqvae.elbo(m, data).sum()

    monkeypatch.setenv("SEQVAE_GEMM", kernel)
    fast = _grads(model, x, loss)
    monkeypatch.setattr(gemm, "MEASURE_MIN", float("inf"))  # plain F.linear / addmm ...
    monkeypatch.setattr(seqvae.linear, "BATCH_MIN_WEIGHTS", float("inf"))  # ... and per-step weight gradients
    plain = _grads(model, x, loss)
    assert fast.keys() == plain.keys()
    for name in plain:
        assert _rel(fast[name], plain[name]) < 1e-5, name


# ------------------------------------------------------------------ Repeated: a loop's per-step products
@pytest.mark.parametrize("kernel", ["aten", "packed"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_repeated_computes_the_affine_map_with_extra_and_out(monkeypatch, kernel, bias, transposed):
    """x W^T + b (+ extra), into out or not, with a contiguous or a transposed weight, each kernel."""
    if kernel == "packed" and not gemm._packed_ok():
        pytest.skip("this PyTorch has no oneDNN (mkldnn) linear with packed weights")
    monkeypatch.setenv("SEQVAE_GEMM", kernel)
    w = torch.randn(37, 23).t() if transposed else torch.randn(23, 37)
    b = torch.randn(23) if bias else None
    prod = gemm.Repeated(16, w, b)
    assert prod.kernel == kernel and (prod.packed is not None) == (kernel == "packed")
    for rows in (16, 5):  # fewer rows than it was packed for (the last block of a batch)
        x, extra = torch.randn(rows, 37), torch.randn(rows, 23)
        expected = x.double() @ w.double().t() + (b.double() if bias else 0)
        assert _rel(prod(x).double(), expected) < 1e-6
        out = torch.full((rows, 23), float("nan"))
        assert prod(x, extra=extra, out=out) is out and _rel(out.double(), expected + extra.double()) < 1e-6
        strided = torch.randn(rows, 50)[:, 3:40]  # rows of a wider buffer, as the loops pass them
        assert _rel(prod(strided).double(), strided.double() @ w.double().t() + (b.double() if bias else 0)) < 1e-6


def test_repeated_measures_per_shape_and_threads_once(monkeypatch, tmp_path):
    """Small products, other dtypes and autocast take ATen's kernel unmeasured; others are measured
    once per shape, layout and number of threads, on that many threads, and stored."""
    monkeypatch.setenv("SEQVAE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SEQVAE_GEMM", raising=False)
    monkeypatch.setattr(gemm, "_choices", None)
    monkeypatch.setattr(gemm, "_packed_ok", lambda: True)
    calls = []

    def fake_measure(x, w, b):
        calls.append((tuple(x.shape), torch.get_num_threads()))
        return "aten"

    monkeypatch.setattr(gemm, "_measure_step", fake_measure)
    assert gemm.choose_step(8, torch.randn(10, 10)) == "aten" and calls == []  # below STEP_MIN
    assert gemm.choose_step(64, torch.randn(1024, 256, dtype=torch.float64)) == "aten" and calls == []
    w = torch.randn(1024, 256)
    threads = torch.get_num_threads()
    for _ in range(2):
        assert gemm.choose_step(64, w) == "aten" and gemm.choose_step(32, w, threads=1) == "aten"
    assert calls == [((64, 256), threads), ((32, 256), 1)] and torch.get_num_threads() == threads
    keys = sorted(json.loads((tmp_path / "gemm.json").read_text())["choices"])
    assert keys == ["step|32x256x1024|-|c|1", f"step|64x256x1024|-|c|{threads}"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm.choose_step(64, torch.randn(512, 256)) == "aten" and len(calls) == 2


def test_repeated_measurement_picks_the_faster_kernel(monkeypatch):
    if not gemm._packed_ok():
        pytest.skip("this PyTorch has no oneDNN (mkldnn) linear with packed weights")
    x, w = torch.randn(64, 256), torch.randn(1024, 256)
    slow = gemm._packed_run

    def slower(*args):
        torch.mm(torch.randn(600, 600), torch.randn(600, 600))  # ~0.2 GFLOP of extra work
        return slow(*args)

    monkeypatch.setattr(gemm, "_packed_run", slower)
    assert gemm._measure_step(x, w, None) == "aten"

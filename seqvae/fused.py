"""Whole-sequence kernels: a model's time loop as one autograd Function with a hand-written backward.

Dimensions: t steps, b batch, d hidden units, f features, z latent units, g gate
pre-activations (4d for an LSTM, 3d for a GRU), n glimpse size, s pixels along an image axis,
c channels.

`recurrent.unroll` runs a model's `step` T times and lets autograd record every operation of
every step. On a CPU that recording, and replaying it backwards, costs as much as the
arithmetic for the small tensors of a recurrent model (a DRAW glimpse or a VRNN step is a few
dozen operations on 64-128 rows). Here a model's whole pass is one `torch.autograd.Function`
(`_DrawSequence`, `_VRNNSequence`):

  * forward: the model's step, the same arithmetic in the same order, with the same random
    numbers drawn (so that the values are the step loop's to rounding), under no autograd,
    into buffers leased from a per-model pool (`_lease`); products that read the same state
    are one product over the weights side by side (DRAW: the write head of step t and the
    read head, the encoder and the decoder of step t+1 all read h^dec_t);
  * backward: the steps in reverse, each written out by hand (the LSTM and GRU updates, the
    reparameterised posterior, the VRNN's q-net and phi_z, the filterbank read and write
    heads), with only the gradients of the inputs per step; a weight's gradient is one product
    over all steps (DRAW) or over blocks of CHUNK steps (the VRNN: so that its per-step
    gradients live for one block, not for the whole sequence).

The loops run in C++ (csrc/fused.cpp: the same loops, one pass per element for the cell
updates and the filterbanks; in the VRNN's steps what lies between the products, biases,
ReLUs and their gradients, the sample, as raw loops over the rows, with no ATen operation or
view per step for them), built by torch.utils.cpp_extension on first use for the machine's
CPU and cached (~40 s once); where it cannot be built (no compiler), in Python, with a warning.
SEQVAE_NATIVE=0 runs the Python loops. In C++ the batch is split into blocks of rows, one per
thread (`_blocks`; SEQVAE_BLOCKS=n sets the number): every operation of a step acts row by
row, so each thread runs its block's loop on its own, with single-threaded products, instead of
all threads meeting at every one of a step's few dozen small operations (measured on the
2-core development VM: DRAW's step 1.1x, the VRNN's at T=500 1.16-1.24x faster than one block).
DRAW's products that are repeated at every step with one weight use the kernel gemm.Repeated
measures fastest for the shape (oneDNN with the weight packed once per pass, or ATen's); the
VRNN's per-step products go through ATen's brgemm (oneDNN's small-matrix kernel where the CPU
has it: on one thread at 64 rows 1.04-1.8x MKL's speed for its shapes; ATen's BLAS otherwise)
in float, ATen's in double; the products over whole sequences (weight gradients, the VRNN's
phi_x parts per chunk) are ATen's, on all threads. The same build holds one-pass helpers for
nets._Chain (bias and ReLU; ReLU's gradient and the bias's) and terms._NormalKL (the KL and its
gradients): native.helpers_for(*tensors).

The model's `fused_unroll(x, state, mask)` (the recurrent contract's hook) returns the step
outputs stacked over time and the final state, as the step loop does; `score` then runs as
usual on them, with autograd. `recurrent.unroll` calls the hook when gradients are wanted,
on a CPU in float32 or float64, outside torch.compile and autocast, with no `between`
(FIVO) and no kept states; anywhere else (or with SEQVAE_FUSED=0) the step loop runs.
The tests compare values and every gradient with the step loop's, in C++ and in Python.

Memory: a training step's temporaries of tens of megabytes would be mapped and unmapped by
glibc at every step (~10^5 page faults for a T=500 VRNN step); `tune_allocator` raises its
mmap and trim thresholds once per process, on the first fused pass. A workspace is one
allocation carved into its buffers (`_carve`): kept between steps, separate buffers would pin
the heap's free space around them and fragment it.

The maths of each backward, in the forward's notation:
  LSTM  (i, f, o) = sigmoid(.), u = tanh(.), c' = f c + i u, h' = o tanh(c'):
        dc' += dh' o (1 - tanh(c')^2); di = dc' u; df = dc' c; do = dh' tanh(c'); du = dc' i;
        dc = dc' f; the pre-activations' gradients through sigmoid' = s (1 - s), tanh' = 1 - u^2.
  GRU   r, k = sigmoid(gi_rk + gh_rk), n = tanh(gi_n + r gh_n), h' = n + k (h - n):
        dn = dh' (1 - k); dk = dh' (h - n); dh = dh' k; dn_pre = dn (1 - n^2);
        dr = dn_pre gh_n; dgh_n = dn_pre r.
  posterior z = loc + scale eps: dloc = dz; dscale = dz eps (DRAW: scale = exp(.), VRNN:
        softplus(.) + 1e-4, whose derivative is sigmoid(.)).
  ReLU  the gradient where the output is positive.
  filterbank (attention.Filterbanks.backward): softmax, Gaussian filters, attention parameters.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import weakref

import torch
from torch import Tensor
from torch.autograd import Function

from . import gemm
from .attention import _FAR, _LOG_MAX, _SIGMA2_MIN
from .native import hand_written_ok, load as _native
from .nets import MIN_STD, first_order_only

__all__ = ["enabled", "draw_unroll", "vrnn_unroll", "vrnn_params"]


def enabled(x: Tensor, *params: Tensor) -> bool:
    """Whether a whole-sequence kernel applies: training-time gradients on a CPU in float32/64,
    outside torch.compile, torch.func transforms, forward-mode AD and autocast, x needing no
    gradient, and not switched off."""
    return (
        torch.is_grad_enabled()
        and os.environ.get("SEQVAE_FUSED", "1") != "0"
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not x.requires_grad
        and hand_written_ok()
        and not torch.is_autocast_enabled("cpu")
        and all(p.dtype == x.dtype and p.device.type == "cpu" for p in params if p is not None)
    )


# ------------------------------------------------------------------------------------ workspaces
class _Workspace(dict):
    """The named buffers of one pass (allocated once, reused by later passes of the same shapes:
    fresh buffers of tens of megabytes at every training step would be mapped and unmapped by
    the C allocator each time, ~10^4 page faults per step). A pass leases one in forward and
    hands it back to its model's pool when its backward is done; a pass whose graph is dropped
    without a backward keeps its workspace, which is freed with it."""

    generation = 0


_POOLS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
POOL_SIZE = 4  # workspaces kept per model (the most recently used shapes)
STEP_ROUND = 32  # a workspace holds a multiple of this many steps, so that sequences of nearby lengths share it


_ALLOCATOR_TUNED: list = []
MMAP_THRESHOLD = 1 << 26  # bytes: glibc serves blocks below this from its heap (default: from 128 KiB, at most 32 MiB, on mmap)
TRIM_THRESHOLD = 1 << 30  # bytes of free heap glibc keeps before giving memory back to the system


def tune_allocator() -> bool:
    """Once per process, on Linux with glibc: serve blocks up to MMAP_THRESHOLD from the heap and keep
    up to TRIM_THRESHOLD of freed heap, so that a training step's large temporaries (a VRNN's
    (t, b, ...) tensors of tens of megabytes) reuse memory instead of being mapped and unmapped,
    and faulted in page by page, at every step. Measured on the development VM: a T=500 VRNN step
    took ~125,000 page faults and 1.4 s before, none and 0.96 s after. The process then keeps its
    high-water mark of heap (as jemalloc or tcmalloc would). SEQVAE_MALLOC=0 leaves glibc as it is.
    Returns whether the thresholds were set."""
    if not _ALLOCATOR_TUNED:
        done = False
        if os.environ.get("SEQVAE_MALLOC", "1") != "0" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
                    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
                    done = bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) & bool(libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))
            except OSError:
                pass
        _ALLOCATOR_TUNED.append(done)
    return _ALLOCATOR_TUNED[0]


def _lease(model, steps: int, shapes: dict[str, tuple[int, ...]], like: Tensor,
           fixed: dict[str, tuple[int, ...]] | None = None) -> _Workspace:
    """Buffers of like's dtype: those in `shapes` for all steps (first size: extra steps, added to
    `steps`), those in `fixed` of the sizes given."""
    tune_allocator()
    held = -(-steps // STEP_ROUND) * STEP_ROUND
    fixed = fixed or {}
    key = (like.dtype, held, tuple(sorted(shapes.items())), tuple(sorted(fixed.items())))
    pool = _POOLS.setdefault(model, {})
    ws = pool.pop(key, None)
    if ws is None:
        sizes = {name: (held + shape[0], *shape[1:]) for name, shape in shapes.items()} | fixed
        ws = _Workspace(_carve(sizes, like))
        ws.key = key
    ws.generation += 1
    ws.views = {name: buf[: steps + shapes[name][0]] if name in shapes else buf for name, buf in ws.items()}
    return ws


ALIGN = 64  # bytes: each buffer of a workspace starts on a cache line


def _carve(sizes: dict[str, tuple[int, ...]], like: Tensor) -> dict[str, Tensor]:
    """Buffers of the given sizes as views of one allocation. A workspace outlives the training
    step that leased it: its buffers scattered through the C allocator's heap would pin the
    heap's free space around them and fragment it (measured: a T=500 VRNN step's resident peak grew
    by ~70 MB over its first steps); one block of over MMAP_THRESHOLD bytes is mapped on its own."""
    align = max(1, ALIGN // like.element_size())
    offsets, total = {}, 0
    for name, shape in sizes.items():
        offsets[name] = total
        total += -(-math.prod(shape) // align) * align
    flat = like.new_empty(total)
    return {name: flat[offsets[name]: offsets[name] + math.prod(shape)].view(shape) for name, shape in sizes.items()}


def _release(model, ws: _Workspace) -> None:
    pool = _POOLS.setdefault(model, {})
    pool[ws.key] = ws
    while len(pool) > POOL_SIZE:
        pool.pop(next(iter(pool)))


def _guard(ctx, params) -> None:
    """Remember the versions of the pass's inputs that are parameters or may be views of them (DRAW's
    initial canvas and states are its learned ones): their gradients are computed from the values
    of the forward. (The VRNN's initial state is copied into the pass's buffers: changing it after
    the forward changes nothing the backward reads.)"""
    ctx.versions = [(p, p._version) for p in params if p is not None]


def _check_lease(ctx) -> None:
    """Before a backward: the parameters are as the forward saw them, and its workspace still holds its values."""
    for p, version in ctx.versions:
        if p._version != version:
            raise RuntimeError(
                "a parameter was modified in place after the fused pass's forward and before its backward "
                f"(a {tuple(p.shape)} parameter, version {version} then {p._version}); "
                "its gradient would be wrong. Step the optimiser after backward, or set SEQVAE_FUSED=0"
            )
    if ctx.ws.generation != ctx.generation:
        raise RuntimeError(
            "a second backward through a fused pass after a later pass reused its buffers; "
            "keep one backward per pass, or set SEQVAE_FUSED=0 for the step loop"
        )


# ---------------------------------------------------------------------------------------- cells
def lstm_forward(gates: Tensor, c: Tensor, h_out: Tensor, c_out: Tensor, tc_out: Tensor) -> None:
    """cells.lstm_update in place: gates (b, 4d) becomes [sigmoid(i, f, o), tanh(u)], and c' into
    c_out, tanh(c') into tc_out, h' into h_out (what the backward needs stays in gates and tc_out)."""
    d = c.shape[-1]
    sig = gates[:, : 3 * d].sigmoid_()
    u = gates[:, 3 * d :].tanh_()
    i, f, o = sig.chunk(3, dim=-1)
    torch.addcmul(f * c, i, u, out=c_out)
    torch.tanh(c_out, out=tc_out)
    torch.mul(o, tc_out, out=h_out)


def lstm_backward(dh: Tensor, dc: Tensor, acts: Tensor, tc: Tensor, c: Tensor, dgates: Tensor) -> Tensor:
    """Gradients of an LSTM update (acts, tc from lstm_forward): the pre-activations' into dgates
    (b, 4d); returns the gradient of the old c."""
    d = c.shape[-1]
    sig, u = acts[:, : 3 * d], acts[:, 3 * d :]
    i, f, o = sig.chunk(3, dim=-1)
    dc = torch.addcmul(dc, dh * o, 1 - tc * tc)  # through h' = o tanh(c')
    dsig = dgates[:, : 3 * d]
    torch.mul(dc, u, out=dsig[:, :d])
    torch.mul(dc, c, out=dsig[:, d : 2 * d])
    torch.mul(dh, tc, out=dsig[:, 2 * d :])
    dsig.mul_(sig - sig * sig)
    torch.mul(dc * i, 1 - u * u, out=dgates[:, 3 * d :])
    return dc * f


# ------------------------------------------------------------------------------------------ DRAW
def _draw_forward(x, canvas0, a_seq, enc_in, ce, hd, cd, g_enc, g_dec, tc_enc, tc_dec, eps, m_seq, v_seq, q_seq, z_seq,
                  prods, dims, read, write):
    """DRAW's forward loop (csrc/fused.cpp `draw_forward`, in Python): fills the buffers; returns the
    final canvas and each step's saved tensors of the read and the write (lists; None where a head
    has no filterbank)."""
    steps, b, d, nz, c, hh, wi, nr, nw = dims[:9]
    prod_a, prod_write, prod_enc, prod_q, prod_dz = prods
    read_fb, write_fb = hasattr(read, "filters"), hasattr(write, "filters")
    if read_fb:  # the glimpse's input laid out (b, h, 2c, w): x, then the error image
        v_seq[:, :, :, :c] = x.transpose(1, 2)
        xhat_views = v_seq[:, :, :, c:].transpose(2, 3)  # (t, b, c, h, w) views
    prod_a(hd[0], out=a_seq[0])
    canvas = canvas0
    saved_read, saved_write = [None] * steps, [None] * steps
    for t in range(steps):
        a = a_seq[t]
        mean = torch.sigmoid(canvas[:, :c], out=m_seq[t])
        if read_fb:
            torch.sub(x, mean, out=xhat_views[t])
            fy, fx, att, fsaved = read.filters.forward_saving(a[:, nw + 8 * d : nw + 8 * d + 5])
            u = torch.bmm(fy, v_seq[t].view(b, hh, 2 * c * wi))  # (b, n, 2c w)
            r0 = torch.bmm(u.view(b, -1, wi), fx.transpose(1, 2))  # (b, n 2c, n)
            torch.mul(r0.view(b, -1), att.gamma.unsqueeze(-1), out=enc_in[t, :, :nr])
            saved_read[t] = (fy, fx, att.gamma, fsaved, u, r0)
        else:
            enc_in[t, :, : c * hh * wi] = x.flatten(1)
            torch.sub(x.flatten(1), mean.flatten(1), out=enc_in[t, :, c * hh * wi : nr])
        gates = prod_enc(enc_in[t], extra=a[:, nw : nw + 4 * d], out=g_enc[t])
        lstm_forward(gates, ce[t], enc_in[t + 1, :, nr:], ce[t + 1], tc_enc[t])
        q = prod_q(enc_in[t + 1, :, nr:], out=q_seq[t])
        z = torch.addcmul(q[:, :nz], q[:, nz:].exp(), eps[t].normal_(), out=z_seq[t])
        gates = prod_dz(z, extra=a[:, nw + 4 * d : nw + 8 * d], out=g_dec[t])
        lstm_forward(gates, cd[t], hd[t + 1], cd[t + 1], tc_dec[t])
        last = t + 1 == steps
        a = (prod_write if last else prod_a)(hd[t + 1], out=a_seq[t + 1, :, :nw] if last else a_seq[t + 1])
        if write_fb:
            patch, raw = a[:, : write.patch_size], a[:, write.patch_size : write.patch_size + 5]
            fy, fx, att, fsaved = write.filters.forward_saving(raw)
            pm = patch / att.gamma.unsqueeze(-1)  # (b, c n n)
            u = torch.bmm(pm.view(b, -1, write.n), fx)  # (b, c n, w)
            update = _paste(fy, u, write.channels)
            saved_write[t] = (fy, fx, att.gamma, fsaved, pm, u)
        else:
            update = a[:, :nw].view(canvas.shape)
        canvas = canvas + update
    return canvas, (saved_read, saved_write)


def _draw_backward(dcanvas, dhe, dce, dhd_final, dcd, dq_out, dz_out, draw_read, draw_write, saved, ce, cd, g_enc,
                   g_dec, tc_enc, tc_dec, eps, m_seq, v_seq, q_seq, da_seq, dq_seq, by, dims, read, write):
    """DRAW's backward loop (csrc/fused.cpp `draw_backward`, in Python): fills da_seq and dq_seq;
    returns the gradients of the initial canvas, h^enc, c^enc, h^dec, c^dec."""
    steps, b, d, nz, c, hh, wi, nr, nw = dims[:9]
    by_a, by_enc, by_q, by_dz = by  # x W for each weight W (gemm.Repeated of W^T)
    saved_read, saved_write = saved
    read_rows = slice(nw + 8 * d, nw + 8 * d + 5)
    for t in reversed(range(steps)):
        da = da_seq[t + 1]
        if saved_write[t] is not None:  # the write of step t (from h^dec_{t+1})
            fy, fx, gamma, fsaved, pm, u = saved_write[t]
            dfy, du = _paste_backward(fy, u, dcanvas, write.channels)
            dpm = torch.bmm(du, fx.transpose(1, 2)).view(b, -1)  # (b, c n n)
            dfx = torch.bmm(pm.view(b, -1, write.n).transpose(1, 2), du)  # (b, n, w)
            dgamma = (dpm * pm).sum(1).div_(gamma).neg_()
            torch.div(dpm, gamma.unsqueeze(-1), out=da[:, : write.patch_size])
            draw = write.filters.backward(fsaved, dfy, dfx, dgamma)
            if draw_write is not None:
                draw = draw + draw_write[t]
            da[:, write.patch_size : write.patch_size + 5] = draw
        else:
            da[:, :nw] = dcanvas.view(b, -1)
        dhd = by_a(da)  # h^dec_{t+1}'s gradient from everything that read it
        if t + 1 == steps and dhd_final is not None:
            dhd = dhd + dhd_final
        dgates = da_seq[t, :, nw + 4 * d : nw + 8 * d]  # the decoder
        dcd = lstm_backward(dhd, dcd, g_dec[t], tc_dec[t], cd[t], dgates)
        dz = by_dz(dgates, extra=None if dz_out is None else dz_out[t])
        dq = dq_seq[t]  # the posterior: z = loc + exp(log_scale) eps
        if dq_out is None:
            dq[:, :nz] = dz
            torch.mul(dz * eps[t], q_seq[t, :, nz:].exp(), out=dq[:, nz:])
        else:
            torch.add(dq_out[t, :, :nz], dz, out=dq[:, :nz])
            torch.addcmul(dq_out[t, :, nz:], dz * eps[t], q_seq[t, :, nz:].exp(), out=dq[:, nz:])
        dhe = by_q(dq, extra=dhe)
        dgates = da_seq[t, :, nw : nw + 4 * d]  # the encoder
        dce = lstm_backward(dhe, dce, g_enc[t], tc_enc[t], ce[t], dgates)
        dinp = by_enc(dgates)  # (b, R + d): [r, h^enc_t-1]
        dhe, dr = dinp[:, nr:], dinp[:, :nr]
        mean = m_seq[t]
        if saved_read[t] is not None:
            fy, fx, gamma, fsaved, u, r0 = saved_read[t]
            dgamma = (dr * r0.view(b, -1)).sum(1)
            dr0 = (dr * gamma.unsqueeze(-1)).view(b, -1, read.n)  # (b, n 2c, n)
            du = torch.bmm(dr0, fx).view(b, read.n, -1)  # (b, n, 2c w)
            dfx = torch.bmm(dr0.transpose(1, 2), u.view(b, -1, wi))  # (b, n, w)
            dfy = torch.bmm(du, v_seq[t].view(b, hh, -1).transpose(1, 2))  # (b, n, h)
            dv = torch.bmm(fy.transpose(1, 2), du).view(b, hh, 2 * c, wi)
            dxhat = dv[:, :, c:].transpose(1, 2)  # (b, c, h, w)
            draw = read.filters.backward(fsaved, dfy, dfx, dgamma)
            if draw_read is not None:
                draw = draw + draw_read[t]
            da_seq[t, :, read_rows] = draw
        else:
            dxhat = dr[:, c * hh * wi :].view(b, c, hh, wi)
        dcanvas[:, :c].addcmul_(dxhat, mean * mean - mean)  # x^ = x - sigmoid(canvas)
    return [dcanvas, dhe, dce, by_a(da_seq[0]), dcd]


BLOCK_MIN = 16  # rows: a batch is split into blocks of at least this many rows, one per thread


def _blocks(rows: int) -> int:
    """How many blocks of rows the C++ loops run in parallel: one per thread (SEQVAE_BLOCKS=1: one,
    with ATen's and oneDNN's own threads in each operation)."""
    forced = os.environ.get("SEQVAE_BLOCKS", "")
    if forced.isdigit() and int(forced) > 0:
        return int(forced)
    return max(1, min(torch.get_num_threads(), rows // BLOCK_MIN))


def _repeated(rows: int, blocks: int, weight: Tensor, bias: Tensor | None = None) -> gemm.Repeated:
    """A loop's product by `weight`, for blocks of rows each on one thread (or all rows on all threads)."""
    if blocks > 1:
        return gemm.Repeated(-(-rows // blocks), weight, bias, threads=1)
    return gemm.Repeated(rows, weight, bias)


def _flat(prods: list) -> list:
    """Products as csrc/fused.cpp takes them: [weight, bias, packed weight] for each."""
    return [t for p in prods for t in p.native()]


def _filters_spec(head) -> tuple[list[Tensor], list[float]]:
    """A filterbank head's constants as csrc/fused.cpp takes them (empty for a head without one)."""
    if not hasattr(head, "filters"):
        return [], []
    f = head.filters
    pad = f.pad if f.pad is not None else f.grid.new_empty(0)
    return [f.half_size, f.offsets, f.grid, pad], [f.stride, f.height, f.width, _FAR, _LOG_MAX, _SIGMA2_MIN]


class _DrawSequence(Function):
    """DRAW's T glimpses (draw.py, eqs 3-8) with a hand-written backward; see the module docstring.

    Weights side by side: W_A = [W_write; W_enc[:, hdec]; W_dec[:, hdec]; W_read] (rows) maps
    h^dec_t to the write head's output of step t and the encoder's, decoder's and read head's
    h^dec parts of step t+1 (with their biases), one product per step forwards and backwards.
    The loops run in C++ where it is built (`_native`), in Python otherwise.
    """

    @staticmethod
    def forward(ctx, model, x, canvas0, he0, ce0, hd0, cd0, we, be, wq, bq, wd, bd, wr, br, ww, bw):
        ctx.set_materialize_grads(False)
        steps, b = model.steps, x.shape[0]
        d, nz = he0.shape[1], model.z_size
        c, hh, wi = model.image_shape
        read, write = model.read_head, model.write_head
        read_fb, write_fb = wr is not None, hasattr(write, "filters")
        nr = we.shape[1] - 2 * d  # the read's width R
        nw = ww.shape[0]  # the write head's outputs P
        # rows of A: [write (P) | encoder (4d) | decoder (4d) | read (5)]
        w_a = torch.cat([ww, we[:, nr : nr + d], wd[:, nz:]] + ([wr] if read_fb else []))
        b_a = torch.cat([bw, be, bd] + ([br] if read_fb else []))
        # (weight, bias) of A, of the last step's write alone, of the encoder's [r, h^enc] columns,
        # of the posterior and of the decoder's z columns
        weights = [(w_a, b_a), (ww.contiguous(), bw), (torch.cat([we[:, :nr], we[:, nr + d :]], dim=1), None),
                   (wq.contiguous(), bq), (wd[:, :nz].contiguous(), None)]
        n_a = w_a.shape[0]
        ws = _lease(model, steps, {  # first size: steps added
            "a": (1, b, n_a),  # A_t from h^dec_t
            "enc_in": (1, b, nr + d),  # row t: [r_{t+1}, h^enc_t]
            "ce": (1, b, d), "hd": (1, b, d), "cd": (1, b, d),
            "g_enc": (0, b, 4 * d), "g_dec": (0, b, 4 * d),  # the gates' activations
            "tc_enc": (0, b, d), "tc_dec": (0, b, d),  # tanh(c_t)
            "eps": (0, b, nz), "mean": (0, b, c, hh, wi),  # sigmoid(canvas) before step t
            "v": (0, b, hh, 2 * c, wi) if read_fb else (0, 0),  # the glimpse's input: x, then x^
            "da": (1, b, n_a), "dq": (0, b, 2 * nz),  # gradients, for the backward
        }, x)
        w = ws.views
        q_seq, z_seq = x.new_empty(steps, b, 2 * nz), x.new_empty(steps, b, nz)
        w["enc_in"][0, :, nr:] = he0
        w["ce"][0], w["hd"][0], w["cd"][0] = ce0, hd0, cd0
        dims = [steps, b, d, nz, c, hh, wi, nr, nw, read.n if read_fb else 0, write.n if write_fb else 0,
                write.patch_size if write_fb else 0]
        x = x.contiguous()
        bufs = (w["a"], w["enc_in"], w["ce"], w["hd"], w["cd"], w["g_enc"], w["g_dec"], w["tc_enc"], w["tc_dec"],
                w["eps"], w["mean"], w["v"], q_seq, z_seq)
        native = _native()
        blocks = _blocks(b) if native is not None else 1  # C++: the batch in blocks of rows, one thread each
        prods = [_repeated(b, blocks, w, bias) for w, bias in weights]  # by the kernels gemm.py measured fastest
        if native is not None:
            canvas, saved = native.draw_forward(x, canvas0, *bufs, _flat(prods), dims, *_filters_spec(read),
                                                *_filters_spec(write), blocks)
        else:
            canvas, saved = _draw_forward(x, canvas0, *bufs, prods, dims, read, write)
        _guard(ctx, (canvas0, he0, ce0, hd0, cd0, we, be, wq, bq, wd, bd, wr, br, ww, bw))
        ctx.model, ctx.ws, ctx.generation, ctx.native = model, ws, ws.generation, native
        ctx.dims, ctx.weights, ctx.saved = dims, [w for w, _ in weights], saved
        ctx.save_for_backward(q_seq, z_seq)
        a_seq = w["a"]
        raw_read = a_seq[:steps, :, nw + 8 * d : nw + 8 * d + 5].clone() if read_fb else x.new_empty(0)
        raw_write = a_seq[1:, :, write.patch_size : write.patch_size + 5].clone() if write_fb else x.new_empty(0)
        ctx.mark_non_differentiable(*([] if read_fb else [raw_read]), *([] if write_fb else [raw_write]))
        return (canvas, w["enc_in"][steps, :, nr:].clone(), w["ce"][steps].clone(), w["hd"][steps].clone(),
                w["cd"][steps].clone(), q_seq, z_seq, raw_read, raw_write)

    @staticmethod
    @first_order_only
    def backward(ctx, dcanvas, dhe, dce, dhd, dcd, dq_out, dz_out, draw_read, draw_write):
        _check_lease(ctx)
        model, ws, w, dims = ctx.model, ctx.ws, ctx.ws.views, ctx.dims
        steps, b, d, nz, c, hh, wi, nr, nw = dims[:9]
        n_a = w["a"].shape[2]
        w_a, _, w_enc, w_q, w_dz = ctx.weights
        q_seq, z_seq = ctx.saved_tensors
        enc_in, hd_seq, da_seq, dq_seq = w["enc_in"], w["hd"], w["da"], w["dq"]
        read, write = model.read_head, model.write_head
        zeros = hd_seq.new_zeros(b, d)
        if dcanvas is None:
            dcanvas = q_seq.new_zeros(b, model.canvas0.shape[0], hh, wi)
        else:  # a copy (updated in place), contiguous whatever the incoming gradient's layout
            dcanvas = dcanvas.clone(memory_format=torch.contiguous_format)
        da_seq[0, :, :nw] = 0  # A_0's write part and A_T's other parts are never read
        da_seq[steps, :, nw:] = 0
        if dims[9] == 0:
            da_seq[:, :, nw + 8 * d :] = 0
        blocks = ctx.saved.blocks_count() if ctx.native is not None else 1
        by = [_repeated(b, blocks, w.t()) for w in (w_a, w_enc, w_q, w_dz)]  # products by each weight
        args = (dcanvas, zeros if dhe is None else dhe, zeros if dce is None else dce, dhd, zeros if dcd is None else dcd,
                dq_out, dz_out, draw_read, draw_write, ctx.saved, w["ce"], w["cd"], w["g_enc"], w["g_dec"], w["tc_enc"],
                w["tc_dec"], w["eps"], w["mean"], w["v"], q_seq, da_seq, dq_seq)
        if ctx.native is not None:
            dcanvas, dhe, dce, dhd0, dcd = ctx.native.draw_backward(*args, _flat(by), dims, *_filters_spec(read),
                                                                    *_filters_spec(write))
        else:
            dcanvas, dhe, dce, dhd0, dcd = _draw_backward(*args, by, dims, read, write)
        # every weight's gradient: one product over all steps
        da_flat = da_seq.view(-1, n_a)
        dw_a = da_flat.t() @ hd_seq.view(-1, d)
        db_a = da_flat.sum(0)
        enc_rows, dec_rows, read_rows = slice(nw, nw + 4 * d), slice(nw + 4 * d, nw + 8 * d), slice(nw + 8 * d, nw + 8 * d + 5)
        dw_enc = da_seq[:steps, :, enc_rows].reshape(-1, 4 * d).t() @ enc_in[:steps].view(-1, nr + d)  # (4d, R + d)
        dq_flat = dq_seq.view(-1, 2 * nz)
        dwq = dq_flat.t() @ enc_in[1:, :, nr:].reshape(-1, d)
        dwdz = da_seq[:steps, :, dec_rows].reshape(-1, 4 * d).t() @ z_seq.view(-1, nz)
        dwe = torch.cat([dw_enc[:, :nr], dw_a[enc_rows], dw_enc[:, nr:]], dim=1)
        dwd = torch.cat([dwdz, dw_a[dec_rows]], dim=1)
        dwr, dbr = (dw_a[read_rows], db_a[read_rows]) if dims[9] else (None, None)
        _release(model, ws)
        return (None, None, dcanvas, dhe.clone(), dce, dhd0, dcd,
                dwe, db_a[enc_rows], dwq, dq_flat.sum(0), dwd, db_a[dec_rows], dwr, dbr, dw_a[:nw], db_a[:nw])


def _paste(fy: Tensor, u: Tensor, channels: int) -> Tensor:
    """F_Y^T u for u (b, c n, w) = patch F_X: the canvas update (b, c, h, w)."""
    b, n = fy.shape[0], fy.shape[1]
    if channels == 1:
        return torch.bmm(fy.transpose(1, 2), u).unsqueeze(1)
    return torch.matmul(fy.transpose(1, 2).unsqueeze(1), u.view(b, channels, n, -1))


def _paste_backward(fy: Tensor, u: Tensor, dupdate: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """The gradients of fy (b, n, h) and u (b, c n, w) given the update's, (b, c, h, w)."""
    b, n = fy.shape[0], fy.shape[1]
    if channels == 1:
        dup = dupdate[:, 0]
        return torch.bmm(u, dup.transpose(1, 2)), torch.bmm(fy, dup)
    dfy = torch.einsum("bcnw,bchw->bnh", u.view(b, channels, n, -1), dupdate)
    du = torch.einsum("bnh,bchw->bcnw", fy, dupdate).reshape(b, channels * n, -1)
    return dfy, du


def draw_unroll(model, x: Tensor, state) -> tuple[Tensor, ...]:
    """DRAW's pass over x from `state` as one Function: the final canvas, h^enc, c^enc, h^dec,
    c^dec, then [loc, log scale] (t, b, 2z), z (t, b, z) and the read's and write's raw attention
    outputs (t, b, 5) (empty for a head without a filterbank)."""
    read, write = model.read_head, model.write_head
    wr, br = (read.to_params.weight, read.to_params.bias) if hasattr(read, "to_params") else (None, None)
    wlin = write.proj if hasattr(write, "proj") else write.to_canvas
    return _DrawSequence.apply(
        model, x, *state, model.encoder.linear.weight, model.encoder.linear.bias,
        model.posterior_net.weight, model.posterior_net.bias, model.decoder.linear.weight,
        model.decoder.linear.bias, wr, br, wlin.weight, wlin.bias,
    )


# ------------------------------------------------------------------------------------------ VRNN
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """x W^T (+ b) into out."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _relu_backward(grad: Tensor, out: Tensor, into: Tensor) -> Tensor:
    """grad where the ReLU's output is positive, 0 elsewhere, into `into`."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=into)


def _gru_forward(gi: Tensor, gh: Tensor, h: Tensor, h_out: Tensor) -> None:
    """cells.gru_update in place: gi (b, 3d) becomes [sigmoid(r, u), n], h' into h_out."""
    d = h.shape[-1]
    ru = gi[:, : 2 * d].add_(gh[:, : 2 * d]).sigmoid_()
    n = gi[:, 2 * d :].addcmul_(ru[:, :d], gh[:, 2 * d :]).tanh_()
    torch.lerp(n, h, ru[:, d:], out=h_out)


def _gru_backward(dh: Tensor, acts: Tensor, ghn: Tensor, h: Tensor, dgi: Tensor, dnr: Tensor) -> Tensor:
    """Gradients of a GRU update (acts from _gru_forward, ghn the hidden gates' n block): the input
    gates' into dgi (b, 3d), the hidden gates' n block into dnr (b, d) (their r and u blocks are
    dgi's); returns the gradient of h through h' = n + u (h - n)."""
    d = h.shape[-1]
    r, u, n = acts[:, :d], acts[:, d : 2 * d], acts[:, 2 * d :]
    dn = torch.mul(dh - dh * u, 1 - n * n, out=dgi[:, 2 * d :])  # through tanh
    torch.mul(dn, r, out=dnr)
    torch.mul(dn, ghn, out=dgi[:, :d])
    torch.mul(dh, h - n, out=dgi[:, d : 2 * d])
    ru = acts[:, : 2 * d]
    dgi[:, : 2 * d].mul_(ru - ru * ru)  # through the sigmoids
    return dh * u


CHUNK = 64  # VRNN steps per block of the batched products inside the pass (phi_x's maps, the weight gradients)


def _vrnn_forward(fx, mask, hs, cs, ghn, acts, fzs, out_seq, scale_seq, eps, z_seq, xg, gates_seq, tc_seq, hq,
                  w_x, b_px, b_cx, w_h, b_h, q_w, q_b, z_w, z_b, w_cz, lstm, min_std, chunk) -> None:
    """The VRNN's forward loop (csrc/fused.cpp `vrnn_forward`, in Python): fills the buffers.

    phi_x's shares of the q-net's first layer and of the cell's gates (w_x: their weights'
    phi_x columns, stacked) are written for a chunk of steps at once, by one product, straight
    into the step buffers they start (xg, whose rows are [acts[0] | gates_seq]); the biases are
    added step by step with the h parts (no bias copied into an output first)."""
    steps, b, f = fx.shape
    nz, g, d = eps.shape[2], gates_seq.shape[2], hs.shape[2]
    for s0 in range(0, steps, chunk):
        n = min(chunk, steps - s0)
        torch.mm(fx[s0 : s0 + n].reshape(n * b, f), w_x.t(), out=xg[s0 : s0 + n].view(n * b, f + g))
        for t in range(s0, s0 + n):
            h = hs[t]
            torch.mm(h, w_h.t(), out=hq)
            a = acts[0][t].add_(hq[:, :f]).add_(b_px).relu_()
            for i in range(1, len(q_w)):
                a = _linear(a, q_w[i - 1], q_b[i - 1], acts[i][t]).relu_()
            out = _linear(a, q_w[-1], q_b[-1], out_seq[t])
            scale = torch.add(torch.nn.functional.softplus(out)[:, nz:], min_std, out=scale_seq[t])
            fz = torch.addcmul(out[:, :nz], scale, eps[t].normal_(), out=z_seq[t])
            for l in range(len(z_w)):
                fz = _linear(fz, z_w[l], z_b[l], fzs[l][t]).relu_()
            gi = gates_seq[t].addmm_(fz, w_cz.t()).add_(b_cx)
            gh = hq[:, f : f + g]
            if b_h is not None:
                gh.add_(b_h[f:])
            if lstm:
                lstm_forward(gi.add_(gh), cs[t], hs[t + 1], cs[t + 1], tc_seq[t])
            else:
                ghn[t] = gh[:, 2 * d :]
                _gru_forward(gi, gh, h, hs[t + 1])
            if mask is not None:  # a padded step keeps its state
                keep = mask[:, t : t + 1]
                torch.where(keep, hs[t + 1], h, out=hs[t + 1])
                if lstm:
                    torch.where(keep, cs[t + 1], cs[t], out=cs[t + 1])


def _accumulate(dst: Tensor, a: Tensor, b: Tensor, dbias: Tensor | None = None) -> None:
    """dst += a^T b over the rows of the (n, b, .) blocks a and b; dbias += a's column sums.

    The VRNN's weight accumulators are column-major (transposed views of (in, out) tensors), so
    that ATen computes dst^T += b^T a: with MKL on the 2-core Intel Xeon VM that orientation of
    these long (n b rows) reductions ran 5-15% faster (e.g. 400 x 100 over 3584 rows: 212 vs 188
    GFLOP/s; 100 x 28: 153 vs 91), and the pass's chunk products 9.0 -> 8.5 ms at T=28."""
    a2 = a.reshape(-1, a.shape[-1])
    dst.addmm_(a2.t(), b.reshape(-1, b.shape[-1]))
    if dbias is not None:
        dbias += a2.sum(0)


def _vrnn_backward(dh_prev, dz_out, dfz_out, dloc_out, dscale_out, dh, dc, mask, fx, hs, cs, ghn, acts, fzs, out_seq,
                   eps, z_seq, gates_seq, tc_seq, d_h, dout_c, dqs, dzs, dfx, w_x, w_h, q_w, z_w, w_cz,
                   grads, lstm, has_bias, chunk) -> list[Tensor]:
    """The VRNN's backward loop (csrc/fused.cpp `vrnn_backward`, in Python), a chunk at a time from
    the end: the steps' gradients into the chunk's buffers, then the chunk's share of every
    weight's gradient (added into `grads`: see _VRNNSequence.backward) and of phi_x's (dfx).
    Returns those of h_0 (and c_0).

    A step's row of d_h is [dn r (the GRU's only) | the q-net's first layer's | the input gates']:
    its first f + g columns are the gradient of the stacked h products (w_h's rows in that
    order: for the GRU [n | q | r | u], the hidden gates' r and u gradients being the input
    gates'), its last f + g that of phi_x's products (w_x's rows), its last g the gates'."""
    steps, b, f = fx.shape
    nz, n_q, n_z, g, d = eps.shape[2], len(q_w), len(z_w), gates_seq.shape[2], hs.shape[2]
    e = d_h.shape[2] - f - g
    for s0 in reversed(range(0, steps, chunk)):
        n = min(chunk, steps - s0)
        for t in reversed(range(s0, s0 + n)):
            k = t - s0
            dh_skip = dc_skip = None
            if mask is not None:  # h_{t+1} = h_new where the step is real, h_t on padding
                keep = mask[:, t : t + 1]
                dh_skip, dh = torch.where(keep, 0.0, dh), torch.where(keep, dh, 0.0)
                if lstm:
                    dc_skip, dc = torch.where(keep, 0.0, dc), torch.where(keep, dc, 0.0)
            dgates = d_h[k, :, e + f :]
            dh_direct = None
            if lstm:
                dc = lstm_backward(dh, dc, gates_seq[t], tc_seq[t], cs[t], dgates)
                if dc_skip is not None:
                    dc = dc + dc_skip
            else:
                dh_direct = _gru_backward(dh, gates_seq[t], ghn[t], hs[t], dgates, d_h[k, :, :e])
            dfz = dgates @ w_cz if dfz_out is None else torch.addmm(dfz_out[t], dgates, w_cz)
            for i in reversed(range(n_z)):  # phi_z
                dfz = _relu_backward(dfz, fzs[i][t], dzs[i][k]) @ z_w[i]
            dz = dfz if dz_out is None else dfz + dz_out[t]
            dout = dout_c[k]  # [loc, s~]
            if dloc_out is None:
                dout[:, :nz] = dz
            else:
                torch.add(dz, dloc_out[t], out=dout[:, :nz])
            dscale = dz * eps[t] if dscale_out is None else torch.addcmul(dscale_out[t], dz, eps[t])
            torch.mul(dscale, torch.sigmoid(out_seq[t])[:, nz:], out=dout[:, nz:])  # softplus' = sigmoid
            da = dout @ q_w[-1]
            for i in reversed(range(1, n_q)):  # the q-net's hidden layers
                da = _relu_backward(da, acts[i][t], dqs[i - 1][k]) @ q_w[i - 1]
            _relu_backward(da, acts[0][t], d_h[k, :, e : e + f])
            dh = d_h[k, :, : f + g] @ w_h
            for extra in (dh_direct, dh_skip, None if dh_prev is None else dh_prev[t]):
                if extra is not None:
                    dh += extra
        # the chunk's share of the weights' gradients and of phi_x's
        d_hc, fx_c = d_h[:n], fx[s0 : s0 + n]
        dx = d_hc[:, :, e:]
        torch.mm(dx.reshape(n * b, f + g), w_x, out=dfx[s0 : s0 + n].view(n * b, f))
        _accumulate(grads[0], dx, fx_c)
        sums = d_hc.reshape(n * b, -1).sum(0)  # the biases': [b_q,x | b_cell,x], and b_hh's [r, u | n]
        grads[1] += sums[e : e + f]
        grads[2] += sums[e + f :]
        if has_bias:
            grads[4] += torch.cat([sums[e + f : e + f + 2 * d], sums[:d]])
        _accumulate(grads[3], d_hc[:, :, : f + g], hs[s0 : s0 + n])
        _accumulate(grads[5], d_hc[:, :, e + f :], fzs[-1][s0 : s0 + n])
        for i in range(n_q):
            dpre = dout_c[:n] if i == n_q - 1 else dqs[i][:n]
            _accumulate(grads[6 + 2 * i], dpre, acts[i][s0 : s0 + n], grads[7 + 2 * i])
        for i in range(n_z):
            inputs = z_seq if i == 0 else fzs[i - 1]
            _accumulate(grads[6 + 2 * n_q + 2 * i], dzs[i][:n], inputs[s0 : s0 + n], grads[7 + 2 * n_q + 2 * i])
    return [dh, dc] if lstm else [dh]


class _VRNNSequence(Function):
    """The VRNN's pass (vrnn.py's precompute from phi_x(x), then the step) over T steps with a
    hand-written backward; see the module docstring.

    Per step, with H = h_{t-1} [W_q,h; W_cell,h]^T one product (the GRU's hidden bias added to
    H_cell after it):
        q-net:  a_0 = relu(phi_x W_q,x^T + H_q + b), a_l = relu(a_{l-1} W_l^T + b_l), [loc, s~] = a_L W^T + b
        z_t = loc + (softplus(s~) + 1e-4) eps_t;  phi_z: f_l = relu(f_{l-1} W_l^T + b_l), f_0 = z_t
        gates = phi_x W_cell,x^T + phi_z(z_t) W_cell,z^T + b (+ H_cell);  the GRU or LSTM update;
        masked steps keep h.
    The phi_x products are done CHUNK steps at a time (written into the step buffers a_0 and
    gates start from; the biases are added per step), and so are the weights' gradients in the
    backward, so that only what the backward reads is kept for all T steps (the gradients of a
    step live for one chunk). The loops run in C++ where it is built (`_native`).
    """

    @staticmethod
    def forward(ctx, model, fx, h0, c0, mask, w_q, b_px, w_cell, b_cx, w_hh, b_hh, *layer_params):
        ctx.set_materialize_grads(False)
        steps, b, f = fx.shape
        d, nz, lstm, g = h0.shape[1], model.z_size, c0 is not None, w_cell.shape[0]
        # the parameters come whole (slices and concatenations made here, outside autograd, cost a
        # weight-sized zero fill and copy each in the backward); their blocks:
        w_x = torch.cat([w_q[:, :f], w_cell[:, :f]])  # the phi_x columns of the posterior's first layer and of the cell
        w_cz = w_cell[:, f : 2 * f]  # the cell's phi_z columns
        w_h = torch.cat([w_q[:, f:], w_cell[:, 2 * f :] if lstm else w_hh])  # both products of h_{t-1}, stacked
        b_h = None if lstm else torch.cat([b_hh.new_zeros(f), b_hh])  # the GRU's hidden bias, after H_cell
        n_q = len(model.posterior_net.net.layers) - 1  # the posterior's layers after the first (>= 1)
        n_z = (len(layer_params) - 2 * n_q) // 2
        chunk = min(CHUNK, steps)
        ws = _lease(model, steps, {  # first size: steps added (all T steps: what the backward reads)
            "c": (1, b, d) if lstm else (0, 0), "ghn": (0, 0) if lstm else (0, b, d),
            "xg": (0, b, f + g),  # [the q-net's first hidden activation | the cell's gates]: see _vrnn_forward
            **{f"a{i}": (0, b, f) for i in range(1, n_q)},  # the q-net's later hidden activations
            **{f"f{i}": (0, b, f) for i in range(n_z - 1)},  # phi_z's (the last is an output)
            "eps": (0, b, nz), "tc": (0, b, d) if lstm else (0, 0),
        }, fx, fixed={  # one chunk's worth
            "H": (b, f + g),
            "dH": (chunk, b, (0 if lstm else d) + f + g), "dout": (chunk, b, 2 * nz),  # dH: see _vrnn_backward
            **{f"dq{i}": (chunk, b, f) for i in range(n_q - 1)}, **{f"dz{i}": (chunk, b, f) for i in range(n_z)},
        })
        w = ws.views
        weights = [p if p.stride(-1) == 1 else p.contiguous() for p in (w_x, b_px, b_cx, w_h, w_cz, *layer_params)]
        q_w, q_b = weights[5 : 5 + 2 * n_q : 2], weights[6 : 5 + 2 * n_q : 2]
        z_w, z_b = weights[5 + 2 * n_q :: 2], weights[6 + 2 * n_q :: 2]
        new = fx.new_empty
        hs, fz = new(steps + 1, b, d), new(steps, b, f)  # outputs (h_{t-1}, phi_z(z_t)), kept for the backward
        out_seq, z_seq, scale_seq = new(steps, b, 2 * nz), new(steps, b, nz), new(steps, b, nz)
        hs[0] = h0
        if lstm:
            w["c"][0] = c0
        fx = fx.contiguous()
        acts, fzs = _acts(w, f, n_q), [w[f"f{i}"] for i in range(n_z - 1)] + [fz]
        native = _native()
        args = (fx, mask, hs, w["c"], w["ghn"], acts, fzs, out_seq, scale_seq, w["eps"], z_seq, w["xg"],
                w["xg"][..., f:], w["tc"], w["H"], *weights[:4], b_h, q_w, q_b, z_w, z_b, weights[4], lstm, MIN_STD, chunk)
        blocks = _blocks(b) if native is not None else 1  # C++: the batch in blocks of rows, one thread each
        if native is not None:
            native.vrnn_forward(*args, blocks)
        else:
            _vrnn_forward(*args)
        _guard(ctx, (w_q, b_px, w_cell, b_cx, w_hh, b_hh, *layer_params))
        ctx.model, ctx.ws, ctx.generation, ctx.native = model, ws, ws.generation, native
        ctx.dims = (n_q, n_z, lstm, b_h is not None, chunk, blocks)
        ctx.weights = weights
        ctx.save_for_backward(mask, fx, hs, fz, out_seq, z_seq)
        c_last = w["c"][steps].clone() if lstm else h0.new_empty(0)
        return hs[:steps], z_seq, fz, out_seq[:, :, :nz], scale_seq, hs[steps], c_last

    @staticmethod
    @first_order_only
    def backward(ctx, dh_prev, dz_out, dfz_out, dloc_out, dscale_out, dh, dc):
        _check_lease(ctx)
        model, ws, w = ctx.model, ctx.ws, ctx.ws.views
        n_q, n_z, lstm, has_bias, chunk, blocks = ctx.dims
        mask, fx, hs, fz, out_seq, z_seq = ctx.saved_tensors
        weights = ctx.weights
        b, d = hs.shape[1], hs.shape[2]
        f = fx.shape[2]
        acts, fzs = _acts(w, f, n_q), [w[f"f{i}"] for i in range(n_z - 1)] + [fz]
        dqs, dzs = [w[f"dq{i}"] for i in range(n_q - 1)], [w[f"dz{i}"] for i in range(n_z)]
        dh = hs.new_zeros(b, d) if dh is None else dh
        dc = (hs.new_zeros(b, d) if dc is None else dc) if lstm else hs.new_empty(0)
        w_x, w_h, w_cz = weights[0], weights[3], weights[4]
        if not lstm:  # dH's order for the GRU: [n | q | r | u] (see _vrnn_backward)
            w_h = torch.cat([w_h[f + 2 * d :], w_h[: f + 2 * d]])
        # accumulators: W_x, b_q,x, b_cell,x, W_h, b_hh, W_cell,z, then each layer's (W, b)
        def zeros(p):  # a weight's (2-D) accumulator column-major: see _accumulate
            return p.new_zeros(p.shape[::-1]).t() if p.dim() == 2 else torch.zeros_like(p)

        grads = [zeros(p) for p in (w_x, *weights[1:3], w_h)] + [hs.new_zeros(0 if lstm else w_h.shape[0] - f)]
        grads += [zeros(p) for p in weights[4:]]
        dfx = torch.empty_like(fx)
        args = (dh_prev, dz_out, dfz_out, dloc_out, dscale_out, dh, dc, mask, fx, hs, w["c"], w["ghn"], acts, fzs,
                out_seq, w["eps"], z_seq, w["xg"][..., f:], w["tc"], w["dH"], w["dout"], dqs, dzs, dfx,
                w_x, w_h, weights[5 : 5 + 2 * n_q : 2], weights[5 + 2 * n_q :: 2], w_cz, grads, lstm, has_bias, chunk)
        first = ctx.native.vrnn_backward(*args, blocks) if ctx.native is not None else _vrnn_backward(*args)
        _release(model, ws)
        # the whole parameters' gradients from their blocks' (column-major, as the accumulators)
        g_x, g_h = grads[0], grads[3]
        g_hq = g_h[:f] if lstm else g_h[d : d + f]
        g_hc = g_h[f:] if lstm else torch.cat([g_h[d + f :], g_h[:d]])  # the cell's, in its order
        g_q = torch.cat([g_x[:f], g_hq], 1)  # [phi_x | h] columns of the posterior's first layer
        g_cell = torch.cat([g_x[f:], grads[5], *([g_hc] if lstm else [])], 1)  # [phi_x | phi_z (| h)]
        return (None, dfx, first[0], first[1] if lstm else None, None, g_q, grads[1], g_cell, grads[2],
                None if lstm else g_hc, grads[4] if has_bias else None, *grads[6:])


def _acts(w: dict, f: int, n_q: int) -> list[Tensor]:
    """The q-net's hidden activations in a VRNN pass's workspace: the first is xg's first f columns."""
    return [w["xg"][..., :f]] + [w[f"a{i}"] for i in range(1, n_q)]


def vrnn_params(model) -> tuple:
    """The parameters the VRNN's pass takes: the posterior's first layer (W, b), the cell's input
    weights and bias (GRU: W_ih [phi_x, phi_z], b_ih; LSTM: one W over [phi_x, phi_z, h] and its
    bias), the GRU's W_hh and b_hh (None for an LSTM), then (W, b) of the posterior's later layers
    and of phi_z's."""
    cell = model.cell
    q_first = model.posterior_net.net.layers[0]
    if hasattr(cell, "hh"):
        w_cell, b_cell, w_hh, b_hh = cell.ih.weight, cell.ih.bias, cell.hh.weight, cell.hh.bias
    else:
        w_cell, b_cell, w_hh, b_hh = cell.linear.weight, cell.linear.bias, None, None
    layers = [p for layer in list(model.posterior_net.net.layers[1:]) + list(model.phi_z.layers)
              for p in (layer.weight, layer.bias)]
    return (q_first.weight, q_first.bias, w_cell, b_cell, w_hh, b_hh, *layers)


def vrnn_unroll(model, fx: Tensor, state, mask: Tensor | None, params: tuple | None = None) -> tuple[Tensor, ...]:
    """The VRNN's pass from phi_x(x) (t, b, f) as one Function: h_{t-1}, z_t, phi_z(z_t), loc_t,
    scale_t stacked (t, b, ...), and the final h (and c, for an LSTM). params: vrnn_params(model)."""
    params = vrnn_params(model) if params is None else params
    return _VRNNSequence.apply(model, fx, state.h, state.c, mask, *params)

"""Whole-sequence kernels: a model's time loop as one autograd Function with a hand-written backward.

Dimensions: t steps, b batch, d hidden units, z latent units, g gate pre-activations (4d for
an LSTM, 3d for a GRU), n glimpse size, s pixels along an image axis, c channels.

`recurrent.unroll` runs a model's `step` T times and lets autograd record every operation of
every step. On a CPU that recording, and replaying it backwards, costs more than the
arithmetic for the small tensors of a recurrent model (a DRAW glimpse or a VRNN step is a few
dozen operations on 64-128 rows). Here a model's whole pass is one `torch.autograd.Function`:

  * forward: the same operations as the model's step, in the same order (so that the values,
    and the random numbers drawn, are the step loop's), under no autograd, writing into
    buffers allocated once per sequence; products that read the same state are one product
    over the weights side by side (DRAW: the write head of step t and the read head, the
    encoder and the decoder of step t+1 all read h^dec_t);
  * backward: the steps in reverse, each written out by hand (the LSTM and GRU updates, the
    posterior's reparameterisation, the filterbank read and write heads: softmax, Gaussian
    filters, attention parameters), with only the gradients of the inputs per step; every
    weight's gradient is one product over all steps at the end.

The model's `fused_unroll(x, state, mask)` (the recurrent contract's hook) returns the step
outputs stacked over time and the final state, the same as the step loop's; `score` then runs
as usual on them, with autograd. `recurrent.unroll` calls the hook when gradients are wanted,
on a CPU in float32 or float64, outside torch.compile and autocast, with no `between`
(FIVO) and no kept states; anywhere else (or with SEQVAE_FUSED=0) the step loop runs.
The tests compare values and every gradient with the step loop's (1e-5 relative).

The maths of each backward, in the forward's notation:
  LSTM  (i, f, o) = sigmoid(.), u = tanh(.), c' = f c + i u, h' = o tanh(c'):
        dc' += dh' o (1 - tanh(c')^2); di = dc' u; df = dc' c; do = dh' tanh(c'); du = dc' i;
        dc = dc' f; the pre-activations' gradients through sigmoid' = s (1 - s), tanh' = 1 - u^2.
  GRU   r, k = sigmoid(gi_rk + gh_rk), n = tanh(gi_n + r gh_n), h' = n + k (h - n):
        dn = dh' (1 - k); dk = dh' (h - n); dh = dh' k; dn_pre = dn (1 - n^2);
        dr = dn_pre gh_n; dgh_n = dn_pre r.
  softmax F = softmax(l): dl = F (dF - sum(dF F)).
  filters l = -(a - mu)^2 / (2 sigma^2): dmu = sum_a dl 2 (a - mu) / (2 sigma^2) ... (see `_filters_backward`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from . import gemm

__all__ = ["enabled", "draw_unroll"]


def enabled(x: Tensor, *params: Tensor) -> bool:
    """Whether a whole-sequence kernel applies: training-time gradients on a CPU in float32/64,
    outside torch.compile and autocast, x needing no gradient, and not switched off."""
    return (
        torch.is_grad_enabled()
        and os.environ.get("SEQVAE_FUSED", "1") != "0"
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not x.requires_grad
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and all(p.dtype == x.dtype and p.device.type == "cpu" for p in params)
    )


class _Product:
    """y = x W^T (+ b) for a fixed weight, with the kernel gemm.py measured fastest for the shape."""

    def __init__(self, rows: int, weight: Tensor, bias: Tensor | None = None):
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        probe = torch.empty(rows, self.weight.shape[1], dtype=weight.dtype)
        self.kernel = gemm.choose(probe, self.weight, self.bias)

    def __call__(self, x: Tensor, extra: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        if self.kernel == "aten" or (extra is not None):
            if extra is not None:
                bias = extra if self.bias is None else extra + self.bias
                return torch.addmm(bias, x, self.weight.t(), out=out) if out is not None else torch.addmm(bias, x, self.weight.t())
            if self.bias is None:
                return torch.mm(x, self.weight.t(), out=out) if out is not None else torch.mm(x, self.weight.t())
            return torch.addmm(self.bias, x, self.weight.t(), out=out) if out is not None else torch.addmm(self.bias, x, self.weight.t())
        y = gemm._run(self.kernel, x, self.weight, self.bias)
        if out is not None:
            out.copy_(y)
            return out
        return y


# ---------------------------------------------------------------------------------------- cells
def lstm_forward(gates: Tensor, c: Tensor, h_out: Tensor, c_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """cells.lstm_update into h_out, c_out; returns what the backward needs: sigmoid(i, f, o), tanh(u), tanh(c')."""
    d = c.shape[-1]
    sig = torch.sigmoid(gates[:, : 3 * d])
    u = torch.tanh(gates[:, 3 * d :])
    i, f, o = sig.chunk(3, dim=-1)
    torch.addcmul(f * c, i, u, out=c_out)
    tc = torch.tanh(c_out)
    torch.mul(o, tc, out=h_out)
    return sig, u, tc


def lstm_backward(dh: Tensor, dc: Tensor, saved: tuple[Tensor, Tensor, Tensor], c: Tensor, dgates: Tensor) -> Tensor:
    """Gradients of an LSTM update: the pre-activations' into dgates (b, 4d); returns dc of the old c."""
    sig, u, tc = saved
    d = c.shape[-1]
    i, f, o = sig.chunk(3, dim=-1)
    dc = torch.addcmul(dc, dh * o, 1 - tc * tc)  # through h' = o tanh(c')
    dsig = dgates[:, : 3 * d]
    torch.mul(dc, u, out=dsig[:, :d])
    torch.mul(dc, c, out=dsig[:, d : 2 * d])
    torch.mul(dh, tc, out=dsig[:, 2 * d :])
    dsig.mul_(sig - sig * sig)
    torch.mul(dc * i, 1 - u * u, out=dgates[:, 3 * d :])
    return dc * f


def _grad(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


# ------------------------------------------------------------------------------------------ DRAW
class _DrawSequence(Function):
    """DRAW's T glimpses (draw.py, eqs 3-8) with a hand-written backward; see the module docstring.

    Weights side by side: W_A = [W_write; W_enc[:, hdec]; W_dec[:, hdec]; W_read] (rows) maps
    h^dec_t to the write head's output of step t and the encoder's, decoder's and read head's
    h^dec parts of step t+1 (with their biases), one product per step forwards and backwards.
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
        enc_rows, dec_rows = slice(nw, nw + 4 * d), slice(nw + 4 * d, nw + 8 * d)
        read_rows = slice(nw + 8 * d, nw + 8 * d + 5)
        w_a = torch.cat([ww, we[:, nr : nr + d], wd[:, nz:]] + ([wr] if read_fb else []))
        b_a = torch.cat([bw, be, bd] + ([br] if read_fb else []))
        prod_a, prod_write = _Product(b, w_a, b_a), _Product(b, ww, bw)
        prod_enc = _Product(b, torch.cat([we[:, :nr], we[:, nr + d :]], dim=1))  # [r, h^enc] columns
        prod_q, prod_dz = _Product(b, wq, bq), _Product(b, wd[:, :nz])
        n_a = w_a.shape[0]

        x = x.contiguous()
        a_seq = x.new_empty(steps + 1, b, n_a)  # A_t from h^dec_t
        enc_in = x.new_empty(steps + 1, b, nr + d)  # row t: [r_{t+1}, h^enc_t]
        ce_seq, hd_seq, cd_seq = (x.new_empty(steps + 1, b, d) for _ in range(3))
        q_seq, z_seq, eps = x.new_empty(steps, b, 2 * nz), x.new_empty(steps, b, nz), x.new_empty(steps, b, nz)
        m_seq = x.new_empty(steps, b, c, hh, wi)  # sigmoid of the canvas' mean channels before step t
        enc_in[0, :, nr:] = he0
        ce_seq[0], hd_seq[0], cd_seq[0] = ce0, hd0, cd0
        if read_fb:  # the glimpse's input laid out (b, h, 2c, w): x, then the error image
            v_seq = x.new_empty(steps, b, hh, 2 * c, wi)
            v_seq[:, :, :, :c] = x.transpose(1, 2)
            xhat_views = v_seq[:, :, :, c:].transpose(2, 3)  # (t, b, c, h, w) views
        prod_a(hd_seq[0], out=a_seq[0])
        canvas = canvas0
        saved_enc, saved_dec, saved_read, saved_write = [], [], [], []
        for t in range(steps):
            a = a_seq[t]
            mean = torch.sigmoid(canvas[:, :c], out=m_seq[t])
            if read_fb:
                torch.sub(x, mean, out=xhat_views[t])
                fy, fx, att, fsaved = read.filters.forward_saving(a[:, read_rows])
                v = v_seq[t].view(b, hh, 2 * c * wi)
                u = torch.bmm(fy, v)  # (b, n, 2c w)
                r0 = torch.bmm(u.view(b, -1, wi), fx.transpose(1, 2))  # (b, n 2c, n)
                torch.mul(r0.view(b, -1), att.gamma.unsqueeze(-1), out=enc_in[t, :, :nr])
                saved_read.append((fy, fx, att.gamma, fsaved, u, r0))
            else:
                enc_in[t, :, : c * hh * wi] = x.flatten(1)
                torch.sub(x.flatten(1), mean.flatten(1), out=enc_in[t, :, c * hh * wi : nr])
            gates = prod_enc(enc_in[t], extra=a[:, enc_rows])
            saved_enc.append(lstm_forward(gates, ce_seq[t], enc_in[t + 1, :, nr:], ce_seq[t + 1]))
            q = prod_q(enc_in[t + 1, :, nr:], out=q_seq[t])
            scale = q[:, nz:].exp()
            torch.randn(b, nz, out=eps[t])
            z = torch.addcmul(q[:, :nz], scale, eps[t], out=z_seq[t])
            gates = prod_dz(z, extra=a[:, dec_rows])
            saved_dec.append(lstm_forward(gates, cd_seq[t], hd_seq[t + 1], cd_seq[t + 1]))
            a = (prod_a if t + 1 < steps else prod_write)(hd_seq[t + 1], out=a_seq[t + 1] if t + 1 < steps else a_seq[t + 1, :, :nw])
            if write_fb:
                patch, raw = a[:, : write.patch_size], a[:, write.patch_size : write.patch_size + 5]
                fy, fx, att, fsaved = write.filters.forward_saving(raw)
                pm = patch / att.gamma.unsqueeze(-1)  # (b, c n n)
                u = torch.bmm(pm.view(b, -1, write.n), fx)  # (b, c n, w)
                update = _paste(fy, u, write.channels)
                saved_write.append((fy, fx, att.gamma, fsaved, pm, u))
            else:
                update = a[:, :nw].view(canvas.shape)
            canvas = canvas + update
        ctx.model, ctx.dims = model, (steps, b, d, nz, c, hh, wi, nr, nw, n_a, read_fb, write_fb)
        ctx.prods = (prod_a, prod_enc, prod_q, prod_dz)
        ctx.saved = (saved_enc, saved_dec, saved_read, saved_write)
        ctx.save_for_backward(x, a_seq, enc_in, ce_seq, hd_seq, cd_seq, q_seq, z_seq, eps, m_seq,
                              v_seq if read_fb else None)
        raw_read = a_seq[:steps, :, read_rows] if read_fb else x.new_empty(0)
        raw_write = a_seq[1:, :, write.patch_size : write.patch_size + 5] if write_fb else x.new_empty(0)
        ctx.mark_non_differentiable(*([] if read_fb else [raw_read]), *([] if write_fb else [raw_write]))
        return (canvas, enc_in[steps, :, nr:], ce_seq[steps], hd_seq[steps], cd_seq[steps], q_seq, z_seq,
                raw_read, raw_write)

    @staticmethod
    def backward(ctx, dcanvas, dhe, dce, dhd, dcd, dq_out, dz_out, draw_read, draw_write):
        model = ctx.model
        steps, b, d, nz, c, hh, wi, nr, nw, n_a, read_fb, write_fb = ctx.dims
        prod_a, prod_enc, prod_q, prod_dz = ctx.prods
        saved_enc, saved_dec, saved_read, saved_write = ctx.saved
        x, a_seq, enc_in, ce_seq, hd_seq, cd_seq, q_seq, z_seq, eps, m_seq, v_seq = ctx.saved_tensors
        read, write = model.read_head, model.write_head
        enc_rows, dec_rows = slice(nw, nw + 4 * d), slice(nw + 4 * d, nw + 8 * d)
        read_rows = slice(nw + 8 * d, nw + 8 * d + 5)
        # transposed weights, contiguous, for the inputs' gradients: g (b, out) @ W (out, in)
        back_a = _Product(b, prod_a.weight.t())
        back_enc = _Product(b, prod_enc.weight.t())
        back_q, back_dz = _Product(b, prod_q.weight.t()), _Product(b, prod_dz.weight.t())

        pc = model.canvas0.shape[0]
        dcanvas = x.new_zeros(b, pc, hh, wi) if dcanvas is None else dcanvas.contiguous().clone()
        dhe = _grad(dhe, ce_seq[0]).clone()
        dce = _grad(dce, ce_seq[0]).clone()
        dcd = _grad(dcd, ce_seq[0]).clone()
        dhd_final = dhd
        da_seq = x.new_zeros(steps + 1, b, n_a)  # gradients of A_t
        dq_seq = x.new_empty(steps, b, 2 * nz)
        for t in reversed(range(steps)):
            da = da_seq[t + 1]
            if write_fb:  # the write of step t (from h^dec_{t+1})
                fy, fx, gamma, fsaved, pm, u = saved_write[t]
                dfy, du = _paste_backward(fy, u, dcanvas, write.channels)
                dpm = torch.bmm(du, fx.transpose(1, 2)).view(b, -1)  # (b, c n n)
                dfx = torch.bmm(pm.view(b, -1, write.n).transpose(1, 2), du)  # (b, n, w)
                dgamma = -(dpm * pm).sum(1) / gamma
                torch.div(dpm, gamma.unsqueeze(-1), out=da[:, : write.patch_size])
                draw = write.filters.backward(fsaved, dfy, dfx, dgamma)
                if draw_write is not None:
                    draw = draw + draw_write[t]
                da[:, write.patch_size : write.patch_size + 5] = draw
            else:
                da[:, :nw] = dcanvas.view(b, -1)
            dhd = back_a(da)  # h^dec_{t+1}'s gradient from everything that read it
            if t + 1 == steps and dhd_final is not None:
                dhd = dhd + dhd_final
            # decoder
            dgates = da_seq[t, :, dec_rows]
            dcd = lstm_backward(dhd, dcd, saved_dec[t], cd_seq[t], dgates)
            dz = back_dz(dgates)
            if dz_out is not None:
                dz = dz + dz_out[t]
            # posterior: z = loc + exp(log_scale) eps
            dq = dq_seq[t]
            dq[:, :nz] = dz
            torch.mul(dz * eps[t], q_seq[t, :, nz:].exp(), out=dq[:, nz:])
            if dq_out is not None:
                dq += dq_out[t]
            dhe = back_q(dq, extra=dhe)
            # encoder
            dgates = da_seq[t, :, enc_rows]
            dce = lstm_backward(dhe, dce, saved_enc[t], ce_seq[t], dgates)
            dinp = back_enc(dgates)  # (b, R + d): [r, h^enc_t-1]
            dhe = dinp[:, nr:]
            dr = dinp[:, :nr]
            mean = m_seq[t]
            if read_fb:
                fy, fx, gamma, fsaved, u, r0 = saved_read[t]
                dgamma = (dr * r0.view(b, -1)).sum(1)
                dr0 = (dr * gamma.unsqueeze(-1)).view(b, -1, read.n)  # (b, n 2c, n)
                du = torch.bmm(dr0, fx).view(b, read.n, -1)  # (b, n, 2c w)
                dfx = torch.bmm(dr0.transpose(1, 2), u.view(b, -1, wi))  # (b, n, w)
                v = v_seq[t].view(b, hh, -1)
                dfy = torch.bmm(du, v.transpose(1, 2))  # (b, n, h)
                dv = torch.bmm(fy.transpose(1, 2), du).view(b, hh, 2 * c, wi)
                dxhat = dv[:, :, c:].transpose(1, 2)  # (b, c, h, w)
                draw = read.filters.backward(fsaved, dfy, dfx, dgamma)
                if draw_read is not None:
                    draw = draw + draw_read[t]
                da_seq[t, :, read_rows] = draw
            else:
                dxhat = dr[:, c * hh * wi :].view(b, c, hh, wi)
            # x^ = x - sigmoid(canvas): the canvas' mean channels
            dcanvas[:, :c] -= dxhat * (mean - mean * mean)
        dhd0 = back_a(da_seq[0])
        # every weight's gradient: one product over all steps
        flat = lambda s: s.reshape(-1, s.shape[-1])  # noqa: E731
        da_flat = flat(da_seq)
        dw_a = da_flat.t() @ flat(hd_seq)
        db_a = da_flat.sum(0)
        dgates_enc = flat(da_seq[:steps, :, enc_rows])
        dw_enc = dgates_enc.t() @ flat(enc_in[:steps])  # (4d, R + d)
        dwq = flat(dq_seq).t() @ flat(enc_in[1:, :, nr:])
        dbq = flat(dq_seq).sum(0)
        dwdz = flat(da_seq[:steps, :, dec_rows]).t() @ flat(z_seq)
        dwe = torch.cat([dw_enc[:, :nr], dw_a[enc_rows], dw_enc[:, nr:]], dim=1)
        dwd = torch.cat([dwdz, dw_a[dec_rows]], dim=1)
        dwr, dbr = (dw_a[read_rows], db_a[read_rows]) if read_fb else (None, None)
        return (None, None, dcanvas, dhe, dce, dhd0, dcd,
                dwe, db_a[enc_rows], dwq, dbq, dwd, db_a[dec_rows], dwr, dbr, dw_a[:nw], db_a[:nw])


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


def draw_unroll(model, x: Tensor, state) -> tuple[Any, Any]:
    """DRAW's pass over x from `state` as one Function: (outs stacked (b, t, ...), final state)."""
    from .draw import DrawState, DrawStep  # the model's own types (draw.py imports this module)

    read, write = model.read_head, model.write_head
    wr, br = (read.to_params.weight, read.to_params.bias) if hasattr(read, "to_params") else (None, None)
    wlin = write.proj if hasattr(write, "proj") else write.to_canvas
    canvas, he, ce, hd, cd, q, z, raw_read, raw_write = _DrawSequence.apply(
        model, x, *state, model.encoder.linear.weight, model.encoder.linear.bias,
        model.posterior_net.weight, model.posterior_net.bias, model.decoder.linear.weight,
        model.decoder.linear.bias, wr, br, wlin.weight, wlin.bias,
    )
    loc, log_scale = q.transpose(0, 1).chunk(2, dim=-1)  # (b, t, z) views, as the step loop's stacking
    read_att = read.filters.params(raw_read.transpose(0, 1)) if wr is not None else None
    write_att = write.filters.params(raw_write.transpose(0, 1)) if hasattr(write, "filters") else None
    outs = DrawStep(z.transpose(0, 1), loc, log_scale.exp(), read_att, write_att)
    return outs, DrawState(canvas, he, ce, hd, cd)

// The time loops of seqvae/fused.py in C++ (the same operations, in the same order): on a
// CPU the Python interpreter's cost per operation is of the order of the operations
// themselves for a recurrent model's small tensors. Built on first use by
// torch.utils.cpp_extension (fused.py `_native`); where it cannot be built, fused.py runs
// the same loops in Python. Buffers are allocated and leased by fused.py; these functions
// only fill them. Shapes: t steps, b batch, d hidden, f features, g gates, z latents.

#include <torch/extension.h>

#include <vector>

using at::Tensor;

namespace {

// an lvalue for ATen's out= functions, whose out argument is Tensor&
inline Tensor& lv(Tensor&& t) { return t; }

// d(tanh) and d(sigmoid) from their outputs, and the GRU and LSTM updates (cells.py)

void gru_forward(Tensor gi, const Tensor& gh, const Tensor& h, Tensor h_out) {
  const int64_t d = h.size(1);
  Tensor ru = gi.narrow(1, 0, 2 * d);
  ru.add_(gh.narrow(1, 0, 2 * d)).sigmoid_();
  Tensor n = gi.narrow(1, 2 * d, d);
  n.addcmul_(ru.narrow(1, 0, d), gh.narrow(1, 2 * d, d)).tanh_();
  at::lerp_out(h_out, n, h, ru.narrow(1, d, d));
}

// returns the gradient of h through h' = n + u (h - n); dgi, dgh (b, 3d) filled
Tensor gru_backward(const Tensor& dh, const Tensor& acts, const Tensor& gh, const Tensor& h, Tensor dgi, Tensor dgh) {
  const int64_t d = h.size(1);
  Tensor r = acts.narrow(1, 0, d), u = acts.narrow(1, d, d), n = acts.narrow(1, 2 * d, d);
  Tensor dn = dgi.narrow(1, 2 * d, d);
  at::mul_out(dn, dh - dh * u, 1 - n * n);
  at::mul_out(lv(dgh.narrow(1, 2 * d, d)), dn, r);
  at::mul_out(lv(dgi.narrow(1, 0, d)), dn, gh.narrow(1, 2 * d, d));
  at::mul_out(lv(dgi.narrow(1, d, d)), dh, h - n);
  Tensor ru = acts.narrow(1, 0, 2 * d);
  dgi.narrow(1, 0, 2 * d).mul_(ru - ru * ru);
  dgh.narrow(1, 0, 2 * d).copy_(dgi.narrow(1, 0, 2 * d));
  return dh * u;
}

void lstm_forward(Tensor gates, const Tensor& c, Tensor h_out, Tensor c_out, Tensor tc_out) {
  const int64_t d = c.size(1);
  Tensor sig = gates.narrow(1, 0, 3 * d).sigmoid_();
  Tensor u = gates.narrow(1, 3 * d, d).tanh_();
  at::addcmul_out(c_out, sig.narrow(1, d, d) * c, sig.narrow(1, 0, d), u);
  at::tanh_out(tc_out, c_out);
  at::mul_out(h_out, sig.narrow(1, 2 * d, d), tc_out);
}

Tensor lstm_backward(const Tensor& dh, const Tensor& dc_in, const Tensor& acts, const Tensor& tc, const Tensor& c, Tensor dgates) {
  const int64_t d = c.size(1);
  Tensor sig = acts.narrow(1, 0, 3 * d), u = acts.narrow(1, 3 * d, d);
  Tensor i = sig.narrow(1, 0, d), f = sig.narrow(1, d, d), o = sig.narrow(1, 2 * d, d);
  Tensor dc = at::addcmul(dc_in, dh * o, 1 - tc * tc);
  Tensor dsig = dgates.narrow(1, 0, 3 * d);
  at::mul_out(lv(dsig.narrow(1, 0, d)), dc, u);
  at::mul_out(lv(dsig.narrow(1, d, d)), dc, c);
  at::mul_out(lv(dsig.narrow(1, 2 * d, d)), dh, tc);
  dsig.mul_(sig - sig * sig);
  at::mul_out(lv(dgates.narrow(1, 3 * d, d)), dc * i, 1 - u * u);
  return dc * f;
}

inline void affine_into(Tensor out, const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  if (b.has_value()) {
    at::addmm_out(out, *b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

inline Tensor relu_backward(const Tensor& grad, const Tensor& out, Tensor into) {
  return at::threshold_backward_out(into, grad, out, 0);
}

}  // namespace

// The VRNN's forward over all steps (fused.py _VRNNSequence.forward).
void vrnn_forward(const Tensor& post_x, const Tensor& cell_x, const c10::optional<Tensor>& mask, Tensor hs, Tensor cs,
                  Tensor big_h, std::vector<Tensor> acts, std::vector<Tensor> fzs, Tensor out_seq, Tensor scale_seq,
                  Tensor eps, Tensor z_seq, Tensor gates_seq, Tensor tc_seq, const Tensor& w_h,
                  const c10::optional<Tensor>& b_h, std::vector<Tensor> q_w, std::vector<Tensor> q_b,
                  std::vector<Tensor> z_w, std::vector<Tensor> z_b, const Tensor& w_cz, bool lstm, double min_std) {
  const int64_t steps = post_x.size(0), f = post_x.size(2), nz = eps.size(2), g = cell_x.size(2);
  const size_t n_q = q_w.size();
  for (int64_t t = 0; t < steps; ++t) {
    Tensor h = hs[t];
    Tensor hq = big_h[t];
    affine_into(hq, h, w_h, b_h);
    Tensor a = acts[0][t];
    at::add_out(a, post_x[t], hq.narrow(1, 0, f)).relu_();
    for (size_t i = 1; i < n_q; ++i) {
      Tensor ai = acts[i][t];
      affine_into(ai, a, q_w[i - 1], q_b[i - 1]);
      a = ai.relu_();
    }
    Tensor out = out_seq[t];
    affine_into(out, a, q_w[n_q - 1], q_b[n_q - 1]);
    Tensor scale = scale_seq[t];
    at::softplus_out(scale, out.narrow(1, nz, nz), 1, 20).add_(min_std);
    Tensor e = eps[t];
    e.normal_();
    Tensor fz = z_seq[t];
    at::addcmul_out(fz, out.narrow(1, 0, nz), scale, e);
    for (size_t l = 0; l < z_w.size(); ++l) {
      Tensor fl = fzs[l][t];
      affine_into(fl, fz, z_w[l], z_b[l]);
      fz = fl.relu_();
    }
    Tensor gi = gates_seq[t];
    at::addmm_out(gi, cell_x[t], fz, w_cz.t());
    Tensor gh = hq.narrow(1, f, g);
    if (lstm) {
      lstm_forward(gi.add_(gh), cs[t], hs[t + 1], cs[t + 1], tc_seq[t]);
    } else {
      gru_forward(gi, gh, h, hs[t + 1]);
    }
    if (mask.has_value()) {  // a padded step keeps its state
      Tensor keep = mask->select(1, t).unsqueeze(1);
      Tensor next = hs[t + 1];
      at::where_out(next, keep, next, h);
      if (lstm) {
        Tensor cn = cs[t + 1];
        at::where_out(cn, keep, cn, cs[t]);
      }
    }
  }
}

// The VRNN's backward over all steps (fused.py _VRNNSequence.backward, the loop): fills the
// gradients of the products' outputs per step; returns the gradients of h_0 (and c_0).
std::vector<Tensor> vrnn_backward(const c10::optional<Tensor>& dh_prev, const c10::optional<Tensor>& dz_out,
                                  const c10::optional<Tensor>& dfz_out, const c10::optional<Tensor>& dloc_out,
                                  const c10::optional<Tensor>& dscale_out, Tensor dh, Tensor dc,
                                  const c10::optional<Tensor>& mask, Tensor hs, Tensor cs, Tensor big_h,
                                  std::vector<Tensor> acts, std::vector<Tensor> fzs, Tensor out_seq, Tensor eps,
                                  Tensor gates_seq, Tensor tc_seq, Tensor d_h, Tensor dgates_seq, Tensor dout_seq,
                                  std::vector<Tensor> dqs, std::vector<Tensor> dzs, const Tensor& w_h,
                                  std::vector<Tensor> q_w, std::vector<Tensor> z_w, const Tensor& w_cz, bool lstm) {
  const int64_t steps = out_seq.size(0), nz = eps.size(2), f = acts[0].size(2);
  const int64_t n_q = q_w.size(), n_z = z_w.size();
  for (int64_t t = steps - 1; t >= 0; --t) {
    Tensor dh_skip, dc_skip;
    if (mask.has_value()) {  // h_{t+1} = h_new where the step is real, h_t on padding
      Tensor keep = mask->select(1, t).unsqueeze(1);
      dh_skip = at::where(keep, 0.0, dh);
      dh = at::where(keep, dh, 0.0);
      if (lstm) {
        dc_skip = at::where(keep, 0.0, dc);
        dc = at::where(keep, dc, 0.0);
      }
    }
    Tensor dgates = dgates_seq[t];
    Tensor dgh = d_h[t].narrow(1, f, d_h.size(2) - f);
    Tensor dh_direct;
    if (lstm) {
      dc = lstm_backward(dh, dc, gates_seq[t], tc_seq[t], cs[t], dgates);
      if (mask.has_value()) dc = dc + dc_skip;
      dgh.copy_(dgates);
    } else {
      dh_direct = gru_backward(dh, gates_seq[t], big_h[t].narrow(1, f, d_h.size(2) - f), hs[t], dgates, dgh);
    }
    Tensor dfz = dfz_out.has_value() ? at::addmm((*dfz_out)[t], dgates, w_cz) : at::mm(dgates, w_cz);
    for (int64_t i = n_z - 1; i >= 0; --i) {  // phi_z
      dfz = at::mm(relu_backward(dfz, fzs[i][t], dzs[i][t]), z_w[i]);
    }
    Tensor dz = dz_out.has_value() ? dfz + (*dz_out)[t] : dfz;
    Tensor dout = dout_seq[t];  // [loc, s~]
    if (dloc_out.has_value()) {
      at::add_out(lv(dout.narrow(1, 0, nz)), dz, (*dloc_out)[t]);
    } else {
      dout.narrow(1, 0, nz).copy_(dz);
    }
    Tensor dscale = dscale_out.has_value() ? at::addcmul((*dscale_out)[t], dz, eps[t]) : dz * eps[t];
    at::mul_out(lv(dout.narrow(1, nz, nz)), dscale, at::sigmoid(out_seq[t].narrow(1, nz, nz)));  // softplus' = sigmoid
    Tensor da = at::mm(dout, q_w[n_q - 1]);
    for (int64_t i = n_q - 1; i >= 1; --i) {  // the q-net's hidden layers
      da = at::mm(relu_backward(da, acts[i][t], dqs[i - 1][t]), q_w[i - 1]);
    }
    relu_backward(da, acts[0][t], d_h[t].narrow(1, 0, f));
    dh = at::mm(d_h[t], w_h);
    if (dh_direct.defined()) dh.add_(dh_direct);
    if (dh_skip.defined()) dh.add_(dh_skip);
    if (dh_prev.has_value()) dh.add_((*dh_prev)[t]);
  }
  if (lstm) return {dh, dc};
  return {dh};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vrnn_forward", &vrnn_forward);
  m.def("vrnn_backward", &vrnn_backward);
}

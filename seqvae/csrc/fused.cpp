// The time loops of seqvae/fused.py in C++ (the same operations, in the same order): on a
// CPU the Python interpreter's cost per operation is of the order of the operations
// themselves for a recurrent model's small tensors. Built on first use by
// torch.utils.cpp_extension (fused.py `_native`); where it cannot be built, fused.py runs
// the same loops in Python. Buffers are allocated and leased by fused.py; these functions
// only fill them. Shapes: t steps, b batch, d hidden, f features, g gates, z latents.

#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <initializer_list>
#include <cstring>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

using at::Tensor;

namespace {

// an lvalue for ATen's out= functions, whose out argument is Tensor&
inline Tensor& lv(Tensor&& t) { return t; }

// The GRU and LSTM updates (cells.py) and their backward, each as one pass over the elements
// (ATen would take 5-10 operations, several on strided column blocks, each a separate pass).
// Rows (the batch) may be strided; within a row the units are contiguous. float: exp by a
// Cephes-style polynomial (relative error ~2e-7) that the compiler vectorizes; double: std::exp.

// always inlined: a call per element stops the loops around it from being vectorized (gcc
// stopped inlining exp_ once the file grew: a 64-row VRNN forward step took ~100 us longer)
#define SEQVAE_INLINE inline __attribute__((always_inline))

// for (int64_t j = 0; j < n; ++j) { body }, vectorized: the units up to the last multiple of 16
// in one loop, the rest in a second of vectors of at most 4 (gcc 12 runs the remainder after a
// loop's last whole vector one unit at a time: with 16-float vectors a row of 100 units ends in
// 4 scalar iterations, which took a quarter of a 64-row GRU step, 18.1 against 13.2 us measured)
#define SEQVAE_UNITS(j, n, ...)                                                       \
  {                                                                                   \
    const int64_t seqvae_whole_ = (n) & ~int64_t(15);                                 \
    _Pragma("omp simd") for (int64_t j = 0; j < seqvae_whole_; ++j) __VA_ARGS__       \
    _Pragma("omp simd safelen(4)") for (int64_t j = seqvae_whole_; j < (n); ++j) __VA_ARGS__ \
  }

template <typename T>
SEQVAE_INLINE T exp_(T x) {
  return std::exp(x);
}

template <>
SEQVAE_INLINE float exp_<float>(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);  // (not fmin/fmax: gcc 12 would not vectorize those)
  const float k = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(k, -0.693359375f, x);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));  // (C++17: the torch versions seqvae supports build with it)
  return p * scale;
}

template <typename T>
SEQVAE_INLINE T sigmoid_(T x) {
  return T(1) / (T(1) + exp_<T>(-x));
}

template <typename T>
SEQVAE_INLINE T tanh_(T x) {
  if constexpr (std::is_same_v<T, double>) return std::tanh(x);
  return T(2) / (T(1) + exp_<T>(-2 * x)) - T(1);
}

// f(row pointers..., d) over the rows of b, in parallel for large enough blocks
template <typename F>
inline void rows(int64_t b, int64_t d, const F& f) {
  at::parallel_for(0, b, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(i);
  });
}

// Whether the units (the last dimension) are contiguous: stride 1, or one unit (whose stride
// can be anything: .contiguous() leaves such a tensor as it is)
inline bool unit_stride(const Tensor& t) {
  return t.size(-1) == 1 || t.stride(-1) == 1;
}

// The rows of a (rows, units) tensor whose units are contiguous (checked): the pointer to row i
template <typename T>
struct Mat {
  T* p;
  int64_t sr;
  explicit Mat(const Tensor& t) : p(t.data_ptr<T>()), sr(t.stride(0)) {
    TORCH_CHECK(t.dim() == 2 && unit_stride(t), "seqvae fused kernel: rows of contiguous units expected");
  }
  T* at(int64_t i) const { return p + i * sr; }
};

// One row of each cell's update, over d units (the LSTM's Tensor functions below run them over
// their rows; the VRNN's step loops call them on raw rows, without an ATen view per step).
// GRU: g (3d) = the input gates' pre-activations becomes [sigmoid(r), sigmoid(u), n]; out =
// h' = n + u (h - n); kn = k's (the hidden gates') n block, for the backward
template <typename T>
inline void gru_forward_row(T* g, const T* k, const T* hp, T* out, T* kn, int64_t d) {
  SEQVAE_UNITS(j, d, {
    const T r = sigmoid_<T>(g[j] + k[j]);
    const T u = sigmoid_<T>(g[d + j] + k[d + j]);
    const T n = tanh_<T>(g[2 * d + j] + r * k[2 * d + j]);
    g[j] = r;
    g[d + j] = u;
    g[2 * d + j] = n;
    out[j] = n + u * (hp[j] - n);
    kn[j] = k[2 * d + j];
  });
}

// the GRU's backward: the input gates' pre-activations' gradients into di (3d) and the hidden
// gates' n block's into dk (d); the hidden gates' r and u gradients are di's (the caller reads
// them there); dd = dh u (through h' = n + u (h - n))
template <typename T>
inline void gru_backward_row(const T* a, const T* kn, const T* hp, const T* g, T* di, T* dk, T* dd, int64_t d) {
  SEQVAE_UNITS(j, d, {
    const T r = a[j], u = a[d + j], n = a[2 * d + j];
    const T dn = g[j] * (1 - u) * (1 - n * n);
    di[j] = dn * kn[j] * r * (1 - r);
    di[d + j] = g[j] * (hp[j] - n) * u * (1 - u);
    di[2 * d + j] = dn;
    dk[j] = dn * r;
    dd[j] = g[j] * u;
  });
}

// LSTM: see lstm_forward and lstm_backward
template <typename T>
inline void lstm_forward_row(T* g, const T* cp, T* ho, T* co, T* to, int64_t d) {
  SEQVAE_UNITS(j, d, {
    const T in = sigmoid_<T>(g[j]), f = sigmoid_<T>(g[d + j]);
    const T o = sigmoid_<T>(g[2 * d + j]), u = tanh_<T>(g[3 * d + j]);
    const T cn = f * cp[j] + in * u;
    const T tc = tanh_<T>(cn);
    g[j] = in;
    g[d + j] = f;
    g[2 * d + j] = o;
    g[3 * d + j] = u;
    co[j] = cn;
    to[j] = tc;
    ho[j] = o * tc;
  });
}

template <typename T>
inline void lstm_backward_row(const T* a, const T* t, const T* cp, const T* gh, const T* gc, T* dg, T* dp, int64_t d) {
  SEQVAE_UNITS(j, d, {
    const T in = a[j], f = a[d + j], o = a[2 * d + j], u = a[3 * d + j];
    const T dc = gc[j] + gh[j] * o * (1 - t[j] * t[j]);
    dg[j] = dc * u * in * (1 - in);
    dg[d + j] = dc * cp[j] * f * (1 - f);
    dg[2 * d + j] = gh[j] * t[j] * o * (1 - o);
    dg[3 * d + j] = dc * in * (1 - u * u);
    dp[j] = dc * f;
  });
}

// gates (b, 4d) = (i, f, o, u) become their activations; c' = f c + i u, tanh(c'), h' = o tanh(c')
void lstm_forward(Tensor gates, const Tensor& c, Tensor h_out, Tensor c_out, Tensor tc_out) {
  const int64_t b = c.size(0), d = c.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward", [&] {
    const Mat<scalar_t> gs(gates), hos(h_out), cns(c_out), tos(tc_out), cps(c);
    rows(b, d, [&](int64_t i) { lstm_forward_row<scalar_t>(gs.at(i), cps.at(i), hos.at(i), cns.at(i), tos.at(i), d); });
  });
}

// the pre-activations' gradients into dgates (b, 4d); returns the gradient of the old c
Tensor lstm_backward(const Tensor& dh, const Tensor& dc_in, const Tensor& acts, const Tensor& tc, const Tensor& c, Tensor dgates) {
  const int64_t b = c.size(0), d = c.size(1);
  // (rows of contiguous units read through Mat: copied only where the units are not contiguous)
  const Tensor dhc = unit_stride(dh) ? dh : dh.contiguous(), dcc = unit_stride(dc_in) ? dc_in : dc_in.contiguous();
  Tensor dc_prev = at::empty({b, d}, dh.options());
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_backward", [&] {
    const Mat<scalar_t> as(acts), ts(tc), cps(c), ghs(dhc), gcs(dcc), dgs(dgates), dps(dc_prev);
    rows(b, d, [&](int64_t i) {
      lstm_backward_row<scalar_t>(as.at(i), ts.at(i), cps.at(i), ghs.at(i), gcs.at(i), dgs.at(i), dps.at(i), d);
    });
  });
  return dc_prev;
}

inline void affine_into(Tensor out, const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  if (b.has_value()) {
    at::addmm_out(out, *b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

// c (m, n) = a (m, k) b (k, n), or c += a b with add, for rows of contiguous units (a loop's
// per-step products, on one thread). float: ATen's brgemm, which runs oneDNN's small-matrix
// kernel (generated once per shape and thread) where the CPU has it and ATen's BLAS otherwise;
// it ran the VRNN's 64-row products 1.04-1.8x as fast as at::mm with the weight transposed
// (2-core Intel Xeon VM). double, or a torch without it: at::mm.
inline void gemm_nn(const Tensor& c, const Tensor& a, const Tensor& b, bool add = false) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (c.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && m > 0 &&
      k > 0 && n > 0 && unit_stride(a) && unit_stride(b) && unit_stride(c)) {
    TORCH_CHECK(c.size(0) == m && c.size(1) == n && b.size(0) == k, "seqvae gemm_nn: shapes do not match");
    at::native::cpublas::brgemm(m, n, k, a.stride(0), b.stride(0), c.stride(0), add, a.data_ptr<float>(),
                                b.data_ptr<float>(), c.data_ptr<float>(), false);
    return;
  }
#endif
  Tensor out = c;
  if (add) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// TORCH_CHECK that a product by w (in, out) reads rows of `in` units and fits rows of `out` units
inline void check_product(const Tensor& w, int64_t in, int64_t out, const char* what) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == in && w.size(1) <= out, "seqvae fused kernel: the ", what,
              " product's weight (in, out) does not match its buffers");
}

// gemm_nn on raw rows: c (m, n) = a (m, k) b (k, n) (+ c where add), each given by its first row
// and row stride; the weight b a tensor with contiguous columns. For the step loops, which would
// otherwise make an ATen view per operand and step (~0.5 us each, tens of them per VRNN step).
// The widths are b's: the callers check their buffers against them once (check_product).
template <typename T>
inline void gemm_rows(int64_t m, const T* a, int64_t lda, const Tensor& b, T* c, int64_t ldc, bool add = false) {
  const int64_t k = b.size(0), n = b.size(1);
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<T, float>) {
    if (m > 0 && k > 0 && n > 0 && b.scalar_type() == at::kFloat && unit_stride(b)) {
      at::native::cpublas::brgemm(m, n, k, lda, b.stride(0), ldc, add, a, b.data_ptr<float>(), c, false);
      return;
    }
  }
#endif
  const auto options = b.options();
  const Tensor as = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, options);
  Tensor cs = at::from_blob(c, {m, n}, {ldc, 1}, options);
  gemm_nn(cs, as, b, add);
}

// A product with one weight over a loop's steps (gemm.py `Repeated`): y = x w^T (+ bias), by
// ATen, or by oneDNN with the weight reordered once (`packed`) where gemm.py measured that faster.
struct Prod {
  Tensor w;
  c10::optional<Tensor> bias, packed;
};

// fused.py passes each product as [weight, bias or None, packed weight or None]
inline std::vector<Prod> prods_from(const std::vector<c10::optional<Tensor>>& flat) {
  TORCH_CHECK(flat.size() % 3 == 0 && flat.size() > 0, "seqvae fused kernel: products as [weight, bias, packed] triples expected");
  std::vector<Prod> out;
  for (size_t i = 0; i < flat.size(); i += 3) out.push_back({*flat[i], flat[i + 1], flat[i + 2]});
  return out;
}

inline Tensor onednn_linear(const Tensor& x, const Tensor& packed, const c10::optional<Tensor>& bias) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, packed, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                 std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// What ATen's path adds to x w^T: the bias, extra, or their sum
inline c10::optional<Tensor> added(const Prod& p, const c10::optional<Tensor>& extra) {
  if (!extra.has_value()) return p.bias;
  return p.bias.has_value() ? *extra + *p.bias : *extra;
}

// out = x w^T + bias (+ extra)
inline void prod_into(Tensor out, const Tensor& x, const Prod& p, const c10::optional<Tensor>& extra = c10::nullopt) {
  if (!p.packed.has_value()) return affine_into(out, x, p.w, added(p, extra));
  Tensor y = onednn_linear(x, *p.packed, p.bias);
  if (extra.has_value()) {
    at::add_out(out, y, *extra);
  } else {
    out.copy_(y);
  }
}

// x w^T + bias (+ extra), a new tensor
inline Tensor prod(const Tensor& x, const Prod& p, const c10::optional<Tensor>& extra = c10::nullopt) {
  if (p.packed.has_value()) {
    Tensor y = onednn_linear(x, *p.packed, p.bias);
    return extra.has_value() ? y.add_(*extra) : y;
  }
  const c10::optional<Tensor> add = added(p, extra);
  return add.has_value() ? at::addmm(*add, x, p.w.t()) : at::mm(x, p.w.t());
}

// A tensor's rows [lo, lo + n) along its batch dimension (dim), or the tensor itself if it has none
inline Tensor rows_of(const Tensor& t, int64_t dim, int64_t lo, int64_t n, int64_t b) {
  return t.dim() > dim && t.size(dim) == b ? t.narrow(dim, lo, n) : t;
}
inline c10::optional<Tensor> rows_of(const c10::optional<Tensor>& t, int64_t dim, int64_t lo, int64_t n, int64_t b) {
  return t.has_value() ? c10::optional<Tensor>(rows_of(*t, dim, lo, n, b)) : c10::nullopt;
}
inline std::vector<Tensor> rows_of(const std::vector<Tensor>& ts, int64_t dim, int64_t lo, int64_t n, int64_t b) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(rows_of(t, dim, lo, n, b));
  return out;
}

// Block k's rows [lo, lo + n) of b rows in `blocks` blocks: {lo, n}
inline std::pair<int64_t, int64_t> block_rows(int64_t b, int64_t blocks, int64_t k) {
  const int64_t lo = b * k / blocks;
  return {lo, b * (k + 1) / blocks - lo};
}

// f(block, lo, n) for `blocks` blocks of the b rows, in parallel (one thread each): every
// operation of a DRAW glimpse or a VRNN step acts row by row, so a block's loop runs alone on
// its thread, its products on one thread too, with no fork and join per operation.
template <typename F>
void by_blocks(int64_t b, int64_t blocks, const F& f) {
  blocks = std::max<int64_t>(1, std::min(blocks, b));
  const at::ThreadLocalState state;  // the caller's grad mode and dispatch settings, for every thread
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t k = lo; k < hi; ++k) {
      const auto [r0, n] = block_rows(b, blocks, k);
      f(k, r0, n);
    }
  });
}

// A (steps, rows, units) buffer read and written row by row in the raw loops below: the pointer to
// row i of step t, without creating a tensor per step (an ATen view or operation costs ~1-4 us,
// of the order of a 64-row step's arithmetic)
template <typename T>
struct Seq {
  T* p;
  int64_t st, sr;
  explicit Seq(const Tensor& t) : p(t.data_ptr<T>()), st(t.stride(0)), sr(t.stride(1)) {
    TORCH_CHECK(t.dim() == 3 && unit_stride(t), "seqvae fused kernel: (steps, rows, units) with contiguous units expected");
  }
  T* at(int64_t t, int64_t i) const { return p + t * st + i * sr; }
};

// r = relu(r + b) (or r + b without relu) over one row of d units, in place
template <typename T>
inline void bias_row(T* r, const T* b, int64_t d, bool relu) {
  if (relu) {
    SEQVAE_UNITS(j, d, { r[j] = std::max(r[j] + b[j], T(0)); });
  } else {
    SEQVAE_UNITS(j, d, { r[j] += b[j]; });
  }
}

// s += row (in double) over d units: a row's share of a bias's gradient
template <typename T>
inline void add_row(double* s, const T* row, int64_t d) {
  SEQVAE_UNITS(j, d, { s[j] += static_cast<double>(row[j]); });
}

// dst = g * (act > 0) (ReLU's backward through its output act) over rows of n units (dst may be g)
template <typename T>
inline void relu_grad(T* dst, const T* g, const T* act, int64_t n) {
  SEQVAE_UNITS(j, n, { dst[j] = act[j] > T(0) ? g[j] : T(0); });
}

// s (double) += the column sums of `rows` rows of d units from p (row stride ld): summed in T over
// tiles of 8 rows (in acc, d wide), each tile's sums added in double (one conversion per 8 rows:
// summing each row in double ran ~1.7x slower)
template <typename T>
inline void add_rows(double* s, const T* p, int64_t ld, int64_t rows, int64_t d, T* acc) {
  for (int64_t i0 = 0; i0 < rows; i0 += 8) {
    const T* first = p + i0 * ld;
    SEQVAE_UNITS(j, d, { acc[j] = first[j]; });
    for (int64_t i = i0 + 1; i < std::min(i0 + 8, rows); ++i) {
      const T* row = p + i * ld;
      SEQVAE_UNITS(j, d, { acc[j] += row[j]; });
    }
    add_row<T>(s, acc, d);
  }
}

// log(u) for a positive normal float u by a Cephes-style polynomial (relative error ~2e-7),
// without branches, so that a loop of it vectorizes
SEQVAE_INLINE float log_normal_(float u) {
  int32_t bits;
  std::memcpy(&bits, &u, sizeof(bits));
  const int32_t e0 = ((bits >> 23) & 0xff) - 126;  // u = m 2^e with m in [0.5, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m0;
  std::memcpy(&m0, &bits, sizeof(m0));
  const bool low = m0 < 0.70710678f;  // then m = 2 m0 in [sqrt(1/2), sqrt(2))
  const float m = low ? m0 + m0 : m0;
  const float fe = static_cast<float>(low ? e0 - 1 : e0);
  const float x = m - 1.0f, z = x * x;
  float p = 7.0376836292e-2f;
  p = std::fma(p, x, -1.1514610310e-1f);
  p = std::fma(p, x, 1.1676998740e-1f);
  p = std::fma(p, x, -1.2420140846e-1f);
  p = std::fma(p, x, 1.4249322787e-1f);
  p = std::fma(p, x, -1.6668057665e-1f);
  p = std::fma(p, x, 2.0000714765e-1f);
  p = std::fma(p, x, -2.4999993993e-1f);
  p = std::fma(p, x, 3.3333331174e-1f);
  return x * z * p + fe * -2.12194440e-4f - 0.5f * z + x + fe * 0.693359375f;
}

// log(1 + y) for finite y >= 0 (float: by log_normal_, with -fno-trapping-math the division is
// computed for every lane, used only where d != 0); double: std::log1p
template <typename T>
SEQVAE_INLINE T log1p_(T y) {
  return std::log1p(y);
}

template <>
SEQVAE_INLINE float log1p_<float>(float y) {
  const float u = 1.0f + y;
  const float r = log_normal_(u);  // log(u)
  // u - 1 is exact (Sterbenz) for u < 2; log(u) (y / (u - 1)) corrects for the rounding of 1 + y
  const float d = u - 1.0f;
  const float corrected = r * (y / d);
  return d == 0.0f ? y : corrected;
}

// log(x) for any float x (0: -inf, negative or NaN: NaN, inf: inf, subnormals scaled by 2^24
// first), every case by selection so that a loop of it vectorizes; double: std::log
template <typename T>
SEQVAE_INLINE T log_(T x) {
  return std::log(x);
}

template <>
SEQVAE_INLINE float log_<float>(float x) {
  const bool tiny = x < std::numeric_limits<float>::min();
  const float r = log_normal_(tiny ? x * 16777216.0f : x) - (tiny ? 16.635532333438687f : 0.0f);  // 24 log 2
  const float inf = std::numeric_limits<float>::infinity();
  return x > 0.0f ? (x <= std::numeric_limits<float>::max() ? r : inf)
                  : (x == 0.0f ? -inf : std::numeric_limits<float>::quiet_NaN());
}

// softplus(x) with torch's threshold (x above 20: x itself); both sides computed, then one
// chosen, so that a loop of it vectorizes (exp_ clamps its argument: no overflow above 20)
template <typename T>
SEQVAE_INLINE T softplus_(T x) {
  const T v = log1p_<T>(exp_<T>(x));
  return x > T(20) ? x : v;
}

// The VRNN's steps [s0, s0 + n) for one block of rows (fused.py _vrnn_forward), given the
// chunk's phi_x parts of the posterior's first layer and of the cell's gates, already written
// into acts[0] and gates_seq (without their biases). The products are gemm_rows' (their output
// rows written in place); what lies between them (biases, activations, the reparameterised
// sample) is done in raw loops over the rows; a step makes no ATen tensor where brgemm runs
// (but for padded steps).
template <typename T>
void vrnn_steps(int64_t s0, int64_t n, const c10::optional<Tensor>& mask, Tensor hs, Tensor cs, Tensor ghn,
                const std::vector<Tensor>& acts, const std::vector<Tensor>& fzs, Tensor out_seq, Tensor scale_seq,
                const Tensor& eps, Tensor z_seq, Tensor gates_seq, Tensor tc_seq, Tensor hq, const Tensor& b_px,
                const Tensor& b_cx, const Tensor& w_ht, const c10::optional<Tensor>& b_h, const std::vector<Tensor>& q_wt,
                const std::vector<Tensor>& q_b, const std::vector<Tensor>& z_wt, const std::vector<Tensor>& z_b,
                const Tensor& w_czt, bool lstm, double min_std) {
  const int64_t nz = eps.size(2), f = acts[0].size(2), g = gates_seq.size(2), rows_n = hq.size(0), d = hs.size(2);
  const size_t n_q = q_wt.size(), n_z = z_wt.size();
  check_product(w_ht, d, hq.size(1), "h");
  for (size_t i = 1; i < n_q; ++i) check_product(q_wt[i - 1], acts[i - 1].size(2), acts[i].size(2), "posterior");
  check_product(q_wt[n_q - 1], acts[n_q - 1].size(2), 2 * nz, "posterior");
  for (size_t l = 0; l < n_z; ++l) check_product(z_wt[l], l == 0 ? nz : fzs[l - 1].size(2), fzs[l].size(2), "phi_z");
  check_product(w_czt, fzs[n_z - 1].size(2), g, "gates'");
  const Seq<T> a0s(acts[0]), outs(out_seq), scales(scale_seq), epss(eps), zs(z_seq), gates(gates_seq), hss(hs);
  std::vector<Seq<T>> qs, fs;  // the q-net's later activations, phi_z's layers' outputs
  for (size_t i = 1; i < n_q; ++i) qs.emplace_back(acts[i]);
  for (const Tensor& t : fzs) fs.emplace_back(t);
  const c10::optional<Seq<T>> css = lstm ? c10::optional<Seq<T>>(Seq<T>(cs)) : c10::nullopt;
  const c10::optional<Seq<T>> tcs = lstm ? c10::optional<Seq<T>>(Seq<T>(tc_seq)) : c10::nullopt;
  const c10::optional<Seq<T>> ghns = lstm ? c10::nullopt : c10::optional<Seq<T>>(Seq<T>(ghn));
  const Mat<T> hqs(hq);
  const T sd_min = static_cast<T>(min_std);
  const T *bp = b_px.data_ptr<T>(), *bc = b_cx.data_ptr<T>(), *bh = b_h.has_value() ? b_h->data_ptr<T>() + f : nullptr;
  // relu(x w + bias) into the rows at out (row stride ld)
  auto relu_layer = [&](const T* x, int64_t ldx, const Tensor& w, const Tensor& bias, T* out, int64_t ld) {
    gemm_rows<T>(rows_n, x, ldx, w, out, ld);
    const T* b = bias.data_ptr<T>();
    for (int64_t i = 0; i < rows_n; ++i) bias_row<T>(out + i * ld, b, w.size(1), true);
  };
  for (int64_t t = s0; t < s0 + n; ++t) {
    gemm_rows<T>(rows_n, hss.at(t, 0), hss.sr, w_ht, hqs.p, hqs.sr);
    for (int64_t i = 0; i < rows_n; ++i) {  // a_0 = relu(phi_x part + h part + bias), the phi_x part already in a_0
      const T* y = hqs.at(i);
      T* a = a0s.at(t, i);
      SEQVAE_UNITS(j, f, { a[j] = std::max(a[j] + y[j] + bp[j], T(0)); });
    }
    const T* a = a0s.at(t, 0);
    int64_t lda = a0s.sr;
    for (size_t i = 1; i < n_q; ++i) {
      relu_layer(a, lda, q_wt[i - 1], q_b[i - 1], qs[i - 1].at(t, 0), qs[i - 1].sr);
      a = qs[i - 1].at(t, 0);
      lda = qs[i - 1].sr;
    }
    gemm_rows<T>(rows_n, a, lda, q_wt[n_q - 1], outs.at(t, 0), outs.sr);
    const T* qb = q_b[n_q - 1].data_ptr<T>();
    for (int64_t i = 0; i < rows_n; ++i) {  // [loc, s~] + bias; scale = softplus(s~) + min; z = loc + scale eps
      T *o = outs.at(t, i), *sc = scales.at(t, i), *z = zs.at(t, i);
      const T* e = epss.at(t, i);
      SEQVAE_UNITS(j, 2 * nz, { o[j] += qb[j]; });
      SEQVAE_UNITS(j, nz, {
        sc[j] = softplus_<T>(o[nz + j]) + sd_min;
        z[j] = o[j] + sc[j] * e[j];
      });
    }
    const T* fz = zs.at(t, 0);
    int64_t ldz = zs.sr;
    for (size_t l = 0; l < n_z; ++l) {
      relu_layer(fz, ldz, z_wt[l], z_b[l], fs[l].at(t, 0), fs[l].sr);
      fz = fs[l].at(t, 0);
      ldz = fs[l].sr;
    }
    gemm_rows<T>(rows_n, fz, ldz, w_czt, gates.at(t, 0), gates.sr, true);  // onto phi_x's share, written there for the chunk
    for (int64_t i = 0; i < rows_n; ++i) {  // + the input bias; the h part + its bias (LSTM: added to the gates)
      T *x = gates.at(t, i), *k = hqs.at(i) + f;
      SEQVAE_UNITS(j, g, {
        x[j] += bc[j];
        if (bh != nullptr) k[j] += bh[j];
        if (lstm) x[j] += k[j];
      });
    }
    for (int64_t i = 0; i < rows_n; ++i) {
      if (lstm) {
        lstm_forward_row<T>(gates.at(t, i), css->at(t, i), hss.at(t + 1, i), css->at(t + 1, i), tcs->at(t, i), d);
      } else {
        gru_forward_row<T>(gates.at(t, i), hqs.at(i) + f, hss.at(t, i), hss.at(t + 1, i), ghns->at(t, i), d);
      }
    }
    if (mask.has_value()) {  // a padded step keeps its state
      Tensor keep = mask->select(1, t).unsqueeze(1);
      Tensor next = hs[t + 1];
      at::where_out(next, keep, next, hs[t]);
      if (lstm) {
        Tensor cn = cs[t + 1];
        at::where_out(cn, keep, cn, cs[t]);
      }
    }
  }
}

// dst += a^T b over the rows of the (n, b, .) blocks a and b
inline void accumulate(Tensor& dst, const Tensor& a, const Tensor& b) {
  dst.addmm_(a.reshape({-1, a.size(-1)}).t(), b.reshape({-1, b.size(-1)}));
}

// sum (double) += the column sums of step k's r rows of q, over sum's width (q's first columns;
// acc: add_rows' tile, as wide)
template <typename T>
inline void colsums(const Seq<T>& q, int64_t k, int64_t r, const Tensor& sum, T* acc) {
  add_rows<T>(sum.data_ptr<double>(), q.at(k, 0), q.sr, r, sum.numel(), acc);
}

// The VRNN's steps [s0, s0 + n) in reverse for one block of rows (fused.py _vrnn_backward): the
// gradients of each step into the chunk's buffers (row k = t - s0); dh (and dc) carried from
// step s0 + n to step s0. Returns {dh, dc} at s0. As in the forward, the products are gemm_rows'
// (into buffers of this call) and what lies between them is done in raw loops over the rows; the
// rows of the gradients each step writes are added into the block's bias sums (`sums`).
// d_h's rows are [dn r (GRU only: e = d columns) | the q-net's first layer (f) | the cell's input
// gates (g)] (fused.py _vrnn_backward): its first f + g columns are the gradient of the stacked
// h products (w_h's rows in that order), its last f + g that of phi_x's, its last g the gates'.
template <typename T>
std::vector<Tensor> vrnn_back_steps(
    int64_t s0, int64_t n, const c10::optional<Tensor>& dh_prev, const c10::optional<Tensor>& dz_out,
    const c10::optional<Tensor>& dfz_out, const c10::optional<Tensor>& dloc_out,
    const c10::optional<Tensor>& dscale_out, Tensor dh, Tensor dc, const c10::optional<Tensor>& mask, Tensor hs,
    Tensor cs, Tensor ghn, const std::vector<Tensor>& acts, const std::vector<Tensor>& fzs, Tensor out_seq,
    const Tensor& eps, Tensor gates_seq, Tensor tc_seq, Tensor d_h, Tensor dout_c,
    const std::vector<Tensor>& dqs, const std::vector<Tensor>& dzs, const Tensor& w_h, const std::vector<Tensor>& q_w,
    const std::vector<Tensor>& z_w, const Tensor& w_cz, bool lstm, int64_t f, const std::vector<Tensor>& sums) {
  const int64_t nz = eps.size(2), n_q = q_w.size(), n_z = z_w.size(), width = d_h.size(2), r = hs.size(1);
  const int64_t d = hs.size(2), g = gates_seq.size(2), e = width - f - g;
  // this call's buffers: the gradient reaching phi_z's output (and each layer's input), the
  // q-net's, dz, and dh (a new tensor: the dh passed in may be the caller's); each as wide as the
  // (padded: see vrnn_backward) weights of the products that write it, used through a view of
  // its first columns
  auto buffer = [&](const Tensor& w) { return at::empty({r, w.size(1)}, hs.options()); };
  Tensor g_fp = buffer(w_cz), dap = buffer(q_w[n_q - 1]), dzp = buffer(z_w[0]);
  Tensor dh_bufs[2] = {buffer(w_h), buffer(w_h)};  // written in turn
  Tensor g_f = g_fp.narrow(1, 0, f), da = dap.narrow(1, 0, f), dz = dzp.narrow(1, 0, nz);
  const Mat<T> gm(g_f), dam(da), dzm(dz);
  const Seq<T> outs(out_seq), epss(eps), dhs_seq(d_h), douts(dout_c), a0s(acts[0]);
  std::vector<Seq<T>> zin, qin, dzseq, dqseq;  // phi_z's outputs (fzs), the q-net's activations, their gradients
  for (const Tensor& t : fzs) zin.emplace_back(t);
  for (const Tensor& t : acts) qin.emplace_back(t);
  for (const Tensor& t : dzs) dzseq.emplace_back(t);
  for (const Tensor& t : dqs) dqseq.emplace_back(t);
  auto seq = [](const c10::optional<Tensor>& t) { return t.has_value() ? c10::optional<Seq<T>>(Seq<T>(*t)) : c10::nullopt; };
  const auto dh_prev_s = seq(dh_prev), dz_out_s = seq(dz_out), dfz_out_s = seq(dfz_out);
  const auto dloc_s = seq(dloc_out), dscale_s = seq(dscale_out);
  // the steps' rows as raw pointers (no ATen view per step where brgemm runs)
  check_product(w_cz, g, g_fp.size(1), "gates'");
  for (int64_t l = 0; l < n_z; ++l) check_product(z_w[l], dzs[l].size(2), (l == 0 ? dzp : g_fp).size(1), "phi_z");
  check_product(q_w[n_q - 1], 2 * nz, dap.size(1), "posterior");
  for (int64_t l = 1; l < n_q; ++l) check_product(q_w[l - 1], dqs[l - 1].size(2), dap.size(1), "posterior");
  check_product(w_h, f + g, dh_bufs[0].size(1), "h");
  TORCH_CHECK(out_seq.size(2) == 2 * nz && dout_c.size(2) == 2 * nz && dzp.size(1) >= nz && g_fp.size(1) >= f,
              "seqvae fused kernel: the posterior's buffers do not match");
  const std::vector<T> zero_row(nz, T(0));
  int64_t widest = 0;  // of the column sums (colsums' tile)
  for (const Tensor& sum : sums) widest = std::max(widest, sum.numel());
  std::vector<T> acc(widest);
  const Seq<T> hss(hs), gates(gates_seq);
  auto seq_if = [](bool on, const Tensor& t) { return on ? c10::optional<Seq<T>>(Seq<T>(t)) : c10::nullopt; };
  const auto css = seq_if(lstm, cs), tcs = seq_if(lstm, tc_seq), ghns = seq_if(!lstm, ghn);
  const Mat<T> g_fps(g_fp), daps(dap), dzps(dzp);
  const Mat<T> dhb[2] = {Mat<T>(dh_bufs[0]), Mat<T>(dh_bufs[1])};
  const Tensor dh_views[2] = {dh_bufs[0].narrow(1, 0, d), dh_bufs[1].narrow(1, 0, d)};
  // the GRU's direct path dh u (GRU), or the new dc (LSTM: two, written in turn: dc, this step's
  // input, is the caller's or the other)
  const Tensor direct_buf = lstm ? Tensor() : at::empty({r, d}, hs.options());
  const Tensor dc_bufs[2] = {lstm ? at::empty({r, d}, hs.options()) : Tensor(), lstm ? at::empty({r, d}, hs.options()) : Tensor()};
  for (int64_t t = s0 + n - 1; t >= s0; --t) {
    const int64_t k = t - s0;
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
    T* dhk = dhs_seq.at(k, 0);  // this step's row of d_h: [dn r | q | gates]
    T* dgates = dhk + e + f;
    const int64_t ldk = dhs_seq.sr;
    {  // the cell's backward, reading dh (and dc) as rows of contiguous units, whatever their layout
      const Tensor dhc = unit_stride(dh) ? dh : dh.contiguous();
      const Mat<T> dhm(dhc);
      if (lstm) {
        const Tensor dcc = unit_stride(dc) ? dc : dc.contiguous();
        const Mat<T> dcm(dcc), dcn(dc_bufs[t & 1]);
        for (int64_t i = 0; i < r; ++i) {
          lstm_backward_row<T>(gates.at(t, i), tcs->at(t, i), css->at(t, i), dhm.at(i), dcm.at(i), dgates + i * ldk,
                               dcn.at(i), d);
        }
        dc = dc_bufs[t & 1];
        if (mask.has_value()) dc = dc + dc_skip;
      } else {
        const Mat<T> dds(direct_buf);
        for (int64_t i = 0; i < r; ++i) {
          gru_backward_row<T>(gates.at(t, i), ghns->at(t, i), hss.at(t, i), dhm.at(i), dgates + i * ldk, dhk + i * ldk,
                              dds.at(i), d);
        }
      }
    }
    gemm_rows<T>(r, dgates, ldk, w_cz, g_fps.p, g_fps.sr);  // the gradient of phi_z's output: from the gates (+ dfz_out)
    if (dfz_out_s) {
      for (int64_t i = 0; i < r; ++i) {
        T* g = gm.at(i);
        const T* e = dfz_out_s->at(t, i);
        SEQVAE_UNITS(j, f, { g[j] += e[j]; });
      }
    }
    for (int64_t l = n_z - 1; l >= 0; --l) {  // phi_z's layers, from the last
      for (int64_t i = 0; i < r; ++i) relu_grad<T>(dzseq[l].at(k, i), gm.at(i), zin[l].at(t, i), f);
      const Mat<T>& to = l == 0 ? dzps : g_fps;
      gemm_rows<T>(r, dzseq[l].at(k, 0), dzseq[l].sr, z_w[l], to.p, to.sr);
    }
    for (int64_t i = 0; i < r; ++i) {  // dz (+ dz_out) into [dloc, ds~]: scale = softplus(s~) + min, softplus' = sigmoid
      T* z = dzm.at(i);
      T* o = douts.at(k, i);
      const T *e = epss.at(t, i), *pre = outs.at(t, i);
      // (absent gradients read as a row of zeros: adding 0 changes no value but a zero's sign, and
      // the loop has no branch)
      const T* dzo = dz_out_s ? dz_out_s->at(t, i) : zero_row.data();
      const T* dlo = dloc_s ? dloc_s->at(t, i) : zero_row.data();
      const T* dso = dscale_s ? dscale_s->at(t, i) : zero_row.data();
      SEQVAE_UNITS(j, nz, {
        const T dzj = z[j] + dzo[j];
        o[j] = dzj + dlo[j];
        o[nz + j] = (dso[j] + dzj * e[j]) * sigmoid_<T>(pre[nz + j]);
      });
    }
    gemm_rows<T>(r, douts.at(k, 0), douts.sr, q_w[n_q - 1], daps.p, daps.sr);
    for (int64_t l = n_q - 1; l >= 1; --l) {  // the q-net's hidden layers
      for (int64_t i = 0; i < r; ++i) relu_grad<T>(dqseq[l - 1].at(k, i), dam.at(i), qin[l].at(t, i), f);
      gemm_rows<T>(r, dqseq[l - 1].at(k, 0), dqseq[l - 1].sr, q_w[l - 1], daps.p, daps.sr);
    }
    for (int64_t i = 0; i < r; ++i) relu_grad<T>(dhs_seq.at(k, i) + e, dam.at(i), a0s.at(t, i), f);
    // dh_{t-1}, into the buffer that dh (this step's input: the caller's or the other buffer) is not
    const Mat<T>& dhm = dhb[t & 1];
    gemm_rows<T>(r, dhk, ldk, w_h, dhm.p, dhm.sr);
    const bool direct = !lstm, skip = dh_skip.defined();
    const Tensor ds = skip ? dh_skip.contiguous() : dh_views[t & 1];
    const Mat<T> ddm(direct ? direct_buf : dh_views[t & 1]), dsm(ds);
    for (int64_t i = 0; i < r; ++i) {  // dh_{t-1} = the products' + the GRU's direct path (+ padding's) (+ dh_prev)
      T* o = dhm.at(i);
      const T *a = ddm.at(i), *b2 = dsm.at(i), *p = dh_prev_s ? dh_prev_s->at(t, i) : nullptr;
      for (int64_t j = 0; j < d; ++j) {
        T v = o[j];
        if (direct) v += a[j];
        if (skip) v += b2[j];
        if (p != nullptr) v += p[j];
        o[j] = v;
      }
    }
    dh = dh_views[t & 1];
    // the biases' gradients: this step's rows of the pre-activations' gradients added into the
    // block's column sums (in double), while they are in cache
    colsums<T>(dhs_seq, k, r, sums[0], acc.data());
    colsums<T>(douts, k, r, sums[1], acc.data());
    for (int64_t l = 0; l < n_q - 1; ++l) colsums<T>(dqseq[l], k, r, sums[2 + l], acc.data());
    for (int64_t l = 0; l < n_z; ++l) colsums<T>(dzseq[l], k, r, sums[1 + n_q + l], acc.data());
  }
  return {dh, dc};
}

}  // namespace

// The VRNN's forward over all steps (fused.py _vrnn_forward), `chunk` steps at a time: the
// phi_x parts of the posterior's first layer and of the cell's gates for a chunk (over the whole
// batch; one product, into xg, whose rows are [acts[0] | gates_seq]), then its steps with the
// batch in `blocks` blocks of rows, one thread each. eps is drawn here, before the loops.
void vrnn_forward(const Tensor& fx, const c10::optional<Tensor>& mask, Tensor hs, Tensor cs, Tensor ghn,
                  std::vector<Tensor> acts, std::vector<Tensor> fzs, Tensor out_seq, Tensor scale_seq, Tensor eps,
                  Tensor z_seq, Tensor xg, Tensor gates_seq, Tensor tc_seq, Tensor hq,
                  const Tensor& w_x, const Tensor& b_px, const Tensor& b_cx, const Tensor& w_h,
                  const c10::optional<Tensor>& b_h, std::vector<Tensor> q_w, std::vector<Tensor> q_b,
                  std::vector<Tensor> z_w, std::vector<Tensor> z_b, const Tensor& w_cz, bool lstm, double min_std,
                  int64_t chunk, int64_t blocks) {
  const int64_t steps = fx.size(0), b = fx.size(1), f = fx.size(2), xw = w_x.size(0);
  // the step loop's random numbers: one normal_ per step; for float and double ATen fills a
  // contiguous tensor of a multiple of 16 values from uniforms drawn in order, transformed 16 at a
  // time, so that one call over all the steps draws the same numbers (checked by the tests)
  if (steps > 0 && eps.is_contiguous() && eps[0].numel() % 16 == 0) {
    eps.normal_();
  } else {
    for (int64_t t = 0; t < steps; ++t) eps[t].normal_();
  }
  // the step products' weights as (in, out) rows, for gemm_rows
  auto rows_in = [](const Tensor& w) { return w.t().contiguous(); };
  const Tensor w_ht = rows_in(w_h), w_czt = rows_in(w_cz);
  std::vector<Tensor> q_wt, z_wt;
  for (const Tensor& w : q_w) q_wt.push_back(rows_in(w));
  for (const Tensor& w : z_w) z_wt.push_back(rows_in(w));
  for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
    const int64_t n = std::min(chunk, steps - s0);
    Tensor fx_c = fx.narrow(0, s0, n).reshape({n * b, f});
    // phi_x's shares straight into the buffers they start (the biases are added per step)
    at::mm_out(lv(xg.narrow(0, s0, n).view({n * b, xw})), fx_c, w_x.t());
    by_blocks(b, blocks, [&](int64_t, int64_t lo, int64_t rows) {
      auto r = [&](const Tensor& t) { return rows_of(t, 1, lo, rows, b); };
      auto rs = [&](const std::vector<Tensor>& ts) { return rows_of(ts, 1, lo, rows, b); };
      AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "vrnn_forward", [&] {
        vrnn_steps<scalar_t>(s0, n, rows_of(mask, 0, lo, rows, b), r(hs), r(cs), r(ghn), rs(acts), rs(fzs),
                             r(out_seq), r(scale_seq), r(eps), r(z_seq), r(gates_seq), r(tc_seq),
                             rows_of(hq, 0, lo, rows, b), b_px, b_cx, w_ht, b_h, q_wt, q_b, z_wt, z_b, w_czt, lstm,
                             min_std);
      });
    });
  }
}

// The VRNN's backward over all steps (fused.py _vrnn_backward), a chunk at a time from the end:
// the steps in reverse into the chunk's gradient buffers (in the forward's blocks of rows), then
// the chunk's share of every weight's gradient (one product each over the whole batch, added
// into the g_* accumulators) and of phi_x's gradient dfx. Returns the gradients of h_0 (and c_0).
std::vector<Tensor> vrnn_backward(
    const c10::optional<Tensor>& dh_prev, const c10::optional<Tensor>& dz_out, const c10::optional<Tensor>& dfz_out,
    const c10::optional<Tensor>& dloc_out, const c10::optional<Tensor>& dscale_out, Tensor dh, Tensor dc,
    const c10::optional<Tensor>& mask, const Tensor& fx, Tensor hs, Tensor cs, Tensor ghn, std::vector<Tensor> acts,
    std::vector<Tensor> fzs, Tensor out_seq, Tensor eps, Tensor z_seq, Tensor gates_seq, Tensor tc_seq, Tensor d_h,
    Tensor dout_c, std::vector<Tensor> dqs, std::vector<Tensor> dzs, Tensor dfx, const Tensor& w_x,
    const Tensor& w_h, std::vector<Tensor> q_w, std::vector<Tensor> z_w, const Tensor& w_cz,
    std::vector<Tensor> grads, bool lstm, bool has_bias, int64_t chunk, int64_t blocks) {
  // grads: g_x (the phi_x columns of [posterior's first layer; cell]), gb_px, gb_cx, g_h (in
  // d_h's order), gb_hh, g_cz, then (w, b) of each q-net layer and of each phi_z layer
  const int64_t steps = out_seq.size(0), f = fx.size(2), b = fx.size(1), g = gates_seq.size(2);
  const int64_t width = d_h.size(2), e = width - f - g, d = hs.size(2);
  const int64_t n_q = q_w.size(), n_z = z_w.size();
  // the outputs' gradients (any layout autograd gives, e.g. expanded) with contiguous units, for the raw loops
  auto units = [](const c10::optional<Tensor>& t) {
    return t.has_value() && !unit_stride(*t) ? c10::optional<Tensor>(t->contiguous()) : t;
  };
  const c10::optional<Tensor> dh_prev_u = units(dh_prev), dz_u = units(dz_out), dfz_u = units(dfz_out);
  const c10::optional<Tensor> dloc_u = units(dloc_out), dscale_u = units(dscale_out);
  blocks = std::max<int64_t>(1, std::min(blocks, b));
  // the per-step products' weights with their columns (the products' outputs) padded with zeros
  // to a multiple of 16, for float: oneDNN's small-matrix kernel ran the backward's products
  // 10-17% faster so, the padding's work included (one thread, 2-core Intel Xeon VM: 64 x 400 x
  // 100 38.8 us, as 64 x 400 x 112 33.5 us; 64 x 300 x 100 28.4 vs 25.5; 64 x 100 x 100 12.8 vs
  // 10.9); the steps' buffers they write are as wide
  auto padded = [](const Tensor& w) {
    const int64_t n = w.size(1), wide = (n + 15) / 16 * 16;
#ifndef CPUBLAS_BRGEMM_F32F32F32
    return w;  // (ATen's products: not measured padded)
#endif
    if (w.scalar_type() != at::kFloat || wide == n) return w;
    Tensor p = at::zeros({w.size(0), wide}, w.options());
    p.narrow(1, 0, n).copy_(w);
    return p;
  };
  const Tensor w_hp = padded(w_h), w_czp = padded(w_cz);
  for (Tensor& w : q_w) w = padded(w);
  for (Tensor& w : z_w) w = padded(w);
  std::vector<Tensor> dhs(blocks), dcs(blocks);  // each block's dh (and dc), carried from chunk to chunk
  // each block's column sums (double) of d_h, of the q-net's output's, the q-net's hidden
  // layers' and phi_z's layers' gradients: the biases' gradients
  const auto dbl = fx.options().dtype(at::kDouble);
  std::vector<std::vector<Tensor>> sums(blocks);
  for (int64_t k = 0; k < blocks; ++k) {
    const auto [lo, rows] = block_rows(b, blocks, k);
    dhs[k] = rows_of(dh, 0, lo, rows, b);
    dcs[k] = rows_of(dc, 0, lo, rows, b);
    sums[k].push_back(at::zeros({width}, dbl));
    sums[k].push_back(at::zeros({dout_c.size(2)}, dbl));
    for (const Tensor& t : dqs) sums[k].push_back(at::zeros({t.size(2)}, dbl));
    for (const Tensor& t : dzs) sums[k].push_back(at::zeros({t.size(2)}, dbl));
  }
  for (int64_t s0 = ((steps - 1) / chunk) * chunk; s0 >= 0; s0 -= chunk) {
    const int64_t n = std::min(chunk, steps - s0);
    by_blocks(b, blocks, [&](int64_t k, int64_t lo, int64_t rows) {
      auto r = [&](const Tensor& t) { return rows_of(t, 1, lo, rows, b); };
      auto r1 = [&](const c10::optional<Tensor>& t) { return rows_of(t, 1, lo, rows, b); };
      auto rs = [&](const std::vector<Tensor>& ts) { return rows_of(ts, 1, lo, rows, b); };
      std::vector<Tensor> carried;
      AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "vrnn_backward", [&] {
        carried = vrnn_back_steps<scalar_t>(
            s0, n, r1(dh_prev_u), r1(dz_u), r1(dfz_u), r1(dloc_u), r1(dscale_u), dhs[k], dcs[k],
            rows_of(mask, 0, lo, rows, b), r(hs), r(cs), r(ghn), rs(acts), rs(fzs), r(out_seq), r(eps), r(gates_seq),
            r(tc_seq), r(d_h), r(dout_c), rs(dqs), rs(dzs), w_hp, q_w, z_w, w_czp, lstm, f, sums[k]);
      });
      dhs[k] = carried[0];
      dcs[k] = carried[1];
    });
    // the chunk's share of the weights' gradients and of phi_x's
    Tensor dH = d_h.narrow(0, 0, n);
    Tensor dX = dH.narrow(2, e, f + g), dG = dH.narrow(2, e + f, g);
    Tensor fx_c = fx.narrow(0, s0, n);
    at::mm_out(lv(dfx.narrow(0, s0, n).view({n * b, f})), dX.reshape({n * b, f + g}), w_x);
    accumulate(grads[0], dX, fx_c);
    accumulate(grads[3], dH.narrow(2, 0, f + g), hs.narrow(0, s0, n));
    accumulate(grads[5], dG, fzs[n_z - 1].narrow(0, s0, n));
    for (int64_t i = 0; i < n_q; ++i) {
      Tensor dpre = i == n_q - 1 ? dout_c.narrow(0, 0, n) : dqs[i].narrow(0, 0, n);
      accumulate(grads[6 + 2 * i], dpre, acts[i].narrow(0, s0, n));
    }
    for (int64_t i = 0; i < n_z; ++i) {
      const Tensor& input = i == 0 ? z_seq : fzs[i - 1];
      accumulate(grads[6 + 2 * n_q + 2 * i], dzs[i].narrow(0, 0, n), input.narrow(0, s0, n));
    }
  }
  // the biases' gradients: the blocks' column sums
  for (int64_t k = 1; k < blocks; ++k)
    for (size_t i = 0; i < sums[0].size(); ++i) sums[0][i] += sums[k][i];
  const std::vector<Tensor>& total = sums[0];
  grads[1] += total[0].narrow(0, e, f);
  grads[2] += total[0].narrow(0, e + f, g);
  if (has_bias) {  // the GRU's hidden bias: [r, u] as the input gates', n from dn r
    grads[4].narrow(0, 0, 2 * d).add_(total[0].narrow(0, e + f, 2 * d));
    grads[4].narrow(0, 2 * d, d).add_(total[0].narrow(0, 0, d));
  }
  grads[7 + 2 * (n_q - 1)] += total[1];
  for (int64_t i = 0; i < n_q - 1; ++i) grads[7 + 2 * i] += total[2 + i];
  for (int64_t i = 0; i < n_z; ++i) grads[7 + 2 * n_q + 2 * i] += total[1 + n_q + i];
  std::vector<Tensor> first = {blocks == 1 ? dhs[0] : at::cat(dhs)};
  if (lstm) first.push_back(blocks == 1 ? dcs[0] : at::cat(dcs));
  return first;
}

// ---------------------------------------------------------------- nets.py's _Chain: one pass each
// y (rows, units) += bias, then ReLU where relu; in place, the rows in parallel (after a product
// wrote x w^T into y: one pass over y instead of ATen's bias copy before the product and a ReLU after)
void bias_act(Tensor y, const Tensor& bias, bool relu) {
  TORCH_CHECK(y.dim() == 2 && bias.dim() == 1 && bias.size(0) == y.size(1) && bias.is_contiguous() &&
                  y.scalar_type() == bias.scalar_type(), "seqvae bias_act: (rows, units) and a contiguous (units,) bias expected");
  const int64_t d = y.size(1);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bias_act", [&] {
    const Mat<scalar_t> ys(y);
    const scalar_t* b = bias.data_ptr<scalar_t>();
    rows(y.size(0), d, [&](int64_t i) { bias_row<scalar_t>(ys.at(i), b, d, relu); });
  });
}

// g (rows, units) *= (act > 0) where act is given (ReLU's backward through its output act), in
// place or into `out` (g then unchanged); returns the result's column sums (the bias's gradient),
// in g's dtype. One pass: 8 rows at a time, then their sums (add_rows) while they are in cache.
Tensor grad_colsum(Tensor g, const c10::optional<Tensor>& act, const c10::optional<Tensor>& out) {
  TORCH_CHECK(g.dim() == 2 && (!act.has_value() || act->sizes() == g.sizes()) &&
                  (!out.has_value() || (out->sizes() == g.sizes() && out->scalar_type() == g.scalar_type())),
              "seqvae grad_colsum: a (rows, units) gradient, and activations and an output of its shape expected");
  const int64_t n = g.size(0), d = g.size(1);
  if (out.has_value()) {
    at::assert_no_internal_overlap(*out);
    at::assert_no_partial_overlap(*out, g);
  }
  const Tensor dst = out.has_value() ? *out : g;
  // blocks of rows, one partial sum each (one block where a fork would cost more than it saves)
  const int64_t parts = n * d < 16384 ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  Tensor partial = at::zeros({parts, d}, g.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "grad_colsum", [&] {
    const Mat<scalar_t> gs(g), ds(dst);
    const c10::optional<Mat<scalar_t>> as = act.has_value() ? c10::optional<Mat<scalar_t>>(Mat<scalar_t>(*act)) : c10::nullopt;
    double* part = partial.data_ptr<double>();
    at::parallel_for(0, parts, 1, [&](int64_t k0, int64_t k1) {
      std::vector<scalar_t> tile(d);
      scalar_t* acc = tile.data();
      for (int64_t k = k0; k < k1; ++k) {
        double* s = part + k * d;
        const int64_t i1 = n * (k + 1) / parts;
        for (int64_t i0 = n * k / parts; i0 < i1; i0 += 8) {
          const int64_t i8 = std::min(i0 + 8, i1);
          for (int64_t i = i0; i < i8; ++i) {
            scalar_t* r = ds.at(i);
            if (as) {
              relu_grad<scalar_t>(r, gs.at(i), as->at(i), d);
            } else if (r != gs.at(i)) {
              std::memcpy(r, gs.at(i), d * sizeof(scalar_t));
            }
          }
          add_rows<scalar_t>(s, ds.at(i0), ds.sr, i8 - i0, d, acc);
        }
      }
    });
  });
  return partial.sum(0).to(g.scalar_type());
}

// ------------------------------------------------- distributions.py's BernoulliHead.check
// Whether every element of x is exactly 0 or 1 (NaN is neither): one pass over the elements, in
// parallel blocks, counting the others, where ATen's (x == 0) | (x == 1) then .all() takes four
// passes on bytes and allocates two tensors (a (128, 500, 88) batch on the 2-core Intel Xeon VM:
// 0.6 vs 10.8 ms; an early exit per block ran 8x slower: gcc did not vectorize it)
bool is_binary(const Tensor& x) {
  const Tensor c = x.contiguous();
  std::atomic<int64_t> others{0};
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "is_binary", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t lo, int64_t hi) {
      int64_t n = 0;
      for (int64_t i = lo; i < hi; ++i) n += (p[i] != scalar_t(0)) & (p[i] != scalar_t(1));
      others += n;
    });
  });
  return others.load() == 0;
}

// ------------------------------------- terms.py's _NormalKL and distributions.py's _BernoulliLogProb
// Both act on the rows (i over the first two dimensions) of 3-D tensors with contiguous units, the
// rows of a few units each (z, the features per step). A loop over one such row vectorizes badly
// (gcc: one vector, then the remainder one lane at a time; the reductions worse still), and
// finding a strided row costs two divisions: measured ~5x slower than one flat loop over many
// rows. So the rows are taken in tiles of consecutive rows, copied into contiguous buffers, and
// the arithmetic runs as one flat loop over the tile.
template <typename T>
struct Rows3 {
  const T* p;
  int64_t s0, s1, n1;
  explicit Rows3(const Tensor& t) : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), n1(t.size(1)) {}
  // rows [i0, i1) of d units into `tile`, contiguously, without a division per row
  void gather(int64_t i0, int64_t i1, int64_t d, T* tile) const {
    int64_t q = i0 / n1, k = i0 % n1;
    for (int64_t i = i0; i < i1; ++i) {
      std::memcpy(tile + (i - i0) * d, p + q * s0 + k * s1, d * sizeof(T));
      if (++k == n1) {
        k = 0;
        ++q;
      }
    }
  }
};

// f(i0, i1, buffers) for tiles [i0, i1) of ~2048 units of the n rows of d units, in parallel, with
// `nbuf` tile-sized scratch buffers per thread
template <typename T, typename F>
inline void row_tiles(int64_t n, int64_t d, int nbuf, const F& f) {
  const int64_t per = std::max<int64_t>(1, 2048 / std::max<int64_t>(d, 1)), tiles = (n + per - 1) / per;
  at::parallel_for(0, tiles, std::max<int64_t>(1, 16384 / (per * std::max<int64_t>(d, 1))), [&](int64_t t0, int64_t t1) {
    std::vector<T> scratch(static_cast<size_t>(nbuf * per * d));
    std::vector<T*> bufs;
    for (int k = 0; k < nbuf; ++k) bufs.push_back(scratch.data() + k * per * d);
    for (int64_t t = t0; t < t1; ++t) f(t * per, std::min(n, t * per + per), bufs);
  });
}

// the sums of each row's d values of a tile of r rows, into o (added in double: a float32 sum
// of thousands of terms in order would lose digits)
template <typename T>
inline void row_sums(const T* tile, int64_t r, int64_t d, T* o) {
  for (int64_t i = 0; i < r; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < d; ++j) acc += static_cast<double>(tile[i * d + j]);
    o[i] = static_cast<T>(acc);
  }
}

// g_i repeated over each row's d units, for a tile of r rows
template <typename T>
inline void spread(const T* g, int64_t r, int64_t d, T* tile) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < d; ++j) tile[i * d + j] = g[i];
}

inline void check_kl_args(const std::vector<Tensor>& ts) {
  for (const Tensor& t : ts)
    TORCH_CHECK(t.dim() == 3 && unit_stride(t) && t.sizes() == ts[0].sizes() && t.scalar_type() == ts[0].scalar_type(),
                "seqvae normal_kl: four (b, s, z) tensors of one shape and dtype with contiguous units expected");
}

// sum_z KL(N(m_q, s_q^2) || N(m_p, s_p^2)) = sum_z 0.5 (r^2 + d^2 - 1) - log r, r = s_q / s_p,
// d = (m_q - m_p) / s_p: (b, s)
Tensor normal_kl(const Tensor& mq, const Tensor& sq, const Tensor& mp, const Tensor& sp) {
  check_kl_args({mq, sq, mp, sp});
  const int64_t z = mq.size(2);
  Tensor out = at::empty({mq.size(0), mq.size(1)}, mq.options());
  AT_DISPATCH_FLOATING_TYPES(mq.scalar_type(), "normal_kl", [&] {
    const Rows3<scalar_t> a(mq), b(sq), c(mp), e(sp);
    scalar_t* o = out.data_ptr<scalar_t>();
    row_tiles<scalar_t>(out.numel(), z, 4, [&](int64_t i0, int64_t i1, const std::vector<scalar_t*>& t) {
      a.gather(i0, i1, z, t[0]);
      b.gather(i0, i1, z, t[1]);
      c.gather(i0, i1, z, t[2]);
      e.gather(i0, i1, z, t[3]);
      scalar_t *m1 = t[0], *s1 = t[1], *m2 = t[2], *s2 = t[3];
      _Pragma("omp simd")
      for (int64_t k = 0; k < (i1 - i0) * z; ++k) {
        const scalar_t r = s1[k] / s2[k], d = (m1[k] - m2[k]) / s2[k];  // (1 / s_p would overflow for tiny s_p)
        m1[k] = scalar_t(0.5) * (r * r + d * d - scalar_t(1)) - log_<scalar_t>(r);
      }
      row_sums(m1, i1 - i0, z, o + i0);
    });
  });
  return out;
}

// its gradients given grad (b, s): {m_q's, s_q's, m_p's, s_p's} (b, s, z):
// d/dm_q = d / s_p = -d/dm_p, d/ds_q = (r - 1/r) / s_p, d/ds_p = (1 - r^2 - d^2) / s_p
std::vector<Tensor> normal_kl_backward(const Tensor& grad, const Tensor& mq, const Tensor& sq, const Tensor& mp,
                                       const Tensor& sp) {
  check_kl_args({mq, sq, mp, sp});
  const int64_t z = mq.size(2);
  Tensor g = grad.contiguous();
  TORCH_CHECK(g.numel() == mq.size(0) * mq.size(1), "seqvae normal_kl_backward: a (b, s) gradient expected");
  std::vector<Tensor> out;
  for (int k = 0; k < 4; ++k) out.push_back(at::empty(mq.sizes(), mq.options()));
  AT_DISPATCH_FLOATING_TYPES(mq.scalar_type(), "normal_kl_backward", [&] {
    const Rows3<scalar_t> a(mq), b(sq), c(mp), e(sp);
    const scalar_t* gs = g.data_ptr<scalar_t>();
    scalar_t *o0 = out[0].data_ptr<scalar_t>(), *o1 = out[1].data_ptr<scalar_t>(), *o2 = out[2].data_ptr<scalar_t>(),
             *o3 = out[3].data_ptr<scalar_t>();
    row_tiles<scalar_t>(g.numel(), z, 5, [&](int64_t i0, int64_t i1, const std::vector<scalar_t*>& t) {
      a.gather(i0, i1, z, t[0]);
      b.gather(i0, i1, z, t[1]);
      c.gather(i0, i1, z, t[2]);
      e.gather(i0, i1, z, t[3]);
      spread(gs + i0, i1 - i0, z, t[4]);
      const scalar_t *m1 = t[0], *s1 = t[1], *m2 = t[2], *s2 = t[3], *gi = t[4];
      scalar_t *gm1 = o0 + i0 * z, *gs1 = o1 + i0 * z, *gm2 = o2 + i0 * z, *gs2 = o3 + i0 * z;
      _Pragma("omp simd")
      for (int64_t k = 0; k < (i1 - i0) * z; ++k) {
        // each factor divided by s_p before the product with grad (1 / s_p alone may overflow)
        const scalar_t r = s1[k] / s2[k], d = (m1[k] - m2[k]) / s2[k], gm = gi[k] * (d / s2[k]);
        gm1[k] = gm;
        gm2[k] = -gm;
        gs1[k] = gi[k] * ((r - scalar_t(1) / r) / s2[k]);
        gs2[k] = gi[k] * ((scalar_t(1) - r * r - d * d) / s2[k]);
      }
    });
  });
  return out;
}

inline void check_bernoulli_args(const Tensor& l, const Tensor& x) {
  TORCH_CHECK(l.dim() == 3 && unit_stride(l) && unit_stride(x) && x.sizes() == l.sizes() &&
                  x.scalar_type() == l.scalar_type(),
              "seqvae bernoulli_log_prob: logits and values (b, t, x) of one shape and dtype with contiguous units expected");
}

// sum_j x_j l_j - softplus(l_j) over the last dimension: (b, t). With softplus(l) = max(l, 0) +
// log1p(exp(-|l|)), each term is c l - log1p(exp(-|l|)), c = x - [l > 0], and c l is taken as 0
// where c is 0, so that an infinite logit gives the limit (0, or -inf where x is the unlikely value)
Tensor bernoulli_log_prob(const Tensor& l, const Tensor& x) {
  check_bernoulli_args(l, x);
  const int64_t d = l.size(2);
  Tensor out = at::empty({l.size(0), l.size(1)}, l.options());
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "bernoulli_log_prob", [&] {
    const Rows3<scalar_t> ls(l), xs(x);
    scalar_t* o = out.data_ptr<scalar_t>();
    row_tiles<scalar_t>(out.numel(), d, 2, [&](int64_t i0, int64_t i1, const std::vector<scalar_t*>& t) {
      ls.gather(i0, i1, d, t[0]);
      xs.gather(i0, i1, d, t[1]);
      scalar_t* a = t[0];
      const scalar_t* v = t[1];
      _Pragma("omp simd")
      for (int64_t k = 0; k < (i1 - i0) * d; ++k) {
        const bool pos = a[k] > scalar_t(0);
        const scalar_t c = pos ? v[k] - scalar_t(1) : v[k], n = pos ? -a[k] : a[k];
        const scalar_t cl = c * a[k];
        a[k] = (c != scalar_t(0) ? cl : scalar_t(0)) - log1p_<scalar_t>(exp_<scalar_t>(n));
      }
      row_sums(a, i1 - i0, d, o + i0);
    });
  });
  return out;
}

// its gradient for the logits given grad (b, t): grad (x - sigmoid(l)), (b, t, x)
Tensor bernoulli_log_prob_backward(const Tensor& grad, const Tensor& l, const Tensor& x) {
  check_bernoulli_args(l, x);
  const int64_t d = l.size(2);
  Tensor g = grad.contiguous();
  TORCH_CHECK(g.numel() == l.size(0) * l.size(1), "seqvae bernoulli_log_prob_backward: a (b, t) gradient expected");
  Tensor out = at::empty(l.sizes(), l.options());
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "bernoulli_log_prob_backward", [&] {
    const Rows3<scalar_t> ls(l), xs(x);
    const scalar_t* gs = g.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    row_tiles<scalar_t>(g.numel(), d, 3, [&](int64_t i0, int64_t i1, const std::vector<scalar_t*>& t) {
      ls.gather(i0, i1, d, t[0]);
      xs.gather(i0, i1, d, t[1]);
      spread(gs + i0, i1 - i0, d, t[2]);
      const scalar_t *a = t[0], *v = t[1], *gi = t[2];
      scalar_t* r = o + i0 * d;
      _Pragma("omp simd")
      for (int64_t k = 0; k < (i1 - i0) * d; ++k) r[k] = gi[k] * (v[k] - sigmoid_<scalar_t>(a[k]));
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------ DRAW
namespace {

// One head's filterbank constants (attention.Filterbanks): half_size (1, 2), offsets (n,),
// grid (s,), pad (2, 1, s) or an empty tensor, and {stride, height, width, far, log_max, sigma2_min}.
struct Filters {
  Tensor half_size, offsets, grid, pad;
  double stride, far, log_max, sigma2_min;
  int64_t height, width;
  Filters(const std::vector<Tensor>& t, const std::vector<double>& v)
      : half_size(t[0]), offsets(t[1]), grid(t[2]), pad(t[3]), stride(v[0]), far(v[3]), log_max(v[4]),
        sigma2_min(v[5]), height(static_cast<int64_t>(v[1])), width(static_cast<int64_t>(v[2])) {}
  bool padded() const { return pad.numel() > 0; }
};

// Filterbanks.forward_saving as one pass over each example (the same arithmetic, attention.py):
// returns {fy, fx, gamma, raw, e = exp(clamped logs) (b, 3), mu (b, 2, n), the rows' shift
// (b, 2, n), coef (b,), both filterbanks (b, 2, n, s), delta (b,), sigma2 (b,)}.
std::vector<Tensor> filters_forward(const Filters& fb, const Tensor& raw) {
  const int64_t b = raw.size(0), n = fb.offsets.size(0), size = fb.grid.size(0);
  Tensor both = at::empty({b, 2, n, size}, raw.options());
  Tensor e = at::empty({b, 3}, raw.options()), mu = at::empty({b, 2, n}, raw.options());
  Tensor shift = at::empty({b, 2, n}, raw.options()), coef = at::empty({b}, raw.options());
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "filters_forward", [&] {
    const Tensor half = fb.half_size.contiguous(), offsets = fb.offsets.contiguous();
    const scalar_t *hp = half.data_ptr<scalar_t>(), *op = offsets.data_ptr<scalar_t>();
    const scalar_t far = fb.far, log_max = fb.log_max, s2min = fb.sigma2_min, stride = fb.stride;
    const int64_t limits[2] = {fb.width, fb.height};
    at::parallel_for(0, b, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* r = raw.data_ptr<scalar_t>() + i * raw.stride(0);
        scalar_t* ei = e.data_ptr<scalar_t>() + i * 3;
        for (int j = 0; j < 3; ++j) ei[j] = std::exp(std::min(r[(2 + j) * raw.stride(1)], log_max));
        const scalar_t delta = std::min(ei[1] * stride, far);
        const scalar_t cf = scalar_t(1) / (std::max(ei[0], s2min) * scalar_t(-2));
        coef.data_ptr<scalar_t>()[i] = cf;
        for (int axis = 0; axis < 2; ++axis) {
          const scalar_t centre = hp[axis] + r[axis * raw.stride(1)] * hp[axis];
          for (int64_t k = 0; k < n; ++k) {
            const int64_t at = (i * 2 + axis) * n + k;
            const scalar_t m = centre + delta * op[k];
            mu.data_ptr<scalar_t>()[at] = m;
            const scalar_t mc = std::min(std::max(m, -far), far);
            scalar_t* row = both.data_ptr<scalar_t>() + at * size;
            scalar_t low = std::numeric_limits<scalar_t>::infinity();
            for (int64_t a = 0; a < limits[axis]; ++a) low = std::min(low, (a + 1 - mc) * (a + 1 - mc));
            shift.data_ptr<scalar_t>()[at] = low;
            scalar_t total = 0;
            _Pragma("omp simd reduction(+ : total)")
            for (int64_t a = 0; a < limits[axis]; ++a) {
              const scalar_t diff = a + 1 - mc;  // the logit is <= 0, and 0 at the nearest pixel
              row[a] = exp_<scalar_t>(std::min<scalar_t>((diff * diff - low) * cf, 0));
              total += row[a];
            }
            for (int64_t a = 0; a < limits[axis]; ++a) row[a] /= total;
            for (int64_t a = limits[axis]; a < size; ++a) row[a] = 0;
          }
        }
      }
    });
  });
  Tensor fx = both.select(1, 0).narrow(-1, 0, fb.width), fy = both.select(1, 1).narrow(-1, 0, fb.height);
  return {fy, fx, e.select(1, 2), raw, e, mu, shift, coef, both, e.select(1, 1) * fb.stride, e.select(1, 0)};
}

// Filterbanks.backward, one pass over each example: the gradient of raw (b, 5) given those of
// fy, fx and gamma; s = filters_forward's output (from s[at0])
Tensor filters_backward(const Filters& fb, const std::vector<Tensor>& s, size_t at0, const Tensor& dfy,
                        const Tensor& dfx, const Tensor& dgamma) {
  const Tensor &raw = s[at0 + 3], &e = s[at0 + 4], &mu = s[at0 + 5], &shift = s[at0 + 6], &coef = s[at0 + 7];
  const Tensor& both = s[at0 + 8];
  const int64_t b = raw.size(0), n = fb.offsets.size(0), size = fb.grid.size(0);
  Tensor draw = at::empty({b, 5}, raw.options());
  Tensor dfxc = dfx.contiguous(), dfyc = dfy.contiguous(), dgc = dgamma.contiguous();
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "filters_backward", [&] {
    const Tensor half = fb.half_size.contiguous(), offsets = fb.offsets.contiguous();
    const scalar_t *hp = half.data_ptr<scalar_t>(), *op = offsets.data_ptr<scalar_t>();
    const scalar_t far = fb.far, log_max = fb.log_max, s2min = fb.sigma2_min, stride = fb.stride;
    const int64_t limits[2] = {fb.width, fb.height};
    const scalar_t* grads[2] = {dfxc.data_ptr<scalar_t>(), dfyc.data_ptr<scalar_t>()};
    at::parallel_for(0, b, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* ei = e.data_ptr<scalar_t>() + i * 3;
        const scalar_t cf = coef.data_ptr<scalar_t>()[i];
        scalar_t dcoef = 0, ddelta = 0, dcentre[2] = {0, 0};
        for (int axis = 0; axis < 2; ++axis) {
          for (int64_t k = 0; k < n; ++k) {
            const int64_t at = (i * 2 + axis) * n + k;
            const scalar_t m = mu.data_ptr<scalar_t>()[at], low = shift.data_ptr<scalar_t>()[at];
            const scalar_t mc = std::min(std::max(m, -far), far);
            const scalar_t* row = both.data_ptr<scalar_t>() + at * size;
            const scalar_t* g = grads[axis] + (i * n + k) * limits[axis];
            scalar_t dot = 0;
            for (int64_t a = 0; a < limits[axis]; ++a) dot += g[a] * row[a];
            scalar_t dm = 0;
            for (int64_t a = 0; a < limits[axis]; ++a) {
              const scalar_t dl = row[a] * (g[a] - dot);  // through the softmax
              const scalar_t diff = a + 1 - mc;
              dcoef += dl * (diff * diff - low);
              dm += dl * diff;
            }
            dm *= -2 * cf;
            if (std::abs(m) > far) dm = 0;
            dcentre[axis] += dm;
            ddelta += dm * op[k];
          }
        }
        if (ei[1] * stride > far) ddelta = 0;
        scalar_t dsigma2 = dcoef * 2 * cf * cf;
        if (ei[0] < s2min) dsigma2 = 0;
        const scalar_t de[3] = {dsigma2, ddelta * stride, dgc.data_ptr<scalar_t>()[i]};
        const scalar_t* r = raw.data_ptr<scalar_t>() + i * raw.stride(0);
        scalar_t* out = draw.data_ptr<scalar_t>() + i * 5;
        out[0] = dcentre[0] * hp[0];
        out[1] = dcentre[1] * hp[1];
        for (int j = 0; j < 3; ++j) out[2 + j] = r[(2 + j) * raw.stride(1)] > log_max ? 0 : de[j] * ei[j];
      }
    });
  });
  return draw;
}

// DRAW's sizes as fused.py passes them (steps, b, d, z, c, h, w, R, P, read N, write N, patch)
// and its heads' filterbanks (none for a head without one)
struct DrawSizes {
  int64_t steps, b, d, nz, c, hh, wi, nr, nw, read_n, write_n, patch;
  std::optional<Filters> read_f, write_f;
  DrawSizes(const std::vector<int64_t>& v, const std::vector<Tensor>& read_t, const std::vector<double>& read_v,
            const std::vector<Tensor>& write_t, const std::vector<double>& write_v)
      : steps(v[0]), b(v[1]), d(v[2]), nz(v[3]), c(v[4]), hh(v[5]), wi(v[6]), nr(v[7]), nw(v[8]), read_n(v[9]),
        write_n(v[10]), patch(v[11]) {
    if (read_n > 0) read_f.emplace(read_t, read_v);
    if (write_n > 0) write_f.emplace(write_t, write_v);
  }
};

Tensor paste(const Tensor& fy, const Tensor& u, int64_t channels) {
  const int64_t b = fy.size(0), n = fy.size(1);
  if (channels == 1) return at::bmm(fy.transpose(1, 2), u).unsqueeze(1);
  return at::matmul(fy.transpose(1, 2).unsqueeze(1), u.view({b, channels, n, -1}));
}

// DRAW's forward over all glimpses for one block of rows (fused.py _draw_forward; eps drawn
// beforehand). Returns {canvas_T} and, per step, the read's saved tensors (11 of the filters,
// then u, r0) and the write's (11, then pm, u).
std::vector<std::vector<Tensor>> draw_forward_rows(
    const DrawSizes& sizes, const std::vector<Prod>& ps, const Tensor& x, const Tensor& canvas0, Tensor a_seq,
    Tensor enc_in, Tensor ce, Tensor hd, Tensor cd, Tensor g_enc, Tensor g_dec, Tensor tc_enc, Tensor tc_dec,
    Tensor eps, Tensor m_seq, Tensor v_seq, Tensor q_seq, Tensor z_seq) {
  const auto& [steps, b, d, nz, c, hh, wi, nr, nw, read_n, write_n, patch, read_f, write_f] = sizes;
  const bool read_fb = read_n > 0, write_fb = write_n > 0;
  const Prod &prod_a = ps.at(0), &prod_write = ps.at(1), &prod_enc = ps.at(2), &prod_q = ps.at(3), &prod_dz = ps.at(4);
  std::vector<std::vector<Tensor>> saved(1 + 2 * steps);
  Tensor xhat_views;
  if (read_fb) {
    v_seq.narrow(3, 0, c).copy_(x.transpose(1, 2).unsqueeze(0).expand({steps, b, hh, c, wi}));
    xhat_views = v_seq.narrow(3, c, c).transpose(2, 3);  // (t, b, c, h, w)
  }
  Tensor a0 = a_seq[0];
  prod_into(a0, hd[0], prod_a);
  Tensor canvas = canvas0;
  for (int64_t t = 0; t < steps; ++t) {
    Tensor a = a_seq[t];
    Tensor mean = m_seq[t];
    at::sigmoid_out(mean, canvas.narrow(1, 0, c));
    Tensor in_t = enc_in[t];
    if (read_fb) {
      Tensor xhat = xhat_views[t];
      at::sub_out(xhat, x, mean);
      std::vector<Tensor> f = filters_forward(*read_f, a.narrow(1, nw + 8 * d, 5));
      Tensor u = at::bmm(f[0], v_seq[t].view({b, hh, 2 * c * wi}));  // (b, n, 2c w)
      Tensor r0 = at::bmm(u.view({b, -1, wi}), f[1].transpose(1, 2));  // (b, n 2c, n)
      at::mul_out(lv(in_t.narrow(1, 0, nr)), r0.view({b, -1}), f[2].unsqueeze(-1));
      f.push_back(u);
      f.push_back(r0);
      saved[1 + t] = std::move(f);
    } else {
      in_t.narrow(1, 0, c * hh * wi).copy_(x.flatten(1));
      at::sub_out(lv(in_t.narrow(1, c * hh * wi, c * hh * wi)), x.flatten(1), mean.flatten(1));
    }
    Tensor gates = g_enc[t];
    prod_into(gates, in_t, prod_enc, a.narrow(1, nw, 4 * d));
    Tensor he = enc_in[t + 1].narrow(1, nr, d);
    lstm_forward(gates, ce[t], he, ce[t + 1], tc_enc[t]);
    Tensor q = q_seq[t];
    prod_into(q, he, prod_q);
    Tensor z = z_seq[t];
    at::addcmul_out(z, q.narrow(1, 0, nz), q.narrow(1, nz, nz).exp(), eps[t]);
    Tensor gd = g_dec[t];
    prod_into(gd, z, prod_dz, a.narrow(1, nw + 4 * d, 4 * d));
    lstm_forward(gd, cd[t], hd[t + 1], cd[t + 1], tc_dec[t]);
    Tensor an;
    if (t + 1 < steps) {
      an = a_seq[t + 1];
      prod_into(an, hd[t + 1], prod_a);
    } else {
      an = a_seq[t + 1].narrow(1, 0, nw);
      prod_into(an, hd[t + 1], prod_write);
    }
    Tensor update;
    if (write_fb) {
      std::vector<Tensor> f = filters_forward(*write_f, an.narrow(1, patch, 5));
      Tensor pm = an.narrow(1, 0, patch) / f[2].unsqueeze(-1);  // (b, c n n)
      Tensor u = at::bmm(pm.view({b, -1, write_n}), f[1]);  // (b, c n, w)
      const int64_t channels = patch / (write_n * write_n);
      update = paste(f[0], u, channels);
      f.push_back(pm);
      f.push_back(u);
      saved[1 + steps + t] = std::move(f);
    } else {
      update = an.narrow(1, 0, nw).view(canvas.sizes());
    }
    canvas = canvas + update;
  }
  saved[0] = {canvas};
  return saved;
}

// DRAW's backward over all glimpses for one block of rows (fused.py _draw_backward): fills
// da_seq (the gradients of A_t and of the gates) and dq_seq; returns {dcanvas_0, dh^enc_0,
// dc^enc_0, dh^dec_0, dc^dec_0}.
std::vector<Tensor> draw_backward_rows(
    const DrawSizes& sizes, const std::vector<Prod>& ps, const std::vector<std::vector<Tensor>>& saved,
    Tensor dcanvas, Tensor dhe, Tensor dce, const c10::optional<Tensor>& dhd_final, Tensor dcd,
    const c10::optional<Tensor>& dq_out, const c10::optional<Tensor>& dz_out, const c10::optional<Tensor>& draw_read,
    const c10::optional<Tensor>& draw_write, Tensor ce, Tensor cd, Tensor g_enc, Tensor g_dec, Tensor tc_enc,
    Tensor tc_dec, Tensor eps, Tensor m_seq, Tensor v_seq, Tensor q_seq, Tensor da_seq, Tensor dq_seq) {
  const auto& [steps, b, d, nz, c, hh, wi, nr, nw, read_n, write_n, patch, read_f, write_f] = sizes;
  const bool read_fb = read_n > 0, write_fb = write_n > 0;
  const Prod &by_a = ps.at(0), &by_enc = ps.at(1), &by_q = ps.at(2), &by_dz = ps.at(3);  // x W (each weight transposed)
  for (int64_t t = steps - 1; t >= 0; --t) {
    Tensor da = da_seq[t + 1];
    if (write_fb) {  // the write of step t (from h^dec_{t+1})
      const std::vector<Tensor>& f = saved[1 + steps + t];
      const Tensor &fy = f[0], &fx = f[1], &gamma = f[2], &pm = f[11], &u = f[12];
      const int64_t channels = patch / (write_n * write_n);
      Tensor dfy, du;
      if (channels == 1) {
        Tensor dup = dcanvas.select(1, 0);
        dfy = at::bmm(u, dup.transpose(1, 2));
        du = at::bmm(fy, dup);
      } else {
        dfy = at::einsum("bcnw,bchw->bnh", {u.view({b, channels, write_n, -1}), dcanvas});
        du = at::einsum("bnh,bchw->bcnw", {fy, dcanvas}).reshape({b, channels * write_n, -1});
      }
      Tensor dpm = at::bmm(du, fx.transpose(1, 2)).view({b, -1});
      Tensor dfx = at::bmm(pm.view({b, -1, write_n}).transpose(1, 2), du);
      Tensor dgamma = (dpm * pm).sum(1).div_(gamma).neg_();
      at::div_out(lv(da.narrow(1, 0, patch)), dpm, gamma.unsqueeze(-1));
      Tensor draw = filters_backward(*write_f, f, 0, dfy, dfx, dgamma);
      if (draw_write.has_value()) draw = draw + (*draw_write)[t];
      da.narrow(1, patch, 5).copy_(draw);
    } else {
      da.narrow(1, 0, nw).copy_(dcanvas.view({b, -1}));
    }
    Tensor dhd = prod(da, by_a);  // h^dec_{t+1}'s gradient from everything that read it
    if (t + 1 == steps && dhd_final.has_value()) dhd = dhd + *dhd_final;
    Tensor dgates = da_seq[t].narrow(1, nw + 4 * d, 4 * d);
    dcd = lstm_backward(dhd, dcd, g_dec[t], tc_dec[t], cd[t], dgates);
    Tensor dz = dz_out.has_value() ? prod(dgates, by_dz, (*dz_out)[t]) : prod(dgates, by_dz);
    Tensor dq = dq_seq[t];
    Tensor scale = q_seq[t].narrow(1, nz, nz).exp();
    if (dq_out.has_value()) {
      at::add_out(lv(dq.narrow(1, 0, nz)), (*dq_out)[t].narrow(1, 0, nz), dz);
      at::addcmul_out(lv(dq.narrow(1, nz, nz)), (*dq_out)[t].narrow(1, nz, nz), dz * eps[t], scale);
    } else {
      dq.narrow(1, 0, nz).copy_(dz);
      at::mul_out(lv(dq.narrow(1, nz, nz)), dz * eps[t], scale);
    }
    dhe = prod(dq, by_q, dhe);
    dgates = da_seq[t].narrow(1, nw, 4 * d);
    dce = lstm_backward(dhe, dce, g_enc[t], tc_enc[t], ce[t], dgates);
    Tensor dinp = prod(dgates, by_enc);  // (b, R + d): [r, h^enc_t-1]
    dhe = dinp.narrow(1, nr, d);
    Tensor dr = dinp.narrow(1, 0, nr);
    Tensor mean = m_seq[t];
    Tensor dxhat;
    if (read_fb) {
      const std::vector<Tensor>& f = saved[1 + t];
      const Tensor &fy = f[0], &fx = f[1], &gamma = f[2], &u = f[11], &r0 = f[12];
      Tensor dgamma = (dr * r0.view({b, -1})).sum(1);
      Tensor dr0 = (dr * gamma.unsqueeze(-1)).view({b, -1, read_n});  // (b, n 2c, n)
      Tensor du = at::bmm(dr0, fx).view({b, read_n, -1});  // (b, n, 2c w)
      Tensor dfx = at::bmm(dr0.transpose(1, 2), u.view({b, -1, wi}));
      Tensor dfy = at::bmm(du, v_seq[t].view({b, hh, -1}).transpose(1, 2));
      Tensor dv = at::bmm(fy.transpose(1, 2), du).view({b, hh, 2 * c, wi});
      dxhat = dv.narrow(2, c, c).transpose(1, 2);  // (b, c, h, w)
      Tensor draw = filters_backward(*read_f, f, 0, dfy, dfx, dgamma);
      if (draw_read.has_value()) draw = draw + (*draw_read)[t];
      da_seq[t].narrow(1, nw + 8 * d, 5).copy_(draw);
    } else {
      dxhat = dr.narrow(1, c * hh * wi, c * hh * wi).view({b, c, hh, wi});
    }
    dcanvas.narrow(1, 0, c).addcmul_(dxhat, mean * mean - mean);  // x^ = x - sigmoid(canvas)
  }
  Tensor dhd0 = prod(da_seq[0], by_a);
  return {dcanvas, dhe, dce, dhd0, dcd};
}

// The forward's saved tensors, per block of rows (opaque to Python)
struct DrawSaved {
  std::vector<std::vector<std::vector<Tensor>>> blocks;
};

}  // namespace

// DRAW's forward (fused.py _DrawSequence): the batch in `blocks` blocks of rows; eps is drawn
// here, step by step, before the loops (the step loop's random numbers). Returns the final canvas.
std::tuple<Tensor, DrawSaved> draw_forward(
    const Tensor& x, const Tensor& canvas0, Tensor a_seq, Tensor enc_in, Tensor ce, Tensor hd, Tensor cd, Tensor g_enc,
    Tensor g_dec, Tensor tc_enc, Tensor tc_dec, Tensor eps, Tensor m_seq, Tensor v_seq, Tensor q_seq, Tensor z_seq,
    const std::vector<c10::optional<Tensor>>& products, std::vector<int64_t> dims, std::vector<Tensor> read_t,
    std::vector<double> read_v, std::vector<Tensor> write_t, std::vector<double> write_v, int64_t blocks) {
  const DrawSizes sizes(dims, read_t, read_v, write_t, write_v);
  const std::vector<Prod> ps = prods_from(products);  // A, the last write, the encoder, the posterior, the decoder's z
  const int64_t b = sizes.b;
  for (int64_t t = 0; t < sizes.steps; ++t) eps[t].normal_();
  Tensor canvas = at::empty(canvas0.sizes(), x.options());
  DrawSaved saved;
  saved.blocks.resize(std::max<int64_t>(1, std::min(blocks, b)));
  by_blocks(b, blocks, [&](int64_t k, int64_t lo, int64_t n) {
    DrawSizes part = sizes;
    part.b = n;
    auto r = [&](const Tensor& t) { return rows_of(t, 1, lo, n, b); };
    saved.blocks[k] = draw_forward_rows(part, ps, x.narrow(0, lo, n), rows_of(canvas0, 0, lo, n, b), r(a_seq),
                                        r(enc_in), r(ce), r(hd), r(cd), r(g_enc), r(g_dec), r(tc_enc), r(tc_dec),
                                        r(eps), r(m_seq), r(v_seq), r(q_seq), r(z_seq));
    canvas.narrow(0, lo, n).copy_(saved.blocks[k][0][0]);
  });
  return {canvas, std::move(saved)};
}

// DRAW's backward (fused.py _DrawSequence), in the forward's blocks of rows: fills da_seq and
// dq_seq; returns {dcanvas_0, dh^enc_0, dc^enc_0, dh^dec_0, dc^dec_0}.
std::vector<Tensor> draw_backward(
    Tensor dcanvas, Tensor dhe, Tensor dce, const c10::optional<Tensor>& dhd_final, Tensor dcd,
    const c10::optional<Tensor>& dq_out, const c10::optional<Tensor>& dz_out, const c10::optional<Tensor>& draw_read,
    const c10::optional<Tensor>& draw_write, const DrawSaved& saved, Tensor ce, Tensor cd, Tensor g_enc,
    Tensor g_dec, Tensor tc_enc, Tensor tc_dec, Tensor eps, Tensor m_seq, Tensor v_seq, Tensor q_seq, Tensor da_seq,
    Tensor dq_seq, const std::vector<c10::optional<Tensor>>& products, std::vector<int64_t> dims,
    std::vector<Tensor> read_t, std::vector<double> read_v, std::vector<Tensor> write_t, std::vector<double> write_v) {
  const DrawSizes sizes(dims, read_t, read_v, write_t, write_v);
  const std::vector<Prod> ps = prods_from(products);
  const int64_t b = sizes.b, blocks = static_cast<int64_t>(saved.blocks.size());
  std::vector<std::vector<Tensor>> out(blocks);
  by_blocks(b, blocks, [&](int64_t k, int64_t lo, int64_t n) {
    DrawSizes part = sizes;
    part.b = n;
    auto r = [&](const Tensor& t) { return rows_of(t, 1, lo, n, b); };
    auto r0 = [&](const Tensor& t) { return rows_of(t, 0, lo, n, b); };
    out[k] = draw_backward_rows(part, ps, saved.blocks[k], r0(dcanvas), r0(dhe), r0(dce), rows_of(dhd_final, 0, lo, n, b),
                                r0(dcd), rows_of(dq_out, 1, lo, n, b), rows_of(dz_out, 1, lo, n, b),
                                rows_of(draw_read, 1, lo, n, b), rows_of(draw_write, 1, lo, n, b), r(ce), r(cd),
                                r(g_enc), r(g_dec), r(tc_enc), r(tc_dec), r(eps), r(m_seq), r(v_seq), r(q_seq),
                                r(da_seq), r(dq_seq));
  });
  if (blocks == 1) return out[0];
  std::vector<Tensor> joined;
  for (size_t i = 0; i < out[0].size(); ++i) {
    std::vector<Tensor> parts;
    for (const auto& o : out) parts.push_back(o[i]);
    joined.push_back(i == 0 ? dcanvas : at::cat(parts));  // dcanvas: its blocks were updated in place
  }
  return joined;
}

// The loops run without the GIL: their blocks' threads may need it (an operation under a Python
// dispatch mode, e.g. FlopCounterMode, runs Python code), and the calling thread only waits for them.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vrnn_forward", &vrnn_forward, py::call_guard<py::gil_scoped_release>());
  m.def("vrnn_backward", &vrnn_backward, py::call_guard<py::gil_scoped_release>());
  m.def("bias_act", &bias_act, py::call_guard<py::gil_scoped_release>());
  m.def("grad_colsum", &grad_colsum, py::arg("g"), py::arg("act"), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("is_binary", &is_binary, py::call_guard<py::gil_scoped_release>());
  m.def("bernoulli_log_prob", &bernoulli_log_prob, py::call_guard<py::gil_scoped_release>());
  m.def("bernoulli_log_prob_backward", &bernoulli_log_prob_backward, py::call_guard<py::gil_scoped_release>());
  m.def("normal_kl", &normal_kl, py::call_guard<py::gil_scoped_release>());
  m.def("normal_kl_backward", &normal_kl_backward, py::call_guard<py::gil_scoped_release>());
  m.def("draw_forward", &draw_forward, py::call_guard<py::gil_scoped_release>());
  m.def("filters_forward", [](std::vector<Tensor> t, std::vector<double> v, const Tensor& raw) {
    return filters_forward(Filters(t, v), raw);
  });
  m.def("filters_backward", [](std::vector<Tensor> t, std::vector<double> v, std::vector<Tensor> saved,
                               const Tensor& dfy, const Tensor& dfx, const Tensor& dgamma) {
    return filters_backward(Filters(t, v), saved, 0, dfy, dfx, dgamma);
  });
  m.def("draw_backward", &draw_backward, py::call_guard<py::gil_scoped_release>());
  py::class_<DrawSaved>(m, "DrawSaved").def("blocks_count", [](const DrawSaved& s) { return s.blocks.size(); });
}

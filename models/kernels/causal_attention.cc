// Fused causal self-attention for XLA:CPU (float32), forward and backward, as XLA FFI
// handlers. Built and loaded by models/cpu_attention.py; see its docstring for why.
//
// Per (batch, head) problem, with S = sequence length, D = head dim, q pre-scaled:
//   forward   L = Q K^T (lower triangle only), P = softmax_row(L) with P[i, j > i] = 0,
//             O = P V                                   (the row softmax is exact, no online
//             rescaling: P is an output, saved for the backward pass like
//             models/fast_attention.py does)
//   backward  dP = dO V^T, D_i = sum_j P_ij dP_ij, dS = P * (dP - D)       (Dao et al. 2022,
//             FlashAttention, app. B.2 / Alg. 4 with P saved instead of recomputed)
//             dQ = dS K, dK = dS^T Q, dV = P^T dO
// Every product skips the tiles above the causal diagonal (half the FLOPs of the dense
// batched dots XLA runs) and the softmax is one pass over the row. Layout: q, k, v, o and
// their cotangents are [b, s, h, d] row-major (the model's own layout, read in place with a
// row stride of h * d); P is [b, h, s, s]. Needs s % 8 == 0 and d % 8 == 0 (the Python side
// checks). The matmul micro-kernel is a register tile of up to 6 rows x 16 columns written
// with GCC vector extensions, so -march=native picks AVX2 + FMA (or AVX-512, or SSE).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
inline float hsum(v8 x) { float s = 0; for (int i = 0; i < 8; ++i) s += x[i]; return s; }
inline float hmax(v8 x) { float m = x[0]; for (int i = 1; i < 8; ++i) m = std::max(m, x[i]); return m; }

// e^x for 8 lanes: Cephes expf (x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, then
// scaled by 2^n through the exponent bits); relative error ~1e-7 on [-87, 88].
inline v8 exp8(v8 x) {
  x = x < -87.0f ? v8{} - 87.0f : x;
  x = x > 88.0f ? v8{} + 88.0f : x;
  v8 fx = x * 1.44269504088896341f + 0.5f;
  v8i ti = __builtin_convertvector(fx, v8i);
  v8 n = __builtin_convertvector(ti, v8);
  n += __builtin_convertvector(n > fx, v8);  // floor: a true lane is -1
  v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 y = v8{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// A strided matrix view: element (r, c) at data[r * rs + c * cs] (a transpose is a view).
struct View {
  const float* data;
  int64_t rs, cs;
  float at(int64_t r, int64_t c) const { return data[r * rs + c * cs]; }
};

constexpr int kRows = 6;   // rows of a register tile
constexpr int kCols = 16;  // columns of a packed B panel (two 8-lane vectors)

// C[r, 0:8*NV] = sum_{k < kn} A[r, k] B[k, 0:8*NV], r < R, with A read in place (element
// (r, k) at a[r * ars + k * aks]) and B from a packed [kn][kCols] panel (contiguous: read in
// place, a row stride of h * d floats = 1 KB maps a whole panel onto 4 of L1's 64 sets).
template <int R, int NV>
void tile(const float* a, int64_t ars, int64_t aks, const float* bp, int64_t kn, float* c,
          int64_t ldc) {
  v8 acc[R][NV] = {};
  for (int64_t k = 0; k < kn; ++k) {
    v8 bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load8(bp + k * kCols + 8 * v);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += a[r * ars + k * aks] * bk[v];
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store8(c + r * ldc + 8 * v, acc[r][v]);
}

template <int NV>
void tile_rows(int rows, const float* a, int64_t ars, int64_t aks, const float* bp, int64_t kn,
               float* c, int64_t ldc) {
  switch (rows) {
    case 6: return tile<6, NV>(a, ars, aks, bp, kn, c, ldc);
    case 5: return tile<5, NV>(a, ars, aks, bp, kn, c, ldc);
    case 4: return tile<4, NV>(a, ars, aks, bp, kn, c, ldc);
    case 3: return tile<3, NV>(a, ars, aks, bp, kn, c, ldc);
    case 2: return tile<2, NV>(a, ars, aks, bp, kn, c, ldc);
    default: return tile<1, NV>(a, ars, aks, bp, kn, c, ldc);
  }
}

// Which part of a product a row block [r0, r0 + rows) needs.
enum class Part {
  kLowerCols,  // columns 0 .. r0 + rows (rounded up to 8): L = Q K^T and dP = dO V^T
  kLowerK,     // contraction 0 .. r0 + rows: P V and dS K (A is zero right of the diagonal)
  kUpperK,     // contraction r0 .. kdim: dS^T Q and P^T dO (A is zero left of the diagonal)
};

int64_t panels(int64_t n) { return (n + kCols - 1) / kCols; }

// Floats of scratch ``causal_matmul`` needs for a contraction of kdim and n columns.
int64_t matmul_scratch(int64_t kdim, int64_t n) { return kdim * panels(n) * kCols; }

// C = A B (m x n, n % 8 == 0, contraction kdim), only the causal part; C row-major (ldc).
// B is packed once into column panels; A is read in place.
void causal_matmul(Part part, int64_t m, int64_t n, int64_t kdim, View a, View b, float* c,
                   int64_t ldc, float* scratch) {
  float* bp = scratch;  // panel j: [kdim][kCols] at bp + j * kdim * kCols, zero padded
  for (int64_t col = 0; col < n; col += kCols) {
    float* panel = bp + (col / kCols) * kdim * kCols;
    for (int64_t k = 0; k < kdim; ++k)
      for (int64_t j = 0; j < kCols; ++j) panel[k * kCols + j] = col + j < n ? b.at(k, col + j) : 0.0f;
  }
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    int rows = static_cast<int>(std::min<int64_t>(kRows, m - r0));
    int64_t k0 = part == Part::kUpperK ? r0 : 0;
    int64_t k1 = part == Part::kLowerK ? std::min(kdim, r0 + rows) : kdim;
    int64_t cols = part == Part::kLowerCols ? std::min<int64_t>(n, (r0 + rows + 7) / 8 * 8) : n;
    const float* ar = a.data + r0 * a.rs + k0 * a.cs;
    float* cr = c + r0 * ldc;
    for (int64_t col = 0; col < cols; col += kCols) {
      const float* panel = bp + (col / kCols) * kdim * kCols + k0 * kCols;
      if (cols - col >= kCols) tile_rows<2>(rows, ar, a.rs, a.cs, panel, k1 - k0, cr + col, ldc);
      else tile_rows<1>(rows, ar, a.rs, a.cs, panel, k1 - k0, cr + col, ldc);
    }
  }
}

// Row i of the s x s logits: P[i, :] = softmax(L[i, 0..i]), zeros right of the diagonal.
void softmax_rows(int64_t s, float* p) {
  for (int64_t i = 0; i < s; ++i) {
    float* row = p + i * s;
    int64_t n = i + 1, full = n / 8 * 8, padded = (n + 7) / 8 * 8;
    for (int64_t j = n; j < padded; ++j) row[j] = -3.0e38f;  // masked lanes of the last vector
    v8 mv = v8{} - 3.0e38f;
    for (int64_t j = 0; j < padded; j += 8) { v8 x = load8(row + j); mv = x > mv ? x : mv; }
    float mx = hmax(mv);
    v8 sv{};
    for (int64_t j = 0; j < padded; j += 8) {
      v8 e = exp8(load8(row + j) - mx);
      if (j >= full) for (int t = static_cast<int>(n - j); t < 8; ++t) e[t] = 0.0f;
      store8(row + j, e);
      sv += e;
    }
    float inv = 1.0f / hsum(sv);
    for (int64_t j = 0; j < padded; j += 8) store8(row + j, load8(row + j) * inv);
    std::fill(row + padded, row + s, 0.0f);
  }
}

// dS = P * (dP - D), D_i = sum_j P_ij dP_ij; in place over dP (lower triangle, zeros above).
void softmax_backward_rows(int64_t s, const float* p, float* dp) {
  for (int64_t i = 0; i < s; ++i) {
    const float* prow = p + i * s;
    float* row = dp + i * s;
    int64_t padded = (i + 8) / 8 * 8;  // P is zero right of the diagonal, so padding is exact
    v8 dv{};
    for (int64_t j = 0; j < padded; j += 8) dv += load8(prow + j) * load8(row + j);
    float delta = hsum(dv);
    for (int64_t j = 0; j < padded; j += 8)
      store8(row + j, load8(prow + j) * (load8(row + j) - delta));
    std::fill(row + padded, row + s, 0.0f);
  }
}

struct Shape {
  int64_t b, s, h, d;
  int64_t stride() const { return h * d; }  // between rows of one head in [b, s, h, d]
  int64_t offset(int64_t prob) const { return (prob / h) * s * h * d + (prob % h) * d; }
};

Shape shape_of(const ffi::Buffer<ffi::F32>& x) {
  auto dims = x.dimensions();
  return {dims[0], dims[1], dims[2], dims[3]};
}

// Runs fn(problem, scratch) for every (batch, head) on `threads` threads (the caller is one).
template <typename Fn>
void for_each_problem(int64_t problems, int64_t threads, size_t scratch_floats, Fn fn) {
  threads = std::max<int64_t>(1, std::min(threads, problems));
  auto work = [&](int64_t t) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t prob = t; prob < problems; prob += threads) fn(prob, scratch.data());
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs,
                   int64_t threads) {
  const Shape sh = shape_of(q);
  const int64_t s = sh.s, d = sh.d, ld = sh.stride();
  if (s % 8 || d % 8) return ffi::Error::InvalidArgument("seq len and head dim must be multiples of 8");
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  float *od = out->typed_data(), *pd = probs->typed_data();
  const int64_t scratch = std::max(matmul_scratch(d, s), matmul_scratch(s, d));
  for_each_problem(sh.b * sh.h, threads, scratch, [&](int64_t prob, float* work) {
    const int64_t off = sh.offset(prob);
    float* p = pd + prob * s * s;
    causal_matmul(Part::kLowerCols, s, s, d, {qd + off, ld, 1}, {kd + off, 1, ld}, p, s, work);  // L = Q K^T
    softmax_rows(s, p);
    causal_matmul(Part::kLowerK, s, d, s, {p, s, 1}, {vd + off, ld, 1}, od + off, ld, work);  // O = P V
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, int64_t threads) {
  const Shape sh = shape_of(q);
  const int64_t s = sh.s, d = sh.d, ld = sh.stride();
  if (s % 8 || d % 8) return ffi::Error::InvalidArgument("seq len and head dim must be multiples of 8");
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const float *pd = probs.typed_data(), *gd = dout.typed_data();
  float *dqd = dq->typed_data(), *dkd = dk->typed_data(), *dvd = dv->typed_data();
  const int64_t scratch = std::max(matmul_scratch(d, s), matmul_scratch(s, d));
  for_each_problem(sh.b * sh.h, threads, scratch + s * s, [&](int64_t prob, float* work) {
    const int64_t off = sh.offset(prob);
    const float* p = pd + prob * s * s;
    float* ds = work + scratch;
    causal_matmul(Part::kLowerCols, s, s, d, {gd + off, ld, 1}, {vd + off, 1, ld}, ds, s, work);  // dP = dO V^T
    softmax_backward_rows(s, p, ds);                                                             // dS
    causal_matmul(Part::kLowerK, s, d, s, {ds, s, 1}, {kd + off, ld, 1}, dqd + off, ld, work);   // dQ = dS K
    causal_matmul(Part::kUpperK, s, d, s, {ds, 1, s}, {qd + off, ld, 1}, dkd + off, ld, work);   // dK = dS^T Q
    causal_matmul(Part::kUpperK, s, d, s, {p, 1, s}, {gd + off, ld, 1}, dvd + off, ld, work);    // dV = P^T dO
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxCausalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxCausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

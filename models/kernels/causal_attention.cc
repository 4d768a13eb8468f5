// Fused causal self-attention for XLA:CPU (float32), forward and backward, as XLA FFI
// handlers: FlashAttention-2 (Dao 2023, Alg. 1 forward, Alg. 2 backward) on CPU cores.
// Built and loaded by models/cpu_attention.py; see its docstring for why.
//
// Per (batch, head) problem (one thread each), q pre-scaled, queries in blocks of kBq rows,
// keys in blocks of kBk (a multiple of kBq, so a visited key block never starts after its
// query block), only blocks on or below the causal diagonal:
//   forward   S = Q_i K_j^T, m' = max(m, rowmax S), P = exp(S - m'),
//             l' = l e^(m - m') + rowsum P, O_i' = O_i e^(m - m') + P V_j;
//             O_i = O_i / l, LSE_i = m + log l                    (saved for the backward)
//   backward  D = rowsum(dO o O); per tile P = exp(S - LSE), dP = dO_i V_j^T,
//             dS = P o (dP - D), dQ_i += dS K_j, dK_j += dS^T Q_i, dV_j += P^T dO_i
// Attention statistics (forward, optional, for the problems of the first `stats_rows` batch
// rows): per query the entropy H = LSE - sum_j P_j S_j and the mean attended distance
// sum_j P_j |i - j| (positions), both accumulated online like l (the sums of e^(S - m) S and
// e^(S - m) |i - j| are rescaled by e^(m - m') with it), so they cost one pass of the tiles
// that are computed anyway; models/blockwise.py's blockwise_stats does the same in XLA.
// Memory: O(block) scratch per thread, never an s x s matrix. Inside the diagonal tile the
// products skip the kRows x 16-column register tiles above the diagonal (half the FLOPs
// of the dense batched dots XLA runs). Layout: q, k, v, o and their cotangents are
// [b, s, h, d] row-major (the model's layout, read in place with a row stride of h * d);
// LSE is [b, h, s]. Needs s % 8 == 0 and d % 8 == 0 (the Python side checks). Optional
// distance bias (ALiBi, T5 buckets: posenc.base.PositionalEncoding.distance_bias), added to
// S in both passes from the positions: bias = -slope_h |i - j| + table_h[clamp(i - j, 0, T-1)];
// the backward also returns its gradients, d slope_h = -sum dS |i - j|, d table_h[n] = sum of
// dS over the pairs whose clamped distance is n. The matmul
// micro-kernel and the softmax passes use GCC vectors of 8 floats (AVX2 + FMA under
// -march=native; a declared vector type is not widened), and of 16 floats where the compiler
// targets AVX-512.
// bfloat16 forward (the same handlers with a _Bf16 suffix): q, k, v in bf16, S = Q K^T and
// O += P V as bf16 products accumulated in float32 (P rounded to bf16 for the second, as
// XLA's bf16 attention does), softmax and output in float32. Where the CPU has AVX512_BF16
// each pair of products is one VDPBF16PS lane (Intel SDM, "VDPBF16PS": dst += a[2i] b[2i] +
// a[2i+1] b[2i+1]); elsewhere the same pairs are widened to float32 and multiplied (exact:
// a bf16 x bf16 product fits in float32's mantissa). The backward is float32's.
// Piecewise RoPE logits (LenxPiecewiseAttentionForward[Bf16], forward only; Pieces below):
// S[i, j] = Q_c[i] . K_c[j] with queries and keys rotated per part c (in Python, once per
// sequence) and c chosen per pair from the positions, or the pair masked; a tile whose
// pairs all take one part costs one product, a tile of only masked pairs is skipped (a
// Lambda mask then costs O(s x window)), and only the tiles where parts meet classify
// pairs one by one and compute every part they use.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LENX_NATIVE_BF16 1
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdlib>
#include <string_view>
#define LENX_AMX 1
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#ifdef __AVX512F__
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
using vrow = v16;  // the softmax passes' vector: one 512-bit register
#else
using vrow = v8;
#endif

// Helpers over a float vector type V (v8, or v16 with AVX-512); V's int vector is what its
// comparisons return.
template <typename V> constexpr int64_t kLanes = sizeof(V) / sizeof(float);
template <typename V> using IntOf = decltype(V{} < V{});
template <typename V> inline V loadv(const float* p) { V r; std::memcpy(&r, p, sizeof r); return r; }
template <typename V> inline void storev(float* p, V x) { std::memcpy(p, &x, sizeof x); }
inline v8 load8(const float* p) { return loadv<v8>(p); }
inline void store8(float* p, v8 x) { storev(p, x); }
// op over x's lanes as a tree (halves combined, then quarters, ...): a chain of log2(lanes)
// operations, where a lane-by-lane fold of 16 lanes was a chain of 16 dependent scalar ones
// per row and tile (the trees and the two-chain row max took an 8k bf16 forward on the AMX
// Xeon from 0.282 to 0.253 s).
template <typename V, typename Op>
inline float reduce(V x, Op op) {
  if constexpr (kLanes<V> == 16)
    return reduce(op(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7),
                     __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15)), op);
  else if constexpr (kLanes<V> == 8)
    return reduce(op(__builtin_shufflevector(x, x, 0, 1, 2, 3),
                     __builtin_shufflevector(x, x, 4, 5, 6, 7)), op);
  else
    return op(op(x[0], x[2]), op(x[1], x[3]));
}
template <typename V> inline float hsum(V x) { return reduce(x, [](auto a, auto b) { return a + b; }); }
template <typename V> inline V vmax(V a, V b) { return a > b ? a : b; }
template <typename V> inline float hmax(V x) {
  return reduce(x, [](auto a, auto b) { return a > b ? a : b; });
}

// e^x per lane for x <= 88 (here x <= 0 up to rounding: logits minus their running max, or
// minus LSE): Cephes expf (x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, then scaled
// by 2^n through the exponent bits); relative error ~1e-7. n = x log2(e) rounded to nearest
// by adding 1.5 * 2^23 (the float's last mantissa bits are then n, as an integer), so n and
// 2^n come from one sum: 17 vector operations, where a floor through integer conversions and
// a clamp at 88 took 25 (the softmax passes run at the vector units' throughput, ~1 cycle a
// key per row on the AMX Xeon: benchmarks/README.md). Width-independent: 8 and 16 lanes give
// the same values.
template <typename V>
inline V expv(V x) {
  using VI = IntOf<V>;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  const auto underflow = x < -87.0f;  // e^x < 1.7e-38: exactly 0 (a masked logit adds nothing)
  x = underflow ? V{} - 87.0f : x;
  const V t = x * 1.44269504088896341f + kMagic;
  const V n = t - kMagic;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  VI bits;
  std::memcpy(&bits, &t, sizeof bits);  // kMagic + n: its low bits are n + 0x400000
  bits = (bits + (127 - 0x4B400000)) << 23;  // (n + 127) << 23: 2^n
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? V{} : y * scale;
}

// x's first `count` lanes, zeros after them: a vector select (writing single lanes sent the
// vector through the stack, ~18 % of the softmax pass's samples under perf).
template <typename V>
inline V first_lanes(V x, int64_t count) {
  IntOf<V> lane;
  for (int i = 0; i < kLanes<V>; ++i) lane[i] = i;
  return lane < static_cast<int32_t>(count) ? x : V{};
}

// A strided matrix view: element (r, c) at data[r * rs + c * cs] (a transpose is a view).
template <typename T>
struct ViewT {
  const T* data;
  int64_t rs, cs;
};
using View = ViewT<float>;

using bf16 = uint16_t;  // bfloat16 bits (XLA FFI's native type for BF16)

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, sizeof f); return f; }

// Round to nearest even (finite inputs: the probabilities of P).
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<bf16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// acc + a_lo b_lo + a_hi b_hi per lane: a = one bf16 pair (low half first) for all lanes,
// b = 8 pairs (one per output column).
inline v8 dot_pairs(v8 acc, uint32_t a, v8i b) {
#ifdef LENX_NATIVE_BF16
  return (v8)_mm256_dpbf16_ps((__m256)acc, (__m256bh)_mm256_set1_epi32(static_cast<int>(a)),
                              (__m256bh)b);
#else
  v8 b_lo, b_hi;
  v8i lo = b << 16, hi = b & static_cast<int32_t>(0xffff0000u);
  std::memcpy(&b_lo, &lo, sizeof b_lo);
  std::memcpy(&b_hi, &hi, sizeof b_hi);
  return acc + bits_to_float(a << 16) * b_lo + bits_to_float(a & 0xffff0000u) * b_hi;
#endif
}

#ifdef __AVX512F__
constexpr int kRows = 8;   // rows of a register tile: 8 accumulators cover the FMA latency
#else
constexpr int kRows = 6;   // rows of a register tile (x 2 vectors: 12 of AVX2's 16 registers)
#endif
constexpr int kCols = 16;  // columns of a packed B panel (two 8-lane vectors; one on AVX-512)

// C[r, 0:8*NV] (+)= sum_{k < kn} A[r, k] B[k, 0:8*NV], r < R, with A read in place
// (element (r, k) at a[r * ars + k * aks]) and B from a packed [kn][kCols] panel
// (contiguous; read in place, a row stride of h * d floats = 1 KB maps a whole panel onto 4
// of L1's 64 sets).
// With AVX-512 a 16-column panel row is one 512-bit vector, so a full-width tile (NV == 2)
// keeps one accumulator per row, not two 256-bit halves: the same products in the same
// order per lane (results unchanged), in half the instructions. It pays where the core
// executes 512-bit FMAs at full width (AMD Zen 5, Intel server cores; with 256-bit tiles
// the kernel's 16k evaluation step took 1.1x (bf16) / 1.3x (f32) XLA's on a Zen 5 EPYC) and
// costs nothing where it splits them in two (Zen 4, paired against XLA: 16k evaluation level
// in bf16, faster in float32, 1.28x vs 1.11x XLA's step, likely from the 8 accumulators).

template <int R, int NV>
void tile(const float* a, int64_t ars, int64_t aks, const float* bp, int64_t kn, float* c,
          int64_t ldc, bool accumulate) {
#ifdef __AVX512F__
  if constexpr (NV == 2) {
    v16 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = accumulate ? loadv<v16>(c + r * ldc) : v16{};
    for (int64_t k = 0; k < kn; ++k) {
      const v16 bk = loadv<v16>(bp + k * kCols);
      for (int r = 0; r < R; ++r) acc[r] += a[r * ars + k * aks] * bk;
    }
    for (int r = 0; r < R; ++r) storev(c + r * ldc, acc[r]);
    return;
  }
#endif
  v8 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load8(c + r * ldc + 8 * v) : v8{};
  for (int64_t k = 0; k < kn; ++k) {
    v8 bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load8(bp + k * kCols + 8 * v);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] += a[r * ars + k * aks] * bk[v];
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store8(c + r * ldc + 8 * v, acc[r][v]);
}

// The bf16 tile: as above over kn (even) contraction indices taken in pairs, A bf16 with its
// pairs contiguous (aks == 1), B packed in pairs (PairPanels).
template <int R, int NV>
void tile(const bf16* a, int64_t ars, int64_t aks, const uint32_t* bp, int64_t kn, float* c,
          int64_t ldc, bool accumulate) {
  (void)aks;
#if defined(LENX_NATIVE_BF16) && defined(__AVX512F__)
  if constexpr (NV == 2) {  // one 512-bit VDPBF16PS per row (see the float32 tile)
    __m512 acc[R];
    for (int r = 0; r < R; ++r)
      acc[r] = accumulate ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
    for (int64_t p = 0; p < kn / 2; ++p) {
      const __m512bh bk = (__m512bh)_mm512_loadu_si512(bp + p * kCols);
      for (int r = 0; r < R; ++r) {
        uint32_t ap;
        std::memcpy(&ap, a + r * ars + 2 * p, sizeof ap);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(ap)), bk);
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(c + r * ldc, acc[r]);
    return;
  }
#endif
  v8 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load8(c + r * ldc + 8 * v) : v8{};
  for (int64_t p = 0; p < kn / 2; ++p) {
    v8i bk[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bk[v], bp + p * kCols + 8 * v, sizeof bk[v]);
    for (int r = 0; r < R; ++r) {
      uint32_t ap;
      std::memcpy(&ap, a + r * ars + 2 * p, sizeof ap);
      for (int v = 0; v < NV; ++v) acc[r][v] = dot_pairs(acc[r][v], ap, bk[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store8(c + r * ldc + 8 * v, acc[r][v]);
}

template <int NV, typename TA, typename TB>
void tile_rows(int rows, const TA* a, int64_t ars, int64_t aks, const TB* bp, int64_t kn,
               float* c, int64_t ldc, bool acc) {
  static_assert(kRows <= 8);
  switch (rows) {
    case 8: return tile<8, NV>(a, ars, aks, bp, kn, c, ldc, acc);
    case 7: return tile<7, NV>(a, ars, aks, bp, kn, c, ldc, acc);
    case 6: return tile<6, NV>(a, ars, aks, bp, kn, c, ldc, acc);
    case 5: return tile<5, NV>(a, ars, aks, bp, kn, c, ldc, acc);
    case 4: return tile<4, NV>(a, ars, aks, bp, kn, c, ldc, acc);
    case 3: return tile<3, NV>(a, ars, aks, bp, kn, c, ldc, acc);
    case 2: return tile<2, NV>(a, ars, aks, bp, kn, c, ldc, acc);
    default: return tile<1, NV>(a, ars, aks, bp, kn, c, ldc, acc);
  }
}

// Which part of a product over one (query block, key block) tile is causal. Query row r
// sees key column c when c <= r + diag (diag = first query - first key of the tile).
enum class Part {
  kCols,    // C [queries x keys], columns c < r + diag + 1: S = Q K^T, dP = dO V^T
  kKeys,    // C [queries x d] = A [queries x keys] B, contraction c < r + diag + 1: P V, dS K
  kTrKeys,  // C [keys x d] = A^T B, A [queries x keys], contraction r >= c - diag: dS^T Q, P^T dO
};

int64_t padded16(int64_t n) { return (n + kCols - 1) / kCols * kCols; }

// B packed into column panels of kCols: panel j at data + j * stride, its row k at + k * kCols
// (contiguous, zero padded). Packed once per problem and shared by every tile.
struct Panels {
  static constexpr int64_t kStep = 1;  // contraction indices per packed row
  using A = float;                     // the element type of the A operand it multiplies
  const float* data;
  int64_t stride;
  Panels at(int64_t row0, int64_t col0) const {  // col0 a multiple of kCols
    return {data + (col0 / kCols) * stride + row0 * kCols, stride};
  }
};

// B (kdim x n, kdim even) packed for bf16 pair products: panel j (columns kCols j ..) at
// data + j * stride, its pair-row p (rows 2p, 2p + 1) at + p * kCols, one uint32 per column:
// B[2p, col] in the low half, B[2p + 1, col] in the high half (VDPBF16PS's pairing).
struct PairPanels {
  static constexpr int64_t kStep = 2;
  using A = bf16;
  const uint32_t* data;
  int64_t stride;
  PairPanels at(int64_t row0, int64_t col0) const {  // row0 even, col0 a multiple of kCols
    return {data + (col0 / kCols) * stride + row0 / 2 * kCols, stride};
  }
};

// The 8 x 8 block rows[0..8) transposed in registers (unpack, then 2- and 4-lane shuffles).
inline void transpose8(v8 r[8]) {
  const v8i lo1{0, 8, 1, 9, 4, 12, 5, 13}, hi1{2, 10, 3, 11, 6, 14, 7, 15};
  const v8i lo2{0, 1, 8, 9, 4, 5, 12, 13}, hi2{2, 3, 10, 11, 6, 7, 14, 15};
  const v8i lo4{0, 1, 2, 3, 8, 9, 10, 11}, hi4{4, 5, 6, 7, 12, 13, 14, 15};
  v8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], lo2);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], hi2);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], lo2);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], hi2);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shuffle(u[i], u[i + 4], lo4);
    r[i + 4] = __builtin_shuffle(u[i], u[i + 4], hi4);
  }
}

// Packs the kdim x n matrix b into dst (padded16(n) * kdim floats, the last panel's padding
// zero), reading the source along its contiguous axis: rows of b when cs == 1 (16-float
// copies); else b is a transposed view (rs == 1, e.g. K^T of K) and 8 x 8 blocks are
// transposed in registers (needs kdim % 8 == 0 and n % 8 == 0).
Panels pack(View b, int64_t kdim, int64_t n, float* dst) {
  const int64_t stride = kdim * kCols, full = n / kCols * kCols;
  if (n % kCols) std::fill(dst + full * kdim, dst + padded16(n) * kdim, 0.0f);
  if (b.cs == 1) {
    for (int64_t k = 0; k < kdim; ++k) {
      const float* src = b.data + k * b.rs;
      for (int64_t col = 0; col < full; col += kCols)
        std::memcpy(dst + (col / kCols) * stride + k * kCols, src + col, kCols * sizeof(float));
      if (full < n)
        std::memcpy(dst + full * kdim + k * kCols, src + full, (n - full) * sizeof(float));
    }
    return {dst, stride};
  }
  for (int64_t c = 0; c < n; c += 8) {
    float* out = dst + (c / kCols) * stride + c % kCols;
    for (int64_t k = 0; k < kdim; k += 8) {
      v8 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(b.data + (c + i) * b.cs + k);
      transpose8(r);
      for (int i = 0; i < 8; ++i) store8(out + (k + i) * kCols, r[i]);
    }
  }
  return {dst, stride};
}

// bf16 operands of the forward, packed in pairs. K^T: the pair (K[c, 2p], K[c, 2p + 1]) is
// already one 32-bit word of K's row c, so this is a transpose of words.
PairPanels pack_keys(const bf16* k, int64_t ld, int64_t d, int64_t n, uint32_t* dst) {
  const int64_t stride = d / 2 * kCols;
  std::fill(dst, dst + padded16(n) * d / 2, 0u);
  for (int64_t c = 0; c < n; ++c)
    for (int64_t p = 0; p < d / 2; ++p)
      std::memcpy(dst + (c / kCols) * stride + p * kCols + c % kCols, k + c * ld + 2 * p, 4);
  return {dst, stride};
}

// V (s rows of d): rows 2p and 2p + 1 interleaved.
PairPanels pack_values(const bf16* v, int64_t ld, int64_t s, int64_t d, uint32_t* dst) {
  const int64_t stride = s / 2 * kCols;
  std::fill(dst, dst + padded16(d) * s / 2, 0u);
  for (int64_t p = 0; p < s / 2; ++p) {
    const bf16 *lo = v + 2 * p * ld, *hi = lo + ld;
    for (int64_t c = 0; c < d; ++c)
      dst[(c / kCols) * stride + p * kCols + c % kCols] =
          lo[c] | static_cast<uint32_t>(hi[c]) << 16;
  }
  return {dst, stride};
}

// The float32 operands: K^T and V packed as they are.
Panels pack_keys(const float* k, int64_t ld, int64_t d, int64_t n, float* dst) {
  return pack({k, 1, ld}, d, n, dst);
}
Panels pack_values(const float* v, int64_t ld, int64_t s, int64_t d, float* dst) {
  return pack({v, ld, 1}, s, d, dst);
}

#ifdef LENX_AMX
// Intel AMX (bf16 forward products where the CPU has amx_bf16): TDPBF16PS adds a 16 x 32
// bf16 tile of A times a 16 (pair-rows) x 16 (columns) tile of bf16 pairs of B into a 16 x 16
// float32 tile of C, C[r, c] += sum_p A[r, 2p] B[2p, c] + A[r, 2p + 1] B[2p + 1, c] (Intel SDM,
// "TDPBF16PS"): the pairing of VDPBF16PS, so a PairPanels block of 16 pair-rows (64-byte rows)
// is a B tile as packed. Why: on the 2-core AMX Xeon the vector tiles ran a 16k bf16
// evaluation at 0.45x the speed of XLA's AMX GEMMs (benchmarks/README.md, seventeenth
// session). Linux hands out the tile registers only after ARCH_REQ_XCOMP_PERM (once per
// process); LENX_CPU_AMX=0 keeps the vector tiles (read per problem: tests compare the two).
bool amx_enabled() {
  static const bool permitted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  const char* env = std::getenv("LENX_CPU_AMX");
  return permitted && !(env && std::string_view(env) == "0");
}

thread_local bool amx_tiles = false;  // this thread's tiles are configured (AmxScope)

// The tiles for one problem's bf16 forward on this thread (tile state is per thread, and
// XLA's own GEMMs may configure other shapes between calls): every tile register 16 rows
// x 64 bytes (palette 1), configured once here and released when the problem is done.
struct AmxScope {
  bool on;
  explicit AmxScope(bool want) : on(want && amx_enabled()) {
    if (!on) return;
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
      uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
    } config;
    _tile_loadconfig(&config);
    amx_tiles = true;
  }
  ~AmxScope() {
    if (!on) return;
    _tile_release();
    amx_tiles = false;
  }
};

// C (+)= A B, 16 rows x 16 NT columns, contraction [0, kn) (kn % 32 == 0). Tiles 0..NT-1: C
// (row stride ldc floats); 6: A; 7: B.
template <int NT>
void amx_block(const bf16* a, int64_t ars, PairPanels b, int64_t kn, float* c, int64_t ldc,
               bool accumulate) {
  const int64_t cb = ldc * sizeof(float), ab = ars * sizeof(bf16);
  if (accumulate) {
    if constexpr (NT > 0) _tile_loadd(0, c, cb);
    if constexpr (NT > 1) _tile_loadd(1, c + kCols, cb);
    if constexpr (NT > 2) _tile_loadd(2, c + 2 * kCols, cb);
    if constexpr (NT > 3) _tile_loadd(3, c + 3 * kCols, cb);
  } else {
    if constexpr (NT > 0) _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (NT > 2) _tile_zero(2);
    if constexpr (NT > 3) _tile_zero(3);
  }
  constexpr int64_t kb = 4 * kCols;  // bytes per pair-row of a panel
  for (int64_t k = 0; k < kn; k += 32) {
    _tile_loadd(6, a + k, ab);
    if constexpr (NT > 0) { _tile_loadd(7, b.at(k, 0).data, kb); _tile_dpbf16ps(0, 6, 7); }
    if constexpr (NT > 1) { _tile_loadd(7, b.at(k, kCols).data, kb); _tile_dpbf16ps(1, 6, 7); }
    if constexpr (NT > 2) { _tile_loadd(7, b.at(k, 2 * kCols).data, kb); _tile_dpbf16ps(2, 6, 7); }
    if constexpr (NT > 3) { _tile_loadd(7, b.at(k, 3 * kCols).data, kb); _tile_dpbf16ps(3, 6, 7); }
  }
  if constexpr (NT > 0) _tile_stored(0, c, cb);
  if constexpr (NT > 1) _tile_stored(1, c + kCols, cb);
  if constexpr (NT > 2) _tile_stored(2, c + 2 * kCols, cb);
  if constexpr (NT > 3) _tile_stored(3, c + 3 * kCols, cb);
}

// C (+)= A B for 16 rows (A at a, C at c) over contraction [0, k) in steps of 32 and the
// columns [0, cols) rounded up to 16 (packed panels are zero padded to 16 columns).
void amx_rows(const bf16* a, int64_t ars, PairPanels b, int64_t k, int64_t cols, float* c,
              int64_t ldc, bool accumulate) {
  for (int64_t col = 0; col < cols; col += 4 * kCols) {
    const PairPanels bc = b.at(0, col);
    switch (std::min<int64_t>(4, (cols - col + kCols - 1) / kCols)) {
      case 4: amx_block<4>(a, ars, bc, k, c + col, ldc, accumulate); break;
      case 3: amx_block<3>(a, ars, bc, k, c + col, ldc, accumulate); break;
      case 2: amx_block<2>(a, ars, bc, k, c + col, ldc, accumulate); break;
      default: amx_block<1>(a, ars, bc, k, c + col, ldc, accumulate);
    }
  }
}
#else
struct AmxScope {
  explicit AmxScope(bool) {}
};
#endif

// C (+)= A B (m x n, n % 8 == 0, contraction kdim), only the causal part (see Part); C
// row-major (ldc), A read in place, B packed (float32 Panels, or bf16 PairPanels with A bf16:
// the contraction range is then taken in whole pairs; the extra index reads a zero of P).
template <typename B>
void causal_matmul(Part part, int64_t diag, bool accumulate, int64_t m, int64_t n, int64_t kdim,
                   ViewT<typename B::A> a, B b, float* c, int64_t ldc) {
  constexpr int64_t step = B::kStep;
  int64_t r_vec = 0;  // rows from here on take the vector tiles
#ifdef LENX_AMX
  // AMX for whole 16-row blocks: S = Q K^T (kCols, kdim = d a multiple of 32) and P V (kKeys;
  // the last < 32 keys of a block's range by the vector tiles below, accumulating)
  if constexpr (std::is_same_v<B, PairPanels>) {
    const int64_t d = part == Part::kCols ? kdim : n;  // C's columns stay inside a head's row
    if (part != Part::kTrKeys && d % 32 == 0 && amx_tiles) {
      for (; r_vec + 16 <= m; r_vec += 16) {
        const int64_t seen = std::min(r_vec + 16 + diag, part == Part::kCols ? n : kdim);
        const int64_t k1 = part == Part::kKeys ? seen : kdim, cols = part == Part::kCols ? seen : n;
        const int64_t kw = k1 / 32 * 32;
        const auto* ar = a.data + r_vec * a.rs;
        float* cr = c + r_vec * ldc;
        if (kw > 0) amx_rows(ar, a.rs, b, kw, cols, cr, ldc, accumulate);
        if (kw == k1) continue;
        for (int64_t r = 0; r < 16; r += kRows)
          for (int64_t col = 0; col < cols; col += kCols)
            tile_rows<2>(static_cast<int>(std::min<int64_t>(kRows, 16 - r)),
                         ar + r * a.rs + kw, a.rs, a.cs, b.at(kw, col).data,
                         (k1 - kw + 1) / 2 * 2, cr + r * ldc + col, ldc, accumulate || kw > 0);
      }
    }
  }
#endif
  for (int64_t r0 = r_vec; r0 < m; r0 += kRows) {
    int rows = static_cast<int>(std::min<int64_t>(kRows, m - r0));
    int64_t k0 = part == Part::kTrKeys ? std::max<int64_t>(0, r0 - diag) / step * step : 0;
    int64_t k1 = part == Part::kKeys ? std::min(kdim, (r0 + rows + diag + step - 1) / step * step)
                                     : kdim;
    int64_t cols = part == Part::kCols ? std::min(n, (r0 + rows + diag + 7) / 8 * 8) : n;
    if (k1 <= k0 || cols <= 0) continue;  // nothing visible (C keeps its values)
    const auto* ar = a.data + r0 * a.rs + k0 * a.cs;
    float* cr = c + r0 * ldc;
    for (int64_t col = 0; col < cols; col += kCols) {
      const auto* panel = b.at(k0, col).data;
      if (cols - col >= kCols)
        tile_rows<2>(rows, ar, a.rs, a.cs, panel, k1 - k0, cr + col, ldc, accumulate);
      else
        tile_rows<1>(rows, ar, a.rs, a.cs, panel, k1 - k0, cr + col, ldc, accumulate);
    }
  }
}

constexpr int64_t kBq = 128;  // query rows per block (measured best of 64 / 128 / 256 at 16k)
constexpr int64_t kBk = 256;  // keys per block (a multiple of kBq)
constexpr int64_t kLd = kBk + 16;  // row stride of the S / dP tiles: 1 KB rows would alias in L1
constexpr float kNegInf = -3.0e38f;

// Keys of row r visible in a tile of nk keys: c < r + diag + 1 (at least one: diag >= 0).
inline int64_t visible(int64_t r, int64_t diag, int64_t nk) { return std::min(nk, r + diag + 1); }

// Zeros a row of P / dS from `padded` (its visible keys rounded up to whole vectors, zero past
// the visible ones) as far as the products read it: a kRows-row register tile of P V, dS K,
// dS^T Q or P^T dO contracts over the keys visible to its last row, at most kRows - 1 (<= 7)
// past this row's own; a 16-row AMX tile of P V at most 15.
inline void zero_tail(float* row, int64_t padded, int64_t nk) {  // nk % 8 == 0
  for (int64_t j = padded; j < std::min(nk, padded + 16); j += 8) store8(row + j, v8{});
}

// x[0 .. d) *= a (d % 8 == 0): vector multiplies, where the compiler's own loop (d unknown)
// kept a scalar remainder.
inline void scale_row(float* x, int64_t d, float a) {
  for (int64_t t = 0; t < d; t += 8) store8(x + t, load8(x + t) * a);
}

// Zeros `rows` rows of d floats (d % 8 == 0) at stride ld: vector stores, where a memset
// call per 128-byte row of a small head cost ~6 % of the kernel.
inline void zero_rows(float* x, int64_t rows, int64_t d, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < d; t += 8) store8(x + r * ld + t, v8{});
}

// The running statistics of one query row: e^(S - m) summed (l) and weighted by S (es) and
// by the distance |i - j| (ed), all relative to the running max m.
struct RowSums {
  float m = kNegInf, l = 0.0f, es = 0.0f, ed = 0.0f;
};

// max of row[0 .. padded) (padded a multiple of V's lanes) in two chains: a vector max waits
// ~4 cycles for the one before it.
template <typename V>
inline float row_max(const float* row, int64_t padded) {
  constexpr int64_t w = kLanes<V>;
  V m0 = V{} + kNegInf, m1 = m0;
  int64_t j = 0;
  for (; j + 2 * w <= padded; j += 2 * w)
    m0 = vmax(m0, loadv<V>(row + j)), m1 = vmax(m1, loadv<V>(row + j + w));
  if (j < padded) m0 = vmax(m0, loadv<V>(row + j));
  return hmax(vmax(m0, m1));
}

// Online softmax step for row r of S (in place -> P = exp(S - m'), zeros after the visible
// keys); returns the rescale factor e^(m - m') of the row's running output. kStats: also
// the statistics' sums, from the positions of this tile's keys (kpos) and of the query.
// The row passes take vrow (16 lanes with AVX-512: in 8 lanes they were ~55 % of a 32k bf16
// prefill's kernel time on the AMX Xeon, the AMX products ~40 %; benchmarks/README.md),
// with or without the statistics (which then leave the output bit for bit as it is).
template <bool kStats>
inline float online_softmax_row(float* row, int64_t n, int64_t nk, RowSums& st,
                                const int32_t* kpos, int32_t qpos) {
  using V = vrow;
  constexpr int64_t w = kLanes<V>;
  // Padded to whole vectors: at most nk rounded up to 16 <= kLd (the row's own storage).
  const int64_t padded = (n + w - 1) / w * w;
  for (int64_t j = n; j < padded; ++j) row[j] = kNegInf;
  const float m_tile = row_max<V>(row, padded);
  if (m_tile <= kNegInf) {  // every key of this tile masked (a piecewise rule): P row = 0
    for (int64_t j = 0; j < padded; j += w) storev(row + j, V{});
    zero_tail(row, padded, nk);
    return 1.0f;
  }
  float m_new = std::max(st.m, m_tile);
  V sv{}, esv{}, edv{};
  for (int64_t j = 0; j < padded; j += w) {
    V x = loadv<V>(row + j);
    V e = expv(x - m_new);
    if (j + w > n) e = first_lanes(e, n - j);
    storev(row + j, e);
    sv += e;
    if constexpr (kStats) {  // a masked lane has e = 0 and a finite x: adds nothing
      IntOf<V> kp{};  // the tile's keys only: j + 8 <= nk (j < n, both multiples of 8)
      if (j + w <= nk) std::memcpy(&kp, kpos + j, sizeof kp);
      else std::memcpy(&kp, kpos + j, 8 * sizeof(int32_t));
      V dist = __builtin_convertvector(qpos - kp, V);
      esv += e * x;
      edv += e * (dist < 0.0f ? -dist : dist);
    }
  }
  zero_tail(row, padded, nk);
  float alpha = expv(v8{} + (st.m - m_new))[0];
  st.l = st.l * alpha + hsum(sv);
  if (kStats) {
    st.es = st.es * alpha + hsum(esv);
    st.ed = st.ed * alpha + hsum(edv);
  }
  st.m = m_new;
  return alpha;
}

// dS = P o (dP - D) for row r, P = exp(S - lse) recomputed in place of S; zeros after n (the
// lanes past n select 0 after the product: S and dP hold whatever was there).
inline void softmax_grad_row(float* p, float* dp, int64_t n, int64_t nk, float lse, float delta) {
  constexpr int64_t w = kLanes<vrow>;
  const int64_t padded = (n + w - 1) / w * w;
  for (int64_t j = 0; j < padded; j += w) {
    vrow e = expv(loadv<vrow>(p + j) - lse), ds = e * (loadv<vrow>(dp + j) - delta);
    if (j + w > n) e = first_lanes(e, n - j), ds = first_lanes(ds, n - j);
    storev(p + j, e);
    storev(dp + j, ds);
  }
  zero_tail(p, padded, nk);
  zero_tail(dp, padded, nk);
}

// The distance bias of one problem (batch row, head); off when neither part is given.
struct Bias {
  const int32_t *pq = nullptr, *pk = nullptr;  // positions of this batch row's queries / keys
  bool has_slope = false;                      // ALiBi part: -slope |i - j|
  float slope = 0.0f;
  const float* table = nullptr;                // bucket part: table[clamp(i - j, 0, T - 1)]
  int64_t table_len = 0;
  bool on() const { return pq != nullptr; }
  int64_t bucket(int64_t dist) const { return std::min(std::max<int64_t>(dist, 0), table_len - 1); }

  // S[r, c] += bias for the n visible keys of query i (keys from key index j0).
  void add_row(float* row, int64_t n, int64_t i, int64_t j0) const {
    const int32_t qp = pq[i], *kp = pk + j0;
    if (slope != 0.0f)
      for (int64_t c = 0; c < n; ++c)
        row[c] -= slope * static_cast<float>(std::abs(qp - kp[c]));
    if (table)
      for (int64_t c = 0; c < n; ++c) row[c] += table[bucket(qp - kp[c])];
  }

  // Accumulates the bias gradients of one row of dS.
  void grad_row(const float* ds, int64_t n, int64_t i, int64_t j0, float& dslope,
                float* dtable) const {
    const int32_t qp = pq[i], *kp = pk + j0;
    if (has_slope) {
      float acc = 0.0f;
      for (int64_t c = 0; c < n; ++c) acc += ds[c] * static_cast<float>(std::abs(qp - kp[c]));
      dslope -= acc;
    }
    if (table)
      for (int64_t c = 0; c < n; ++c) dtable[bucket(qp - kp[c])] += ds[c];
  }
};

struct Shape {
  int64_t b, s, h, d;
  int64_t stride() const { return h * d; }  // between rows of one head in [b, s, h, d]
  int64_t offset(int64_t prob) const { return (prob / h) * s * h * d + (prob % h) * d; }
  // packed operands of one problem: key panels [d][s] (K^T, V^T) and d panels [s][d]
  int64_t key_panels() const { return d * padded16(s); }
  int64_t d_panels() const { return s * padded16(d); }
  // scratch floats per thread: packed operands (forward: K^T per key set, V; backward: K^T,
  // V^T, K, Q, dO), two tiles, row statistics; a piecewise forward also a third tile and
  // the tile's part indices (int8)
  int64_t scratch(bool backward, int64_t key_sets = 1, bool pieces = false) const {
    return (backward ? 2 * key_panels() + 3 * d_panels() : key_sets * key_panels() + d_panels()) +
           2 * kBq * kLd + 3 * kBq + (sizeof(RowSums) / sizeof(float)) * kBq +
           (pieces ? kBq * kLd + kBq * kLd / 4 : 0);
  }
};

template <typename Buffer>
Shape shape_of(const Buffer& x) {
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

// Where one problem's attention statistics go (entropy, distance [s] each, and the
// positions of its queries / keys); off when `entropy` is null.
struct Stats {
  float *entropy = nullptr, *distance = nullptr;
  const int32_t *pq = nullptr, *pk = nullptr;
};

constexpr int kMaxParts = 4;

inline int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

// Piecewise RoPE logits (extensions/piecewise.py): pair (i, j) gets part c's logit
// Q_c[i] . K_{set(c)}[j] (queries and keys rotated at the part's positions), or is masked
// (c = -1), with c from the positions alone: c = table[clamp(i // div - j // div, 0, T - 1)],
// the table of sink keys (key position < sinks) or of the others. Self-Extend, ReRoPE,
// STRING (div 1, two parts by distance), Dual Chunk Attention (div = chunk, three parts by
// chunks apart) and the Lambda masks (LM-Infinite, StreamingLLM: sinks) all have this form.
template <typename T>
struct Pieces {
  int parts = 0;
  const T* q[kMaxParts];        // this problem's queries of part c (row stride ld)
  int key_set[kMaxParts];       // which of the key sets part c multiplies
  int key_sets = 0;
  const T* k[kMaxParts];        // this problem's key sets
  const int32_t *pq, *pk;       // positions of this batch row's queries / keys
  int64_t div = 1, sinks = 0, classes = 1;
  const int32_t *near = nullptr, *sink = nullptr;  // part per class: keys at or past `sinks` / before it

  int64_t cls(int64_t qp, int64_t kp) const {
    return std::min(std::max<int64_t>(floor_div(qp, div) - floor_div(kp, div), 0), classes - 1);
  }
  int part(int32_t qp, int32_t kp) const { return (kp < sinks ? sink : near)[cls(qp, kp)]; }

  // Plain causal attention as one part without a rule: every tile uniform, part 0.
  static Pieces single(const T* q, const T* k) {
    Pieces pc;
    pc.parts = pc.key_sets = 1;
    pc.q[0] = q, pc.k[0] = k, pc.key_set[0] = 0;
    return pc;
  }

  // The one part every pair of tile (queries i0.., keys j0..) uses (-1: all masked), or -2
  // when its pairs differ (then classified per pair). From the extreme classes of the tile:
  // the class falls as the key position grows and rises with the query's, whatever the order.
  int uniform(int64_t i0, int64_t nq, int64_t j0, int64_t nk) const {
    if (!near) return 0;  // no rule (single)
    auto [q_lo, q_hi] = std::minmax_element(pq + i0, pq + i0 + nq);
    auto [k_lo, k_hi] = std::minmax_element(pk + j0, pk + j0 + nk);
    if (*k_lo < sinks) return -2;
    const int64_t lo = cls(*q_lo, *k_hi), hi = cls(*q_hi, *k_lo);
    for (int64_t c = lo + 1; c <= hi; ++c)
      if (near[c] != near[lo]) return -2;
    return near[lo];
  }
};

// P's row rounded to bf16 (n a multiple of 8).
inline void round_row(const float* src, bf16* dst, int64_t n) {
#ifdef LENX_NATIVE_BF16
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 16 <= n; j += 16) {
    __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
    std::memcpy(dst + j, &h, sizeof h);
  }
#endif
  for (; j < n; j += 8) {
    __m128bh h = _mm256_cvtneps_pbh(_mm256_loadu_ps(src + j));
    std::memcpy(dst + j, &h, sizeof h);
  }
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = to_bf16(src[j]);
#endif
}

// One problem's forward: O (rows of out, stride ld), LSE (lse[0 .. s)) and the statistics;
// T = float or bf16 (q, k, v; see the top of the file).
// S of a tile whose pairs use several parts or mask some (Pieces::uniform == -2): each
// used part's Q_c K_c^T (the first into st, the others into alt), merged pair by pair,
// masked pairs -inf; false when every pair is masked (the tile adds nothing).
template <typename T, typename Packed>
bool mixed_logits(const Pieces<T>& pc, const Packed* kts, int64_t i0, int64_t nq, int64_t j0,
                  int64_t nk, int64_t d, int64_t ld, float* st, float* alt, int8_t* sel) {
  const int64_t diag = i0 - j0;
  unsigned used = 0;  // bit c + 1 for part c, bit 0 for masked
  for (int64_t r = 0; r < nq; ++r)
    for (int64_t c = 0, n = visible(r, diag, nk); c < n; ++c) {
      const int p = pc.part(pc.pq[i0 + r], pc.pk[j0 + c]);
      sel[r * kLd + c] = static_cast<int8_t>(p);
      used |= 1u << (p + 1);
    }
  bool first = true;
  for (int p = 0; p < pc.parts; ++p) {
    if (!(used & (1u << (p + 1)))) continue;
    float* dst = first ? st : alt;
    causal_matmul(Part::kCols, diag, false, nq, nk, d, {pc.q[p] + i0 * ld, ld, 1},
                  kts[pc.key_set[p]].at(0, j0), dst, kLd);
    if (!first)
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t c = 0, n = visible(r, diag, nk); c < n; ++c)
          if (sel[r * kLd + c] == p) st[r * kLd + c] = alt[r * kLd + c];
    first = false;
  }
  if (first) return false;
  if (used & 1u)
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0, n = visible(r, diag, nk); c < n; ++c)
        if (sel[r * kLd + c] < 0) st[r * kLd + c] = kNegInf;
  return true;
}

template <typename T>
void forward_problem(const Shape& sh, const T* q, const T* k, const T* v, float* o,
                     float* lse, const Bias& bias, const Stats& stats, float* work,
                     const Pieces<T>* pieces = nullptr) {
  constexpr bool kBf16 = std::is_same_v<T, bf16>;
  using Packed = std::conditional_t<kBf16, uint32_t, float>;
  using KeyPanels = std::conditional_t<kBf16, PairPanels, Panels>;
  const Pieces<T> one = Pieces<T>::single(q, k);
  const Pieces<T>& pc = pieces ? *pieces : one;
  const int64_t s = sh.s, d = sh.d, ld = sh.stride(), sets = pc.key_sets;
  const AmxScope amx(kBf16);  // the env and the tile configuration: once per problem
  Packed* packed = reinterpret_cast<Packed*>(work);
  KeyPanels kts[kMaxParts];
  for (int64_t c = 0; c < sets; ++c)                                      // K^T (per key set)
    kts[c] = pack_keys(pc.k[c], ld, d, s, packed + c * sh.key_panels());
  const auto vp = pack_values(v, ld, s, d, packed + sets * sh.key_panels());   // V
  float* st = work + sets * sh.key_panels() + sh.d_panels();
  bf16* ph = reinterpret_cast<bf16*>(st + kBq * kLd);  // P in bf16 (the free second tile)
  const ViewT<T> pv{kBf16 ? reinterpret_cast<const T*>(ph) : reinterpret_cast<const T*>(st), kLd,
                    1};
  RowSums* sums = reinterpret_cast<RowSums*>(st + 2 * kBq * kLd + 3 * kBq);
  float* alt = reinterpret_cast<float*>(sums + kBq);  // pieces only: a third tile, part indices
  int8_t* sel = reinterpret_cast<int8_t*>(alt + kBq * kLd);
  for (int64_t i0 = 0; i0 < s; i0 += kBq) {
    const int64_t nq = std::min(kBq, s - i0);
    std::fill(sums, sums + nq, RowSums{});
    zero_rows(o + i0 * ld, nq, d, ld);
    for (int64_t j0 = 0; j0 < i0 + nq; j0 += kBk) {
      const int64_t nk = std::min(kBk, s - j0), diag = i0 - j0;
      const int part = pc.uniform(i0, nq, j0, nk);
      if (part == -1) continue;  // a masked tile (outside a Lambda): skipped
      if (part >= 0)
        causal_matmul(Part::kCols, diag, false, nq, nk, d, {pc.q[part] + i0 * ld, ld, 1},
                      kts[pc.key_set[part]].at(0, j0), st, kLd);                // S = Q K^T
      else if (!mixed_logits(pc, kts, i0, nq, j0, nk, d, ld, st, alt, sel))
        continue;
      for (int64_t r = 0; r < nq; ++r) {
        if (bias.on()) bias.add_row(st + r * kLd, visible(r, diag, nk), i0 + r, j0);
        float alpha = stats.entropy
            ? online_softmax_row<true>(st + r * kLd, visible(r, diag, nk), nk, sums[r],
                                       stats.pk + j0, stats.pq[i0 + r])
            : online_softmax_row<false>(st + r * kLd, visible(r, diag, nk), nk, sums[r],
                                        nullptr, 0);
        float* orow = o + (i0 + r) * ld;
        if (alpha != 1.0f) scale_row(orow, d, alpha);
        if (kBf16) {  // as far as P V reads the row (zero_tail)
          const int64_t n = visible(r, diag, nk);
          round_row(st + r * kLd, ph + r * kLd, std::min(nk, (n + 7) / 8 * 8 + 16));
        }
      }
      causal_matmul(Part::kKeys, diag, true, nq, d, nk, pv, vp.at(j0, 0), o + i0 * ld,
                    ld);                                                      // O += P V
    }
    for (int64_t r = 0; r < nq; ++r) {
      const RowSums& sr = sums[r];
      float inv = 1.0f / sr.l, *orow = o + (i0 + r) * ld;
      scale_row(orow, d, inv);
      lse[i0 + r] = sr.m + std::log(sr.l);
      if (stats.entropy) {
        stats.entropy[i0 + r] = lse[i0 + r] - sr.es * inv;  // H = LSE - sum P S
        stats.distance[i0 + r] = sr.ed * inv;
      }
    }
  }
}

// One problem's backward: dq, dk, dv (rows with stride ld), zeroed here, then accumulated.
void backward_problem(const Shape& sh, const float* q, const float* k, const float* v,
                      const float* o, const float* lse, const float* g, float* dq, float* dk,
                      float* dv, const Bias& bias, float* dslope, float* dtable, float* work) {
  const int64_t s = sh.s, d = sh.d, ld = sh.stride(), kp = sh.key_panels(), dp_ = sh.d_panels();
  const Panels kt = pack({k, 1, ld}, d, s, work), vt = pack({v, 1, ld}, d, s, work + kp);
  const Panels kn = pack({k, ld, 1}, s, d, work + 2 * kp);           // K, Q, dO: d panels
  const Panels qn = pack({q, ld, 1}, s, d, work + 2 * kp + dp_);
  const Panels gn = pack({g, ld, 1}, s, d, work + 2 * kp + 2 * dp_);
  float *st = work + 2 * kp + 3 * dp_, *dp = st + kBq * kLd, *delta = dp + kBq * kLd + kBq;
  for (float* x : {dq, dk, dv}) zero_rows(x, s, d, ld);
  if (bias.on()) {
    *dslope = 0.0f;
    std::fill(dtable, dtable + bias.table_len, 0.0f);
  }
  for (int64_t i0 = 0; i0 < s; i0 += kBq) {
    const int64_t nq = std::min(kBq, s - i0);
    for (int64_t r = 0; r < nq; ++r) {  // D = rowsum(dO o O), 8 lanes (a scalar chain: ~10 %)
      const float *gr = g + (i0 + r) * ld, *orow = o + (i0 + r) * ld;
      v8 acc{};
      for (int64_t t = 0; t < d; t += 8) acc += load8(gr + t) * load8(orow + t);
      delta[r] = hsum(acc);
    }
    const View qi{q + i0 * ld, ld, 1}, gi{g + i0 * ld, ld, 1};
    for (int64_t j0 = 0; j0 < i0 + nq; j0 += kBk) {
      const int64_t nk = std::min(kBk, s - j0), diag = i0 - j0;
      causal_matmul(Part::kCols, diag, false, nq, nk, d, qi, kt.at(0, j0), st, kLd);  // S
      causal_matmul(Part::kCols, diag, false, nq, nk, d, gi, vt.at(0, j0), dp, kLd);  // dO V^T
      for (int64_t r = 0; r < nq; ++r) {                                      // P, dS
        const int64_t n = visible(r, diag, nk);
        if (bias.on()) bias.add_row(st + r * kLd, n, i0 + r, j0);
        softmax_grad_row(st + r * kLd, dp + r * kLd, n, nk, lse[i0 + r], delta[r]);
        if (bias.on()) bias.grad_row(dp + r * kLd, n, i0 + r, j0, *dslope, dtable);
      }
      causal_matmul(Part::kKeys, diag, true, nq, d, nk, {dp, kLd, 1}, kn.at(j0, 0), dq + i0 * ld,
                    ld);                                                      // dQ += dS K
      causal_matmul(Part::kTrKeys, diag, true, nk, d, nq, {dp, 1, kLd}, qn.at(i0, 0),
                    dk + j0 * ld, ld);                                        // dK += dS^T Q
      causal_matmul(Part::kTrKeys, diag, true, nk, d, nq, {st, 1, kLd}, gn.at(i0, 0),
                    dv + j0 * ld, ld);                                        // dV += P^T dO
    }
  }
}

using F32 = ffi::Buffer<ffi::F32>;
using S32 = ffi::Buffer<ffi::S32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// Checks the shape of q [b, s, h, d], then runs fn(shape, problem, offset of its rows,
// scratch) for every (batch, head) problem on `threads` threads.
template <typename Buffer, typename Fn>
ffi::Error for_each_head(const Buffer& q, int64_t threads, bool backward, Fn fn,
                         int64_t key_sets = 1, bool pieces = false) {
  const Shape sh = shape_of(q);
  if (sh.s % 8 || sh.d % 8)
    return ffi::Error::InvalidArgument("sequence length and head dim must be multiples of 8");
  for_each_problem(sh.b * sh.h, threads, sh.scratch(backward, key_sets, pieces),
                   [&](int64_t prob, float* work) { fn(sh, prob, sh.offset(prob), work); });
  return ffi::Error::Success();
}

// The bias of problem `prob` from the positions [b, s], slopes [h] and table [h, T];
// `parts`: 1 = slopes, 2 = table (bits), 0 = no bias (the arrays are placeholders).
Bias bias_of(const Shape& sh, int64_t prob, const S32& pq, const S32& pk, const F32& slopes,
             const F32& table, int64_t parts) {
  Bias bias;
  if (!parts) return bias;
  const int64_t row = prob / sh.h, head = prob % sh.h, len = table.dimensions()[1];
  bias.pq = pq.typed_data() + row * sh.s;
  bias.pk = pk.typed_data() + row * sh.s;
  if (parts & 1) bias.has_slope = true, bias.slope = slopes.typed_data()[head];
  if (parts & 2) bias.table = table.typed_data() + head * len, bias.table_len = len;
  return bias;
}

// Where problem `prob`'s statistics go: entropy / distance [b, h, s] (when given) for the
// problems of the first stats_rows batch rows; none otherwise.
Stats stats_of(const Shape& sh, int64_t prob, const S32& pq, const S32& pk, float* entropy,
               float* distance, int64_t stats_rows) {
  if (!entropy || prob / sh.h >= stats_rows) return {};
  const int64_t row = (prob / sh.h) * sh.s;
  return {entropy + prob * sh.s, distance + prob * sh.s, pq.typed_data() + row,
          pk.typed_data() + row};
}

// The forward of every problem; statistics into entropy / distance [b, h, s] (when given)
// for the problems of the first stats_rows batch rows.
template <typename In>
ffi::Error forward_all(const In& q, const In& k, const In& v, const S32& pq, const S32& pk,
                       const F32& slopes, const F32& table, float* out, float* lse,
                       int64_t threads, int64_t parts, float* entropy = nullptr,
                       float* distance = nullptr, int64_t stats_rows = 0) {
  return for_each_head(q, threads, false, [&](const Shape& sh, int64_t prob, int64_t off, float* work) {
    const Stats stats = stats_of(sh, prob, pq, pk, entropy, distance, stats_rows);
    forward_problem(sh, q.typed_data() + off, k.typed_data() + off, v.typed_data() + off,
                    out + off, lse + prob * sh.s, bias_of(sh, prob, pq, pk, slopes, table, parts),
                    stats, work);
  });
}

template <ffi::DataType DT>
ffi::Error Forward(ffi::Buffer<DT> q, ffi::Buffer<DT> k, ffi::Buffer<DT> v, S32 pq, S32 pk,
                   F32 slopes, F32 table, F32Out out, F32Out lse, int64_t threads,
                   int64_t parts) {
  return forward_all(q, k, v, pq, pk, slopes, table, out->typed_data(), lse->typed_data(),
                     threads, parts);
}

// As Forward, with the positions [b, s] given in full, plus entropy and distance [b, h, s]
// (zero past the first stats_rows batch rows).
template <ffi::DataType DT>
ffi::Error ForwardStats(ffi::Buffer<DT> q, ffi::Buffer<DT> k, ffi::Buffer<DT> v, S32 pq, S32 pk,
                        F32 slopes, F32 table, F32Out out, F32Out lse, F32Out entropy,
                        F32Out distance, int64_t threads, int64_t parts, int64_t stats_rows) {
  std::fill(entropy->typed_data(), entropy->typed_data() + entropy->element_count(), 0.0f);
  std::fill(distance->typed_data(), distance->typed_data() + distance->element_count(), 0.0f);
  return forward_all(q, k, v, pq, pk, slopes, table, out->typed_data(), lse->typed_data(),
                     threads, parts, entropy->typed_data(), distance->typed_data(), stats_rows);
}

// The piecewise RoPE forward (Pieces): query sets qs [P_q, b, s, h, d] and key sets
// ks [P_k, b, s, h, d] (rotated per part), v [b, s, h, d], positions [b, s], part_q /
// part_k [P] (the sets of part c), class tables near / sink [T] -> out, lse and the
// statistics of the first stats_rows batch rows (zero elsewhere).
template <ffi::DataType DT>
ffi::Error PiecewiseForward(ffi::Buffer<DT> qs, ffi::Buffer<DT> ks, ffi::Buffer<DT> v, S32 pq,
                            S32 pk, S32 part_q, S32 part_k, S32 near, S32 sink, F32Out out,
                            F32Out lse, F32Out entropy, F32Out distance, int64_t threads,
                            int64_t div, int64_t sinks, int64_t stats_rows) {
  using T = std::conditional_t<DT == ffi::DataType::BF16, bf16, float>;
  const int64_t parts = part_q.element_count(), key_sets = ks.dimensions()[0];
  const int64_t per_set = v.element_count();
  if (parts < 1 || parts > kMaxParts || key_sets > kMaxParts || div < 1)
    return ffi::Error::InvalidArgument("piecewise attention: 1..4 parts and key sets, div >= 1");
  for (float* x : {entropy->typed_data(), distance->typed_data()})
    std::fill(x, x + entropy->element_count(), 0.0f);
  const T *q0 = reinterpret_cast<const T*>(qs.typed_data()),
          *k0 = reinterpret_cast<const T*>(ks.typed_data());
  return for_each_head(v, threads, false, [&](const Shape& sh, int64_t prob, int64_t off,
                                              float* work) {
    Pieces<T> pc;
    pc.parts = static_cast<int>(parts);
    pc.key_sets = static_cast<int>(key_sets);
    for (int c = 0; c < pc.parts; ++c) {
      pc.q[c] = q0 + part_q.typed_data()[c] * per_set + off;
      pc.key_set[c] = part_k.typed_data()[c];
    }
    for (int c = 0; c < pc.key_sets; ++c) pc.k[c] = k0 + c * per_set + off;
    pc.pq = pq.typed_data() + (prob / sh.h) * sh.s;
    pc.pk = pk.typed_data() + (prob / sh.h) * sh.s;
    pc.div = div, pc.sinks = sinks, pc.classes = near.element_count();
    pc.near = near.typed_data(), pc.sink = sink.typed_data();
    forward_problem(sh, pc.q[0], pc.k[0], reinterpret_cast<const T*>(v.typed_data()) + off,
                    out->typed_data() + off, lse->typed_data() + prob * sh.s, Bias{},
                    stats_of(sh, prob, pq, pk, entropy->typed_data(), distance->typed_data(),
                             stats_rows), work, &pc);
  }, key_sets, true);
}

ffi::Error Backward(F32 q, F32 k, F32 v, F32 out, F32 lse, F32 dout, S32 pq, S32 pk, F32 slopes,
                    F32 table, F32Out dq, F32Out dk, F32Out dv, F32Out dslopes, F32Out dtable,
                    int64_t threads, int64_t parts) {
  const int64_t len = table.dimensions()[1];
  return for_each_head(q, threads, true, [&](const Shape& sh, int64_t prob, int64_t off, float* work) {
    backward_problem(sh, q.typed_data() + off, k.typed_data() + off, v.typed_data() + off,
                     out.typed_data() + off, lse.typed_data() + prob * sh.s,
                     dout.typed_data() + off, dq->typed_data() + off, dk->typed_data() + off,
                     dv->typed_data() + off, bias_of(sh, prob, pq, pk, slopes, table, parts),
                     dslopes->typed_data() + prob, dtable->typed_data() + prob * len, work);
  });
}

// q, k, v (of type DT), q_pos, k_pos, slopes, table -> out, lse (float32)
template <ffi::DataType DT>
auto forward_binding() {
  using In = ffi::Buffer<DT>;
  return ffi::Ffi::Bind().template Arg<In>().template Arg<In>().template Arg<In>()
      .template Arg<S32>().template Arg<S32>().template Arg<F32>().template Arg<F32>()
      .template Ret<F32>().template Ret<F32>();
}

// qs, ks, v, q_pos, k_pos, part_q, part_k, near, sink -> out, lse, entropy, distance
template <ffi::DataType DT>
auto piecewise_binding() {
  using In = ffi::Buffer<DT>;
  return ffi::Ffi::Bind().template Arg<In>().template Arg<In>().template Arg<In>()
      .template Arg<S32>().template Arg<S32>().template Arg<S32>().template Arg<S32>()
      .template Arg<S32>().template Arg<S32>().template Ret<F32>().template Ret<F32>()
      .template Ret<F32>().template Ret<F32>().template Attr<int64_t>("threads")
      .template Attr<int64_t>("div").template Attr<int64_t>("sinks")
      .template Attr<int64_t>("stats_rows");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxCausalAttentionForward, Forward<ffi::F32>,
                              forward_binding<ffi::F32>().Attr<int64_t>("threads")
                                  .Attr<int64_t>("parts"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxCausalAttentionForwardBf16, Forward<ffi::BF16>,
                              forward_binding<ffi::BF16>().Attr<int64_t>("threads")
                                  .Attr<int64_t>("parts"));

// ... -> out, lse, entropy, distance
XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxCausalAttentionForwardStats, ForwardStats<ffi::F32>,
                              forward_binding<ffi::F32>().Ret<F32>().Ret<F32>()
                                  .Attr<int64_t>("threads").Attr<int64_t>("parts")
                                  .Attr<int64_t>("stats_rows"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxCausalAttentionForwardStatsBf16, ForwardStats<ffi::BF16>,
                              forward_binding<ffi::BF16>().Ret<F32>().Ret<F32>()
                                  .Attr<int64_t>("threads").Attr<int64_t>("parts")
                                  .Attr<int64_t>("stats_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxPiecewiseAttentionForward, PiecewiseForward<ffi::F32>,
                              piecewise_binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxPiecewiseAttentionForwardBf16, PiecewiseForward<ffi::BF16>,
                              piecewise_binding<ffi::BF16>());

// q, k, v, out, lse, d_out, q_pos, k_pos, slopes, table -> dq, dk, dv, d_slopes [b, h],
// d_table [b, h, T]
XLA_FFI_DEFINE_HANDLER_SYMBOL(LenxCausalAttentionBackward, Backward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Arg<F32>().Arg<S32>().Arg<S32>().Arg<F32>()
                                  .Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>()
                                  .Ret<F32>().Attr<int64_t>("threads")
                                  .Attr<int64_t>("parts"));

// 1 where the bf16 forward multiplies with AMX tiles (models/cpu_attention.py: amx()).
extern "C" int LenxCpuAmx() {
#ifdef LENX_AMX
  return amx_enabled() ? 1 : 0;
#else
  return 0;
#endif
}

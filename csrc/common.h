// Shared helpers of fastrlhf's native CPU backend: a vectorizable exp, dtype conversions, strided
// row loaders and the parallel-for wrapper.  Header-only; every .cpp of the extension includes it.
//
// Conventions (same as the Triton kernels): fp16 / bf16 / fp32 inputs compute in fp32, fp64 in
// fp64 ("A", the accumulation type).  Loops over fixed-width lane arrays (kLanes) are written so
// that gcc / clang vectorize them with -O3 -fno-trapping-math; no intrinsics, so the same source
// builds on x86 (SSE / AVX2 / AVX-512) and on ARM (NEON); the exceptions are a few one-instruction
// helpers (vmax2 / vmin2 below, the fp16 loader) that name an x86 instruction GCC would not pick.
//
// Determinism: every row (sequence) is computed by exactly one thread with a fixed reduction
// order, and cross-row reductions are done serially in row order afterwards, so results are
// bitwise identical for any number of threads.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <unistd.h>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastrlhf {
namespace native {

using c10::ScalarType;

// Accumulator lanes per row = the target's float SIMD width.  A wider generic vector than the
// target has is not split into native registers by GCC but "expanded piecewise", lane by lane:
// 16 lanes on an AVX2 build made the softmax loops ~13x slower (row statistics: 8.6 vs 0.64 ns
// per element, one thread, measured on a 2-core AMD EPYC).  The lane count fixes the summation order, so results
// are bitwise independent of the thread count on one build, and may differ in the last bits
// between builds (other ISAs, other compilers, or any edit of these sources: csrc/README.md).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE2 / NEON: 128-bit
#endif

// On a hot loop's per-vector lambda (`[&](VA v) FASTRLHF_INLINE { ... }`): GCC's inliner
// otherwise decides per instantiation, and a lambda called from several places (the main loop,
// the remainder, the tail, the token's own entry) can tip over its limit in one build and not
// in another -- seen as a 2x slower fp32 gradient sweep after an unrelated change to the exp,
// whose main loop then called the lambda with every live vector spilled around the call.
#define FASTRLHF_INLINE __attribute__((always_inline))

// `v`, rounded where it stands: the compiler may not fuse the operation that produced it into
// the one that consumes it.  GCC contracts a multiply whose only use is an add or subtract into
// one FMA (its default -ffp-contract=fast), which skips the product's rounding.  Where a value
// must be the same in two sweeps -- the scaled logit x / T, from which the statistics' max M was
// taken in one sweep and log p = x / T - M - log S is formed in another -- a fused multiply in
// one of them and not the other makes them disagree by up to half an ulp of x / T, an error the
// gradient's 1 / T then multiplies (at T = 0.001 a one-hot row's entropy gradient came out
// ~0.2 instead of ~0: tests/test_native.py).
// The barrier is an empty asm that takes and returns the value in a register: the multiply and
// the subtract stay two instructions and nothing else changes.  (GCC 12's
// __builtin_assoc_barrier does the same for scalars but splits a vector into its lanes and
// rebuilds it: the T != 1 forward sweep ran ~40% slower with it.)  A value wider than one
// register (fp64 vectors) takes a round trip through memory; other targets, or compilers
// without GNU asm, get no barrier (Clang contracts only within one expression, so it never
// fuses across this anyway).
template <typename X>
FASTRLHF_INLINE inline X rounded(X v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (sizeof(X) <= kLanes * sizeof(float)) {
    __asm__("" : "+v"(v));
  } else {
    __asm__("" : "+m"(v));
  }
#elif defined(__GNUC__) && defined(__aarch64__)
  if constexpr (sizeof(X) <= 16) {
    __asm__("" : "+w"(v));
  } else {
    __asm__("" : "+m"(v));
  }
#endif
  return v;
}

template <typename A>
constexpr A kInf = std::numeric_limits<A>::infinity();
template <typename A>
constexpr A kNaN = std::numeric_limits<A>::quiet_NaN();

inline int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// exp for float without libm: Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial for
// exp(r) (Cephes' coefficients), and 2^n applied as two exact power-of-two factors (so n in
// [-150, 128] works and results in the subnormal range come out gradually, like libm).  Max
// relative error ~1.4 ulp on [-87, 88.7].  Exact specials: exp(-inf) = 0, exp(+inf) = +inf,
// exp(NaN) = NaN.  Branch-free, so loops over it vectorize.
inline float exp_f32(float x) {
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 88.72283935546875f ? 88.72283935546875f : xc;
  float fn = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest via 1.5 * 2^23
  fn -= 12582912.0f;
  const int32_t n = static_cast<int32_t>(fn);
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = (p * r) * r + r + 1.0f;
  const int32_t h = n >> 1;
  y = y * bits_to_f32(static_cast<uint32_t>(h + 127) << 23);
  y = y * bits_to_f32(static_cast<uint32_t>(n - h + 127) << 23);
  y = x > 88.72283935546875f ? kInf<float> : y;
  y = x != x ? x : y;
  return y;
}

inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }  // fp64: libm (the tests' float64 path)

// The hot-loop exp of the softmax kernels, for arguments already clamped to [kExpLo, kExpHi]
// (they are x - max <= 0 there).  The float version drops exp_f32's special-case selects: at
// kExpLo = -88 the scale 2^-127 is encoded as 0.0f, so the result is exactly 0 (results below
// 2^-126 flush to 0 -- irrelevant next to the row max's 1), and NaN in gives NaN out through the
// polynomial.  Callers clamp with lower / upper selects that keep NaN.
template <typename A>
constexpr A kExpLo = A(-88);
template <>
constexpr double kExpLo<double> = -746.0;  // exp(-746) == 0 in double
template <typename A>
constexpr A kExpHi = A(88);
template <>
constexpr double kExpHi<double> = 709.0;

inline float exp_clamped(float xc) {
  float fn = xc * 1.44269504088896341f + 12582912.0f;
  fn -= 12582912.0f;
  const int32_t n = static_cast<int32_t>(fn);
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r) * r + r + 1.0f;
  return y * bits_to_f32(static_cast<uint32_t>(n + 127) << 23);
}
inline double exp_clamped(double xc) { return std::exp(xc); }

template <typename A>
inline A clamp_lo(A x) { return x < kExpLo<A> ? kExpLo<A> : x; }  // NaN stays NaN
template <typename A>
inline A clamp_hi(A x) { return x > kExpHi<A> ? kExpHi<A> : x; }

// ---- kLanes-wide vectors (GCC / Clang vector extensions) ---------------------------------------
// The compiler lowers them to whatever the target has (one zmm, two ymm, four xmm / NEON
// registers), so the hot loops are vectorized by construction rather than by the
// auto-vectorizer's heuristics, with no intrinsics and no ISA-specific code.
template <typename A>
struct VecT;
template <>
struct VecT<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t itype __attribute__((vector_size(kLanes * sizeof(int32_t))));
};
template <>
struct VecT<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
  typedef int64_t itype __attribute__((vector_size(kLanes * sizeof(int64_t))));
};
template <typename A>
using Vec = typename VecT<A>::type;

template <typename A>
inline Vec<A> vload(const A* p) {
  Vec<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A>
inline void vstore(A* p, const Vec<A>& v) { std::memcpy(p, &v, sizeof(v)); }
template <typename A>
inline Vec<A> vsplat(A x) {
  Vec<A> v = {};
  return v + x;
}
// The horizontal sum and max of a vector, in a fixed order.  Generic: lane by lane (kLanes
// dependent scalar operations); the float vectors of the AVX / AVX-512 builds use trees over the
// lanes instead (below: halves, then quarters, ...), since the serial version took ~70 cycles a
// reduction on AVX-512, with four or more per row where a 2048-wide bf16 row's whole forward
// sweep takes ~1400.
template <typename A>
inline A vsum(const Vec<A>& v) {
  A s = A(0);
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}
template <typename A>
inline A vmax(const Vec<A>& v) {  // NaN lanes are skipped
  A m = -kInf<A>;
  for (int l = 0; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
// a > b ? a : b and a < b ? a : b, lane by lane: a NaN in a gives b, and so do equal lanes.
// x86's maxps / minps compute exactly that (the second operand is returned for NaN or equal),
// but inside the softmax loops GCC emits a compare and a blend (or a masked move) for the
// select, two vector operations instead of one; so the float vectors of the AVX / AVX2 (8
// lanes) and AVX-512 (16 lanes) builds name the instruction.  Same lane results as the select
// (though a rebuild can move fp32 results in the last bits anyway: csrc/README.md).  On
// AVX-512 this removed 2 of the ~19 vector operations per vector of the forward sweep's inner
// loop (the running max and the kExpLo clamp) and of the gradient sweep's (the two clamps):
// +3 to +8% elements / s on one core of the Xeon here (bench/bench_cpu_rate.py, the two builds
// timed alternately in one process).
template <typename A>
inline Vec<A> vmax2(const Vec<A>& a, const Vec<A>& b) { return a > b ? a : b; }
template <typename A>
inline Vec<A> vmin2(const Vec<A>& a, const Vec<A>& b) { return a < b ? a : b; }
#if defined(__AVX512F__)
static_assert(sizeof(Vec<float>) == sizeof(__m512), "16 float lanes with AVX-512");
template <>
inline Vec<float> vmax2<float>(const Vec<float>& a, const Vec<float>& b) {
  return _mm512_max_ps(a, b);
}
template <>
inline Vec<float> vmin2<float>(const Vec<float>& a, const Vec<float>& b) {
  return _mm512_min_ps(a, b);
}
#elif defined(__AVX__)
template <>
inline Vec<float> vmax2<float>(const Vec<float>& a, const Vec<float>& b) {
  return __builtin_ia32_maxps256(a, b);
}
template <>
inline Vec<float> vmin2<float>(const Vec<float>& a, const Vec<float>& b) {
  return __builtin_ia32_minps256(a, b);
}
#endif

#if defined(__AVX__)
// The trees' 8-lane tails (halves, then quarters, then pairs).
inline float hsum8(const __m256 h) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
inline float hmax8(const __m256 h) {  // no NaN lanes
  __m128 q = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  q = _mm_max_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#endif
#if defined(__AVX512F__)
inline __m256 upper8(const __m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}
template <>
inline float vsum<float>(const Vec<float>& v) {
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), upper8(v)));
}
template <>
inline float vmax<float>(const Vec<float>& v) {
  // NaN lanes become -inf first (maxps returns its second operand for a NaN, so a NaN would
  // otherwise survive or not depending on its lane)
  const __m512 w = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q),
                                        _mm512_set1_ps(-kInf<float>), v);
  return hmax8(_mm256_max_ps(_mm512_castps512_ps256(w), upper8(w)));
}
#elif defined(__AVX__)
template <>
inline float vsum<float>(const Vec<float>& v) { return hsum8(v); }
template <>
inline float vmax<float>(const Vec<float>& v) {
  return hmax8(_mm256_blendv_ps(_mm256_set1_ps(-kInf<float>), v, _mm256_cmp_ps(v, v, _CMP_ORD_Q)));
}
#endif

// max(lo, x) / min(hi, x) with NaN x kept.
template <typename A>
inline Vec<A> vclamp_lo(const Vec<A>& x) { return vmax2<A>(vsplat<A>(kExpLo<A>), x); }
template <typename A>
inline Vec<A> vclamp_hi(const Vec<A>& x) { return vmin2<A>(vsplat<A>(kExpHi<A>), x); }

// y * 2^(e - 127) for e = the biased exponent in [0, 254] (e = 0 encodes 0.0f, so y * 0 = 0):
// the last step of both vector exps below.
inline Vec<float> vscale_pow2(const Vec<float>& y, const VecT<float>::itype& e) {
  const VecT<float>::itype bits = e << 23;
  Vec<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// exp_clamped on a vector: the float version is the same polynomial, lane-parallel.
inline Vec<float> vexp_clamped(Vec<float> xc) {
  using VI = VecT<float>::itype;
  Vec<float> fn = xc * 1.44269504088896341f + 12582912.0f;
  fn -= 12582912.0f;
  const VI n = __builtin_convertvector(fn, VI);
  Vec<float> r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  Vec<float> p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec<float> y = (p * r) * r + r + 1.0f;
  return vscale_pow2(y, n + 127);
}
inline Vec<double> vexp_clamped(Vec<double> xc) {
  for (int l = 0; l < kLanes; ++l) xc[l] = std::exp(xc[l]);
  return xc;
}

// 2^x on a vector, for x >= -127 (and <= 127 where the result is kept); the callers pass
// max(d, kExpLo) * log2(e), >= -126.97 (float) / -1076.3 (double, where exp2 is exactly 0).
// x = n + r with n = round-to-nearest(x) and r in [-1/2, 1/2]; 2^r by a degree-6 polynomial
// (a relative-error fit on [-1/2, 1/2]: 2e-9 in exact arithmetic, <= 0.93 ulp measured in
// float); 2^n is built in the exponent field, where n = -127 encodes 0.0f exactly (so the clamp
// gives an exact 0, as exp(-inf) should).  Fewer operations than vexp_clamped (no Cody-Waite
// reduction: the caller's log2(e) multiply fuses with the rounding), which matters because
// this is the inner loop of the streaming passes.  NaN in gives NaN out.
constexpr double kLog2e = 1.4426950408889634;

// The two ends of the vector 2^x: x = n + r, with `big` = x + 1.5 * 2^23 holding n + 2^22 in its
// low mantissa bits (|x| < 2^22, so the exponent field is built from those bits with no
// float -> int conversion) and r in [-1/2, 1/2]; then 2^r (p) times 2^n.
inline Vec<float> vexp2_reduce(const Vec<float>& x, Vec<float>& big) {
  big = x + 12582912.0f;
  return x - (big - 12582912.0f);
}
inline Vec<float> vexp2_join(const Vec<float>& p, const Vec<float>& big) {
  VecT<float>::itype bits;
  std::memcpy(&bits, &big, sizeof(bits));
  return vscale_pow2(p, bits + (127 - 0x4B400000));
}

// 2^r for r in [-1/2, 1/2]: the degree-6 polynomial of vexp2_clamped / vexp2_ftz.
inline Vec<float> vexp2_poly6(const Vec<float>& r) {
  Vec<float> p = vsplat(1.5353410e-4f);
  p = p * r + 1.3398874e-3f;
  p = p * r + 9.6184369e-3f;
  p = p * r + 5.5503324e-2f;
  p = p * r + 2.4022648e-1f;
  p = p * r + 6.9314718e-1f;
  return p * r + 1.0f;
}
inline Vec<float> vexp2_clamped(Vec<float> x) {
  Vec<float> big;
  const Vec<float> r = vexp2_reduce(x, big);
  return vexp2_join(vexp2_poly6(r), big);
}
inline Vec<double> vexp2_clamped(Vec<double> x) {
  for (int l = 0; l < kLanes; ++l) x[l] = std::exp2(x[l]);
  return x;
}
// vexp2_clamped for a caller that holds FlushDenormals (the gradient sweeps): on AVX-512 the 2^n
// is one vscalefps instead of the exponent-field construction's add, shift and multiply (as in
// vexp2_sum_term below), so results below 2^-126 are 0 rather than subnormal; elsewhere the same
// as vexp2_clamped.
inline Vec<float> vexp2_ftz(Vec<float> x) {
#if defined(__AVX512F__)
  Vec<float> big;
  const Vec<float> r = vexp2_reduce(x, big);
  return _mm512_scalef_ps(vexp2_poly6(r), big - 12582912.0f);
#else
  return vexp2_clamped(x);
#endif
}
inline Vec<double> vexp2_ftz(Vec<double> x) { return vexp2_clamped(x); }

// vexp2_clamped with a degree-5 polynomial: one FMA fewer in the forward sweeps' inner loop
// (~10% of its operations; measured 2.5 -> 3.0 G elements / s on one core here), for terms that
// are only summed (the logsumexp / entropy sums), where a per-term error of <= 2.02 ulp
// (relative 1.7e-7, measured over [-126, 12]) moves log S by at most that much, a fifth of an
// ulp of a log-prob of -1 and in line with the GPU backends' ex2.approx (2 ulp).  The constant
// term is exactly 1 (a fit of 1 + r q(r)), so 2^0 = 1 exactly and a one-hot row's sum is
// exactly 1.  The backward's gradient sweep, whose p = exp(z) values are outputs, keeps
// vexp2_clamped; the fused loss's gradient reuses these terms (softmax_row.h, RowExps).
//
// On AVX-512, 2^n is applied by one vscalefps (p * 2^n, n = big - 1.5 * 2^23 exactly) instead of
// being built in the exponent field (an integer add, a shift and a multiply): two vector
// operations fewer per vector of the forward sweep, measured +6-9% elements / s on one core of
// the Xeon (in-process A/B).  vscalefps rounds p * 2^-127 (the clamp's n) to a subnormal where
// the bit construction gives exactly 0, and subnormal operands in the sums' FMAs would cost
// microcode assists on Intel, so it must run with flush-to-zero on (FlushDenormals, which
// row_stats holds): then both give exactly 0 there, the same value for n >= -126, and 0 for
// every term below 2^-126 (d < -87.3), which the exponent-field version also leaves subnormal
// at most -- far below a row's sum of >= 1.
inline Vec<float> vexp2_sum_term(Vec<float> x) {
  Vec<float> big;
  const Vec<float> r = vexp2_reduce(x, big);
  Vec<float> p = vsplat(1.326472731307149e-3f);
  p = p * r + 9.671512991189957e-3f;
  p = p * r + 5.550733581185341e-2f;
  p = p * r + 2.4022242426872253e-1f;
  p = p * r + 6.931470036506653e-1f;
  p = p * r + 1.0f;
#if defined(__AVX512F__)
  return _mm512_scalef_ps(p, big - 12582912.0f);
#else
  return vexp2_join(p, big);
#endif
}
inline Vec<double> vexp2_sum_term(Vec<double> x) { return vexp2_clamped(x); }

// ---- element conversions ---------------------------------------------------------------------

inline float load_bf16(uint16_t u) { return bits_to_f32(static_cast<uint32_t>(u) << 16); }

inline uint16_t store_bf16(float f) {  // round to nearest even, NaN -> canonical NaN (as torch)
  const uint32_t u = f32_to_bits(f);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(r);
}

template <typename S>
struct Elem {  // storage type S <-> float / double
  template <typename A>
  static A load(const S* p) { return static_cast<A>(*p); }
  template <typename A>
  static void store(S* p, A v) { *p = static_cast<S>(v); }
};

template <>
struct Elem<c10::BFloat16> {
  template <typename A>
  static A load(const c10::BFloat16* p) {
    uint16_t u;
    std::memcpy(&u, p, 2);
    return static_cast<A>(load_bf16(u));
  }
  template <typename A>
  static void store(c10::BFloat16* p, A v) {
    const uint16_t u = store_bf16(static_cast<float>(v));
    std::memcpy(p, &u, 2);
  }
};

template <>
struct Elem<c10::Half> {
  template <typename A>
  static A load(const c10::Half* p) { return static_cast<A>(static_cast<float>(*p)); }
  template <typename A>
  static void store(c10::Half* p, A v) { *p = c10::Half(static_cast<float>(v)); }
};

template <>
struct Elem<bool> {
  template <typename A>
  static A load(const bool* p) {
    uint8_t u;
    std::memcpy(&u, p, 1);
    return u != 0 ? A(1) : A(0);
  }
};

// n elements at p (element stride `stride`, 0 = broadcast one value) converted to A.
template <typename A, typename S>
inline void load_typed(const S* p, int64_t stride, int64_t n, A* out) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = Elem<S>::template load<A>(p + i);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = Elem<S>::template load<A>(p + i * stride);
  }
}

// The same for a run-time dtype (any floating, integer or bool tensor).
template <typename A>
inline void load_any(const void* p, ScalarType dt, int64_t stride, int64_t n, A* out) {
  switch (dt) {
    case ScalarType::Float: return load_typed(static_cast<const float*>(p), stride, n, out);
    case ScalarType::Double: return load_typed(static_cast<const double*>(p), stride, n, out);
    case ScalarType::BFloat16:
      return load_typed(static_cast<const c10::BFloat16*>(p), stride, n, out);
    case ScalarType::Half: return load_typed(static_cast<const c10::Half*>(p), stride, n, out);
    case ScalarType::Bool: return load_typed(static_cast<const bool*>(p), stride, n, out);
    case ScalarType::Byte: return load_typed(static_cast<const uint8_t*>(p), stride, n, out);
    case ScalarType::Char: return load_typed(static_cast<const int8_t*>(p), stride, n, out);
    case ScalarType::Short: return load_typed(static_cast<const int16_t*>(p), stride, n, out);
    case ScalarType::Int: return load_typed(static_cast<const int32_t*>(p), stride, n, out);
    case ScalarType::Long: return load_typed(static_cast<const int64_t*>(p), stride, n, out);
    default: break;  // rejected by the Python checks before we get here
  }
  for (int64_t i = 0; i < n; ++i) out[i] = kNaN<A>;
}

inline size_t elem_size(ScalarType dt) { return c10::elementSize(dt); }

// A [rows, cols] view with arbitrary element strides (s1 = 0 broadcasts a [rows] vector).
struct Mat {
  const void* ptr = nullptr;
  ScalarType dtype = ScalarType::Float;
  int64_t s0 = 0, s1 = 0;

  const void* row(int64_t r) const {
    return static_cast<const char*>(ptr) + r * s0 * static_cast<int64_t>(elem_size(dtype));
  }
  template <typename A>
  void load_row(int64_t r, int64_t c0, int64_t n, A* out) const {
    const int64_t esz = static_cast<int64_t>(elem_size(dtype));
    const char* p = static_cast<const char*>(row(r)) + c0 * s1 * esz;
    load_any<A>(p, dtype, s1, n, out);
  }
};

// n values of A stored to a contiguous run of a floating dtype.
template <typename A>
inline void store_any(void* p, ScalarType dt, int64_t n, const A* in) {
  switch (dt) {
    case ScalarType::Float: {
      float* q = static_cast<float*>(p);
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<float>(in[i]);
      return;
    }
    case ScalarType::Double: {
      double* q = static_cast<double*>(p);
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<double>(in[i]);
      return;
    }
    case ScalarType::BFloat16: {
      uint16_t* q = static_cast<uint16_t*>(p);
      for (int64_t i = 0; i < n; ++i) q[i] = store_bf16(static_cast<float>(in[i]));
      return;
    }
    case ScalarType::Half: {
      c10::Half* q = static_cast<c10::Half*>(p);
      for (int64_t i = 0; i < n; ++i) q[i] = c10::Half(static_cast<float>(in[i]));
      return;
    }
    default:
      throw std::invalid_argument("fastrlhf native: unsupported output dtype");
  }
}

// Flush-to-zero (x86 MXCSR.FTZ) for the calling thread while in scope, the previous mode
// restored on exit (also by an exception).  Held by row_stats for vexp2_sum_term's vscalefps
// and by the gradient sweeps for vexp2_ftz's (AVX-512 builds only; elsewhere it does nothing).  Results below 2^-126 inside the scope
// become 0; the caller's own floating-point mode is untouched outside it.
struct FlushDenormals {
#if defined(__AVX512F__)
  unsigned prev;
  FlushDenormals() : prev(_mm_getcsr()) { _mm_setcsr(prev | _MM_FLUSH_ZERO_ON); }
  ~FlushDenormals() { _mm_setcsr(prev); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
#endif
};

// Whether token_logprobs' backward writes a gradient of `bytes` to a buffer of its own with
// non-temporal (streaming) stores: only when it is larger than the last-level cache, so that
// its reader would not find it in the cache anyway, and only on AVX-512 builds (the one
// measured).  Streaming skips the read-for-ownership of every output line, a third of the
// sweep's memory traffic.  Measured on the 2-core Xeon, 4096 x 32000, two threads, builds
// alternated: into a buffer already mapped, fp32 gradient sweep 3.05 -> 3.95 G elements / s
// (with the entropy term 2.97 -> 3.71), bf16 5.36 -> 5.62; into a fresh buffer each step (what
// torch's CPU allocator hands out for large tensors: new pages the kernel zeroes on first
// touch) the whole forward + backward was unchanged (fp32 124.8 -> 122.8 ms, bf16 60.6 ->
// 62.5).  The fused loss, which writes its gradient during its forward, measured 10% slower
// with streaming stores into fresh buffers (fp32 87.4 -> 96.0 ms), so it does not use them.
// The size of a cache level from sysconf (_SC_LEVEL2_CACHE_SIZE, _SC_LEVEL3_CACHE_SIZE), or
// `fallback` where the system does not say.
inline int64_t cache_bytes(int sysconf_name, int64_t fallback) {
  const long v = sysconf(sysconf_name);
  return v > 0 ? static_cast<int64_t>(v) : fallback;
}

inline bool stream_stores(int64_t bytes) {
#if defined(__AVX512F__)
  static const int64_t llc = cache_bytes(_SC_LEVEL3_CACHE_SIZE, int64_t(32) << 20);
  return bytes > llc;
#else
  (void)bytes;
  return false;
#endif
}

// Rows [0, n) in parallel on ATen's intra-op pool (OpenMP): torch.set_num_threads applies.
template <typename F>
inline void parallel_rows(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  at::parallel_for(0, n, std::max<int64_t>(grain, 1), f);
}

}  // namespace native
}  // namespace fastrlhf

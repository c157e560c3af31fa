// Per-row softmax machinery shared by logprobs.cpp and fused_loss.cpp: the strided row layout,
// vector loads / stores with dtype conversion (in registers), the one-sweep row statistics
// (online logsumexp + entropy sum) and the gradient sweep.  See logprobs.cpp for the algorithm.
#pragma once

#include "common.h"

#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastrlhf {
namespace native {

constexpr int64_t kBlock = 2048;  // elements per block of the online logsumexp

// Software prefetch this many bytes ahead of the streaming loops' loads (one prefetch per
// 2 kLanes elements; a prefetch past the end of the buffer is harmless).  The hardware
// prefetchers alone left the fp32 forward at 57-73% of the read bandwidth at 4096 x 151936 on
// the 2-core AVX2 EPYC here; 1024 bytes ahead measured 74-81% in the same interleaved runs
// (512 and 2048 close behind, 4096 worse).  The rows are long and read once, so the distance,
// not the row length, sets what is in flight.  Two-byte logits (bf16 / fp16) go 4096 bytes
// ahead: the same bytes are half as many elements, so 1024 bytes covered half the time.  On the
// 2-core AVX-512 Xeon, 4096 x 32000 bf16, two threads, builds alternated in one process
// (9 rounds): forward 7.94 -> 8.72 G elements/s (1024 / 2048 / 4096 / 8192 bytes measured
// 7.30 / 7.66 / 7.91 / 7.95 in one run), gradient sweep +2%, fused loss +4%; fp32 there was
// flat over 1024 .. 8192 (within 4%), so it keeps the EPYC's 1024.
// One exception (row_stats): the exp pass over a row's first block runs on data the max pass
// just brought into L1, so it prefetches one block ahead instead, the next block or, for rows
// of one block, the next row's (measured: fp32 256 x 2048 on one core 2.85 -> 3.73 G elements/s,
// the max pass no longer waits on L3; unchanged at 4096 x 32000).
template <typename T>
constexpr int64_t kPrefetchBytes = sizeof(T) <= 2 ? 4096 : 1024;
template <typename T>
inline void prefetch_ahead(const T* p, int64_t bytes = kPrefetchBytes<T>) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + bytes, 0, 3);
}
// The fused loss's gradient sweep into a buffer of its own (grad_row_from_exps, out != x) asks
// for the output lines this many bytes ahead, for writing: a fresh buffer's lines are rarely
// in the caches, and each store would otherwise wait for its line to be read.  Measured on the
// 2-core Xeon, the 256 x 8192 bf16 step right after torch.compile's step (the benchmark's
// round-robin), alternated in one process: 1.33 -> 1.23, 1.68 -> 1.37, 1.40 -> 1.31 ms
// (upstream 0.25: 1.71 -> 1.57, 1.64 -> 1.44, 1.51 -> 1.44); 4096 bytes ahead mixed (+4% /
// -5%); warm -2.5%; 8 x 512 x 32000 fp32 / bf16 unchanged (102.4 -> 99.8, 47.2 -> 47.1 ms).
constexpr int64_t kPrefetchWriteBytes = 1024;

struct RowLayout {
  int64_t D1, D2, s0, s1, s2;
  int64_t offset(int64_t row) const {
    const int64_t i2 = row % D2;
    const int64_t r = row / D2;
    return (r / D1) * s0 + (r % D1) * s1 + i2 * s2;
  }
};

// kLanes consecutive elements of T converted to A (bf16: a widening shift, in registers).
template <typename T, typename A>
inline Vec<A> vload_as(const T* p) {
  Vec<A> v;
  for (int l = 0; l < kLanes; ++l) v[l] = Elem<T>::template load<A>(p + l);
  return v;
}
template <>
inline Vec<float> vload_as<float, float>(const float* p) { return vload(p); }
template <>
inline Vec<double> vload_as<double, double>(const double* p) { return vload(p); }
template <>
inline Vec<float> vload_as<c10::BFloat16, float>(const c10::BFloat16* p) {
  typedef uint16_t U16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  using VI = VecT<float>::itype;
  U16 u;
  std::memcpy(&u, p, sizeof(u));
  const VI w = __builtin_convertvector(u, VI) << 16;
  Vec<float> f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

#if defined(__F16C__)
// fp16 with F16C: one vcvtph2ps per vector instead of kLanes scalar conversions (GCC lowers a
// generic _Float16 vector conversion lane by lane); exact, like c10::Half -> float.
template <>
inline Vec<float> vload_as<c10::Half, float>(const c10::Half* p) {
  Vec<float> f;
#if defined(__AVX512F__)
  static_assert(sizeof(Vec<float>) == sizeof(__m512), "16 float lanes with AVX-512");
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  static_assert(sizeof(Vec<float>) == sizeof(__m256), "8 float lanes with AVX / AVX2");
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  std::memcpy(&f, &v, sizeof(f));
  return f;
}
#endif

// 2 kLanes elements of T at p as two vectors of A, in an order of the loader's choosing (the
// callers only sum and max them).  bf16: one 32-bit word holds two elements, so the word shifted
// left by 16 is the even element as a float and the word with its low half cleared the odd one
// (two integer operations per vector, no widening shuffles).
template <typename T, typename A>
inline void vload_pair(const T* p, Vec<A>& v0, Vec<A>& v1) {
  v0 = vload_as<T, A>(p);
  v1 = vload_as<T, A>(p + kLanes);
}
template <>
inline void vload_pair<c10::BFloat16, float>(const c10::BFloat16* p, Vec<float>& v0,
                                             Vec<float>& v1) {
  using VI = VecT<float>::itype;
  VI w;
  std::memcpy(&w, p, sizeof(w));
  const VI even = w << 16, odd = w & static_cast<int32_t>(0xffff0000u);
  std::memcpy(&v0, &even, sizeof(v0));
  std::memcpy(&v1, &odd, sizeof(v1));
}

// The logits' scale 1 / temperature, applied to each element as it is loaded.  Temperature 1
// (nearly every call) is a type of its own, so the hot loops carry no multiply for it: one of
// the ~22 vector operations per kLanes elements of the forward sweep (measured ~8% (fp32) to
// ~20% (bf16) more elements / s on one core here).  Results are unchanged (x * 1 == x).
// The product is rounded (common.h `rounded`): every sweep sees the same x / T, so a row's
// largest logit gives log p = 0 exactly in the gradient sweep as in the statistics.
template <typename A, bool kUnit>
struct LogitScale {
  A inv_temp;
  template <typename X>
  X operator()(const X& v) const {
    if constexpr (kUnit) {
      return v;
    } else {
      return rounded(v * inv_temp);
    }
  }
};

// f(LogitScale<A, inv_temp == 1>{inv_temp}): the row loops instantiated for the scale at hand.
template <typename A, typename F>
inline void with_logit_scale(A inv_temp, const F& f) {
  if (inv_temp == A(1))
    f(LogitScale<A, true>{inv_temp});
  else
    f(LogitScale<A, false>{inv_temp});
}


// Calls f(v) for every kLanes-vector of sc(x[0, n)), in order except that the bf16 loader
// hands over each 2 kLanes elements as its even / odd halves (vload_pair); the last, partial
// vector is padded with -inf (through `tail`, kLanes scratch values).
template <typename T, typename A, typename Sc, typename F>
inline void for_vectors(const T* x, int64_t n, const Sc& sc, A* tail, const F& f,
                        int64_t pf_bytes = kPrefetchBytes<T>) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    prefetch_ahead(x + j, pf_bytes);
    Vec<A> v0, v1;
    vload_pair<T, A>(x + j, v0, v1);
    f(sc(v0));
    f(sc(v1));
  }
  for (; j + kLanes <= n; j += kLanes) f(sc(vload_as<T, A>(x + j)));
  if (j < n) {
    for (int64_t i = 0; i < kLanes; ++i)
      tail[i] = j + i < n ? sc(Elem<T>::template load<A>(x + j + i)) : -kInf<A>;
    f(vload(tail));
  }
}

// Max of sc(x[0, n)) (NaN skipped).  Four independent max chains: with one, the loop waits
// on vmaxps' latency (4 cycles per kLanes elements, where the loads and conversions need ~1),
// and this pass took ~30% of the forward sweep of rows that fit one block (V <= kBlock; perf
// annotate, bf16 256 x 2048).  The scale is applied to the max, not to every element: x * c is
// monotone for c > 0, so max(sc(x)) == sc(max(x)) exactly.
template <typename T, typename A, typename Sc>
inline A block_max(const T* x, int64_t n, const Sc& sc, A* tail) {
  using VA = Vec<A>;
  VA m0 = vsplat(-kInf<A>), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    prefetch_ahead(x + j);
    prefetch_ahead(x + j + 2 * kLanes);
    VA a0, a1, a2, a3;
    vload_pair<T, A>(x + j, a0, a1);
    vload_pair<T, A>(x + j + 2 * kLanes, a2, a3);
    m0 = vmax2<A>(a0, m0);
    m1 = vmax2<A>(a1, m1);
    m2 = vmax2<A>(a2, m2);
    m3 = vmax2<A>(a3, m3);
  }
  const LogitScale<A, true> unit{A(1)};
  for_vectors<T, A>(x + j, n - j, unit, tail,
                    [&](VA v) FASTRLHF_INLINE { m0 = vmax2<A>(v, m0); });
  return sc(vmax<A>(vmax2<A>(vmax2<A>(m0, m1), vmax2<A>(m2, m3))));
}

// The exp sums of sc(x[0, n)) against the reference m:  s += sum e, t += sum e * d with
// d = max(v - m, kExpLo) and e = exp(d) (computed as 2^(d log2 e)); returns the block's max.
// d may be positive (v above m) by up to the caller's slack; -inf logits give e = 0 exactly.
// The exp is vexp2_sum_term (these terms are only summed).
// One accumulator chain each: the exp's ~20 vector operations per step take longer than the
// chains' latency, and more live accumulators spill to the stack on AVX2 (16 registers, nine
// of them the exp's constants).
//
// kStore: each vector's e is also stored to `e_out`, in for_vectors' order (so the gradient
// sweep, which walks the row the same way, finds every element's e where it loads its logit;
// the padded lanes of a partial last vector store 0).  `e_out` holds round_up(n, kLanes).
template <typename T, typename A, typename Sc, bool kStore = false>
inline A block_exp_sums(const T* x, int64_t n, const Sc& sc, A m, A* tail, Vec<A>& s,
                        Vec<A>& t, A* e_out = nullptr, int64_t pf_bytes = kPrefetchBytes<T>) {
  using VA = Vec<A>;
  VA sb = vsplat<A>(0), tb = sb, mx = vsplat(-kInf<A>);
  const A log2e = static_cast<A>(kLog2e);
  for_vectors<T, A>(x, n, sc, tail, [&](VA v) FASTRLHF_INLINE {
    mx = vmax2<A>(v, mx);
    const VA d = vclamp_lo<A>(v - m);
    const VA e = vexp2_sum_term(d * log2e);
    if constexpr (kStore) {
      vstore(e_out, e);
      e_out += kLanes;
    }
    sb += e;
    tb += e * d;
  }, pf_bytes);
  s = sb;
  t = tb;
  return vmax<A>(mx);
}

// Above this much over the running max (in units of the scaled logits) a block's sums are
// recomputed against its own max, rather than rescaled: it bounds e (<= e^kSlack, no overflow)
// and the cancellation in the rescale of t (error ~ kSlack ulp of the block's largest term).
template <typename A>
constexpr A kSlack = A(8);

// Online logsumexp + entropy sum of one row of sc(x) (sc: the LogitScale): returns false if the
// row holds a NaN.  x_tok gets sc(x[tok]) exactly as the max saw it (so logp of a one-hot row is exactly 0), or NaN if
// tok is outside [0, V).  `buf`: at least kLanes scratch values.
//
// One pass over the logits per block, against the running max M of the blocks before it (the
// first block with a finite value takes its own max first, in a pass of its own).  A block whose
// max exceeds M is merged and the kLanes accumulators rescaled once:
//     s <- s * exp(M - M'),   t <- exp(M - M') * (t + (M - M') s)
// and one that exceeds it by more than kSlack is recomputed against its own max (rare: a row's
// max is usually not far above its first block's).
//
// With a RowExps (the fused loss, whose gradient sweep follows at once), the sweep also keeps
// every element's exp term and each block's reference max, for grad_row_from_exps.
template <typename A>
struct RowExps {
  A* e;       // round_up(V, kLanes) values: e = exp(max(x - m_b, kExpLo)), for_vectors' order
  A* blk_m;   // ceil(V / kBlock) values: m_b, the reference max of block b (-inf: e all 0)

  // The scratch of one thread for rows of V elements.
  static int64_t e_size(int64_t V) { return round_up(V, 2 * kLanes); }
  static int64_t m_size(int64_t V) { return (V + kBlock - 1) / kBlock; }
};

// One thread's RowExps storage for rows of V elements, or nothing when `on` is false;
// get() is the RowExps to pass to the row loops (null when off).
template <typename A>
class RowExpsScratch {
 public:
  RowExpsScratch(int64_t V, bool on)
      : e_(on ? RowExps<A>::e_size(V) : 0), m_(on ? RowExps<A>::m_size(V) : 0),
        keep_{e_.data(), m_.data()}, on_(on) {}
  const RowExps<A>* get() const { return on_ ? &keep_ : nullptr; }

 private:
  std::vector<A> e_, m_;
  RowExps<A> keep_;
  bool on_;
};

template <typename T, typename A, typename Sc, bool kStore = false>
bool row_stats(const T* x, int64_t V, const Sc& sc, A* buf, A& M_out, A& logS_out, A& ent_out,
               int64_t tok, A& x_tok, const RowExps<A>* keep = nullptr) {
  using VA = Vec<A>;
  const FlushDenormals ftz;  // vexp2_sum_term's vscalefps join (AVX-512): see there
  x_tok = (tok >= 0 && tok < V) ? sc(Elem<T>::template load<A>(x + tok)) : kNaN<A>;
  A m = -kInf<A>;
  VA s = vsplat<A>(0), t = vsplat<A>(0);
  auto rescale_to = [&](A bm) {  // the accumulators against the new max bm > m
    const A dm = m - bm;
    const A alpha = exp_acc(dm);
    t = alpha * (t + dm * s);
    s = s * alpha;
    m = bm;
  };
  bool bad = false;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const T* xb = x + start;
    A* eb = kStore ? keep->e + start : nullptr;
    int64_t pf = kPrefetchBytes<T>;
    if (m == -kInf<A>) {
      const A bm = block_max<T, A>(xb, n, sc, buf);
      pf = n * static_cast<int64_t>(sizeof(T));
      if (bm == -kInf<A>) {
        // Nothing finite in this block: it adds nothing, so look for a NaN here (rare).
        for (int64_t j = 0; j < n && !bad; ++j) {
          const A v = Elem<T>::template load<A>(xb + j);
          bad = v != v;
        }
        if (bad) break;
        if constexpr (kStore) {
          std::fill(eb, eb + round_up(n, kLanes), A(0));
          keep->blk_m[start / kBlock] = -kInf<A>;
        }
        continue;
      }
      m = bm;
    }
    VA sb, tb;
    A bm = block_exp_sums<T, A, Sc, kStore>(xb, n, sc, m, buf, sb, tb, eb, pf);
    if (bm > m + kSlack<A>) {  // far above: drop the sums, rescale, redo against bm
      rescale_to(bm);
      bm = block_exp_sums<T, A, Sc, kStore>(xb, n, sc, m, buf, sb, tb, eb);
    }
    if constexpr (kStore) keep->blk_m[start / kBlock] = m;
    s += sb;
    t += tb;
    if (bm > m) rescale_to(bm);
  }
  const A S = vsum<A>(s), Ts = vsum<A>(t);
  if (bad || S != S) {  // a NaN logit (or +inf, as in torch) makes the whole row NaN
    M_out = logS_out = ent_out = kNaN<A>;
    return false;
  }
  const A logS = std::log(S);
  M_out = m;
  logS_out = logS;
  ent_out = logS - Ts / S;
  return true;
}


// The inverse of vload_as / vload_pair: kLanes (2 kLanes) values of A stored as T, in the same
// element order as the loader's.  bf16: round to nearest even, NaN -> the canonical NaN 0x7fc0
// (as store_bf16 and torch), the two halves of each 32-bit word from the even and odd vectors.
template <typename T, typename A>
inline void vstore_as(T* p, const Vec<A>& v) {
  for (int l = 0; l < kLanes; ++l) Elem<T>::template store<A>(p + l, v[l]);
}
template <>
inline void vstore_as<float, float>(float* p, const Vec<float>& v) { vstore(p, v); }
template <>
inline void vstore_as<double, double>(double* p, const Vec<double>& v) { vstore(p, v); }
template <typename T, typename A>
inline void vstore_pair(T* p, const Vec<A>& v0, const Vec<A>& v1) {
  vstore_as<T, A>(p, v0);
  vstore_as<T, A>(p + kLanes, v1);
}
// bf16 (round to nearest even) in the high half of each lane; kNaN: NaN lanes become the
// canonical 0x7fc0.  Without it (values known not to be NaN) two operations fewer per vector.
template <bool kNaN = true>
inline VecT<float>::itype bf16_round_bits(const Vec<float>& v) {
  using VI = VecT<float>::itype;
  VI u;
  std::memcpy(&u, &v, sizeof(u));
  const VI r = u + (0x7fff + ((u >> 16) & 1));
  if constexpr (kNaN) {
    return v != v ? VI{} + 0x7fc00000 : r;
  } else {
    return r;
  }
}
// Two vectors rounded to bf16 and interleaved as vload_pair reads them back: the low half of
// each 32-bit word from v0, the high half from v1.
template <bool kNaN = true>
inline VecT<float>::itype bf16_pack_pair(const Vec<float>& v0, const Vec<float>& v1) {
  return ((bf16_round_bits<kNaN>(v0) >> 16) & 0xffff) |
         (bf16_round_bits<kNaN>(v1) & static_cast<int32_t>(0xffff0000u));
}
template <bool kNaN = true>
inline void vstore_pair_bf16(c10::BFloat16* p, const Vec<float>& v0, const Vec<float>& v1) {
  const VecT<float>::itype w = bf16_pack_pair<kNaN>(v0, v1);
  std::memcpy(p, &w, sizeof(w));
}
template <>
inline void vstore_pair<c10::BFloat16, float>(c10::BFloat16* p, const Vec<float>& v0,
                                              const Vec<float>& v1) {
  vstore_pair_bf16<true>(p, v0, v1);
}
// vstore_pair for values that hold no NaN (the bf16 store skips its NaN select).
template <typename T, typename A>
inline void vstore_pair_no_nan(T* p, const Vec<A>& v0, const Vec<A>& v1) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    vstore_pair_bf16<false>(p, v0, v1);
  } else {
    vstore_pair<T, A>(p, v0, v1);
  }
}

// vstore_pair_no_nan with non-temporal stores (stream_stores), to a 64-byte aligned p: on
// AVX-512 one streaming store per bf16 pair (64 bytes), two per fp32 pair; other element types
// store as usual.  The caller fences (_mm_sfence) when its row is done.
template <typename T, typename A>
inline void vstream_pair_no_nan(T* p, const Vec<A>& v0, const Vec<A>& v1) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    const VecT<float>::itype w = bf16_pack_pair<false>(v0, v1);
    __m512i wi;
    std::memcpy(&wi, &w, sizeof(wi));
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), wi);
    return;
  } else if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    _mm512_stream_ps(p, v0);
    _mm512_stream_ps(p + kLanes, v1);
    return;
  }
#endif
  vstore_pair_no_nan<T, A>(p, v0, v1);
}

// Whether a row's gradient goes out with streaming stores: asked for (the whole gradient is a
// buffer of its own, larger than the last-level cache: stream_stores) and the row 64-byte
// aligned, so that every store of a pair is (a bf16 pair is 64 bytes, an fp32 pair 128).
inline bool stream_row(bool stream, const void* out) {
  return stream && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
}
inline void stream_done(bool streamed) {
#if defined(__AVX512F__)
  if (streamed) _mm_sfence();
#else
  (void)streamed;
#endif
}

// The per-element gradient g = sc(-g_lp p - g_h p (zc + H)) of the sweeps below (zc = log p,
// clamped), factored as p (a + b zc) with the row's a = sc(-g_lp - g_h H), b = sc(-g_h): one FMA
// and one multiply per vector instead of an add, three multiplies and an FMS (and the scale's
// multiply at T != 1); without the entropy term, g = p a.  `fast` is whether that form is safe:
// every row scalar finite and |a| + |b| max|zc| too, so that p (a + b zc) is finite for every
// p in [0, e^slack] -- else the sweeps take the term-by-term form, NaN select included.
template <typename A, bool HAS_DENT, typename Sc>
struct GradCoefs {
  A a, b;
  bool fast;
  GradCoefs(const Sc& sc, A M, A logS, A H, A g_lp, A g_h) {
    a = sc(HAS_DENT ? -g_lp - g_h * H : -g_lp);
    b = sc(HAS_DENT ? -g_h : A(0));
    const A zmax = std::max(std::abs(kExpLo<A>), std::abs(kExpHi<A>));
    fast = std::isfinite(M) && std::isfinite(logS) && std::isfinite(g_lp) &&
           std::isfinite(sc(A(1))) && (!HAS_DENT || (std::isfinite(H) && std::isfinite(g_h))) &&
           std::isfinite(std::abs(a) + std::abs(b) * zmax);
  }
};

// The gradient sweep of one row: out = sc(g_lp (onehot(tok) - p) - g_h p (log p + H)) with
// p = exp((sc(x) - M) - logS), one vector at a time straight from x to out (each vector is read
// before it is written, so `out` may alias `x`; the token's entry is computed before the sweep
// and written after it).  buf: kLanes scratch values (the partial last vector).
// With finite row scalars (GradCoefs::fast) no element's gradient is NaN: p is in [0, e^slack]
// and zc is clamped, and the logits are those the statistics were taken from (a NaN or +inf
// logit makes M NaN).  Such rows, nearly all, use the factored form and store without the NaN
// select; the others compute term by term (a NaN stays a NaN, a zero p gives 0 next to an
// infinite factor as before) and select.  `stream`: see stream_row (never for out == x).
template <typename T, typename A, bool HAS_DENT, typename Sc>
void grad_row(const T* x, T* out, int64_t V, const Sc& sc, A M, A logS, A H, A g_lp, A g_h,
              int64_t tok, A* buf, bool stream = false) {
  using VA = Vec<A>;
  const A log2e = static_cast<A>(kLog2e);
  const GradCoefs<A, HAS_DENT, Sc> c(sc, M, logS, H, g_lp, g_h);
  const FlushDenormals ftz;  // vexp2_ftz
  auto run = [&](auto fast) FASTRLHF_INLINE {  // instantiated for both forms
    constexpr bool kFast = decltype(fast)::value;
    auto grad = [&](const VA& v) FASTRLHF_INLINE -> VA {
      // z = log p <= 0 (up to rounding); where p underflows to 0 (x = -inf included) the
      // clamped zc keeps p * (zc + H) exactly 0
      const VA zc = vclamp_hi<A>(vclamp_lo<A>((v - M) - logS));
      const VA p = vexp2_ftz(zc * log2e);
      if constexpr (kFast) {
        if constexpr (HAS_DENT) return p * (c.a + c.b * zc);
        else return p * c.a;
      }
      // the general form (dead code after the fast form's return; written outside an `else`
      // because GCC took that for a path without a return and warned "no return statement"
      // at every instantiation)
      VA g = -g_lp * p;
      if (HAS_DENT) g -= g_h * (p * (zc + H));
      return sc(g);
    };
    const bool has_tok = tok >= 0 && tok < V;
    A g_tok = A(0);
    if (has_tok) g_tok = grad(vsplat(sc(Elem<T>::template load<A>(x + tok))))[0] + sc(g_lp);
    int64_t j = 0;
    const bool nt = kFast && stream_row(stream, out);
    if (nt) {
      for (; j + 2 * kLanes <= V; j += 2 * kLanes) {
        prefetch_ahead(x + j);
        VA v0, v1;
        vload_pair<T, A>(x + j, v0, v1);
        vstream_pair_no_nan<T, A>(out + j, grad(sc(v0)), grad(sc(v1)));
      }
    }
    for (; j + 2 * kLanes <= V; j += 2 * kLanes) {
      prefetch_ahead(x + j);
      VA v0, v1;
      vload_pair<T, A>(x + j, v0, v1);
      if constexpr (kFast)
        vstore_pair_no_nan<T, A>(out + j, grad(sc(v0)), grad(sc(v1)));
      else
        vstore_pair<T, A>(out + j, grad(sc(v0)), grad(sc(v1)));
    }
    for (; j + kLanes <= V; j += kLanes) vstore_as<T, A>(out + j, grad(sc(vload_as<T, A>(x + j))));
    if (j < V) {
      for (int64_t i = 0; i < kLanes; ++i)
        buf[i] = j + i < V ? sc(Elem<T>::template load<A>(x + j + i)) : A(0);
      const VA g = grad(vload(buf));
      for (int64_t i = 0; j + i < V; ++i) Elem<T>::template store<A>(out + j + i, g[i]);
    }
    if (has_tok) Elem<T>::template store<A>(out + tok, g_tok);
    stream_done(nt);
  };
  if (c.fast)
    run(std::true_type{});
  else
    run(std::false_type{});
}

// grad_row from the exp terms row_stats kept (RowExps): p = e * exp((m_b - M) - log S) per
// block b, so the sweep computes no exp per element (the one vector exp of the forward sweep
// serves both); with HAS_DENT the logits are read again for log p, without it g = e (c_b a) is
// one multiply per vector.  p carries the forward's exp error (vexp2_sum_term, <= 2 ulp) and one
// rounding more: in line with the GPU backends' ex2.approx.  Falls back to grad_row when the
// factored form is not safe (GradCoefs::fast: grad_row's NaN path).
template <typename T, typename A, bool HAS_DENT, typename Sc>
void grad_row_from_exps(const T* x, T* out, int64_t V, const Sc& sc, A M, A logS, A H, A g_lp,
                        A g_h, int64_t tok, A* buf, const RowExps<A>& keep) {
  const GradCoefs<A, HAS_DENT, Sc> c(sc, M, logS, H, g_lp, g_h);
  if (!c.fast) {
    grad_row<T, A, HAS_DENT>(x, out, V, sc, M, logS, H, g_lp, g_h, tok, buf);
    return;
  }
  using VA = Vec<A>;
  const A log2e = static_cast<A>(kLog2e);
  const bool has_tok = tok >= 0 && tok < V;
  A g_tok = A(0);
  if (has_tok) {  // exactly as grad_row: from the logit itself, stored after the sweep
    const FlushDenormals ftz;  // vexp2_ftz
    const VA zc =
        vclamp_hi<A>(vclamp_lo<A>((vsplat(sc(Elem<T>::template load<A>(x + tok))) - M) - logS));
    const VA p = vexp2_ftz(zc * log2e);
    const VA g = HAS_DENT ? p * (c.a + c.b * zc) : p * c.a;
    g_tok = g[0] + sc(g_lp);
  }
  const bool own_out = out != x;  // a buffer of its own: kPrefetchWriteBytes
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t end = std::min(V, start + kBlock);
    const A mb = keep.blk_m[start / kBlock];
    const A cblk = mb == -kInf<A> ? A(0) : exp_acc((mb - M) - logS);  // <= 1: mb <= M, S >= 1
    const A ca = cblk * c.a;  // without the entropy term g = e (c_b a)
    const A* e = keep.e;
    auto grad = [&](const VA& ev, const VA& v) FASTRLHF_INLINE -> VA {
      if constexpr (HAS_DENT) {
        const VA zc = vclamp_hi<A>(vclamp_lo<A>((v - M) - logS));
        return (ev * cblk) * (c.a + c.b * zc);
      } else {
        return ev * ca;
      }
    };
    int64_t j = start;
    for (; j + 2 * kLanes <= end; j += 2 * kLanes) {
      VA v0, v1;
      if (own_out)
        __builtin_prefetch(reinterpret_cast<const char*>(out + j) + kPrefetchWriteBytes, 1, 3);
      if constexpr (HAS_DENT) {
        prefetch_ahead(x + j);
        vload_pair<T, A>(x + j, v0, v1);
        v0 = sc(v0);
        v1 = sc(v1);
      }
      vstore_pair_no_nan<T, A>(out + j, grad(vload(e + j), v0),
                               grad(vload(e + j + kLanes), v1));
    }
    for (; j + kLanes <= end; j += kLanes) {
      VA v;
      if constexpr (HAS_DENT) v = sc(vload_as<T, A>(x + j));
      vstore_as<T, A>(out + j, grad(vload(e + j), v));
    }
    if (j < end) {
      for (int64_t i = 0; i < kLanes; ++i)
        buf[i] = HAS_DENT && j + i < end ? sc(Elem<T>::template load<A>(x + j + i)) : A(0);
      const VA g = grad(vload(e + j), vload(buf));
      for (int64_t i = 0; j + i < end; ++i) Elem<T>::template store<A>(out + j + i, g[i]);
    }
  }
  if (has_tok) Elem<T>::template store<A>(out + tok, g_tok);
}

template <typename T>
void zero_row(T* out, int64_t V) {
  for (int64_t i = 0; i < V; ++i) Elem<T>::template store<float>(out + i, 0.0f);
}

template <typename F>
void dispatch_logits(ScalarType dt, const F& f) {
  switch (dt) {
    case ScalarType::Float: f(float(), float()); return;
    case ScalarType::Double: f(double(), double()); return;
    case ScalarType::BFloat16: f(c10::BFloat16(), float()); return;
    case ScalarType::Half: f(c10::Half(), float()); return;
    default: throw std::invalid_argument("fastrlhf native: logits must be a floating dtype");
  }
}

inline int64_t rows_grain(int64_t V) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
}

}  // namespace native
}  // namespace fastrlhf

// Per-row softmax machinery shared by logprobs.cpp and fused_loss.cpp: the strided row layout,
// block loads / stores with dtype conversion, the one-sweep row statistics (online logsumexp +
// entropy sum) and the gradient sweep.  See logprobs.cpp for the algorithm.
#pragma once

#include "common.h"

namespace fastrlhf {
namespace native {

constexpr int64_t kBlock = 2048;  // elements per L1 block (8 KiB of fp32)

template <typename T, typename A>
inline void load_block(const T* x, int64_t n, A inv_temp, A* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = Elem<T>::template load<A>(x + i) * inv_temp;
  const int64_t npad = round_up(n, kLanes);
  for (int64_t i = n; i < npad; ++i) buf[i] = -kInf<A>;
}

template <typename T>
inline void store_block(T* out, int64_t n, const float* g) {
  for (int64_t i = 0; i < n; ++i) Elem<T>::template store<float>(out + i, g[i]);
}
template <typename T>
inline void store_block(T* out, int64_t n, const double* g) {
  for (int64_t i = 0; i < n; ++i) Elem<T>::template store<double>(out + i, g[i]);
}

struct RowLayout {
  int64_t D1, D2, s0, s1, s2;
  int64_t offset(int64_t row) const {
    const int64_t i2 = row % D2;
    const int64_t r = row / D2;
    return (r / D1) * s0 + (r % D1) * s1 + i2 * s2;
  }
};

// Online logsumexp + entropy sum of one row: returns false if the row holds a NaN.  x_tok gets
// x[tok] * inv_temp exactly as the max saw it (so logp of a one-hot row is exactly 0), or NaN if
// tok is outside [0, V).
template <typename T, typename A>
bool row_stats(const T* x, int64_t V, A inv_temp, A* buf, A& M_out, A& logS_out, A& ent_out,
               int64_t tok, A& x_tok) {
  x_tok = kNaN<A>;
  using VA = Vec<A>;
  A m = -kInf<A>;
  VA s = vsplat<A>(0), t = vsplat<A>(0);
  bool bad = false;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    load_block(x + start, n, inv_temp, buf);
    if (tok >= start && tok < start + n) x_tok = buf[tok - start];
    const int64_t npad = round_up(n, kLanes);
    VA mx = vsplat<A>(-kInf<A>);
    for (int64_t j = 0; j < npad; j += kLanes) {
      const VA v = vload(buf + j);
      mx = v > mx ? v : mx;  // NaN is skipped here; it reaches s through exp below
    }
    const A bm = vmax<A>(mx);
    if (bm == -kInf<A>) {
      // Nothing finite in this block: the exp pass adds nothing, so look for a NaN here (rare).
      for (int64_t j = 0; j < n; ++j) bad = bad || buf[j] != buf[j];
      if (bad) break;
      continue;
    }
    if (bm > m) {
      if (m != -kInf<A>) {
        const A dm = m - bm;
        const A alpha = exp_acc(dm);
        t = alpha * (t + dm * s);
        s = s * alpha;
      }
      m = bm;
    }
    for (int64_t j = 0; j < npad; j += kLanes) {
      // d <= 0; at d = -inf (masked vocab) dc = kExpLo and e = 0, so e * dc adds exactly 0
      const VA dc = vclamp_lo<A>(vload(buf + j) - m);
      const VA e = vexp_clamped(dc);
      s += e;
      t += e * dc;
    }
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


// The gradient sweep of one row: out = (g_lp (onehot(tok) - p) - g_h p (log p + H)) * inv_temp
// with p = exp((x - M) - logS), block by block (each block is read before it is written, so
// `out` may alias `x`).  buf / gbuf: kBlock scratch values each.
template <typename T, typename A, bool HAS_DENT>
void grad_row(const T* x, T* out, int64_t V, A inv_temp, A M, A logS, A H, A g_lp, A g_h,
              int64_t tok, A* buf, A* gbuf) {
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    load_block(x + start, n, inv_temp, buf);
    const int64_t npad = round_up(n, kLanes);
    for (int64_t j = 0; j < npad; j += kLanes) {
      // z = log p <= 0 (up to rounding); where p underflows to 0 (x = -inf included) the
      // clamped zc keeps p * (zc + H) exactly 0
      const Vec<A> zc = vclamp_hi<A>(vclamp_lo<A>((vload(buf + j) - M) - logS));
      const Vec<A> p = vexp_clamped(zc);
      Vec<A> g = -g_lp * p;
      if (HAS_DENT) g -= g_h * (p * (zc + H));
      vstore(gbuf + j, g * inv_temp);
    }
    if (tok >= start && tok < start + n) {
      const int64_t k = tok - start;
      const A zc = clamp_hi(clamp_lo((buf[k] - M) - logS));
      const A p = exp_clamped(zc);
      A g = -g_lp * p;
      if (HAS_DENT) g -= g_h * (p * (zc + H));
      gbuf[k] = (g + g_lp) * inv_temp;
    }
    store_block(out + start, n, gbuf);
  }
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

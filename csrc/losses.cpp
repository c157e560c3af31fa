// Clipped PPO policy loss (token ratio or GSPO sequence ratio) and clipped value loss, fused with
// their masked aggregation and statistics (verl 0.9 semantics), forward and backward, CPU.
//
// Forward: rows in parallel; each row is staged into contiguous buffers of the compute dtype
// (padded with m = 0 to a multiple of kLanes) and reduced into per-row partials
//     S_b = sum_t m L_t,  n_b = sum_t m,  clip / clip-lower counts,  approx-KL sum
// where every m-weighted term is where(m != 0, x, 0) * m (NaN outside the mask is ignored).  The
// [B] partials are then combined serially in row order (deterministic for any thread count) into
// the loss, the stats and the per-row aggregation coefficient c_b (loss = sum_b c_b S_b, see
// fastrlhf.reference.agg_row_weights).  Backward recomputes the per-token derivative and writes
// g * c_b * m * dL/dx.  The per-token formulas mirror kernels/losses.py (policy_token_terms,
// value_token_terms), including torch's tie conventions (max / min split the gradient 50/50).
#include "common.h"
#include "native.h"
#include "ppo_terms.h"

namespace fastrlhf {
namespace native {
namespace {

enum Part : int { kLoss = 0, kCount = 1, kClip = 2, kClipLower = 3, kKL = 4, kParts = 5 };

// Row staging: n = T values (padded to a multiple of kLanes with zeros) of each input.
template <typename A>
struct RowBufs {
  std::vector<A> a, b, c, m;
  int64_t npad = 0;
  void load(const Mat& x, const Mat& y, const Mat* z, const Mat& mask, int64_t row, int64_t T) {
    npad = round_up(std::max<int64_t>(T, 1), kLanes);
    a.assign(npad, A(0));
    b.assign(npad, A(0));
    c.assign(npad, A(0));
    m.assign(npad, A(0));
    x.load_row<A>(row, 0, T, a.data());
    y.load_row<A>(row, 0, T, b.data());
    if (z) z->load_row<A>(row, 0, T, c.data());
    mask.load_row<A>(row, 0, T, m.data());
  }
};

template <typename A>
A lane_sum(const A* v) {
  A s = A(0);
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// kLanes tokens j .. j + kLanes of a staged policy row (a = logp, b = old, c = adv, m = mask):
// the mask, the clamped log-ratio (for the approx-KL sum) and the per-token terms.
template <typename A>
struct PolicyLanes {
  Vec<A> m, lr, loss, grad;
  VMask<A> clipped, lower;
  PolicyLanes(const RowBufs<A>& rb, int64_t j, A seq_s, const PolicyConsts<A>& pc) {
    m = vload(rb.m.data() + j);
    const Vec<A> x = vload(rb.a.data() + j), o = vload(rb.b.data() + j);
    const Vec<A> a = vload(rb.c.data() + j);
    const VMask<A> bad = (x != x) | (o != o) | (a != a);
    VMask<A> ind;
    vlog_ratio(x, o, seq_s, pc.seq, lr, ind);
    vpolicy_terms(lr, ind, a, bad, pc, loss, grad, clipped, lower);
  }
};

// The same for a staged value row (a = values, b = returns, c = old values when clipping).
template <typename A>
struct ValueLanes {
  Vec<A> m, loss, grad;
  VMask<A> clipped;
  ValueLanes(const RowBufs<A>& rb, int64_t j, bool has_clip, A clip) {
    m = vload(rb.m.data() + j);
    const Vec<A> x = vload(rb.a.data() + j), r = vload(rb.b.data() + j);
    const Vec<A> o = has_clip ? vload(rb.c.data() + j) : x;
    VMask<A> bad = (x != x) | (r != r);
    if (has_clip) bad |= o != o;
    vvalue_terms(x, o, r, bad, has_clip, clip, loss, grad, clipped);
  }
};

// Combine the [kParts, B] partials into loss / stats / coef (serially, in row order).
template <typename A>
void finalize(const std::vector<A>& part, int64_t B, int n_stats, const AggArgs& agg, A scale,
              A* loss, A* stats, A* coef) {
  const A* S = part.data() + kLoss * B;
  const A* n = part.data() + kCount * B;
  A n_tot = A(0), g_tot = A(0), st[3] = {A(0), A(0), A(0)};
  for (int64_t b = 0; b < B; ++b) {
    n_tot += n[b];
    g_tot += n[b] > A(0) ? A(1) : A(0);
    for (int k = 0; k < n_stats; ++k) st[k] += part[(kClip + k) * B + b];
  }
  const A dp = static_cast<A>(agg.dp_size);
  A den;
  if (agg.has_denom) den = static_cast<A>(agg.denom);
  else den = agg.mode == kTokenMean ? n_tot : g_tot;
  A inv = den == A(0) ? A(0) : dp / den;
  if (agg.mode == kSeqMeanTokenSumNorm) inv = inv / static_cast<A>(agg.loss_scale_factor);
  A total = A(0);
  for (int64_t b = 0; b < B; ++b) {
    A c;
    switch (agg.mode) {
      case kTokenMean: c = inv; break;
      case kTokenSum: c = dp; break;
      case kSeqMeanTokenMean: c = n[b] > A(0) ? inv / (n[b] + A(1e-8)) : A(0); break;
      default: c = n[b] > A(0) ? inv : A(0); break;
    }
    total += c != A(0) ? c * S[b] : A(0);
    coef[b] = c * scale;
  }
  *loss = total * scale;
  const A den_st = n_tot + A(1e-8);
  for (int k = 0; k < n_stats; ++k) stats[k] = st[k] / den_st;
}

inline int64_t row_grain(int64_t T) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(T, 1)); }

template <typename A>
void policy_fwd_impl(const Mat& lp, const Mat& old, const Mat& adv, const Mat& mask, int64_t B,
                     int64_t T, const PolicyArgs& pa, const AggArgs& agg, void* loss, void* stats,
                     void* coef, void* seqlr_v) {
  const PolicyConsts<A> pc(pa);
  std::vector<A> part(static_cast<size_t>(kParts) * B, A(0));
  A* seqlr = static_cast<A*>(seqlr_v);
  parallel_rows(B, row_grain(T), [&](int64_t b0, int64_t b1) {
    RowBufs<A> rb;
    for (int64_t b = b0; b < b1; ++b) {
      rb.load(lp, old, &adv, mask, b, T);
      const A* L = rb.a.data();
      const A* O = rb.b.data();
      const A* M = rb.m.data();
      A seq_s = A(0), kl_row = A(0);
      if (pc.seq) {
        A ds[kLanes] = {}, ns[kLanes] = {};
        for (int64_t j = 0; j < rb.npad; j += kLanes)
          for (int l = 0; l < kLanes; ++l) {
            const A m = M[j + l];
            ds[l] += (m != A(0) ? L[j + l] - O[j + l] : A(0)) * m;
            ns[l] += m;
          }
        const A d_sum = lane_sum(ds), n_sum = lane_sum(ns);
        seq_s = d_sum / (n_sum > A(1) ? n_sum : A(1));
        kl_row = -d_sum;
      }
      seqlr[b] = seq_s;
      using V = Vec<A>;
      const V zero = vsplat<A>(A(0));
      V al = zero, an = zero, ac = zero, acl = zero, ak = zero;
      for (int64_t j = 0; j < rb.npad; j += kLanes) {
        const PolicyLanes<A> t(rb, j, seq_s, pc);
        const VMask<A> valid = t.m != zero;
        if (!pc.seq) ak += (valid ? -t.lr : zero) * t.m;
        al += (valid ? t.loss : zero) * t.m;
        an += t.m;
        ac += (valid & t.clipped) ? t.m : zero;
        acl += (valid & t.lower) ? t.m : zero;
      }
      if (!pc.seq) kl_row = vsum<A>(ak);
      part[kLoss * B + b] = vsum<A>(al);
      part[kCount * B + b] = vsum<A>(an);
      part[kClip * B + b] = vsum<A>(ac);
      part[kClipLower * B + b] = vsum<A>(acl);
      part[kKL * B + b] = kl_row;
    }
  });
  finalize<A>(part, B, 3, agg, A(1), static_cast<A*>(loss), static_cast<A*>(stats),
              static_cast<A*>(coef));
}

template <typename A>
void policy_bwd_impl(double g_d, const Mat& lp, const Mat& old, const Mat& adv, const Mat& mask,
                     int64_t B, int64_t T, const PolicyArgs& pa, const void* coef_v,
                     const void* seqlr_v, void* out, ScalarType out_dt) {
  const PolicyConsts<A> pc(pa);
  const A* coef = static_cast<const A*>(coef_v);
  const A* seqlr = static_cast<const A*>(seqlr_v);
  const A gout = static_cast<A>(g_d);
  const int64_t osz = static_cast<int64_t>(elem_size(out_dt));
  parallel_rows(B, row_grain(T), [&](int64_t b0, int64_t b1) {
    RowBufs<A> rb;
    std::vector<A> dx;
    for (int64_t b = b0; b < b1; ++b) {
      rb.load(lp, old, &adv, mask, b, T);
      dx.resize(rb.npad);
      const A gc = gout * coef[b];
      const A seq_s = pc.seq ? seqlr[b] : A(0);
      using V = Vec<A>;
      const V zero = vsplat<A>(A(0));
      for (int64_t j = 0; j < rb.npad; j += kLanes) {
        const PolicyLanes<A> t(rb, j, seq_s, pc);
        vstore(dx.data() + j, t.m != zero ? gc * t.m * t.grad : zero);
      }
      store_any<A>(static_cast<char*>(out) + b * T * osz, out_dt, T, dx.data());
    }
  });
}

template <typename A>
void value_fwd_impl(const Mat& v, const Mat& ov, const Mat& ret, const Mat& mask, int64_t B,
                    int64_t T, bool has_clip, double clip_d, const AggArgs& agg, void* loss,
                    void* stats, void* coef) {
  const A clip = static_cast<A>(clip_d);
  std::vector<A> part(static_cast<size_t>(kParts) * B, A(0));
  parallel_rows(B, row_grain(T), [&](int64_t b0, int64_t b1) {
    RowBufs<A> rb;
    for (int64_t b = b0; b < b1; ++b) {
      rb.load(v, ret, has_clip ? &ov : nullptr, mask, b, T);
      using V = Vec<A>;
      const V zero = vsplat<A>(A(0));
      V al = zero, an = zero, ac = zero;
      for (int64_t j = 0; j < rb.npad; j += kLanes) {
        const ValueLanes<A> t(rb, j, has_clip, clip);
        const VMask<A> valid = t.m != zero;
        al += (valid ? t.loss : zero) * t.m;
        an += t.m;
        ac += (valid & t.clipped) ? t.m : zero;
      }
      part[kLoss * B + b] = vsum<A>(al);
      part[kCount * B + b] = vsum<A>(an);
      part[kClip * B + b] = vsum<A>(ac);
    }
  });
  finalize<A>(part, B, 1, agg, A(0.5), static_cast<A*>(loss), static_cast<A*>(stats),
              static_cast<A*>(coef));
}

template <typename A>
void value_bwd_impl(double g_d, const Mat& v, const Mat& ov, const Mat& ret, const Mat& mask,
                    int64_t B, int64_t T, bool has_clip, double clip_d, const void* coef_v,
                    void* out, ScalarType out_dt) {
  const A clip = static_cast<A>(clip_d);
  const A* coef = static_cast<const A*>(coef_v);
  const A gout = static_cast<A>(g_d);
  const int64_t osz = static_cast<int64_t>(elem_size(out_dt));
  parallel_rows(B, row_grain(T), [&](int64_t b0, int64_t b1) {
    RowBufs<A> rb;
    std::vector<A> dx;
    for (int64_t b = b0; b < b1; ++b) {
      rb.load(v, ret, has_clip ? &ov : nullptr, mask, b, T);
      dx.resize(rb.npad);
      const A gc = gout * coef[b];
      using V = Vec<A>;
      const V zero = vsplat<A>(A(0));
      for (int64_t j = 0; j < rb.npad; j += kLanes) {
        const ValueLanes<A> t(rb, j, has_clip, clip);
        vstore(dx.data() + j, t.m != zero ? gc * t.m * t.grad : zero);
      }
      store_any<A>(static_cast<char*>(out) + b * T * osz, out_dt, T, dx.data());
    }
  });
}

}  // namespace

void policy_fwd(const Mat& logp, const Mat& old_logp, const Mat& adv, const Mat& mask, int64_t B,
                int64_t T, const PolicyArgs& pa, const AggArgs& agg, bool f64, void* loss,
                void* stats, void* coef, void* seqlr) {
  if (f64)
    policy_fwd_impl<double>(logp, old_logp, adv, mask, B, T, pa, agg, loss, stats, coef, seqlr);
  else
    policy_fwd_impl<float>(logp, old_logp, adv, mask, B, T, pa, agg, loss, stats, coef, seqlr);
}

void policy_bwd(double g, const Mat& logp, const Mat& old_logp, const Mat& adv, const Mat& mask,
                int64_t B, int64_t T, const PolicyArgs& pa, bool f64, const void* coef,
                const void* seqlr, void* out, ScalarType out_dt) {
  if (f64)
    policy_bwd_impl<double>(g, logp, old_logp, adv, mask, B, T, pa, coef, seqlr, out, out_dt);
  else
    policy_bwd_impl<float>(g, logp, old_logp, adv, mask, B, T, pa, coef, seqlr, out, out_dt);
}

void value_fwd(const Mat& values, const Mat& old_values, const Mat& returns, const Mat& mask,
               int64_t B, int64_t T, bool has_clip, double clip, const AggArgs& agg, bool f64,
               void* loss, void* stats, void* coef) {
  if (f64)
    value_fwd_impl<double>(values, old_values, returns, mask, B, T, has_clip, clip, agg, loss,
                           stats, coef);
  else
    value_fwd_impl<float>(values, old_values, returns, mask, B, T, has_clip, clip, agg, loss,
                          stats, coef);
}

void value_bwd(double g, const Mat& values, const Mat& old_values, const Mat& returns,
               const Mat& mask, int64_t B, int64_t T, bool has_clip, double clip, bool f64,
               const void* coef, void* out, ScalarType out_dt) {
  if (f64)
    value_bwd_impl<double>(g, values, old_values, returns, mask, B, T, has_clip, clip, coef, out,
                           out_dt);
  else
    value_bwd_impl<float>(g, values, old_values, returns, mask, B, T, has_clip, clip, coef, out,
                          out_dt);
}

}  // namespace native
}  // namespace fastrlhf

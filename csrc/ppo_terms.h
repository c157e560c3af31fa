// Per-token formulas of the PPO losses and KL estimators, shared by losses.cpp and
// fused_loss.cpp.  They mirror kernels/losses.py (policy_token_terms, value_token_terms) and
// kernels/kl.py (_klp_value, _klp_dvdx), including torch's tie conventions: max / min split the
// gradient 50/50 on equality, clamps pass it at their bounds.
#pragma once

#include "common.h"
#include "native.h"

namespace fastrlhf {
namespace native {

template <typename A>
struct PolicyConsts {
  A lo, hi, dual;
  bool has_dual, seq;
  explicit PolicyConsts(const PolicyArgs& p)
      : lo(static_cast<A>(p.lo)), hi(static_cast<A>(p.hi)), dual(static_cast<A>(p.dual)),
        has_dual(p.has_dual), seq(p.seq) {}
};

// Per-token policy loss from the (clamped) log-ratio lr; `ind`: d lr / d logp = 1.
template <typename A>
inline void policy_terms(A lr, bool ind, A adv, bool bad, const PolicyConsts<A>& c, A& loss,
                         A& grad, bool& clipped, bool& lower) {
  const A r = exp_acc(lr);
  const A l1 = -adv * r;
  A rc = r < c.lo ? c.lo : r;
  rc = rc > c.hi ? c.hi : rc;
  const A l2 = -adv * rc;
  clipped = l2 > l1;
  const bool tie = l1 == l2;
  const A c1 = clipped ? l2 : l1;
  const A w1 = l1 > l2 ? A(1) : (tie ? A(0.5) : A(0));
  const A w2 = clipped ? A(1) : (tie ? A(0.5) : A(0));
  const bool in_rng = (r >= c.lo) && (r <= c.hi);
  A dl_dr = -adv * (w1 + (in_rng ? w2 : A(0)));
  loss = c1;
  lower = false;
  if (c.has_dual) {
    const A l3 = -adv * c.dual;
    const bool neg = adv < A(0);
    lower = (c1 > l3) && neg;
    loss = lower ? l3 : c1;
    const A wd = c1 < l3 ? A(1) : (c1 == l3 ? A(0.5) : A(0));
    dl_dr = neg ? dl_dr * wd : dl_dr;
  }
  grad = ind ? dl_dr * r : A(0);
  if (bad) {
    loss = kNaN<A>;
    clipped = lower = false;
  }
  // The derivative is NaN exactly where the per-token loss is NaN (a NaN input here, a NaN
  // GSPO row ratio, or logp = old = +-inf).
  if (loss != loss) grad = kNaN<A>;
}

// Log-ratio of one token: clamp(lp - old, -20, 20) (NaN stays NaN) or the row's GSPO ratio.
template <typename A>
inline void log_ratio(A lp, A old, A seq_s, bool seq, A& lr, bool& ind) {
  if (seq) {
    ind = seq_s <= A(10);
    lr = seq_s > A(10) ? A(10) : seq_s;  // a NaN row ratio stays NaN
  } else {
    const A d = lp - old;
    ind = d >= A(-20) && d <= A(20);
    lr = d < A(-20) ? A(-20) : (d > A(20) ? A(20) : d);
  }
}

template <typename A>
inline void value_terms(A v, A ov, A ret, bool bad, bool has_clip, A clip, A& loss, A& grad,
                        bool& clipped) {
  const A e1 = v - ret;
  const A l1 = e1 * e1;
  loss = l1;
  grad = A(2) * e1;
  clipped = false;
  if (has_clip) {
    const A top = ov + clip, bot = ov - clip;
    const A a = v < top ? v : top;
    const A da = v < top ? A(1) : (v == top ? A(0.5) : A(0));
    const A vc = a > bot ? a : bot;
    const A dvc = da * (a > bot ? A(1) : (a == bot ? A(0.5) : A(0)));
    const A e2 = vc - ret;
    const A l2 = e2 * e2;
    clipped = l2 > l1;
    const bool tie = l1 == l2;
    const A w1 = l1 > l2 ? A(1) : (tie ? A(0.5) : A(0));
    const A w2 = clipped ? A(1) : (tie ? A(0.5) : A(0));
    loss = clipped ? l2 : l1;
    grad = w1 * A(2) * e1 + w2 * A(2) * e2 * dvc;
  }
  if (bad) {
    loss = kNaN<A>;
    clipped = false;
  }
  if (loss != loss) grad = kNaN<A>;
}

// ---- lane-parallel versions (losses.cpp's [B, T] loops) -------------------------------------
// The same formulas on kLanes tokens at once with vector selects, so they compile to SIMD code
// with no data-dependent branches: the scalar versions above run branchy (~26 ns per token in a
// standalone harness on random data, mispredicted clip / tie branches), these ~1 ns.  Lane l
// computes exactly what the scalar version gives for that token (the same operations in the same
// order; exp via the same polynomial, whose single power-of-two scale is exact here), so the
// per-lane partial sums, and so the results, are unchanged bit for bit -- except that a GSPO
// log-ratio below -88 gives a ratio of exactly 0 where exp_f32 gave a denormal.
template <typename A>
using VMask = typename VecT<A>::itype;

template <typename A>
inline void vlog_ratio(Vec<A> lp, Vec<A> old, A seq_s, bool seq, Vec<A>& lr, VMask<A>& ind) {
  using V = Vec<A>;
  if (seq) {
    const V s = vsplat<A>(seq_s);
    ind = s <= vsplat<A>(A(10));
    lr = s > vsplat<A>(A(10)) ? vsplat<A>(A(10)) : s;
  } else {
    const V d = lp - old;
    const V lo = vsplat<A>(A(-20)), hi = vsplat<A>(A(20));
    ind = (d >= lo) & (d <= hi);
    lr = d < lo ? lo : (d > hi ? hi : d);
  }
}

template <typename A>
inline void vpolicy_terms(Vec<A> lr, VMask<A> ind, Vec<A> adv, VMask<A> bad,
                          const PolicyConsts<A>& c, Vec<A>& loss, Vec<A>& grad,
                          VMask<A>& clipped, VMask<A>& lower) {
  using V = Vec<A>;
  const V one = vsplat<A>(A(1)), half = vsplat<A>(A(0.5)), zero = vsplat<A>(A(0));
  const V clo = vsplat<A>(c.lo), chi = vsplat<A>(c.hi);
  // lr is in [-20, 10 or 20] or NaN (a GSPO row ratio may be -inf: clamped to exp's range -> 0)
  const V r = vexp_clamped(vclamp_lo<A>(lr));
  const V l1 = -adv * r;
  V rc = r < clo ? clo : r;
  rc = rc > chi ? chi : rc;
  const V l2 = -adv * rc;
  clipped = l2 > l1;
  const VMask<A> tie = l1 == l2;
  const V c1 = clipped ? l2 : l1;
  const V w1 = l1 > l2 ? one : (tie ? half : zero);
  const V w2 = clipped ? one : (tie ? half : zero);
  const VMask<A> in_rng = (r >= clo) & (r <= chi);
  V dl_dr = -adv * (w1 + (in_rng ? w2 : zero));
  loss = c1;
  lower = VMask<A>{};
  if (c.has_dual) {
    const V l3 = -adv * c.dual;
    const VMask<A> neg = adv < zero;
    lower = (c1 > l3) & neg;
    loss = lower ? l3 : c1;
    const V wd = c1 < l3 ? one : (c1 == l3 ? half : zero);
    dl_dr = neg ? dl_dr * wd : dl_dr;
  }
  grad = ind ? dl_dr * r : zero;
  const V nan = vsplat<A>(kNaN<A>);
  loss = bad ? nan : loss;
  clipped &= ~bad;
  lower &= ~bad;
  grad = loss != loss ? nan : grad;
}

template <typename A>
inline void vvalue_terms(Vec<A> v, Vec<A> ov, Vec<A> ret, VMask<A> bad, bool has_clip, A clip,
                         Vec<A>& loss, Vec<A>& grad, VMask<A>& clipped) {
  using V = Vec<A>;
  const V one = vsplat<A>(A(1)), half = vsplat<A>(A(0.5)), zero = vsplat<A>(A(0));
  const V two = vsplat<A>(A(2));
  const V e1 = v - ret;
  const V l1 = e1 * e1;
  loss = l1;
  grad = two * e1;
  clipped = VMask<A>{};
  if (has_clip) {
    const V top = ov + clip, bot = ov - clip;
    const V a = v < top ? v : top;
    const V da = v < top ? one : (v == top ? half : zero);
    const V vc = a > bot ? a : bot;
    const V dvc = da * (a > bot ? one : (a == bot ? half : zero));
    const V e2 = vc - ret;
    const V l2 = e2 * e2;
    clipped = l2 > l1;
    const VMask<A> tie = l1 == l2;
    const V w1 = l1 > l2 ? one : (tie ? half : zero);
    const V w2 = clipped ? one : (tie ? half : zero);
    loss = clipped ? l2 : l1;
    grad = w1 * two * e1 + w2 * two * e2 * dvc;
  }
  const V nan = vsplat<A>(kNaN<A>);
  loss = bad ? nan : loss;
  clipped &= ~bad;
  grad = loss != loss ? nan : grad;
}

// KL estimators of logp = x against ref_logp = y (codes as kernels/kl.py KINDS).
enum KLKind : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

template <typename A>
inline A kl_value(A x, A y, int kind) {
  switch (kind) {
    case kK1: return x - y;
    case kAbs: return std::fabs(x - y);
    case kK2: { const A d = x - y; return A(0.5) * (d * d); }
    default: {
      A k = y - x;
      k = k < A(-20) ? A(-20) : (k > A(20) ? A(20) : k);  // NaN stays NaN
      A v = exp_acc(k) - k - A(1);
      return v < A(-10) ? A(-10) : (v > A(10) ? A(10) : v);
    }
  }
}

// d kl_value / d x (d / d y is its negative for every kind).
template <typename A>
inline A kl_dvdx(A x, A y, int kind) {
  switch (kind) {
    case kK1: return A(1);
    case kAbs: { const A d = x - y; return d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0)); }
    case kK2: return x - y;
    default: {
      const A raw = y - x;
      const A k = raw < A(-20) ? A(-20) : (raw > A(20) ? A(20) : raw);
      const A r = exp_acc(k);
      const A v = r - k - A(1);
      const bool live = raw >= A(-20) && raw <= A(20) && v >= A(-10) && v <= A(10);
      return live ? A(1) - r : A(0);
    }
  }
}

}  // namespace native
}  // namespace fastrlhf

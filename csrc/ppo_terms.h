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

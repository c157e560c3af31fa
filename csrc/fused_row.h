// One token of the fused PPO / GRPO / GSPO loss, shared by the logits path (fused_loss.cpp) and
// the lm_head path (fused_linear.cpp, whose logits are a row block it has just formed):
//   stats  -> logp, M, log S, H of the row (row_stats: one streaming sweep);
//   finish -> the per-token loss terms into aux, and, when the gradient is written,
//             d loss / d logits = (g_lp (onehot - p) - g_H p (log p + H)) / T for the row;
// and the serial reduction of the per-token terms into the loss and the statistics.
// Every per-token input is indexed by the global row n = b T + t; the logits / gradient rows are
// pointers the caller supplies (a strided [B, T, V] tensor, or a contiguous row block).
#pragma once

#include "common.h"
#include "native.h"
#include "ppo_terms.h"
#include "softmax_row.h"

namespace fastrlhf {
namespace native {

template <typename A>
struct FusedTokens {
  const int64_t* tokens;  // [N] ids (ignore_index allowed)
  const A* old;           // [N] behaviour-policy log-probs
  const A* adv;           // [N], or [B] with FusedArgs::adv_row
  const A* ref;           // [N] reference log-probs, or null (no KL term)
  const A* m;             // [N] mask as weights
  const A* coef;          // [B] aggregation weights: d loss / d L_bt = coef_b m_bt
  int64_t T;              // tokens per sequence: row n belongs to sequence n / T
};

// aux rows (each [N]): the enum FusedAux of native.h -- loss term, logp, entropy, kl, clipped,
// clipped_lower, approx_kl term; with FusedArgs::defer also g_lp, g_h, M, log S.

template <typename S, typename A, typename Sc>
class FusedRow {
 public:
  FusedRow(const FusedTokens<A>& in, const FusedArgs& fa, const Sc& sc, int64_t V, int64_t N,
           A* aux)
      : in_(in), fa_(fa), sc_(sc), pc_(fa.pol), V_(V), N_(N), aux_(aux),
        kl_coef_(static_cast<A>(fa.kl_coef)), ent_coef_(static_cast<A>(fa.ent_coef)) {}

  // logp of row `row` from its logits x (and M, log S, H); a NaN row or an out-of-range id
  // gives NaN, an ignored id 0.  buf: kLanes scratch.
  // keep: also keep the row's exp terms for finish (when it writes the gradient right after).
  A stats(int64_t row, const S* x, A* buf, A& M, A& logS, A& H,
          const RowExps<A>* keep = nullptr) const {
    const int64_t tok = in_.tokens[row];
    A x_tok;
    const bool ok = keep != nullptr
                        ? row_stats<S, A, Sc, true>(x, V_, sc_, buf, M, logS, H, tok, x_tok, keep)
                        : row_stats<S, A>(x, V_, sc_, buf, M, logS, H, tok, x_tok);
    A lp = ok ? (x_tok - M) - logS : kNaN<A>;
    if (tok == fa_.ignore_index) lp = A(0);
    return lp;
  }

  // The per-token terms of row `row` into aux and, when fa.write_grad, its gradient row into
  // `out` (may alias x: every vector is read before it is written).  seq_lr: the sequence's
  // GSPO mean log-ratio (ignored for token-level ratios).  keep: the exp terms stats kept for
  // this row (the gradient sweep then computes no exp), or null.
  void finish(int64_t row, const S* x, S* out, A M, A logS, A H, A logp, A seq_lr,
              A* buf, const RowExps<A>* keep = nullptr) const {
    const int64_t b = row / in_.T;
    const A o = in_.old[row];
    const A a = fa_.adv_row ? in_.adv[b] : in_.adv[row];
    const A w = in_.coef[b] * in_.m[row];
    A lr, akl;
    bool ind;
    if (pc_.seq) {
      log_ratio(logp, o, seq_lr, true, lr, ind);  // a NaN row ratio stays NaN
      akl = o - logp;
    } else {
      log_ratio(logp, o, A(0), false, lr, ind);
      akl = -lr;
    }
    const bool bad = logp != logp || o != o || a != a;
    A pg, dpg;
    bool clipped, lower;
    policy_terms(lr, ind, a, bad, pc_, pg, dpg, clipped, lower);
    A kl = A(0), dkl = A(0);
    if (fa_.has_ref) {
      kl = kl_value(logp, in_.ref[row], fa_.kl_val);
      dkl = kl_dvdx(logp, in_.ref[row], fa_.kl_grad);
    }
    const int64_t N = N_;
    aux_[kAuxLoss * N + row] = pg + kl_coef_ * kl - ent_coef_ * H;
    aux_[kAuxLogp * N + row] = logp;
    aux_[kAuxEntropy * N + row] = H;
    aux_[kAuxKl * N + row] = kl;
    aux_[kAuxClipped * N + row] = clipped ? A(1) : A(0);
    aux_[kAuxClippedLower * N + row] = lower ? A(1) : A(0);
    aux_[kAuxApproxKl * N + row] = akl;
    // d loss / d logp and d loss / d H of this token (0 for tokens that do not count): the
    // coefficients of the gradient sweep, here or in a later one (fused_loss_grad)
    const int64_t tok = in_.tokens[row];
    const bool live = w != A(0);
    const A g_lp = live && tok != fa_.ignore_index ? w * (dpg + kl_coef_ * dkl) : A(0);
    const A g_h = live ? -w * ent_coef_ : A(0);
    if (fa_.defer) {
      aux_[kAuxGradLogp * N + row] = g_lp;
      aux_[kAuxGradEntropy * N + row] = g_h;
      aux_[kAuxRowMax * N + row] = M;
      aux_[kAuxRowLogSum * N + row] = logS;
      return;
    }
    if (!fa_.write_grad) return;
    if (!live) {  // masked token: zero gradient, the logits are not read again
      zero_row(out, V_);
      return;
    }
    if (keep != nullptr) {
      if (ent_coef_ != A(0))
        grad_row_from_exps<S, A, true>(x, out, V_, sc_, M, logS, H, g_lp, g_h, tok, buf, *keep);
      else
        grad_row_from_exps<S, A, false>(x, out, V_, sc_, M, logS, H, g_lp, A(0), tok, buf,
                                        *keep);
    } else if (ent_coef_ != A(0)) {
      grad_row<S, A, true>(x, out, V_, sc_, M, logS, H, g_lp, g_h, tok, buf);
    } else {
      grad_row<S, A, false>(x, out, V_, sc_, M, logS, H, g_lp, A(0), tok, buf);
    }
  }

 private:
  const FusedTokens<A>& in_;
  const FusedArgs& fa_;
  const Sc& sc_;
  const PolicyConsts<A> pc_;
  const int64_t V_, N_;
  A* aux_;
  const A kl_coef_, ent_coef_;
};

// loss = sum_b c_b sum_t where(m != 0, L, 0) m; stats (clipfrac, clipfrac_lower, approx_kl,
// entropy_mean, kl_mean): masked means.  Serial in row order, in double, so the result does
// not depend on how the rows were split between threads.
template <typename A>
void reduce_fused(const A* aux, const A* m, const A* coef, int64_t B, int64_t T, A* loss_out,
                  A* stats_out) {
  const int64_t N = B * T;
  auto terms = [&](int k, int64_t i) -> double {
    return m[i] != A(0) ? static_cast<double>(aux[k * N + i]) * static_cast<double>(m[i]) : 0.0;
  };
  double loss = 0.0, den = 0.0, st[5] = {0, 0, 0, 0, 0};
  const int stat_rows[5] = {kAuxClipped, kAuxClippedLower, kAuxApproxKl, kAuxEntropy, kAuxKl};
  for (int64_t b = 0; b < B; ++b) {
    double rs = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      rs += terms(kAuxLoss, i);
      den += static_cast<double>(m[i]);
      for (int k = 0; k < 5; ++k) st[k] += terms(stat_rows[k], i);
    }
    if (coef[b] != A(0)) loss += static_cast<double>(coef[b]) * rs;
  }
  *loss_out = static_cast<A>(loss);
  const double d = den + 1e-8;
  for (int k = 0; k < 5; ++k) stats_out[k] = static_cast<A>(st[k] / d);
}

}  // namespace native
}  // namespace fastrlhf

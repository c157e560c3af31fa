// The whole per-token PPO / GRPO / GSPO policy loss straight from the logits, with the gradient
// w.r.t. the logits produced in the same pass (CPU counterpart of kernels/fused_loss.py).
//
// Per row (token) n = (b, t), rows in parallel:
//   1. statistics: one streaming sweep (row_stats: online logsumexp + entropy sum) gives
//      logp = (x_tok - M) - log S and H (x = logits / temperature);
//   2. per-token loss: pg and d pg / d logp (policy_terms: token ratio clamp(logp - old, -20, 20)
//      or the GSPO sequence ratio), the KL estimator and its derivative, and
//          L = pg + kl_coef kl - entropy_coef H,
//          g_lp = w (d pg / d logp + kl_coef d kl / d logp),   g_H = -w entropy_coef
//      with w = c_b m_bt the token's aggregation weight;
//   3. gradient: the row is swept again (from L2: a V = 32000 fp32 row is 128 KB) and
//      dlogits = (g_lp (onehot - p) - g_H p (log p + H)) / T written -- into a fresh buffer or
//      over the logits (each vector is read before it is written).  Masked tokens (w = 0) get a
//      zero row without the logits being read again.
// GSPO (ratio_level="sequence") needs the row's mean log-ratio first: a statistics pass over
// all rows, the per-sequence log-ratios, then the loss / gradient pass from the saved (M, log S).
// The loss and the statistics are reduced serially in row order (in double), so the result is
// bitwise identical for any number of threads.
#include "common.h"
#include "native.h"
#include "ppo_terms.h"
#include "softmax_row.h"

namespace fastrlhf {
namespace native {
namespace {

template <typename S, typename A, typename Sc>
void fused_impl(const void* logits_v, void* dlogits_v, const int64_t* dims,
                const int64_t* strides, const int64_t* ostrides, int64_t V, int64_t B, int64_t T,
                const int64_t* tokens, const A* old, const A* adv, const A* ref, const A* m,
                const A* coef, const FusedArgs& fa, const Sc& sc, A* aux, A* loss_out,
                A* stats_out) {
  const S* logits = static_cast<const S*>(logits_v);
  S* dlogits = static_cast<S*>(dlogits_v);
  const RowLayout lay{dims[1], dims[2], strides[0], strides[1], strides[2]};
  const RowLayout olay{dims[1], dims[2], ostrides[0], ostrides[1], ostrides[2]};
  const int64_t N = B * T;
  const A kl_coef = static_cast<A>(fa.kl_coef);
  const A ent_coef = static_cast<A>(fa.ent_coef);
  const PolicyConsts<A> pc(fa.pol);
  const bool seq = fa.pol.seq;

  // logp of row n (and M, log S, H); NaN rows / out-of-range ids give NaN, ignored ids 0.
  auto row_logp = [&](int64_t row, A* buf, A& M, A& logS, A& H) -> A {
    const int64_t tok = tokens[row];
    A x_tok;
    const bool ok = row_stats<S, A>(logits + lay.offset(row), V, sc, buf, M, logS, H, tok, x_tok);
    A lp = ok ? (x_tok - M) - logS : kNaN<A>;
    if (tok == fa.ignore_index) lp = A(0);
    return lp;
  };

  std::vector<A> sM, sLogS, sH, sLp, seq_lr;
  if (seq) {
    sM.resize(N);
    sLogS.resize(N);
    sH.resize(N);
    sLp.resize(N);
    parallel_rows(N, rows_grain(V), [&](int64_t r0, int64_t r1) {
      std::vector<A> buf(kLanes);
      for (int64_t row = r0; row < r1; ++row)
        sLp[row] = row_logp(row, buf.data(), sM[row], sLogS[row], sH[row]);
    });
    // verl: sum_t m (logp - old) / max(sum_t m, 1), NaN outside the mask ignored
    seq_lr.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      A d = A(0), n = A(0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        d += (m[i] != A(0) ? sLp[i] - old[i] : A(0)) * m[i];
        n += m[i];
      }
      seq_lr[b] = d / (n > A(1) ? n : A(1));
    }
  }

  parallel_rows(N, rows_grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(kLanes);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / T;
      A M, logS, H, logp;
      if (seq) {
        M = sM[row];
        logS = sLogS[row];
        H = sH[row];
        logp = sLp[row];
      } else {
        logp = row_logp(row, buf.data(), M, logS, H);
      }
      const A o = old[row];
      const A a = fa.adv_row ? adv[b] : adv[row];
      const A w = coef[b] * m[row];
      A lr, akl;
      bool ind;
      if (seq) {
        log_ratio(logp, o, seq_lr[b], true, lr, ind);  // a NaN row ratio stays NaN
        akl = o - logp;
      } else {
        log_ratio(logp, o, A(0), false, lr, ind);
        akl = -lr;
      }
      const bool bad = logp != logp || o != o || a != a;
      A pg, dpg;
      bool clipped, lower;
      policy_terms(lr, ind, a, bad, pc, pg, dpg, clipped, lower);
      A kl = A(0), dkl = A(0);
      if (fa.has_ref) {
        kl = kl_value(logp, ref[row], fa.kl_val);
        dkl = kl_dvdx(logp, ref[row], fa.kl_grad);
      }
      aux[0 * N + row] = pg + kl_coef * kl - ent_coef * H;
      aux[1 * N + row] = logp;
      aux[2 * N + row] = H;
      aux[3 * N + row] = kl;
      aux[4 * N + row] = clipped ? A(1) : A(0);
      aux[5 * N + row] = lower ? A(1) : A(0);
      aux[6 * N + row] = akl;
      if (!fa.write_grad) continue;
      S* out = dlogits + olay.offset(row);
      if (w == A(0)) {  // masked token: zero gradient, the logits are not read again
        zero_row(out, V);
        continue;
      }
      const int64_t tok = tokens[row];
      const A g_lp = tok == fa.ignore_index ? A(0) : w * (dpg + kl_coef * dkl);
      const S* x = logits + lay.offset(row);
      if (ent_coef != A(0))
        grad_row<S, A, true>(x, out, V, sc, M, logS, H, g_lp, -w * ent_coef, tok,
                             buf.data());
      else
        grad_row<S, A, false>(x, out, V, sc, M, logS, H, g_lp, A(0), tok, buf.data());
    }
  });

  // loss = sum_b c_b sum_t where(m != 0, L, 0) m; stats: masked means (serial, in double)
  auto terms = [&](int k, int64_t i) -> double {
    return m[i] != A(0) ? static_cast<double>(aux[k * N + i]) * static_cast<double>(m[i]) : 0.0;
  };
  double loss = 0.0, den = 0.0, st[5] = {0, 0, 0, 0, 0};
  const int stat_rows[5] = {4, 5, 6, 2, 3};
  for (int64_t b = 0; b < B; ++b) {
    double rs = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      rs += terms(0, i);
      den += static_cast<double>(m[i]);
      for (int k = 0; k < 5; ++k) st[k] += terms(stat_rows[k], i);
    }
    if (coef[b] != A(0)) loss += static_cast<double>(coef[b]) * rs;
  }
  *loss_out = static_cast<A>(loss);
  const double d = den + 1e-8;
  for (int k = 0; k < 5; ++k) stats_out[k] = static_cast<A>(st[k] / d);
}

}  // namespace

void fused_loss_fwd(const void* logits, void* dlogits, ScalarType dt, const int64_t* dims,
                    const int64_t* strides, const int64_t* ostrides, int64_t V, int64_t B,
                    int64_t T, const int64_t* tokens, const void* old_logp, const void* adv,
                    const void* ref_logp, const void* mask, const void* coef,
                    const FusedArgs& fa, void* aux, void* loss, void* stats) {
  dispatch_logits(dt, [&](auto t, auto a) {
    using T_ = decltype(t);
    using A = decltype(a);
    with_logit_scale(static_cast<A>(fa.inv_temp), [&](const auto sc) {
      fused_impl<T_, A>(logits, dlogits, dims, strides, ostrides, V, B, T, tokens,
                        static_cast<const A*>(old_logp), static_cast<const A*>(adv),
                        static_cast<const A*>(ref_logp), static_cast<const A*>(mask),
                        static_cast<const A*>(coef), fa, sc, static_cast<A*>(aux),
                        static_cast<A*>(loss), static_cast<A*>(stats));
    });
  });
}

}  // namespace native
}  // namespace fastrlhf

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
//   3. gradient: the row is swept again and
//      dlogits = (g_lp (onehot - p) - g_H p (log p + H)) / T written -- into a fresh buffer or
//      over the logits (each vector is read before it is written); p comes from the exp terms
//      step 1 kept in a per-thread [V] scratch (RowExps: no exp per element, and without an
//      entropy term no second read of the logits).  Masked tokens (w = 0) get a
//      zero row without the logits being read again.
// GSPO (ratio_level="sequence") needs the row's mean log-ratio first: a statistics pass over
// the rows of a group of whole sequences, their mean log-ratios, then the loss / gradient pass
// over the same rows from the saved (M, log S) (groups sized to the L2 caches: gspo_seq_group).
// The loss and the statistics are reduced serially in row order (in double), so the result is
// bitwise identical for any number of threads.  Steps 1-3 of a row and the reduction are in
// fused_row.h, shared with the lm_head path (fused_linear.cpp: fused_linear_loss_fwd).
#include "fused_row.h"

namespace fastrlhf {
namespace native {

// Sequences per GSPO group (see fused_impl): as many as fit three quarters of the L2 cache of
// every thread (each reads its share of the group's rows, then writes their gradient), at least
// one; B (a single group) when one sequence does not fit.
int64_t gspo_seq_group(int64_t seq_bytes, int64_t B) {
  static const int64_t l2 = cache_bytes(_SC_LEVEL2_CACHE_SIZE, int64_t(1) << 20);
  const int64_t budget = l2 * 3 / 4 * std::max(1, at::get_num_threads());
  if (seq_bytes <= 0 || seq_bytes > budget) return std::max<int64_t>(B, 1);
  return std::max<int64_t>(1, budget / seq_bytes);
}

namespace {

template <typename S, typename A, typename Sc>
void fused_impl(const void* logits_v, void* dlogits_v, const int64_t* dims,
                const int64_t* strides, const int64_t* ostrides, int64_t V, int64_t B, int64_t T,
                const FusedTokens<A>& in, const FusedArgs& fa, const Sc& sc, A* aux,
                A* loss_out, A* stats_out) {
  const S* logits = static_cast<const S*>(logits_v);
  S* dlogits = static_cast<S*>(dlogits_v);
  const RowLayout lay{dims[1], dims[2], strides[0], strides[1], strides[2]};
  const RowLayout olay{dims[1], dims[2], ostrides[0], ostrides[1], ostrides[2]};
  const int64_t N = B * T;
  const FusedRow<S, A, Sc> op(in, fa, sc, V, N, aux);
  const A* m = in.m;
  const A* old = in.old;

  if (fa.pol.seq) {
    // GSPO: per group of whole sequences, a statistics pass over its rows, the sequences'
    // mean log-ratios, then the loss / gradient pass over the same rows.  When the gradient is
    // written and a group's logits fit the threads' L2 caches, that pass re-reads
    // them from L2 instead of from L3 / memory (gspo_seq_group): measured (bf16 4 x 64 x 8192, two threads, the
    // whole fwd+bwd step with builds alternated) 1.43 -> 1.06 ms.  Sequences larger than that
    // make one group (all rows, then all rows again): per-sequence groups of 16 MB (8 x 256 x
    // 32000) measured 7-10% slower than that, the L3 here not keeping them.
    std::vector<A> sM(N), sLogS(N), sH(N), sLp(N), seq_lr(B);
    const int64_t seq_per_group =
        fa.write_grad ? gspo_seq_group(T * V * static_cast<int64_t>(sizeof(S)), B) : B;
    for (int64_t b0 = 0; b0 < B; b0 += seq_per_group) {
      const int64_t b1 = std::min(B, b0 + seq_per_group);
      const int64_t r0 = b0 * T, nr = (b1 - b0) * T;
      parallel_rows(nr, rows_grain(V), [&](int64_t i0, int64_t i1) {
        std::vector<A> buf(kLanes);
        for (int64_t row = r0 + i0; row < r0 + i1; ++row)
          sLp[row] = op.stats(row, logits + lay.offset(row), buf.data(), sM[row], sLogS[row],
                              sH[row]);
      });
      // verl: sum_t m (logp - old) / max(sum_t m, 1), NaN outside the mask ignored
      for (int64_t b = b0; b < b1; ++b) {
        A d = A(0), n = A(0);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = b * T + t;
          d += (m[i] != A(0) ? sLp[i] - old[i] : A(0)) * m[i];
          n += m[i];
        }
        seq_lr[b] = d / (n > A(1) ? n : A(1));
      }
      parallel_rows(nr, rows_grain(V), [&](int64_t i0, int64_t i1) {
        std::vector<A> buf(kLanes);
        for (int64_t row = r0 + i0; row < r0 + i1; ++row) {
          S* out = fa.write_grad ? dlogits + olay.offset(row) : nullptr;
          op.finish(row, logits + lay.offset(row), out, sM[row], sLogS[row], sH[row], sLp[row],
                    seq_lr[row / T], buf.data());
        }
      });
    }
  } else {
    // Token-level rows writing the gradient keep the statistics sweep's exp terms for the
    // gradient sweep right after it (RowExps: a thread's [V] scratch, in L2 with the row).
    parallel_rows(N, rows_grain(V), [&](int64_t r0, int64_t r1) {
      std::vector<A> buf(kLanes);
      const RowExpsScratch<A> keep(V, fa.write_grad);
      for (int64_t row = r0; row < r1; ++row) {
        const S* x = logits + lay.offset(row);
        S* out = fa.write_grad ? dlogits + olay.offset(row) : nullptr;
        A M, logS, H;
        const A logp = op.stats(row, x, buf.data(), M, logS, H, keep.get());
        op.finish(row, x, out, M, logS, H, logp, A(0), buf.data(), keep.get());
      }
    });
  }
  reduce_fused(aux, m, in.coef, B, T, loss_out, stats_out);
}

// x *= f over the rows: one read and one write per element, converted in registers (bf16: the
// even / odd halves of vload_pair, stored back by the matching vstore_pair, NaN kept).  Same
// arithmetic as ATen's x.mul_(f) with a float scalar (x in the accumulation dtype times f, one
// rounding), which it replaces in the native backward: that took ~0.46 ms for a 256 x 8192 bf16
// gradient on 2 cores of the Xeon, a third of the whole fused loss step.
template <typename T, typename A>
void scale_impl(void* x_v, const int64_t* dims, const int64_t* strides, int64_t V, A f) {
  T* x = static_cast<T*>(x_v);
  const RowLayout lay{dims[1], dims[2], strides[0], strides[1], strides[2]};
  const int64_t N = dims[0] * dims[1] * dims[2];
  const Vec<A> fv = vsplat(f);
  parallel_rows(N, rows_grain(V), [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      T* r = x + lay.offset(row);
      int64_t j = 0;
      for (; j + 2 * kLanes <= V; j += 2 * kLanes) {
        Vec<A> v0, v1;
        vload_pair<T, A>(r + j, v0, v1);
        vstore_pair<T, A>(r + j, v0 * fv, v1 * fv);
      }
      for (; j < V; ++j) Elem<T>::template store<A>(r + j, Elem<T>::template load<A>(r + j) * f);
    }
  });
}

}  // namespace

void scale_rows(void* x, ScalarType dt, const int64_t* dims, const int64_t* strides, int64_t V,
                double factor) {
  dispatch_logits(dt, [&](auto t, auto a) {
    using T_ = decltype(t);
    using A = decltype(a);
    scale_impl<T_, A>(x, dims, strides, V, static_cast<A>(factor));
  });
}

void fused_loss_fwd(const void* logits, void* dlogits, ScalarType dt, const int64_t* dims,
                    const int64_t* strides, const int64_t* ostrides, int64_t V, int64_t B,
                    int64_t T, const int64_t* tokens, const void* old_logp, const void* adv,
                    const void* ref_logp, const void* mask, const void* coef,
                    const FusedArgs& fa, void* aux, void* loss, void* stats) {
  dispatch_logits(dt, [&](auto t, auto a) {
    using T_ = decltype(t);
    using A = decltype(a);
    with_logit_scale(static_cast<A>(fa.inv_temp), [&](const auto sc) {
      const FusedTokens<A> in{tokens, static_cast<const A*>(old_logp),
                              static_cast<const A*>(adv), static_cast<const A*>(ref_logp),
                              static_cast<const A*>(mask), static_cast<const A*>(coef), T};
      fused_impl<T_, A>(logits, dlogits, dims, strides, ostrides, V, B, T, in, fa, sc,
                        static_cast<A*>(aux), static_cast<A*>(loss), static_cast<A*>(stats));
    });
  });
}

}  // namespace native
}  // namespace fastrlhf

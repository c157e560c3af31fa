// Token log-probabilities and entropy from logits, forward and backward (CPU).
//
// Rows: logits are addressed as [D0, D1, D2, V] with arbitrary strides on the three leading dims
// and unit stride on the vocab (fastrlhf.ops._common.rows_layout), so logits[:, :-1] is read in
// place.  Each row is one task; rows run in parallel.
//
// Forward, one streaming pass per row (online logsumexp at block granularity): each block of
// kBlock elements is read once, converted to the accumulation type in registers (x = logits *
// inv_temp), and every element adds e = exp(x - M) to the kLanes accumulators s and e * (x - M)
// to t, against the running max M of the blocks before it (one exp per element, computed as
// 2^((x - M) log2 e)).  The block's max is taken in the same pass; when it exceeds M the block's
// sums are merged and the accumulators rescaled once:
//     s <- s * exp(M - M'),   t <- exp(M - M') * (t + (M - M') s)
// A block more than kSlack above M is recomputed against its own max instead (bounding e and
// the cancellation in t), and the first block with a finite value takes its max in a pass of
// its own.  At the end S = sum(s), logS = log S, H = logS - sum(t) / S and
// logp = (x[token] - M) - logS; (M, logS) is saved for backward.  NaN anywhere in a row makes
// that row's outputs NaN.
//
// Backward recomputes z = (x - M) - logS, p = exp(z) and writes
//     dlogits = (dlogp * (onehot - p) - dH * p * (z + H)) * inv_temp
// one vector at a time into the output (which may be the logits buffer itself: every vector is
// read before it is written).  Nothing of size [N, V] is allocated.
#include "native.h"
#include "softmax_row.h"

namespace fastrlhf {
namespace native {
namespace {

template <typename T, typename A>
void fwd_impl(const void* logits_v, const int64_t* dims, const int64_t* strides, int64_t V,
              const int64_t* tokens, double inv_temp_d, int64_t ignore_index, void* logp_v,
              void* ent_v, void* lse_v) {
  const T* logits = static_cast<const T*>(logits_v);
  A* logp = static_cast<A*>(logp_v);
  A* ent = static_cast<A*>(ent_v);
  A* lse = static_cast<A*>(lse_v);
  const RowLayout lay{dims[1], dims[2], strides[0], strides[1], strides[2]};
  const int64_t N = dims[0] * dims[1] * dims[2];
  with_logit_scale(static_cast<A>(inv_temp_d), [&](const auto sc) {
  parallel_rows(N, rows_grain(V), [&](int64_t b, int64_t e) {
    std::vector<A> buf(kLanes);
    for (int64_t row = b; row < e; ++row) {
      const T* x = logits + lay.offset(row);
      A M, logS, H, x_tok;
      const int64_t tok = tokens ? tokens[row] : -1;
      const bool ok = row_stats<T, A>(x, V, sc, buf.data(), M, logS, H, tok, x_tok);
      lse[2 * row] = M;
      lse[2 * row + 1] = logS;
      if (ent) ent[row] = H;
      if (tokens) {
        // out-of-range ids (host check disabled) read nothing and give NaN
        A lp = ok ? (x_tok - M) - logS : kNaN<A>;
        if (tok == ignore_index) lp = A(0);
        logp[row] = lp;
      }
    }
  });
  });
}

// The gradient sweep of token_logprobs (logprobs_bwd) and of the deferred fused loss
// (fused_loss_grad: coefficients times `upstream`, and rows whose coefficients are both 0 written
// as zeros without being read -- `zero_dead`).
template <typename T, typename A, bool HAS_DENT>
void bwd_impl(const void* logits_v, void* out_v, const int64_t* dims, const int64_t* strides,
              const int64_t* ostrides, int64_t V, const int64_t* tokens, const A* dlogp,
              const A* dent, const A* lse, const A* ent, double inv_temp_d, int64_t ignore_index,
              A upstream = A(1), bool zero_dead = false) {
  const T* logits = static_cast<const T*>(logits_v);
  T* out = static_cast<T*>(out_v);
  const RowLayout lay{dims[1], dims[2], strides[0], strides[1], strides[2]};
  const RowLayout olay{dims[1], dims[2], ostrides[0], ostrides[1], ostrides[2]};
  const int64_t N = dims[0] * dims[1] * dims[2];
  // a separate gradient buffer larger than the last-level cache goes out with streaming stores
  const bool stream = out_v != logits_v && stream_stores(N * V * static_cast<int64_t>(sizeof(T)));
  with_logit_scale(static_cast<A>(inv_temp_d), [&](const auto sc) {
  parallel_rows(N, rows_grain(V), [&](int64_t b, int64_t e) {
    std::vector<A> buf(kLanes);
    for (int64_t row = b; row < e; ++row) {
      int64_t tok = -1;
      A g_lp = A(0);
      if (tokens) {
        tok = tokens[row];
        g_lp = (tok == ignore_index || dlogp == nullptr) ? A(0) : dlogp[row];
      }
      const A g_h = HAS_DENT ? dent[row] : A(0);
      if (zero_dead && g_lp == A(0) && g_h == A(0)) {
        zero_row(out + olay.offset(row), V);
        continue;
      }
      grad_row<T, A, HAS_DENT>(logits + lay.offset(row), out + olay.offset(row), V, sc,
                               lse[2 * row], lse[2 * row + 1], HAS_DENT ? ent[row] : A(0),
                               g_lp * upstream, g_h * upstream, tok, buf.data(), stream);
    }
  });
  });
}

}  // namespace
void logprobs_fwd(const void* logits, ScalarType dt, const int64_t* dims, const int64_t* strides,
                  int64_t V, const int64_t* tokens, double inv_temp, int64_t ignore_index,
                  void* logp, void* ent, void* lse) {
  dispatch_logits(dt, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    fwd_impl<T, A>(logits, dims, strides, V, tokens, inv_temp, ignore_index, logp, ent, lse);
  });
}

namespace {
// bwd_impl for the logits dtype and for whether an entropy coefficient is given (dent / g_h).
void bwd_dispatch(const void* logits, void* out, ScalarType dt, const int64_t* dims,
                  const int64_t* strides, const int64_t* ostrides, int64_t V,
                  const int64_t* tokens, const void* dlogp, const void* dent, const void* lse,
                  const void* ent, double inv_temp, int64_t ignore_index, double upstream,
                  bool zero_dead) {
  dispatch_logits(dt, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const A* dl = static_cast<const A*>(dlogp);
    const A* dh = static_cast<const A*>(dent);
    const A* ls = static_cast<const A*>(lse);
    const A* en = static_cast<const A*>(ent);
    const A u = static_cast<A>(upstream);
    if (dh)
      bwd_impl<T, A, true>(logits, out, dims, strides, ostrides, V, tokens, dl, dh, ls, en,
                           inv_temp, ignore_index, u, zero_dead);
    else
      bwd_impl<T, A, false>(logits, out, dims, strides, ostrides, V, tokens, dl, dh, ls, en,
                            inv_temp, ignore_index, u, zero_dead);
  });
}
}  // namespace

void logprobs_bwd(const void* logits, void* out, ScalarType dt, const int64_t* dims,
                  const int64_t* strides, const int64_t* ostrides, int64_t V,
                  const int64_t* tokens, const void* dlogp, const void* dent, const void* lse,
                  const void* ent, double inv_temp, int64_t ignore_index) {
  bwd_dispatch(logits, out, dt, dims, strides, ostrides, V, tokens, dlogp, dent, lse, ent,
               inv_temp, ignore_index, 1.0, false);
}

void fused_loss_grad(const void* logits, void* out, ScalarType dt, const int64_t* dims,
                     const int64_t* strides, const int64_t* ostrides, int64_t V,
                     const int64_t* tokens, const void* g_lp, const void* g_h, const void* lse,
                     const void* ent, double upstream, double inv_temp, int64_t ignore_index) {
  bwd_dispatch(logits, out, dt, dims, strides, ostrides, V, tokens, g_lp, g_h, lse, ent,
               inv_temp, ignore_index, upstream, true);
}

}  // namespace native
}  // namespace fastrlhf

// Entry points of the native CPU backend, called by bindings.cpp (which unpacks the tensors).
// Raw pointers and dtypes only, so the kernel translation units stay free of torch/extension.h.
#pragma once

#include "common.h"

namespace fastrlhf {
namespace native {

// ---- token log-probs / entropy (logprobs.cpp) -------------------------------------------------
// logits rows: dims[3] x strides[3] (elements), unit stride over V.  tokens: contiguous int64 [N]
// or null.  Outputs (accumulation dtype, contiguous): logp [N] (null without tokens), ent [N]
// (may be null), lse [N, 2] = (row max, log sum exp(x - max)).
void logprobs_fwd(const void* logits, ScalarType dt, const int64_t* dims, const int64_t* strides,
                  int64_t V, const int64_t* tokens, double inv_temp, int64_t ignore_index,
                  void* logp, void* ent, void* lse);
// dlogits into `out` (logits' dtype, rows at ostrides; may alias logits).  dlogp / dent / ent:
// accumulation dtype [N] or null.
void logprobs_bwd(const void* logits, void* out, ScalarType dt, const int64_t* dims,
                  const int64_t* strides, const int64_t* ostrides, int64_t V,
                  const int64_t* tokens, const void* dlogp, const void* dent, const void* lse,
                  const void* ent, double inv_temp, int64_t ignore_index);

// ---- GAE (gae.cpp) ----------------------------------------------------------------------------
// rewards / values / mask: [B, T] views of any dtype and strides.  cu: contiguous int64 [S+1] or
// null (then B rows; else the single packed row split into S segments).  adv / ret: contiguous
// [B, T] of the compute dtype (f64 ? double : float).
void gae(const Mat& rewards, const Mat& values, const Mat& mask, int64_t B, int64_t T,
         const int64_t* cu, int64_t n_seg, double gamma, double lam, bool f64, void* adv,
         void* ret);

// ---- PPO losses (losses.cpp) ------------------------------------------------------------------
enum AggMode : int { kTokenMean = 0, kTokenSum = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenMean = 3,
                     kSeqMeanTokenSumNorm = 4 };

struct AggArgs {
  int mode = kTokenMean;
  double dp_size = 1.0;
  bool has_denom = false;  // batch_num_tokens (token-mean) / global_batch_size (seq-*) given
  double denom = 0.0;
  double loss_scale_factor = 1.0;
};

struct PolicyArgs {
  double lo = 0.8, hi = 1.2;  // ratio clip bounds 1 - clip_low, 1 + clip_high
  bool has_dual = false;
  double dual = 3.0;
  bool seq = false;  // GSPO sequence-level ratio
};

// Outputs (compute dtype): loss [], stats [3] (clipfrac, clipfrac_lower, approx_kl), coef [B],
// seq_log_ratio [B].  advantages: [B, T] or [B] (pass s1 = 0).
void policy_fwd(const Mat& logp, const Mat& old_logp, const Mat& adv, const Mat& mask, int64_t B,
                int64_t T, const PolicyArgs& pa, const AggArgs& agg, bool f64, void* loss,
                void* stats, void* coef, void* seqlr);
// d loss / d logp = g * coef_b * m * dL/dlogp into `out`, contiguous [B, T] of out_dt.
void policy_bwd(double g, const Mat& logp, const Mat& old_logp, const Mat& adv, const Mat& mask,
                int64_t B, int64_t T, const PolicyArgs& pa, bool f64, const void* coef,
                const void* seqlr, void* out, ScalarType out_dt);
// Outputs: loss [], stats [1] (clipfrac), coef [B]; the loss includes verl's factor 0.5.
void value_fwd(const Mat& values, const Mat& old_values, const Mat& returns, const Mat& mask,
               int64_t B, int64_t T, bool has_clip, double clip, const AggArgs& agg, bool f64,
               void* loss, void* stats, void* coef);
void value_bwd(double g, const Mat& values, const Mat& old_values, const Mat& returns,
               const Mat& mask, int64_t B, int64_t T, bool has_clip, double clip, bool f64,
               const void* coef, void* out, ScalarType out_dt);

// ---- fused PPO loss from the logits (fused_loss.cpp) ----------------------------------------
struct FusedArgs {
  double inv_temp = 1.0;
  int64_t ignore_index = -100;
  PolicyArgs pol;           // clip bounds, dual clip, GSPO
  bool adv_row = false;     // advantages are [B] (one per sequence)
  bool has_ref = false;     // ref_logp given (KL term)
  double kl_coef = 0.0;
  int kl_val = 3, kl_grad = 3;  // KL estimator codes for the value and the gradient (kl.py)
  double ent_coef = 0.0;
  bool write_grad = false;
  // grad_timing="backward": no gradient now; aux gets 4 more rows, the inputs of a later
  // fused_loss_grad sweep: 7 g_lp, 8 g_h (d loss / d logp, d loss / d H; 0 for tokens that do
  // not count), 9 M, 10 log S (the row statistics).
  bool defer = false;
};
// Rows of the fused loss's per-token output aux [rows, N] (written in fused_row.h): the layout
// of fastrlhf.tables.FUSED_AUX_ROWS, whose names the extension reports (fused_aux_rows) and
// fastrlhf/native.py checks when it loads the build.  kFusedAuxRows without FusedArgs::defer,
// kFusedAuxRowsDeferred with it.
enum FusedAux : int {
  kAuxLoss, kAuxLogp, kAuxEntropy, kAuxKl, kAuxClipped, kAuxClippedLower, kAuxApproxKl,
  kAuxGradLogp, kAuxGradEntropy, kAuxRowMax, kAuxRowLogSum, kFusedAuxRowsDeferred
};
constexpr int kFusedAuxRows = kAuxApproxKl + 1;
constexpr const char* kFusedAuxNames[kFusedAuxRowsDeferred] = {
    "loss", "logp", "entropy", "kl", "clipped", "clipped_lower", "approx_kl",
    "g_lp", "g_h", "M", "logS"};

// logits rows as logprobs_fwd ([B, T] tokens = dims), gradient rows into dlogits at ostrides (may
// alias logits; ignored unless write_grad).  Per-token inputs: contiguous [N] of the accumulation
// dtype (old, adv ([B] if adv_row), ref or null, mask as weights), coef [B] the aggregation
// weights.  Outputs: aux [7, N] (loss, logp, entropy, kl, clipped, clipped_lower, approx_kl),
// loss [], stats [5] (clipfrac, clipfrac_lower, approx_kl, entropy_mean, kl_mean).
void fused_loss_fwd(const void* logits, void* dlogits, ScalarType dt, const int64_t* dims,
                    const int64_t* strides, const int64_t* ostrides, int64_t V, int64_t B,
                    int64_t T, const int64_t* tokens, const void* old_logp, const void* adv,
                    const void* ref_logp, const void* mask, const void* coef,
                    const FusedArgs& fa, void* aux, void* loss, void* stats);
// The deferred fused-loss gradient (grad_timing="backward"): one sweep writing
// upstream * (g_lp (onehot - p) - g_h p (log p + H)) * inv_temp per row from the saved
// statistics (lse [N, 2] = M, log S; ent [N]); g_lp is taken as 0 where the token is
// ignore_index, and a row whose g_lp and g_h are both 0 is written as zeros without being read
// (masked tokens; NaN there stays out).  g_h / ent null: no entropy term.  out may alias logits.
void fused_loss_grad(const void* logits, void* out, ScalarType dt, const int64_t* dims,
                     const int64_t* strides, const int64_t* ostrides, int64_t V,
                     const int64_t* tokens, const void* g_lp, const void* g_h, const void* lse,
                     const void* ent, double upstream, double inv_temp, int64_t ignore_index);
// Sequences per group of the GSPO passes (fused_loss_fwd): as many sequences of seq_bytes
// logits as fit three quarters of every thread's L2 cache, at least 1; B when one does not fit.
int64_t gspo_seq_group(int64_t seq_bytes, int64_t B);
// x *= factor in place over the rows (dims / strides as above, unit stride over V), computed in
// the accumulation dtype and rounded once to x's dtype: the fused loss's stored gradient scaled
// by the upstream gradient in the backward.
void scale_rows(void* x, ScalarType dt, const int64_t* dims, const int64_t* strides, int64_t V,
                double factor);

}  // namespace native
}  // namespace fastrlhf

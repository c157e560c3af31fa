// Python bindings of the native CPU backend (torch.utils.cpp_extension + pybind11).
//
// fastrlhf/native.py allocates every output with torch.empty (so the test suite's NaN poisoning
// sees them) and calls these functions, which only check what would otherwise be a memory error
// (device, dtype, size and layout of the buffers) -- argument validation with user-facing
// messages happens in fastrlhf.ops before we get here.  The GIL is released while they run.
// Not <torch/extension.h>: that pulls in the whole C++ frontend (torch/all.h: nn, optim, data)
// and parsing it was most of the build (about 55 of 78 s of CPU for this file, the longest
// step of the ~2 minute first build).  This file needs only Tensor, at::parallel and pybind11
// with torch's type casters.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include "fused_linear.h"
#include "native.h"

namespace fn = fastrlhf::native;
using at::Tensor;
using c10::optional;

namespace {

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastrlhf native: ", name, " must be a CPU tensor");
}

void check_out(const Tensor& t, const char* name, at::ScalarType dt, int64_t numel) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == dt, "fastrlhf native: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, "fastrlhf native: ", name,
              " must be contiguous with ", numel, " elements");
}

const void* ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

at::ScalarType acc_of(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// Element offsets reachable from a strided row layout: [min, max] relative to data_ptr.
void check_rows_in_bounds(const Tensor& t, const std::vector<int64_t>& dims,
                          const std::vector<int64_t>& strides, int64_t V, const char* name) {
  TORCH_CHECK(dims.size() == 3 && strides.size() == 3, "fastrlhf native: ", name,
              " layout must have 3 dims");
  int64_t lo = 0, hi = 0;
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(dims[k] >= 0, "fastrlhf native: negative dim");
    if (dims[k] == 0) return;
    const int64_t span = (dims[k] - 1) * strides[k];
    if (span < 0) lo += span; else hi += span;
  }
  hi += V - 1;
  const int64_t base = t.storage_offset();
  const int64_t nbytes = static_cast<int64_t>(t.storage().nbytes());
  const int64_t esz = static_cast<int64_t>(t.element_size());
  TORCH_CHECK(base + lo >= 0 && (base + hi + 1) * esz <= nbytes, "fastrlhf native: ", name,
              " layout reaches outside its storage");
}

fn::Mat mat(const Tensor& t, const char* name, int64_t B, int64_t T) {
  check_cpu(t, name);
  fn::Mat m;
  m.ptr = t.data_ptr();
  m.dtype = t.scalar_type();
  if (t.dim() == 2) {
    TORCH_CHECK(t.size(0) == B && t.size(1) == T, "fastrlhf native: ", name, " must be [", B,
                ", ", T, "]");
    m.s0 = t.stride(0);
    m.s1 = t.stride(1);
  } else {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "fastrlhf native: ", name, " must be [", B,
                "] or [", B, ", ", T, "]");
    m.s0 = t.stride(0);
    m.s1 = 0;
  }
  return m;
}

fn::AggArgs agg_args(int64_t mode, double dp, optional<double> denom, double lsf) {
  TORCH_CHECK(mode >= 0 && mode <= 4, "fastrlhf native: bad aggregation mode id ", mode);
  fn::AggArgs a;
  a.mode = static_cast<int>(mode);
  a.dp_size = dp;
  a.has_denom = denom.has_value();
  a.denom = denom.value_or(0.0);
  a.loss_scale_factor = lsf;
  return a;
}

fn::PolicyArgs policy_args(double lo, double hi, optional<double> dual, bool seq) {
  fn::PolicyArgs p;
  p.lo = lo;
  p.hi = hi;
  p.has_dual = dual.has_value();
  p.dual = dual.value_or(0.0);
  p.seq = seq;
  return p;
}

// ---- token log-probs ------------------------------------------------------------------------

void logprobs_fwd(const Tensor& logits, std::vector<int64_t> dims, std::vector<int64_t> strides,
                  int64_t V, const optional<Tensor>& tokens, double inv_temp,
                  int64_t ignore_index, const optional<Tensor>& logp,
                  const optional<Tensor>& ent, const Tensor& lse) {
  check_cpu(logits, "logits");
  check_rows_in_bounds(logits, dims, strides, V, "logits");
  const int64_t N = dims[0] * dims[1] * dims[2];
  const auto acc = acc_of(logits.scalar_type());
  check_out(lse, "lse", acc, 2 * N);
  const int64_t* tok = nullptr;
  if (tokens.has_value()) {
    check_out(*tokens, "tokens", at::kLong, N);
    tok = tokens->data_ptr<int64_t>();
    TORCH_CHECK(logp.has_value(), "fastrlhf native: logp output missing");
    check_out(*logp, "logp", acc, N);
  }
  if (ent.has_value()) check_out(*ent, "ent", acc, N);
  if (N == 0) return;
  fn::logprobs_fwd(logits.data_ptr(), logits.scalar_type(), dims.data(), strides.data(), V, tok,
                   inv_temp, ignore_index, tok ? logp->data_ptr() : nullptr,
                   const_cast<void*>(ptr_or_null(ent)), lse.data_ptr());
}

// Flattened int64 ids, and the flat position of the first one outside [0, V) that is not
// ignore_index (-1 if none, or when not `check`).
std::pair<Tensor, int64_t> checked_ids(const Tensor& tokens, int64_t V, int64_t ignore_index,
                                       bool check) {
  check_cpu(tokens, "tokens");
  TORCH_CHECK(at::isIntegralType(tokens.scalar_type(), /*includeBool=*/false),
              "fastrlhf native: tokens must be integers");
  Tensor tok = tokens.reshape({-1}).to(at::kLong).contiguous();
  if (check) {
    const int64_t* p = tok.data_ptr<int64_t>();
    for (int64_t i = 0, n = tok.numel(); i < n; ++i) {
      if ((p[i] < 0 || p[i] >= V) && p[i] != ignore_index) return {tok, i};
    }
  }
  return {tok, -1};
}

// logprobs_fwd from the op's own token tensor (any integer dtype and shape with N elements),
// the ids flattened and, when `check_tokens`, checked here: returns the flat position of the
// first bad id (nothing computed) or -1.  Saves the Python side its per-call tensor ops.
int64_t logprobs_call(const Tensor& logits, std::vector<int64_t> dims,
                      std::vector<int64_t> strides, int64_t V, const Tensor& tokens,
                      double inv_temp, int64_t ignore_index, bool check_tokens,
                      const Tensor& logp, const Tensor& ent, const Tensor& lse) {
  auto [tok, bad] = checked_ids(tokens, V, ignore_index, check_tokens);
  if (bad >= 0) return bad;
  logprobs_fwd(logits, std::move(dims), std::move(strides), V, tok, inv_temp, ignore_index, logp,
               ent, lse);
  return -1;
}

// The checks shared by the two gradient sweeps (logprobs_bwd, fused_loss_grad): logits and out
// on the CPU, of one dtype, their rows in bounds, and lse [N, 2].  Returns N.
int64_t check_grad_rows(const Tensor& logits, const Tensor& out, const std::vector<int64_t>& dims,
                        const std::vector<int64_t>& strides,
                        const std::vector<int64_t>& ostrides, int64_t V, const Tensor& lse) {
  check_cpu(logits, "logits");
  check_cpu(out, "out");
  TORCH_CHECK(out.scalar_type() == logits.scalar_type(), "fastrlhf native: out dtype");
  check_rows_in_bounds(logits, dims, strides, V, "logits");
  check_rows_in_bounds(out, dims, ostrides, V, "out");
  const int64_t N = dims[0] * dims[1] * dims[2];
  check_out(lse, "lse", acc_of(logits.scalar_type()), 2 * N);
  return N;
}

void logprobs_bwd(const Tensor& logits, const Tensor& out, std::vector<int64_t> dims,
                  std::vector<int64_t> strides, std::vector<int64_t> ostrides, int64_t V,
                  const optional<Tensor>& tokens, const optional<Tensor>& dlogp,
                  const optional<Tensor>& dent, const Tensor& lse, const optional<Tensor>& ent,
                  double inv_temp, int64_t ignore_index) {
  const int64_t N = check_grad_rows(logits, out, dims, strides, ostrides, V, lse);
  const auto acc = acc_of(logits.scalar_type());
  const int64_t* tok = nullptr;
  if (tokens.has_value()) {
    check_out(*tokens, "tokens", at::kLong, N);
    tok = tokens->data_ptr<int64_t>();
  }
  if (dlogp.has_value()) check_out(*dlogp, "dlogp", acc, N);
  if (dent.has_value()) {
    check_out(*dent, "dent", acc, N);
    TORCH_CHECK(ent.has_value(), "fastrlhf native: entropy needed with dent");
    check_out(*ent, "ent", acc, N);
  }
  if (N == 0) return;
  fn::logprobs_bwd(logits.data_ptr(), out.data_ptr(), logits.scalar_type(), dims.data(),
                   strides.data(), ostrides.data(), V, tok, ptr_or_null(dlogp),
                   ptr_or_null(dent), lse.data_ptr(), ptr_or_null(ent), inv_temp, ignore_index);
}

// ---- GAE --------------------------------------------------------------------------------------

void gae(const Tensor& rewards, const Tensor& values, const Tensor& mask,
         const optional<Tensor>& cu_seqlens, double gamma, double lam, const Tensor& adv,
         const Tensor& ret) {
  TORCH_CHECK(rewards.dim() == 2, "fastrlhf native gae: rewards must be 2-D");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto acc = adv.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "fastrlhf native gae: compute dtype");
  check_out(adv, "advantages", acc, B * T);
  check_out(ret, "returns", acc, B * T);
  const fn::Mat r = mat(rewards, "rewards", B, T), v = mat(values, "values", B, T),
                m = mat(mask, "mask", B, T);
  const int64_t* cu = nullptr;
  int64_t n_seg = 0;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(B == 1, "fastrlhf native gae: packed inputs must be [1, total]");
    check_out(*cu_seqlens, "cu_seqlens", at::kLong, cu_seqlens->numel());
    cu = cu_seqlens->data_ptr<int64_t>();
    n_seg = cu_seqlens->numel() - 1;
    TORCH_CHECK(n_seg >= 0 && cu[0] == 0 && cu[n_seg] == T, "fastrlhf native gae: cu_seqlens");
    for (int64_t s = 0; s < n_seg; ++s)
      TORCH_CHECK(cu[s + 1] >= cu[s], "fastrlhf native gae: cu_seqlens must be nondecreasing");
  }
  if (B * T == 0) return;
  fn::gae(r, v, m, B, T, cu, n_seg, gamma, lam, acc == at::kDouble, adv.data_ptr(),
          ret.data_ptr());
}

// ---- losses -----------------------------------------------------------------------------------

void policy_fwd(const Tensor& logp, const Tensor& old_logp, const Tensor& adv,
                const Tensor& mask, double lo, double hi, optional<double> dual, bool seq,
                int64_t mode, double dp, optional<double> denom, double lsf, const Tensor& loss,
                const Tensor& stats, const Tensor& coef, const Tensor& seqlr) {
  TORCH_CHECK(logp.dim() == 2, "fastrlhf native: logp must be 2-D");
  const int64_t B = logp.size(0), T = logp.size(1);
  const auto acc = loss.scalar_type();
  check_out(loss, "loss", acc, 1);
  check_out(stats, "stats", acc, 3);
  check_out(coef, "coef", acc, B);
  check_out(seqlr, "seq_log_ratio", acc, B);
  fn::policy_fwd(mat(logp, "logp", B, T), mat(old_logp, "old_logp", B, T),
                 mat(adv, "advantages", B, T), mat(mask, "mask", B, T), B, T,
                 policy_args(lo, hi, dual, seq), agg_args(mode, dp, denom, lsf),
                 acc == at::kDouble, loss.data_ptr(), stats.data_ptr(), coef.data_ptr(),
                 seqlr.data_ptr());
}

void policy_bwd(double g, const Tensor& logp, const Tensor& old_logp, const Tensor& adv,
                const Tensor& mask, double lo, double hi, optional<double> dual, bool seq,
                const Tensor& coef, const Tensor& seqlr, const Tensor& out) {
  const int64_t B = logp.size(0), T = logp.size(1);
  const auto acc = coef.scalar_type();
  check_out(coef, "coef", acc, B);
  check_out(seqlr, "seq_log_ratio", acc, B);
  check_out(out, "dlogp", logp.scalar_type(), B * T);
  if (B * T == 0) return;
  fn::policy_bwd(g, mat(logp, "logp", B, T), mat(old_logp, "old_logp", B, T),
                 mat(adv, "advantages", B, T), mat(mask, "mask", B, T), B, T,
                 policy_args(lo, hi, dual, seq), acc == at::kDouble, coef.data_ptr(),
                 seqlr.data_ptr(), out.data_ptr(), out.scalar_type());
}

void value_fwd(const Tensor& values, const Tensor& old_values, const Tensor& returns,
               const Tensor& mask, optional<double> clip, int64_t mode, double dp,
               optional<double> denom, double lsf, const Tensor& loss, const Tensor& stats,
               const Tensor& coef) {
  TORCH_CHECK(values.dim() == 2, "fastrlhf native: values must be 2-D");
  const int64_t B = values.size(0), T = values.size(1);
  const auto acc = loss.scalar_type();
  check_out(loss, "loss", acc, 1);
  check_out(stats, "stats", acc, 1);
  check_out(coef, "coef", acc, B);
  fn::value_fwd(mat(values, "values", B, T), mat(old_values, "old_values", B, T),
                mat(returns, "returns", B, T), mat(mask, "mask", B, T), B, T, clip.has_value(),
                clip.value_or(0.0), agg_args(mode, dp, denom, lsf), acc == at::kDouble,
                loss.data_ptr(), stats.data_ptr(), coef.data_ptr());
}

void value_bwd(double g, const Tensor& values, const Tensor& old_values, const Tensor& returns,
               const Tensor& mask, optional<double> clip, const Tensor& coef, const Tensor& out) {
  const int64_t B = values.size(0), T = values.size(1);
  const auto acc = coef.scalar_type();
  check_out(coef, "coef", acc, B);
  check_out(out, "dvalues", values.scalar_type(), B * T);
  if (B * T == 0) return;
  fn::value_bwd(g, mat(values, "values", B, T), mat(old_values, "old_values", B, T),
                mat(returns, "returns", B, T), mat(mask, "mask", B, T), B, T, clip.has_value(),
                clip.value_or(0.0), acc == at::kDouble, coef.data_ptr(), out.data_ptr(),
                out.scalar_type());
}

// ---- fused PPO loss ---------------------------------------------------------------------------

// Checks the per-token inputs / outputs shared by the two fused-loss entries (N = B T rows) and
// gathers the scalars.
fn::FusedArgs fused_args(int64_t N, int64_t B, at::ScalarType acc, const Tensor& tokens,
                         const Tensor& old_logp, const Tensor& adv,
                         const optional<Tensor>& ref_logp, const Tensor& mask, const Tensor& coef,
                         double inv_temp, int64_t ignore_index, double lo, double hi,
                         optional<double> dual, bool seq, double kl_coef, int64_t kl_val,
                         int64_t kl_grad, double ent_coef, bool write_grad, const Tensor& aux,
                         const Tensor& loss, const Tensor& stats, bool defer = false) {
  check_out(tokens, "tokens", at::kLong, N);
  check_out(old_logp, "old_logp", acc, N);
  const bool adv_row = adv.numel() == B && N != B;
  check_out(adv, "advantages", acc, adv_row ? B : N);
  if (ref_logp.has_value()) check_out(*ref_logp, "ref_logp", acc, N);
  check_out(mask, "mask", acc, N);
  check_out(coef, "coef", acc, B);
  TORCH_CHECK(!(defer && write_grad), "fastrlhf native: a deferred gradient is not written now");
  check_out(aux, "aux", acc, (defer ? fn::kFusedAuxRowsDeferred : fn::kFusedAuxRows) * N);
  check_out(loss, "loss", acc, 1);
  check_out(stats, "stats", acc, 5);
  TORCH_CHECK(kl_val >= 0 && kl_val <= 3 && kl_grad >= 0 && kl_grad <= 3,
              "fastrlhf native: bad KL kind code");
  fn::FusedArgs fa;
  fa.inv_temp = inv_temp;
  fa.ignore_index = ignore_index;
  fa.pol = policy_args(lo, hi, dual, seq);
  fa.adv_row = adv_row;
  fa.has_ref = ref_logp.has_value();
  fa.kl_coef = kl_coef;
  fa.kl_val = static_cast<int>(kl_val);
  fa.kl_grad = static_cast<int>(kl_grad);
  fa.ent_coef = ent_coef;
  fa.write_grad = write_grad;
  fa.defer = defer;
  return fa;
}

// The checked call into fn::fused_loss_fwd (buffers as fastrlhf.native allocates them); Python
// reaches it through fused_loss_call below.
void fused_loss_fwd(const Tensor& logits, const optional<Tensor>& dlogits,
                    std::vector<int64_t> dims, std::vector<int64_t> strides,
                    std::vector<int64_t> ostrides, int64_t V, int64_t B, int64_t T,
                    const Tensor& tokens, const Tensor& old_logp, const Tensor& adv,
                    const optional<Tensor>& ref_logp, const Tensor& mask, const Tensor& coef,
                    double inv_temp, int64_t ignore_index, double lo, double hi,
                    optional<double> dual, bool seq, double kl_coef, int64_t kl_val,
                    int64_t kl_grad, double ent_coef, bool write_grad, const Tensor& aux,
                    const Tensor& loss, const Tensor& stats, bool defer) {
  check_cpu(logits, "logits");
  check_rows_in_bounds(logits, dims, strides, V, "logits");
  const int64_t N = dims[0] * dims[1] * dims[2];
  TORCH_CHECK(N == B * T, "fastrlhf native: fused_ppo_loss: rows != B * T");
  const fn::FusedArgs fa = fused_args(
      N, B, acc_of(logits.scalar_type()), tokens, old_logp, adv, ref_logp, mask, coef, inv_temp,
      ignore_index, lo, hi, dual, seq, kl_coef, kl_val, kl_grad, ent_coef, write_grad, aux, loss,
      stats, defer);
  void* dl = nullptr;
  if (write_grad) {
    TORCH_CHECK(dlogits.has_value(), "fastrlhf native: gradient buffer missing");
    check_cpu(*dlogits, "dlogits");
    TORCH_CHECK(dlogits->scalar_type() == logits.scalar_type(), "fastrlhf native: dlogits dtype");
    check_rows_in_bounds(*dlogits, dims, ostrides, V, "dlogits");
    dl = dlogits->data_ptr();
  }
  fn::fused_loss_fwd(logits.data_ptr(), dl, logits.scalar_type(), dims.data(), strides.data(),
                     ostrides.data(), V, B, T, tokens.data_ptr<int64_t>(), old_logp.data_ptr(),
                     adv.data_ptr(), ptr_or_null(ref_logp), mask.data_ptr(), coef.data_ptr(), fa,
                     aux.data_ptr(), loss.data_ptr(), stats.data_ptr());
}

// The native fused-loss forward from the op's own per-token inputs, so that the Python side runs
// no per-call tensor ops of its own: they are flattened and converted to the accumulation dtype
// here (each a no-op when it already is), and the token ids checked (when `check_tokens`: the
// flat position of the first id outside [0, V) that is not ignore_index is returned and nothing
// is computed; -1 when all are valid).  The outputs aux / loss / stats come from Python
// (torch.empty, which the test suite NaN-poisons).  Returns (per_token [3, B, T], bad).
std::tuple<Tensor, int64_t> fused_loss_call(
    const Tensor& logits, const optional<Tensor>& dlogits, std::vector<int64_t> dims,
    std::vector<int64_t> strides, std::vector<int64_t> ostrides, int64_t V, int64_t B, int64_t T,
    const Tensor& tokens, const Tensor& old_logp, const Tensor& adv,
    const optional<Tensor>& ref_logp, const Tensor& mask, const Tensor& coef, double inv_temp,
    int64_t ignore_index, double lo, double hi, optional<double> dual, bool seq, double kl_coef,
    int64_t kl_val, int64_t kl_grad, double ent_coef, bool write_grad, bool check_tokens,
    const Tensor& aux, const Tensor& loss, const Tensor& stats, bool defer) {
  check_cpu(logits, "logits");
  const auto acc = acc_of(logits.scalar_type());
  for (const Tensor* t : {&tokens, &old_logp, &adv, &mask, &coef}) check_cpu(*t, "input");
  if (ref_logp.has_value()) check_cpu(*ref_logp, "ref_logp");
  const auto [tok, bad] = checked_ids(tokens, V, ignore_index, check_tokens);
  if (bad >= 0) return {Tensor(), bad};
  auto flat = [&](const Tensor& t) { return t.reshape({-1}).to(acc).contiguous(); };
  optional<Tensor> ref;
  if (ref_logp.has_value()) ref = flat(*ref_logp);
  fused_loss_fwd(logits, dlogits, std::move(dims), std::move(strides), std::move(ostrides), V, B,
                 T, tok, flat(old_logp), flat(adv), ref, flat(mask), coef.to(acc).contiguous(),
                 inv_temp, ignore_index, lo, hi, dual, seq, kl_coef, kl_val, kl_grad, ent_coef,
                 write_grad, aux, loss, stats, defer);
  const int64_t rows = defer ? fn::kFusedAuxRowsDeferred : fn::kFusedAuxRows;
  static_assert(fn::kAuxEntropy == fn::kAuxLogp + 1 && fn::kAuxKl == fn::kAuxLogp + 2,
                "per_token is the rows logp, entropy, kl");
  return {aux.view({rows, B, T}).narrow(0, fn::kAuxLogp, 3).clone(), -1};
}

// The deferred fused-loss gradient (grad_timing="backward"; fn::fused_loss_grad): rows of
// `logits` as logprobs_bwd, the per-token coefficients g_lp / g_h [N] and statistics lse [N, 2]
// / ent [N] from fused_loss_call(defer=True), the upstream gradient a host scalar.
void fused_loss_grad(const Tensor& logits, const Tensor& out, std::vector<int64_t> dims,
                     std::vector<int64_t> strides, std::vector<int64_t> ostrides, int64_t V,
                     const Tensor& tokens, const Tensor& lse, const optional<Tensor>& ent,
                     const Tensor& g_lp, const optional<Tensor>& g_h, double upstream,
                     double inv_temp, int64_t ignore_index) {
  const int64_t N = check_grad_rows(logits, out, dims, strides, ostrides, V, lse);
  const auto acc = acc_of(logits.scalar_type());
  check_out(tokens, "tokens", at::kLong, N);
  check_out(g_lp, "g_lp", acc, N);
  TORCH_CHECK(g_h.has_value() == ent.has_value(), "fastrlhf native: g_h and ent come together");
  if (g_h.has_value()) {
    check_out(*g_h, "g_h", acc, N);
    check_out(*ent, "ent", acc, N);
  }
  if (N == 0 || V == 0) return;
  fn::fused_loss_grad(logits.data_ptr(), out.data_ptr(), logits.scalar_type(), dims.data(),
                      strides.data(), ostrides.data(), V, tokens.data_ptr<int64_t>(),
                      g_lp.data_ptr(), ptr_or_null(g_h), lse.data_ptr(), ptr_or_null(ent),
                      upstream, inv_temp, ignore_index);
}

// The fused loss's stored gradient times an upstream gradient other than 1, in place.
void scale_rows(const Tensor& x, std::vector<int64_t> dims, std::vector<int64_t> strides,
                int64_t V, double factor) {
  check_cpu(x, "x");
  check_rows_in_bounds(x, dims, strides, V, "x");
  if (V == 0 || dims[0] * dims[1] * dims[2] == 0 || factor == 1.0) return;
  fn::scale_rows(x.data_ptr(), x.scalar_type(), dims.data(), strides.data(), V, factor);
}

// ---- fused lm_head: token log-probs from hidden states -------------------------------------

void check_linear_inputs(const Tensor& hidden, const Tensor& weight,
                         const optional<Tensor>& bias, const Tensor& tokens) {
  check_cpu(hidden, "hidden");
  check_cpu(weight, "weight");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fastrlhf native: hidden [N, H] and weight [V, H] expected");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type() && at::isFloatingType(
                  hidden.scalar_type()), "fastrlhf native: hidden / weight dtype");
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    at::isFloatingType(bias->scalar_type()), "fastrlhf native: bias must be [V]");
  }
  check_out(tokens, "tokens", at::kLong, hidden.size(0));
}

// The gradient outputs of the fused lm_head: dh [N, H] / dw [V, H] / db [V] in the dtypes of
// hidden / weight / bias, each optional.
void check_linear_grads(const Tensor& hidden, const Tensor& weight, const optional<Tensor>& bias,
                        const optional<Tensor>& dh, const optional<Tensor>& dw,
                        const optional<Tensor>& db) {
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  if (dh.has_value()) check_out(*dh, "dhidden", hidden.scalar_type(), N * H);
  if (dw.has_value()) check_out(*dw, "dweight", weight.scalar_type(), V * H);
  if (db.has_value()) {
    TORCH_CHECK(bias.has_value(), "fastrlhf native: dbias without bias");
    check_out(*db, "dbias", bias->scalar_type(), V);
  }
}

void linear_logprobs_fwd(const Tensor& hidden, const Tensor& weight,
                         const optional<Tensor>& bias, const Tensor& tokens, double inv_temp,
                         int64_t ignore_index, int64_t chunk, const Tensor& logp,
                         const Tensor& ent, const Tensor& lse) {
  check_linear_inputs(hidden, weight, bias, tokens);
  const int64_t N = hidden.size(0);
  const auto acc = acc_of(hidden.scalar_type());
  check_out(logp, "logp", acc, N);
  check_out(ent, "ent", acc, N);
  check_out(lse, "lse", acc, 2 * N);
  fn::linear_logprobs_fwd(hidden, weight, bias, tokens, inv_temp, ignore_index, chunk, logp, ent,
                          lse);
}

void linear_logprobs_bwd(const Tensor& hidden, const Tensor& weight,
                         const optional<Tensor>& bias, const Tensor& tokens,
                         const optional<Tensor>& dlogp, const optional<Tensor>& dent,
                         const Tensor& lse, const optional<Tensor>& ent, double inv_temp,
                         int64_t ignore_index, int64_t chunk, const optional<Tensor>& dh,
                         const optional<Tensor>& dw, const optional<Tensor>& db) {
  check_linear_inputs(hidden, weight, bias, tokens);
  const int64_t N = hidden.size(0);
  const auto acc = acc_of(hidden.scalar_type());
  check_out(lse, "lse", acc, 2 * N);
  if (dlogp.has_value()) check_out(*dlogp, "dlogp", acc, N);
  if (dent.has_value()) {
    check_out(*dent, "dent", acc, N);
    TORCH_CHECK(ent.has_value(), "fastrlhf native: entropy needed with dent");
    check_out(*ent, "ent", acc, N);
  }
  check_linear_grads(hidden, weight, bias, dh, dw, db);
  fn::linear_logprobs_bwd(hidden, weight, bias, tokens, dlogp, dent, lse,
                          ent.has_value() ? *ent : Tensor(), inv_temp, ignore_index, chunk, dh,
                          dw, db);
}

void fused_linear_loss_fwd(const Tensor& hidden, const Tensor& weight,
                           const optional<Tensor>& bias, const Tensor& tokens, int64_t B,
                           int64_t T, const Tensor& old_logp, const Tensor& adv,
                           const optional<Tensor>& ref_logp, const Tensor& mask,
                           const Tensor& coef, double inv_temp, int64_t ignore_index, double lo,
                           double hi, optional<double> dual, double kl_coef, int64_t kl_val,
                           int64_t kl_grad, double ent_coef, bool write_grad, int64_t block_rows,
                           const Tensor& aux, const Tensor& loss, const Tensor& stats,
                           const optional<Tensor>& dh, const optional<Tensor>& dw,
                           const optional<Tensor>& db) {
  check_linear_inputs(hidden, weight, bias, tokens);
  const int64_t N = hidden.size(0);
  TORCH_CHECK(N == B * T, "fastrlhf native: fused_linear_ppo_loss: rows != B * T");
  const fn::FusedArgs fa = fused_args(
      N, B, acc_of(hidden.scalar_type()), tokens, old_logp, adv, ref_logp, mask, coef, inv_temp,
      ignore_index, lo, hi, dual, false, kl_coef, kl_val, kl_grad, ent_coef, write_grad, aux,
      loss, stats);
  check_linear_grads(hidden, weight, bias, dh, dw, db);
  fn::fused_linear_loss_fwd(hidden, weight, bias, tokens, T, old_logp, adv, ref_logp, mask, coef,
                            fa, block_rows, aux, loss, stats, dh, dw, db);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrlhf native CPU backend (C++ / OpenMP)";
  using rel = py::call_guard<py::gil_scoped_release>;
  m.def("logprobs_fwd", &logprobs_fwd, rel());
  m.def("logprobs_bwd", &logprobs_bwd, rel());
  m.def("gae", &gae, rel());
  m.def("policy_fwd", &policy_fwd, rel());
  m.def("policy_bwd", &policy_bwd, rel());
  m.def("value_fwd", &value_fwd, rel());
  m.def("value_bwd", &value_bwd, rel());
  m.def("fused_loss_call", &fused_loss_call, rel());
  m.def("scale_rows", &scale_rows, rel());
  m.def("fused_loss_grad", &fused_loss_grad, rel());
  m.def("logprobs_call", &logprobs_call, rel());
  m.def("linear_logprobs_fwd", &linear_logprobs_fwd, rel());
  m.def("linear_logprobs_bwd", &linear_logprobs_bwd, rel());
  m.def("fused_linear_loss_fwd", &fused_linear_loss_fwd, rel());
  m.def("num_threads", []() { return at::get_num_threads(); });
  m.def("fused_aux_rows", []() {
    return std::vector<std::string>(fn::kFusedAuxNames,
                                    fn::kFusedAuxNames + fn::kFusedAuxRowsDeferred);
  });
  m.def("gspo_seq_group", &fn::gspo_seq_group);
  m.def("stream_stores", &fn::stream_stores);
}

// Entry points of the native fused lm_head (fused_linear.cpp), called by bindings.cpp.
//
// Unlike the other kernels (native.h: raw pointers only), these take ATen tensors: the logits
// tiles are formed with ATen's matmul (MKL / oneDNN / OpenBLAS, whatever torch links), so this
// translation unit includes <ATen/ATen.h> -- but still not torch/extension.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "native.h"

namespace fastrlhf {
namespace native {

// hidden: [N, H] rows (any float dtype and strides); weight: [V, H] (same dtype, unit stride
// on H); bias: [V] or undefined (any float dtype); tokens: contiguous int64 [N].
// Outputs (accumulation dtype, contiguous): logp [N], ent [N], lse [N, 2] = (row max, log S).
// chunk: vocab columns per step (<= 0: the default).
void linear_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                         double inv_temp, int64_t ignore_index, int64_t chunk,
                         const at::Tensor& logp, const at::Tensor& ent, const at::Tensor& lse);

// Upstream gradients dlogp / dent: accumulation dtype [N] or undefined (not both undefined).
// Outputs, written completely when defined: dh [N, H] (hidden's dtype, contiguous), dw [V, H]
// (weight's dtype, contiguous), db [V] (bias's dtype).
void linear_logprobs_bwd(const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                         const c10::optional<at::Tensor>& dlogp,
                         const c10::optional<at::Tensor>& dent, const at::Tensor& lse,
                         const at::Tensor& ent, double inv_temp, int64_t ignore_index,
                         int64_t chunk, const c10::optional<at::Tensor>& dh,
                         const c10::optional<at::Tensor>& dw,
                         const c10::optional<at::Tensor>& db);

// fused_linear_ppo_loss (token-level ratio) with its gradients produced in the forward: the
// fused loss of fused_loss_fwd (native.h; same per-token inputs, T tokens per sequence, N = B T
// rows of hidden; fa.pol.seq must be false) of the logits hidden @ weight.T + bias, formed in
// row blocks of block_rows (<= 0: the default) whose [R, V] logits are held at once.  Outputs:
// aux [7, N], loss [], stats [5]; with fa.write_grad the gradients of the loss (upstream 1) in
// dh [N, H] / dw [V, H] / db [V] (dtypes of hidden / weight / bias, contiguous) when defined.
void fused_linear_loss_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                           int64_t T, const at::Tensor& old_logp, const at::Tensor& adv,
                           const c10::optional<at::Tensor>& ref_logp, const at::Tensor& mask,
                           const at::Tensor& coef, const FusedArgs& fa, int64_t block_rows,
                           const at::Tensor& aux, const at::Tensor& loss,
                           const at::Tensor& stats, const c10::optional<at::Tensor>& dh,
                           const c10::optional<at::Tensor>& dw,
                           const c10::optional<at::Tensor>& db);

}  // namespace native
}  // namespace fastrlhf

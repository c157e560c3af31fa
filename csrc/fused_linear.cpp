// Token log-probs and entropy straight from hidden states, the lm_head fused in (CPU counterpart
// of kernels/fused_linear.py): x = (hidden @ weight.T + bias) * inv_temp is never stored whole.
//
// The logits are formed by vocab chunk of Vc columns with ATen's matmul (the BLAS torch links:
// MKL here), in the accumulation dtype (fp32; fp64 for fp64 inputs) from the input values --
// bf16 / fp16 hidden states are converted once to an fp32 [N, H] copy, each weight chunk to an
// fp32 [Vc, H] copy -- so the logits are not rounded to the input dtype (as the reference and
// the Triton kernels).  Memory: O(N*H + V*H + N*Vc); nothing of size [N, V].
//
// Forward, per chunk: the rows are cut into fixed tiles of 64-256 rows (row_tile, by N); each
// tile's [rows, Vc] logits block (a thread-local scratch of a few hundred KB, so it stays in L2) is
// one GEMM, immediately folded into per-row running statistics (online logsumexp):
//     chunk:  m_c = max x,  s_c = sum e^(x - m_c),  t_c = sum e^(x - m_c) (x - m_c)
//     merge:  M = max(m, m_c),  s <- s e^(m - M) + s_c e^(m_c - M),
//             t <- e^(m - M) (t + (m - M) s) + e^(m_c - M) (t_c + (m_c - M) s_c)
// and the target logit is picked from the chunk that holds it.  At the end
// logp = (x_tok - M) - log S, H = log S - T / S; (M, log S) is saved for the backward.
//
// Backward: RECOMPUTE per chunk (the logits GEMM again) rather than producing gradients in the
// forward.  Why: the op's outputs (logp, entropy) feed an arbitrary loss -- clipped PPO with any
// aggregation, GSPO's per-sequence ratio, KL and entropy terms, or nothing (old / ref log-probs
// under no_grad) -- so d loss / d logp is not known while the forward runs; gradients in the
// forward would need the loss inside the kernel (one op per loss, Liger-style) and would cost
// the backward's 4NHV flops on every no-grad call.  Recomputing costs 2NHV extra flops (8NHV in
// all instead of 6NHV) and keeps memory at O(N*H + V*H + N*Vc).  (The one such fused op, the
// token-level PPO loss, is fused_linear_loss_fwd at the end of this file.)  Per chunk:
//   1. row tiles (parallel): the logits tile GEMM, then in place
//      dlogits = (dlogp (onehot - p) - dH p (log p + H)) * inv_temp   (p from the saved M, log S)
//      into a [N, Vc] scratch, and dhidden[tile] += dlogits_tile @ W_c (fp32 accumulator);
//   2. vocab tiles of kColTile columns (parallel): dW[cols] = dlogits[:, cols]^T @ hidden (one
//      GEMM reducing over all N) and db[cols] = column sums of dlogits (serial over the rows).
//
// Determinism: every GEMM is over a fixed tile (fixed by N, Vc and the tile constants, never by
// the thread count) and runs single-threaded inside at::parallel_for; every output element is
// owned by one tile; chunks are merged in vocab order.  So the results are bitwise identical for
// any torch.set_num_threads (tested for 1 and 2 threads).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include "common.h"
#include "fused_linear.h"
#include "fused_row.h"

namespace fastrlhf {
namespace native {
namespace {

constexpr int64_t kRowTile = 64;     // rows per logits GEMM (forward and dhidden): at least ...
constexpr int64_t kRowTileMax = 256;  // ... at most (see row_tile)
constexpr int64_t kColTile = 256;    // vocab columns per dW GEMM (see bwd_impl)
constexpr int64_t kFwdChunk = 512;   // forward: vocab columns per chunk (tile scratch 128 KB)
constexpr int64_t kBwdChunk = 1024;  // backward: vocab columns per chunk ...
constexpr int64_t kBwdScratch = int64_t(1) << 23;  // ... and at most this many scratch elements
constexpr int64_t kMinTaskFlops = int64_t(1) << 22;  // a parallel task gets at least this much

}  // namespace
}  // namespace native
}  // namespace fastrlhf

// MKL's per-thread thread count (exported by libtorch_cpu when torch links MKL; weak, so a build
// on a torch without MKL -- OpenBLAS, aarch64 -- loads and skips it).  The C entry point: the
// lower-case mkl_set_num_threads_local symbol is the Fortran one, which takes an int*.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace fastrlhf {
namespace native {
namespace {

// Every tile GEMM runs with MKL's thread-local count set to 1, on the calling thread and in the
// workers alike.  Measured on an AVX-512 Xeon (MKL 2024.2 in torch 2.13): a tile run on the
// calling thread otherwise gets all of torch's threads, and MKL splits the K dimension of a GEMM
// with a small M (4 x 2048 x 300); and a tile in a worker thread, where MKL is nested in ATen's
// OpenMP region, came out different in the last bits from the same tile on one thread (4 x 300 x
// 512 into a strided [4, 2100] output).  Either way the results changed with the thread count.
// One effect remains: the first GEMM of a given shape in a newly started worker thread can still
// differ in the last bit from later ones (MKL's per-thread state; a same-shape GEMM before it
// removes the difference, a different-shape one does not), so the first call after torch's
// thread count changes is not always bitwise equal to later calls.
struct SerialBlas {
  int prev = 0;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);  // 0: global
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;
};

// Runs f(begin, end) over the tiles [0, n) on ATen's pool with gradients off (worker threads do
// not inherit the caller's grad mode; the tensors here are detached anyway) and one BLAS thread
// per task (SerialBlas).  Small problems stay on the calling thread (a parallel region costs
// more than a few MFLOP of GEMM, and far more on a loaded machine); the tiles, and so the
// results, are the same either way.
template <typename F>
void parallel_tiles(int64_t n, int64_t tile_flops, const F& f) {
  if (n <= 0) return;
  const int64_t grain = std::max<int64_t>(1, kMinTaskFlops / std::max<int64_t>(tile_flops, 1));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    c10::NoGradGuard no_grad;
    SerialBlas serial;
    f(b, e);
  });
}

// Rows per logits GEMM tile of the vocab-chunked path: the largest of 64 / 128 / 256 that still
// leaves 4 tiles to share between threads.  Depends on N only, so the tiles (and the results)
// do not depend on the thread count.  Single-threaded MKL sgemm here measured ~77 GFLOP/s at 64
// x 512 tiles and ~90 at 256 x 512 (linear_token_logprobs 2048 x 1024 x 32000: forward ~10%
// faster with 256-row tiles).
inline int64_t row_tile(int64_t N) {
  int64_t rt = kRowTile;
  while (rt < kRowTileMax && N >= 8 * rt) rt *= 2;
  return rt;
}

// x[j] = (x[j] + b[j]) * inv_temp, in place.
template <typename A>
inline void scale_row(A* x, const A* b, int64_t n, A inv_temp) {
  if (b != nullptr) {
    for (int64_t j = 0; j < n; ++j) x[j] = (x[j] + b[j]) * inv_temp;
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = x[j] * inv_temp;
  }
}

template <typename A>
inline Vec<A> tail_vec(const A* x, int64_t k, A fill) {
  A tmp[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) tmp[l] = l < k ? x[l] : fill;
  return vload(tmp);
}

// (m_c, s_c, t_c) of n logits (see the top of the file); `bad` set if the chunk has nothing
// finite but a NaN (a NaN next to finite values reaches s_c through exp, as +inf does).
template <typename A>
void chunk_stats(const A* x, int64_t n, A& mc, A& sc, A& tc, bool& bad) {
  using VA = Vec<A>;
  const int64_t nm = n / kLanes * kLanes;
  const VA tail = tail_vec(x + nm, n - nm, -kInf<A>);
  A scratch[kLanes];
  const A bm = block_max<A, A>(x, n, LogitScale<A, true>{A(1)}, scratch);  // four max chains
  mc = bm;
  sc = tc = A(0);
  if (bm == -kInf<A>) {
    for (int64_t j = 0; j < n; ++j) bad = bad || x[j] != x[j];
    return;
  }
  VA s = vsplat<A>(0), t = vsplat<A>(0);
  for (int64_t j = 0; j < nm; j += kLanes) {
    const VA dc = vclamp_lo<A>(vload(x + j) - bm);
    const VA e = vexp_clamped(dc);
    s += e;
    t += e * dc;
  }
  const VA dc = vclamp_lo<A>(tail - bm);  // padding: -inf -> kExpLo, e = 0, adds exactly 0
  const VA e = vexp_clamped(dc);
  s += e;
  t += e * dc;
  sc = vsum<A>(s);
  tc = vsum<A>(t);
}

template <typename A>
inline void merge_stats(A& m, A& s, A& t, A mc, A sc, A tc) {
  if (mc == -kInf<A>) return;  // nothing finite in the chunk
  if (m == -kInf<A>) {
    m = mc;
    s = sc;
    t = tc;
    return;
  }
  const A M = m > mc ? m : mc;
  const A d1 = m - M, d2 = mc - M;
  const A a1 = exp_acc(d1), a2 = exp_acc(d2);
  t = a1 * (t + d1 * s) + a2 * (tc + d2 * sc);
  s = a1 * s + a2 * sc;
  m = M;
}

// One logits tile: out[i, :] = (hidden[r0 + i] . W_c + b_c) * inv_temp, i < nr.
template <typename A>
inline void logits_tile(const at::Tensor& hA, const at::Tensor& wt, const A* bias, int64_t r0,
                        int64_t nr, A inv_temp, at::Tensor& out) {
  at::mm_out(out, hA.narrow(0, r0, nr), wt);
  A* L = out.data_ptr<A>();
  const int64_t n = out.size(1);
  for (int64_t i = 0; i < nr; ++i) scale_row(L + i * n, bias, n, inv_temp);
}

template <typename A>
void fwd_impl(const at::Tensor& hA, const at::Tensor& weight, const A* bias,
              const int64_t* tok, A inv_temp, int64_t ignore_index, int64_t Vc, A* logp, A* ent,
              A* lse) {
  const int64_t N = hA.size(0), V = weight.size(0);
  const auto acc = hA.scalar_type();
  std::vector<A> m(N, -kInf<A>), s(N, A(0)), t(N, A(0)), xt(N, kNaN<A>);
  std::vector<uint8_t> bad(N, 0);
  const int64_t rt = row_tile(N);
  const int64_t n_tiles = (N + rt - 1) / rt;
  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    const at::Tensor wt = weight.narrow(0, c0, n).to(acc).t();  // [H, n]
    const A* b = bias != nullptr ? bias + c0 : nullptr;
    parallel_tiles(n_tiles, 2 * rt * n * hA.size(1), [&](int64_t tb, int64_t te) {
      at::Tensor buf = at::empty({rt * n}, hA.options());
      for (int64_t tile = tb; tile < te; ++tile) {
        const int64_t r0 = tile * rt, nr = std::min(rt, N - r0);
        at::Tensor out = buf.narrow(0, 0, nr * n).view({nr, n});
        logits_tile<A>(hA, wt, b, r0, nr, inv_temp, out);
        const A* L = out.data_ptr<A>();
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t r = r0 + i;
          const A* x = L + i * n;
          const int64_t k = tok[r] - c0;
          if (k >= 0 && k < n) xt[r] = x[k];
          A mc, sc, tc;
          bool bd = false;
          chunk_stats(x, n, mc, sc, tc, bd);
          if (bd) bad[r] = 1;
          merge_stats(m[r], s[r], t[r], mc, sc, tc);
        }
      }
    });
  }
  for (int64_t r = 0; r < N; ++r) {
    const A S = s[r];
    A M = m[r], logS, H, lp;
    if (bad[r] || S != S) {  // a NaN (or +inf) logit makes the whole row NaN, as in torch
      M = logS = H = lp = kNaN<A>;
    } else {
      logS = std::log(S);
      H = logS - t[r] / S;
      lp = (xt[r] - M) - logS;  // x_tok stays NaN for an id outside [0, V)
    }
    if (tok[r] == ignore_index) lp = A(0);
    lse[2 * r] = M;
    lse[2 * r + 1] = logS;
    ent[r] = H;
    logp[r] = lp;
  }
}

// d loss / d x of one row's chunk, in place over x (the chunk's scaled logits), times inv_temp.
template <typename A, bool HAS_DENT>
inline void grad_chunk_row(A* x, int64_t n, int64_t k, A M, A logS, A H, A g_lp, A g_h,
                           A inv_temp) {
  const bool has_tok = k >= 0 && k < n;
  const A xk = has_tok ? x[k] : A(0);
  auto one = [&](A v) -> A {
    const A zc = clamp_hi(clamp_lo((v - M) - logS));
    const A p = exp_clamped(zc);
    A g = -g_lp * p;
    if (HAS_DENT) g -= g_h * (p * (zc + H));
    return g;
  };
  const int64_t nm = n / kLanes * kLanes;
  for (int64_t j = 0; j < nm; j += kLanes) {
    const Vec<A> zc = vclamp_hi<A>(vclamp_lo<A>((vload(x + j) - M) - logS));
    const Vec<A> p = vexp_clamped(zc);
    Vec<A> g = -g_lp * p;
    if (HAS_DENT) g -= g_h * (p * (zc + H));
    vstore(x + j, g * inv_temp);
  }
  for (int64_t j = nm; j < n; ++j) x[j] = one(x[j]) * inv_temp;
  if (has_tok) x[k] = (one(xk) + g_lp) * inv_temp;
}

template <typename A, bool HAS_DENT>
void bwd_impl(const at::Tensor& hA, const at::Tensor& weight, const A* bias, const int64_t* tok,
              const A* dlogp, const A* dent, const A* lse, const A* ent, A inv_temp,
              int64_t ignore_index, int64_t Vc, at::Tensor dh_acc, at::Tensor dw,
              at::Tensor db_acc) {
  const int64_t N = hA.size(0), V = weight.size(0);
  const auto acc = hA.scalar_type();
  const bool need_dh = dh_acc.defined(), need_dw = dw.defined(), need_db = db_acc.defined();
  const bool dw_direct = need_dw && dw.scalar_type() == acc;
  A* db = need_db ? db_acc.data_ptr<A>() : nullptr;
  at::Tensor scratch = at::empty({N * Vc}, hA.options());
  const int64_t rt = row_tile(N);
  const int64_t n_tiles = (N + rt - 1) / rt;
  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    const at::Tensor wc = weight.narrow(0, c0, n).to(acc);  // [n, H]
    const at::Tensor wt = wc.t();
    const A* b = bias != nullptr ? bias + c0 : nullptr;
    at::Tensor G = scratch.narrow(0, 0, N * n).view({N, n});
    parallel_tiles(n_tiles, 4 * rt * n * hA.size(1), [&](int64_t tb, int64_t te) {
      for (int64_t tile = tb; tile < te; ++tile) {
        const int64_t r0 = tile * rt, nr = std::min(rt, N - r0);
        at::Tensor out = G.narrow(0, r0, nr);
        logits_tile<A>(hA, wt, b, r0, nr, inv_temp, out);
        A* L = out.data_ptr<A>();
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t r = r0 + i;
          const A g_lp = (tok[r] == ignore_index || dlogp == nullptr) ? A(0) : dlogp[r];
          grad_chunk_row<A, HAS_DENT>(L + i * n, n, tok[r] - c0, lse[2 * r], lse[2 * r + 1],
                                      HAS_DENT ? ent[r] : A(0), g_lp,
                                      HAS_DENT ? dent[r] : A(0), inv_temp);
        }
        if (need_dh) {
          at::Tensor d = dh_acc.narrow(0, r0, nr);
          if (c0 == 0) {
            at::mm_out(d, out, wc);
          } else {
            d.addmm_(out, wc);
          }
        }
      }
    });
    if (!need_dw && !need_db) continue;
    // dW tiles of kColTile vocab rows, K = N.  128-row tiles ran single-threaded MKL sgemm at
    // 77 GFLOP/s on an AVX-512 Xeon (2048 x 1024, K = 2048), 256-row tiles at 133, and the
    // whole backward at 2048 x 1024 x 32000 was 15-25% faster in interleaved runs; 256 is also
    // the fused loss's dW tile (kLossColTile).  Fixed, so results do not depend on threads.
    const int64_t n_ct = (n + kColTile - 1) / kColTile;
    parallel_tiles(n_ct, 2 * kColTile * N * hA.size(1), [&](int64_t tb, int64_t te) {
      for (int64_t ct = tb; ct < te; ++ct) {
        const int64_t j0 = ct * kColTile, nj = std::min(kColTile, n - j0);
        if (need_dw) {
          const at::Tensor gt = G.narrow(1, j0, nj).t();  // [nj, N]
          at::Tensor dst = dw.narrow(0, c0 + j0, nj);
          if (dw_direct) {
            at::mm_out(dst, gt, hA);
          } else {
            dst.copy_(at::mm(gt, hA));
          }
        }
        if (need_db) {
          A colsum[kColTile];
          for (int64_t j = 0; j < nj; ++j) colsum[j] = A(0);
          const A* g = G.data_ptr<A>() + j0;
          for (int64_t r = 0; r < N; ++r)
            for (int64_t j = 0; j < nj; ++j) colsum[j] += g[r * n + j];
          for (int64_t j = 0; j < nj; ++j) db[c0 + j0 + j] = colsum[j];
        }
      }
    });
  }
}

// ---- the fused PPO loss from hidden states, gradients produced in the forward --------------
//
// fused_linear_ppo_loss is a scalar, so d loss / d logits is known for a row as soon as its
// logits and its per-token loss terms are (token-level ratio: the weights c_b m_bt come from the
// mask alone).  Rows are taken in blocks of R whose whole [R, V] logits fit a scratch buffer:
//   1. x = h_blk W^T + b                        (GEMM tasks: rows x Vc columns)
//   2. per row: statistics, loss terms, then d loss / d x over x in place (fused_row.h)
//   3. dhidden_blk = dx W                       (GEMM tasks: rows x kHTile columns, K = V)
//   4. dW (+)= dx^T h_blk, db (+)= colsum(dx)   (GEMM tasks: vocab rows, K = R)
// Three GEMMs in all (6NHV flops) against the four of forward + recomputing backward (8NHV);
// the cost is memory: the [R, V] block, and dW accumulated over the blocks in the accumulation
// dtype (for bf16 / fp16 weights an fp32 [V, H] buffer; their W tiles are converted per GEMM,
// and dhidden then runs over K chunks of kWConvRows vocab rows).  The backward
// then only scales the stored gradients by the upstream gradient.  Deterministic as the rest:
// every task is a fixed tile, every output element has one owner per block, blocks in order.
// GEMM tiles of this path: 256 rows x 512 columns for the logits, 256 x 512 for dhidden (K = V),
// 256 vocab rows for dW (K = R).  Single-threaded MKL sgemm here (AVX2 EPYC) measured 89-91
// GFLOP/s at these shapes against 73-77 at the 64-row tiles of the vocab-chunked path (the
// whole 2048 x 1024 x 32000 logits GEMM on 2 threads: 155).  dhidden's tiles were 256 x 256
// until the AVX-512 Xeon measured them at ~122 GFLOP/s against ~135 for 256 x 512 (one
// thread, K = 32000); the whole 16 x 128 x H x 32000 step then took 1.57 vs 1.61 s (H = 1024)
// and 3.03 vs 3.17 s (H = 2048), medians of the two builds timed alternately in one process,
// with bitwise the same gradients.
constexpr int64_t kBlockElems = int64_t(1) << 24;  // logits row block [R, V]: 64 MB of fp32 ...
constexpr int64_t kLossRowTile = 256;  // ... or 256 rows; rows per logits / dhidden GEMM task
constexpr int64_t kHTile = 512;                    // dhidden columns per GEMM task
constexpr int64_t kLossColTile = 256;              // vocab rows per dW GEMM task
constexpr int64_t kWConvRows = 2048;  // low-precision W: vocab rows converted per dhidden GEMM


template <typename A, typename Sc>
void fused_linear_impl(const at::Tensor& hA, const at::Tensor& wA, const A* bias,
                       const FusedTokens<A>& in, const FusedArgs& fa, const Sc& sc, int64_t R,
                       A* aux, at::Tensor dh_acc, at::Tensor dw_acc, A* db) {
  // wA keeps its own dtype: bf16 / fp16 tiles are converted to the accumulation dtype (hA's)
  // right before their GEMM, as the vocab-chunked path does, so no [V, H] copy of W in fp32 is
  // held (V*H*4 bytes -- 125 MB at 32000 x 1024 -- beside the fp32 dW accumulator); each
  // conversion is exact.  dhidden then runs K = V in fixed chunks of kWConvRows rows.
  const auto acc = hA.scalar_type();
  const bool convert_w = wA.scalar_type() != acc;
  const int64_t N = hA.size(0), H = hA.size(1), V = wA.size(0);
  const FusedRow<A, A, Sc> op(in, fa, sc, V, N, aux);
  at::Tensor X = at::empty({std::min(R, N), V}, hA.options());
  A* xp = X.data_ptr<A>();
  const int64_t Vc = std::min(V, kFwdChunk);
  const int64_t n_vc = (V + Vc - 1) / Vc;
  const int64_t n_ht = (H + kHTile - 1) / kHTile;
  const int64_t n_ct = (V + kLossColTile - 1) / kLossColTile;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t nr = std::min(R, N - r0);
    const at::Tensor Xb = X.narrow(0, 0, nr);
    const at::Tensor hb = hA.narrow(0, r0, nr);
    const int64_t n_rt = (nr + kLossRowTile - 1) / kLossRowTile;
    parallel_tiles(n_rt * n_vc, 2 * kLossRowTile * Vc * H, [&](int64_t tb, int64_t te) {
      for (int64_t task = tb; task < te; ++task) {
        const int64_t i0 = (task / n_vc) * kLossRowTile, ni = std::min(kLossRowTile, nr - i0);
        const int64_t c0 = (task % n_vc) * Vc, nc = std::min(Vc, V - c0);
        at::Tensor out = Xb.narrow(0, i0, ni).narrow(1, c0, nc);
        at::mm_out(out, hb.narrow(0, i0, ni), wA.narrow(0, c0, nc).to(acc).t());
        if (bias == nullptr) continue;
        for (int64_t i = 0; i < ni; ++i) scale_row(xp + (i0 + i) * V + c0, bias + c0, nc, A(1));
      }
    });
    parallel_rows(nr, rows_grain(V), [&](int64_t a, int64_t b) {
      std::vector<A> buf(kLanes);
      // the statistics sweep keeps its exp terms for the gradient sweep (fused_row.h)
      const RowExpsScratch<A> keep(V, fa.write_grad);
      const RowExps<A>* k = keep.get();
      for (int64_t i = a; i < b; ++i) {
        A* x = xp + i * V;
        A M, logS, Hr;
        const A lp = op.stats(r0 + i, x, buf.data(), M, logS, Hr, k);
        op.finish(r0 + i, x, x, M, logS, Hr, lp, A(0), buf.data(), k);
      }
    });
    if (!fa.write_grad) continue;
    if (dh_acc.defined()) {
      parallel_tiles(n_rt * n_ht, 2 * kLossRowTile * V * kHTile, [&](int64_t tb, int64_t te) {
        for (int64_t task = tb; task < te; ++task) {
          const int64_t i0 = (task / n_ht) * kLossRowTile, ni = std::min(kLossRowTile, nr - i0);
          const int64_t h0 = (task % n_ht) * kHTile, nh = std::min(kHTile, H - h0);
          at::Tensor d = dh_acc.narrow(0, r0 + i0, ni).narrow(1, h0, nh);
          const at::Tensor xi = Xb.narrow(0, i0, ni);
          if (!convert_w) {
            at::mm_out(d, xi, wA.narrow(1, h0, nh));
            continue;
          }
          for (int64_t k0 = 0; k0 < V; k0 += kWConvRows) {  // in order: deterministic
            const int64_t nk = std::min(kWConvRows, V - k0);
            const at::Tensor wk = wA.narrow(0, k0, nk).narrow(1, h0, nh).to(acc);
            if (k0 == 0)
              at::mm_out(d, xi.narrow(1, k0, nk), wk);
            else
              d.addmm_(xi.narrow(1, k0, nk), wk);
          }
        }
      });
    }
    if (!dw_acc.defined() && db == nullptr) continue;
    parallel_tiles(n_ct, 2 * kLossColTile * nr * H, [&](int64_t tb, int64_t te) {
      for (int64_t ct = tb; ct < te; ++ct) {
        const int64_t j0 = ct * kLossColTile, nj = std::min(kLossColTile, V - j0);
        if (dw_acc.defined()) {
          at::Tensor dst = dw_acc.narrow(0, j0, nj);
          const at::Tensor gt = Xb.narrow(1, j0, nj).t();  // [nj, nr]
          if (r0 == 0) {
            at::mm_out(dst, gt, hb);
          } else {
            dst.addmm_(gt, hb);
          }
        }
        if (db != nullptr) {
          A colsum[kLossColTile];
          for (int64_t j = 0; j < nj; ++j) colsum[j] = r0 == 0 ? A(0) : db[j0 + j];
          for (int64_t i = 0; i < nr; ++i) {
            const A* g = xp + i * V + j0;
            for (int64_t j = 0; j < nj; ++j) colsum[j] += g[j];
          }
          for (int64_t j = 0; j < nj; ++j) db[j0 + j] = colsum[j];
        }
      }
    });
  }
}

template <typename F>
void dispatch_acc(at::ScalarType acc, const F& f) {
  if (acc == at::kDouble) {
    f(double());
  } else {
    f(float());
  }
}

at::ScalarType acc_of(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

void linear_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                         double inv_temp, int64_t ignore_index, int64_t chunk,
                         const at::Tensor& logp, const at::Tensor& ent, const at::Tensor& lse) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  if (N == 0) return;
  const auto acc = acc_of(hidden.scalar_type());
  const at::Tensor hA = hidden.detach().to(acc).contiguous();
  const at::Tensor w = weight.detach();
  at::Tensor bA;
  if (bias.has_value() && bias->defined()) bA = bias->detach().to(acc).contiguous();
  const int64_t Vc = std::min(V, chunk > 0 ? chunk : kFwdChunk);
  dispatch_acc(acc, [&](auto a) {
    using A = decltype(a);
    fwd_impl<A>(hA, w, bA.defined() ? bA.data_ptr<A>() : nullptr, tokens.data_ptr<int64_t>(),
                static_cast<A>(inv_temp), ignore_index, Vc, logp.data_ptr<A>(),
                ent.data_ptr<A>(), lse.data_ptr<A>());
  });
}

void linear_logprobs_bwd(const at::Tensor& hidden, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                         const c10::optional<at::Tensor>& dlogp,
                         const c10::optional<at::Tensor>& dent, const at::Tensor& lse,
                         const at::Tensor& ent, double inv_temp, int64_t ignore_index,
                         int64_t chunk, const c10::optional<at::Tensor>& dh,
                         const c10::optional<at::Tensor>& dw,
                         const c10::optional<at::Tensor>& db) {
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto acc = acc_of(hidden.scalar_type());
  const bool need_dh = dh.has_value() && dh->defined();
  const bool need_dw = dw.has_value() && dw->defined();
  const bool need_db = db.has_value() && db->defined();
  const bool has_dlogp = dlogp.has_value() && dlogp->defined();
  const bool has_dent = dent.has_value() && dent->defined();
  if (N == 0 || (!has_dlogp && !has_dent)) {  // no rows / no upstream gradient: zeros
    if (need_dh) dh->zero_();
    if (need_dw) dw->zero_();
    if (need_db) db->zero_();
    return;
  }
  if (!(need_dh || need_dw || need_db)) return;
  const at::Tensor hA = hidden.detach().to(acc).contiguous();
  const at::Tensor w = weight.detach();
  at::Tensor bA;
  if (bias.has_value() && bias->defined()) bA = bias->detach().to(acc).contiguous();
  const int64_t cap = std::max<int64_t>(kColTile, kBwdScratch / std::max<int64_t>(N, 1));
  const int64_t Vc = std::min(V, chunk > 0 ? chunk : std::min(kBwdChunk, cap));
  // dhidden accumulates over the chunks in the accumulation dtype; written straight into the
  // output when that is already the accumulation dtype.
  at::Tensor dh_acc;
  if (need_dh) dh_acc = dh->scalar_type() == acc ? *dh : at::empty({N, hidden.size(1)},
                                                                   hA.options());
  at::Tensor db_acc;
  if (need_db) db_acc = at::empty({V}, hA.options());
  dispatch_acc(acc, [&](auto a) {
    using A = decltype(a);
    const A* bp = bA.defined() ? bA.data_ptr<A>() : nullptr;
    const A* dl = has_dlogp ? dlogp->data_ptr<A>() : nullptr;
    if (has_dent) {
      bwd_impl<A, true>(hA, w, bp, tokens.data_ptr<int64_t>(), dl, dent->data_ptr<A>(),
                        lse.data_ptr<A>(), ent.data_ptr<A>(), static_cast<A>(inv_temp),
                        ignore_index, Vc, dh_acc, need_dw ? *dw : at::Tensor(), db_acc);
    } else {
      bwd_impl<A, false>(hA, w, bp, tokens.data_ptr<int64_t>(), dl, nullptr, lse.data_ptr<A>(),
                         nullptr, static_cast<A>(inv_temp), ignore_index, Vc, dh_acc,
                         need_dw ? *dw : at::Tensor(), db_acc);
    }
  });
  if (need_dh && !dh_acc.is_same(*dh)) dh->copy_(dh_acc);
  if (need_db) db->copy_(db_acc);
}

void fused_linear_loss_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                           int64_t T, const at::Tensor& old_logp, const at::Tensor& adv,
                           const c10::optional<at::Tensor>& ref_logp, const at::Tensor& mask,
                           const at::Tensor& coef, const FusedArgs& fa, int64_t block_rows,
                           const at::Tensor& aux, const at::Tensor& loss,
                           const at::Tensor& stats, const c10::optional<at::Tensor>& dh,
                           const c10::optional<at::Tensor>& dw,
                           const c10::optional<at::Tensor>& db) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const int64_t B = T > 0 ? N / T : 0;
  const auto acc = acc_of(hidden.scalar_type());
  const bool need_dh = fa.write_grad && dh.has_value() && dh->defined();
  const bool need_dw = fa.write_grad && dw.has_value() && dw->defined();
  const bool need_db = fa.write_grad && db.has_value() && db->defined();
  const at::Tensor hA = hidden.detach().to(acc).contiguous();
  const at::Tensor wA = weight.detach().contiguous();  // its own dtype: see fused_linear_impl
  at::Tensor bA;
  if (bias.has_value() && bias->defined()) bA = bias->detach().to(acc).contiguous();
  // gradients accumulate in the accumulation dtype, straight into the outputs when they have it
  at::Tensor dh_acc, dw_acc, db_acc;
  if (need_dh) dh_acc = dh->scalar_type() == acc ? *dh : at::empty({N, H}, hA.options());
  if (need_dw) dw_acc = dw->scalar_type() == acc ? *dw : at::empty({V, H}, hA.options());
  if (need_db) db_acc = at::empty({V}, hA.options());
  // whole GEMM tiles per block, at least one (256 rows: 131 MB of fp32 logits at V = 128256)
  int64_t R = block_rows > 0 ? block_rows
                             : std::max(kLossRowTile, kBlockElems / V / kLossRowTile * kLossRowTile);
  R = std::max<int64_t>(1, std::min(R, N));
  dispatch_acc(acc, [&](auto a) {
    using A = decltype(a);
    const FusedTokens<A> in{tokens.data_ptr<int64_t>(), old_logp.data_ptr<A>(),
                            adv.data_ptr<A>(),
                            ref_logp.has_value() ? ref_logp->data_ptr<A>() : nullptr,
                            mask.data_ptr<A>(), coef.data_ptr<A>(), T};
    if (N > 0) {
      with_logit_scale(static_cast<A>(fa.inv_temp), [&](const auto sc) {
        fused_linear_impl<A>(hA, wA, bA.defined() ? bA.data_ptr<A>() : nullptr, in, fa, sc, R,
                             aux.data_ptr<A>(), dh_acc, dw_acc,
                             need_db ? db_acc.data_ptr<A>() : nullptr);
      });
    }
    reduce_fused(aux.data_ptr<A>(), in.m, in.coef, B, T, loss.data_ptr<A>(),
                 stats.data_ptr<A>());
  });
  if (N == 0) {  // no rows: zero gradients
    if (need_dh) dh_acc.zero_();
    if (need_dw) dw_acc.zero_();
    if (need_db) db_acc.zero_();
  }
  if (need_dh && !dh_acc.is_same(*dh)) dh->copy_(dh_acc);
  if (need_dw && !dw_acc.is_same(*dw)) dw->copy_(dw_acc);
  if (need_db) db->copy_(db_acc);
}

}  // namespace native
}  // namespace fastrlhf

// GAE (verl 0.9 compute_gae_advantage_return, multi-turn aware, not whitened), CPU.
//
// Per row (or packed segment), for t = T-1 .. 0 with nv = A = 0 past the end:
//     valid t:  delta = r_t + gamma * nv - V_t;  A = delta + gamma * lam * A;  nv = V_t
//               adv_t = A,  ret_t = A + V_t
//     masked t: nv, A carry across unchanged;  adv_t = ret_t = 0
// Rows run in parallel; each row is staged (converted from any dtype / strides) into a
// contiguous buffer of the compute dtype and scanned with a branch-free loop, so inputs at
// masked positions (NaN included) never enter the arithmetic.
#include "common.h"
#include "native.h"

namespace fastrlhf {
namespace native {
namespace {

template <typename A>
void scan(const A* r, const A* v, const A* m, int64_t n, A gamma, A gl, A* adv, A* ret) {
  A nv = A(0), la = A(0);
  for (int64_t t = n - 1; t >= 0; --t) {
    const bool ok = m[t] != A(0);
    const A rt = ok ? r[t] : A(0);
    const A vt = ok ? v[t] : A(0);
    const A cur = (rt + gamma * nv - vt) + gl * la;
    la = ok ? cur : la;
    nv = ok ? vt : nv;
    adv[t] = ok ? la : A(0);
    ret[t] = ok ? la + vt : A(0);
  }
}

template <typename A>
void gae_impl(const Mat& rw, const Mat& vl, const Mat& mk, int64_t B, int64_t T,
              const int64_t* cu, int64_t n_seg, double gamma_d, double lam_d, void* adv_v,
              void* ret_v) {
  A* adv = static_cast<A*>(adv_v);
  A* ret = static_cast<A*>(ret_v);
  const A gamma = static_cast<A>(gamma_d);
  const A gl = static_cast<A>(gamma_d * lam_d);
  const int64_t tasks = cu ? n_seg : B;
  // Small rows: several per task; long rows: one each.
  const int64_t row_len = cu ? T / std::max<int64_t>(n_seg, 1) : T;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(row_len, 1));
  parallel_rows(tasks, grain, [&](int64_t b, int64_t e) {
    std::vector<A> r, v, m;
    for (int64_t k = b; k < e; ++k) {
      const int64_t row = cu ? 0 : k;
      const int64_t c0 = cu ? cu[k] : 0;
      const int64_t n = cu ? cu[k + 1] - cu[k] : T;
      if (n <= 0) continue;
      r.resize(n);
      v.resize(n);
      m.resize(n);
      rw.load_row<A>(row, c0, n, r.data());
      vl.load_row<A>(row, c0, n, v.data());
      mk.load_row<A>(row, c0, n, m.data());
      const int64_t o = row * T + c0;
      scan<A>(r.data(), v.data(), m.data(), n, gamma, gl, adv + o, ret + o);
    }
  });
}

}  // namespace

void gae(const Mat& rewards, const Mat& values, const Mat& mask, int64_t B, int64_t T,
         const int64_t* cu, int64_t n_seg, double gamma, double lam, bool f64, void* adv,
         void* ret) {
  if (f64) gae_impl<double>(rewards, values, mask, B, T, cu, n_seg, gamma, lam, adv, ret);
  else gae_impl<float>(rewards, values, mask, B, T, cu, n_seg, gamma, lam, adv, ret);
}

}  // namespace native
}  // namespace fastrlhf

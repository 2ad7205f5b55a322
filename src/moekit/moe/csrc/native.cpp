// Decode-time products that stream large float32 weights once (AVX-512): a few tokens through
// their chosen SwiGLU experts (`grouped_swiglu`) or through one dense weight (`linear`).
//
// grouped_swiglu is the decode case of `moekit.moe.decode_kernel.grouped_swiglu`: each chosen
// expert's weights are read once, whatever number of the tokens chose it, by all threads at
// once, each over its own contiguous share of the rows, with four rows in flight per thread.
// Two parallel passes: gate and up (a row of each at a time, so the activation is applied as
// the pair is finished), then the down projection split by output row (each output element
// is owned by one thread, so no atomics). Built on first use by `moekit.moe.native`, which
// says when these are used.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

namespace {

// Sums of the products of four rows (`a`, stride `lda`) with `x`, all of length n.
inline void dot4(const float* a, int64_t lda, const float* x, int64_t n, float* out) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), xv, s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + lda + k), xv, s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 2 * lda + k), xv, s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + 3 * lda + k), xv, s3);
  }
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), xv, s0);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + lda + k), xv, s1);
    s2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + 2 * lda + k), xv, s2);
    s3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + 3 * lda + k), xv, s3);
  }
  out[0] = _mm512_reduce_add_ps(s0);
  out[1] = _mm512_reduce_add_ps(s1);
  out[2] = _mm512_reduce_add_ps(s2);
  out[3] = _mm512_reduce_add_ps(s3);
}

inline float dot1(const float* a, const float* x, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    s = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(x + k), s);
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, x + k), s);
  }
  return _mm512_reduce_add_ps(s);
}

// rows [lo, hi) of `w` (row stride `ld`, row length n) against each of `xs`:
// out[j][r - base] = w[r] . xs[j]
inline void rows_dot(const float* w, int64_t ld, int64_t lo, int64_t hi, int64_t n,
                     const std::vector<const float*>& xs, const std::vector<float*>& outs) {
  float d[4];
  int64_t r = lo;
  for (; r + 4 <= hi; r += 4) {
    for (size_t j = 0; j < xs.size(); ++j) {
      dot4(w + r * ld, ld, xs[j], n, d);
      std::copy(d, d + 4, outs[j] + r);
    }
  }
  for (; r < hi; ++r)
    for (size_t j = 0; j < xs.size(); ++j) outs[j][r] = dot1(w + r * ld, xs[j], n);
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

}  // namespace

// x (T, D), experts (T, K) int64 with -1 for an empty slot, weights (T, K), gate_up (E, 2F, D),
// down (E, D, F); the last two dims of each weight contiguous. Returns (T, D).
at::Tensor grouped_swiglu(at::Tensor x, at::Tensor experts, at::Tensor weights,
                             at::Tensor gate_up, at::Tensor down, bool scale_input) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 (T, D)");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && down.scalar_type() == at::kFloat,
              "expert weights must be float32");
  TORCH_CHECK(gate_up.stride(2) == 1 && down.stride(2) == 1 &&
                  gate_up.stride(1) == gate_up.size(2) && down.stride(1) == down.size(2),
              "each expert's weight must be contiguous");
  x = x.contiguous();
  const int64_t T = x.size(0), D = x.size(1), K = experts.size(1);
  const int64_t F = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * F && gate_up.size(2) == D && down.size(1) == D,
              "weight shapes do not match");
  auto ex = experts.to(at::kLong).contiguous();
  auto wt = weights.to(at::kFloat).contiguous();
  const int64_t* ep = ex.data_ptr<int64_t>();
  const float* wp = wt.data_ptr<float>();
  const float* xp = x.data_ptr<float>();

  // Slots grouped by expert, experts in ascending order (each expert's weights read once).
  std::map<int64_t, std::vector<int64_t>> by_expert;
  for (int64_t s = 0; s < T * K; ++s)
    if (ep[s] >= 0) {
      TORCH_CHECK(ep[s] < gate_up.size(0), "expert index out of range");
      by_expert[ep[s]].push_back(s);
    }
  auto out = at::zeros({T, D}, x.options());
  if (by_expert.empty()) return out;
  std::vector<int64_t> expert, first;  // per used expert: its index, its first slot in order
  std::vector<int64_t> order;          // slots in expert order
  for (auto& [e, slots] : by_expert) {
    expert.push_back(e);
    first.push_back(static_cast<int64_t>(order.size()));
    order.insert(order.end(), slots.begin(), slots.end());
  }
  first.push_back(static_cast<int64_t>(order.size()));
  const int64_t U = static_cast<int64_t>(expert.size()), S = static_cast<int64_t>(order.size());

  auto g = at::empty({S, F}, x.options());  // gate, then the activation
  auto u = at::empty({S, F}, x.options());  // up
  float* gp = g.data_ptr<float>();
  float* up = u.data_ptr<float>();
  const int64_t gu_e = gate_up.stride(0), dn_e = down.stride(0);
  const float* gu_p = gate_up.data_ptr<float>();
  const float* dn_p = down.data_ptr<float>();
  float* op = out.data_ptr<float>();

  // Pass 1: for every used expert, gate row f and up row f for f in the thread's share.
  at::parallel_for(0, U * F, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const float*> xs;
    std::vector<float*> go, uo;
    for (int64_t i = 0; i < U; ++i) {
      const int64_t a = std::max(lo, i * F) - i * F, b = std::min(hi, (i + 1) * F) - i * F;
      if (a >= b) continue;
      xs.clear(), go.clear(), uo.clear();
      for (int64_t j = first[i]; j < first[i + 1]; ++j) {
        xs.push_back(xp + (order[j] / K) * D);
        go.push_back(gp + j * F);
        uo.push_back(up + j * F);
      }
      const float* w = gu_p + expert[i] * gu_e;
      rows_dot(w, D, a, b, D, xs, go);
      rows_dot(w + F * D, D, a, b, D, xs, uo);
      for (int64_t j = first[i]; j < first[i + 1]; ++j) {
        const float c = scale_input ? wp[order[j]] : 1.0f;
        float* gj = gp + j * F;
        const float* uj = up + j * F;
        for (int64_t f = a; f < b; ++f) gj[f] = silu(c * gj[f]) * (c * uj[f]);
      }
    }
  });

  // Pass 2: output rows [lo, hi) of every used expert's down projection, weighted and summed.
  at::parallel_for(0, D, 1, [&](int64_t lo, int64_t hi) {
    const int64_t n = hi - lo;
    std::vector<float> y;
    std::vector<const float*> hs;
    std::vector<float*> ys;
    for (int64_t i = 0; i < U; ++i) {
      const int64_t slots = first[i + 1] - first[i];
      y.resize(slots * n);
      hs.clear(), ys.clear();
      for (int64_t j = 0; j < slots; ++j) {
        hs.push_back(gp + (first[i] + j) * F);
        ys.push_back(y.data() + j * n - lo);
      }
      rows_dot(dn_p + expert[i] * dn_e, F, lo, hi, F, hs, ys);
      for (int64_t j = 0; j < slots; ++j) {
        const int64_t s = order[first[i] + j];
        const float c = scale_input ? 1.0f : wp[s];
        float* o = op + (s / K) * D;
        const float* yj = y.data() + j * n;
        for (int64_t d = lo; d < hi; ++d) o[d] += c * yj[d - lo];
      }
    }
  });
  return out;
}

// x (T, D) against w (N, D), rows contiguous: (T, N), the weight streamed once.
at::Tensor linear(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) == w.size(1), "the weight must be contiguous");
  x = x.contiguous();
  const int64_t T = x.size(0), D = x.size(1), N = w.size(0);
  auto out = at::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const float*> xs;
    std::vector<float*> ys;
    for (int64_t t = 0; t < T; ++t) {
      xs.push_back(xp + t * D);
      ys.push_back(op + t * N);
    }
    rows_dot(wp, D, lo, hi, D, xs, ys);
  });
  return out;
}

TORCH_LIBRARY(moekit_native, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def(
      "grouped_swiglu(Tensor x, Tensor experts, Tensor weights, Tensor gate_up, Tensor down, "
      "bool scale_input) -> Tensor");
}

TORCH_LIBRARY_IMPL(moekit_native, CPU, m) {
  m.impl("grouped_swiglu", &grouped_swiglu);
  m.impl("linear", &linear);
}

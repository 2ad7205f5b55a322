// Decode-time products that stream large float32 weights once (AVX-512): a few tokens through
// their chosen SwiGLU experts (`grouped_swiglu`) or through one dense weight (`linear`).
//
// grouped_swiglu is the decode case of `moekit.moe.decode_kernel.grouped_swiglu`: each chosen
// expert's weights are read by all threads at once, each over its own contiguous share of the
// rows, with four rows in flight per thread (int4: two from three tokens up) and the next
// ones prefetched, once for all the tokens that chose it, each load serving up to four of
// those tokens. Two parallel passes: gate then up over the thread's share of the hidden
// units, with the activation applied to that share as soon as both are done; then the down
// projection split by output row (each output element is owned by one thread, so no
// atomics). Built on first use by `moekit.moe.native`, which says when these are used.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <vector>

namespace {

// A hint to fetch the line at `base` + `bytes` (which may lie past the end of the data a
// prefetch runs ahead of: a prefetch never faults, and the address is formed as an integer).
inline void prefetch(const void* base, int64_t bytes) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(base) + bytes),
               _MM_HINT_T0);
}

// Sums of the products of four rows (`a`, stride `lda`) with each of NT inputs `xs`, all of
// length n, into outs[j][r + i], sharing each load of the rows between the inputs (each sum's
// arithmetic in the same order whatever NT is). With `ahead`, the next four rows' lines are
// prefetched as these are read (one per row per step).
template <int NT, bool ahead>
inline void dot4(const float* a, int64_t lda, const float* const* xs, int64_t n,
                 float* const* outs, int64_t r) {
  __m512 s[4][NT];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < NT; ++j) s[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    if (ahead)
      for (int i = 4; i < 8; ++i) prefetch(a, (i * lda + k) * sizeof(float));
    __m512 xv[NT];
    for (int j = 0; j < NT; ++j) xv[j] = _mm512_loadu_ps(xs[j] + k);
    for (int i = 0; i < 4; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * lda + k);
      for (int j = 0; j < NT; ++j) s[i][j] = _mm512_fmadd_ps(av, xv[j], s[i][j]);
    }
  }
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    __m512 xv[NT];
    for (int j = 0; j < NT; ++j) xv[j] = _mm512_maskz_loadu_ps(m, xs[j] + k);
    for (int i = 0; i < 4; ++i) {
      const __m512 av = _mm512_maskz_loadu_ps(m, a + i * lda + k);
      for (int j = 0; j < NT; ++j) s[i][j] = _mm512_fmadd_ps(av, xv[j], s[i][j]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < NT; ++j) outs[j][r + i] = _mm512_reduce_add_ps(s[i][j]);
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

// Rows [r, r + 4) of `w` against `count` (4, 2 or 1) of the inputs.
template <bool ahead>
inline void rows_dot4(const float* w, int64_t ld, int64_t r, int64_t n, const float* const* xs,
                      float* const* outs, size_t count) {
  switch (count) {
    case 4: dot4<4, ahead>(w + r * ld, ld, xs, n, outs, r); break;
    case 2: dot4<2, ahead>(w + r * ld, ld, xs, n, outs, r); break;
    case 1: dot4<1, ahead>(w + r * ld, ld, xs, n, outs, r); break;
    default: break;
  }
}

// rows [lo, hi) of `w` (row stride `ld`, row length n) against each of `xs`:
// out[j][r] = w[r] . xs[j]; four rows at a time against four inputs at a time (then two, then
// one), the next rows prefetched while the first inputs read them.
inline void rows_dot(const float* w, int64_t ld, int64_t lo, int64_t hi, int64_t n,
                     const std::vector<const float*>& xs, const std::vector<float*>& outs) {
  int64_t r = lo;
  for (; r + 4 <= hi; r += 4) {
    size_t j = 0;
    for (const size_t count : {4, 2, 1})
      for (; j + count <= xs.size(); j += count) {
        if (j == 0)
          rows_dot4<true>(w, ld, r, n, &xs[j], &outs[j], count);
        else
          rows_dot4<false>(w, ld, r, n, &xs[j], &outs[j], count);
      }
  }
  for (; r < hi; ++r)
    for (size_t j = 0; j < xs.size(); ++j) outs[j][r] = dot1(w + r * ld, xs[j], n);
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// A projection's stacked float32 weights (E, N, K), each expert's contiguous. Its inputs are
// the float vectors themselves.
struct Float32Weights {
  const float* w;
  int64_t expert_stride, K;
  int64_t prepared_size() const { return K; }
  void prepare(const float* x, float c, float* out) const {
    for (int64_t k = 0; k < K; ++k) out[k] = c * x[k];
  }
  void rows(int64_t e, int64_t lo, int64_t hi, const std::vector<const float*>& xs,
            const std::vector<float*>& outs) const {
    rows_dot(w + e * expert_stride, K, lo, hi, K, xs, outs);
  }
};

// A projection's stacked int4 weights (moekit.quant.formats): packed bytes (E, N, K/2), column
// 2i in the low nibble of byte i and 2i+1 in the high one; scale and min (E, N, K/G) float32,
// w = min + scale * q. An input is prepared once as its even columns, its odd columns and its
// sums over each group, so that a row's product is, per group, scale * (q_even . x_even +
// q_odd . x_odd), plus min . sums at the end. G is a multiple of 32 (16 bytes per step).
struct Int4Weights {
  const uint8_t* q;
  const float* scale;
  const float* min;
  int64_t q_stride, s_stride, K, G;
  int64_t prepared_size() const { return K + K / G; }
  void prepare(const float* x, float c, float* out) const {
    float* even = out;
    float* odd = out + K / 2;
    float* sums = out + K;
    for (int64_t i = 0; i < K / 2; ++i) even[i] = c * x[2 * i], odd[i] = c * x[2 * i + 1];
    for (int64_t g = 0; g < K / G; ++g) {
      float t = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) t += c * x[k];
      sums[g] = t;
    }
  }
  // Rows [r0, r0 + R) against NT inputs, sharing each load of the inputs; each row's
  // arithmetic is done in the same order whatever R is. While a block is read, the next
  // block's bytes, scales and minimums are prefetched (rows are contiguous, so the next
  // block starts R rows on). Against one row at a time without prefetching this measured
  // 1.4-1.7x on olmoe-1b-7b's experts, most of it from the prefetching (docs/benchmarks.md).
  template <int R, int NT>
  void rows_block(int64_t e, int64_t r0, const float* const* xs, float* const* outs) const {
    const int64_t groups = K / G, steps = G / 32, half = K / 2;
    const __m512i low = _mm512_set1_epi32(15);
    const uint8_t* qr[R];
    const float* sr[R];
    for (int i = 0; i < R; ++i) {
      qr[i] = q + e * q_stride + (r0 + i) * half;
      sr[i] = scale + e * s_stride + (r0 + i) * groups;
    }
    __m512 acc[R][NT];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
    const float* min0 = min + e * s_stride + r0 * groups;
    for (int64_t g = 0; g < groups; ++g) {
      if (R > 1 && (g & 3) == 0) {  // every fourth group: the next block's scales and minimums
        prefetch(sr[0], (R * groups + R * g) * sizeof(float));
        prefetch(min0, (R * groups + R * g) * sizeof(float));
      }
      __m512 part[R][NT];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < NT; ++j) part[i][j] = _mm512_setzero_ps();
      for (int64_t st = 0; st < steps; ++st) {
        const int64_t c = (g * steps + st) * 16;  // index into the even / odd columns
        if (R > 1)  // one line per step: the next R rows (R = 2: the next 2R) over the block
          prefetch(qr[0], R * half + 4 * c);
        __m512 xe[NT], xo[NT];
        for (int j = 0; j < NT; ++j) {
          xe[j] = _mm512_loadu_ps(xs[j] + c);
          xo[j] = _mm512_loadu_ps(xs[j] + half + c);
        }
        for (int i = 0; i < R; ++i) {
          const __m512i b =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr[i] + c)));
          const __m512 qe = _mm512_cvtepi32_ps(_mm512_and_si512(b, low));
          const __m512 qo = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
          for (int j = 0; j < NT; ++j) {
            part[i][j] = _mm512_fmadd_ps(qe, xe[j], part[i][j]);
            part[i][j] = _mm512_fmadd_ps(qo, xo[j], part[i][j]);
          }
        }
      }
      for (int i = 0; i < R; ++i) {
        const __m512 sg = _mm512_set1_ps(sr[i][g]);
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_fmadd_ps(part[i][j], sg, acc[i][j]);
      }
    }
    for (int i = 0; i < R; ++i) {
      const float* mr = min + e * s_stride + (r0 + i) * groups;
      for (int j = 0; j < NT; ++j)
        outs[j][r0 + i] = _mm512_reduce_add_ps(acc[i][j]) + dot1(mr, xs[j] + K, groups);
    }
  }
  // Rows [lo, hi) against NT inputs, four rows at a time (two from three inputs up, where
  // four would need more than the 32 vector registers).
  template <int NT>
  void rows_nt(int64_t e, int64_t lo, int64_t hi, const float* const* xs, float* const* outs) const {
    constexpr int R = NT <= 2 ? 4 : 2;
    int64_t r = lo;
    for (; r + R <= hi; r += R) rows_block<R, NT>(e, r, xs, outs);
    for (; r < hi; ++r) rows_block<1, NT>(e, r, xs, outs);
  }
  void rows(int64_t e, int64_t lo, int64_t hi, const std::vector<const float*>& xs,
            const std::vector<float*>& outs) const {
    size_t j = 0;  // four inputs at a time (each row's bytes are then read once per four)
    for (; j + 4 <= xs.size(); j += 4) rows_nt<4>(e, lo, hi, &xs[j], &outs[j]);
    switch (xs.size() - j) {
      case 3: rows_nt<3>(e, lo, hi, &xs[j], &outs[j]); break;
      case 2: rows_nt<2>(e, lo, hi, &xs[j], &outs[j]); break;
      case 1: rows_nt<1>(e, lo, hi, &xs[j], &outs[j]); break;
      default: break;
    }
  }
};

// Each token's chosen SwiGLU experts, weighted and summed: x (T, D), experts (T, K) with -1
// for an empty slot, weights (T, K); gate and up (E, F, D) and down (E, D, F) as `W` holds
// them. Returns (T, D).
template <class W>
at::Tensor swiglu_experts(const at::Tensor& x_in, const at::Tensor& experts,
                          const at::Tensor& weights, const W& gate, const W& up, const W& down,
                          int64_t num_experts, int64_t F, bool scale_input) {
  auto x = x_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), K = experts.size(1);
  auto ex = experts.to(at::kLong).contiguous();
  auto wt = weights.to(at::kFloat).contiguous();
  const int64_t* ep = ex.data_ptr<int64_t>();
  const float* wp = wt.data_ptr<float>();
  const float* xp = x.data_ptr<float>();

  // Slots grouped by expert, experts in ascending order (each expert's weights read once).
  std::map<int64_t, std::vector<int64_t>> by_expert;
  for (int64_t s = 0; s < T * K; ++s)
    if (ep[s] >= 0) {
      TORCH_CHECK(ep[s] < num_experts, "expert index out of range");
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

  // Each slot's input as the gate and up weights read it (scaled by its routing weight when
  // that weight applies to the expert's input).
  const int64_t pin = gate.prepared_size(), pdown = down.prepared_size();
  std::vector<float> xin(S * pin), hin(S * pdown);
  for (int64_t j = 0; j < S; ++j)
    gate.prepare(xp + (order[j] / K) * D, scale_input ? wp[order[j]] : 1.0f, &xin[j * pin]);
  std::vector<float> g(S * F), u(S * F);  // gate (then the activation) and up

  // Pass 1: for every used expert, gate row f and up row f for f in the thread's share.
  at::parallel_for(0, U * F, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const float*> xs;
    std::vector<float*> go, uo;
    for (int64_t i = 0; i < U; ++i) {
      const int64_t a = std::max(lo, i * F) - i * F, b = std::min(hi, (i + 1) * F) - i * F;
      if (a >= b) continue;
      xs.clear(), go.clear(), uo.clear();
      for (int64_t j = first[i]; j < first[i + 1]; ++j) {
        xs.push_back(&xin[j * pin]);
        go.push_back(&g[j * F]);
        uo.push_back(&u[j * F]);
      }
      gate.rows(expert[i], a, b, xs, go);
      up.rows(expert[i], a, b, xs, uo);
      for (int64_t j = first[i]; j < first[i + 1]; ++j)
        for (int64_t f = a; f < b; ++f) g[j * F + f] = silu(g[j * F + f]) * u[j * F + f];
    }
  });
  for (int64_t j = 0; j < S; ++j) down.prepare(&g[j * F], 1.0f, &hin[j * pdown]);

  // Pass 2: output rows [lo, hi) of every used expert's down projection, weighted and summed.
  float* op = out.data_ptr<float>();
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
        hs.push_back(&hin[(first[i] + j) * pdown]);
        ys.push_back(y.data() + j * n - lo);
      }
      down.rows(expert[i], lo, hi, hs, ys);
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

void check_float(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 (T, D)");
  TORCH_CHECK(experts.dim() == 2 && weights.sizes() == experts.sizes() &&
                  experts.size(0) == x.size(0),
              "experts and weights must be (T, K)");
}

bool rows_contiguous(const at::Tensor& w) {
  return w.dim() == 3 && w.stride(2) == 1 && w.stride(1) == w.size(2);
}

}  // namespace

// Float32 experts: gate_up (E, 2F, D), each expert's gate rows then its up rows; down (E, D, F).
at::Tensor grouped_swiglu(at::Tensor x, at::Tensor experts, at::Tensor weights,
                          at::Tensor gate_up, at::Tensor down, bool scale_input) {
  check_float(x, experts, weights);
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && down.scalar_type() == at::kFloat,
              "expert weights must be float32");
  TORCH_CHECK(rows_contiguous(gate_up) && rows_contiguous(down),
              "each expert's weight must be contiguous");
  const int64_t D = x.size(1), F = down.size(2), E = gate_up.size(0);
  TORCH_CHECK(gate_up.size(1) == 2 * F && gate_up.size(2) == D && down.size(1) == D &&
                  down.size(0) == E,
              "weight shapes do not match");
  const float* gu = gate_up.data_ptr<float>();
  const Float32Weights gate{gu, gate_up.stride(0), D}, up{gu + F * D, gate_up.stride(0), D};
  const Float32Weights dn{down.data_ptr<float>(), down.stride(0), F};
  return swiglu_experts(x, experts, weights, gate, up, dn, E, F, scale_input);
}

namespace {

Int4Weights int4_weights(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                         const char* name) {
  TORCH_CHECK(q.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat &&
                  min.scalar_type() == at::kFloat,
              name, ": int4 weights are uint8 bytes with float32 scales and minimums");
  TORCH_CHECK(rows_contiguous(q) && rows_contiguous(scale) && rows_contiguous(min) &&
                  scale.strides() == min.strides() && scale.sizes() == min.sizes(),
              name, ": each expert's stored tensors must be contiguous");
  const int64_t K = q.size(2) * 2, groups = scale.size(2);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 32 == 0 &&
                  scale.size(1) == q.size(1) && scale.size(0) == q.size(0),
              name, ": the group size must be a multiple of 32 dividing the input dim");
  return Int4Weights{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), min.data_ptr<float>(),
                     q.stride(0), scale.stride(0), K, K / groups};
}

}  // namespace

// Int4 experts (moekit.quant.formats): each projection as packed bytes, scales and minimums;
// gate and up (E, F, D) and down (E, D, F) in float shape.
at::Tensor grouped_swiglu_int4(at::Tensor x, at::Tensor experts, at::Tensor weights,
                               at::Tensor gate_q, at::Tensor gate_scale, at::Tensor gate_min,
                               at::Tensor up_q, at::Tensor up_scale, at::Tensor up_min,
                               at::Tensor down_q, at::Tensor down_scale, at::Tensor down_min,
                               bool scale_input) {
  check_float(x, experts, weights);
  const Int4Weights gate = int4_weights(gate_q, gate_scale, gate_min, "gate");
  const Int4Weights up = int4_weights(up_q, up_scale, up_min, "up");
  const Int4Weights dn = int4_weights(down_q, down_scale, down_min, "down");
  const int64_t D = x.size(1), F = gate_q.size(1), E = gate_q.size(0);
  TORCH_CHECK(gate.K == D && up.K == D && up_q.sizes() == gate_q.sizes() && dn.K == F &&
                  down_q.size(1) == D && down_q.size(0) == E,
              "weight shapes do not match");
  // One prepared input serves both the gate and the up rows: their groups must agree.
  TORCH_CHECK(up_scale.sizes() == gate_scale.sizes(), "gate and up must have the same groups");
  return swiglu_experts(x, experts, weights, gate, up, dn, E, F, scale_input);
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
  m.def(
      "grouped_swiglu_int4(Tensor x, Tensor experts, Tensor weights, Tensor gate_q, "
      "Tensor gate_scale, Tensor gate_min, Tensor up_q, Tensor up_scale, Tensor up_min, "
      "Tensor down_q, Tensor down_scale, Tensor down_min, bool scale_input) -> Tensor");
}

TORCH_LIBRARY_IMPL(moekit_native, CPU, m) {
  m.impl("grouped_swiglu", &grouped_swiglu);
  m.impl("grouped_swiglu_int4", &grouped_swiglu_int4);
  m.impl("linear", &linear);
}

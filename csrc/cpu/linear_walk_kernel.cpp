#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_helpers.h"

namespace shapcam {
namespace {

// The worth of running logits z[lo..hi): the logit of class c, or its softmax probability
// (max-subtracted so large logits cannot overflow). The float64 path: scalar std::exp.
double worth(const double* z, int64_t lo, int64_t hi, int64_t c, bool softmax) {
  if (!softmax) return z[c];
  const double top = *std::max_element(z + lo, z + hi);
  double total = 0;
  for (int64_t j = lo; j < hi; ++j) total += std::exp(z[j] - top);
  return std::exp(z[c] - top) / total;
}

// The float path, the hot one (float32/half/bf16 logits): plain loops over kLanes fixed lanes,
// which the compiler vectorises, compiled for AVX-512, AVX2+FMA and the baseline and picked at
// load time (target_clones). The lanes fix the reduction order, so a result does not depend on
// the thread count.
constexpr int64_t kLanes = 16;

// exp(x) for x <= 0 (Cephes expf: ~1 ulp); x below -87 gives exp(-87) ~ 1.6e-38, NaN stays NaN.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float k = t - shifter;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^k: k's integer sits in the low bits of t.
  const int32_t scale = (std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(shifter) + 127) << 23;
  return p * std::bit_cast<float>(scale);
}

// z[0..m) += d[0..m) (d may be null: no update) and returns the max of z.
__attribute__((target_clones("avx512f", "avx2,fma", "default"))) float add_and_max(
    float* z, const float* d, int64_t m) {
  float lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = d ? z[j + l] + d[j + l] : z[j + l];
      z[j + l] = v;
      lane[l] = v > lane[l] ? v : lane[l];
    }
  }
  for (int64_t l = 0; j < m; ++j, ++l) {
    const float v = d ? z[j] + d[j] : z[j];
    z[j] = v;
    lane[l] = v > lane[l] ? v : lane[l];
  }
  float top = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) top = lane[l] > top ? lane[l] : top;
  return top;
}

// sum_j exp(z[j] - top).
__attribute__((target_clones("avx512f", "avx2,fma", "default"))) float sum_exp(const float* z,
                                                                              float top,
                                                                              int64_t m) {
  float lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += exp_nonpositive(z[j + l] - top);
  }
  for (int64_t l = 0; j < m; ++j, ++l) lane[l] += exp_nonpositive(z[j] - top);
  // A fixed pairwise tree over the lanes.
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
  }
  return lane[0];
}

// Applies the step d (null: none) to the logits z[0..m) and returns the worth of class c.
inline float step_worth(float* z, const float* d, int64_t m, int64_t c, bool softmax) {
  if (!softmax) {
    if (d) z[c] += d[c];
    return z[c];
  }
  const float top = add_and_max(z, d, m);
  return exp_nonpositive(z[c] - top) / sum_exp(z, top, m);
}

// Walks one permutation order[0..n) from the logits z (num_classes, overwritten) with the
// steps step (n, num_classes): out[t] = the worth after t steps.
template <typename op_t, typename acc_t>
void walk_permutation(op_t* z, const op_t* step, const int64_t* order, int64_t n,
                      int64_t num_classes, int64_t c, bool softmax, acc_t* out) {
  if constexpr (std::is_same_v<op_t, float>) {
    out[0] = static_cast<acc_t>(step_worth(z, nullptr, num_classes, c, softmax));
    for (int64_t t = 0; t < n; ++t) {
      out[t + 1] =
          static_cast<acc_t>(step_worth(z, step + order[t] * num_classes, num_classes, c, softmax));
    }
  } else {
    // A logit needs only its own column.
    const int64_t lo = softmax ? 0 : c, hi = softmax ? num_classes : c + 1;
    out[0] = static_cast<acc_t>(worth(z, lo, hi, c, softmax));
    for (int64_t t = 0; t < n; ++t) {
      const op_t* d = step + order[t] * num_classes;
      for (int64_t j = lo; j < hi; ++j) z[j] += d[j];
      out[t + 1] = static_cast<acc_t>(worth(z, lo, hi, c, softmax));
    }
  }
}

// shapcam::linear_walk_ on the CPU: walks each (b, k) on one thread, in the inputs' precision
// (float for float32/half/bfloat16 logits, vectorised; double for float64), then differences and
// accumulates the worths into phi / phi_sq in their own dtype, deterministically.
void linear_walk_cpu(const at::Tensor& start_logits, const at::Tensor& deltas,
                     const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                     at::Tensor& phi, at::Tensor& phi_sq) {
  check_linear_walk_args(start_logits, deltas, perms, classes, phi, phi_sq);
  check_permutations_cpu(perms);
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_classes = deltas.size(2);
  const int64_t num_perms = perms.size(0);
  check_classes_in_range(classes, num_classes);
  if (batch == 0) return;

  // values[b, k, t]: the worth after t steps of permutation k, differenced like
  // scatter_marginals_ does. The walk runs in the inputs' precision (float for float32, half and
  // bfloat16 logits, double for float64); the values are stored, and differenced and summed into
  // phi / phi_sq, in the accumulators' dtype.
  at::Tensor values = at::empty({batch, num_perms, n + 1}, phi.options());
  const at::ScalarType opmath =
      start_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor start = start_logits.to(opmath).contiguous();
  const at::Tensor step = deltas.to(opmath).contiguous();
  const at::Tensor order = perms.contiguous(), cls = classes.contiguous();
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "linear_walk_", [&] {
    using acc_t = scalar_t;
    acc_t* value = values.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES(opmath, "linear_walk_", [&] {
      using op_t = scalar_t;
      const op_t* start_ptr = start.const_data_ptr<op_t>();
      const op_t* step_ptr = step.const_data_ptr<op_t>();
      const int64_t* order_ptr = order.const_data_ptr<int64_t>();
      const int64_t* cls_ptr = cls.const_data_ptr<int64_t>();
      const int64_t grain =
          std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(n * num_classes, 1));
      at::parallel_for(0, batch * num_perms, grain, [&](int64_t begin, int64_t end) {
        std::vector<op_t> z(num_classes);
        for (int64_t bk = begin; bk < end; ++bk) {
          const int64_t b = bk / num_perms, k = bk % num_perms, c = cls_ptr[b];
          const op_t* s = start_ptr + b * num_classes;
          std::copy(s, s + num_classes, z.data());
          walk_permutation(z.data(), step_ptr + b * n * num_classes, order_ptr + k * n, n,
                           num_classes, c, softmax, value + bk * (n + 1));
        }
      });
    });
  });
  accumulate_marginals_cpu(values, perms, phi, phi_sq);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) { m.impl("linear_walk_", &linear_walk_cpu); }

}  // namespace shapcam

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_helpers.h"

namespace shapcam {
namespace {

// The lane loops below are plain C++ that the compiler vectorises. On x86-64 (ELF: ifunc) the
// float ones are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 and FMA) and the baseline and
// picked at load time (a list "avx2,fma" would make two clones, AVX2 without FMA and FMA
// without AVX2); elsewhere (aarch64, whose NEON is baseline) once, for the baseline ISA.
#if defined(__x86_64__) && defined(__ELF__)
#define SHAPCAM_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SHAPCAM_SIMD_CLONES
#endif

// kLanes fixed lanes fix the reduction order, so a result does not depend on the thread count.
constexpr int64_t kLanes = 16;

// z[0..m) += d[0..m) (d may be null: no update) and returns the max of z.
template <typename op_t>
inline op_t add_and_max_lanes(op_t* z, const op_t* d, int64_t m) {
  op_t lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<op_t>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const op_t v = d ? z[j + l] + d[j + l] : z[j + l];
      z[j + l] = v;
      lane[l] = max_partial(lane[l], v);
    }
  }
  for (int64_t l = 0; j < m; ++j, ++l) {
    const op_t v = d ? z[j] + d[j] : z[j];
    z[j] = v;
    lane[l] = max_partial(lane[l], v);
  }
  op_t top = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) top = max_partial(top, lane[l]);
  return top;
}

// sum_j exp(z[j] - top).
template <typename op_t>
inline op_t sum_exp_lanes(const op_t* z, op_t top, int64_t m) {
  op_t lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = sum_exp_partial(lane[l], z[j + l], top);
  }
  for (int64_t l = 0; j < m; ++j, ++l) lane[l] = sum_exp_partial(lane[l], z[j], top);
  // A fixed pairwise tree over the lanes.
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
  }
  return lane[0];
}

// The float walk, the hot one (float32, float16 and bfloat16 logits): SIMD clones.
SHAPCAM_SIMD_CLONES float add_and_max(float* z, const float* d, int64_t m) {
  return add_and_max_lanes(z, d, m);
}
SHAPCAM_SIMD_CLONES float sum_exp(const float* z, float top, int64_t m) {
  return sum_exp_lanes(z, top, m);
}
// The float64 walk: the same loops, for the baseline ISA (its exp is libm's, not vectorised).
double add_and_max(double* z, const double* d, int64_t m) { return add_and_max_lanes(z, d, m); }
double sum_exp(const double* z, double top, int64_t m) { return sum_exp_lanes(z, top, m); }

// Applies the step d (null: none) to the logits z[0..m) and returns the worth of class c: its
// logit, or its softmax probability. A logit needs only its own column.
template <typename op_t>
inline op_t step_worth(op_t* z, const op_t* d, int64_t m, int64_t c, bool softmax) {
  if (!softmax) {
    if (d) z[c] += d[c];
    return z[c];
  }
  const op_t top = add_and_max(z, d, m);
  return class_probability(z[c], top, sum_exp(z, top, m));
}

// Walks one permutation order[0..n) from the logits z (num_classes, overwritten) with the
// steps step (n, num_classes): out[t] = the worth after t steps.
template <typename op_t, typename acc_t>
void walk_permutation(op_t* z, const op_t* step, const int64_t* order, int64_t n,
                      int64_t num_classes, int64_t c, bool softmax, acc_t* out) {
  out[0] = static_cast<acc_t>(step_worth<op_t>(z, nullptr, num_classes, c, softmax));
  for (int64_t t = 0; t < n; ++t) {
    out[t + 1] = static_cast<acc_t>(
        step_worth(z, step + order[t] * num_classes, num_classes, c, softmax));
  }
}

// shapcam::linear_walk_ on the CPU: walks each (b, k) on one thread in the inputs' opmath type
// (the precision policy in shapcam_math.h), then differences and accumulates the worths into
// phi / phi_sq in their own dtype, deterministically.
void linear_walk_cpu(const at::Tensor& start_logits, const at::Tensor& deltas,
                     const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                     at::Tensor& phi, at::Tensor& phi_sq, int64_t unit_size) {
  check_linear_walk_args(start_logits, deltas, perms, classes, phi, phi_sq, unit_size);
  check_permutations_cpu(perms);
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_classes = deltas.size(2);
  const int64_t num_perms = perms.size(0);
  check_classes_in_range_cpu(classes, num_classes);
  if (batch == 0) return;

  // values[b, k, t]: the worth after t steps of permutation k, in phi's dtype, differenced like
  // scatter_marginals_ does.
  at::Tensor values = at::empty({batch, num_perms, n + 1}, phi.options());
  const at::ScalarType opmath = at::toOpMathType(start_logits.scalar_type());
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
          const ImagePerm<int64_t> row = split_image_perm(bk, num_perms);
          const op_t* s = start_ptr + row.b * num_classes;
          std::copy(s, s + num_classes, z.data());
          walk_permutation(z.data(), step_ptr + row.b * n * num_classes, order_ptr + row.k * n, n,
                           num_classes, cls_ptr[row.b], softmax, value + bk * (n + 1));
        }
      });
    });
  });
  accumulate_marginals_cpu(values, perms, phi, phi_sq, unit_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) { m.impl("linear_walk_", &linear_walk_cpu); }

}  // namespace shapcam

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_helpers.h"

namespace shapcam {
namespace {

// The worth of running logits z[lo..hi): the logit of class c, or its softmax probability
// (max-subtracted so large logits cannot overflow).
template <typename acc_t>
acc_t worth(const acc_t* z, int64_t lo, int64_t hi, int64_t c, bool softmax) {
  if (!softmax) return z[c];
  const acc_t top = *std::max_element(z + lo, z + hi);
  acc_t total = 0;
  for (int64_t j = lo; j < hi; ++j) total += std::exp(z[j] - top);
  return std::exp(z[c] - top) / total;
}

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
  // scatter_marginals_ does.
  at::Tensor values = at::empty({batch, num_perms, n + 1}, phi.options());
  const at::Tensor start = start_logits.contiguous(), step = deltas.contiguous();
  const at::Tensor order = perms.contiguous(), cls = classes.contiguous();
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "linear_walk_", [&] {
    using acc_t = scalar_t;
    acc_t* value = values.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, start.scalar_type(), "linear_walk_", [&] {
          const scalar_t* start_ptr = start.const_data_ptr<scalar_t>();
          const scalar_t* step_ptr = step.const_data_ptr<scalar_t>();
          const int64_t* order_ptr = order.const_data_ptr<int64_t>();
          const int64_t* cls_ptr = cls.const_data_ptr<int64_t>();
          const int64_t grain =
              std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(n * num_classes, 1));
          at::parallel_for(0, batch * num_perms, grain, [&](int64_t begin, int64_t end) {
            std::vector<acc_t> z(num_classes);
            for (int64_t bk = begin; bk < end; ++bk) {
              const int64_t b = bk / num_perms, k = bk % num_perms, c = cls_ptr[b];
              // A logit needs only its own column.
              const int64_t lo = softmax ? 0 : c, hi = softmax ? num_classes : c + 1;
              const scalar_t* s = start_ptr + b * num_classes;
              for (int64_t j = lo; j < hi; ++j) z[j] = static_cast<acc_t>(s[j]);
              acc_t* out = value + bk * (n + 1);
              out[0] = worth(z.data(), lo, hi, c, softmax);
              for (int64_t t = 0; t < n; ++t) {
                const scalar_t* d = step_ptr + (b * n + order_ptr[k * n + t]) * num_classes;
                for (int64_t j = lo; j < hi; ++j) z[j] += static_cast<acc_t>(d[j]);
                out[t + 1] = worth(z.data(), lo, hi, c, softmax);
              }
            }
          });
        });
  });
  accumulate_marginals_cpu(values, perms, phi, phi_sq);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) { m.impl("linear_walk_", &linear_walk_cpu); }

}  // namespace shapcam

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../entry_points.h"
#include "cpu_helpers.h"

namespace shapcam {
namespace {

// Permutations summed per task: the marginals of one are n subtractions, cheap.
constexpr int64_t kPermsPerTask = 64;

// Adds to phi[b, p] the marginal values[b, k, r+1] - values[b, k, r] of every permutation k,
// r = ranks[k, p], and to phi_sq (when defined) the square of each unit's sum of them. values:
// (B, K, n+1) with any strides. Raises ValueError (phi untouched) for a rank outside [0, n).
void scatter_into(const at::Tensor& values, const at::Tensor& ranks, at::Tensor& phi,
                  const at::Tensor& phi_sq, int64_t unit_size) {
  const int64_t batch = values.size(0), num_perms = values.size(1), n = values.size(2) - 1;
  const at::Tensor steps = ranks.contiguous();
  const int64_t* rank = steps.const_data_ptr<int64_t>();
  bool valid = true;
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "scatter_marginals", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, values.scalar_type(), "scatter_marginals", [&] {
          const scalar_t* value = values.const_data_ptr<scalar_t>();
          const int64_t vb = values.stride(0), vk = values.stride(1), vt = values.stride(2);
          const auto add_row = [&](int64_t b, int64_t k, acc_t* unit_sum) {
            const scalar_t* v = value + b * vb + k * vk;
            const int64_t* r = rank + k * n;
            for (int64_t p = 0; p < n; ++p) {
              const int64_t t = r[p];
              if (C10_UNLIKELY(!in_range(t, n))) return false;
              unit_sum[p] += marginal(static_cast<acc_t>(v[t * vt]),
                                      static_cast<acc_t>(v[(t + 1) * vt]));
            }
            return true;
          };
          valid = accumulate_units_cpu<acc_t>(batch, num_perms, n, unit_size, kPermsPerTask,
                                              add_row, phi, phi_sq);
        });
  });
  TORCH_CHECK_VALUE(valid, SHAPCAM_RANK_OUT_OF_RANGE);
}

at::Tensor scatter_marginals_cpu(const at::Tensor& values, const at::Tensor& ranks,
                                 std::optional<at::ScalarType> dtype) {
  return scatter_marginals_with(scatter_into, values, ranks, dtype);
}

void scatter_marginals_inplace_cpu(const at::Tensor& values, const at::Tensor& ranks,
                                   at::Tensor& phi, at::Tensor& phi_sq, int64_t unit_size) {
  scatter_marginals_inplace_with(scatter_into, values, ranks, phi, phi_sq, unit_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) {
  m.impl("scatter_marginals", &scatter_marginals_cpu);
  m.impl("scatter_marginals_", &scatter_marginals_inplace_cpu);
}

}  // namespace shapcam

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "cpu_helpers.h"

namespace shapcam {

// Permutations summed per task, whole units of them. Fixed, so the order of the sums is too.
constexpr int64_t kPermsPerTask = 64;

void accumulate_marginals_cpu(const at::Tensor& values, const at::Tensor& perms, at::Tensor& phi,
                              at::Tensor& phi_sq, int64_t unit_size) {
  const int64_t batch = values.size(0), num_perms = values.size(1), n = values.size(2) - 1;
  if (batch * n == 0) return;
  const at::Tensor order = perms.contiguous();
  const int64_t* position = order.const_data_ptr<int64_t>();
  const int64_t per_task = (kPermsPerTask + unit_size - 1) / unit_size * unit_size;
  const int64_t blocks = (num_perms + per_task - 1) / per_task;
  // partial[b, block] holds that block's sums of d and of its units' squared sums, per position.
  const at::Tensor partial = at::zeros({batch, blocks, 2, n}, phi.options());
  std::atomic<bool> valid{true};
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "scatter_marginals_", [&] {
    using acc_t = scalar_t;
    acc_t* partial_ptr = partial.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, values.scalar_type(), "scatter_marginals_", [&] {
          const scalar_t* value = values.const_data_ptr<scalar_t>();
          const int64_t vb = values.stride(0), vk = values.stride(1), vt = values.stride(2);
          const int64_t grain = kSerialWork / (per_task * n) + 1;
          at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
            // seen[p] == b*K + k once permutation k has added p (for image b).
            std::vector<int64_t> seen(n, -1);
            std::vector<acc_t> unit_sum(n, 0);
            for (int64_t task = begin; task < end && valid; ++task) {
              const int64_t b = task / blocks, first = task % blocks * per_task;
              acc_t* s = partial_ptr + task * 2 * n;
              acc_t* s2 = s + n;
              for (int64_t k = first; k < std::min(first + per_task, num_perms); ++k) {
                // Walking each permutation in order reads values and perms sequentially.
                const scalar_t* v = value + b * vb + k * vk;
                const int64_t* p = position + k * n;
                const int64_t stamp = b * num_perms + k;
                acc_t before = static_cast<acc_t>(v[0]);
                for (int64_t t = 0; t < n; ++t) {
                  const int64_t q = p[t];
                  if (C10_UNLIKELY(static_cast<uint64_t>(q) >= static_cast<uint64_t>(n) ||
                                   seen[q] == stamp)) {
                    valid = false;
                    return;
                  }
                  seen[q] = stamp;
                  const acc_t after = static_cast<acc_t>(v[(t + 1) * vt]);
                  add_marginal(before, after, unit_sum[q]);
                  before = after;
                }
                if ((k + 1) % unit_size == 0) {
                  for (int64_t q = 0; q < n; ++q) close_unit(unit_sum[q], s[q], s2[q]);
                }
              }
            }
          });
        });
    TORCH_CHECK_VALUE(valid, kNotPermutation);
    acc_t* sum = phi.data_ptr<acc_t>();
    acc_t* sum_sq = phi_sq.data_ptr<acc_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t q = 0; q < n; ++q) {
        acc_t s = 0, s2 = 0;
        for (int64_t block = 0; block < blocks; ++block) {
          s += partial_ptr[((b * blocks + block) * 2) * n + q];
          s2 += partial_ptr[((b * blocks + block) * 2 + 1) * n + q];
        }
        sum[b * phi.stride(0) + q * phi.stride(1)] += s;
        sum_sq[b * phi_sq.stride(0) + q * phi_sq.stride(1)] += s2;
      }
    }
  });
}

namespace {

void scatter_marginals_cpu(const at::Tensor& values, const at::Tensor& perms, at::Tensor& phi,
                           at::Tensor& phi_sq, int64_t unit_size) {
  check_scatter_marginals_args(values, perms, phi, phi_sq, unit_size);
  const bool batched = values.dim() == 3;
  at::Tensor sum = batched ? phi : phi.unsqueeze(0);
  at::Tensor sum_sq = batched ? phi_sq : phi_sq.unsqueeze(0);
  accumulate_marginals_cpu(batched ? values : values.unsqueeze(0), perms, sum, sum_sq, unit_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) { m.impl("scatter_marginals_", &scatter_marginals_cpu); }

}  // namespace shapcam

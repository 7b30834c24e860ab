#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda_helpers.h"

namespace shapcam {
namespace {

constexpr int kWarp = 32;

// One warp per (b, p), which owns phi[b, p]: no atomics. Lane l sums units l, l+32, ... in
// order, then the lanes' partials combine in a fixed butterfly: deterministic.
template <typename scalar_t, typename acc_t>
__global__ void accumulate_marginals_kernel(const scalar_t* value, int64_t vb, int64_t vk,
                                            int64_t vt, const int64_t* rank, acc_t* sum, int64_t fb,
                                            int64_t fp, acc_t* sum_sq, int64_t qb, int64_t qp,
                                            int64_t batch, int64_t num_perms, int64_t n,
                                            int64_t unit_size) {
  const int lane = threadIdx.x % kWarp;
  const auto add = [](acc_t x, acc_t y) { return x + y; };
  // The loop bounds are the same for the whole warp, as warp_allreduce needs.
  for (int64_t i = grid_start<int64_t>() / kWarp; i < batch * n;
       i += grid_stride<int64_t>() / kWarp) {
    const int64_t b = i / n, p = i - b * n;
    acc_t s = 0, s2 = 0;
    for (int64_t unit = lane; unit * unit_size < num_perms; unit += kWarp) {
      acc_t unit_sum = 0;
      for (int64_t k = unit * unit_size; k < (unit + 1) * unit_size; ++k) {
        const scalar_t* v = value + b * vb + k * vk + rank[k * n + p] * vt;
        add_marginal(static_cast<acc_t>(v[0]), static_cast<acc_t>(v[vt]), unit_sum);
      }
      close_unit(unit_sum, s, s2);
    }
    s = warp_allreduce(s, add);
    s2 = warp_allreduce(s2, add);
    if (lane == 0) {
      sum[b * fb + p * fp] += s;
      sum_sq[b * qb + p * qp] += s2;
    }
  }
}

void scatter_marginals_cuda(const at::Tensor& values, const at::Tensor& perms, at::Tensor& phi,
                            at::Tensor& phi_sq, int64_t unit_size) {
  check_scatter_marginals_args(values, perms, phi, phi_sq, unit_size);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor ranks = permutation_ranks_cuda(perms);  // validates perms on the device
  const bool batched = values.dim() == 3;
  at::Tensor sum = batched ? phi : phi.unsqueeze(0),
             sum_sq = batched ? phi_sq : phi_sq.unsqueeze(0);
  accumulate_marginals_cuda(batched ? values : values.unsqueeze(0), ranks, sum, sum_sq, unit_size);
}

}  // namespace

void accumulate_marginals_cuda(const at::Tensor& values, const at::Tensor& ranks, at::Tensor& phi,
                               at::Tensor& phi_sq, int64_t unit_size) {
  const int64_t batch = values.size(0), num_perms = values.size(1), n = values.size(2) - 1;
  if (batch * n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "scatter_marginals_", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, values.scalar_type(), "scatter_marginals_", [&] {
          accumulate_marginals_kernel<scalar_t, acc_t>
              <<<blocks_for(batch * n * kWarp), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  values.const_data_ptr<scalar_t>(), values.stride(0), values.stride(1),
                  values.stride(2), ranks.const_data_ptr<int64_t>(), phi.data_ptr<acc_t>(),
                  phi.stride(0), phi.stride(1), phi_sq.data_ptr<acc_t>(), phi_sq.stride(0),
                  phi_sq.stride(1), batch, num_perms, n, unit_size);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
}

TORCH_LIBRARY_IMPL(shapcam, CUDA, m) { m.impl("scatter_marginals_", &scatter_marginals_cuda); }

}  // namespace shapcam

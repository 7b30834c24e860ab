#include <ATen/ops/full.h>
#include <torch/library.h>

#include "cuda_helpers.h"

namespace shapcam {
namespace {

// ranks[k, p] = t where perms[k, t] = p. ranks starts at -1; a value out of range, or one seen
// twice in its row, fails a device-side assert: a row of n values in [0, n) without repeats is a
// permutation. The atomic exchange is a flag, not a sum: it tells the second writer of a position
// that it came second. Valid rows write each element once, so the ranks are deterministic.
__global__ void scatter_ranks_kernel(const int64_t* perms, int64_t* ranks, int64_t total,
                                     int64_t n) {
  for (int64_t i = grid_start<int64_t>(); i < total; i += grid_stride<int64_t>()) {
    const int64_t k = i / n, p = perms[i];
    CUDA_KERNEL_ASSERT_MSG(0 <= p && p < n, SHAPCAM_NOT_PERMUTATION);
    const auto previous = atomicExch(reinterpret_cast<unsigned long long*>(ranks + k * n + p),
                                     static_cast<unsigned long long>(i - k * n));
    CUDA_KERNEL_ASSERT_MSG(previous == static_cast<unsigned long long>(-1),
                           SHAPCAM_NOT_PERMUTATION);
  }
}

// Checks on the device that every row of perms is a permutation of 0..n-1 (a device-side assert
// otherwise): raising a ValueError as the CPU does would need a host sync. Stream-ordered before
// the kernels that read the ranks, so none of them runs on a bad permutation.
at::Tensor permutation_ranks_cuda(const at::Tensor& perms) {
  check_permutation_ranks_args(perms);
  const c10::cuda::CUDAGuard guard(perms.device());
  const at::Tensor order = perms.contiguous();
  at::Tensor ranks = at::full(order.sizes(), -1, order.options());
  const int64_t total = order.numel();
  if (total == 0) return ranks;
  scatter_ranks_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      order.const_data_ptr<int64_t>(), ranks.data_ptr<int64_t>(), total, order.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ranks;
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CUDA, m) { m.impl("permutation_ranks", &permutation_ranks_cuda); }

}  // namespace shapcam

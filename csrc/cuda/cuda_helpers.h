// Helpers shared by the CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>

#include "../checks.h"
#include "../shapcam_math.h"

namespace shapcam {

constexpr int kThreads = 256;  // a multiple of the warp size, as block_allreduce needs

// Blocks for `work` items; the grid-stride loops cover whatever a capped grid leaves over.
inline int blocks_for(int64_t work, int64_t max_blocks = 65535) {
  return static_cast<int>(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, max_blocks));
}

template <typename index_t>
__device__ __forceinline__ index_t grid_start() {
  return static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +
         static_cast<index_t>(threadIdx.x);
}

template <typename index_t>
__device__ __forceinline__ index_t grid_stride() {
  return static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x);
}

// Every lane of the warp gets op over all lanes' values, bit-identical (a butterfly, so each lane
// combines the same pairs). All 32 lanes must call it.
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T value, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// Every thread of the block gets op over all threads' values, bit-identical and in a fixed
// order (within warps, then across the warps' partials). All threads must call it.
template <typename T, typename Op>
__device__ T block_allreduce(T value, Op op, T identity, T* scratch /* [32] */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  value = warp_allreduce(value, op);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = warp_allreduce(lane < warps ? scratch[lane] : identity, op);
  __syncthreads();  // scratch is reused by the next call
  return value;
}

// ranks[k, p] = t where perms[k, t] = p. ranks starts at -1; a value out of range, or one seen
// twice in its row (the atomic exchange returns the step that wrote it first), fails a
// device-side assert. A row of n values in [0, n) without repeats is a permutation.
static __global__ void scatter_ranks_kernel(const int64_t* perms, int64_t* ranks, int64_t total,
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

// ranks[k, p] = the step at which permutation k adds position p. Checks on the device that every
// row of perms is a permutation of 0..n-1 (a device-side assert otherwise): raising a ValueError
// as the CPU does would need a host sync. Stream-ordered before the kernels that read the ranks,
// so none of them runs on a bad permutation.
inline at::Tensor permutation_ranks_cuda(const at::Tensor& perms) {
  const at::Tensor order = perms.contiguous();
  at::Tensor ranks = at::full(order.sizes(), -1, order.options());
  const int64_t total = order.numel();
  if (total == 0) return ranks;
  scatter_ranks_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      order.const_data_ptr<int64_t>(), ranks.data_ptr<int64_t>(), total, order.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ranks;
}

// Adds sum_k d to phi[b, p] and the square of each unit's sum of d to phi_sq[b, p], where d is
// the marginal of position p along permutation k: values[b, k, rank + 1] - values[b, k, rank],
// and a unit is unit_size consecutive permutations. values is (B, K, n+1) and phi, phi_sq are
// (B, n) with any strides. The sums over k have a fixed order: deterministic.
void accumulate_marginals_cuda(const at::Tensor& values, const at::Tensor& ranks, at::Tensor& phi,
                               at::Tensor& phi_sq, int64_t unit_size);

}  // namespace shapcam

// Helpers shared by the CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
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

// Marginals read by step: values[b, k, r+1] - values[b, k, r], r = ranks[k, p] (a device-side
// assert for a rank outside [0, n)). values (B, K, n+1) with any strides.
template <typename scalar_t, typename acc_t>
struct RankedMarginal {
  const scalar_t* value;
  int64_t vb, vk, vt;
  const int64_t* rank;
  int64_t n;

  __device__ acc_t operator()(int64_t b, int64_t k, int64_t p) const {
    const int64_t r = rank[k * n + p];
    CUDA_KERNEL_ASSERT_MSG(0 <= r && r < n, SHAPCAM_RANK_OUT_OF_RANGE);
    const scalar_t* v = value + b * vb + k * vk + r * vt;
    return marginal(static_cast<acc_t>(v[0]), static_cast<acc_t>(v[vt]));
  }
};

// Marginals a walk has already placed by position: marginals[b, k, p], contiguous (B, K, n).
template <typename acc_t>
struct PlacedMarginal {
  const acc_t* marginals;
  int64_t num_perms, n;

  __device__ acc_t operator()(int64_t b, int64_t k, int64_t p) const {
    return marginals[(b * num_perms + k) * n + p];
  }
};

constexpr int kWarp = 32;

// One warp per (b, p), which owns phi[b, p]: no atomics. Lane l sums units l, l+32, ... in
// order, then the lanes' partials combine in a fixed butterfly: deterministic. sum_sq may be null
// (the out-of-place ops keep no squares).
template <typename acc_t, typename Marginal>
__global__ void accumulate_units_kernel(Marginal marginal_of, acc_t* sum, int64_t fb, int64_t fp,
                                        acc_t* sum_sq, int64_t qb, int64_t qp, int64_t batch,
                                        int64_t num_perms, int64_t n, int64_t unit_size) {
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
        unit_sum += marginal_of(b, k, p);
      }
      close_unit(unit_sum, s, sum_sq != nullptr ? &s2 : nullptr);
    }
    s = warp_allreduce(s, add);
    s2 = warp_allreduce(s2, add);
    if (lane == 0) {
      sum[b * fb + p * fp] += s;
      if (sum_sq != nullptr) sum_sq[b * qb + p * qp] += s2;
    }
  }
}

// Adds to phi[b, p] the sum over k of marginal_of(b, k, p), and to phi_sq[b, p], when defined,
// the square of each unit's sum of them (a unit: unit_size consecutive permutations). phi,
// phi_sq: (B, n) with any strides. The sums over k have a fixed order: deterministic.
template <typename acc_t, typename Marginal>
void accumulate_units_cuda(const Marginal& marginal_of, at::Tensor& phi, const at::Tensor& phi_sq,
                           int64_t num_perms, int64_t unit_size) {
  const int64_t batch = phi.size(0), n = phi.size(1);
  if (batch * n == 0) return;
  const bool squares = phi_sq.defined();
  accumulate_units_kernel<acc_t, Marginal>
      <<<blocks_for(batch * n * kWarp), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          marginal_of, phi.data_ptr<acc_t>(), phi.stride(0), phi.stride(1),
          squares ? phi_sq.data_ptr<acc_t>() : nullptr, squares ? phi_sq.stride(0) : 0,
          squares ? phi_sq.stride(1) : 0, batch, num_perms, n, unit_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace shapcam

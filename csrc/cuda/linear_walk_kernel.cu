#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda_helpers.h"

namespace shapcam {
namespace {

constexpr int64_t kMaxWalkBlocks = 2048;  // enough to fill an H100/H200; bounds the workspace

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }

// One block walks permutation k for image b, the running logits z[lo..hi) spread over its
// threads (in a per-block workspace row, each element touched by one thread only). values[b, k, t]
// gets the worth after t steps: the logit of class c or its max-subtracted softmax probability.
template <typename scalar_t, typename acc_t>
__global__ void linear_walk_kernel(const scalar_t* start, const scalar_t* deltas,
                                   const int64_t* perms, const int64_t* classes, bool softmax,
                                   acc_t* workspace, acc_t* values, int64_t batch,
                                   int64_t num_perms, int64_t n, int64_t num_classes) {
  __shared__ acc_t scratch[32];
  acc_t* z = workspace + blockIdx.x * num_classes;
  for (int64_t bk = blockIdx.x; bk < batch * num_perms; bk += gridDim.x) {
    const int64_t b = bk / num_perms, k = bk - b * num_perms, c = classes[b];
    // A logit needs only its own column.
    const int64_t lo = softmax ? 0 : c, hi = softmax ? num_classes : c + 1;
    // The thread holding z[c] computes the worth: it alone writes z[c].
    const bool owner = threadIdx.x == (c - lo) % blockDim.x;
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      z[j] = static_cast<acc_t>(start[b * num_classes + j]);
    }
    for (int64_t t = 0; t <= n; ++t) {
      if (t > 0) {
        const scalar_t* d = deltas + (b * n + perms[k * n + t - 1]) * num_classes;
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
          z[j] += static_cast<acc_t>(d[j]);
        }
      }
      acc_t worth = 0;
      if (softmax) {
        acc_t top = -INFINITY;
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) top = z[j] > top ? z[j] : top;
        top = block_allreduce(
            top, [](acc_t x, acc_t y) { return x > y ? x : y; }, acc_t(-INFINITY), scratch);
        acc_t total = 0;
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) total += exp_(z[j] - top);
        total = block_allreduce(total, [](acc_t x, acc_t y) { return x + y; }, acc_t(0), scratch);
        if (owner) worth = exp_(z[c] - top) / total;
      } else if (owner) {
        worth = z[c];
      }
      if (owner) values[bk * (n + 1) + t] = worth;
    }
  }
}

void linear_walk_cuda(const at::Tensor& start_logits, const at::Tensor& deltas,
                      const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                      at::Tensor& phi, at::Tensor& phi_sq) {
  check_linear_walk_args(start_logits, deltas, perms, classes, phi, phi_sq);
  const c10::cuda::CUDAGuard guard(phi.device());
  const at::Tensor ranks = permutation_ranks_cuda(perms);
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_classes = deltas.size(2);
  const int64_t num_perms = perms.size(0);
  check_classes_in_range(classes, num_classes);
  if (batch == 0) return;

  at::Tensor values = at::empty({batch, num_perms, n + 1}, phi.options());
  const int64_t blocks = std::min(batch * num_perms, kMaxWalkBlocks);
  at::Tensor workspace = at::empty({blocks, num_classes}, phi.options());
  const at::Tensor start = start_logits.contiguous(), step = deltas.contiguous();
  const at::Tensor order = perms.contiguous(), cls = classes.contiguous();
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "linear_walk_", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, start.scalar_type(), "linear_walk_", [&] {
          linear_walk_kernel<scalar_t, acc_t>
              <<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  start.const_data_ptr<scalar_t>(), step.const_data_ptr<scalar_t>(),
                  order.const_data_ptr<int64_t>(), cls.const_data_ptr<int64_t>(), softmax,
                  workspace.data_ptr<acc_t>(), values.data_ptr<acc_t>(), batch, num_perms, n,
                  num_classes);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  accumulate_marginals_cuda(values, ranks, phi, phi_sq);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CUDA, m) { m.impl("linear_walk_", &linear_walk_cuda); }

}  // namespace shapcam

// The walk kernel shared by linear_walk (its forward) and linear_walk_backward (which records
// the walk's softmax statistics before walking every class column again).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include "cuda_helpers.h"

namespace shapcam {

constexpr int64_t kMaxWalkBlocks = 2048;  // enough to fill an H100/H200; bounds the workspace

// What the softmax backward needs of each step of the forward walk, per (b, k, t).
template <typename op_t>
struct StepRecord {
  op_t top, total, worth;  // the max of the logits, the sum of exp(z - top), the worth
};

// One block walks permutation k for image b, the running logits z[lo..hi) spread over its
// threads (in a per-block workspace row, each element touched by one thread only), in op_t, the
// inputs' opmath type (the precision policy in shapcam_math.h). The thread holding z[c] owns
// the worth: when `marginals` is set, it adds each step's marginal, in phi's dtype, to
// marginals[b, k, p] (zeroed by the caller) at the position p the step adds; when `record` is
// set (softmax only), it records every step's StepRecord. A position outside [0, n) or a class
// outside [0, M) fails a device-side assert.
template <typename scalar_t, typename op_t, typename acc_t>
__global__ void linear_walk_kernel(const scalar_t* start, const scalar_t* deltas,
                                   const int64_t* perms, const int64_t* classes, bool softmax,
                                   op_t* workspace, acc_t* marginals, StepRecord<op_t>* record,
                                   int64_t batch, int64_t num_perms, int64_t n,
                                   int64_t num_classes) {
  __shared__ op_t scratch[32];
  op_t* z = workspace + static_cast<int64_t>(blockIdx.x) * num_classes;
  // The loop bounds are the same for the whole block, as block_allreduce needs.
  for (int64_t bk = blockIdx.x; bk < batch * num_perms; bk += gridDim.x) {
    const ImagePerm<int64_t> row = split_image_perm(bk, num_perms);
    const int64_t c = classes[row.b];
    CUDA_KERNEL_ASSERT_MSG(0 <= c && c < num_classes, SHAPCAM_CLASS_OUT_OF_RANGE);
    // A logit needs only its own column.
    const int64_t lo = softmax ? 0 : c, hi = softmax ? num_classes : c + 1;
    const bool owner = threadIdx.x == (c - lo) % blockDim.x;
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      z[j] = static_cast<op_t>(start[row.b * num_classes + j]);
    }
    acc_t before = 0;
    for (int64_t t = 0; t <= n; ++t) {
      int64_t entered = -1;
      if (t > 0) {
        entered = perms[row.k * n + t - 1];
        CUDA_KERNEL_ASSERT_MSG(0 <= entered && entered < n, SHAPCAM_PERM_OUT_OF_RANGE);
        const scalar_t* d = deltas + (row.b * n + entered) * num_classes;
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
          z[j] += static_cast<op_t>(d[j]);
        }
      }
      op_t worth = 0, top = 0, total = 0;
      if (softmax) {
        top = -INFINITY;
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) top = max_partial(top, z[j]);
        top = block_allreduce(
            top, [](op_t x, op_t y) { return max_partial(x, y); }, op_t(-INFINITY), scratch);
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
          total = sum_exp_partial(total, z[j], top);
        }
        total = block_allreduce(total, [](op_t x, op_t y) { return x + y; }, op_t(0), scratch);
        if (owner) worth = class_probability(z[c], top, total);
      } else if (owner) {
        worth = z[c];
      }
      if (owner && marginals != nullptr) {
        const acc_t after = static_cast<acc_t>(worth);
        if (t > 0) marginals[bk * n + entered] += marginal(before, after);
        before = after;
      }
      if (owner && record != nullptr) record[bk * (n + 1) + t] = {top, total, worth};
    }
  }
}

// Launches linear_walk_kernel over every (b, k), on the current stream.
template <typename acc_t>
void launch_linear_walk(const at::Tensor& start_logits, const at::Tensor& deltas,
                        const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                        acc_t* marginals, void* record) {
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_classes = deltas.size(2);
  const int64_t num_perms = perms.size(0);
  if (batch * num_perms == 0) return;
  const int64_t blocks = std::min(batch * num_perms, kMaxWalkBlocks);
  const at::Tensor start = start_logits.contiguous(), step = deltas.contiguous();
  const at::Tensor order = perms.contiguous(), cls = classes.contiguous();
  at::Tensor workspace = at::empty({blocks, num_classes},
                                   start.options().dtype(at::toOpMathType(start.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, start.scalar_type(), "linear_walk", [&] {
        using op_t = at::opmath_type<scalar_t>;
        linear_walk_kernel<scalar_t, op_t, acc_t>
            <<<static_cast<int>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                start.const_data_ptr<scalar_t>(), step.const_data_ptr<scalar_t>(),
                order.const_data_ptr<int64_t>(), cls.const_data_ptr<int64_t>(), softmax,
                workspace.data_ptr<op_t>(), marginals, static_cast<StepRecord<op_t>*>(record),
                batch, num_perms, n, num_classes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace shapcam

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda_helpers.h"

namespace shapcam {
namespace {

constexpr int64_t kMaxWalkBlocks = 2048;  // enough to fill an H100/H200; bounds the workspace

// One block walks permutation k for image b, the running logits z[lo..hi) spread over its
// threads (in a per-block workspace row, each element touched by one thread only), in op_t, the
// inputs' opmath type (the precision policy in shapcam_math.h). values[b, k, t] gets the worth
// after t steps, in phi's dtype: the logit of class c or its softmax probability.
template <typename scalar_t, typename op_t, typename acc_t>
__global__ void linear_walk_kernel(const scalar_t* start, const scalar_t* deltas,
                                   const int64_t* perms, const int64_t* classes, bool softmax,
                                   op_t* workspace, acc_t* values, int64_t batch,
                                   int64_t num_perms, int64_t n, int64_t num_classes) {
  __shared__ op_t scratch[32];
  op_t* z = workspace + static_cast<int64_t>(blockIdx.x) * num_classes;
  // The loop bounds are the same for the whole block, as block_allreduce needs.
  for (int64_t bk = blockIdx.x; bk < batch * num_perms; bk += gridDim.x) {
    const ImagePerm<int64_t> row = split_image_perm(bk, num_perms);
    const int64_t c = classes[row.b];
    CUDA_KERNEL_ASSERT_MSG(0 <= c && c < num_classes,
                           "classes must lie in [0, M), the columns of start_logits");
    // A logit needs only its own column.
    const int64_t lo = softmax ? 0 : c, hi = softmax ? num_classes : c + 1;
    // The thread holding z[c] computes the worth: it alone writes z[c].
    const bool owner = threadIdx.x == (c - lo) % blockDim.x;
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
      z[j] = static_cast<op_t>(start[row.b * num_classes + j]);
    }
    for (int64_t t = 0; t <= n; ++t) {
      if (t > 0) {
        const scalar_t* d = deltas + (row.b * n + perms[row.k * n + t - 1]) * num_classes;
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
          z[j] += static_cast<op_t>(d[j]);
        }
      }
      op_t worth = 0;
      if (softmax) {
        op_t top = -INFINITY;
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) top = max_partial(top, z[j]);
        top = block_allreduce(
            top, [](op_t x, op_t y) { return max_partial(x, y); }, op_t(-INFINITY), scratch);
        op_t total = 0;
        for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
          total = sum_exp_partial(total, z[j], top);
        }
        total = block_allreduce(total, [](op_t x, op_t y) { return x + y; }, op_t(0), scratch);
        if (owner) worth = class_probability(z[c], top, total);
      } else if (owner) {
        worth = z[c];
      }
      if (owner) values[bk * (n + 1) + t] = static_cast<acc_t>(worth);
    }
  }
}

void linear_walk_cuda(const at::Tensor& start_logits, const at::Tensor& deltas,
                      const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                      at::Tensor& phi, at::Tensor& phi_sq, int64_t unit_size) {
  check_linear_walk_args(start_logits, deltas, perms, classes, phi, phi_sq, unit_size);
  const c10::cuda::CUDAGuard guard(start_logits.device());
  // Validates perms on the device; classes are checked by the walk kernel.
  const at::Tensor ranks = permutation_ranks_cuda(perms);
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_classes = deltas.size(2);
  const int64_t num_perms = perms.size(0);
  if (batch == 0) return;

  at::Tensor values = at::empty({batch, num_perms, n + 1}, phi.options());
  const int64_t blocks = std::min(batch * num_perms, kMaxWalkBlocks);
  const at::Tensor start = start_logits.contiguous(), step = deltas.contiguous();
  const at::Tensor order = perms.contiguous(), cls = classes.contiguous();
  at::Tensor workspace = at::empty({blocks, num_classes},
                                   start.options().dtype(at::toOpMathType(start.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "linear_walk_", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, start.scalar_type(), "linear_walk_", [&] {
          using op_t = at::opmath_type<scalar_t>;
          linear_walk_kernel<scalar_t, op_t, acc_t>
              <<<static_cast<int>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  start.const_data_ptr<scalar_t>(), step.const_data_ptr<scalar_t>(),
                  order.const_data_ptr<int64_t>(), cls.const_data_ptr<int64_t>(), softmax,
                  workspace.data_ptr<op_t>(), values.data_ptr<acc_t>(), batch, num_perms, n,
                  num_classes);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  accumulate_marginals_cuda(values, ranks, phi, phi_sq, unit_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CUDA, m) { m.impl("linear_walk_", &linear_walk_cuda); }

}  // namespace shapcam

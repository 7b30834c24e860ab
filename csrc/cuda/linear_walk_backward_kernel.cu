#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../entry_points.h"
#include "linear_walk_common.cuh"

namespace shapcam {
namespace {

constexpr int64_t kBackwardThreads = 1 << 16;  // (chunk, image, class) items to aim for
constexpr int64_t kMaxPartialBytes = int64_t{256} << 20;  // bounds the chunks' partial sums

// One thread per (chunk s, image b, class j) walks column j of the logits along the chunk's
// permutations, in the forward's order of additions, and takes each step's softmax statistics
// from `record`: w_t = a_t dv_t/dz_tj (shapcam_math.h). It writes the chunk's gradient of
// start_logits[b, j], sum_t w_t over its permutations, to start_part[s, b, j] and, when
// deltas_part is set, that of deltas[b, p, j] to deltas_part[s, b, p, j] (zeroed): the sum of
// w_t from the step at which p enters, as the chunk's total minus the sum before it. Each
// thread owns its column: no atomics, and a fixed order of sums.
template <typename scalar_t, typename op_t, typename acc_t>
__global__ void linear_walk_backward_kernel(const acc_t* grad_phi, const scalar_t* start,
                                            const scalar_t* deltas, const int64_t* perms,
                                            const int64_t* classes, bool softmax,
                                            const StepRecord<op_t>* record, acc_t* start_part,
                                            acc_t* deltas_part, int64_t batch, int64_t num_perms,
                                            int64_t n, int64_t num_classes, int64_t chunks,
                                            int64_t per_chunk) {
  for (int64_t i = grid_start<int64_t>(); i < chunks * batch * num_classes;
       i += grid_stride<int64_t>()) {
    const int64_t sb = i / num_classes, j = i - sb * num_classes, b = sb % batch, s = sb / batch;
    const int64_t c = classes[b];
    CUDA_KERNEL_ASSERT_MSG(0 <= c && c < num_classes, SHAPCAM_CLASS_OUT_OF_RANGE);
    acc_t* gd = deltas_part != nullptr ? deltas_part + sb * n * num_classes + j : nullptr;
    const acc_t* g = grad_phi + b * n;
    acc_t gs = 0;
    // A logit worth moves with its own column only.
    const int64_t first = s * per_chunk, last = softmax || j == c ? first + per_chunk : first;
    for (int64_t k = first; k < last && k < num_perms; ++k) {
      const int64_t* order = perms + k * n;
      const StepRecord<op_t>* steps = softmax ? record + (b * num_perms + k) * (n + 1) : nullptr;
      op_t z = static_cast<op_t>(start[b * num_classes + j]);
      acc_t w = 0;
      for (int64_t t = 0; t <= n; ++t) {
        const int64_t entered = t > 0 ? order[t - 1] : -1, next = t < n ? order[t] : -1;
        CUDA_KERNEL_ASSERT_MSG(t == n || (0 <= next && next < n), SHAPCAM_PERM_OUT_OF_RANGE);
        if (t > 0) {
          z += static_cast<op_t>(deltas[(b * n + entered) * num_classes + j]);
          if (gd != nullptr) gd[entered * num_classes] -= w;
        }
        const acc_t a = worth_cotangent(t > 0 ? g[entered] : acc_t(0), t < n ? g[next] : acc_t(0));
        if (softmax) {
          const StepRecord<op_t> r = steps[t];
          const acc_t q = static_cast<acc_t>(class_probability(z, r.top, r.total));
          w += softmax_worth_gradient(a * static_cast<acc_t>(r.worth), q, j == c);
        } else {
          w += a;
        }
      }
      gs += w;
    }
    for (int64_t p = 0; gd != nullptr && p < n; ++p) gd[p * num_classes] += gs;
    start_part[sb * num_classes + j] = gs;
  }
}

// The CUDA linear_walk_backward (see the CPU kernel for the contract): the forward walk again,
// recording each step's softmax statistics, then one thread per (chunk, image, class); the
// chunks' partial sums are added by at::sum (deterministic). Never syncs with the host.
std::tuple<at::Tensor, at::Tensor> linear_walk_backward_cuda(
    const at::Tensor& grad_phi, const at::Tensor& start_logits, const at::Tensor& deltas,
    const at::Tensor& perms, const at::Tensor& classes, bool softmax,
    std::array<bool, 2> output_mask) {
  check_linear_walk_backward_args(grad_phi, start_logits, deltas, perms, classes);
  const c10::cuda::CUDAGuard guard(start_logits.device());
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_classes = deltas.size(2);
  const int64_t num_perms = perms.size(0);
  auto [grad_start, grad_deltas] = walk_gradients(start_logits, deltas, output_mask);
  if (!(output_mask[0] || output_mask[1]) || batch * num_classes == 0) {
    return {grad_start, grad_deltas};
  }
  const bool deltas_grad = output_mask[1];
  const int64_t width = batch * num_classes, acc_size = grad_phi.element_size();
  int64_t chunks = std::clamp<int64_t>((kBackwardThreads + width - 1) / width, 1, num_perms);
  if (deltas_grad) {
    chunks = std::max<int64_t>(
        1, std::min(chunks, kMaxPartialBytes / std::max<int64_t>(width * n * acc_size, 1)));
  }
  const int64_t per_chunk = (num_perms + chunks - 1) / chunks;
  chunks = (num_perms + per_chunk - 1) / per_chunk;

  const at::ScalarType opmath = at::toOpMathType(start_logits.scalar_type());
  const at::Tensor g = grad_phi.contiguous(), start = start_logits.contiguous();
  const at::Tensor step = deltas.contiguous(), order = perms.contiguous();
  const at::Tensor cls = classes.contiguous();
  const at::Tensor record =
      at::empty({softmax ? batch * num_perms * (n + 1) : 0, 3}, start.options().dtype(opmath));
  const at::Tensor start_part = at::empty({chunks, batch, num_classes}, g.options());
  const at::Tensor deltas_part =
      at::zeros({deltas_grad ? chunks : 0, batch, n, num_classes}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "linear_walk_backward", [&] {
    using acc_t = scalar_t;
    if (softmax) {
      launch_linear_walk<acc_t>(start, step, order, cls, true, nullptr, record.data_ptr());
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, start.scalar_type(), "linear_walk_backward", [&] {
          using op_t = at::opmath_type<scalar_t>;
          linear_walk_backward_kernel<scalar_t, op_t, acc_t>
              <<<blocks_for(chunks * width), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  g.const_data_ptr<acc_t>(), start.const_data_ptr<scalar_t>(),
                  step.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
                  cls.const_data_ptr<int64_t>(), softmax,
                  static_cast<const StepRecord<op_t>*>(record.const_data_ptr()),
                  start_part.data_ptr<acc_t>(),
                  deltas_grad ? deltas_part.data_ptr<acc_t>() : nullptr, batch, num_perms, n,
                  num_classes, chunks, per_chunk);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  if (output_mask[0]) grad_start.copy_(start_part.sum(0));
  if (deltas_grad) grad_deltas.copy_(deltas_part.sum(0));
  return {grad_start, grad_deltas};
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CUDA, m) {
  m.impl("linear_walk_backward", &linear_walk_backward_cuda);
}

}  // namespace shapcam

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../entry_points.h"
#include "linear_walk_common.cuh"

namespace shapcam {
namespace {

// Both variants of the walk: every (b, k) walked by one block, each step's marginal placed at
// the position it adds, then summed into phi (B, n) and, when defined, phi_sq, deterministically.
void walk_into(const at::Tensor& start_logits, const at::Tensor& deltas, const at::Tensor& perms,
               const at::Tensor& classes, bool softmax, at::Tensor& phi, const at::Tensor& phi_sq,
               int64_t unit_size) {
  const c10::cuda::CUDAGuard guard(start_logits.device());
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_perms = perms.size(0);
  if (batch == 0) return;
  at::Tensor marginals = at::zeros({batch, num_perms, n}, phi.options());
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "linear_walk", [&] {
    using acc_t = scalar_t;
    launch_linear_walk<acc_t>(start_logits, deltas, perms, classes, softmax,
                              marginals.data_ptr<acc_t>(), nullptr);
    const PlacedMarginal<acc_t> marginal_of{marginals.const_data_ptr<acc_t>(), num_perms, n};
    accumulate_units_cuda<acc_t>(marginal_of, phi, phi_sq, num_perms, unit_size);
  });
}

at::Tensor linear_walk_cuda(const at::Tensor& start_logits, const at::Tensor& deltas,
                            const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                            std::optional<at::ScalarType> dtype) {
  return linear_walk_with(walk_into, start_logits, deltas, perms, classes, softmax, dtype);
}

void linear_walk_inplace_cuda(const at::Tensor& start_logits, const at::Tensor& deltas,
                              const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                              at::Tensor& phi, at::Tensor& phi_sq, int64_t unit_size) {
  linear_walk_inplace_with(walk_into, start_logits, deltas, perms, classes, softmax, phi, phi_sq,
                           unit_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CUDA, m) {
  m.impl("linear_walk", &linear_walk_cuda);
  m.impl("linear_walk_", &linear_walk_inplace_cuda);
}

}  // namespace shapcam

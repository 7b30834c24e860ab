// How each op's variants reach a device's kernel, the same on both devices: the argument checks,
// an unbatched input counted as B = 1, and the outputs the out-of-place variants allocate.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"

namespace shapcam {

// scatter_marginals and scatter_marginals_ on top of a device's
// scatter_into(values (B, K, n+1), ranks, phi (B, n), phi_sq (B, n) or undefined, unit_size).
// The out-of-place variant sums onto zeros of the sum dtype and keeps no squares.
template <typename ScatterInto>
at::Tensor scatter_marginals_with(const ScatterInto& scatter_into, const at::Tensor& values,
                                  const at::Tensor& ranks, std::optional<at::ScalarType> dtype) {
  check_scatter_marginals_args(values, ranks);
  std::vector<int64_t> shape(values.sizes().begin(), values.sizes().end() - 2);
  shape.push_back(values.size(-1) - 1);
  at::Tensor phi =
      at::zeros(shape, values.options().dtype(sum_dtype(dtype, values.scalar_type())));
  const bool batched = values.dim() == 3;
  at::Tensor sum = batched ? phi : phi.unsqueeze(0);
  scatter_into(batched ? values : values.unsqueeze(0), ranks, sum, at::Tensor(), 1);
  return phi;
}

template <typename ScatterInto>
void scatter_marginals_inplace_with(const ScatterInto& scatter_into, const at::Tensor& values,
                                    const at::Tensor& ranks, at::Tensor& phi, at::Tensor& phi_sq,
                                    int64_t unit_size) {
  check_scatter_marginals_inplace_args(values, ranks, phi, phi_sq, unit_size);
  const bool batched = values.dim() == 3;
  at::Tensor sum = batched ? phi : phi.unsqueeze(0);
  scatter_into(batched ? values : values.unsqueeze(0), ranks, sum,
               batched ? phi_sq : phi_sq.unsqueeze(0), unit_size);
}

// linear_walk and linear_walk_ on top of a device's walk_into(start_logits, deltas, perms,
// classes, softmax, phi (B, n), phi_sq (B, n) or undefined, unit_size).
template <typename WalkInto>
at::Tensor linear_walk_with(const WalkInto& walk_into, const at::Tensor& start_logits,
                            const at::Tensor& deltas, const at::Tensor& perms,
                            const at::Tensor& classes, bool softmax,
                            std::optional<at::ScalarType> dtype) {
  check_linear_walk_args(start_logits, deltas, perms, classes);
  at::Tensor phi = at::zeros({deltas.size(0), deltas.size(1)},
                             deltas.options().dtype(sum_dtype(dtype, deltas.scalar_type())));
  walk_into(start_logits, deltas, perms, classes, softmax, phi, at::Tensor(), 1);
  return phi;
}

template <typename WalkInto>
void linear_walk_inplace_with(const WalkInto& walk_into, const at::Tensor& start_logits,
                              const at::Tensor& deltas, const at::Tensor& perms,
                              const at::Tensor& classes, bool softmax, at::Tensor& phi,
                              at::Tensor& phi_sq, int64_t unit_size) {
  check_linear_walk_inplace_args(start_logits, deltas, perms, classes, phi, phi_sq, unit_size);
  walk_into(start_logits, deltas, perms, classes, softmax, phi, phi_sq, unit_size);
}

// linear_walk_backward's outputs, zeroed: a gradient that output_mask leaves out is not computed
// and comes back with a leading dimension of 0.
inline std::tuple<at::Tensor, at::Tensor> walk_gradients(const at::Tensor& start_logits,
                                                         const at::Tensor& deltas,
                                                         std::array<bool, 2> output_mask) {
  return {at::zeros({output_mask[0] ? start_logits.size(0) : 0, start_logits.size(1)},
                    start_logits.options()),
          at::zeros({output_mask[1] ? deltas.size(0) : 0, deltas.size(1), deltas.size(2)},
                    deltas.options())};
}

}  // namespace shapcam

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../entry_points.h"
#include "cpu_helpers.h"
#include "linear_walk_common.h"

namespace shapcam {
namespace {

// Walks permutation order[0..n) from the logits z (num_classes, overwritten) with the steps
// step (n, num_classes), adding each step's marginal, in acc_t, to unit_sum at the position the
// step adds. Returns false at a position outside [0, n).
template <typename op_t, typename acc_t>
bool walk_permutation(op_t* z, const op_t* step, const int64_t* order, int64_t n,
                      int64_t num_classes, int64_t c, bool softmax, acc_t* unit_sum) {
  op_t top, total;
  acc_t before =
      static_cast<acc_t>(step_worth<op_t>(z, nullptr, num_classes, c, softmax, top, total));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t q = order[t];
    if (C10_UNLIKELY(!in_range(q, n))) return false;
    const acc_t after = static_cast<acc_t>(
        step_worth(z, step + q * num_classes, num_classes, c, softmax, top, total));
    unit_sum[q] += marginal(before, after);
    before = after;
  }
  return true;
}

// Both variants of the walk: each (b, k) on one thread, in the inputs' opmath type (the
// precision policy in shapcam_math.h), its marginals summed into phi (B, n) and, when defined,
// phi_sq, in their dtype, deterministically.
void walk_into(const at::Tensor& start_logits, const at::Tensor& deltas, const at::Tensor& perms,
               const at::Tensor& classes, bool softmax, at::Tensor& phi, const at::Tensor& phi_sq,
               int64_t unit_size) {
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_classes = deltas.size(2);
  const int64_t num_perms = perms.size(0);
  check_classes_in_range_cpu(classes, num_classes);
  const at::ScalarType opmath = at::toOpMathType(start_logits.scalar_type());
  const at::Tensor start = start_logits.to(opmath).contiguous();
  const at::Tensor step = deltas.to(opmath).contiguous();
  const at::Tensor order = perms.contiguous(), cls = classes.contiguous();
  // A task walks enough permutations to be worth waking a thread for.
  const int64_t per_task =
      std::max<int64_t>(1, kSerialWork / std::max<int64_t>(n * num_classes, 1));
  bool valid = true;
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "linear_walk", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(opmath, "linear_walk", [&] {
      using op_t = scalar_t;
      const op_t* start_ptr = start.const_data_ptr<op_t>();
      const op_t* step_ptr = step.const_data_ptr<op_t>();
      const int64_t* order_ptr = order.const_data_ptr<int64_t>();
      const int64_t* cls_ptr = cls.const_data_ptr<int64_t>();
      const auto add_row = [&](int64_t b, int64_t k, acc_t* unit_sum) {
        std::vector<op_t> z(start_ptr + b * num_classes, start_ptr + (b + 1) * num_classes);
        return walk_permutation(z.data(), step_ptr + b * n * num_classes, order_ptr + k * n, n,
                                num_classes, cls_ptr[b], softmax, unit_sum);
      };
      valid = accumulate_units_cpu<acc_t>(batch, num_perms, n, unit_size, per_task, add_row, phi,
                                          phi_sq);
    });
  });
  TORCH_CHECK_VALUE(valid, SHAPCAM_PERM_OUT_OF_RANGE);
}

at::Tensor linear_walk_cpu(const at::Tensor& start_logits, const at::Tensor& deltas,
                           const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                           std::optional<at::ScalarType> dtype) {
  return linear_walk_with(walk_into, start_logits, deltas, perms, classes, softmax, dtype);
}

void linear_walk_inplace_cpu(const at::Tensor& start_logits, const at::Tensor& deltas,
                             const at::Tensor& perms, const at::Tensor& classes, bool softmax,
                             at::Tensor& phi, at::Tensor& phi_sq, int64_t unit_size) {
  linear_walk_inplace_with(walk_into, start_logits, deltas, perms, classes, softmax, phi, phi_sq,
                           unit_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) {
  m.impl("linear_walk", &linear_walk_cpu);
  m.impl("linear_walk_", &linear_walk_inplace_cpu);
}

}  // namespace shapcam

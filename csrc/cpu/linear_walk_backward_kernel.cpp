#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "../entry_points.h"
#include "cpu_helpers.h"
#include "linear_walk_common.h"

namespace shapcam {
namespace {

// The permutations of one image are split into at most this many tasks (fewer per image when
// there are many images), a number set by the shapes alone, so that the sums do not depend on
// the thread count. Each task keeps an (n, M) partial gradient of the deltas.
constexpr int64_t kTasks = 32;

// Walks permutation `order` of one image again, from the logits z (M, overwritten), and adds to
// gs (M) its gradient of the start logits, sum_t w_t with w_t = a_t dv_t/dz_t (the cotangents in
// shapcam_math.h); and to gd (n, M), when not null, minus the sum of the w_t before the step at
// which each position enters. The caller then adds the gs of its permutations to every row of
// gd: a delta entering at step t moves z_t, ..., z_n, so its gradient is the sum from t on.
// g: (n,) cotangent of phi. w: (M) workspace. Returns false at a position outside [0, n).
template <typename op_t, typename acc_t>
bool walk_gradient(op_t* z, acc_t* w, const op_t* step, const int64_t* order, const acc_t* g,
                   int64_t n, int64_t num_classes, int64_t c, bool softmax, acc_t* gs, acc_t* gd) {
  // A logit worth moves with its own column only.
  const int64_t lo = softmax ? 0 : c, hi = softmax ? num_classes : c + 1;
  std::fill(w, w + num_classes, acc_t(0));
  for (int64_t t = 0; t <= n; ++t) {
    const int64_t entered = t > 0 ? order[t - 1] : -1, next = t < n ? order[t] : -1;
    if (C10_UNLIKELY(t < n && !in_range(next, n))) return false;  // entered: checked as next
    op_t top = 0, total = 0;
    const op_t v = step_worth(z, t > 0 ? step + entered * num_classes : nullptr, num_classes, c,
                              softmax, top, total);
    if (t > 0 && gd != nullptr) {
      acc_t* row = gd + entered * num_classes;
      for (int64_t j = lo; j < hi; ++j) row[j] -= w[j];
    }
    const acc_t a = worth_cotangent(t > 0 ? g[entered] : acc_t(0), t < n ? g[next] : acc_t(0));
    if (softmax) {
      add_softmax_gradient(w, z, top, total, a * static_cast<acc_t>(v), c, num_classes);
    } else {
      w[c] += a;
    }
  }
  for (int64_t j = lo; j < hi; ++j) gs[j] += w[j];
  return true;
}

// part (B * blocks, ...) summed over each image's blocks in order: (B, prod(...)).
at::Tensor sum_tasks(const at::Tensor& part, int64_t batch, int64_t blocks) {
  const int64_t width = batch == 0 ? 0 : part.numel() / (batch * blocks);
  at::Tensor out = at::zeros({batch, width}, part.options());
  AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "linear_walk_backward", [&] {
    const scalar_t* in = part.const_data_ptr<scalar_t>();
    scalar_t* sum = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * width, kSerialWork / std::max<int64_t>(blocks, 1) + 1,
                     [&](int64_t begin, int64_t end) {
                       for (int64_t i = begin; i < end; ++i) {
                         const int64_t b = i / width, x = i % width;
                         for (int64_t block = 0; block < blocks; ++block) {
                           sum[i] += in[(b * blocks + block) * width + x];
                         }
                       }
                     });
  });
  return out;
}

// Gradients of linear_walk's output phi (B, n) with respect to start_logits and deltas, walking
// every permutation again (O(K n M), like the forward; no (K, n, M) tensor). Logits are walked
// in the inputs' opmath type, the gradients summed in grad_phi's dtype and returned in the
// inputs'. A gradient whose output_mask entry is false is not computed and comes back empty.
std::tuple<at::Tensor, at::Tensor> linear_walk_backward_cpu(
    const at::Tensor& grad_phi, const at::Tensor& start_logits, const at::Tensor& deltas,
    const at::Tensor& perms, const at::Tensor& classes, bool softmax,
    std::array<bool, 2> output_mask) {
  check_linear_walk_backward_args(grad_phi, start_logits, deltas, perms, classes);
  const int64_t batch = deltas.size(0), n = deltas.size(1), num_classes = deltas.size(2);
  const int64_t num_perms = perms.size(0);
  check_classes_in_range_cpu(classes, num_classes);
  auto [grad_start, grad_deltas] = walk_gradients(start_logits, deltas, output_mask);
  if (!(output_mask[0] || output_mask[1]) || batch * num_classes == 0) {
    return {grad_start, grad_deltas};
  }
  const bool deltas_grad = output_mask[1];
  const int64_t blocks_per_image =
      std::min<int64_t>(num_perms, std::max<int64_t>(1, kTasks / batch));
  const int64_t per_task = (num_perms + blocks_per_image - 1) / blocks_per_image;
  const int64_t blocks = (num_perms + per_task - 1) / per_task;
  const at::ScalarType opmath = at::toOpMathType(start_logits.scalar_type());
  const at::Tensor start = start_logits.to(opmath).contiguous();
  const at::Tensor step = deltas.to(opmath).contiguous();
  const at::Tensor order = perms.contiguous(), cls = classes.contiguous();
  const at::Tensor g = grad_phi.contiguous();
  // Per task: the partial gradients of the start logits (M) and, if asked for, the deltas (n, M).
  const at::Tensor start_part = at::zeros({batch * blocks, num_classes}, g.options());
  const at::Tensor deltas_part =
      at::zeros({deltas_grad ? batch * blocks : 0, n, num_classes}, g.options());
  std::atomic<bool> valid{true};
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "linear_walk_backward", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(opmath, "linear_walk_backward", [&] {
      using op_t = scalar_t;
      const op_t* start_ptr = start.const_data_ptr<op_t>();
      const op_t* step_ptr = step.const_data_ptr<op_t>();
      const int64_t* order_ptr = order.const_data_ptr<int64_t>();
      const int64_t* cls_ptr = cls.const_data_ptr<int64_t>();
      const acc_t* g_ptr = g.const_data_ptr<acc_t>();
      acc_t* gs_ptr = start_part.data_ptr<acc_t>();
      acc_t* gd_ptr = deltas_grad ? deltas_part.data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<op_t> z(num_classes);
        std::vector<acc_t> w(num_classes);
        for (int64_t task = begin; task < end && valid; ++task) {
          const int64_t b = task / blocks, first = task % blocks * per_task;
          acc_t* gs = gs_ptr + task * num_classes;
          acc_t* gd = deltas_grad ? gd_ptr + task * n * num_classes : nullptr;
          for (int64_t k = first; k < std::min(first + per_task, num_perms); ++k) {
            std::copy(start_ptr + b * num_classes, start_ptr + (b + 1) * num_classes, z.data());
            if (!walk_gradient(z.data(), w.data(), step_ptr + b * n * num_classes,
                               order_ptr + k * n, g_ptr + b * n, n, num_classes, cls_ptr[b],
                               softmax, gs, gd)) {
              valid = false;
              return;
            }
          }
          for (int64_t p = 0; gd != nullptr && p < n; ++p) {
            for (int64_t j = 0; j < num_classes; ++j) gd[p * num_classes + j] += gs[j];
          }
        }
      });
    });
  });
  TORCH_CHECK_VALUE(valid, SHAPCAM_PERM_OUT_OF_RANGE);
  if (output_mask[0]) grad_start.copy_(sum_tasks(start_part, batch, blocks).view_as(grad_start));
  if (deltas_grad) grad_deltas.copy_(sum_tasks(deltas_part, batch, blocks).view_as(grad_deltas));
  return {grad_start, grad_deltas};
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) {
  m.impl("linear_walk_backward", &linear_walk_backward_cpu);
}

}  // namespace shapcam

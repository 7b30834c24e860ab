// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../checks.h"

namespace shapcam {

// Work below which a loop runs on the calling thread: waking the pool costs more than it saves.
constexpr int64_t kSerialWork = 1 << 16;

// Raises ValueError unless every class index lies in [0, num_classes).
inline void check_classes_in_range_cpu(const at::Tensor& classes, int64_t num_classes) {
  const at::Tensor index = classes.contiguous();
  const int64_t* c = index.const_data_ptr<int64_t>();
  // Unsigned: negative values fail the range test too.
  const bool inside = std::all_of(c, c + index.numel(), [&](int64_t value) {
    return static_cast<uint64_t>(value) < static_cast<uint64_t>(num_classes);
  });
  TORCH_CHECK_VALUE(inside, "classes must lie in [0, M) = [0, ", num_classes,
                    "), the columns of start_logits");
}

// Whether 0 <= index < size, in one comparison (negative values wrap around).
inline bool in_range(int64_t index, int64_t size) {
  return static_cast<uint64_t>(index) < static_cast<uint64_t>(size);
}

// Adds to phi[b, p] the marginals of position p along every permutation, and to phi_sq[b, p]
// (when defined) the square of each unit's sum of them, a unit being unit_size consecutive
// permutations. add_row(b, k, unit_sum) adds permutation k's marginals for image b to
// unit_sum[0..n), or returns false when an index it would read is out of range: then phi and
// phi_sq stay untouched and this returns false. phi, phi_sq: (B, n) with any strides.
//
// Each task sums perms_per_task permutations (rounded up to whole units) in order, and the
// tasks' sums are added in order at the end: the sums depend on the shapes only, not on the
// thread count (deterministic).
template <typename acc_t, typename AddRow>
bool accumulate_units_cpu(int64_t batch, int64_t num_perms, int64_t n, int64_t unit_size,
                          int64_t perms_per_task, const AddRow& add_row, at::Tensor& phi,
                          const at::Tensor& phi_sq) {
  if (batch * n == 0) return true;
  const bool squares = phi_sq.defined();
  const int64_t per_task = (perms_per_task + unit_size - 1) / unit_size * unit_size;
  const int64_t blocks = (num_perms + per_task - 1) / per_task, slots = squares ? 2 : 1;
  // partial[b, block] holds that block's sums of marginals, then its units' squared sums.
  std::vector<acc_t> partial(batch * blocks * slots * n, acc_t(0));
  std::atomic<bool> valid{true};
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> unit_sum(n, acc_t(0));
    for (int64_t task = begin; task < end && valid; ++task) {
      const int64_t b = task / blocks, first = task % blocks * per_task;
      acc_t* s = partial.data() + task * slots * n;
      acc_t* s2 = squares ? s + n : nullptr;
      for (int64_t k = first; k < std::min(first + per_task, num_perms); ++k) {
        if (!add_row(b, k, unit_sum.data())) {
          valid = false;
          return;
        }
        if ((k + 1) % unit_size == 0) {
          for (int64_t q = 0; q < n; ++q) close_unit(unit_sum[q], s[q], squares ? s2 + q : nullptr);
        }
      }
    }
  });
  if (!valid) return false;
  acc_t* sum = phi.data_ptr<acc_t>();
  acc_t* sum_sq = squares ? phi_sq.data_ptr<acc_t>() : nullptr;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t q = 0; q < n; ++q) {
      acc_t s = 0, s2 = 0;
      for (int64_t block = 0; block < blocks; ++block) {
        const acc_t* part = partial.data() + (b * blocks + block) * slots * n;
        s += part[q];
        if (squares) s2 += part[n + q];
      }
      sum[b * phi.stride(0) + q * phi.stride(1)] += s;
      if (squares) sum_sq[b * phi_sq.stride(0) + q * phi_sq.stride(1)] += s2;
    }
  }
  return true;
}

}  // namespace shapcam

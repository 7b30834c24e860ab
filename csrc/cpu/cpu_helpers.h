// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace shapcam {

// Work below which a loop runs on the calling thread: waking the pool costs more than it saves.
constexpr int64_t kSerialWork = 1 << 16;

// Raises ValueError unless every row of perms (K, n) is a permutation of 0..n-1: no value out of
// range and none repeated within its row.
inline void check_permutations_cpu(const at::Tensor& perms) {
  const int64_t n = perms.size(1);
  const at::Tensor order = perms.contiguous();
  const int64_t* p = order.const_data_ptr<int64_t>();
  std::vector<int64_t> row_seen(n, -1);  // the last row in which each position was seen
  bool valid = true;
  for (int64_t k = 0; k < order.size(0); ++k, p += n) {
    for (int64_t t = 0; t < n; ++t) {
      // Unsigned: negative values fail the range test too.
      const uint64_t q = static_cast<uint64_t>(p[t]);
      const bool fresh = q < static_cast<uint64_t>(n) && row_seen[q] != k;
      valid &= fresh;
      row_seen[fresh ? q : 0] = fresh ? k : row_seen[0];
    }
  }
  TORCH_CHECK_VALUE(valid, kNotPermutation);
}

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

// ranks[k, p] = the step at which permutation k adds position p; perms must be checked.
inline at::Tensor permutation_ranks_cpu(const at::Tensor& perms) {
  const int64_t n = perms.size(1);
  const at::Tensor order = perms.contiguous();
  at::Tensor ranks = at::empty_like(order);
  const int64_t* p = order.const_data_ptr<int64_t>();
  int64_t* rank = ranks.data_ptr<int64_t>();
  at::parallel_for(0, order.size(0), kSerialWork / std::max<int64_t>(n, 1) + 1,
                   [&](int64_t begin, int64_t end) {
                     for (int64_t k = begin; k < end; ++k) {
                       for (int64_t t = 0; t < n; ++t) rank[k * n + p[k * n + t]] = t;
                     }
                   });
  return ranks;
}

// Adds sum_k d to phi[b, p] and the square of each unit's sum of d to phi_sq[b, p], where d is
// the marginal of position p along permutation k: values[b, k, t+1] - values[b, k, t] for
// p = perms[k, t], and a unit is unit_size consecutive permutations. values is (B, K, n+1) and
// phi, phi_sq are (B, n), all with any strides. Checks perms as it goes and raises (leaving phi
// untouched) like check_permutations_cpu. The sums run over fixed blocks of units in order, so
// they do not depend on the thread count: deterministic.
void accumulate_marginals_cpu(const at::Tensor& values, const at::Tensor& perms, at::Tensor& phi,
                              at::Tensor& phi_sq, int64_t unit_size);

}  // namespace shapcam

#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu_helpers.h"

namespace shapcam {
namespace {

// ranks[k, p] = the step at which permutation k adds position p. Raises ValueError unless every
// row of perms is a permutation of 0..n-1: n values in [0, n), none seen twice in its row.
at::Tensor permutation_ranks_cpu(const at::Tensor& perms) {
  check_permutation_ranks_args(perms);
  const at::Tensor order = perms.contiguous();
  at::Tensor ranks = at::empty_like(order);
  const int64_t n = order.size(1);
  const int64_t* p = order.const_data_ptr<int64_t>();
  int64_t* rank = ranks.data_ptr<int64_t>();
  std::atomic<bool> valid{true};
  at::parallel_for(0, order.size(0), kSerialWork / std::max<int64_t>(n, 1) + 1,
                   [&](int64_t begin, int64_t end) {
                     std::vector<int64_t> seen(n, -1);  // the last row that added each position
                     for (int64_t k = begin; k < end; ++k) {
                       for (int64_t t = 0; t < n; ++t) {
                         const int64_t q = p[k * n + t];
                         if (!in_range(q, n) || seen[q] == k) {
                           valid = false;
                           return;
                         }
                         seen[q] = k;
                         rank[k * n + q] = t;
                       }
                     }
                   });
  TORCH_CHECK_VALUE(valid, SHAPCAM_NOT_PERMUTATION);
  return ranks;
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) { m.impl("permutation_ranks", &permutation_ranks_cpu); }

}  // namespace shapcam

#include <torch/library.h>

#include <cstring>

#include "cpu_helpers.h"

namespace shapcam {
namespace {

// Ranks are only compared with prefix lengths, never used as addresses: any value is safe.
at::Tensor masked_prefixes_cpu(const at::Tensor& activations, const at::Tensor& baseline,
                               const at::Tensor& ranks, int64_t perm_start, int64_t perm_end,
                               int64_t prefix_start, int64_t prefix_end) {
  check_masked_prefixes_args(activations, baseline, ranks, perm_start, perm_end, prefix_start,
                             prefix_end);
  const MaskedPrefixesPlan plan =
      plan_masked_prefixes(activations, baseline, perm_start, perm_end, prefix_start, prefix_end);
  if (plan.out.numel() == 0) return plan.out;
  const at::Tensor steps = ranks.contiguous();

  // The copy is dtype-agnostic: runs of C elements move as bytes.
  const int64_t n = plan.n, run = plan.acts.size(2) * plan.acts.element_size();
  const char* acts = static_cast<const char*>(plan.acts.const_data_ptr());
  const char* base = static_cast<const char*>(plan.base.const_data_ptr());
  char* out = static_cast<char*>(plan.out.data_ptr());
  const int64_t* rank = steps.const_data_ptr<int64_t>();
  const int64_t rows = plan.out.size(0);
  at::parallel_for(
      0, rows, std::max<int64_t>(1, (1 << 16) / (n * run)), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const PrefixRow<int64_t> row = decode_prefix_row(r, plan.grid);
          const int64_t* rank_k = rank + row.k * n;
          const char* in = acts + row.b * n * run;
          const char* out_of = base + row.b * n * run;
          char* dst = out + r * n * run;
          // Positions with the same source are adjacent in both source and output: copy each
          // stretch in one call.
          for (int64_t p = 0; p < n;) {
            const bool keep = kept(rank_k[p], row.t);
            int64_t q = p + 1;
            while (q < n && kept(rank_k[q], row.t) == keep) ++q;
            std::memcpy(dst + p * run, (keep ? in : out_of) + p * run, (q - p) * run);
            p = q;
          }
        }
      });
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CPU, m) { m.impl("masked_prefixes", &masked_prefixes_cpu); }

}  // namespace shapcam

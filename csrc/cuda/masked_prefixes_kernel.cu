#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda_helpers.h"

namespace shapcam {
namespace {

// Output word i lies in map r = (b, k, t) at position p; it copies the same word of the
// activations or the baseline of image b. Consecutive threads write consecutive words.
template <typename word_t, typename index_t>
__global__ void masked_prefixes_kernel(const word_t* acts, const word_t* base, const int64_t* rank,
                                       word_t* out, index_t total, index_t map_words,
                                       index_t run_words, index_t n, PrefixGrid<index_t> grid) {
  for (index_t i = grid_start<index_t>(); i < total; i += grid_stride<index_t>()) {
    const index_t r = i / map_words, j = i - r * map_words, p = j / run_words;
    const PrefixRow<index_t> row = decode_prefix_row(r, grid);
    const bool keep = kept(static_cast<index_t>(rank[row.k * n + p]), row.t);
    out[i] = (keep ? acts : base)[row.b * map_words + j];
  }
}

template <typename word_t>
void launch(const MaskedPrefixesPlan& plan, const at::Tensor& ranks, int64_t run_bytes) {
  const int64_t run_words = run_bytes / sizeof(word_t), map_words = plan.n * run_words;
  const int64_t total = plan.out.size(0) * map_words;
  const int blocks = blocks_for(total);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto run = [&](auto index) {
    using index_t = decltype(index);
    const PrefixGrid<index_t> grid{static_cast<index_t>(plan.grid.perm_start),
                                   static_cast<index_t>(plan.grid.num_perms),
                                   static_cast<index_t>(plan.grid.prefix_start),
                                   static_cast<index_t>(plan.grid.num_prefixes)};
    masked_prefixes_kernel<word_t, index_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const word_t*>(plan.acts.const_data_ptr()),
        static_cast<const word_t*>(plan.base.const_data_ptr()), ranks.const_data_ptr<int64_t>(),
        static_cast<word_t*>(plan.out.data_ptr()), static_cast<index_t>(total),
        static_cast<index_t>(map_words), static_cast<index_t>(run_words),
        static_cast<index_t>(plan.n), grid);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // 32-bit index math is much cheaper on the GPU: use it when no index (nor the loop's last
  // increment) can overflow.
  const int64_t largest = std::max(total, ranks.numel()) + int64_t{blocks} * kThreads;
  if (largest <= std::numeric_limits<int32_t>::max()) {
    run(int32_t{});
  } else {
    run(int64_t{});
  }
}

// Ranks are only compared with prefix lengths, never used as addresses: any value is safe.
at::Tensor masked_prefixes_cuda(const at::Tensor& activations, const at::Tensor& baseline,
                                const at::Tensor& ranks, int64_t perm_start, int64_t perm_end,
                                int64_t prefix_start, int64_t prefix_end) {
  check_masked_prefixes_args(activations, baseline, ranks, perm_start, perm_end, prefix_start,
                             prefix_end);
  const c10::cuda::CUDAGuard guard(activations.device());
  const MaskedPrefixesPlan plan =
      plan_masked_prefixes(activations, baseline, perm_start, perm_end, prefix_start, prefix_end);
  if (plan.out.numel() == 0) return plan.out;
  const at::Tensor steps = ranks.contiguous();

  // The copy is dtype-agnostic: move the widest word that divides a run of C values and
  // keeps every pointer aligned.
  const int64_t run_bytes = plan.acts.size(2) * plan.acts.element_size();
  const auto fits = [&](int64_t word) {
    return run_bytes % word == 0 &&
           reinterpret_cast<std::uintptr_t>(plan.acts.const_data_ptr()) % word == 0 &&
           reinterpret_cast<std::uintptr_t>(plan.base.const_data_ptr()) % word == 0 &&
           reinterpret_cast<std::uintptr_t>(plan.out.const_data_ptr()) % word == 0;
  };
  if (fits(16)) {
    launch<uint4>(plan, steps, run_bytes);
  } else if (fits(8)) {
    launch<uint2>(plan, steps, run_bytes);
  } else if (fits(4)) {
    launch<uint32_t>(plan, steps, run_bytes);
  } else {
    launch<uint16_t>(plan, steps, run_bytes);
  }
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CUDA, m) { m.impl("masked_prefixes", &masked_prefixes_cuda); }

}  // namespace shapcam

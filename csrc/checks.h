// Argument checks and argument normalisation shared by the CPU and CUDA kernels.
//
// The messages follow the Python checks in shapcam_ext/ops.py: each names the argument at
// fault and what it should be, so both backends fail the same way.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <vector>

#include "shapcam_math.h"

namespace shapcam {

constexpr const char* kNotPermutation = SHAPCAM_NOT_PERMUTATION;

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Shape and dtype only: whether each row is a permutation is a data-dependent check, made by the
// device's kernels: the CPU raises ValueError (check_permutations_cpu); CUDA checks with
// device-side asserts (permutation_ranks_cuda), since raising would need a host sync. The engine's
// permutations are argsorts of random numbers (shapcam_ext/sampling.py): valid by construction.
inline void check_perms(const at::Tensor& perms, int64_t n) {
  TORCH_CHECK(perms.scalar_type() == at::kLong, "perms must be int64, got ", perms.scalar_type(),
              "; convert it with perms.long()");
  TORCH_CHECK(perms.dim() == 2 && perms.size(1) == n && perms.size(0) >= 1,
              "perms must be (K, n) with K >= 1 and n = h*w = ", n, ", got shape ", perms.sizes());
}

inline void check_masked_prefixes_args(const at::Tensor& activations, const at::Tensor& baseline,
                                       const at::Tensor& perms, int64_t perm_start,
                                       int64_t perm_end, int64_t prefix_start, int64_t prefix_end) {
  TORCH_CHECK(activations.dim() == 3 || activations.dim() == 4,
              "activations must be (C, h, w) or (B, C, h, w), got shape ", activations.sizes());
  TORCH_CHECK(is_float_dtype(activations.scalar_type()),
              "activations must be a floating tensor (float32/64, float16, bfloat16), got ",
              activations.scalar_type());
  TORCH_CHECK(baseline.scalar_type() == activations.scalar_type(), "baseline dtype ",
              baseline.scalar_type(), " differs from activations dtype ", activations.scalar_type(),
              "; cast it");
  TORCH_CHECK(baseline.device() == activations.device() && perms.device() == activations.device(),
              "activations, baseline and perms must be on one device, got ", activations.device(),
              ", ", baseline.device(), ", ", perms.device());
  bool broadcasts = baseline.dim() <= activations.dim();
  for (int64_t i = 1; broadcasts && i <= baseline.dim(); ++i) {
    const int64_t s = baseline.size(-i);
    broadcasts = s == 1 || s == activations.size(-i);
  }
  TORCH_CHECK(broadcasts, "baseline of shape ", baseline.sizes(),
              " does not broadcast to activations ", activations.sizes());
  const int64_t n = activations.size(-1) * activations.size(-2);
  check_perms(perms, n);
  const int64_t k = perms.size(0);
  TORCH_CHECK(0 <= perm_start && perm_start < perm_end && perm_end <= k, "perm_range [", perm_start,
              ", ", perm_end, ") must satisfy 0 <= start < end <= K = ", k);
  TORCH_CHECK(0 <= prefix_start && prefix_start < prefix_end && prefix_end <= n + 1,
              "prefix_range [", prefix_start, ", ", prefix_end,
              ") must satisfy 0 <= start < end <= n+1 = ", n + 1);
}

// phi and phi_sq accumulate per-position sums of marginals taken from `values`, which has
// batch dimensions `batch` (empty or {B}), then (K, n+1), over units of unit_size permutations.
inline void check_accumulators(at::IntArrayRef batch, int64_t n, const at::Tensor& perms,
                               const at::Tensor& phi, const at::Tensor& phi_sq,
                               const at::Device& device, int64_t unit_size) {
  TORCH_CHECK(unit_size >= 1 && perms.size(0) % unit_size == 0,
              "unit_size must be a positive divisor of K = ", perms.size(0), ", got ", unit_size);
  std::vector<int64_t> expected(batch.begin(), batch.end());
  expected.push_back(n);
  const auto check_one = [&](const char* name, const at::Tensor& acc) {
    TORCH_CHECK(acc.sizes() == at::IntArrayRef(expected), name, " must have shape ",
                at::IntArrayRef(expected), " to match values, got ", acc.sizes());
    TORCH_CHECK((acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble) &&
                    acc.scalar_type() == phi.scalar_type(),
                name, " must be float32 or float64 (and phi_sq like phi), got ", acc.scalar_type());
    TORCH_CHECK(acc.device() == device && perms.device() == device, "values, perms and ", name,
                " must be on one device, got ", device, ", ", perms.device(), ", ", acc.device());
    TORCH_CHECK(
        at::has_internal_overlap(acc) != at::MemOverlap::Yes, name,
        " has elements sharing memory (an expanded tensor?); pass one with its own storage");
  };
  check_one("phi", phi);
  check_one("phi_sq", phi_sq);
}

inline void check_scatter_marginals_args(const at::Tensor& values, const at::Tensor& perms,
                                         const at::Tensor& phi, const at::Tensor& phi_sq,
                                         int64_t unit_size) {
  TORCH_CHECK(values.dim() == 2 || values.dim() == 3,
              "values must be (K, n+1) or (B, K, n+1), got ", values.sizes());
  TORCH_CHECK(is_float_dtype(values.scalar_type()), "values must be floating, got ",
              values.scalar_type());
  const int64_t n = values.size(-1) - 1;
  check_perms(perms, n);
  TORCH_CHECK(values.size(-2) == perms.size(0), "values has ", values.size(-2),
              " permutations but perms has ", perms.size(0));
  check_accumulators(values.sizes().slice(0, values.dim() - 2), n, perms, phi, phi_sq,
                     values.device(), unit_size);
}

inline void check_linear_walk_args(const at::Tensor& start_logits, const at::Tensor& deltas,
                                   const at::Tensor& perms, const at::Tensor& classes,
                                   const at::Tensor& phi, const at::Tensor& phi_sq,
                                   int64_t unit_size) {
  TORCH_CHECK(start_logits.dim() == 2 && deltas.dim() == 3 &&
                  deltas.size(0) == start_logits.size(0) && deltas.size(2) == start_logits.size(1),
              "start_logits must be (B, M) and deltas (B, n, M), got ", start_logits.sizes(),
              " and ", deltas.sizes());
  TORCH_CHECK(is_float_dtype(start_logits.scalar_type()) &&
                  deltas.scalar_type() == start_logits.scalar_type(),
              "start_logits and deltas must share one float dtype, got ",
              start_logits.scalar_type(), ", ", deltas.scalar_type());
  TORCH_CHECK(classes.scalar_type() == at::kLong && classes.dim() == 1 &&
                  classes.size(0) == start_logits.size(0),
              "classes must be int64 of shape (B,) = (", start_logits.size(0), ",), got ",
              classes.scalar_type(), " ", classes.sizes());
  TORCH_CHECK(deltas.device() == start_logits.device() && classes.device() == start_logits.device(),
              "start_logits, deltas and classes must be on one device, got ", start_logits.device(),
              ", ", deltas.device(), ", ", classes.device());
  const int64_t n = deltas.size(1);
  check_perms(perms, n);
  check_accumulators(deltas.sizes().slice(0, 1), n, perms, phi, phi_sq, start_logits.device(),
                     unit_size);
}

// What both devices' masked_prefixes kernels work from once the arguments are checked (with
// check_masked_prefixes_args). Every output row (b, k, t), decoded by decode_prefix_row, holds
// for each position p one run of C values copied from acts[b, p] or base[b, p].
struct MaskedPrefixesPlan {
  at::Tensor acts;  // (B, n, C) contiguous: free for channels_last input
  at::Tensor base;  // (B, n, C) contiguous, the baseline broadcast
  at::Tensor out;   // (B*Kc*Tc, C, h, w) channels_last, i.e. (B*Kc*Tc, n, C) in memory
  int64_t n;
  PrefixGrid<int64_t> grid;
};

inline MaskedPrefixesPlan plan_masked_prefixes(const at::Tensor& activations,
                                               const at::Tensor& baseline, int64_t perm_start,
                                               int64_t perm_end, int64_t prefix_start,
                                               int64_t prefix_end) {
  const at::Tensor acts = activations.dim() == 4 ? activations : activations.unsqueeze(0);
  const int64_t b = acts.size(0), c = acts.size(1), h = acts.size(2), w = acts.size(3);
  const auto channel_runs = [&](const at::Tensor& t) {
    return t.expand({b, c, h, w}).permute({0, 2, 3, 1}).reshape({b, h * w, c}).contiguous();
  };
  const int64_t num_perms = perm_end - perm_start, num_prefixes = prefix_end - prefix_start;
  at::Tensor out = at::empty({b * num_perms * num_prefixes, c, h, w},
                             acts.options().memory_format(at::MemoryFormat::ChannelsLast));
  return {.acts = channel_runs(acts),
          .base = channel_runs(baseline),
          .out = out,
          .n = h * w,
          .grid = {perm_start, num_perms, prefix_start, num_prefixes}};
}

}  // namespace shapcam

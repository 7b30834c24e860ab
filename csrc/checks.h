// Argument checks and argument normalisation shared by the CPU and CUDA kernels.
//
// The messages follow the Python checks in shapcam_ext/ops.py: each names the argument at
// fault and what it should be, so both backends fail the same way.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "shapcam_math.h"

namespace shapcam {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A None passed for a Tensor argument arrives as an undefined tensor.
inline void check_defined(const at::Tensor& t, const char* name,
                          const char* fix = "pass a tensor") {
  TORCH_CHECK(t.defined(), name, " is None; ", fix);
}

// Shape and dtype of a (K, n) table of positions (perms) or of steps (ranks). Whether each row is
// a permutation is data-dependent: only permutation_ranks checks it (the CPU raises ValueError;
// CUDA asserts on the device, since raising would need a host sync). The ops that index memory
// with the values check their bounds; the engine's permutations are argsorts of random numbers
// (shapcam_ext/sampling.py), permutations by construction.
inline void check_order_table(const at::Tensor& table, const char* name, int64_t n) {
  check_defined(table, name);
  TORCH_CHECK(table.scalar_type() == at::kLong, name, " must be int64, got ", table.scalar_type(),
              "; convert it with ", name, ".long()");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == n && table.size(0) >= 1, name,
              " must be (K, n) with K >= 1 and n = h*w = ", n, ", got shape ", table.sizes());
}

inline void check_permutation_ranks_args(const at::Tensor& perms) {
  check_defined(perms, "perms");
  TORCH_CHECK(perms.scalar_type() == at::kLong, "perms must be int64, got ", perms.scalar_type(),
              "; convert it with perms.long()");
  TORCH_CHECK(perms.dim() == 2, "perms must be (K, n), got shape ", perms.sizes());
}

inline void check_masked_prefixes_args(const at::Tensor& activations, const at::Tensor& baseline,
                                       const at::Tensor& ranks, int64_t perm_start,
                                       int64_t perm_end, int64_t prefix_start, int64_t prefix_end) {
  check_defined(activations, "activations");
  check_defined(baseline, "baseline", "pass a tensor (activations.new_zeros(()) for zeros)");
  TORCH_CHECK(activations.dim() == 3 || activations.dim() == 4,
              "activations must be (C, h, w) or (B, C, h, w), got shape ", activations.sizes());
  TORCH_CHECK(is_float_dtype(activations.scalar_type()),
              "activations must be a floating tensor (float32/64, float16, bfloat16), got ",
              activations.scalar_type());
  TORCH_CHECK(baseline.scalar_type() == activations.scalar_type(), "baseline dtype ",
              baseline.scalar_type(), " differs from activations dtype ", activations.scalar_type(),
              "; cast it");
  const int64_t n = activations.size(-1) * activations.size(-2);
  check_order_table(ranks, "ranks", n);
  TORCH_CHECK(baseline.device() == activations.device() && ranks.device() == activations.device(),
              "activations, baseline and ranks must be on one device, got ", activations.device(),
              ", ", baseline.device(), ", ", ranks.device());
  bool broadcasts = baseline.dim() <= activations.dim();
  for (int64_t i = 1; broadcasts && i <= baseline.dim(); ++i) {
    const int64_t s = baseline.size(-i);
    broadcasts = s == 1 || s == activations.size(-i);
  }
  TORCH_CHECK(broadcasts, "baseline of shape ", baseline.sizes(),
              " does not broadcast to activations ", activations.sizes());
  const int64_t k = ranks.size(0);
  TORCH_CHECK(0 <= perm_start && perm_start < perm_end && perm_end <= k, "perm_range [", perm_start,
              ", ", perm_end, ") must satisfy 0 <= start < end <= K = ", k);
  TORCH_CHECK(0 <= prefix_start && prefix_start < prefix_end && prefix_end <= n + 1,
              "prefix_range [", prefix_start, ", ", prefix_end,
              ") must satisfy 0 <= start < end <= n+1 = ", n + 1);
}

// The dtype of an out-of-place sum (scatter_marginals, linear_walk): `dtype`, else the opmath
// type of the inputs (float32 for float32, float16 and bfloat16; float64 for float64).
inline at::ScalarType sum_dtype(std::optional<at::ScalarType> dtype, at::ScalarType inputs) {
  const at::ScalarType out = dtype.value_or(at::toOpMathType(inputs));
  TORCH_CHECK(out == at::kFloat || out == at::kDouble, "dtype must be float32 or float64, got ",
              out);
  return out;
}

// Whether a and b (1-D or 2-D) have an element in common. Exact, from their sizes and strides,
// so that two interleaved views of one buffer (phi = buf[..., 0], phi_sq = buf[..., 1]) pass.
inline bool share_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return false;
  const auto offsets = [](const at::Tensor& t) {
    const at::Tensor m = t.dim() == 2 ? t : t.reshape({1, -1});
    const int64_t s0 = t.dim() == 2 ? t.stride(0) : 0, s1 = t.stride(-1);
    std::vector<int64_t> out;
    out.reserve(m.numel());
    for (int64_t i = 0; i < m.size(0); ++i) {
      for (int64_t j = 0; j < m.size(1); ++j) out.push_back(t.storage_offset() + i * s0 + j * s1);
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  const std::vector<int64_t> x = offsets(a), y = offsets(b);
  std::vector<int64_t> common;
  std::set_intersection(x.begin(), x.end(), y.begin(), y.end(), std::back_inserter(common));
  return !common.empty();
}

// phi and phi_sq accumulate, in place, per-position sums of marginals taken from per-prefix
// values with batch dimensions `batch` (empty or {B}), over units of unit_size permutations.
inline void check_accumulators(const char* op, const char* differentiable, at::IntArrayRef batch,
                               int64_t n, int64_t num_perms, const at::Tensor& phi,
                               const at::Tensor& phi_sq, const at::Device& device,
                               int64_t unit_size) {
  TORCH_CHECK(unit_size >= 1 && num_perms % unit_size == 0,
              "unit_size must be a positive divisor of K = ", num_perms, ", got ", unit_size);
  std::vector<int64_t> expected(batch.begin(), batch.end());
  expected.push_back(n);
  const auto check_one = [&](const char* name, const at::Tensor& acc) {
    check_defined(acc, name);
    TORCH_CHECK(acc.sizes() == at::IntArrayRef(expected), name, " must have shape ",
                at::IntArrayRef(expected), " to match values, got ", acc.sizes());
    TORCH_CHECK((acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble) &&
                    acc.scalar_type() == phi.scalar_type(),
                name, " must be float32 or float64 (and phi_sq like phi), got ", acc.scalar_type());
    TORCH_CHECK(acc.device() == device, "the inputs and ", name, " must be on one device, got ",
                device, ", ", acc.device());
    TORCH_CHECK(
        at::has_internal_overlap(acc) != at::MemOverlap::Yes, name,
        " has elements sharing memory (an expanded tensor?); pass one with its own storage");
    // As PyTorch's own in-place ops refuse a leaf that requires grad: these have no derivative.
    TORCH_CHECK(!(acc.requires_grad() && c10::GradMode::is_enabled()), name,
                " requires grad, and ", op, " has no derivative: accumulate under torch.no_grad() ",
                "or into ", name, ".detach(), or use the differentiable ", differentiable);
  };
  check_one("phi", phi);
  check_one("phi_sq", phi_sq);
  TORCH_CHECK(!share_elements(phi, phi_sq),
              "phi and phi_sq share memory (phi would get the squares too); pass separate "
              "tensors, e.g. phi_sq = torch.zeros_like(phi)");
}

// values: (K, n+1) or (B, K, n+1) worths of every prefix; ranks: (K, n).
inline void check_scatter_marginals_args(const at::Tensor& values, const at::Tensor& ranks) {
  check_defined(values, "values");
  TORCH_CHECK(values.dim() == 2 || values.dim() == 3,
              "values must be (K, n+1) or (B, K, n+1), got ", values.sizes());
  TORCH_CHECK(is_float_dtype(values.scalar_type()), "values must be floating, got ",
              values.scalar_type());
  const int64_t n = values.size(-1) - 1;
  check_order_table(ranks, "ranks", n);
  TORCH_CHECK(values.size(-2) == ranks.size(0), "values has ", values.size(-2),
              " permutations but ranks has ", ranks.size(0));
  TORCH_CHECK(ranks.device() == values.device(), "values and ranks must be on one device, got ",
              values.device(), ", ", ranks.device());
}

inline void check_scatter_marginals_inplace_args(const at::Tensor& values, const at::Tensor& ranks,
                                                 const at::Tensor& phi, const at::Tensor& phi_sq,
                                                 int64_t unit_size) {
  check_scatter_marginals_args(values, ranks);
  check_accumulators("scatter_marginals_", "scatter_marginals",
                     values.sizes().slice(0, values.dim() - 2), values.size(-1) - 1, ranks.size(0),
                     phi, phi_sq, values.device(), unit_size);
}

// start_logits: (B, M); deltas: (B, n, M); perms: (K, n); classes: (B,).
inline void check_linear_walk_args(const at::Tensor& start_logits, const at::Tensor& deltas,
                                   const at::Tensor& perms, const at::Tensor& classes) {
  check_defined(start_logits, "start_logits");
  check_defined(deltas, "deltas");
  check_defined(classes, "classes");
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
  check_order_table(perms, "perms", deltas.size(1));
  TORCH_CHECK(deltas.device() == start_logits.device() &&
                  classes.device() == start_logits.device() &&
                  perms.device() == start_logits.device(),
              "start_logits, deltas, perms and classes must be on one device, got ",
              start_logits.device(), ", ", deltas.device(), ", ", perms.device(), ", ",
              classes.device());
}

inline void check_linear_walk_inplace_args(const at::Tensor& start_logits, const at::Tensor& deltas,
                                           const at::Tensor& perms, const at::Tensor& classes,
                                           const at::Tensor& phi, const at::Tensor& phi_sq,
                                           int64_t unit_size) {
  check_linear_walk_args(start_logits, deltas, perms, classes);
  check_accumulators("linear_walk_", "linear_walk", deltas.sizes().slice(0, 1), deltas.size(1),
                     perms.size(0), phi, phi_sq, start_logits.device(), unit_size);
}

// grad_phi: (B, n) float32/float64, the cotangent of linear_walk's output.
inline void check_linear_walk_backward_args(const at::Tensor& grad_phi,
                                            const at::Tensor& start_logits,
                                            const at::Tensor& deltas, const at::Tensor& perms,
                                            const at::Tensor& classes) {
  check_linear_walk_args(start_logits, deltas, perms, classes);
  check_defined(grad_phi, "grad_phi");
  TORCH_CHECK(grad_phi.dim() == 2 && grad_phi.size(0) == deltas.size(0) &&
                  grad_phi.size(1) == deltas.size(1),
              "grad_phi must be (B, n) = (", deltas.size(0), ", ", deltas.size(1), "), got ",
              grad_phi.sizes());
  TORCH_CHECK(grad_phi.scalar_type() == at::kFloat || grad_phi.scalar_type() == at::kDouble,
              "grad_phi must be float32 or float64, got ", grad_phi.scalar_type());
  TORCH_CHECK(grad_phi.device() == start_logits.device(),
              "grad_phi and start_logits must be on one device, got ", grad_phi.device(), ", ",
              start_logits.device());
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

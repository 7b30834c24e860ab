#include "linear_walk_common.h"

#include <limits>

namespace shapcam {
namespace {

// On x86-64 (ELF: ifunc) the float loops are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2
// and FMA) and the baseline and picked at load time (a list "avx2,fma" would make two clones,
// AVX2 without FMA and FMA without AVX2); elsewhere (aarch64, whose NEON is baseline) once, for
// the baseline ISA.
#if defined(__x86_64__) && defined(__ELF__)
#define SHAPCAM_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SHAPCAM_SIMD_CLONES
#endif

// kLanes fixed lanes fix the reduction order, so a result does not depend on the thread count.
constexpr int64_t kLanes = 16;

template <typename op_t>
inline op_t add_and_max_lanes(op_t* z, const op_t* d, int64_t m) {
  op_t lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<op_t>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const op_t v = d ? z[j + l] + d[j + l] : z[j + l];
      z[j + l] = v;
      lane[l] = max_partial(lane[l], v);
    }
  }
  for (int64_t l = 0; j < m; ++j, ++l) {
    const op_t v = d ? z[j] + d[j] : z[j];
    z[j] = v;
    lane[l] = max_partial(lane[l], v);
  }
  op_t top = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) top = max_partial(top, lane[l]);
  return top;
}

template <typename op_t>
inline op_t sum_exp_lanes(const op_t* z, op_t top, int64_t m) {
  op_t lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = sum_exp_partial(lane[l], z[j + l], top);
  }
  for (int64_t l = 0; j < m; ++j, ++l) lane[l] = sum_exp_partial(lane[l], z[j], top);
  // A fixed pairwise tree over the lanes.
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
  }
  return lane[0];
}

// Elementwise: no reduction, so no lanes needed for a fixed order.
template <typename op_t, typename acc_t>
inline void add_softmax_gradient_loop(acc_t* w, const op_t* z, op_t top, op_t total, acc_t av,
                                      int64_t c, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    const acc_t q = static_cast<acc_t>(class_probability(z[j], top, total));
    w[j] += softmax_worth_gradient(av, q, j == c);
  }
}

}  // namespace

// The float walk, the hot one (float32, float16 and bfloat16 logits): SIMD clones.
SHAPCAM_SIMD_CLONES float add_and_max(float* z, const float* d, int64_t m) {
  return add_and_max_lanes(z, d, m);
}
SHAPCAM_SIMD_CLONES float sum_exp(const float* z, float top, int64_t m) {
  return sum_exp_lanes(z, top, m);
}
SHAPCAM_SIMD_CLONES void add_softmax_gradient(float* w, const float* z, float top, float total,
                                              float av, int64_t c, int64_t m) {
  add_softmax_gradient_loop(w, z, top, total, av, c, m);
}
SHAPCAM_SIMD_CLONES void add_softmax_gradient(double* w, const float* z, float top, float total,
                                              double av, int64_t c, int64_t m) {
  add_softmax_gradient_loop(w, z, top, total, av, c, m);
}
// The float64 walk: the same loops, for the baseline ISA (its exp is libm's, not vectorised).
double add_and_max(double* z, const double* d, int64_t m) { return add_and_max_lanes(z, d, m); }
double sum_exp(const double* z, double top, int64_t m) { return sum_exp_lanes(z, top, m); }
void add_softmax_gradient(float* w, const double* z, double top, double total, float av,
                          int64_t c, int64_t m) {
  add_softmax_gradient_loop(w, z, top, total, av, c, m);
}
void add_softmax_gradient(double* w, const double* z, double top, double total, double av,
                          int64_t c, int64_t m) {
  add_softmax_gradient_loop(w, z, top, total, av, c, m);
}

}  // namespace shapcam

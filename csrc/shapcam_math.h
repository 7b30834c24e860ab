// The per-element arithmetic of the shapcam ops, written once for both devices.
//
// The CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) differ in how they spread work
// over threads and in the order of their reductions; what each element computes is here, as
// C10_HOST_DEVICE inline functions, so the CPU tests exercise the arithmetic the GPU runs.
//
// Precision policy of linear_walk(_) and its backward (see tests/numerics.py for the bounds the
// tests use): both devices, and the pure-PyTorch reference (shapcam_ext/reference.py), walk the
// logits in at::opmath_type of the inputs -- float for float32, float16 and bfloat16 logits,
// double for float64 -- and store each prefix's worth in phi's dtype, in which the marginals are
// differenced and summed; the backward sums its gradients in phi's dtype too. Why float suffices
// for float32 inputs:
//  * The running logits z_t = z_0 + d_1 + ... + d_t are recursive sums, so each is within
//    gamma_t * Z of its exact value, gamma_t = t*u / (1 - t*u), Z = |z_0| + sum_p |d_p| (Higham,
//    Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemma 3.1, eq. 4.4). For float
//    (u = 2^-24) and n <= 196 players that is at most 1.2e-5 * Z. The deltas themselves come
//    from a float32 GEMM over C >= 512 channels whose bound, gamma_C * |W||g|, is larger: a
//    double walk would not make the logits more accurate than their inputs.
//  * A softmax probability is well conditioned in the logits: sum_j |dp_c/dz_j| = 2 p_c (1 - p_c)
//    <= 1/2, so a logit error e moves the worth by at most e/2 (by 2 p_c e for a small p_c). The
//    max-subtraction makes every exp argument <= 0 (no overflow), and exp, the M-term sum and
//    the division add a relative error of at most gamma_{M+6} to p_c.
//  * A marginal is a difference of two worths and the map a mean of marginals, so the map is
//    within twice the worths' bound, whatever K.
// Float also keeps the CPU walk vectorised 16 lanes wide (AVX-512) and halves the GPU's
// workspace traffic; bench/bench_ops.py measures the float64 walk against it.
#pragma once

#include <c10/macros/Macros.h>

#include <bit>
#include <cmath>
#include <cstdint>

// String literals, so that device-side asserts can use them too. Only permutation_ranks checks
// that rows are permutations; the ops that index memory with ranks or perms check their bounds.
#define SHAPCAM_NOT_PERMUTATION "perms: every row must be a permutation of 0..n-1"
#define SHAPCAM_RANK_OUT_OF_RANGE \
  "ranks must lie in [0, n), the steps of a permutation: compute them with permutation_ranks(perms)"
#define SHAPCAM_PERM_OUT_OF_RANGE "perms must lie in [0, n), the positions of the map"
#define SHAPCAM_CLASS_OUT_OF_RANGE "classes must lie in [0, M), the columns of start_logits"

namespace shapcam {

// ---- masked_prefixes: which map a row is, and which positions it keeps ---------------------

// Rows are ordered image-major, then permutation, then prefix length; a linear_walk or
// scatter_marginals row bk is (image b, permutation k) in the same order.
template <typename index_t>
struct ImagePerm {
  index_t b, k;
};

template <typename index_t>
C10_HOST_DEVICE inline ImagePerm<index_t> split_image_perm(index_t bk, index_t num_perms) {
  const index_t b = bk / num_perms;
  return {b, bk - b * num_perms};
}

// The rows of one masked_prefixes call: permutations [perm_start, perm_start + num_perms) and
// prefix lengths [prefix_start, prefix_start + num_prefixes) of every image.
template <typename index_t>
struct PrefixGrid {
  index_t perm_start, num_perms, prefix_start, num_prefixes;
};

template <typename index_t>
struct PrefixRow {
  index_t b, k, t;  // image, permutation, prefix length
};

template <typename index_t>
C10_HOST_DEVICE inline PrefixRow<index_t> decode_prefix_row(index_t r,
                                                            const PrefixGrid<index_t>& grid) {
  const index_t bk = r / grid.num_prefixes;
  const ImagePerm<index_t> ip = split_image_perm(bk, grid.num_perms);
  return {ip.b, grid.perm_start + ip.k, grid.prefix_start + (r - bk * grid.num_prefixes)};
}

// Position p is in the coalition of the first t steps iff its permutation adds it at a step
// (its rank) below t.
template <typename index_t>
C10_HOST_DEVICE inline bool kept(index_t rank, index_t t) {
  return rank < t;
}

// ---- scatter_marginals(_), linear_walk(_): the marginal of one step, summed per unit ----------

// The marginal of one step: the worth after it minus the worth before, in phi's dtype.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t marginal(acc_t before, acc_t after) {
  return after - before;
}

// A unit is unit_size consecutive permutations (an antithetic pair is one unit of 2): its
// marginals add up per position in unit_sum; a finished unit's sum joins phi and, when phi_sq is
// kept (the in-place ops), its square joins phi_sq, so that standard errors can be computed over
// independent units.
template <typename acc_t>
C10_HOST_DEVICE inline void close_unit(acc_t& unit_sum, acc_t& sum, acc_t* sum_sq) {
  sum += unit_sum;
  if (sum_sq != nullptr) *sum_sq += unit_sum * unit_sum;
  unit_sum = 0;
}

// ---- linear_walk(_): the worth of running logits -------------------------------------------

C10_HOST_DEVICE inline float float_from_bits(int32_t bits) {
#ifdef __CUDA_ARCH__
  return __int_as_float(bits);
#else
  return std::bit_cast<float>(bits);
#endif
}

C10_HOST_DEVICE inline int32_t bits_of_float(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_int(x);
#else
  return std::bit_cast<int32_t>(x);
#endif
}

// exp(x) for x <= 0, the max-subtracted logits (Cephes expf, within 1 ulp): branch-free, so the
// CPU's 16-lane loops vectorise it. x below -87 gives exp(-87) ~ 1.6e-38; NaN stays NaN. Whether
// a*b+c contracts to an FMA is the compiler's choice per device and ISA: the results may then
// differ in the last bit, which the tests' bounds allow.
C10_HOST_DEVICE inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float k = t - shifter;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^k: k's integer sits in the low bits of t.
  return p * float_from_bits((bits_of_float(t) - bits_of_float(shifter) + 127) << 23);
}

// The float64 walk: the device's libm exp (both within 1 ulp).
C10_HOST_DEVICE inline double exp_nonpositive(double x) { return ::exp(x); }

// The softmax worth in three passes over the classes, each split into partials however a
// device likes: the max of the logits, the sum of exp(z - max), then class c's probability.
// NaN logits are skipped by the max (the sum then turns NaN).
template <typename op_t>
C10_HOST_DEVICE inline op_t max_partial(op_t running, op_t z) {
  return z > running ? z : running;
}

template <typename op_t>
C10_HOST_DEVICE inline op_t sum_exp_partial(op_t running, op_t z, op_t top) {
  return running + exp_nonpositive(z - top);
}

template <typename op_t>
C10_HOST_DEVICE inline op_t class_probability(op_t z_c, op_t top, op_t sum_exp) {
  return exp_nonpositive(z_c - top) / sum_exp;
}

// ---- linear_walk_backward: the walk's derivative ----------------------------------------------
//
// Along one permutation, phi[p_t] gets v_t - v_{t-1} (p_t enters at step t, v_t is the worth after
// t steps), so v_t's cotangent is a_t = g[p_t] - g[p_{t+1}] (the first term absent at t = 0, the
// second at t = n). The logits after t steps are z_t = z_0 + d[p_1] + ... + d[p_t]: z_0's
// gradient is sum_t a_t dv_t/dz_t, and d[p_t]'s the same sum over the steps from t on.

template <typename acc_t>
C10_HOST_DEVICE inline acc_t worth_cotangent(acc_t g_entered, acc_t g_next) {
  return g_entered - g_next;
}

// Component j of a * dv/dz for the softmax worth v = q_c = softmax(z)_c: a v (delta_jc - q_j),
// from av = a * v and q_j. (The logit worth v = z_c has a delta_jc.)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_worth_gradient(acc_t av, acc_t q_j, bool is_class) {
  return av * ((is_class ? acc_t(1) : acc_t(0)) - q_j);
}

}  // namespace shapcam

// The CPU walks' loops over the classes (linear_walk and linear_walk_backward): plain C++ that the
// compiler vectorises, in a fixed lane order so that a result does not depend on the thread
// count. Defined in linear_walk_common.cpp, the float ones compiled per ISA (SIMD clones).
#pragma once

#include <cstdint>

#include "../shapcam_math.h"

namespace shapcam {

// z[0..m) += d[0..m) (d may be null: no update) and returns the max of z.
float add_and_max(float* z, const float* d, int64_t m);
double add_and_max(double* z, const double* d, int64_t m);

// sum_j exp(z[j] - top).
float sum_exp(const float* z, float top, int64_t m);
double sum_exp(const double* z, double top, int64_t m);

// w[j] += a v (delta_jc - q_j) for the softmax q = exp(z - top) / total, given av = a v.
void add_softmax_gradient(float* w, const float* z, float top, float total, float av, int64_t c,
                          int64_t m);
void add_softmax_gradient(double* w, const float* z, float top, float total, double av, int64_t c,
                          int64_t m);
void add_softmax_gradient(float* w, const double* z, double top, double total, float av,
                          int64_t c, int64_t m);
void add_softmax_gradient(double* w, const double* z, double top, double total, double av,
                          int64_t c, int64_t m);

// One step of a walk: applies d (null: none) to the logits z[0..m) and returns the worth of class
// c, its logit or its softmax probability. The softmax leaves max and sum of exp in top and
// total (for the backward); a logit needs only its own column.
template <typename op_t>
inline op_t step_worth(op_t* z, const op_t* d, int64_t m, int64_t c, bool softmax, op_t& top,
                       op_t& total) {
  if (!softmax) {
    if (d) z[c] += d[c];
    return z[c];
  }
  top = add_and_max(z, d, m);
  total = sum_exp(z, top, m);
  return class_probability(z[c], top, total);
}

}  // namespace shapcam

// Properties of the shapcam ops, called through the dispatcher as any C++ user would.
// Runs the CPU kernels, and the CUDA kernels too when the library has them and a GPU is present.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../../csrc/shapcam_math.h"

namespace {

int failures = 0;

#define EXPECT(cond)                                                                \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ++failures;                                                                   \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expected " #cond << std::endl; \
    }                                                                               \
  } while (0)

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor permutation_ranks(const at::Tensor& perms) {
  static const auto handle = op<at::Tensor(const at::Tensor&)>("shapcam::permutation_ranks");
  return handle.call(perms);
}

// SymInt schema arguments: the typed handle takes c10::SymInt.
at::Tensor masked_prefixes(const at::Tensor& activations, const at::Tensor& baseline,
                           const at::Tensor& ranks, int64_t perm_start, int64_t perm_end,
                           int64_t prefix_start, int64_t prefix_end) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                    c10::SymInt, c10::SymInt, c10::SymInt)>("shapcam::masked_prefixes");
  return handle.call(activations, baseline, ranks, perm_start, perm_end, prefix_start, prefix_end);
}

at::Tensor scatter_marginals(const at::Tensor& values, const at::Tensor& ranks) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<at::ScalarType>)>(
          "shapcam::scatter_marginals");
  return handle.call(values, ranks, at::kDouble);
}

void scatter_marginals_(const at::Tensor& values, const at::Tensor& ranks, at::Tensor& phi,
                        at::Tensor& phi_sq, int64_t unit_size = 1) {
  static const auto handle =
      op<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, c10::SymInt)>(
          "shapcam::scatter_marginals_");
  handle.call(values, ranks, phi, phi_sq, unit_size);
}

void linear_walk_(const at::Tensor& start_logits, const at::Tensor& deltas, const at::Tensor& perms,
                  const at::Tensor& classes, bool softmax, at::Tensor& phi, at::Tensor& phi_sq,
                  int64_t unit_size = 1) {
  static const auto handle =
      op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
              at::Tensor&, at::Tensor&, c10::SymInt)>("shapcam::linear_walk_");
  handle.call(start_logits, deltas, perms, classes, softmax, phi, phi_sq, unit_size);
}

at::Tensor linear_walk(const at::Tensor& start_logits, const at::Tensor& deltas,
                       const at::Tensor& perms, const at::Tensor& classes, bool softmax) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    bool, std::optional<at::ScalarType>)>("shapcam::linear_walk");
  return handle.call(start_logits, deltas, perms, classes, softmax, at::kDouble);
}

std::tuple<at::Tensor, at::Tensor> linear_walk_backward(const at::Tensor& grad_phi,
                                                        const at::Tensor& start_logits,
                                                        const at::Tensor& deltas,
                                                        const at::Tensor& perms,
                                                        const at::Tensor& classes, bool softmax) {
  static const auto handle =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, bool, std::array<bool, 2>)>(
          "shapcam::linear_walk_backward");
  return handle.call(grad_phi, start_logits, deltas, perms, classes, softmax, {true, true});
}

at::Tensor random_perms(int64_t k, int64_t n, const at::TensorOptions& options) {
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < k; ++i) rows.push_back(at::randperm(n, at::kLong));
  return at::stack(rows).to(options.device());
}

// Each output map (b, k, t) holds activations[b, :, p] where permutation k adds p within its
// first t steps and the baseline elsewhere.
void masked_rows_follow_ranks(const at::TensorOptions& options) {
  const int64_t b = 2, c = 5, h = 3, w = 4, n = h * w, k = 6;
  const at::Tensor acts =
      at::randn({b, c, h, w}, options).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor base = at::randn({c, 1, 1}, options);
  const at::Tensor perms = random_perms(k, n, options);
  const at::Tensor ranks = permutation_ranks(perms);
  const at::Tensor out = masked_prefixes(acts, base, ranks, 1, 5, 2, n + 1).cpu();
  EXPECT(out.sizes() == at::IntArrayRef({b * 4 * (n - 1), c, h, w}));
  EXPECT(out.is_contiguous(at::MemoryFormat::ChannelsLast));
  const at::Tensor a = acts.cpu().reshape({b, c, n}), z = base.cpu().reshape({c});
  const at::Tensor order = perms.cpu();
  int64_t row = 0;
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 1; j < 5; ++j) {
      for (int64_t t = 2; t <= n; ++t, ++row) {
        const at::Tensor map = out[row].reshape({c, n});
        std::vector<bool> kept(n, false);
        for (int64_t s = 0; s < t; ++s) kept[order[j][s].item<int64_t>()] = true;
        for (int64_t p = 0; p < n; ++p) {
          EXPECT(at::equal(map.select(1, p), kept[p] ? a[i].select(1, p) : z));
        }
      }
    }
  }
}

// Efficiency: the marginals along a permutation telescope, so sum_p phi[p] is
// sum_k values[k, n] - values[k, 0]; each phi[p] and each unit's squared sum in phi_sq[p]
// matches a brute-force loop, and the out-of-place scatter_marginals returns phi.
void scatter_is_efficient_and_exact(const at::TensorOptions& options, int64_t unit_size) {
  const int64_t b = 3, k = 40, n = 7;
  const auto f64 = options.dtype(at::kDouble);
  const at::Tensor values = at::randn({b, k, n + 1}, options);
  const at::Tensor perms = random_perms(k, n, options);
  at::Tensor phi = at::zeros({b, n}, f64), phi_sq = at::zeros({b, n}, f64);
  const at::Tensor ranks = permutation_ranks(perms);
  scatter_marginals_(values, ranks, phi, phi_sq, unit_size);
  const at::Tensor v = values.cpu().to(at::kDouble), order = perms.cpu();
  const at::Tensor telescoped = (v.select(2, n) - v.select(2, 0)).sum(1);
  EXPECT(at::allclose(phi.cpu().sum(1), telescoped, 1e-12, 1e-12));
  at::Tensor expected = at::zeros({b, n}, at::kDouble),
             expected_sq = at::zeros({b, n}, at::kDouble);
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t unit = 0; unit < k / unit_size; ++unit) {
      std::vector<double> unit_sum(n, 0.0);
      for (int64_t j = unit * unit_size; j < (unit + 1) * unit_size; ++j) {
        for (int64_t t = 0; t < n; ++t) {
          const double d = (v[i][j][t + 1] - v[i][j][t]).item<double>();
          const int64_t p = order[j][t].item<int64_t>();
          expected[i][p] += d;
          unit_sum[p] += d;
        }
      }
      for (int64_t p = 0; p < n; ++p) expected_sq[i][p] += unit_sum[p] * unit_sum[p];
    }
  }
  EXPECT(at::allclose(phi.cpu(), expected, 1e-12, 1e-12));
  EXPECT(at::allclose(phi_sq.cpu(), expected_sq, 1e-12, 1e-12));
  EXPECT(at::allclose(scatter_marginals(values, ranks).cpu(), expected, 1e-12, 1e-12));
}

// ranks invert perms; a row that is not a permutation raises on the CPU (a device-side assert on
// CUDA would end this process: tests/test_ops.py checks those in subprocesses).
void permutation_ranks_invert(const at::TensorOptions& options) {
  const at::Tensor perms = random_perms(7, 11, options);
  const at::Tensor ranks = permutation_ranks(perms);
  EXPECT(at::equal(ranks.gather(1, perms).cpu(), at::arange(11, at::kLong).expand({7, 11})));
}

// The walk equals scoring every coalition from scratch.
void linear_walk_matches_brute_force(const at::TensorOptions& options) {
  const int64_t b = 2, k = 5, n = 6, m = 9;
  const auto f64 = options.dtype(at::kDouble);
  const at::Tensor start = at::randn({b, m}, f64), deltas = at::randn({b, n, m}, f64);
  const at::Tensor perms = random_perms(k, n, options),
                   classes = at::tensor({3, 8}, at::kLong).to(options.device());
  for (const bool softmax : {true, false}) {
    at::Tensor phi = at::zeros({b, n}, f64), phi_sq = at::zeros({b, n}, f64);
    linear_walk_(start, deltas, perms, classes, softmax, phi, phi_sq);
    at::Tensor expected = at::zeros({b, n}, at::kDouble);
    const at::Tensor s = start.cpu(), d = deltas.cpu(), order = perms.cpu();
    for (int64_t i = 0; i < b; ++i) {
      const int64_t c = i == 0 ? 3 : 8;
      const auto worth = [&](const std::vector<int64_t>& coalition) {
        at::Tensor z = s[i].clone();
        for (const int64_t p : coalition) z += d[i][p];
        return (softmax ? z.softmax(0) : z)[c].item<double>();
      };
      for (int64_t j = 0; j < k; ++j) {
        std::vector<int64_t> coalition;
        for (int64_t t = 0; t < n; ++t) {
          const double before = worth(coalition);
          coalition.push_back(order[j][t].item<int64_t>());
          expected[i][coalition.back()] += worth(coalition) - before;
        }
      }
    }
    EXPECT(at::allclose(phi.cpu(), expected, 1e-10, 1e-12));
    EXPECT(at::allclose(linear_walk(start, deltas, perms, classes, softmax).cpu(), expected, 1e-10,
                        1e-12));
  }
}

// The gradient of sum_p phi[p] = K (v(N) - v(empty)) (efficiency) in closed form: with the
// softmax worth v(z) = q_c(z), dv/dz = q_c (e_c - q), so the start logits get
// K (dv/dz(z_N) - dv/dz(z_0)) and every delta K dv/dz(z_N), z_N = start + sum_p deltas[p]; with
// the logit worth, phi[p] = K deltas[p, c]: the start gets 0 and deltas[p, c] gets K g[p].
void linear_walk_backward_closed_forms(const at::TensorOptions& options) {
  const int64_t b = 2, k = 6, n = 5, m = 7;
  const auto f64 = options.dtype(at::kDouble);
  const at::Tensor start = at::randn({b, m}, f64), deltas = at::randn({b, n, m}, f64);
  const at::Tensor perms = random_perms(k, n, options),
                   classes = at::tensor({3, 6}, at::kLong).to(options.device());
  const at::Tensor onehot = at::one_hot(classes.cpu(), m).to(at::kDouble);
  const auto worth_gradient = [&](const at::Tensor& z) {
    const at::Tensor q = z.softmax(-1);
    return (q * onehot).sum(-1, true) * (onehot - q);
  };
  auto [grad_start, grad_deltas] =
      linear_walk_backward(at::ones({b, n}, f64), start, deltas, perms, classes, true);
  const at::Tensor full = worth_gradient(start.cpu() + deltas.cpu().sum(1));
  EXPECT(at::allclose(grad_start.cpu(), k * (full - worth_gradient(start.cpu())), 1e-10, 1e-12));
  EXPECT(at::allclose(grad_deltas.cpu(), k * full.unsqueeze(1).expand({b, n, m}), 1e-10, 1e-12));
  const at::Tensor g = at::randn({b, n}, f64);
  std::tie(grad_start, grad_deltas) = linear_walk_backward(g, start, deltas, perms, classes, false);
  EXPECT(at::allclose(grad_start.cpu(), at::zeros({b, m}, at::kDouble), 1e-10, 1e-12));
  EXPECT(at::allclose(grad_deltas.cpu(), k * g.cpu().unsqueeze(-1) * onehot.unsqueeze(1), 1e-10,
                      1e-12));
}

// The walk's exp, shared by both devices, is within 2 ulp (4u, tests/numerics.py's EXP_ROUNDINGS)
// of exp on [-87, 0] (every 61st float, both ends, and a sub-ulp neighbourhood of 0); NaN stays
// NaN and arguments below -87 give exp(-87).
void exp_nonpositive_within_two_ulp() {
  const double u = std::ldexp(1.0, -24);
  double worst = 0;
  float worst_at = 0;
  const auto check = [&](float x) {
    const double exact = std::exp(static_cast<double>(x));
    const double error = std::abs(shapcam::exp_nonpositive(x) - exact) / exact;
    if (error > worst) worst = error, worst_at = x;
  };
  uint32_t bits_of_bound;
  const float bound = -87.0f;
  std::memcpy(&bits_of_bound, &bound, sizeof bound);
  for (uint32_t bits = 0x80000000u; bits <= bits_of_bound; bits += 61) {
    float x;
    std::memcpy(&x, &bits, sizeof x);
    check(x);
  }
  for (const float x : {0.0f, -0.0f, -87.0f, -1e-30f, -std::numeric_limits<float>::denorm_min()}) {
    check(x);
  }
  if (!(worst <= 4 * u)) {
    std::cerr << "exp_nonpositive: relative error " << worst / u << " u at x = " << worst_at
              << std::endl;
  }
  EXPECT(worst <= 4 * u);
  EXPECT(std::isnan(shapcam::exp_nonpositive(std::numeric_limits<float>::quiet_NaN())));
  EXPECT(shapcam::exp_nonpositive(-1000.0f) == shapcam::exp_nonpositive(-87.0f));
}

// Prefix rows decode image-major, then permutation, then prefix length, and a position is kept
// when its rank is below the prefix length: the arithmetic both devices' masked_prefixes run.
void prefix_rows_decode() {
  const shapcam::PrefixGrid<int64_t> grid{.perm_start = 2, .num_perms = 3, .prefix_start = 1,
                                          .num_prefixes = 4};
  int64_t r = 0;
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t k = 2; k < 5; ++k) {
      for (int64_t t = 1; t < 5; ++t, ++r) {
        const auto row = shapcam::decode_prefix_row(r, grid);
        EXPECT(row.b == b && row.k == k && row.t == t);
      }
    }
  }
  EXPECT(shapcam::kept<int64_t>(0, 1) && !shapcam::kept<int64_t>(1, 1));
}

void bad_arguments_raise(const at::TensorOptions& options) {
  const at::Tensor acts = at::randn({3, 2, 2}, options), base = at::zeros({}, options);
  const auto raises = [](const std::function<void()>& call, const std::string& name) {
    try {
      call();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace()).find(name) != std::string::npos;
    }
    return false;
  };
  const at::Tensor perms = random_perms(2, 4, options);
  // Bad values, rather than shapes: the CPU raises; CUDA asserts on the device, which would end
  // this process (tests/test_ops.py checks those asserts in subprocesses).
  if (options.device().is_cpu()) {
    const at::Tensor repeated = at::tensor({0, 1, 1, 3}, at::kLong).view({1, 4});
    EXPECT(raises([&] { permutation_ranks(repeated); }, "perms"));
    at::Tensor sum = at::zeros({4}, options), sum_sq = at::zeros({4}, options);
    const at::Tensor values = at::randn({1, 5}, options);
    EXPECT(raises([&] { scatter_marginals_(values, repeated + 1, sum, sum_sq); }, "ranks"));
    at::Tensor walk_sum = at::zeros({1, 4}, options), walk_sum_sq = at::zeros({1, 4}, options);
    EXPECT(raises([&] {
      linear_walk_(at::randn({1, 3}, options), at::randn({1, 4, 3}, options), perms,
                   at::tensor({3}, at::kLong), true, walk_sum, walk_sum_sq);
    }, "classes"));
  }
  const at::Tensor ranks = permutation_ranks(perms);
  EXPECT(raises([&] { masked_prefixes(acts, base, ranks.to(at::kInt), 0, 1, 0, 5); }, "ranks"));
  EXPECT(raises([&] { masked_prefixes(acts, base, ranks, 0, 3, 0, 5); }, "perm_range"));
  EXPECT(raises([&] { masked_prefixes(acts, base, ranks, 0, 2, 0, 6); }, "prefix_range"));
  EXPECT(raises([&] { masked_prefixes(acts.flatten(1), base, ranks, 0, 2, 0, 5); }, "activations"));
  EXPECT(raises([&] { masked_prefixes(acts, at::Tensor(), ranks, 0, 2, 0, 5); },
                "baseline is None"));
  at::Tensor phi = at::zeros({4}, options), phi_sq = at::zeros({4}, options.dtype(at::kDouble));
  EXPECT(raises([&] { scatter_marginals_(at::randn({2, 5}, options), ranks, phi, phi_sq); },
                "phi_sq"));
  at::Tensor sum = at::zeros({4}, options), sum_sq = at::zeros({4}, options);
  EXPECT(raises([&] { scatter_marginals_(at::randn({2, 5}, options), ranks, sum, sum_sq, 3); },
                "unit_size"));
  EXPECT(raises([&] { scatter_marginals_(at::randn({2, 5}, options), ranks, sum, sum); },
                "share memory"));
}

void deterministic(const at::TensorOptions& options) {
  const at::Tensor values = at::randn({2, 300, 50}, options),
                   perms = random_perms(300, 49, options);
  std::vector<at::Tensor> runs;
  for (int r = 0; r < 2; ++r) {
    at::Tensor phi = at::zeros({2, 49}, options), phi_sq = at::zeros({2, 49}, options);
    scatter_marginals_(values, permutation_ranks(perms), phi, phi_sq);
    runs.push_back(at::cat({phi, phi_sq}));
  }
  EXPECT(at::equal(runs[0], runs[1]));
}

}  // namespace

int main() {
  at::manual_seed(0);
  exp_nonpositive_within_two_ulp();
  prefix_rows_decode();
  std::vector<at::Device> devices{at::kCPU};
  if (at::hasCUDA() && c10::Dispatcher::singleton()
                           .findSchemaOrThrow("shapcam::masked_prefixes", "")
                           .hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
    devices.emplace_back(at::kCUDA);
  }
  for (const at::Device& device : devices) {
    const auto options = at::TensorOptions().device(device).dtype(at::kFloat);
    std::cout << "device " << device << std::endl;
    permutation_ranks_invert(options);
    masked_rows_follow_ranks(options);
    for (const int64_t unit_size : {1, 2, 5}) scatter_is_efficient_and_exact(options, unit_size);
    linear_walk_matches_brute_force(options);
    linear_walk_backward_closed_forms(options);
    bad_arguments_raise(options);
    deterministic(options);
  }
  std::cout << (failures == 0 ? "all passed" : std::to_string(failures) + " failed") << std::endl;
  return failures == 0 ? 0 : 1;
}

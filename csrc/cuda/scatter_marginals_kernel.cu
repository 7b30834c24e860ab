#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../entry_points.h"
#include "cuda_helpers.h"

namespace shapcam {
namespace {

// Adds to phi[b, p] the marginal values[b, k, r+1] - values[b, k, r] of every permutation k,
// r = ranks[k, p], and to phi_sq (when defined) the square of each unit's sum of them. values:
// (B, K, n+1) with any strides; a rank outside [0, n) fails a device-side assert.
void scatter_into(const at::Tensor& values, const at::Tensor& ranks, at::Tensor& phi,
                  const at::Tensor& phi_sq, int64_t unit_size) {
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor steps = ranks.contiguous();
  const int64_t n = values.size(2) - 1;
  AT_DISPATCH_FLOATING_TYPES(phi.scalar_type(), "scatter_marginals", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, values.scalar_type(), "scatter_marginals", [&] {
          const RankedMarginal<scalar_t, acc_t> marginal_of{
              values.const_data_ptr<scalar_t>(), values.stride(0), values.stride(1),
              values.stride(2), steps.const_data_ptr<int64_t>(), n};
          accumulate_units_cuda<acc_t>(marginal_of, phi, phi_sq, values.size(1), unit_size);
        });
  });
}

at::Tensor scatter_marginals_cuda(const at::Tensor& values, const at::Tensor& ranks,
                                  std::optional<at::ScalarType> dtype) {
  return scatter_marginals_with(scatter_into, values, ranks, dtype);
}

void scatter_marginals_inplace_cuda(const at::Tensor& values, const at::Tensor& ranks,
                                    at::Tensor& phi, at::Tensor& phi_sq, int64_t unit_size) {
  scatter_marginals_inplace_with(scatter_into, values, ranks, phi, phi_sq, unit_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(shapcam, CUDA, m) {
  m.impl("scatter_marginals", &scatter_marginals_cuda);
  m.impl("scatter_marginals_", &scatter_marginals_inplace_cuda);
}

}  // namespace shapcam
